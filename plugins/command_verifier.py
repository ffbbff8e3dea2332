"""Built-in verifier `command`: a shell command run in the sandbox; exit code 0 means pass."""

from __future__ import annotations

import hashlib
import re

from runtime.context import truncate
from runtime.hookspecs import hookimpl
from runtime.spec import VerifySpec
from runtime.types import CheckResult, VerifyContext

FEEDBACK_LIMIT = 8000
# Numbers, addresses and durations change between two runs of the same failure; they must not
# make a repeated failure look new to stall detection.
_NOISE = re.compile(r"0x[0-9a-f]+|\d+(\.\d+)?")


def failure_signature(exit_code: int, output: str) -> str:
    tail = "\n".join(output.strip().splitlines()[-30:])
    return hashlib.sha1(f"{exit_code}\n{_NOISE.sub('#', tail)}".encode()).hexdigest()[:12]


class CommandVerifier:
    def __init__(self, check: VerifySpec):
        self.check = check

    def verify(self, ctx: VerifyContext) -> CheckResult:
        timeout = self.check.timeout_s or ctx.run.spec.sandbox.tool_timeout_s
        result = ctx.sandbox.run(self.check.run or "", timeout=timeout)
        output = (result.stdout + ("\n" + result.stderr if result.stderr else "")).strip()
        if result.exit_code == 0 and not result.timed_out:
            return CheckResult(self.check.label, True)
        why = f"timed out after {timeout:g}s" if result.timed_out else f"exit code {result.exit_code}"
        feedback = f"`{self.check.run}` failed ({why}):\n{truncate(output, FEEDBACK_LIMIT)}"
        return CheckResult(self.check.label, False, feedback, failure_signature(result.exit_code, output))


@hookimpl(trylast=True)
def loopwright_register_verifiers(register):
    register("command", CommandVerifier)
