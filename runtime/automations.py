"""Automations: what starts runs without a person (docs/automations.md).

A loop's `[[trigger]]` entries name automation kinds, which plugins contribute through
`loopwright_register_automations` (the built-ins `cron`, `webhook`, `watch` and `after` live in
plugins/triggers.py; this module imports no plugin). A kind's factory takes the TriggerSpec and
returns a trigger: any object with some of these methods, each called in a worker thread with a
`Context`:

- `poll(ctx)`: about every TICK_S while `loopwright serve` runs (schedules, watches);
- `handle(ctx, request) -> WebhookResponse`: a POST to the daemon's public /hooks/<loop>/<name>;
- `on_run_finished(ctx, run, outcome)`: a run ended, in whatever process executed it.

A trigger starts runs with `ctx.fire(key)`. The key names the firing (a due time, a delivery, a
commit); a firing happens once per key, whatever crashes or second daemons do: it is recorded
before the run is started, the run's id is derived from it, and both the run row and the durable
workflow are keyed by that id. `fire` also enforces the automation's daily budget and its pause.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import sqlalchemy as sa

from .config import ConfigError
from .plugin_host import PluginError, PluginHost
from .service import RunError, Runtime
from .spec import LoopSpec, SpecError, load_spec, loop_files
from .store import Store, automations as automations_table, firings, runs
from .trigger_specs import Automation, AutomationError, build_automation
from .types import Outcome, RunInfo, WebhookRequest

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)

TICK_S = 0.25  # how often the daemon polls its triggers
HOOKS_PATH = "/hooks"  # webhooks: POST /hooks/<loop>/<trigger name>
MAX_WEBHOOK_BYTES = 1024 * 1024
# For tests only: a file holding the current time (Unix seconds). While it is set, the automations'
# clock reads that file instead of the system clock, so a test can move time past a due firing.
CLOCK_FILE_ENV = "LOOPWRIGHT_TEST_CLOCK_FILE"
START_ERRORS = (RunError, SpecError, ConfigError, PluginError)


def clock() -> datetime:
    """Now, in UTC: the automations' only clock (budgets, schedules, webhook timestamps)."""
    path = os.environ.get(CLOCK_FILE_ENV)
    if path:
        try:
            return datetime.fromtimestamp(float(Path(path).read_text().strip()), timezone.utc)
        except (OSError, ValueError):
            pass
    return datetime.now(timezone.utc)


@dataclass
class Fired:
    """What `ctx.fire` did: `started` a run, `skipped` it (paused, over budget) or `failed` to start
    it (the reason says why). `repeated`: this key had fired before; nothing new happened."""

    status: str
    run_id: str
    reason: str = ""
    repeated: bool = False


# --- building triggers from loop specs -------------------------------------------------------------


def load_automations(host: PluginHost, files: list[Path]) -> tuple[list[Automation], list[str]]:
    """Every trigger of the loop specs in `files`, and one line per spec or trigger that is broken."""
    found: dict[str, Automation] = {}
    problems = []
    for path in files:
        try:
            spec = load_spec(path)
        except SpecError as error:
            problems.append(str(error))
            continue
        for index, name in enumerate(spec.trigger_names()):
            try:
                automation = build_automation(host, spec, path, index)
            except AutomationError as error:
                problems.append(f"{path}: trigger[{index}] ({name}): {error}")
                continue
            found.setdefault(automation.id, automation)  # a loop defined twice: the first file wins
    return list(found.values()), problems


def _defines(file: Path, automation_id: str) -> bool | None:
    """Whether the spec in `file` has this trigger; None when the spec cannot be read now."""
    try:
        spec = load_spec(file)
    except SpecError:
        return None
    return automation_id in {f"{spec.name}/{name}" for name in spec.trigger_names()}


# --- the trigger's view ----------------------------------------------------------------------------


