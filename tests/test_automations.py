"""Automations for real: `loopwright serve` as a subprocess, the scripted model, real containers.

Triggered runs end fast: the model says "done" without touching anything, the example's failing
check fails, and max_iterations = 1 ends the run. The point is that the run exists and ran.
"""

import hashlib
import hmac
import json
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import httpx2
import pytest
import sqlalchemy as sa
from dbos import DBOS

from conftest import loopwright, write_spec
from daemon_process import DaemonProcess
from model_server import error, text
from loopwright.runtime.automations import CLOCK_FILE_ENV, Automations, load_automations
from loopwright.runtime.service import Runtime
from loopwright.runtime.spec import load_spec
from loopwright.runtime.store import automations as automations_table

SECRET = "a-webhook-secret-for-tests"


def done(_request: dict) -> dict:
    return text("done")


@pytest.fixture
def serve(home):
    """Start `loopwright serve` on `loops` (start the model first: the daemon inherits its env)."""
    daemons = []

    def start(loops: Path) -> DaemonProcess:
        daemons.append(DaemonProcess(home, loops))
        return daemons[-1]

    yield start
    for daemon in daemons:
        if daemon.process.returncode != -signal.SIGKILL:
            assert daemon.stop() == 0, daemon.output()


@pytest.fixture
def clock(tmp_path, monkeypatch):
    """The automations' clock (test-only LOOPWRIGHT_TEST_CLOCK_FILE): `clock("2026-03-02T07:00:00+00:00")`."""
    path = tmp_path / "clock"
    monkeypatch.setenv(CLOCK_FILE_ENV, str(path))

    def set_to(iso: str) -> None:
        partial = path.with_suffix(".tmp")
        partial.write_text(str(datetime.fromisoformat(iso).timestamp()))
        partial.replace(path)  # atomic: the daemon never reads half a time

    return set_to


def add_loop(project: Path, name: str, triggers: list[dict]) -> Path:
    """loops/<name>.toml beside the project: the example loop, one iteration, with these triggers."""
    loops = project.parent / "loops"
    loops.mkdir(exist_ok=True)
    spec = write_spec(project, name=name, stop={"max_iterations": 1}, **({"trigger": triggers} if triggers else {}))
    return spec.rename(loops / f"{name}.toml").parent


def runs_of(loop: str) -> list:
    return Runtime().list_runs(loop)


