"""The values that pass between the engine and plugins."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Literal, Protocol

if TYPE_CHECKING:
    from .spec import LoopSpec, VerifySpec

OUTCOMES = ("succeeded", "failed", "stalled", "stopped", "error")
ACTIVE_STATUSES = ("queued", "running")
STALL_TOOL = "(stall)"  # the "tool" of an approval that asks a person what to do at a stall (on_stall = "ask")


@dataclass
class ExecResult:
    """What a command run in a sandbox produced."""

    exit_code: int
    stdout: str
    stderr: str
    duration_ms: float
    timed_out: bool = False


class Sandbox(Protocol):
    """A run's isolated place to execute commands; the worktree is mounted at /workspace."""

    worktree: Path

    def run(self, command: str, *, timeout: float, stdin: bytes | None = None) -> ExecResult: ...

    def close(self) -> None: ...


class SandboxProvider(Protocol):
    """A sandbox kind (`docker`, ...), contributed by `loopwright_register_sandboxes`."""

    def start(self, *, run_id: str, worktree: Path, spec: LoopSpec, verification: bool = False) -> Sandbox:
        """A sandbox on ``worktree``. ``verification``: one for a check, on a clean copy of the maker's
        tree: fresh (nothing of the maker's sandbox reachable), with a fresh HOME and /tmp, no user
        site and no bytecode written (PYTHONNOUSERSITE, PYTHONDONTWRITEBYTECODE)."""
        ...

    def reap_orphans(self) -> list[str]: ...


@dataclass
class RunInfo:
    """What hooks learn about a run."""

    id: str
    loop: str
    spec: LoopSpec
    branch: str
    worktree: Path
    iteration: int = 0


@dataclass
class ToolCall:
    id: str
    name: str
    input: dict[str, Any]
    iteration: int


@dataclass
class ToolResult:
    """What the maker sees of a tool call. `is_error` tells the model the call failed."""

    content: str
    is_error: bool = False
    details: dict[str, Any] = field(default_factory=dict)  # for the trace only (exit code, duration, ...)


@dataclass
class ToolContext:
    run: RunInfo
    sandbox: Sandbox
    timeout: float
    output_limit: int


ToolHandler = Callable[[ToolContext, dict[str, Any]], "ToolResult | str | Awaitable[ToolResult | str]"]


@dataclass
class Tool:
    """A tool the maker may call. The JSON schema is sent to the model as is."""

    name: str
    description: str
    input_schema: dict[str, Any]
    handler: ToolHandler
    plugin: str = ""  # set by the host: which plugin contributed it

    def schema(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "input_schema": self.input_schema}


@dataclass
class Decision:
    """A `loopwright_before_tool_call` answer."""

    action: Literal["allow", "deny"]
    reason: str = ""

    @classmethod
    def allow(cls) -> Decision:
        return cls("allow")

    @classmethod
    def deny(cls, reason: str) -> Decision:
        return cls("deny", reason)


@dataclass
class Failure:
    """One thing a check found wrong: a test id, a rule or a criterion, with its first error line."""

    id: str
    error: str = ""


@dataclass
class CheckResult:
    """One verifier's answer for one iteration."""

    name: str
    passed: bool
    feedback: str = ""  # what the maker should read when it failed
    signature: str = ""  # stable fingerprint of the failure: the same one again is no progress
    duration_ms: float = 0.0
    headline: str = ""  # the result in a few words ("2 failed, 41 passed"): iteration lines, memory, commits
    failures: list[Failure] = field(default_factory=list)  # what failed, item by item, when the check knows
    # How good the result is, when the check can say: the failing-test count, a metric read from the
    # output. `better` says which way is better; a score that gets better is progress (docs/loops.md).
    score: float | None = None
    better: Literal["lower", "higher"] = "lower"

    def __post_init__(self) -> None:
        self.failures = [f if isinstance(f, Failure) else Failure(**f) for f in self.failures]  # from the trace

    @property
    def knows_items(self) -> bool:
        """Whether the failures list is complete: a pass, or a failure that named what failed."""
        return self.passed or bool(self.failures)


@dataclass
class Verdict:
    iteration: int
    checks: list[CheckResult]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failing(self) -> list[CheckResult]:
        return [check for check in self.checks if not check.passed]

    @property
    def signature(self) -> str:
        return "|".join(f"{c.name}:{c.signature}" for c in self.failing)

    @property
    def headline(self) -> str:
        """`pass`, or the failing checks with their headlines."""
        if self.passed:
            return "pass"
        return "FAIL " + ", ".join(c.name + (f" ({c.headline})" if c.headline else "") for c in self.failing)

    def to_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "passed": self.passed, "checks": [asdict(c) for c in self.checks]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        return cls(data["iteration"], [CheckResult(**c) for c in data["checks"]])


@dataclass
class VerifyContext:
    run: RunInfo
    sandbox: Sandbox
    iteration: int
    changed_files: list[str]
    diff: Callable[[], str]
    # record_model_call(model, usage, duration_ms) -> cost: a checker's model calls count against the budget
    record_model_call: Callable[[str, dict[str, Any], float], float]
    baseline: dict[str, Any] | None = None  # what the verifier's `baseline` returned at the base commit
    # check_budget(model, request): call it before a model call; raises BudgetSpent when the call would
    # cross the run's max_cost_usd (the run then ends `failed`, and the call is not made)
    check_budget: Callable[[str, dict[str, Any]], None] = lambda model, request: None
    # call_timeout() -> seconds a model call starting now may take: the run's remaining wall time, at most 10 minutes
    call_timeout: Callable[[], float] = lambda: 600.0


class BudgetSpent(Exception):
    """A model call would cross the run's `max_cost_usd`; `reason` says by how much. Raised before the call."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Verifier(Protocol):
    """`verify` judges the clean copy in `ctx.sandbox`. A verifier may also define `baseline(ctx)`, run once
    per run on the base commit's tree: what it returns (JSON-able, e.g. the test inventory) comes back
    in every later `ctx.baseline`."""

    def verify(self, ctx: VerifyContext) -> CheckResult: ...


VerifierFactory = Callable[["VerifySpec"], Verifier]


@dataclass
class Outcome:
    status: str  # one of OUTCOMES
    reason: str
    iterations: int
    commit: str | None = None
    error: str | None = None  # when a model call ended the run: the ModelError's kind ("quota", "timeout", ...)


class ModelError(Exception):
    """A model call that failed for good (after the client's own retries), typed so that code reacts to
    its kind, never to its text. `kind`: "quota" (429: a rate limit or quota), "overloaded" (529),
    "server" (another 5xx), "request" (another 4xx: the request itself was refused), "timeout" (no
    answer in time), "connection" (the endpoint could not be reached), "reply" (an answer that could
    not be read). `status`: the HTTP status, when there was one; `retry_after`: the seconds the API
    asked to wait; `endpoint`: where the call went."""

    def __init__(self, message: str, kind: str = "server", endpoint: str = "", status: int | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.endpoint = endpoint
        self.status = status
        self.retry_after = retry_after

    @staticmethod
    def kind_of(status: int) -> str:
        """The kind of error an HTTP status means."""
        if status == 429:
            return "quota"
        if status == 529:
            return "overloaded"
        return "server" if status >= 500 else "request"


@dataclass
class WebhookRequest:
    """A POST to an automation's webhook, as a trigger's ``handle(ctx, request)`` receives it."""

    headers: dict[str, str]  # names in lower case
    body: bytes  # the raw body, as signed


@dataclass
class WebhookResponse:
    """What a trigger's ``handle`` answers: the HTTP status and a JSON body."""

    status: int
    body: dict[str, Any]
