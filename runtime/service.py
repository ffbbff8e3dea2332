"""The runtime's public API, used by the CLI and the MCP server: start, watch and stop runs."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Settings, load_settings
from .plugin_host import PluginHost, make_plugin_host
from .records import Run, new_run_id
from .sqlite_reads import reads_for

log = logging.getLogger(__name__)
if TYPE_CHECKING:
    from .spec import LoopSpec

VERSION = "0.1.0"
RUN_QUEUE = "loopwright-runs"  # every process that executes runs takes queued runs from here
WORKFLOW = "loopwright.run"
DAEMON_FILE = "daemon.json"  # written by `loopwright serve`: its owner id and URL
WORKER_FILE = "worker.json"  # written by `loopwright worker`: its owner id
WORKER_IDLE_S = 5.0  # a worker with nothing to execute for this long exits
NEVER_QUEUED_S = 60.0  # a run without an owner or a workflow this long after it was recorded was never queued
HEARTBEAT_S = 10.0  # how often a process that executes runs says it is alive (in the database)
HEARTBEAT_STALE_S = 60.0  # a process on another machine silent for this long is dead: its runs are taken over


class RunError(Exception):
    """A request about a run that cannot be honoured; the message says what to do instead."""


def process_start_time(pid: int) -> str:
    """The kernel's start time of a process: with the pid, it names a process even across pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_is_alive(owner: str) -> bool:
    host, pid, started = (owner.split(":") + ["", "", ""])[:3]
    if host != socket.gethostname():
        return True  # another machine's process: not ours to judge
    return bool(pid) and process_start_time(int(pid)) == started


