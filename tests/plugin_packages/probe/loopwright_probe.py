"""A test plugin: implements every hook, and records each lifecycle call it sees.

Settings (`[plugins.probe]` in plugins.toml):
  record         JSON-lines file each lifecycle hook appends a line to
  system_prompt  text the probe adds to every run's system prompt
  deny           tool names whose calls the probe refuses
  fail_at_start_up  raise in loopwright_register_tools
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import click

from loopwright import CheckResult, Decision, ExecResult, Tool, hookimpl, plugin_settings

NO_INPUT = {"type": "object", "properties": {}}


def _record(hook: str, **data) -> None:
    path = plugin_settings("probe").get("record")
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps({"hook": hook, **data}) + "\n")


# --- registration --------------------------------------------------------------------------------


@hookimpl
def loopwright_register_tools(register):
    if plugin_settings("probe").get("fail_at_start_up"):
        raise RuntimeError("the probe was told to fail")
    # The built-in sandbox_tools has a list_files too; a third party's wins.
    register(Tool("list_files", "List files (the probe's version).", NO_INPUT, lambda ctx, args: "listed by the probe"))


class ProbeAgent:
    """A maker that needs no model: one tool call, then it ends its turn."""

    def __init__(self, agent_spec, settings):
        self.agent = agent_spec

    async def take_turn(self, turn) -> str:
        await turn.tool("probe-call-1", "run_command", {"command": "echo made by the probe agent > done.txt"})
        return "end_turn"


@hookimpl
def loopwright_register_agents(register):
    register("probe-agent", ProbeAgent)


class FileExists:
    """Verifier `probe-file`: passes when the file named by `path` exists and is not empty."""

    def __init__(self, check):
        self.path = check.model_extra["path"]

    def verify(self, ctx) -> CheckResult:
        result = ctx.sandbox.run(f"test -s '{self.path}'", timeout=10)
        if result.exit_code == 0:
            return CheckResult("probe-file", True)
        return CheckResult("probe-file", False, f"{self.path} is missing or empty", "missing")


@hookimpl
def loopwright_register_verifiers(register):
    register("probe-file", FileExists)


class HostSandbox:
    """Runs commands on the host, in the worktree: enough to show a sandbox kind is pluggable."""

    def __init__(self, worktree: Path):
        self.worktree = worktree

    def run(self, command: str, *, timeout: float, stdin: bytes | None = None) -> ExecResult:
        started = time.monotonic()
        done = subprocess.run(["sh", "-c", command], cwd=self.worktree, input=stdin, capture_output=True, timeout=timeout)
        return ExecResult(done.returncode, done.stdout.decode(), done.stderr.decode(), (time.monotonic() - started) * 1000)

    def close(self) -> None:
        _record("sandbox_closed", worktree=str(self.worktree))


class HostSandboxes:
    def start(self, *, run_id, worktree, spec, verification=False):
        _record("sandbox_started", run=run_id, verification=verification)
        return HostSandbox(Path(worktree))

    def reap_orphans(self):
        return []


@hookimpl
def loopwright_register_sandboxes(register):
    register("probe-host", HostSandboxes())


@hookimpl
def loopwright_register_automations(register):
    register("probe-trigger", object())


@hookimpl
def loopwright_register_skill_sources(register):
    register("probe-skills", lambda *args: [])


@hookimpl
def loopwright_register_memory(register):
    register("probe-memory", object())


# --- lifecycle -----------------------------------------------------------------------------------


@hookimpl
def loopwright_run_started(run):
    _record("run_started", run=run.id, loop=run.loop)


@hookimpl
def loopwright_system_prompt(run):
    _record("system_prompt", run=run.id)
    return plugin_settings("probe").get("system_prompt")


@hookimpl
def loopwright_run_tools(run, sandbox, stack):
    _record("run_tools", run=run.id)
    stack.callback(_record, "run_tools_closed", run=run.id)
    return [Tool("probe_run_id", "The id of the current run.", NO_INPUT, lambda ctx, args: f"this is run {run.id}")]


@hookimpl
def loopwright_before_tool_call(run, call):
    _record("before_tool_call", tool=call.name, iteration=call.iteration)
    if call.name in plugin_settings("probe").get("deny", []):
        return Decision.deny(f"the probe plugin forbids {call.name}")
    return None


@hookimpl
def loopwright_after_tool_call(run, call, result):
    _record("after_tool_call", tool=call.name, content=result.content, is_error=result.is_error)


@hookimpl
def loopwright_verdict(run, iteration, verdict, summary):
    _record("verdict", iteration=iteration, passed=verdict.passed, summary=summary)


@hookimpl
def loopwright_run_finished(run, outcome):
    _record("run_finished", run=run.id, status=outcome.status, reason=outcome.reason)


# --- the command line ----------------------------------------------------------------------------


@hookimpl
def loopwright_register_commands(cli):
    @cli.command("probe-hello")
    @click.argument("name")
    def probe_hello(name):
        """Greet NAME (a command added by the probe plugin)."""
        click.echo(f"hello {name}, from the probe")
