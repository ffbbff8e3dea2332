"""Runs as MCP resources, read and subscribed to over both real transports."""

import json
import warnings

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from conftest import write_spec
from model_server import text, tool_use
from test_mcp_http import GATE, FIX, serve, until  # noqa: F401  (serve is a fixture)
from test_mcp_stdio import call, server_params, until_finished


def run_uri(run_id: str) -> str:
    return f"loopwright://runs/{run_id}"


async def read_json(client: Client, uri: str) -> dict:
    result = await client.read_resource(uri)
    [content] = result.contents
    assert content.mime_type == "application/json"
    return json.loads(content.text)


async def waiting_for_approval(client: Client, project) -> tuple[str, str]:
    """Start a run that stops at a gated call; return its id and the approval's id."""
    run_id = (await call(client, "start_loop", spec=write_spec(project, **GATE).read_text()))["run_id"]
    run = await until(client, run_id, lambda run: run["status"] == "waiting_approval")
    return run_id, run["pending_approvals"][0]["approval_id"]


@pytest.mark.anyio
async def test_a_finished_run_and_its_trace_are_readable_as_resources_over_http(home, project, model, serve):
    model([FIX, text("fixed")])
    async with serve(project / "loops").client() as client:
        run_id = (await call(client, "start_loop", spec=write_spec(project).read_text()))["run_id"]
        run = await until_finished(client, run_id)

        assert await read_json(client, run_uri(run_id)) == run
        trace = await read_json(client, run_uri(run_id) + "/trace")
        assert (trace["run_id"], trace["complete"]) == (run_id, True)
        everything = await call(client, "get_run_trace", run_id=run_id, limit=500)
        assert trace["events"] == everything["events"]


@pytest.mark.anyio
async def test_reading_an_unknown_run_says_which_and_what_to_do(home, tmp_path, serve):
    async with serve(tmp_path).client() as client:
        with pytest.raises(MCPError, match="no run with id 'nope'.*list_runs"):
            await client.read_resource(run_uri("nope"))


@pytest.mark.anyio
async def test_a_listening_client_hears_when_a_run_changes_over_http(home, project, model, serve):
    model([tool_use("run_command", {"command": "echo deploy now"}), FIX, text("fixed")])
    async with serve(project / "loops").client() as client:
        run_id, approval = await waiting_for_approval(client, project)
        before = await read_json(client, run_uri(run_id))
        async with client.listen(resource_subscriptions=[run_uri(run_id)]) as subscription:
            await call(client, "decide_approval", approval_id=approval, allow=True)
            with anyio.fail_after(60):
                async for event in subscription:
                    assert event.uri == run_uri(run_id)
                    break
        after = await read_json(client, run_uri(run_id))
        assert before["pending_approvals"] and not after["pending_approvals"]


@pytest.mark.anyio
async def test_a_subscribed_client_of_an_earlier_protocol_hears_when_a_run_changes_over_http(home, project, model, serve):
    model([tool_use("run_command", {"command": "echo deploy now"}), FIX, text("fixed")])
    updated = anyio.Event()
    heard = []

    async def on_message(message) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            heard.append(message.params.uri)
            updated.set()

    async with serve(project / "loops").client(mode="legacy", message_handler=on_message) as client:
        assert client.server_capabilities.resources.subscribe is True
        run_id, approval = await waiting_for_approval(client, project)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # resources/subscribe is deprecated as of 2026-07-28
            await client.subscribe_resource(run_uri(run_id))
            with pytest.raises(MCPError, match="no run with id 'nope'"):
                await client.subscribe_resource(run_uri("nope"))
        await call(client, "decide_approval", approval_id=approval, allow=True)
        with anyio.fail_after(60):
            await updated.wait()
        assert heard[0] == run_uri(run_id)
        assert (await until_finished(client, run_id))["status"] == "succeeded"


@pytest.mark.anyio
async def test_resources_are_read_and_listened_to_over_stdio(home, project, model):
    model([tool_use("run_command", {"command": "echo deploy now"}), FIX, text("fixed")])
    async with Client(server_params(project / "loops")) as client:
        run_id, approval = await waiting_for_approval(client, project)
        assert (await read_json(client, run_uri(run_id)))["status"] == "waiting_approval"
        async with client.listen(resource_subscriptions=[run_uri(run_id) + "/trace"]) as subscription:
            await call(client, "decide_approval", approval_id=approval, allow=True)
            with anyio.fail_after(60):
                async for event in subscription:
                    assert event.uri == run_uri(run_id) + "/trace"
                    break
        run = await until_finished(client, run_id)
        trace = await read_json(client, run_uri(run_id) + "/trace")
        assert trace["events"][-1]["kind"] == "run_finished" and run["status"] == "succeeded"
