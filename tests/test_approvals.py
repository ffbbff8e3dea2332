"""Approval gates and pausing: a run waits durably for a person, across a restart."""

import signal
import subprocess

import anyio
import pytest
from mcp import Client

from conftest import FIX, LOOPWRIGHT, wait_for, write_spec
from model_server import text, tool_use
from loopwright.runtime.store import Store
from test_mcp_stdio import call, error_of, server_params, until_finished

GATE = {"approval": [{"tool": "run_command", "when": {"command": "echo deploy*"}, "timeout": "10m"}]}


def tool_result_text(request: dict) -> str:
    return request["messages"][-1]["content"][0]["content"]


def test_a_pending_approval_is_never_seen_on_a_run_that_says_running(database):
    store = Store(database)
    store.create_run("r", "demo", {"name": "demo"}, "/repo", "loopwright/demo/r")
    store.update_run("r", status="running")
    store.add_approval("r.1.tool.1", "r", 1, "run_command", {"command": "echo deploy now"}, "echo deploy*", 60)
    assert store.get_run("r").status == "waiting_approval"  # written in the approval's own transaction


@pytest.mark.anyio
async def test_a_gated_call_waits_through_a_restart_and_runs_once_approved(database, project, model):
    server = model([tool_use("run_command", {"command": "echo deploy now"}), FIX, text("fixed")])
    process = subprocess.Popen([*LOOPWRIGHT, "run", str(write_spec(project, **GATE))], stdout=subprocess.PIPE, text=True)
    run_id = process.stdout.readline().split()[1]
    store = Store(database)
    wait_for(lambda: store.list_approvals(run_id))
    assert store.get_run(run_id).status == "waiting_approval"
    process.send_signal(signal.SIGKILL)  # the process dies while the run waits
    process.wait()

    async with Client(server_params(project / "loops")) as client:  # a new process takes the run over
        run = await call(client, "get_run", run_id=run_id)
        assert run["status"] == "waiting_approval"
        [pending] = run["pending_approvals"]
        assert pending["input"] == {"command": "echo deploy now"}
        listed = await call(client, "list_approvals")
        assert [a["approval_id"] for a in listed["approvals"]] == [pending["approval_id"]]

        decided = await call(client, "decide_approval", approval_id=pending["approval_id"], allow=True)
        assert decided["status"] == "allowed"
        again = await error_of(client, "decide_approval", approval_id=pending["approval_id"], allow=False)
        assert "already decided (allowed)" in again

        run = await until_finished(client, run_id)
        assert run["status"] == "succeeded"
    assert tool_result_text(server.requests[1]).startswith("exit code 0\ndeploy now")


@pytest.mark.anyio
async def test_a_denied_call_is_reported_to_the_maker_with_the_note_and_the_run_goes_on(home, project, model):
    server = model([tool_use("run_command", {"command": "echo deploy now"}), FIX, text("fixed")])
    async with Client(server_params(project / "loops")) as client:
        started = await call(client, "start_loop", spec=write_spec(project, **GATE).read_text())
        with anyio.fail_after(60):
            while not (listed := await call(client, "list_approvals", run_id=started["run_id"]))["approvals"]:
                await anyio.sleep(0.2)
        approval = listed["approvals"][0]["approval_id"]
        await call(client, "decide_approval", approval_id=approval, allow=False, note="use the staging script")
        run = await until_finished(client, started["run_id"])
        assert run["status"] == "succeeded"
    denial = tool_result_text(server.requests[1])
    assert "denied" in denial and "use the staging script" in denial


@pytest.mark.anyio
async def test_an_unanswered_approval_times_out_as_a_denial(home, project, model):
    server = model([tool_use("run_command", {"command": "echo deploy now"}), FIX, text("fixed")])
    gate = {"approval": [{"tool": "run_command", "when": {"command": "echo deploy*"}, "timeout": "1s"}]}
    async with Client(server_params(project / "loops")) as client:
        started = await call(client, "start_loop", spec=write_spec(project, **gate).read_text())
        run = await until_finished(client, started["run_id"])
        assert run["status"] == "succeeded"
    assert "no person approved this call within 1s" in tool_result_text(server.requests[1])


@pytest.mark.anyio
async def test_a_paused_run_waits_and_continues_when_resumed(home, project, model):
    model(lambda request: FIX if len(request["messages"]) == 1 else text("fixed"))
    spec = write_spec(project, agent={"max_tool_calls": 5}).read_text()
    async with Client(server_params(project / "loops")) as client:
        started = await call(client, "start_loop", spec=spec)
        run_id = started["run_id"]
        await call(client, "pause_run", run_id=run_id)
        with anyio.fail_after(60):
            while (await call(client, "get_run", run_id=run_id))["status"] != "paused":
                await anyio.sleep(0.2)
        await anyio.sleep(1)
        assert (await call(client, "get_run", run_id=run_id))["status"] == "paused"
        assert "already paused" in await error_of(client, "pause_run", run_id=run_id)

        await call(client, "resume_run", run_id=run_id)
        run = await until_finished(client, run_id)
        assert run["status"] == "succeeded"
        assert "already finished (succeeded)" in await error_of(client, "resume_run", run_id=run_id)
