"""Loop control over MCP's streamable HTTP, served by a real `loopwright serve` on a loopback port,
through the mcp SDK's client: every tool, progress, errors, and one store shared with stdio."""

from pathlib import Path

import anyio
import pytest
from mcp import Client

from conftest import write_spec
from daemon_process import DaemonProcess
from model_server import text, tool_use
from loopwright.runtime.store import Store
from test_mcp_stdio import call, error_of, server_params, until_finished

FIX = tool_use("edit_file", {"path": "calc.py", "old_text": "(len(numbers) + 1)", "new_text": "len(numbers)"})
GATE = {"approval": [{"tool": "run_command", "when": {"command": "echo deploy*"}, "timeout": "10m"}]}
TOOLS = {"list_loops", "start_loop", "get_run", "list_runs", "wait_for_run", "get_run_trace",
         "stop_run", "pause_run", "resume_run", "list_approvals", "decide_approval", "improve_loop", "get_ledger"}


@pytest.fixture
def serve(home):
    """Start `loopwright serve` for this test's LOOPWRIGHT_HOME (start the model first: the daemon
    inherits ANTHROPIC_BASE_URL)."""
    daemons = []

    def start(loops_dir, *args: str) -> DaemonProcess:
        daemon = DaemonProcess(home, loops_dir, *args)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        assert daemon.stop() == 0, daemon.output()


def named_loop(project: Path) -> Path:
    loops = project / "loops"
    loops.mkdir(exist_ok=True)
    write_spec(project).rename(loops / "fix.toml")
    return loops


async def until(client: Client, run_id: str, condition, timeout: float = 60) -> dict:
    with anyio.fail_after(timeout):
        while not condition(run := await call(client, "get_run", run_id=run_id)):
            await anyio.sleep(0.2)
    return run


@pytest.mark.anyio
async def test_every_tool_and_both_run_resources_are_offered_over_http(home, tmp_path, serve):
    async with serve(tmp_path).client() as client:
        assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        assert templates == {"loopwright://runs/{run_id}", "loopwright://runs/{run_id}/trace"}


@pytest.mark.anyio
async def test_a_named_loop_started_over_http_reports_progress_while_waited_for(home, project, model, serve):
    model([text("looking"), FIX, text("fixed")])
    async with serve(named_loop(project)).client() as client:
        listed = await call(client, "list_loops")
        assert [loop["name"] for loop in listed["loops"]] == ["fix-failing-test"]
        started = await call(client, "start_loop", loop="fix", max_iterations=4)
        assert started["status"] == "queued"

        progress = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append((done, total, message))

        result = await client.call_tool("wait_for_run", {"run_id": started["run_id"], "timeout_s": 120},
                                        progress_callback=on_progress)
        run = result.structured_content
        assert (run["status"], run["iteration"], run["max_iterations"]) == ("succeeded", 2, 4)
        assert progress[-1][:2] == (2, 4) and progress[-1][2].startswith("iteration 2: ")
        assert [p[0] for p in progress] == sorted({p[0] for p in progress})  # the spec: progress only grows

        page = await call(client, "get_run_trace", run_id=started["run_id"], limit=2)
        rest = await call(client, "get_run_trace", run_id=started["run_id"], after=page["next_cursor"], limit=500)
        kinds = [e["kind"] for e in page["events"] + rest["events"]]
        assert kinds.count("verdict") == 2 and kinds[-1] == "run_finished"
        newest = await call(client, "get_run_trace", run_id=started["run_id"], newest=True, limit=1)
        assert [e["kind"] for e in newest["events"]] == ["run_finished"]

        assert [r["run_id"] for r in (await call(client, "list_runs", loop="fix-failing-test"))["runs"]] == [started["run_id"]]
        assert (await call(client, "list_runs", status="running"))["runs"] == []


@pytest.mark.anyio
async def test_a_run_is_paused_resumed_and_stopped_over_http(home, project, model, serve):
    model(lambda request: tool_use("run_command", {"command": "sleep 0.2"}))
    spec = write_spec(project, agent={"max_tool_calls": 1000}).read_text()
    async with serve(project / "loops").client() as client:
        run_id = (await call(client, "start_loop", spec=spec))["run_id"]
        await until(client, run_id, lambda run: run["tool_calls"] >= 1)

        assert (await call(client, "pause_run", run_id=run_id))["pause_requested"] is True
        paused = await until(client, run_id, lambda run: run["status"] == "paused")
        await anyio.sleep(1)
        assert (await call(client, "get_run", run_id=run_id))["tool_calls"] == paused["tool_calls"]

        assert (await call(client, "resume_run", run_id=run_id))["pause_requested"] is False
        await until(client, run_id, lambda run: run["tool_calls"] > paused["tool_calls"])

        assert (await call(client, "stop_run", run_id=run_id))["stop_requested"] is True
        run = await until_finished(client, run_id)
        assert (run["status"], run["reason"]) == ("stopped", "stopped by a person")
        assert "already finished (stopped)" in await error_of(client, "stop_run", run_id=run_id)


