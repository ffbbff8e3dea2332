"""What a run's verdicts say together: what changed since the last one, whether the run still
improves, and which iteration is the best so far (docs/loops.md, "Scores, stalls and the history").

Verdicts compare by rank: fewer failing checks first, then each check's score in the order of the
spec (a failing check without a score counts as worst). An iteration makes progress when its rank
beats the best so far, or ties it with a result not seen before in the run; a stall is
`stall_after` iterations without progress. The same failures with new output text are no progress,
and neither is going back and forth between two results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .types import CheckResult, Failure, Verdict

LIST_LIMIT = 15  # items of one kind the opening names; the rest are counted


def rank(verdict: Verdict) -> tuple[float, ...]:
    """Smaller is better."""
    return (float(len(verdict.failing)), *(_score(check) for check in verdict.checks))


def _score(check: CheckResult) -> float:
    if check.score is None or not math.isfinite(check.score):
        return 0.0 if check.passed else math.inf
    return check.score if check.better == "lower" else -check.score


@dataclass
class Change:
    """One check's result against the previous iteration's."""

    check: CheckResult
    previous: CheckResult | None
    fixed: list[Failure] = field(default_factory=list)
    still: list[Failure] = field(default_factory=list)
    new: list[Failure] = field(default_factory=list)
    regressions: list[tuple[Failure, int, int]] = field(default_factory=list)  # (failure, passed in, broken in)


class Progress:
    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []
        self.best: Verdict | None = None
        self.last_progress = 0  # the iteration that last made progress, or after which a stall stage restarted the count
        self._seen: set[str] = set()
        self._failing_since: dict[tuple[str, str], int] = {}  # (check, item) -> first iteration of its current failing run
        self._passed_in: dict[tuple[str, str], int] = {}  # (check, item) -> the last iteration it did not fail
        self._knew_items: dict[str, int] = {}  # check -> the last iteration it reported complete failures

    def add(self, verdict: Verdict) -> None:
        if self.best is None or rank(verdict) < rank(self.best):
            self.best = verdict
            self.last_progress = verdict.iteration
        elif rank(verdict) == rank(self.best) and verdict.signature not in self._seen:
            self.last_progress = verdict.iteration
        self._seen.add(verdict.signature)
        for check in verdict.checks:
            self._track(verdict.iteration, check)
        self.verdicts.append(verdict)

    def _track(self, iteration: int, check: CheckResult) -> None:
        if not check.knows_items:
            return
        failing = {f.id for f in check.failures}
        for key in [k for k in self._failing_since if k[0] == check.name and k[1] not in failing]:
            del self._failing_since[key]
            self._passed_in[key] = iteration
        for item in failing:
            key = (check.name, item)
            if key not in self._failing_since:
                self._failing_since[key] = iteration
                earlier = self._knew_items.get(check.name)  # it did not fail then, so it passed
                if earlier is not None and key not in self._passed_in:
                    self._passed_in[key] = earlier
        for key in [k for k in self._passed_in if k[0] == check.name and k[1] not in failing]:
            self._passed_in[key] = iteration
        self._knew_items[check.name] = iteration

    @property
    def streak(self) -> int:
        """Iterations in a row, ending with the latest, without progress (counting the one that made it)."""
        return self.verdicts[-1].iteration - self.last_progress + 1 if self.verdicts else 0

    def restart(self) -> None:
        """A stall stage let the run go on: count a new streak from the next iteration."""
        self.last_progress = self.verdicts[-1].iteration + 1

    def worse_than_best(self) -> bool:
        return self.best is not None and rank(self.verdicts[-1]) > rank(self.best)

    def stall(self, stall_after: int) -> str | None:
        """Why the run has stalled, or None while it still improves."""
        if self.streak < stall_after:
            return None
        latest = self.verdicts[-1]
        recent = self.verdicts[-self.streak:]
        failing = _failing_names(latest)
        if len({v.signature for v in recent}) == 1:
            return f"stall_after: the same failure {self.streak} iterations in a row ({failing})"
        if len(self.verdicts) >= 3 and latest.signature == self.verdicts[-3].signature != self.verdicts[-2].signature:
            other = _failing_names(self.verdicts[-2])
            return (f"stall_after: the loop goes back and forth between the same failures ({failing} / {other}) "
                    f"for {self.streak} iterations")
        assert self.best is not None
        return (f"stall_after: no better result for {self.streak} iterations (the best is iteration "
                f"{self.best.iteration}: {self.best.headline}); failing now: {failing}")

    def changes(self) -> list[Change]:
        """The latest verdict's checks against the iteration before."""
        latest = self.verdicts[-1]
        before = {c.name: c for c in self.verdicts[-2].checks} if len(self.verdicts) > 1 else {}
        changes = []
        for check in latest.checks:
            previous = before.get(check.name)
            change = Change(check, previous)
            if previous is not None and check.knows_items and previous.knows_items:
                was = {f.id for f in previous.failures}
                now = {f.id for f in check.failures}
                change.fixed = [f for f in previous.failures if f.id not in now]
                for failure in check.failures:
                    key = (check.name, failure.id)
                    if key in self._passed_in and self._passed_in[key] < self._failing_since[key]:
                        change.regressions.append((failure, self._passed_in[key], self._failing_since[key]))
                    elif failure.id in was:
                        change.still.append(failure)
                    else:
                        change.new.append(failure)
            changes.append(change)
        return changes

    def summary(self) -> str:
        """The change in a few words, for the working memory: "fixed 1, 1 regression (test_x)"."""
        parts = []
        for change in self.changes():
            if change.fixed:
                parts.append(f"fixed {len(change.fixed)}")
            if change.regressions:
                parts.append(f"{len(change.regressions)} regression(s) ({_ids(f for f, _, _ in change.regressions)})")
            if change.new:
                parts.append(f"{len(change.new)} new ({_ids(change.new)})")
        return ", ".join(parts)

    def account(self, change: Change, run_id: str) -> list[str]:
        """What changed in one check, for the opening (markdown lines)."""
        check, previous = change.check, change.previous
        head = f"## {check.name}: {'passed' if check.passed else 'FAILED'}" + (f" ({check.headline})" if check.headline else "")
        if previous is not None and previous.headline and previous.headline != check.headline:
            head += f", was {previous.headline}"
        lines = [head]
        best = next((c for c in self.best.checks if c.name == check.name), None) if self.best else None
        if check.score is not None and best is not None and best.score is not None:
            lines.append(f"- score {check.score:g} ({check.better} is better; the best so far is {best.score:g}, "
                         f"iteration {self.best.iteration})")
        for title, items in (("fixed", change.fixed), ("new failures", change.new), ("still failing", change.still)):
            if items:
                lines.append(f"- {title}: " + _items(items))
        for failure, passed_in, broken_in in change.regressions[:LIST_LIMIT]:
            lines.append(f"- regression: {_item(failure)}: passed in iteration {passed_in}, broken in iteration "
                         f"{broken_in} (`loopwright diff {run_id} {broken_in}` shows that change)")
        if previous is not None and not (check.knows_items and previous.knows_items) and previous.passed != check.passed:
            lines.append("- fixed since the iteration before" if check.passed else "- it passed in the iteration before")
        return lines


def _failing_names(verdict: Verdict) -> str:
    return "; ".join(c.name + (f": {_ids(c.failures)}" if c.failures else "") for c in verdict.failing) or "none"


def _ids(failures) -> str:
    failures = list(failures)
    return ", ".join(f.id for f in failures[:5]) + (f" and {len(failures) - 5} more" if len(failures) > 5 else "")


def _item(failure: Failure) -> str:
    return failure.id + (f" ({failure.error})" if failure.error else "")


def _items(failures: list[Failure]) -> str:
    shown = "; ".join(_item(f) for f in failures[:LIST_LIMIT])
    return shown + (f"; and {len(failures) - LIST_LIMIT} more" if len(failures) > LIST_LIMIT else "")
