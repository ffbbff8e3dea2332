"""Several daemons on one database share the run queue: when one dies, another takes over its runs, and
each run is executed to its end once (real `loopwright serve` processes, real sandboxes, the SDK)."""

import os
import signal
import subprocess
import time

import anyio
import pytest
import sqlalchemy as sa

from conftest import FIX, LOOPWRIGHT, wait_for, write_spec
from daemon_process import DaemonProcess
from model_server import text, tool_use
from loopwright.runtime.daemon import TAKEOVER_INTERVAL_S
from loopwright.runtime.store import Store, executors
from loopwright.sandbox import reap_orphans
from test_automations import add_loop, clock  # noqa: F401 - clock is a fixture
from test_mcp_stdio import call

RUNS = 6


def slow_fix(request: dict) -> dict:
    """A few seconds of work, then the fix: a run lasts long enough to be cut by a kill."""
    done = sum(1 for m in request["messages"] if m["role"] == "assistant" for b in m["content"] if b["type"] == "tool_use")
    return [tool_use("run_command", {"command": "sleep 3"}), FIX][done] if done < 2 else text("fixed")


@pytest.mark.anyio
async def test_a_killed_daemons_runs_are_finished_by_the_other_once(tmp_path, database, project, model, monkeypatch,
                                                                     clock):  # noqa: F811
    model(slow_fix)
    monkeypatch.setenv("LOOPWRIGHT_DATABASE_URL", database)  # both daemons, each with a home of its own
    monkeypatch.setenv("LOOPWRIGHT_LOAD_PLUGINS", "")
    clock("2026-03-02T06:59:40+00:00")
    loops = add_loop(project, "nightly", [{"kind": "cron", "schedule": "0 7 * * *"}])
    first, second = (DaemonProcess(tmp_path / f"home-{n}", loops, env=dict(os.environ)) for n in (1, 2))
    store = Store(database)
    try:
        async with first.client() as client:
            spec = write_spec(project, stop={"max_iterations": 2}).read_text()
            ids = [(await call(client, "start_loop", spec=spec))["run_id"] for _ in range(RUNS)]
        with anyio.fail_after(60):  # until the first daemon is in the middle of a run
            while not any(r.owner == first.info["owner"] and r.iteration >= 1 for r in map(store.get_run, ids)):
                await anyio.sleep(0.2)
        orphans = [r.id for r in map(store.get_run, ids) if r.owner == first.info["owner"] and not r.finished]
        clock("2026-03-02T07:00:05+00:00")  # a cron firing falls due while one daemon dies
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        killed = time.monotonic()

        with anyio.fail_after(90):
            while not all(store.get_run(run_id).finished for run_id in ids):
                await anyio.sleep(0.5)
        assert time.monotonic() - killed < 60  # the survivor finished every run within a minute of the kill
        for run_id in ids:
            run = store.get_run(run_id)
            assert (run.status, run.iteration) == ("succeeded", 1), (run_id, run.status, run.reason)
            subjects = subprocess.run(["git", "-C", str(project), "log", "--format=%s", f"main..{run.branch}"],
                                      capture_output=True, text=True, check=True).stdout.splitlines()
            assert len(subjects) == 2 and subjects[1].startswith("iteration 1: pass"), subjects  # executed to its end once
        assert orphans and all(store.get_run(run_id).owner == second.info["owner"] for run_id in orphans)

        with anyio.fail_after(60):  # the due firing: one run, whichever daemon saw it first
            while not store.list_runs("nightly"):
                await anyio.sleep(0.5)
        await anyio.sleep(3)  # more ticks of the survivor fire nothing more
        assert len(store.list_runs("nightly")) == 1
    finally:
        for daemon in (first, second):
            if daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGTERM)
                daemon.process.wait(timeout=60)
        reap_orphans(first.home)  # what the killed daemon's machine does when it starts again


def test_a_run_of_a_silent_process_on_another_machine_is_taken_over(tmp_path, home, database, project, model):
    model(slow_fix)
    process = subprocess.Popen([*LOOPWRIGHT, "run", str(write_spec(project))], stdout=subprocess.PIPE, text=True)
    run_id = process.stdout.readline().split()[1]
    store = Store(database)
    wait_for(lambda: any(e["kind"] == "tool_call" for e in store.events(run_id)), "the run is under way")
    process.send_signal(signal.SIGKILL)
    process.wait()
    elsewhere = "build-host-2:4242:1"  # as if the run's process had been on another machine
    store.update_run(run_id, owner=elsewhere)
    store.beat(elsewhere)

    daemon = DaemonProcess(home, tmp_path / "loops")
    try:
        time.sleep(TAKEOVER_INTERVAL_S + 2)  # a takeover round: that machine's process beat just now
        assert store.get_run(run_id).owner == elsewhere and not store.get_run(run_id).finished
        with store.engine.begin() as db:  # ... and then it fell silent
            db.execute(sa.update(executors).where(executors.c.owner == elsewhere).values(beat_at=time.time() - 120))
        run = wait_for(lambda: (run := store.get_run(run_id)).finished and run, "the run is taken over", timeout=60)
        assert (run.status, run.owner) == ("succeeded", daemon.info["owner"])
    finally:
        assert daemon.stop() == 0, daemon.output()
