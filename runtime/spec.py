"""Loop specs: TOML files validated by pydantic before anything runs."""

from __future__ import annotations

import fnmatch
import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator,
)

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_MEMORY = re.compile(r"^\d+[bkmg]?$", re.IGNORECASE)


def parse_duration(value: str | int | float) -> float:
    """Seconds from `90`, `"90s"`, `"30m"`, `"2h"`."""
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"expected a duration such as '90s', '30m' or '2h', got {value!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _positive_duration(value: str | float) -> str | float:
    if parse_duration(value) <= 0:
        raise ValueError("must be longer than zero")
    return value


def _a_number(value: Any) -> Any:
    """TOML's true and false, and NaN or an infinity, are no number of anything (in lax mode pydantic
    would read true as 1)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    return value


Duration = Annotated[str | float, BeforeValidator(_a_number), AfterValidator(_positive_duration)]
Int = Annotated[int, BeforeValidator(_a_number)]
Float = Annotated[float, BeforeValidator(_a_number)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Workspace(_Section):
    repo: str = "."
    ref: str | None = None  # start from this commit, branch or tag instead of HEAD (a pull request's head)
    remote: str | None = None  # where to fetch `ref` from when the repository lacks it
    fetch: str | None = None  # what to fetch from `remote` (default: `ref`), e.g. "refs/pull/7/head"
    author: str | None = Field(None, pattern=r"^[^<>\n]+ <[^<>\s]+>$")  # "Name <email>" of the run's commits

    @property
    def identity(self) -> tuple[str, str] | None:
        """The run's commits' author, the loop's identity (default: Loopwright's)."""
        if not self.author:
            return None
        name, email = self.author.rsplit(" <", 1)
        return name.strip(), email.rstrip(">")


class SandboxSpec(_Section):
    kind: str = "docker"
    image: str | None = None  # None: the locally built default image
    network: Literal["none", "bridge"] = "none"
    memory: str = "1g"
    pids_limit: Int = Field(256, ge=16, le=65536)
    cpus: Float = Field(1.0, gt=0, le=64)
    tool_timeout_s: Float = Field(120, gt=0, le=86400)

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        if not _MEMORY.match(value):
            raise ValueError(f"expected a size such as '512m' or '1g', got {value!r}")
        return value


class AgentSpec(_Section):
    kind: str = "anthropic"
    model: str = "claude-sonnet-5-5"
    max_tool_calls: Int = Field(40, ge=1, le=10_000)
    max_tokens: Int = Field(8192, ge=1, le=200_000)
    candidates: Int = Field(1, ge=1, le=8)  # makers per iteration side by side; the best verdict is kept
    skills: list[str] = []  # skill folders (or folders of them), relative to the spec file
    system: str | None = None  # extra instructions appended to the built-in system prompt
    # kind = "command": a CLI agent run in the sandbox that prints its usage, e.g.
    # "claude -p --output-format json \"$(cat {prompt_file})\""
    command: str | None = None
    prompt_file: str = ".loopwright/prompt.md"
    # kind = "command": run an agent that prints no usage report, its spend not counted against max_cost_usd
    accept_unknown_cost: bool = False

    @model_validator(mode="after")
    def _command_maker_needs_command(self) -> AgentSpec:
        if self.kind == "command" and not (self.command and self.command.strip()):
            raise ValueError("a 'command' maker needs 'command', the CLI agent to run in the sandbox")
        return self


class MetricSpec(_Section):
    """A figure a `command` check reads from its output: its score. Higher or lower is better; with a
    `target`, the check passes once the figure reaches it (and the command exits 0)."""

    pattern: str = Field(min_length=1)  # a regular expression; its first group (or the match) is the number
    better: Literal["lower", "higher"]
    target: Float | None = None

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"not a regular expression: {error}") from None
        return value

    @field_validator("target")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def read(self, output: str) -> float | None:
        """The last figure the pattern finds in ``output``; None when there is none."""
        found = None
        for match in re.finditer(self.pattern, output, re.MULTILINE):
            text = match.group(1) if match.groups() else match.group(0)
            try:
                found = float(text)
            except (TypeError, ValueError):
                continue
        return found if found is not None and math.isfinite(found) else None

    def met(self, value: float) -> bool:
        return self.target is not None and (value >= self.target if self.better == "higher" else value <= self.target)


class VerifySpec(BaseModel):
    """One check. `kind` picks the verifier plugin; other keys are that plugin's settings."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    kind: str
    name: str | None = None
    run: str | None = None  # kind = "command": the shell command; exit code 0 means pass
    protect: list[str] = []
    # Also protect the test runner's configuration and import path (docs/verification.md); false opts out.
    protect_runner: bool = True
    timeout_s: Float | None = Field(None, gt=0)
    model: str | None = None  # kind = "rubric": the reviewer's model
    rubric: str | None = None  # kind = "rubric": what the diff must satisfy
    metric: MetricSpec | None = None  # kind = "command": the figure the command prints, as the check's score

    @model_validator(mode="after")
    def _builtin_kinds(self) -> VerifySpec:
        if self.kind == "command" and not (self.run and self.run.strip()):
            raise ValueError("a 'command' check needs 'run', the shell command whose exit code 0 means pass")
        if self.kind == "rubric" and not (self.rubric and self.rubric.strip()):
            raise ValueError("a 'rubric' check needs 'rubric', the criteria the reviewer applies to the diff")
        if self.metric is not None and self.kind != "command":
            raise ValueError(f"'metric' belongs to a 'command' check, not a {self.kind!r} one")
        if self.kind in ("command", "rubric") and self.model_extra:
            # Built-in kinds take no other keys, so a typo (e.g. `protcet`) cannot switch a rule off.
            raise ValueError(f"unknown field(s) {', '.join(sorted(self.model_extra))} for a {self.kind!r} check")
        return self

    @property
    def label(self) -> str:
        return self.name or (f"{self.kind}: {self.run}" if self.run else self.kind)