@dataclass
class RunStatus:
    """What `status` and the `get_run` tool report."""

    id: str
    loop: str
    status: str
    reason: str
    iteration: int
    max_iterations: int
    branch: str
    worktree: str
    commit: str
    network: str
    spent_usd: float
    max_cost_usd: float
    tokens: dict[str, int]
    spend_by_role: list[dict[str, Any]]  # per role and model: {role, model, calls, cost_usd}, dearest first
    model_calls: int
    tool_calls: int
    last_verdict: dict[str, Any] | None
    stall_count: int
    stop_requested: bool
    pending_approvals: list[dict[str, Any]]
    created_at: float
    finished_at: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Runtime:
    """One per process. Read-only use needs no launch; executing runs needs `launch()`."""

    def __init__(self, settings: Settings | None = None, host: PluginHost | None = None, *, read_only: bool = False):
        """`read_only`: only reading runs (`status`, `list_runs`); a local SQLite store is then read without
        SQLAlchemy, so that `loopwright runs` and `status` answer at once."""
        self.settings = settings or load_settings()
        self._store: Any = read_only and reads_for(self.settings.database_url) or None
        self._host = host
        self._host_lock = threading.RLock()  # guards the lazily made host and store
        self._launching: threading.Thread | None = None
        self._launch_error: BaseException | None = None
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{process_start_time(os.getpid())}"
        self.launched = False
        self.recovered: list[str] = []  # runs of dead processes this one took over when it launched
        self.takes_work = False  # executes queued runs (a daemon, a worker), not only its own
        self.one_run = False  # executes one run, then ends (a foreground `loopwright run`)
        self._beating = threading.Event()  # set: this process no longer beats (see _beat)
        self._client: Any = None

    @property
    def store(self) -> Any:
        """The runs database (made at first use: an MCP server answers its client before it needs it)."""
        with self._host_lock:
            if self._store is None:
                from .store import Store  # here: SQLAlchemy takes a while to import

                self._store = Store(self.settings.database_url)
        return self._store

    @property
    def host(self) -> PluginHost:
        with self._host_lock:  # an MCP server launches in a thread while it answers requests
            if self._host is None:
                self._host = make_plugin_host(self.settings)
        return self._host

    # --- executing -----------------------------------------------------------------------------

    def launch(self, *, take_work: bool = True, one_run: bool = False) -> None:
        """Start the durable executor and clear sandboxes of dead processes. With `take_work` (a
        daemon, a worker, `recover`), also take queued runs and the runs of dead processes; a
        foreground `loopwright run` executes only its own run (`one_run`: no sandbox is kept warm
        for a next), and an MCP server over stdio none."""
        from dbos import DBOS

        from .engine import bind_runtime

        bind_runtime(self)
        for name in ("dbos", "dbos._logger"):
            logging.getLogger(name).setLevel(logging.WARNING)
        DBOS(config={
            "name": "loopwright",
            "system_database_url": self.settings.database_url,
            "executor_id": self.owner,
            "application_version": VERSION,
            "log_level": "WARNING",
        })
        if not take_work:
            DBOS.listen_queues([])
        DBOS.launch()
        DBOS.register_queue(RUN_QUEUE, worker_concurrency=self.settings.max_parallel_runs, polling_interval_sec=0.2)
        self.launched, self.takes_work, self.one_run = True, take_work, one_run
        threading.Thread(target=self._beat, args=(self._beating,), name="loopwright-heartbeat", daemon=True).start()
        for contribution in self.host.registries["sandboxes"].values():
            removed = contribution.value.reap_orphans()
            if removed:
                log.warning("removed sandboxes left by dead processes: %s", ", ".join(removed))
        if take_work:
            self.recovered = self.recover_orphaned_runs()

    def launch_in_background(self, *, take_work: bool = True) -> None:
        """`launch()` in a thread, so that an MCP server answers its client meanwhile. Whatever needs the
        durable executor or its tables (starting, steering, waking a run) waits for it first."""
        def launch() -> None:
            try:
                self.launch(take_work=take_work)
            except BaseException as error:  # re-raised by wait_launched, in the thread that needs it
                self._launch_error = error

        self._launching = threading.Thread(target=launch, name="loopwright-launch", daemon=True)
        self._launching.start()

    def wait_launched(self) -> None:
        if self._launching is not None:
            self._launching.join()
            if self._launch_error is not None:
                raise self._launch_error

    def _beat(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.store.beat(self.owner)
            except Exception as error:  # a database hiccup: the next beat is soon
                log.warning("could not record this process's heartbeat (trying again in %ds): %s", HEARTBEAT_S, error)
            stop.wait(HEARTBEAT_S)

    def owner_alive(self, owner: str) -> bool:
        """Whether the process that owns a run is alive: on this machine, by its pid and start time; on
        another, by its heartbeat in the database (silent for HEARTBEAT_STALE_S: dead)."""
        if owner.split(":")[0] == socket.gethostname():
            return owner_is_alive(owner)
        beat = self.store.last_beat(owner)
        return beat is not None and time.time() - beat < HEARTBEAT_STALE_S

    def recover_orphaned_runs(self) -> list[str]:
        """Runs whose owning process died continue here, from their last finished step."""
        from dbos import DBOS

        taken = []
        live = {w.workflow_id for w in DBOS.list_workflows(status=["PENDING", "ENQUEUED"], load_input=False,
                                                             load_output=False)}
        for run in self.store.list_runs(limit=1000):
            if run.owner:
                # A run is marked finished before its last steps (the run-finished hooks: notifications, GitHub):
                # a finished run whose workflow is still pending died among them, and they are owed.
                if (run.finished and run.id not in live) or run.owner == self.owner or self.owner_alive(run.owner):
                    continue
            elif run.finished or run.id in live or time.time() - run.created_at < NEVER_QUEUED_S:
                continue  # queued (or being queued): whichever process executes runs takes it from the queue
            # else its process died after recording the run and before queueing it
            if DBOS.get_workflow_status(run.id) is None:
                self._start_workflow(run.id)  # the process died before the workflow was recorded
            else:  # back on the queue, from its last finished step: whichever process executes runs takes it
                DBOS.resume_workflow(run.id, queue_name=RUN_QUEUE)
            self.store.update_run(run.id, owner=self.owner)
            taken.append(run.id)
        return taken

    def preflight(self, spec: LoopSpec, *, replay: bool = False, here: bool = True) -> None:
        """Refuse a run that cannot work, before anything is created. The makers' and checkers' own
        checks (an API key) are for the process that executes the run: skipped when the run is handed
        to another (a daemon may hold a key this process lacks), and for a replay, which calls no model."""
        maker = self.host.agent(spec.agent.kind)(spec.agent, self.settings)
        checkers = [self.host.verifier(check.kind)(check) for check in spec.verify]
        if here and not replay:
            for part in [maker, *checkers]:
                if callable(check := getattr(part, "check", None)):
                    check()
        self.host.sandbox(spec.sandbox.kind)
        self.settings.price(spec.agent.model)
        repo = Path(spec.workspace.repo)
        if not (repo / ".git").exists():
            raise RunError(f"workspace.repo {str(repo)!r} is not a git repository: point it at one (relative to the spec file)")

    def start_run(self, spec: LoopSpec, *, here: bool = False, run_id: str | None = None,
                  trigger: dict[str, Any] | None = None, replay: dict[str, Any] | None = None) -> Run:
        """Create a run and return at once. With `here`, this process executes it; otherwise it is
        queued, and the first process that executes runs (a daemon, or an MCP server) takes it.

        `run_id` chooses the id (an automation derives it from the firing, so starting the same firing
        twice yields one run: the row and the durable workflow are both keyed by it); `trigger` says
        what started the run, recorded as the first event of its trace; `replay`, a recorded session
        (runtime/replay.py) whose answers the run gets instead of calling the model."""
        self.wait_launched()
        if here and not self.launched:
            raise RunError("this process does not execute runs; call launch() first")
        self.preflight(spec, replay=replay is not None, here=here)
        run_id = run_id or new_run_id()
        run = self.store.create_run(
            run_id, spec.name, spec.model_dump(mode="json"), spec.workspace.repo, f"loopwright/{spec.name}/{run_id}"
        )
        if trigger:
            self.store.add_event(run_id, "trigger", "triggered", 0, trigger)
        if replay is not None:
            self.store.add_event(run_id, "replay", "replay", 0, replay)
        self.execute(run_id, here=here)
        return run

    def execute(self, run_id: str, *, here: bool) -> None:
        """Execute a created run: in this process, or queued for the first process that executes runs."""
        if here:
            self.store.update_run(run_id, owner=self.owner)
            self._start_workflow(run_id)
        else:
            self._dbos_client().enqueue(
                {"queue_name": RUN_QUEUE, "workflow_name": WORKFLOW, "workflow_id": run_id, "app_version": VERSION},
                run_id,
            )

    def ensure_executor(self) -> str:
        """Make sure a process executes queued runs: this one, the daemon, a worker, or else a new worker,
        detached from this process so that runs outlive it (an MCP server over stdio ends with its client).
        Returns which, in words for whoever started the run."""
        if self.running_daemon() is not None:
            return "the daemon"
        if self.takes_work:
            return "this process"
        if self.running_worker() is not None:
            return "a worker process (it outlives this session)"
        with open(self.settings.home / "worker.log", "ab") as log_file:  # the worker keeps its own copy open
            subprocess.Popen([sys.executable, "-m", "loopwright.cli", "worker"], stdin=subprocess.DEVNULL,
                             stdout=log_file, stderr=log_file, start_new_session=True)
        return "a worker process started for it (it outlives this session)"

    def hand_over_orphans(self) -> None:
        """Queued runs, and runs whose process died, get an executor (see `ensure_executor`)."""
        self.wait_launched()
        if any(not r.finished and (not r.owner or not self.owner_alive(r.owner)) for r in self.store.list_runs(limit=1000)):
            self.ensure_executor()

    def running_worker(self) -> dict[str, Any] | None:
        """The `loopwright worker` process of this LOOPWRIGHT_HOME, if one is alive."""
        return self._alive(WORKER_FILE)

    def work_until_idle(self, idle_s: float = WORKER_IDLE_S) -> None:
        """`loopwright worker`: execute queued runs and those of dead processes; return once none is left
        for `idle_s` seconds (runs waiting for a person keep it working)."""
        path = self.settings.home / WORKER_FILE
        path.write_text(json.dumps({"owner": self.owner, "pid": os.getpid()}))
        try:
            self.launch()
            idle_since = time.monotonic()
            while time.monotonic() - idle_since < idle_s:
                time.sleep(0.5)
                self.recover_orphaned_runs()
                if any(not r.finished and r.owner in ("", self.owner) for r in self.store.list_runs(limit=1000)):
                    idle_since = time.monotonic()
            for run in self.store.list_runs(limit=1000):
                if run.owner == self.owner:
                    self.wait_executed(run.id)  # its last steps, after it is marked finished
        finally:
            if json.loads(path.read_text()).get("owner") == self.owner:
                path.unlink()
            self.shutdown()

    def _start_workflow(self, run_id: str) -> None:
        from dbos import DBOS, SetWorkflowID

        from .engine import run_workflow

        with SetWorkflowID(run_id):
            DBOS.start_workflow(run_workflow, run_id)

    def wait_executed(self, run_id: str) -> None:
        """Until this process's workflow for the run has ended: a run is marked finished before its last
        steps (the run-finished hooks, the automations' reaction), and shutting down under them hangs."""
        from dbos import DBOS

        try:
            DBOS.retrieve_workflow(run_id).get_result()
        except Exception:  # the run's outcome is recorded either way; a workflow error is in the trace
            log.exception("the workflow of run %s ended with an error", run_id)

    def shutdown(self) -> None:
        if self._launching is not None:
            self._launching.join()
        if self._client is not None:
            self._client.destroy()
            self._client = None
        if self.launched:
            from dbos import DBOS

            self._beating.set()
            DBOS.destroy(destroy_registry=False)
            self.launched = False

    def running_daemon(self) -> dict[str, Any] | None:
        """The `loopwright serve` process of this LOOPWRIGHT_HOME, if one is alive."""
        return self._alive(DAEMON_FILE)

    def _alive(self, name: str) -> dict[str, Any] | None:
        """What a process wrote about itself in the home's file `name`, if that process is alive."""
        try:
            info = json.loads((self.settings.home / name).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return info if owner_is_alive(info.get("owner", "")) else None

    # --- reading and steering --------------------------------------------------------------------

    def get_run(self, run_id: str) -> Run:
        return self.store.get_run(run_id)

    def status(self, run_id: str) -> RunStatus:
        run = self.store.get_run(run_id)
        totals = self.store.totals(run_id)
        spec = run.spec
        return RunStatus(
            id=run.id, loop=run.loop, status=run.status, reason=run.reason, iteration=run.iteration,
            max_iterations=spec["stop"]["max_iterations"], branch=run.branch, worktree=run.worktree,
            commit=run.commit_sha, network=spec["sandbox"]["network"], spent_usd=round(totals.cost_usd, 6),
            max_cost_usd=spec["stop"]["max_cost_usd"],
            tokens={"input": totals.input_tokens, "output": totals.output_tokens,
                    "cache_write": totals.cache_write_tokens, "cache_read": totals.cache_read_tokens},
            spend_by_role=[{**asdict(row), "cost_usd": round(row.cost_usd, 6)} for row in self.store.spend_by_role(run_id)],
            model_calls=totals.model_calls, tool_calls=totals.tool_calls, last_verdict=run.last_verdict,
            stall_count=run.stall_count, stop_requested=run.stop_requested,
            pending_approvals=[
                {"approval_id": a["id"], "tool": a["tool"], "input": a["input"], "rule": a["rule"]}
                for a in self.store.list_approvals(run_id)
            ],
            created_at=run.created_at, finished_at=run.finished_at,
        )

    def list_runs(self, loop: str | None = None, status: str | None = None, limit: int = 50) -> list[Run]:
        return self.store.list_runs(loop, status, limit)

    def _unfinished(self, run_id: str, action: str) -> Run:
        run = self.store.get_run(run_id)
        if run.finished:
            raise RunError(f"run {run_id} already finished ({run.status}); nothing to {action}")
        return run

    def _send(self, run_id: str, message: dict[str, Any]) -> None:
        """Wake a run that waits durably (paused, or at an approval gate), from any process."""
        from .engine import CONTROL_TOPIC

        self._dbos_client().send(run_id, message, CONTROL_TOPIC)

    def _dbos_client(self) -> Any:
        """Talks to the durable store without executing anything (no launch needed, but one under way
        must finish: it makes the tables)."""
        from dbos import DBOSClient

        self.wait_launched()
        if self._client is None:
            self._client = DBOSClient(system_database_url=self.settings.database_url)
        return self._client

    def stop_run(self, run_id: str) -> Run:
        self._unfinished(run_id, "stop")
        self.store.update_run(run_id, stop_requested=True)
        self._send(run_id, {"type": "stop"})
        return self.store.get_run(run_id)

    def pause_run(self, run_id: str) -> Run:
        run = self._unfinished(run_id, "pause")
        if run.pause_requested:
            raise RunError(f"run {run_id} is already paused or pausing; resume it with resume_run")
        self.store.update_run(run_id, pause_requested=True)
        return self.store.get_run(run_id)

    def resume_run(self, run_id: str) -> Run:
        run = self._unfinished(run_id, "resume")
        if not run.pause_requested:
            raise RunError(f"run {run_id} is not paused (it is {run.status}); only a paused run can be resumed")
        self.store.update_run(run_id, pause_requested=False)
        self._send(run_id, {"type": "resume"})
        return self.store.get_run(run_id)

    def list_approvals(self, run_id: str | None = None, pending_only: bool = True) -> list[dict[str, Any]]:
        if run_id:
            self.store.get_run(run_id)
        return self.store.list_approvals(run_id, pending_only)

    def decide_approval(self, approval_id: str, allow: bool, note: str = "") -> dict[str, Any]:
        approval = self.store.get_approval(approval_id)
        if approval is None:
            raise RunError(f"no approval with id {approval_id!r}; list pending ones with list_approvals")
        if not self.store.decide_approval(approval_id, "allowed" if allow else "denied", note):
            current = self.store.get_approval(approval_id) or approval
            raise RunError(f"approval {approval_id} was already decided ({current['status']}); nothing changed")
        self._send(approval["run_id"], {"type": "approval", "id": approval_id})
        return self.store.get_approval(approval_id) or approval

    def trace(self, run_id: str, after: int = 0, limit: int = 100, newest: bool = False) -> list[dict[str, Any]]:
        self.store.get_run(run_id)
        return self.store.events(run_id, after, limit, newest)

    def wait(self, run_id: str, timeout: float, poll: float = 0.2) -> Run:
        deadline = time.monotonic() + timeout
        while True:
            run = self.store.get_run(run_id)
            if run.finished or time.monotonic() >= deadline:
                return run
            time.sleep(poll)
