"""The docs promise only what exists: every `loopwright ...` command they name is a command, and every
shell block marked runnable (a fence opened with ```bash runnable) runs and exits 0."""

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("examples/*/README.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SPAN = re.compile(r"`([^`\n]+)`")
SHELL = ("", "bash", "sh", "console")
# `loopwright` where a shell would run it: a line's (or a code span's) start, after `$ `, `$(`, `&&`, `;` or `|`
COMMAND = re.compile(r"(?:^|\$ |\$\(|&& |; |\| )loopwright ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", re.MULTILINE)


def code_in(text: str) -> list[str]:
    """Shell blocks (comments dropped) and inline code spans."""
    blocks = [re.sub(r"\s#.*", "", body) for info, body in FENCE.findall(text) if (info.split() or [""])[0] in SHELL]
    return blocks + SPAN.findall(FENCE.sub("", text))


def named_commands() -> set[tuple[str, str, str | None]]:
    found = set()
    for doc in DOCS:
        for code in code_in(doc.read_text()):
            for command, sub in COMMAND.findall(code):
                found.add((doc.name, command, sub or None))
    return found


def runnable_blocks() -> list[tuple[str, str]]:
    return [(f"{doc.relative_to(ROOT)}:{doc.read_text()[:m.start()].count(chr(10)) + 1}", m.group(2))
            for doc in DOCS for m in FENCE.finditer(doc.read_text()) if m.group(1).split()[1:2] == ["runnable"]]


def test_every_command_the_docs_name_exists(home):
    from loopwright.cli import main

    ctx = click.Context(main)
    commands = set(main.list_commands(ctx))  # with the plugins' commands
    missing = []
    for doc, name, sub in sorted(named_commands(), key=str):
        command = main.get_command(ctx, name) if name in commands else None
        if command is None:
            missing.append(f"{doc}: loopwright {name}")
        elif isinstance(command, click.Group) and sub and sub not in command.list_commands(ctx):
            missing.append(f"{doc}: loopwright {name} {sub}")
    assert not missing, "the docs name commands that do not exist: " + "; ".join(missing)
    assert len(named_commands()) > 30  # the docs do name commands: the pattern found them


@pytest.mark.parametrize("where, block", runnable_blocks(), ids=[w for w, _ in runnable_blocks()])
def test_a_runnable_block_of_the_docs_runs(where, block, home, sandbox_image):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{where} failed:\n{block}\n{result.stdout}\n{result.stderr}"


def test_the_docs_have_runnable_blocks():
    assert {where.split(":")[0] for where, _ in runnable_blocks()} >= {"docs/loops.md", "docs/sandbox.md"}
