"""An example Loopwright plugin.

It contributes a connector tool, ``word_count``, that counts the words of a workspace file inside
the run's sandbox, and a lifecycle hook that appends one line per finished run to a report file
named in plugins.toml::

    [plugins.example]
    report = "~/loopwright-runs.txt"
"""

from __future__ import annotations

import shlex
from datetime import datetime, timezone
from pathlib import Path

from loopwright import Outcome, RunInfo, Tool, ToolContext, hookimpl, plugin_settings

NAME = "example"  # the entry point's name in pyproject.toml


def word_count(ctx: ToolContext, args: dict) -> str:
    """Count the words of one file of the workspace, with `wc -w` inside the sandbox."""
    path = args.get("path")
    if not isinstance(path, str) or not path.strip():
        # Raising is how a tool fails: the maker reads the message and the run goes on.
        raise ValueError("word_count needs 'path', a file of the workspace such as 'README.md'")
    result = ctx.sandbox.run(f"wc -w < {shlex.quote(path)}", timeout=ctx.timeout)
    if result.exit_code != 0:
        raise ValueError(f"cannot read {path!r}: {result.stderr.strip()}")
    return f"{path}: {int(result.stdout.split()[0])} words"


@hookimpl
def loopwright_register_tools(register):
    register(Tool(
        name="word_count",
        description="Count the words of a text file of the workspace.",
        input_schema={
            "type": "object",
            "properties": {"path": {"type": "string", "description": "path relative to the workspace"}},
            "required": ["path"],
        },
        handler=word_count,
    ))


@hookimpl
def loopwright_run_finished(run: RunInfo, outcome: Outcome):
    report = plugin_settings(NAME).get("report")
    if not report:
        return
    path = Path(report).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with path.open("a", encoding="utf-8") as file:
        file.write(f"{stamp} {run.loop} {run.id}: {outcome.status} after {outcome.iterations} iteration(s)"
                   f" - {outcome.reason}\n")
