"""Built-in verifier `command`: a shell command run in the verification sandbox.

For other commands exit code 0 means pass. For pytest the exit code is not trusted alone: at the
base commit Loopwright records which tests exist (the inventory), and every run of the check writes
a JUnit report to a path of Loopwright's choosing outside the tree. A pass needs the report, an
exit code that agrees with it, every baseline test run and passed, and no more tests skipped.

A check's score is its failing-test count (pytest), or the figure its `metric` reads from the
output (a loop that optimises a number); the engine's stall and keep rules compare scores.
"""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loopwright.runtime.context import first_line, truncate
from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.types import CheckResult, ExecResult, Failure, VerifyContext

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


@dataclass
class Report:
    """A JUnit report, read: every test's status, and each failed test's first error line."""

    tests: dict[str, str]  # test id -> passed | failed | skipped
    errors: dict[str, str]


def parse_junit(xml: str) -> Report | None:
    """The tests of a JUnit report; None when it is not one."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    if root.tag not in ("testsuites", "testsuite"):
        return None
    report = Report({}, {})
    for case in root.iter("testcase"):
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        if problem is not None and problem.get("message") == "collection failure":
            test = f"collect::{case.get('name')}"  # a module that did not import
        else:
            test = f"{case.get('classname')}::{case.get('name')}"
        if problem is not None:
            report.tests[test] = "failed"
            message = problem.get("message") or ""
            if message in ("", "collection failure"):  # the traceback's last line says what went wrong
                message = next((line for line in reversed((problem.text or "").splitlines()) if line.strip()), message)
            report.errors[test] = first_line(message.removeprefix("E").strip(), 200)
        else:
            report.tests[test] = "skipped" if case.find("skipped") is not None else "passed"
    return report


def missing_tests(tests: dict[str, str], baseline: dict[str, str]) -> list[str]:
    """Tests of the base commit that did not run and pass (one skipped there may be skipped still)."""
    return sorted(test for test, status in baseline.items()
                  if not test.startswith("collect::") and tests.get(test) not in
                  (("passed", "skipped") if status == "skipped" else ("passed",)))


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
    missing = [test for test in missing_tests(tests, baseline) if tests.get(test) != "failed"]  # failed: said already
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
        self.spec = check
        self.pytest = bool(_PYTEST.search(check.run or ""))

    def _run(self, ctx: VerifyContext) -> tuple[ExecResult, Report | None]:
        timeout = self.spec.timeout_s or ctx.run.spec.sandbox.tool_timeout_s
        command = self.spec.run or ""
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
        _, report = self._run(ctx)
        return {"tests": report.tests if report else None}

    def verify(self, ctx: VerifyContext) -> CheckResult:
        result, report = self._run(ctx)
        tests = report.tests if report else None
        output = (result.stdout + ("\n" + result.stderr if result.stderr else "")).strip()
        baseline = (ctx.baseline or {}).get("tests")
        problems = inventory_problems(result.exit_code, tests, baseline) if self.pytest else []
        summary = headline(result, tests)
        failures = []
        if report is not None:
            failures = [Failure(test, report.errors.get(test, "")) for test, status in report.tests.items()
                        if status == "failed"]  # in the order they ran
            failures += [Failure(test, "a test of the base commit that did not run" if test not in report.tests
                                 else "a test of the base commit, skipped now")
                         for test in missing_tests(report.tests, baseline or {}) if report.tests.get(test) != "failed"]
        score = float(len(failures)) if report is not None else None
        metric, figure = self.spec.metric, None
        if metric is not None:
            figure = score = metric.read(output)
            if figure is None:
                problems.append(f"the output has no figure matching the metric's pattern {metric.pattern!r}")
            else:
                summary = f"metric {figure:g}" + (f" (target {metric.target:g})" if metric.target is not None else "") \
                    + (f"; {summary}" if tests else "")
        clean_exit = result.exit_code == 0 and not result.timed_out
        if clean_exit and not problems and (metric is None or metric.met(figure or 0.0)):
            return CheckResult(self.spec.label, True, headline=summary, score=score,
                               better=metric.better if metric else "lower")
        if result.timed_out:
            why = f"timed out after {self.spec.timeout_s or ctx.run.spec.sandbox.tool_timeout_s:g}s"
        elif not clean_exit or metric is None or figure is None:
            why = f"exit code {result.exit_code}"
        elif metric.target is None:
            why = f"the metric is {figure:g}, {metric.better} is better; no target, so the loop goes on improving it"
        else:
            why = f"the metric is {figure:g}, the target {metric.target:g} ({metric.better} is better)"
        said = "".join(f"\n- {problem}" for problem in problems)
        feedback = f"`{self.spec.run}` did not pass ({why}){said}\n{truncate(output, FEEDBACK_LIMIT)}"
        if figure is not None:  # the same figure is the same result, whatever else the output says
            signature = failure_signature(result.exit_code, f"metric {figure!r}" + said)
        elif failures or problems:  # the same tests failing is the same failure, whatever the output says
            signature = failure_signature(1, "\n".join(f.id for f in failures) + said)
        else:
            signature = failure_signature(result.exit_code, output)
        return CheckResult(self.spec.label, False, feedback, signature, headline=summary, failures=failures,
                           score=score, better=metric.better if metric else "lower")


@hookimpl(trylast=True)
def loopwright_register_verifiers(register):
    register("command", CommandVerifier)