def until(condition, timeout: float = 90, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def first_run(loop: str):
    return until(lambda: runs_of(loop), what=f"a run of {loop}")[0]


def finished(run_id: str):
    return until(lambda: (run := Runtime().get_run(run_id)).finished and run, what=f"run {run_id} to end")


def trigger_of(run_id: str) -> dict:
    first = Runtime().store.events(run_id, limit=1)[0]
    assert first["kind"] == "triggered"
    return first["data"]


def state_of(automation_id: str) -> dict:
    with Runtime().store.engine.connect() as db:
        state = db.execute(sa.select(automations_table.c.state).where(automations_table.c.id == automation_id)).scalar()
    return json.loads(state) if state else {}


def signed(body: bytes, secret: str = SECRET, at: float | None = None) -> dict:
    stamp = str(int(at if at is not None else time.time()))
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Loopwright-Timestamp": stamp, "X-Loopwright-Signature": f"sha256={digest}"}


def hook_url(daemon: DaemonProcess, loop: str, name: str = "webhook") -> str:
    return daemon.url.removesuffix("/mcp") + f"/hooks/{loop}/{name}"


# --- cron --------------------------------------------------------------------------------------


@pytest.mark.hook("loopwright_register_automations")
def test_a_cron_automation_fires_a_run_at_its_due_time(home, project, model, serve, clock):
    model(done)
    clock("2026-03-02T06:59:50+00:00")
    daemon = serve(add_loop(project, "nightly", [{"kind": "cron", "schedule": "0 7 * * *"}]))
    until(lambda: state_of("nightly/cron"), what="the schedule to be seen")
    time.sleep(1)  # a few ticks before the due time start nothing
    assert runs_of("nightly") == []

    clock("2026-03-02T07:00:02+00:00")
    run = first_run("nightly")
    assert trigger_of(run.id)["due"] == "2026-03-02T07:00:00+00:00"
    assert finished(run.id).status == "failed"
    assert len(runs_of("nightly")) == 1, daemon.output()


def test_a_daemon_killed_just_before_a_due_firing_fires_it_once_after_restart(home, project, model, serve, clock):
    model(done)
    loops = add_loop(project, "nightly", [{"kind": "cron", "schedule": "0 7 * * *"}])
    clock("2026-03-02T06:59:59+00:00")
    doomed = serve(loops)
    until(lambda: state_of("nightly/cron"), what="the schedule to be seen")
    doomed.process.kill()
    doomed.process.wait()

    clock("2026-03-02T07:00:30+00:00")  # the due time passed while no daemon ran
    restarted = serve(loops)
    run = first_run("nightly")
    assert trigger_of(run.id)["due"] == "2026-03-02T07:00:00+00:00"
    finished(run.id)
    time.sleep(1)  # more ticks of the restarted daemon fire nothing more
    assert [r.id for r in runs_of("nightly")] == [run.id], restarted.output()


# --- webhook -----------------------------------------------------------------------------------


def test_a_signed_webhook_starts_a_run_and_bad_stale_or_replayed_requests_are_refused(
        home, project, model, serve, monkeypatch):
    model(done)
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    daemon = serve(add_loop(project, "on-push", [{"kind": "webhook", "secret_env": "HOOK_SECRET"}]))
    url, body = hook_url(daemon, "on-push"), b'{"ref": "refs/heads/main"}'

    forged = httpx2.post(url, content=body, headers=signed(body, secret="not-the-secret"))
    assert forged.status_code == 401 and "signature" in forged.json()["error"]
    assert httpx2.post(url, content=body).status_code == 401
    stale = httpx2.post(url, content=body, headers=signed(body, at=time.time() - 600))
    assert stale.status_code == 401 and "window" in stale.json()["error"]
    assert runs_of("on-push") == []

    headers = signed(body)
    accepted = httpx2.post(url, content=body, headers=headers)
    assert accepted.status_code == 202, accepted.text
    run_id = accepted.json()["run_id"]
    replayed = httpx2.post(url, content=body, headers=headers)
    assert replayed.status_code == 409 and "replayed" in replayed.json()["error"]

    assert finished(run_id).status == "failed"
    assert [r.id for r in runs_of("on-push")] == [run_id]
    assert SECRET not in daemon.output()


@pytest.mark.hook("loopwright_run_finished")
def test_a_quota_error_pauses_the_automation_until_it_is_resumed(home, project, model, serve, monkeypatch):
    answers = [error(429, "rate_limit_error", "Your organization's quota is exhausted")] * 5  # a try and 4 retries
    model(lambda request: answers.pop(0) if answers else text("done"))
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    daemon = serve(add_loop(project, "on-push", [{"kind": "webhook", "secret_env": "HOOK_SECRET"}]))
    url = hook_url(daemon, "on-push")

    first = httpx2.post(url, content=b"1", headers=signed(b"1")).json()["run_id"]
    assert finished(first).status == "error"
    listed = until(lambda: [a for a in json.loads(loopwright("automations", "--json").stdout) if a["paused"]],
                   what="the automation to be paused")
    assert listed[0]["id"] == "on-push/webhook" and "quota" in listed[0]["paused_reason"]

    refused = httpx2.post(url, content=b"2", headers=signed(b"2"))
    assert refused.status_code == 423 and "loopwright automations resume on-push/webhook" in refused.json()["error"]
    assert loopwright("automations", "resume", "on-push/webhook").returncode == 0
    again = httpx2.post(url, content=b"3", headers=signed(b"3"))
    assert again.status_code == 202
    assert finished(again.json()["run_id"]).status == "failed"
    assert len(runs_of("on-push")) == 2


@pytest.fixture
def queue_only(home, git_repo, monkeypatch):
    """A Runtime that queues runs but executes none (no daemon), and the automations of a spec in
    git_repo: `runtime, automations = queue_only(triggers_toml)`."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")  # runs are only queued: no model is called
    runtime = Runtime()
    DBOS.migrate(runtime.settings.database_url)  # the durable queue's tables, which a daemon would have made

    def load(triggers: str):
        (git_repo / "loop.toml").write_text(
            f'name = "queued"\ngoal = "g"\n[[verify]]\nkind = "command"\nrun = "true"\n{triggers}')
        found, problems = load_automations(runtime.host, [git_repo / "loop.toml"])
        assert problems == []
        return runtime, found

    yield load
    runtime.shutdown()


def test_a_daily_budget_skips_firings_and_is_kept_across_restarts(queue_only):
    runtime, (runs_capped, dollars_capped) = queue_only(
        '[[trigger]]\nkind = "webhook"\nsecret_env = "S"\nmax_runs_per_day = 1\n'
        '[[trigger]]\nkind = "webhook"\nname = "dear"\nsecret_env = "S"\nmax_cost_usd_per_day = 0.5\n'
    )

    first = Automations(runtime).context(runs_capped).fire("one")
    assert first.status == "started"
    assert Automations(runtime).context(runs_capped).fire("one").repeated  # the same firing: no second run
    restarted = Automations(Runtime())  # a new process: the count comes from the store
    skipped = restarted.context(runs_capped).fire("two")
    assert skipped.status == "skipped" and "max_runs_per_day = 1" in skipped.reason

    dear = Automations(runtime).context(dollars_capped)
    spender = dear.fire("a")
    runtime.store.update_run(spender.run_id, spent_usd=0.6)
    assert dear.fire("b").status == "skipped"
    assert [r.id for r in runs_of("queued")] == [spender.run_id, first.run_id]


def test_a_firing_recorded_just_before_a_crash_starts_its_run_when_the_daemon_comes_back(queue_only, monkeypatch):
    runtime, (cron,) = queue_only('[[trigger]]\nkind = "cron"\nschedule = "0 7 * * *"\n')
    def die(*args, **kwargs):
        raise SystemExit("killed")

    with monkeypatch.context() as patched, pytest.raises(SystemExit):  # dies after recording the firing
        patched.setattr(runtime, "start_run", die)
        Automations(runtime).context(cron).fire("2026-03-02T07:00:00+00:00")
    assert runs_of("queued") == []

    back = Automations(runtime)
    back.loaded = {cron.id: cron}
    assert back.finish_interrupted() == ["queued/cron:2026-03-02T07:00:00+00:00"]
    (run,) = runs_of("queued")
    assert back.context(cron).fire("2026-03-02T07:00:00+00:00").repeated
    assert back.finish_interrupted() == [] and [r.id for r in runs_of("queued")] == [run.id]


# --- watch and after ---------------------------------------------------------------------------


def test_a_file_change_and_a_new_commit_each_start_a_run(home, project, model, serve):
    model(done)
    add_loop(project, "on-files", [{"kind": "watch", "path": "inbox", "interval": "0.2s"}])
    daemon = serve(add_loop(project, "on-commit", [{"kind": "watch", "branch": "main", "interval": "0.2s"}]))
    until(lambda: state_of("on-files/watch") and state_of("on-commit/watch"), what="both watches to look")
    assert runs_of("on-files") == runs_of("on-commit") == []

    (project / "inbox").mkdir()
    (project / "inbox" / "request.txt").write_text("please look at this\n")
    changed = first_run("on-files")
    assert trigger_of(changed.id)["path"] == "inbox"

    subprocess.run(["git", "-C", str(project), "-c", "user.name=T", "-c", "user.email=t@example.invalid",
                    "commit", "-q", "--allow-empty", "-m", "new work"], check=True)
    head = subprocess.run(["git", "-C", str(project), "rev-parse", "main"], capture_output=True, text=True).stdout.strip()
    committed = first_run("on-commit")
    assert trigger_of(committed.id)["commit"] == head

    for run in (changed, committed):
        finished(run.id)
    assert len(runs_of("on-files")) == len(runs_of("on-commit")) == 1, daemon.output()


def test_a_finished_run_starts_its_chained_loop(home, project, model, serve):
    model(done)
    add_loop(project, "build", [])
    loops = add_loop(project, "report", [{"kind": "after", "loop": "build", "outcome": ["failed", "stalled"]}])
    serve(loops)

    upstream = Runtime().start_run(load_spec(loops / "build.toml"))  # what start_loop does: queue it
    chained = first_run("report")
    assert trigger_of(chained.id)["after_run"] == upstream.id
    assert Runtime().get_run(upstream.id).status == "failed"
    finished(chained.id)
    time.sleep(1)  # the chained run's own end starts nothing more
    assert len(runs_of("report")) == 1 and len(runs_of("build")) == 1


def test_validate_names_each_broken_trigger_setting(home, tmp_path):
    spec = tmp_path / "loop.toml"
    spec.write_text(
        'name = "x"\ngoal = "g"\n[[verify]]\nkind = "command"\nrun = "true"\n'
        '[[trigger]]\nkind = "cron"\nschedule = "every morning"\n'
        '[[trigger]]\nkind = "webhook"\nsecret = "inline"\n'
        '[[trigger]]\nkind = "after"\nloop = "y"\noutcome = "won"\n'
        '[[trigger]]\nkind = "fortnightly"\n'
    )
    result = loopwright("validate", str(spec))
    assert result.returncode == 2
    assert "trigger[0] (cron): schedule: expected a 5-field cron expression" in result.stderr
    assert "trigger[1] (webhook): unknown setting(s) secret" in result.stderr
    assert "trigger[2] (after): outcome: expected one or a list of" in result.stderr
    assert "trigger[3] (fortnightly): unknown trigger kind 'fortnightly'" in result.stderr
