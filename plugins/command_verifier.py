"""Built-in verifier `command`: a shell command run in the verification sandbox.

For other commands exit code 0 means pass. For pytest the exit code is not trusted alone: at the
base commit Loopwright records which tests exist (the inventory), and every run of the check writes
a JUnit report to a path of Loopwright's choosing outside the tree. A pass needs the report, an
exit code that agrees with it, every baseline test run and passed, and no more tests skipped.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ElementTree
from collections import Counter
from typing import TYPE_CHECKING, Any

from loopwright.runtime.context import truncate
from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.types import CheckResult, ExecResult, VerifyContext

if TYPE_CHECKING:
    from loopwright.runtime.spec import VerifySpec

FEEDBACK_LIMIT = 8000
REPORT = "/tmp/loopwright-report.xml"
REPORT_LIMIT = 2 << 20
# Numbers, addresses and durations change between two runs of the same failure; they must not
# make a repeated failure look new to stall detection.
_NOISE = re.compile(r"0x[0-9a-f]+|\d+(\.\d+)?")
_PYTEST = re.compile(r"(?<![\w.-])(py\.test|pytest)(?![\w-])")


def failure_signature(exit_code: int, output: str) -> str:
    tail = "\n".join(output.strip().splitlines()[-30:])
    return hashlib.sha1(f"{exit_code}\n{_NOISE.sub('#', tail)}".encode()).hexdigest()[:12]


def parse_junit(xml: str) -> dict[str, str] | None:
    """``test id -> passed | failed | skipped`` from a JUnit report; None when it is not one."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    if root.tag not in ("testsuites", "testsuite"):
        return None
    tests = {}
    for case in root.iter("testcase"):
        children = {child.tag for child in case}
        error = case.find("error")
        if error is not None and error.get("message") == "collection failure":
            tests[f"collect::{case.get('name')}"] = "failed"  # a module that did not import
            continue
        status = "failed" if children & {"failure", "error"} else "skipped" if "skipped" in children else "passed"
        tests[f"{case.get('classname')}::{case.get('name')}"] = status
    return tests


def inventory_problems(exit_code: int, tests: dict[str, str] | None, baseline: dict[str, str] | None) -> list[str]:
    """Why a pytest run with exit code 0 is still no pass; empty when it is one."""
    if tests is None:
        return ["pytest wrote no test report, so its exit code cannot be trusted (did the code under test end "
                "the process early?)"]
    failed = sorted(test for test, status in tests.items() if status == "failed")
    problems = []
    if exit_code == 0 and failed:
        problems.append(f"exit code 0, but the test report shows {len(failed)} failing: {', '.join(failed[:10])}")
    if baseline is None:
        return problems
    missing = sorted(test for test, status in baseline.items()
                     if not test.startswith("collect::") and tests.get(test) not in
                     (("passed", "skipped") if status == "skipped" else ("passed",)))
    if missing:
        problems.append(f"{len(missing)} test(s) of the base commit did not run and pass: {', '.join(missing[:10])}"
                        + (" ..." if len(missing) > 10 else ""))
    skipped_now = sum(status == "skipped" for status in tests.values())
    skipped_before = sum(status == "skipped" for status in baseline.values())
    if skipped_now > skipped_before:
        problems.append(f"{skipped_now} tests skipped or xfailed, {skipped_before} at the base commit")
    return problems


def headline(result: ExecResult, tests: dict[str, str] | None) -> str:
    """The result in a few words: the report's counts for pytest ("2 failed, 41 passed"), else how it ended."""
    if result.timed_out:
        return "timed out"
    if tests:
        counts = Counter(tests.values())
        return ", ".join(f"{counts[status]} {status}" for status in ("failed", "passed", "skipped") if counts[status])
    return f"exit code {result.exit_code}"


class CommandVerifier:
    def __init__(self, check: VerifySpec):
        self.check = check
        self.pytest = bool(_PYTEST.search(check.run or ""))

    def _run(self, ctx: VerifyContext) -> tuple[ExecResult, dict[str, str] | None]:
        timeout = self.check.timeout_s or ctx.run.spec.sandbox.tool_timeout_s
        command = self.check.run or ""
        if not self.pytest:
            return ctx.sandbox.run(command, timeout=timeout), None
        report = REPORT  # in the fresh /tmp of the verification sandbox, outside the tree
        result = ctx.sandbox.run(f'export PYTEST_ADDOPTS="$PYTEST_ADDOPTS --junitxml={report}"\n{command}',
                                 timeout=timeout)
        read = ctx.sandbox.run(f"head -c {REPORT_LIMIT} {report}", timeout=30)
        return result, parse_junit(read.stdout) if read.exit_code == 0 else None

    def baseline(self, ctx: VerifyContext) -> dict[str, Any] | None:
        """The inventory: which tests exist at the base commit, and how they did there."""
        if not self.pytest:
            return None
        _, tests = self._run(ctx)
        return {"tests": tests}

    def verify(self, ctx: VerifyContext) -> CheckResult:
        result, tests = self._run(ctx)
        output = (result.stdout + ("\n" + result.stderr if result.stderr else "")).strip()
        problems = inventory_problems(result.exit_code, tests, (ctx.baseline or {}).get("tests")) if self.pytest else []
        summary = headline(result, tests)
        if result.exit_code == 0 and not result.timed_out and not problems:
            return CheckResult(self.check.label, True, headline=summary)
        if result.timed_out:
            why = f"timed out after {self.check.timeout_s or ctx.run.spec.sandbox.tool_timeout_s:g}s"
        else:
            why = f"exit code {result.exit_code}"
        said = "".join(f"\n- {problem}" for problem in problems)
        feedback = f"`{self.check.run}` did not pass ({why}){said}\n{truncate(output, FEEDBACK_LIMIT)}"
        failed = sorted(test for test, status in (tests or {}).items() if status == "failed")
        if failed or problems:  # the same tests failing is the same failure, whatever the output says
            signature = failure_signature(1, "\n".join(failed) + said)
        else:
            signature = failure_signature(result.exit_code, output)
        return CheckResult(self.check.label, False, feedback, signature, headline=summary, failures=failed)


@hookimpl(trylast=True)
def loopwright_register_verifiers(register):
    register("command", CommandVerifier)
