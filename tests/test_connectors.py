"""Connectors: external MCP servers as tool sources, and the HTTP request tool, in real runs.

A stdio MCP server runs inside the run's container (a standard-library script committed to the
project, so it is at /workspace); an HTTP MCP server and the HTTP targets are loopback servers of
this test process, reached from the host.
"""

import json
import shutil
import socket
import subprocess
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import uvicorn
from mcp.server.mcpserver import MCPServer

from conftest import loopwright, run_id_of, trace, write_spec
from model_server import text, tool_use
from loopwright.plugins import http_tool
from loopwright.runtime.spec import parse_spec
from loopwright.runtime.types import RunInfo, ToolContext, ToolResult

FIXTURES = Path(__file__).parent / "fixtures"
FIX = tool_use("edit_file", {"path": "calc.py", "old_text": "(len(numbers) + 1)", "new_text": "len(numbers)"})
TINY = {"name": "tiny", "command": ["python3", "tiny_mcp_server.py"], "env": {"TINY_GREETING": "hello from the spec"}}


@pytest.fixture
def mcp_project(project) -> Path:
    """The example project with the tiny stdio MCP server committed at its top level."""
    shutil.copy(FIXTURES / "tiny_mcp_server.py", project / "tiny_mcp_server.py")
    for args in (["add", "-A"], ["-c", "user.name=T", "-c", "user.email=t@example.invalid", "commit", "-q", "-m", "mcp"]):
        subprocess.run(["git", "-C", str(project), *args], check=True, capture_output=True)
    return project


def tool_results(request: dict) -> list[dict]:
    """The tool_result blocks of the last message of a model request."""
    return [b for b in request["messages"][-1]["content"] if isinstance(b, dict) and b.get("type") == "tool_result"]


