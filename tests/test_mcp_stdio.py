"""Loop control over MCP, through the mcp SDK's real client and the real stdio transport."""

import json
import os
import signal
import subprocess
import sys

import anyio
import pytest
from mcp import Client, StdioServerParameters

from conftest import FIX, LOOPWRIGHT, ROOT, wait_for, write_spec
from model_server import text, tool_use
from loopwright.runtime.store import Store



def server_params(loops_dir) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=["-m", "loopwright.cli", "mcp", "--loops", str(loops_dir)],
        env=dict(os.environ), cwd=str(ROOT),
    )


async def call(client: Client, tool: str, **arguments) -> dict:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def error_of(client: Client, tool: str, **arguments) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error
    return result.content[0].text


async def until_finished(client: Client, run_id: str, timeout: float = 120) -> dict:
    with anyio.fail_after(timeout):
        while True:
            run = await call(client, "get_run", run_id=run_id)
            if run["finished_at"] is not None:
                return run
            await anyio.sleep(0.3)


@pytest.mark.anyio
async def test_start_a_loop_follow_it_to_success_and_read_its_trace(home, project, model):
    model([text("looking"), FIX, text("fixed")])
    spec_text = write_spec(project).read_text()
    async with Client(server_params(project / "loops")) as client:
        started = await call(client, "start_loop", spec=spec_text)
        run = await until_finished(client, started["run_id"])
        assert (run["status"], run["iteration"]) == ("succeeded", 2)
        assert run["spent_usd"] > 0 and run["tokens"]["output"] > 0

        page = await call(client, "get_run_trace", run_id=started["run_id"], limit=3)
        assert len(page["events"]) == 3
        rest = await call(client, "get_run_trace", run_id=started["run_id"], after=page["next_cursor"], limit=500)
        kinds = [e["kind"] for e in page["events"] + rest["events"]]
        assert kinds.count("verdict") == 2 and kinds.count("model_call") == 3 and kinds[-1] == "run_finished"

        listed = await call(client, "list_runs", status="succeeded")
        assert [r["run_id"] for r in listed["runs"]] == [started["run_id"]]


@pytest.mark.anyio
async def test_stop_run_stops_a_running_loop(home, project, model):
    model(lambda request: tool_use("run_command", {"command": "sleep 0.3"}))
    spec_text = write_spec(project, agent={"max_tool_calls": 1000}).read_text()
    async with Client(server_params(project / "loops")) as client:
        started = await call(client, "start_loop", spec=spec_text)
        with anyio.fail_after(60):
            while (await call(client, "get_run", run_id=started["run_id"]))["tool_calls"] < 2:
                await anyio.sleep(0.2)
        stopped = await call(client, "stop_run", run_id=started["run_id"])
        assert stopped["stop_requested"] is True
        run = await until_finished(client, started["run_id"])
        assert (run["status"], run["reason"]) == ("stopped", "stopped by a person")
        again = await error_of(client, "stop_run", run_id=started["run_id"])
        assert "already finished (stopped)" in again


@pytest.mark.anyio
async def test_a_named_loop_from_the_loops_folder_starts(home, project, model):
    model([FIX, text("fixed")])
    loops = project / "loops"
    loops.mkdir()
    write_spec(project).rename(loops / "fix.toml")
    async with Client(server_params(loops)) as client:
        listed = await call(client, "list_loops")
        assert [loop["name"] for loop in listed["loops"]] == ["fix-failing-test"]
        started = await call(client, "start_loop", loop="fix")
        run = await until_finished(client, started["run_id"])
        assert run["status"] == "succeeded"


@pytest.mark.anyio
async def test_bad_requests_are_tool_errors_that_say_what_to_do(home, project, tmp_path):
    async with Client(server_params(tmp_path)) as client:
        assert "no run with id 'nope'" in await error_of(client, "get_run", run_id="nope")
        assert "list_runs" in await error_of(client, "get_run", run_id="nope")
        assert "give exactly one of" in await error_of(client, "start_loop")
        assert "no loop named 'ghost'" in await error_of(client, "start_loop", loop="ghost")
        invalid = await error_of(client, "start_loop", spec='name = "x"\ngoal = "g"\n[stop]\nmax_iterations = 0')
        assert "stop.max_iterations" in invalid and "verify" in invalid
        assert "not valid TOML" in await error_of(client, "start_loop", spec="name = ")
        assert await call(client, "list_runs") == {"runs": []}  # nothing was created by the bad requests


@pytest.mark.anyio
async def test_wait_for_run_reports_progress_each_iteration_and_returns_the_finished_run(home, project, model):
    model([text("looking"), FIX, text("fixed")])
    progress = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total))

    async with Client(server_params(project / "loops")) as client:
        started = await call(client, "start_loop", spec=write_spec(project).read_text())
        result = await client.call_tool("wait_for_run", {"run_id": started["run_id"], "timeout_s": 120},
                                        progress_callback=on_progress)
        assert not result.is_error, result.content[0].text
        run = result.structured_content
    assert (run["status"], run["iteration"]) == ("succeeded", 2)
    assert progress[-1] == (2, run["max_iterations"])
    assert [done for done, _ in progress] == sorted({done for done, _ in progress})


@pytest.mark.anyio
async def test_a_run_outlives_the_client_that_started_it(home, project, model):
    model([tool_use("run_command", {"command": "sleep 2"}), FIX, text("fixed")])
    async with Client(server_params(project / "loops")) as client:
        started = await call(client, "start_loop", spec=write_spec(project).read_text())
        assert "worker process" in started["executed_by"]
    # The client is gone, and the server with it; a detached worker executes the run.
    store = Store(f"sqlite:///{home / 'loopwright.sqlite'}")
    run = wait_for(lambda: (run := store.get_run(started["run_id"])).finished and run, "the run finishes", timeout=180)
    assert (run.status, run.iteration) == ("succeeded", 1)
    wait_for(lambda: not (home / "worker.json").exists(), "the worker exits once no run is left", timeout=60)


def test_sigterm_ends_the_server_while_its_client_keeps_stdin_open(home, tmp_path):
    # A client may end its server with SIGTERM without closing the server's stdin first; the SDK's stdin
    # reader then never wakes, and the server must not wait for it.
    server = subprocess.Popen([*LOOPWRIGHT, "mcp", "--loops", str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        server.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}}) + "\n")
        server.stdin.flush()
        assert json.loads(server.stdout.readline())["result"]["serverInfo"]["name"] == "loopwright"
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 143, server.stderr.read()
    finally:
        server.kill()
        server.wait()
