"""Built-in maker `command`: any CLI agent (`claude -p`, `codex exec`, `aider`, a script) run in the sandbox.

Each iteration writes the prompt (system text with the goal and constraints, then the working
memory and the latest verdict) to `agent.prompt_file` in the worktree, then runs `agent.command`
with `{prompt_file}` replaced by that path, as a `run_command` tool call: in the sandbox, under the
approval rules and policy hooks, traced and durable. The agent's work is whatever it leaves in the
worktree; the verifiers read it from there. No model API key is needed on the host.

What the agent spends counts against `max_cost_usd`: it must print its usage report on stdout
(`claude -p --output-format json`, `codex exec --json`), which the maker reads after each run and
traces as a model call of the maker. An agent that reports nothing ends the run in error, unless
the spec sets `[agent] accept_unknown_cost = true`.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import anyio

from loopwright.runtime.config import ConfigError, Settings
from loopwright.runtime.hookspecs import hookimpl

if TYPE_CHECKING:
    from loopwright.runtime.spec import AgentSpec

RUN_TOOL = "run_command"
HOW_TO_WORK = """# How you are run
You run as a command-line agent inside a sandbox, in the repository at /workspace (the current \
directory), with no network unless the loop allows it. Change the files there; when you are done, \
exit. Your changes are then checked by the verifiers."""
NO_REPORT = (
    "the command maker's CLI agent printed no usage report, so what it spent cannot count against "
    "max_cost_usd: have it print one on stdout (claude -p --output-format json, codex exec --json), "
    "or set [agent] accept_unknown_cost = true to run it with its spend uncounted"
)


def usage_report(output: str) -> tuple[str | None, dict[str, int], float | None] | None:
    """The model, token usage and cost a CLI agent reported in its output, or None when it reported none.

    Claude Code (`--output-format json` or `stream-json`) ends with a `result` object carrying
    `total_cost_usd`, `usage` and `modelUsage`; Codex (`exec --json`) prints a `turn.completed` event with
    `usage` per turn, in OpenAI's terms (cached input is part of the input), and no cost."""
    events = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
    for event in reversed(events):
        if event.get("type") == "result" and isinstance(event.get("usage"), dict):
            usage = {k: int(event["usage"].get(k) or 0) for k in (
                "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")}
            models: Any = event.get("modelUsage")
            model = max(models, key=lambda m: (models[m] or {}).get("costUSD", 0)) if isinstance(models, dict) and models else None
            cost = event.get("total_cost_usd")
            return model, usage, float(cost) if isinstance(cost, (int, float)) else None
    turns = [e["usage"] for e in events if e.get("type") == "turn.completed" and isinstance(e.get("usage"), dict)]
    if not turns:
        return None
    total = {k: sum(int(t.get(k) or 0) for t in turns) for k in ("input_tokens", "cached_input_tokens", "output_tokens")}
    return None, {"input_tokens": total["input_tokens"] - total["cached_input_tokens"],
                  "cache_read_input_tokens": total["cached_input_tokens"], "output_tokens": total["output_tokens"]}, None


def prompt_text(system: list[dict], opening: str) -> str:
    """The whole prompt of one iteration, as one markdown document."""
    parts = [block["text"] for block in system if block.get("type") == "text"]
    return "\n\n".join([*parts, HOW_TO_WORK, opening]) + "\n"


def write_prompt(worktree: Path, relative: str, text: str) -> None:
    """Write the prompt file on the host without following links: the agent in the sandbox can plant a
    symlink in the worktree, aimed at a host file. When the host runs as root, the folders and the file
    are given to the worktree's owner (the sandbox user)."""
    owner = os.stat(worktree)
    *folders, name = PurePosixPath(relative).parts
    fd = os.open(worktree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for folder in folders:
            try:
                if stat.S_ISLNK(os.lstat(folder, dir_fd=fd).st_mode):
                    os.unlink(folder, dir_fd=fd)
            except FileNotFoundError:
                pass
            try:
                os.mkdir(folder, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            inner = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
            _give(fd, owner)
        try:
            os.unlink(name, dir_fd=fd)  # a fresh file: never write through a link the agent left
        except FileNotFoundError:
            pass
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd)
        _give(out, owner)
        with os.fdopen(out, "w", encoding="utf-8") as file:
            file.write(text)
    except OSError as error:
        raise RuntimeError(f"cannot write the command maker's prompt file {relative!r} in the worktree: {error}") from None
    finally:
        os.close(fd)


def _give(fd: int, owner: os.stat_result) -> None:
    if os.getuid() == 0:
        os.fchown(fd, owner.st_uid, owner.st_gid)


class CommandMaker:
    def __init__(self, agent: AgentSpec, settings: Settings):
        if not (agent.command and agent.command.strip()):
            raise ConfigError("a 'command' maker needs [agent] command, the CLI agent to run in the sandbox")
        prompt_file = PurePosixPath(agent.prompt_file)
        if prompt_file.is_absolute() or ".." in prompt_file.parts or not prompt_file.name:
            raise ConfigError(
                f"[agent] prompt_file {agent.prompt_file!r} must be a file path inside the repository, "
                "relative to it, such as '.loopwright/prompt.md'"
            )
        self.agent = agent

    def command(self) -> str:
        return (self.agent.command or "").replace("{prompt_file}", shlex.quote(self.agent.prompt_file))

    async def take_turn(self, turn) -> str:
        """Write the prompt file, run the CLI agent once and count what it reports spending; its exit
        code ends the turn."""
        await turn.check_stop_rules()  # no model call of ours checks them: a person's stop, wall time, spend
        text = prompt_text(turn.system, turn.opening)
        await anyio.to_thread.run_sync(write_prompt, Path(turn.run.worktree), self.agent.prompt_file, text)
        result = await turn.tool(f"command-{turn.iteration}", RUN_TOOL, {"command": self.command()})
        report = usage_report(result.content)
        if report is not None:
            model, usage, cost = report
            await turn.report_usage(model or self.agent.model, usage, cost)
        elif not self.agent.accept_unknown_cost:
            raise ConfigError(NO_REPORT)
        return "command_failed" if result.is_error else "end_turn"


@hookimpl(trylast=True)
def loopwright_register_agents(register):
    register("command", CommandMaker)
