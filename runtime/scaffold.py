"""`loopwright init`: a first loop for a repository, written to `loops/<name>.toml`.

It finds how the repository runs its tests (pytest, unittest, `npm test`, `cargo test`, `go test`)
and writes a spec that holds: the tests as the check, the test files protected (and, for pytest,
the runner's own configuration, which the command verifier protects by default), budgets and stop
rules. The spec names no repository: one under `loops/` finds the git repository it is in.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

PYTEST = "python3 -m pytest -q -p no:cacheprovider"


class ScaffoldError(Exception):
    """The repository's tests cannot be found or the spec cannot be written; the message says what to do."""


@dataclass
class Detected:
    command: str
    protect: list[str]
    image: str | None  # None: the default image (Python and pytest)
    found: str  # what gave it away, for the message


def detect(repo: Path) -> Detected:
    """How this repository runs its tests."""
    package = repo / "package.json"
    if package.is_file():
        scripts = _json(package).get("scripts", {})
        if isinstance(scripts, dict) and scripts.get("test"):
            return Detected("npm test", ["test/*", "tests/*", "__tests__/*", "*.test.*", "*.spec.*"],
                             "node:22-slim", "package.json's scripts.test")
    if (repo / "Cargo.toml").is_file():
        return Detected("cargo test", ["tests/*"], "rust:1-slim", "Cargo.toml")
    if (repo / "go.mod").is_file():
        return Detected("go test ./...", ["*_test.go"], "golang:1-bookworm", "go.mod")
    python_tests = [p for p in repo.rglob("*.py") if re.fullmatch(r"test_.*\.py|.*_test\.py", p.name)
                    and ".git" not in p.parts and ".venv" not in p.parts]
    protect = ["tests/*", "test/*", "test_*.py", "*/test_*.py", "*_test.py"]
    if python_tests and not _uses_pytest(repo) and all("unittest" in t.read_text(errors="replace") for t in python_tests):
        return Detected("python3 -m unittest discover -q", protect, None, "test files written for unittest")
    if python_tests or _uses_pytest(repo):  # pytest runs plain test functions, and unittest's too
        return Detected(PYTEST, protect, None, f"{len(python_tests)} Python test files, for pytest")
    raise ScaffoldError(f"no tests found in {repo} (pytest, unittest, npm test, cargo test or go test); "
                        "name the command that runs them: loopwright init --test 'COMMAND'")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _uses_pytest(repo: Path) -> bool:
    """The repository configures pytest."""
    if (repo / "pytest.ini").is_file() or (repo / "conftest.py").is_file():
        return True
    try:
        return "pytest" in tomllib.loads((repo / "pyproject.toml").read_text()).get("tool", {})
    except (OSError, tomllib.TOMLDecodeError):
        return False


def spec_text(name: str, setup: Detected) -> str:
    image = (f'image = "{setup.image}"   # has the toolchain; the default image has only Python and pytest\n'
             if setup.image else "")
    protect = ", ".join(json.dumps(p) for p in setup.protect)
    return f'''# Written by `loopwright init`; edit freely. docs/loops.md explains every field.
name = "{name}"
goal = "Make the test suite pass (`{setup.command}`) by fixing the code, without weakening any test."
constraints = ["Never edit the tests or the test runner's configuration; fix the code under test."]

[sandbox]
network = "none"
{image}
[agent]
kind = "anthropic"
model = "claude-sonnet-5-5"
max_tool_calls = 30           # per iteration

[[verify]]                    # "done" is decided here, not by the agent
kind = "command"
run = "{setup.command}"
protect = [{protect}]   # an edit here fails the iteration

[stop]
max_iterations = 8
max_cost_usd = 2.0            # a cap: no model call starts that would cross it
max_wall_time = "20m"
stall_after = 3               # three iterations in a row without progress
'''


def write_loop(repo: Path, name: str | None = None, command: str | None = None) -> tuple[Path, Detected]:
    """Write `loops/<name>.toml` for the git repository `repo`; refuse to overwrite one."""
    repo = repo.resolve()
    if not (repo / ".git").exists():
        raise ScaffoldError(f"{repo} is not a git repository: run `loopwright init` at the top of one")
    setup = Detected(command, [], None, "--test") if command else detect(repo)
    name = name or re.sub(r"[^a-z0-9-]+", "-", repo.name.lower())[:34].strip("-") + "-tests"
    path = repo / "loops" / f"{name}.toml"
    if path.exists():
        raise ScaffoldError(f"{path} exists already; choose another name with --name")
    path.parent.mkdir(exist_ok=True)
    path.write_text(spec_text(name, setup))
    return path, setup