def run_status(run_id: str) -> dict:
    result = loopwright("status", run_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- MCP servers ---------------------------------------------------------------------------------


def test_stdio_mcp_server_tool_is_called_by_the_maker_and_runs_inside_the_sandbox(home, mcp_project, model):
    server = model([tool_use("mcp__tiny__whereami", {}), text("done")])
    spec = write_spec(mcp_project, stop={"max_iterations": 1}, mcp_servers=[TINY])
    result = loopwright("run", str(spec))
    assert result.returncode == 1, result.stdout + result.stderr  # the checks still fail: calc.py is unfixed

    offered = {tool["name"] for tool in server.requests[0]["tools"]}
    assert {"mcp__tiny__whereami", "mcp__tiny__read_workspace_file", "mcp__tiny__fail"} <= offered
    [answer] = tool_results(server.requests[1])
    assert not answer["is_error"]
    where = json.loads(answer["content"])
    assert where["in_docker"] is True
    assert where["cwd"] == "/workspace"
    assert where["uid"] != 0
    assert where["hostname"] != socket.gethostname()
    assert where["greeting"] == "hello from the spec"


def test_stdio_mcp_server_reads_the_runs_worktree(home, mcp_project, model):
    server = model([tool_use("mcp__tiny__read_workspace_file", {"path": "calc.py"}), text("done")])
    result = loopwright("run", str(write_spec(mcp_project, stop={"max_iterations": 1}, mcp_servers=[TINY])))
    assert result.returncode == 1, result.stdout + result.stderr
    [answer] = tool_results(server.requests[1])
    assert "def average(numbers):" in answer["content"]


def test_mcp_tool_error_reaches_the_maker_and_the_run_goes_on_to_succeed(home, mcp_project, model):
    server = model([
        tool_use("mcp__tiny__fail", {"message": "the index is rebuilding"}),
        tool_use("mcp__tiny__read_workspace_file", {"path": "no/such/file.txt"}),
        FIX,
        text("Fixed."),
    ])
    result = loopwright("run", str(write_spec(mcp_project, mcp_servers=[TINY])))
    assert result.returncode == 0, result.stdout + result.stderr
    [failed] = tool_results(server.requests[1])
    assert failed["is_error"] and failed["content"] == "the index is rebuilding"
    [refused] = tool_results(server.requests[2])
    assert refused["is_error"] and "no/such/file.txt" in refused["content"]
    assert run_status(run_id_of(result))["status"] == "succeeded"


def test_mcp_tool_calls_are_traced_under_their_namespaced_names(home, mcp_project, model):
    model([tool_use("mcp__tiny__whereami", {}), text("done")])
    result = loopwright("run", str(write_spec(mcp_project, stop={"max_iterations": 1}, mcp_servers=[TINY])))
    calls = [e["data"] for e in trace(run_id_of(result)) if e["kind"] == "tool_call"]
    assert [(c["tool"], c["is_error"]) for c in calls] == [("mcp__tiny__whereami", False)]
    assert '"in_docker": true' in calls[0]["output"]


def test_stdio_mcp_server_that_cannot_start_ends_the_run_naming_the_server(home, mcp_project, model):
    server = model([text("never asked")])
    broken = {"name": "broken", "command": ["python3", "no_such_server.py"]}
    result = loopwright("run", str(write_spec(mcp_project, mcp_servers=[broken])))
    assert result.returncode == 1
    run = run_status(run_id_of(result))
    assert run["status"] == "error"
    assert "MCP server 'broken'" in run["reason"] and "no_such_server.py" in run["reason"]
    assert server.requests == []


@contextmanager
def http_mcp_server():
    """A real MCP server over streamable HTTP on a loopback port, in a thread of this process."""
    mcp = MCPServer("adder")

    @mcp.tool()
    def add(a: int, b: int) -> str:
        """Add two integers."""
        return str(a + b)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(mcp.streamable_http_app(), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            threading.Event().wait(0.02)
        yield f"http://127.0.0.1:{port}/mcp", port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_http_mcp_server_on_an_allowed_host_gives_the_maker_its_tools(home, project, model):
    with http_mcp_server() as (url, port):
        server = model([tool_use("mcp__adder__add", {"a": 2, "b": 40}), text("done")])
        spec = write_spec(project, stop={"max_iterations": 1}, http={"allow_hosts": [f"127.0.0.1:{port}"]},
                          mcp_servers=[{"name": "adder", "url": url}])
        result = loopwright("run", str(spec))
    assert result.returncode == 1, result.stdout + result.stderr
    [answer] = tool_results(server.requests[1])
    assert (answer["content"], answer["is_error"]) == ("42", False)


def test_http_mcp_server_on_a_host_not_allowed_is_refused_naming_the_host(home, project, model):
    server = model([text("never asked")])
    port = free_port()
    spec = write_spec(project, http={"allow_hosts": ["127.0.0.1:1"]},
                      mcp_servers=[{"name": "elsewhere", "url": f"http://127.0.0.1:{port}/mcp"}])
    result = loopwright("run", str(spec))
    assert result.returncode == 1
    reason = run_status(run_id_of(result))["reason"]
    assert "MCP server 'elsewhere'" in reason
    assert f"127.0.0.1:{port}" in reason and "http.allow_hosts" in reason
    assert server.requests == []


# --- the HTTP request tool -------------------------------------------------------------------------


class _Pages(BaseHTTPRequestHandler):
    """/hello answers text; /big answers 300 kB; /away redirects to the `redirect_to` URL."""

    def do_GET(self):
        self.server.paths.append(self.path)
        if self.path == "/away":
            self.send_response(302)
            self.send_header("location", self.server.redirect_to)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body = b"x" * 300_000 if self.path == "/big" else b"hello from the loopback server"
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def pages():
    """Two loopback web servers; `pages[1]` is never allowed."""
    servers = []
    for _ in range(2):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
        httpd.paths, httpd.redirect_to = [], ""
        httpd.url = f"http://127.0.0.1:{httpd.server_port}"
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(httpd)
    yield servers
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_http_request_is_called_by_the_maker_and_reaches_an_allowed_loopback_host(home, project, model, pages):
    server = model([tool_use("http_request", {"url": pages[0].url + "/hello"}), text("done")])
    spec = write_spec(project, stop={"max_iterations": 1}, http={"allow_hosts": [f"127.0.0.1:{pages[0].server_port}"]})
    result = loopwright("run", str(spec))
    assert result.returncode == 1, result.stdout + result.stderr
    [answer] = tool_results(server.requests[1])
    assert not answer["is_error"]
    assert answer["content"].startswith("HTTP 200")
    assert answer["content"].endswith("hello from the loopback server")


def call_http_request(allowed, **arguments) -> ToolResult:
    """Call the http_request tool a run with `allowed` hosts gets, as the engine would (it runs on the host)."""
    spec = parse_spec({"name": "web", "goal": "g", "verify": [{"kind": "command", "run": "true"}],
                       "http": {"allow_hosts": allowed}})
    run = RunInfo("run-1", spec.name, spec, "branch", Path("."))
    [tool] = http_tool.loopwright_run_tools(run)
    return tool.handler(ToolContext(run, None, 30, 30_000), arguments)


def test_http_request_to_a_host_not_allowed_is_refused_and_not_sent(pages):
    answer = call_http_request([f"127.0.0.1:{pages[0].server_port}"], url=pages[1].url + "/hello")
    assert answer.is_error
    assert f"127.0.0.1:{pages[1].server_port} is not in the loop's http.allow_hosts" in answer.content
    assert pages[1].paths == []


def test_http_request_does_not_follow_a_redirect_to_a_host_not_allowed(pages):
    pages[0].redirect_to = pages[1].url + "/hello"
    answer = call_http_request([f"127.0.0.1:{pages[0].server_port}"], url=pages[0].url + "/away")
    assert answer.is_error
    assert f"HTTP 302: redirected to {pages[1].url}/hello, which was not followed" in answer.content
    assert pages[1].paths == []


def test_http_request_follows_a_redirect_between_allowed_hosts(pages):
    pages[0].redirect_to = pages[1].url + "/hello"
    allowed = [f"127.0.0.1:{pages[0].server_port}", f"127.0.0.1:{pages[1].server_port}"]
    answer = call_http_request(allowed, url=pages[0].url + "/away")
    assert answer.content.endswith("hello from the loopback server")
    assert pages[1].paths == ["/hello"]


def test_http_request_allows_every_port_of_a_host_listed_without_one(pages):
    answer = call_http_request(["127.0.0.1"], url=pages[1].url + "/hello")
    assert not answer.is_error and answer.content.startswith("HTTP 200")


def test_http_request_caps_a_large_response_body(pages):
    answer = call_http_request(["127.0.0.1"], url=pages[0].url + "/big")
    assert answer.content.endswith("[... body cut at 100000 bytes ...]")
    assert len(answer.content) < 110_000


def test_http_request_refuses_to_set_the_host_header(pages):
    answer = call_http_request(["127.0.0.1"], url=pages[0].url + "/hello", headers={"Host": "internal.example"})
    assert answer.is_error and "Host header" in answer.content
    assert pages[0].paths == []


def test_http_request_tool_exists_only_when_the_spec_allows_a_host(home, project, model):
    server = model([text("done")])
    loopwright("run", str(write_spec(project, stop={"max_iterations": 1})))
    assert "http_request" not in {tool["name"] for tool in server.requests[0]["tools"]}
