"""Built-in connector: the tools of external MCP servers a loop declares in `[[mcp_servers]]`.

A server with a `command` runs inside the run's sandbox, so it has the sandbox's limits (no network,
only /workspace); the host talks to it over the stdin and stdout of `docker exec -i`. A server with
a `url` is reached from the host over streamable HTTP, and only if `http.allow_hosts` allows its
host. Each server's tools reach the maker as `mcp__<server>__<tool>`. The sessions open when the
run's sandbox is ready and close when the run ends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from loopwright.plugins.http_tool import refusal
from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.types import RunInfo, Sandbox, Tool, ToolContext, ToolResult

if TYPE_CHECKING:
    from mcp import Client

    from loopwright.runtime.spec import McpServerSpec

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 60.0  # for the handshake and the tool listing; tool calls get the sandbox's tool timeout
TOOL_NAME_LIMIT = 64  # the Messages API's limit for a tool name
WORKDIR = "/workspace"
STDERR_TAIL = 2000
_NOT_IN_A_NAME = re.compile(r"[^A-Za-z0-9_-]")
# What the `docker` command needs from the host's environment to find its daemon.
DOCKER_ENV = ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_CONFIG", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY")


class McpServerError(RuntimeError):
    """An MCP server of the spec cannot be used; the message names it and says what to do."""


def docker_exec_argv(server: McpServerSpec, sandbox: Sandbox) -> list[str]:
    """`docker exec -i` into the run's container, as the sandbox user, in /workspace."""
    container = getattr(sandbox, "container_id", None)
    if not container:
        raise McpServerError(
            f"MCP server {server.name!r} has a 'command', which runs inside the sandbox through `docker exec`, "
            f"but this run's sandbox ({type(sandbox).__name__}) has no container_id; "
            "use the docker sandbox, or give the server a 'url' instead"
        )
    user = getattr(sandbox, "user", None)
    env = [arg for key, value in server.env.items() for arg in ("-e", f"{key}={value}")]
    return ["docker", "exec", "-i", *(["-u", user] if user else []), "-w", WORKDIR, *env, container, *(server.command or [])]


def tool_name(server: str, tool: str) -> str:
    return f"mcp__{server}__{_NOT_IN_A_NAME.sub('_', tool)}"[:TOOL_NAME_LIMIT]


def result_text(result: Any) -> str:
    """What the maker reads of a CallToolResult: its text, and a note for content it cannot read."""
    parts = []
    for block in result.content:
        if block.type == "text":
            parts.append(block.text)
        elif block.type == "resource" and getattr(block.resource, "text", None) is not None:
            parts.append(block.resource.text)
        elif block.type == "resource_link":
            parts.append(f"[resource link: {block.uri}]")
        else:
            mime = getattr(block, "mime_type", None) or getattr(getattr(block, "resource", None), "mime_type", "")
            parts.append(f"[{block.type} content{f' ({mime})' if mime else ''} not shown]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content))
    return "\n".join(parts) or "(the tool returned no content)"


def _mcp_tool(server: str, client: Client, listed: Any) -> Tool:
    async def call(ctx: ToolContext, arguments: dict[str, Any]) -> ToolResult:
        from mcp import MCPError

        try:
            result = await client.call_tool(listed.name, arguments, read_timeout_seconds=ctx.timeout)
        except MCPError as error:
            return ToolResult(f"MCP server {server!r} refused the call of {listed.name!r}: {error}", is_error=True)
        return ToolResult(result_text(result), is_error=bool(result.is_error), details={"mcp_server": server})

    schema = listed.input_schema if isinstance(listed.input_schema, dict) else {}
    description = listed.description or listed.title or f"The tool {listed.name!r}"
    return Tool(tool_name(server, listed.name), f"[MCP server {server}] {description}",
                {"type": "object", **schema}, call)


def _innermost(error: BaseException) -> BaseException:
    """The one error inside task-group wrappers, which say nothing themselves."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _stderr_tail(errlog: Any) -> str:
    if errlog is None:
        return ""
    errlog.seek(0)
    tail = errlog.read()[-STDERR_TAIL:].strip()
    return f"; its stderr ends with: {tail}" if tail else ""


async def connect(server: McpServerSpec, run: RunInfo, sandbox: Sandbox, stack: AsyncExitStack) -> list[Tool]:
    """Open a session to `server` (closed with `stack`) and return its tools."""
    from mcp import Client, StdioServerParameters  # here, not at start-up: the SDK takes a while to import
    from mcp.client.stdio import stdio_client
    from mcp.client.streamable_http import streamable_http_client

    errlog = None
    if server.url is not None:
        if why := refusal(server.url, run.spec.http.allow_hosts):
            raise McpServerError(f"MCP server {server.name!r} at {server.url} is refused: {why}")
        transport, where = streamable_http_client(server.url), server.url
    else:
        argv = docker_exec_argv(server, sandbox)
        errlog = stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace"))
        env = {key: os.environ[key] for key in DOCKER_ENV if key in os.environ}
        transport = stdio_client(StdioServerParameters(command=argv[0], args=argv[1:], env=env), errlog=errlog)
        where = "`" + " ".join(server.command or []) + "` in the sandbox"
    client = Client(transport, read_timeout_seconds=CONNECT_TIMEOUT_S)
    try:
        await stack.enter_async_context(client)
        listed = []
        cursor = None
        while True:
            page = await client.list_tools(cursor=cursor)
            listed += page.tools
            if not (cursor := page.next_cursor):
                break
    except Exception as error:
        cause = _innermost(error)
        raise McpServerError(
            f"MCP server {server.name!r} ({where}) could not be used: {type(cause).__name__}: {cause}"
            f"{_stderr_tail(errlog)}"
        ) from error
    tools: dict[str, Tool] = {}
    for item in listed:
        tool = _mcp_tool(server.name, client, item)
        if tool.name in tools:
            log.warning("MCP server %s: tool %r is left out, its name clashes as %s", server.name, item.name, tool.name)
            continue
        tools[tool.name] = tool
    return list(tools.values())


@hookimpl
async def loopwright_run_tools(run: RunInfo, sandbox: Sandbox, stack: AsyncExitStack) -> list[Tool]:
    tools: list[Tool] = []
    for server in run.spec.mcp_servers:
        tools += await connect(server, run, sandbox, stack)
    return tools