@pytest.mark.anyio
async def test_a_gated_call_is_approved_over_http_and_a_second_decision_is_refused(home, project, model, serve):
    server = model([tool_use("run_command", {"command": "echo deploy now"}), FIX, text("fixed")])
    async with serve(project / "loops").client() as client:
        run_id = (await call(client, "start_loop", spec=write_spec(project, **GATE).read_text()))["run_id"]
        await until(client, run_id, lambda run: run["status"] == "waiting_approval")
        [approval] = (await call(client, "list_approvals", run_id=run_id))["approvals"]
        assert (approval["tool"], approval["input"]) == ("run_command", {"command": "echo deploy now"})

        decided = await call(client, "decide_approval", approval_id=approval["approval_id"], allow=True, note="go")
        assert decided == {"approval_id": approval["approval_id"], "status": "allowed", "note": "go"}
        again = await error_of(client, "decide_approval", approval_id=approval["approval_id"], allow=False)
        assert "already decided (allowed); nothing changed" in again

        assert (await until_finished(client, run_id))["status"] == "succeeded"
        assert (await call(client, "list_approvals"))["approvals"] == []
    assert server.requests[1]["messages"][-1]["content"][0]["content"].startswith("exit code 0\ndeploy now")


@pytest.mark.anyio
async def test_bad_requests_over_http_are_tool_errors_that_say_what_to_do(home, project, serve):
    async with serve(project / "loops").client() as client:
        for tool in ("get_run", "wait_for_run", "get_run_trace", "stop_run", "pause_run", "resume_run", "list_approvals"):
            message = await error_of(client, tool, run_id="nope")
            assert "no run with id 'nope'" in message and "list_runs" in message, (tool, message)
        unknown = await error_of(client, "decide_approval", approval_id="nope", allow=True)
        assert "no approval with id 'nope'" in unknown and "list_approvals" in unknown
        assert "no loop named 'ghost'" in await error_of(client, "start_loop", loop="ghost")
        assert "give exactly one of" in await error_of(client, "start_loop", loop="x", spec="y")
        invalid = await error_of(client, "start_loop", spec='name = "x"\ngoal = "g"\n[stop]\nmax_iterations = 0')
        assert "stop.max_iterations" in invalid
        budget = await error_of(client, "start_loop", spec=write_spec(project).read_text(), max_cost_usd=-1)
        assert "budgets given to start_loop" in budget and "stop.max_cost_usd" in budget
        relative = write_spec(project).read_text().replace(f'"{project}"', '"."')
        assert "absolute workspace.repo" in await error_of(client, "start_loop", spec=relative)
        assert await call(client, "list_runs") == {"runs": []}  # nothing was created by the bad requests


@pytest.mark.anyio
async def test_a_run_started_over_stdio_is_run_by_the_daemon_and_outlives_the_session(home, project, model, serve):
    model([FIX, text("fixed"), FIX, text("fixed")])
    spec = write_spec(project).read_text()
    daemon = serve(project / "loops")
    async with Client(server_params(project / "loops")) as stdio:
        run_id = (await call(stdio, "start_loop", spec=spec))["run_id"]
    # the stdio session and its process are gone; the daemon runs the loop to its end
    async with daemon.client() as http:
        assert (await until_finished(http, run_id))["status"] == "succeeded"
        other = (await call(http, "start_loop", spec=spec))["run_id"]
    assert Store(f"sqlite:///{home / 'loopwright.sqlite'}").get_run(run_id).owner == daemon.info["owner"]

    async with Client(server_params(project / "loops")) as stdio:  # and what HTTP started, stdio sees
        listed = await call(stdio, "list_runs")
        assert {r["run_id"] for r in listed["runs"]} == {run_id, other}
        await until_finished(stdio, other)


@pytest.mark.anyio
async def test_a_stopped_daemon_leaves_its_run_in_flight_to_the_next_one(home, project, model, serve):
    from loopwright.sandbox import list_sandboxes

    model(lambda request: tool_use("run_command", {"command": "sleep 0.2"}))
    spec = write_spec(project, agent={"max_tool_calls": 1000}).read_text()
    first = serve(project / "loops")
    async with first.client() as client:
        run_id = (await call(client, "start_loop", spec=spec))["run_id"]
        await until(client, run_id, lambda run: run["tool_calls"] >= 1)
    assert first.stop() == 0, first.output()
    assert not (home / "daemon.json").exists()
    assert [box for box in list_sandboxes() if box["run_id"] == run_id] == []  # its sandbox went with it

    second = serve(project / "loops")
    async with second.client() as client:
        left = (await call(client, "get_run", run_id=run_id))["tool_calls"]
        await until(client, run_id, lambda run: run["tool_calls"] > left)  # the next daemon took it over
        await call(client, "stop_run", run_id=run_id)
        assert (await until_finished(client, run_id))["status"] == "stopped"
