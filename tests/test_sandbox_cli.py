"""The sandbox as a user of the CLI and MCP meets it: signals, warm sandboxes, gc and prune."""

import json
import signal
import subprocess
import time

import anyio
import pytest
from mcp import Client

from conftest import FIX, LOOPWRIGHT, loopwright, wait_for, write_spec
from model_server import text, tool_use
from loopwright.runtime.store import Store
from loopwright.sandbox import list_sandboxes
from loopwright.runtime.worktree import create_worktree
from test_mcp_stdio import call, server_params, until_finished


def sandboxes_owned_by(pid: int) -> list[dict]:
    return [s for s in list_sandboxes() if s["owner_pid"] == pid]


def test_sigterm_to_loopwright_run_removes_its_sandboxes(home, project, model):
    server = model([tool_use("run_command", {"command": "sleep 60"}), text("done")])
    process = subprocess.Popen([*LOOPWRIGHT, "run", str(write_spec(project))], stdout=subprocess.PIPE, text=True)
    try:
        run_id = process.stdout.readline().split()[1]
        wait_for(lambda: len(server.requests) == 1 and any(s["run_id"] == run_id for s in list_sandboxes()),
                 "the run's tool call is under way")
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 143
        assert sandboxes_owned_by(process.pid) == []  # the run's sandbox, and any warm one
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def test_sigterm_to_a_worker_removes_the_sandboxes_of_the_run_it_took_over(home, project, model):
    model([tool_use("run_command", {"command": "sleep 60"}), text("done")])
    run = subprocess.Popen([*LOOPWRIGHT, "run", str(write_spec(project))], stdout=subprocess.PIPE, text=True)
    run_id = run.stdout.readline().split()[1]
    wait_for(lambda: any(s["run_id"] == run_id for s in list_sandboxes()), "the run's tool call is under way")
    run.kill()  # its process dies mid-call: a worker takes the run over
    run.wait()
    run.stdout.close()
    worker = subprocess.Popen([*LOOPWRIGHT, "worker"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sandboxes_owned_by(worker.pid), "the worker runs the run's tool call again")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 143
        assert sandboxes_owned_by(worker.pid) == []
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


@pytest.mark.anyio
async def test_a_process_serving_loops_gives_its_next_run_a_warm_sandbox(home, project, model):
    # The first run takes a few seconds (its tool call sleeps): time for the pool to warm the next sandbox.
    model([tool_use("run_command", {"command": "sleep 5"}), text("looked"), text("done")])
    loops = project / "loops"
    loops.mkdir()
    write_spec(project, stop={"max_iterations": 1}).rename(loops / "fix.toml")
    async with Client(server_params(loops)) as client:
        first = await call(client, "start_loop", loop="fix")
        await until_finished(client, first["run_id"])
        second = (await call(client, "start_loop", loop="fix"))["run_id"]
        with anyio.fail_after(60):
            while not (boxes := [s for s in list_sandboxes() if s["run_id"] == second]):
                await anyio.sleep(0.1)
        assert boxes[0]["pooled"]  # started before the run, while the first one ran
        assert (await until_finished(client, second))["status"] == "failed"  # its one iteration did not fix it


def test_a_foreground_run_warms_sandboxes_for_its_checks_but_none_for_a_next_run(home, project, model):
    server = model([tool_use("run_command", {"command": "sleep 3"}), FIX, text("Fixed the off-by-one.")])
    process = subprocess.Popen([*LOOPWRIGHT, "run", str(write_spec(project, stop={"max_iterations": 1}))],
                               stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: server.requests, "the maker's first model call")
        wait_for(lambda: list((home / "checks" / ".pool").glob("pool-*")), "a sandbox warms up for the check")
        assert list((home / "worktrees" / ".pool").glob("pool-*")) == []  # no next run in this process
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def test_sandbox_prune_removes_worktrees_of_old_finished_runs(home, git_repo):
    home.mkdir(parents=True)
    store = Store(f"sqlite:///{home / 'loopwright.sqlite'}")
    root = home / "worktrees"
    for run_id, days_ago in (("old-run", 30), ("new-run", 1)):
        wt = create_worktree(git_repo, root, "demo", run_id)
        store.create_run(run_id, "demo", {}, str(git_repo), wt.branch)
        store.update_run(run_id, worktree=str(wt.path), finished_at=time.time() - days_ago * 86400)
    result = loopwright("sandbox", "prune", "--keep-days", "7", "--keep-last", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"removed {root.resolve() / 'old-run'}", "1 worktree(s) removed; branches stay"]
    assert not (root / "old-run").exists() and (root / "new-run").exists()


def test_sandbox_gc_names_and_removes_a_dead_processs_sandbox(home, project, model):
    model([tool_use("run_command", {"command": "sleep 60"}), text("done")])
    process = subprocess.Popen([*LOOPWRIGHT, "run", str(write_spec(project))], stdout=subprocess.PIPE, text=True)
    run_id = process.stdout.readline().split()[1]
    left = wait_for(lambda: [s for s in list_sandboxes() if s["run_id"] == run_id], "the run has its sandbox")[0]
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    result = loopwright("sandbox", "gc")
    assert result.returncode == 0, result.stderr
    assert f"{left['name']}  run {run_id}  owner pid {process.pid}  alive False" in result.stdout
    assert left["name"] in result.stdout.splitlines()[-1]  # "removed N leftover sandbox(es): ..."
    assert sandboxes_owned_by(process.pid) == []


def test_the_sandbox_network_is_shown_by_status_and_in_the_trace(home, project, model):
    model([text("nothing to do")])
    result = loopwright("run", str(write_spec(project, stop={"max_iterations": 1})))
    run_id = result.stdout.split()[1]
    assert "network: none" in loopwright("status", run_id).stdout
    started = [e for e in map(json.loads, loopwright("trace", run_id, "--json").stdout.splitlines())
               if e["kind"] == "run_started"]
    assert started[0]["data"]["network"] == "none"