StallStage = Literal["hint", "ask", "stop"]


class StopSpec(_Section):
    max_iterations: Int = Field(10, ge=1, le=10_000)
    max_cost_usd: Float = Field(5.0, gt=0)
    max_wall_time: Duration = "30m"
    # A stall: the checks' best result has not improved for this many iterations (docs/loops.md).
    stall_after: Int = Field(3, ge=2, le=1000)
    # What each stall does, in order: "hint" (tell the maker, give it stall_after more iterations),
    # "ask" (a person continues the run with a note, or stops it), "stop". Past the last stage: stop.
    on_stall: list[StallStage] = Field(["stop"], min_length=1, max_length=100)
    ask_timeout: Duration = "1h"  # an "ask" no person answers by then stops the run

    @field_validator("on_stall", mode="before")
    @classmethod
    def _one_stage_or_several(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def ask_timeout_s(self) -> float:
        return parse_duration(self.ask_timeout)

    @property
    def wall_time_s(self) -> float:
        return parse_duration(self.max_wall_time)


class MemorySpec(_Section):
    notes: bool = True  # markdown progress notes kept per loop, fed to the next iteration and run
    kv: bool = False  # memory_get / memory_set tools, scoped to the loop: offered only when asked for
    budget_chars: Int = Field(4000, ge=200, le=200_000)  # the most text of earlier runs the system prompt carries
    # The working memory: a line per earlier iteration of this run, newest kept, in every opening message.
    working_chars: Int = Field(800, ge=200, le=50_000)


class McpServerSpec(_Section):
    """An MCP server whose tools the maker may call, as mcp__<name>__<tool>."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")
    command: list[str] | None = None  # a stdio server, started inside the run's sandbox
    url: str | None = None  # a streamable HTTP server, reached from the host if http.allow_hosts allows it
    env: dict[str, str] = {}

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError("give exactly one of 'command' (a stdio server run in the sandbox) or 'url'")
        return self


class HttpSpec(_Section):
    allow_hosts: list[str] = []  # host or host:port the http_request tool and MCP URLs may reach


class ApprovalRule(_Section):
    """Tool calls that wait for a person: the tool name and argument values are glob patterns."""

    tool: str = Field(min_length=1)  # e.g. "run_command" or "*"
    when: dict[str, str] = {}  # argument name -> pattern, e.g. {command = "git push*"}
    timeout: Duration = "1h"  # no answer by then denies the call

    @property
    def timeout_s(self) -> float:
        return parse_duration(self.timeout)

    def matches(self, tool: str, arguments: dict[str, Any]) -> bool:
        if not fnmatch.fnmatchcase(tool, self.tool):
            return False
        return all(fnmatch.fnmatchcase(str(arguments.get(name, "")), pattern) for name, pattern in self.when.items())

    def describe(self) -> str:
        conditions = ", ".join(f"{name} matches {pattern!r}" for name, pattern in self.when.items())
        return f"tool {self.tool!r}" + (f" where {conditions}" if conditions else "")


class TriggerSpec(BaseModel):
    """What starts runs of the loop (docs/automations.md). `kind` picks the automation plugin; other
    keys are that kind's settings, checked by the plugin (`loopwright validate` reports them)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    kind: str
    # Part of the automation's id, <loop>/<name>, and of a webhook's URL. Default: the kind for the
    # first trigger of a kind, then <kind>-2, <kind>-3, ...
    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    max_runs_per_day: Int | None = Field(None, ge=0)  # firings beyond it are skipped (UTC days)
    max_cost_usd_per_day: Float | None = Field(None, ge=0)  # spend of today's runs it started


class GitHubSpec(_Section):
    """What a run sends to GitHub when it ends (docs/github.md). The token is read by the process that
    executes the run, from `token_env` or `token_file`; it never enters the sandbox, the trace or a log."""

    repo: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")  # owner/name; default: the remote's
    remote: str = Field("origin", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # the name of the git remote pushed to
    token_env: str = Field("GITHUB_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    token_file: str | None = None  # a file holding the token, instead of the environment
    push: bool = True  # push the run's branch as loopwright/<loop> (or loopwright/<loop>/<pr-or-issue>-<number>)
    pull_request: bool = True  # open a pull request from it, or update the one open
    base: str | None = None  # the pull request's base branch (default: the repository's default branch)
    comment: bool = True  # comment on the pull request or issue whose event started the run
    comment_file: str | None = None  # a file of the run's final tree that is the comment (a review), above the summary
    status: bool = True  # set a commit status on the head commit of the event that started the run
    on: list[Literal["succeeded", "failed", "stalled", "stopped", "error"]] = ["succeeded"]  # what pushes and opens


class NotifySpec(_Section):
    """Tell people when a run ends (docs/automations.md): a Slack-compatible incoming webhook, or any URL
    that takes JSON. The URL is a secret, so the spec names the environment variable that holds it."""

    kind: Literal["slack", "webhook"]
    url_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    on: list[Literal["succeeded", "failed", "stalled", "stopped", "error"]] = \
        ["succeeded", "failed", "stalled", "stopped", "error"]


class LoopSpec(_Section):
    name: str = Field(pattern=NAME_PATTERN)
    goal: str = Field(min_length=1)
    constraints: list[str] = []
    workspace: Workspace = Workspace()
    sandbox: SandboxSpec = SandboxSpec()
    agent: AgentSpec = AgentSpec()
    verify: list[VerifySpec] = Field(min_length=1)
    stop: StopSpec = StopSpec()
    # "best": an iteration whose checks do worse than the best so far is set aside, and the next one
    # starts from the best tree (keep or discard, like autoresearch); "last": every iteration builds on the last.
    keep: Literal["last", "best"] = "last"
    trigger: list[TriggerSpec] = []
    approval: list[ApprovalRule] = []
    memory: MemorySpec = MemorySpec()
    mcp_servers: list[McpServerSpec] = []
    http: HttpSpec = HttpSpec()
    github: GitHubSpec | None = None
    notify: list[NotifySpec] = []

    def approval_rule(self, tool: str, arguments: dict[str, Any]) -> ApprovalRule | None:
        return next((rule for rule in self.approval if rule.matches(tool, arguments)), None)

    @field_validator("name")
    @classmethod
    def _name_makes_a_branch(cls, value: str) -> str:
        # The name is part of the run's branch, loopwright/<name>/<run-id>; git refuses these.
        if ".." in value or value.endswith(".lock"):
            raise ValueError(f"{value!r} cannot be part of a git branch name: no '..' and no '.lock' at the end")
        return value

    @field_validator("goal")
    @classmethod
    def _goal_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the goal must say what the loop is for")
        return value

    @model_validator(mode="after")
    def _trigger_names_unique(self) -> LoopSpec:
        names = self.trigger_names()
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"trigger name(s) {', '.join(twice)} used twice: give each [[trigger]] its own `name`")
        return self

    def trigger_names(self) -> list[str]:
        """Each trigger's name: its `name`, else its kind, then <kind>-2, <kind>-3 for more of a kind."""
        names, seen = [], {}
        for trigger in self.trigger:
            seen[trigger.kind] = seen.get(trigger.kind, 0) + 1
            names.append(trigger.name or (trigger.kind if seen[trigger.kind] == 1 else f"{trigger.kind}-{seen[trigger.kind]}"))
        return names


class SpecError(Exception):
    """A spec that cannot run. `problems` holds one line per problem: where, and what was expected."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid loop spec\n" + "\n".join(f"  - {p}" for p in problems))


def _location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def _problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        loc = item["loc"]
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (check its spelling against docs/loops.md)"
        elif item["type"] == "string_pattern_mismatch" and loc and loc[-1] == "name":
            message = "expected lowercase letters, digits, '.', '_' or '-' (at most 63), starting with a letter or digit"
        elif item["type"] == "model_type":
            message = f"expected a table of fields, got {type(item['input']).__name__} {item['input']!r}"
        problems.append(f"{_location(loc)}: {message}")
    return problems


TOO_DEEP = "(top level): arrays or tables nested too deeply to be a loop spec"


def parse_spec(data: dict[str, Any], source: str = "<inline spec>") -> LoopSpec:
    """Validate a spec given as a dict (from TOML or an MCP call)."""
    if not isinstance(data, dict):
        raise SpecError(source, [f"(top level): expected a table of fields, got {type(data).__name__}"])
    try:
        return LoopSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(source, _problems(error)) from None
    except RecursionError:
        raise SpecError(source, [TOO_DEEP]) from None


def parse_spec_text(text: str, source: str = "<inline spec>") -> LoopSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(source, [f"not valid TOML: {error}"]) from None
    except RecursionError:
        raise SpecError(source, [TOO_DEEP]) from None
    return parse_spec(data, source)


def loop_files(folder: Path) -> list[Path]:
    """The loop specs in a folder such as `loops/`: its .toml files, not the eval sets beside them
    (`<loop>.eval.toml`, docs/improve.md)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.toml") if not p.name.endswith(".eval.toml"))


def load_spec(path: str | Path) -> LoopSpec:
    """Read and validate `loops/NAME.toml`. A relative `workspace.repo` is relative to the file; without
    one, the repository is the git repository the file is in (so `loops/NAME.toml` needs no `repo = ".."`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(path), ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError(str(path), [f"cannot read the file: {error}"]) from None
    spec = parse_spec_text(text, str(path))
    if "repo" in spec.workspace.model_fields_set:
        spec.workspace.repo = str((path.parent / spec.workspace.repo).resolve())  # an absolute one stays
    else:
        folder = path.parent.resolve()
        spec.workspace.repo = str(next((p for p in (folder, *folder.parents) if (p / ".git").exists()), folder))
    spec.agent.skills = [str((path.parent / skill).resolve()) for skill in spec.agent.skills]
    return spec