class Context:
    """What a trigger gets: its automation and loop spec, the clock, a checkpoint, and `fire`."""

    def __init__(self, engine: Automations, automation: Automation):
        self._engine = engine
        self.automation = automation
        self._state: dict[str, Any] | None = None

    @property
    def spec(self) -> LoopSpec:
        return self.automation.spec

    def now(self) -> datetime:
        return clock()

    @property
    def state(self) -> dict[str, Any]:
        """The checkpoint the trigger saved last (empty at first); it survives restarts."""
        if self._state is None:
            self._state = self._engine.load_state(self.automation)
        return dict(self._state)

    def save_state(self, state: dict[str, Any]) -> None:
        self._engine.save_state(self.automation, state)
        self._state = dict(state)

    def fire(self, key: str, *, when: datetime | None = None, details: dict[str, Any] | None = None,
             spec: LoopSpec | None = None) -> Fired:
        """Start a run of the loop for the firing `key`, once; see the module docstring. `spec`: the loop's
        spec as this firing runs it (an event's commit as the start, its text in the goal)."""
        return self._engine.fire(self.automation, key, when or clock(), details or {}, spec)


# --- the engine ------------------------------------------------------------------------------------


def firing_run_id(when: datetime, key: str) -> str:
    """The run id of a firing: its time (like every run id) and a digest of its key."""
    return f"{when.astimezone(timezone.utc):%Y%m%d-%H%M%S}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


