"""Built-in verifier `rubric`: a reviewer on its own model judges the diff against a rubric.

The reviewer gets the goal, the constraints, the rubric and the diff since the run began, and
nothing the maker said: it judges what the change does, not the maker's account of it. It has its
own conversation (one model call per check), may use a cheaper or a stronger model than the maker
(`model`, default claude-haiku-5-5), and must answer through the `submit_verdict` tool: each
criterion passed or not, with a reason. Its tokens count against the run's budget, and it makes no call that
would cross it.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import TYPE_CHECKING, Any

from loopwright.runtime.config import ConfigError
from loopwright.runtime.context import truncate
from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.types import CheckResult, Failure, ModelError, VerifyContext

if TYPE_CHECKING:
    from loopwright.runtime.spec import VerifySpec

DEFAULT_MODEL = "claude-haiku-5-5"
MAX_RETRIES = 4
MAX_TOKENS = 4096
DIFF_LIMIT = 150_000  # characters of diff the reviewer reads (head and tail)

SYSTEM = """You are a code reviewer in an automated loop. Another agent changed a git repository to \
reach a goal. You judge the change itself, the diff, against a rubric. You are not shown the other \
agent's explanation, on purpose: judge what the diff does, not what anyone says it does. Split the \
rubric into its criteria, decide each one from the diff alone, and give a short, concrete reason for \
each (name the file and what is wrong, so the author can fix it). A criterion the diff does not \
clearly meet fails. Answer only by calling submit_verdict."""

VERDICT_TOOL = {
    "name": "submit_verdict",
    "description": "Submit the review: one entry per criterion of the rubric, and whether the change passes.",
    "input_schema": {
        "type": "object",
        "properties": {
            "criteria": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "criterion": {"type": "string", "description": "the criterion, in a few words"},
                        "passed": {"type": "boolean"},
                        "reason": {"type": "string", "description": "why, citing the diff"},
                    },
                    "required": ["criterion", "passed", "reason"],
                },
            },
            "passed": {"type": "boolean", "description": "true only if every criterion passed"},
        },
        "required": ["criteria", "passed"],
    },
}


def review_prompt(ctx: VerifyContext, rubric: str, diff: str) -> str:
    spec = ctx.run.spec
    parts = [f"# Goal\n{spec.goal}"]
    if spec.constraints:
        parts.append("# Constraints\n" + "\n".join(f"- {c}" for c in spec.constraints))
    parts.append(f"# Rubric\n{rubric}")
    shown = truncate(diff, DIFF_LIMIT) if diff.strip() else "(no changes)"
    parts.append(f"# The change (git diff since the run began)\n```diff\n{shown}\n```")
    return "\n\n".join(parts)


def _verdict_input(message: Any) -> dict[str, Any]:
    for block in message.content:
        if block.type == "tool_use" and block.name == VERDICT_TOOL["name"] and isinstance(block.input, dict):
            criteria = block.input.get("criteria")
            if isinstance(criteria, list) and all(isinstance(c, dict) for c in criteria):
                return block.input
    raise RuntimeError(
        f"the rubric reviewer ({message.model}) answered without a valid submit_verdict call "
        f"(stop reason {message.stop_reason}); try another reviewer model"
    )


def check_result(label: str, model: str, verdict: dict[str, Any]) -> CheckResult:
    criteria = [
        (str(c.get("criterion", "")).strip() or "(unnamed)", c.get("passed") is True, str(c.get("reason", "")).strip())
        for c in verdict["criteria"]
    ]
    failed = [(name, reason) for name, passed, reason in criteria if not passed]
    if not failed and verdict.get("passed") is not False:
        return CheckResult(label, True, headline=f"{len(criteria)} of {len(criteria)} criteria met", score=0.0)
    if not failed:
        failed = [("overall", "the reviewer rejected the change without naming a failed criterion")]
    lines = [f"The reviewer ({model}) found {len(failed)} of {max(len(criteria), 1)} rubric criteria not met: "
             + "; ".join(name for name, _ in failed)]
    lines += [f"- {name}: {reason or 'no reason given'}" for name, reason in failed]
    passed = [name for name, ok, _ in criteria if ok]
    if passed:
        lines.append("Met: " + "; ".join(passed))
    signature = hashlib.sha1("\n".join(sorted(name.lower() for name, _ in failed)).encode()).hexdigest()[:12]
    return CheckResult(label, False, "\n".join(lines), signature,
                       headline=f"{len(failed)} of {max(len(criteria), 1)} criteria not met",
                       failures=[Failure(name, reason) for name, reason in failed], score=float(len(failed)))


class RubricReviewer:
    def __init__(self, spec: VerifySpec):
        self.spec = spec
        self.model = spec.model or DEFAULT_MODEL

    def check(self) -> None:
        """Where the run executes (before it starts there, and before each review): is there a key?"""
        if not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN")):
            raise ConfigError(
                "the rubric reviewer needs ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN) in the environment; "
                "set ANTHROPIC_BASE_URL too to use another Anthropic-compatible endpoint"
            )

    def verify(self, ctx: VerifyContext) -> CheckResult:
        import anthropic  # here, not at start-up: the SDK takes a while to import

        self.check()
        request = {
            "model": self.model,
            "max_tokens": MAX_TOKENS,
            "system": SYSTEM,
            "tools": [VERDICT_TOOL],
            "tool_choice": {"type": "tool", "name": VERDICT_TOOL["name"]},
            "messages": [{"role": "user", "content": review_prompt(ctx, self.spec.rubric or "", ctx.diff())}],
        }
        ctx.check_budget(self.model, request)  # raises BudgetSpent rather than cross max_cost_usd
        timeout = ctx.call_timeout()
        with anthropic.Anthropic(max_retries=MAX_RETRIES, timeout=timeout) as client:
            started, endpoint = time.monotonic(), str(client.base_url)
            try:
                message = client.messages.create(**request)
            except anthropic.APITimeoutError:
                raise ModelError(f"the rubric reviewer's model API at {endpoint} did not answer within {timeout:.0f}s",
                                 "timeout", endpoint) from None
            except anthropic.APIStatusError as error:
                raise ModelError(
                    f"the rubric reviewer's model API at {endpoint} answered {error.status_code} after {MAX_RETRIES} "
                    f"retries: {error.message}", ModelError.kind_of(error.status_code), endpoint, error.status_code,
                ) from None
            except anthropic.APIConnectionError as error:
                raise ModelError(f"the rubric reviewer cannot reach the model API at {endpoint}: {error}",
                                 "connection", endpoint) from None
        ctx.record_model_call(self.model, message.usage.model_dump(exclude_none=True), (time.monotonic() - started) * 1000)
        return check_result(self.spec.label, self.model, _verdict_input(message))


@hookimpl(trylast=True)
def loopwright_register_verifiers(register):
    register("rubric", RubricReviewer)