class Automations:
    """The automations of one process: fires, records, enforces budgets and pauses."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.store: Store = runtime.store
        self.loaded: dict[str, Automation] = {}
        self._contexts: dict[str, Context] = {}
        self._poll_errors: dict[str, str] = {}
        self._firing_lock = threading.Lock()

    def context(self, automation: Automation) -> Context:
        ctx = self._contexts.get(automation.id)
        if ctx is None or ctx.automation is not automation:
            ctx = self._contexts[automation.id] = Context(self, automation)
        return ctx

    # --- the store -------------------------------------------------------------------------------

    def register(self, automation: Automation) -> None:
        """Record the automation and its settings. Its pause stays; its checkpoint stays unless the
        settings changed (a new schedule counts from now, a new watch takes a new baseline)."""
        c = automations_table.c
        settings = json.dumps(automation.settings, sort_keys=True)
        values = dict(loop=automation.loop, name=automation.name, kind=automation.kind, file=str(automation.file),
                      settings=settings, updated_at=time.time())
        with self.store.engine.begin() as db:
            before = db.execute(sa.select(c.settings).where(c.id == automation.id)).scalar()
            if before is None:
                db.execute(_insert(self.store)(automations_table).values(
                    id=automation.id, state="{}", paused=False, paused_reason="", **values
                ).on_conflict_do_nothing(index_elements=["id"]))
            elif before != settings:
                db.execute(sa.update(automations_table).where(c.id == automation.id).values(state="{}", **values))
                self._contexts.pop(automation.id, None)

    def load_state(self, automation: Automation) -> dict[str, Any]:
        with self.store.engine.connect() as db:
            state = db.execute(sa.select(automations_table.c.state)
                               .where(automations_table.c.id == automation.id)).scalar()
        return json.loads(state) if state else {}

    def save_state(self, automation: Automation, state: dict[str, Any]) -> None:
        with self.store.engine.begin() as db:
            db.execute(sa.update(automations_table).where(automations_table.c.id == automation.id)
                       .values(state=json.dumps(state), updated_at=time.time()))

    def _refusal(self, automation: Automation, day: str) -> str:
        """Why a new firing must be skipped (paused, over a daily budget), or ''."""
        c = automations_table.c
        with self.store.engine.connect() as db:
            paused, why = db.execute(sa.select(c.paused, c.paused_reason).where(c.id == automation.id)).one()
            if paused:
                return f"paused ({why}); resume it with: loopwright automations resume {automation.id}"
            today = sa.and_(firings.c.automation == automation.id, firings.c.day == day,
                            firings.c.status == "started")
            limit = automation.trigger_spec.max_runs_per_day
            if limit is not None:
                count = db.execute(sa.select(sa.func.count()).select_from(firings).where(today)).scalar()
                if count >= limit:
                    return f"over budget: {count} run(s) started today (UTC), max_runs_per_day = {limit}"
            dollars = automation.trigger_spec.max_cost_usd_per_day
            if dollars is not None:
                spent = db.execute(sa.select(sa.func.coalesce(sa.func.sum(runs.c.spent_usd), 0.0))
                                   .select_from(firings.join(runs, runs.c.id == firings.c.run_id))
                                   .where(today)).scalar()
                if spent >= dollars:
                    return f"over budget: ${spent:.4f} spent today (UTC) by its runs, max_cost_usd_per_day = {dollars}"
        return ""

    def _firing(self, key: str) -> dict[str, Any] | None:
        with self.store.engine.connect() as db:
            row = db.execute(firings.select().where(firings.c.key == key)).first()
        return dict(row._mapping) if row else None

    def _set_firing(self, key: str, status: str, reason: str = "") -> None:
        with self.store.engine.begin() as db:
            db.execute(sa.update(firings).where(firings.c.key == key).values(status=status, reason=reason))

    # --- firing ----------------------------------------------------------------------------------

    def fire(self, automation: Automation, key: str, when: datetime, details: dict[str, Any],
             spec: LoopSpec | None = None) -> Fired:
        with self._firing_lock:  # the scheduler's thread and webhook requests fire concurrently
            return self._fire(automation, key, when, details, spec)

    def _fire(self, automation: Automation, key: str, when: datetime, details: dict[str, Any],
              spec: LoopSpec | None = None) -> Fired:
        key = f"{automation.id}:{key}"
        found = self._firing(key)
        if found and found["status"] != "pending":
            return Fired(found["status"], found["run_id"], found["reason"], repeated=True)
        if found is None:
            self.register(automation)
            now = clock()
            reason = self._refusal(automation, f"{now:%Y-%m-%d}")
            row = dict(key=key, automation=automation.id, loop=automation.loop, run_id=firing_run_id(when, key),
                       status="skipped" if reason else "pending", reason=reason,
                       details=json.dumps(details, default=str), due_at=when.timestamp(), day=f"{now:%Y-%m-%d}",
                       created_at=time.time())
            with self.store.engine.begin() as db:
                ours = db.execute(_insert(self.store)(firings).values(**row).on_conflict_do_nothing(
                    index_elements=["key"]).returning(firings.c.key)).first() is not None
            if not ours:  # another process recorded this firing first: its record decides
                return self._fire(automation, key.removeprefix(f"{automation.id}:"), when, details, spec)
            if reason:
                log.warning("automation %s skipped firing %s: %s", automation.id, key, reason)
                return Fired("skipped", row["run_id"], reason)
            found = row
        # A new firing, or one a crash interrupted: both end here, and start_run is idempotent by run id.
        run_id = found["run_id"]
        trigger = {"automation": automation.id, "kind": automation.kind, "firing": key,
                   "at": datetime.fromtimestamp(found["due_at"], timezone.utc).isoformat(), **details}
        try:
            self.runtime.start_run(spec or automation.spec, run_id=run_id, trigger=trigger)
        except START_ERRORS as error:
            self._set_firing(key, "failed", str(error))
            log.warning("automation %s could not start a run: %s", automation.id, error)
            return Fired("failed", run_id, str(error))
        self._set_firing(key, "started")
        log.info("automation %s started run %s (%s)", automation.id, run_id, key)
        return Fired("started", run_id)

    # --- reacting to finished runs ----------------------------------------------------------------

    def run_finished(self, run: RunInfo, outcome: Outcome) -> None:
        """Pause the automation that started `run` if a provider refused it for quota; then pass the
        run to every trigger that reacts to finished runs (chaining)."""
        self.pause_on_quota_error(run.id, outcome)
        with self.store.engine.connect() as db:  # the loops that daemons serve, then the run's project
            files = [Path(f) for f in db.execute(sa.select(automations_table.c.file).distinct()).scalars() if f]
        files += loop_files(Path(run.spec.workspace.repo) / "loops")
        if os.environ.get("LOOPWRIGHT_LOOPS"):
            files += loop_files(Path(os.environ["LOOPWRIGHT_LOOPS"]))
        unique = list(dict.fromkeys(p.resolve() for p in files if p.is_file()))
        found, _ = load_automations(self.runtime.host, unique)
        for automation in found:
            react = getattr(automation.trigger, "on_run_finished", None)
            if react is None:
                continue
            try:
                react(self.context(automation), run, outcome)
            except Exception:  # one broken trigger must not keep the others from their chained runs
                log.exception("automation %s failed on the end of run %s", automation.id, run.id)

    def pause_on_quota_error(self, run_id: str, outcome: Outcome) -> str | None:
        """Pause the automation whose firing started this run when the run ended on a quota error."""
        if outcome.error != "quota":  # a ModelError's kind: a provider's quota or rate limit (429)
            return None
        with self.store.engine.connect() as db:
            automation = db.execute(sa.select(firings.c.automation).where(firings.c.run_id == run_id)).scalar()
        if automation is None:
            return None
        set_paused(self.store, automation, True, f"run {run_id} hit a provider quota: {outcome.reason[:300]}")
        log.warning("automation %s is paused: run %s hit a provider quota or rate limit", automation, run_id)
        return automation

    # --- the daemon --------------------------------------------------------------------------------

    def load_folder(self, folder: Path) -> list[str]:
        """(Re)build the triggers of the loop specs in `folder`; returns the problems found."""
        found, problems = load_automations(self.runtime.host, loop_files(folder))
        for automation in found:
            self.register(automation)
        self.loaded = {a.id: a for a in found}
        # A trigger deleted from its spec (or with its spec) is forgotten; one whose spec is broken for
        # the moment keeps its checkpoint and its pause.
        c = automations_table.c
        with self.store.engine.connect() as db:
            rows = [(row.id, Path(row.file)) for row in db.execute(sa.select(c.id, c.file)) if row.file]
        gone = [automation_id for automation_id, file in rows if file.parent == folder
                and automation_id not in self.loaded and (not file.exists() or _defines(file, automation_id) is False)]
        if gone:
            with self.store.engine.begin() as db:
                db.execute(sa.delete(automations_table).where(c.id.in_(gone)))
        for problem in problems:
            log.warning("automations: %s", problem)
        return problems

    def finish_interrupted(self) -> list[str]:
        """Start the runs of firings that were recorded but not started (their process died between
        the two); returns their keys. The daemon calls it once at start."""
        with self.store.engine.connect() as db:
            pending = [dict(row._mapping) for row in db.execute(firings.select().where(firings.c.status == "pending"))]
        done = []
        for row in pending:
            automation = self.loaded.get(row["automation"])
            if automation is not None:
                self.fire(automation, row["key"].removeprefix(f"{automation.id}:"),
                          datetime.fromtimestamp(row["due_at"], timezone.utc), json.loads(row["details"]))
                done.append(row["key"])
        return done

    def tick(self) -> None:
        for automation in list(self.loaded.values()):
            poll = getattr(automation.trigger, "poll", None)
            if poll is None:
                continue
            try:
                poll(self.context(automation))
                self._poll_errors.pop(automation.id, None)
            except Exception as error:
                if self._poll_errors.get(automation.id) != repr(error):  # once per distinct error, not per tick
                    self._poll_errors[automation.id] = repr(error)
                    log.exception("automation %s failed to poll; it is retried", automation.id)

    async def webhook(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        automation = self.loaded.get(f"{request.path_params['loop']}/{request.path_params['name']}")
        handle = getattr(automation.trigger, "handle", None) if automation else None
        if automation is None or handle is None:
            return JSONResponse({"error": "no webhook trigger at this path: it is /hooks/<loop>/<trigger name>"},
                                status_code=404)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_WEBHOOK_BYTES:
                return JSONResponse({"error": f"the body is larger than {MAX_WEBHOOK_BYTES} bytes"}, status_code=413)
        incoming = WebhookRequest({k.lower(): v for k, v in request.headers.items()}, bytes(body))
        answer = await anyio.to_thread.run_sync(handle, self.context(automation), incoming)
        return JSONResponse(answer.body, status_code=answer.status)


def _insert(store: Store) -> Any:
    if store.engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


@dataclass
class _Folder:
    path: Path
    seen: tuple = field(default_factory=tuple)

    def changed(self) -> bool:
        now = []
        for path in loop_files(self.path):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed since the listing: the next look sees it gone
                continue
            now.append((path.name, stat.st_mtime_ns, stat.st_size))
        changed, self.seen = tuple(now) != self.seen, tuple(now)
        return changed


def install_automations(daemon: Daemon, loops_dir: Path) -> Automations:
    """Give the daemon the triggers of the loops in `loops_dir`: a task that polls them (and reloads
    the folder when a spec changes) and the public webhook route, which checks signatures itself."""
    from starlette.routing import Mount, Route

    engine = Automations(daemon.runtime)
    folder = _Folder(loops_dir)

    failing = ""

    def tick() -> None:
        nonlocal failing
        try:
            if folder.changed():
                engine.load_folder(loops_dir)
            engine.tick()
            failing = ""
        except Exception as error:  # e.g. the database is busy: the next tick tries again
            if failing != repr(error):
                failing = repr(error)
                log.exception("automations: a tick failed; retrying")

    async def serve(_daemon: Daemon, *, task_status: Any) -> None:
        folder.changed()
        await anyio.to_thread.run_sync(engine.load_folder, loops_dir)
        await anyio.to_thread.run_sync(engine.finish_interrupted)
        await anyio.to_thread.run_sync(tick)
        task_status.started()
        while True:
            await anyio.sleep(TICK_S)
            await anyio.to_thread.run_sync(tick)

    daemon.add_route(Mount(HOOKS_PATH, routes=[Route("/{loop}/{name}", engine.webhook, methods=["POST"])]),
                     public=True)
    daemon.add_task("automations", serve)
    return engine


# --- listing, pausing, resuming ---------------------------------------------------------------------


def set_paused(store: Store, automation_id: str, paused: bool, reason: str = "") -> None:
    c = automations_table.c
    with store.engine.begin() as db:
        found = db.execute(sa.update(automations_table).where(c.id == automation_id)
                           .values(paused=paused, paused_reason=reason if paused else "", updated_at=time.time()))
    if found.rowcount == 0:
        known = ", ".join(a["id"] for a in describe_automations(store)) or "none yet"
        raise RunError(f"no automation {automation_id!r}; known automations: {known}")


def describe_automations(store: Store) -> list[dict[str, Any]]:
    """Every automation a daemon or a chained run has registered, with its state and today's firings."""
    day = f"{clock():%Y-%m-%d}"
    out = []
    with store.engine.connect() as db:
        for row in db.execute(automations_table.select().order_by(automations_table.c.id)):
            c = firings.c
            today = db.execute(sa.select(sa.func.count()).where(c.automation == row.id, c.day == day,
                                                                  c.status == "started")).scalar()
            last = db.execute(firings.select().where(c.automation == row.id)
                              .order_by(c.created_at.desc()).limit(1)).first()
            settings = json.loads(row.settings)
            out.append({
                "id": row.id, "loop": row.loop, "kind": row.kind, "file": row.file,
                "settings": {k: v for k, v in settings.items() if k not in ("kind", "name")},
                "paused": bool(row.paused), "paused_reason": row.paused_reason, "runs_today": today,
                "last_firing": None if last is None else {
                    "key": last.key, "status": last.status, "reason": last.reason, "run_id": last.run_id,
                    "at": datetime.fromtimestamp(last.due_at, timezone.utc).isoformat(),
                },
            })
    return out
