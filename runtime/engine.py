"""The loop as a durable DBOS workflow: iterations of maker turns and verification, and stop rules.

Every check and engine action is a DBOS step, and every model and tool call a durable step whose record
is its trace event (traced before it is made, settled after: `Turn._model_step`, `Turn._tool_step`), so a
run whose process dies continues, in a new process, from its last finished step. The sandbox is not a step: a resumed run gets a new
container on the same worktree, which holds every change the finished steps made.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import threading
import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import anyio
from dbos import DBOS

from . import context, replay, verification
from .budget import Budget
from .progress import Progress
from . import worktree as worktrees
from .spec import LoopSpec
from .types import (
    STALL_TOOL, BudgetSpent, CheckResult, ModelError, Outcome, RunInfo, Sandbox, Tool, ToolCall, ToolContext, ToolResult, Verdict, VerifyContext,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from .records import Run, RunState
    from .service import Runtime

_runtime: Runtime | None = None
CONTROL_TOPIC = "control"  # messages to a run: stop, resume, approval decisions
PAUSE_LIMIT_S = 7 * 24 * 3600
MODEL_CALL_LIMIT_S = 600.0  # one model call, its retries included, when the run's wall time leaves more
GRACE_S = 5.0  # past its limit, a call the maker did not cut itself is cut by the engine


def bind_runtime(runtime: Runtime) -> None:
    """Workflows find the process's runtime here (DBOS calls them with the run id only)."""
    global _runtime
    _runtime = runtime


class StopRun(BaseException):
    """A stop rule fired (a person, the wall clock, the budget). A BaseException, so a plugin's
    ``except Exception`` around ``turn.model(...)`` or ``turn.tool(...)`` cannot swallow it."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def step(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """A durable step: its result is recorded, and replayed instead of re-run after a crash."""
    if inspect.iscoroutinefunction(fn):
        return await DBOS.run_step_async({"name": name}, fn, *args)
    return await DBOS.run_step_async({"name": name}, anyio.to_thread.run_sync, fn, *args)


@DBOS.workflow(name="loopwright.run")  # service.WORKFLOW
async def run_workflow(run_id: str) -> dict[str, Any]:
    assert _runtime is not None, "bind_runtime() must be called before DBOS.launch()"
    from .improve import IMPROVE_EVENT, ImproveRun  # a run that improves another loop (runtime/improve.py)

    kind = ImproveRun if _runtime.store.event(run_id, IMPROVE_EVENT) else LoopRun
    outcome = await kind(_runtime, run_id).execute()
    return asdict(outcome)


class LoopRun:
    maker_role = "maker"  # how the trace and the spend name the calls of the agent that takes the turns

    def __init__(self, runtime: Runtime, run_id: str):
        self.rt = runtime
        self.store = runtime.store
        self.row = self.store.get_run(run_id)
        self.spec = LoopSpec.model_validate(self.row.spec)
        self.id = run_id
        self.sandbox: Sandbox | None = None
        self.tools: dict[str, Tool] = {}
        self.system_sections: list[str] = []
        self.pins: dict[str, str] = {}  # the oracle's files at the base commit: path -> blob sha
        self.baselines: dict[str, str] = {}  # check index -> file holding its verifier's baseline
        self.budget = Budget()  # what the next model call will cost (runtime/budget.py)
        self._sending: dict[str, tuple[dict[str, Any], str, float]] = {}  # a check's model calls begun (request, key, estimate)
        self.begun_steps = self.store.step_keys(run_id)  # maker steps an earlier execution began (see Turn.model)
        replaying = self.store.event(run_id, "replay")
        self.replay: dict[str, Any] | None = replaying["data"] if replaying else None  # runtime/replay.py
        self.info = RunInfo(run_id, self.spec.name, self.spec, self.row.branch, Path(self.row.worktree or "."))

    async def execute(self) -> Outcome:
        # Runs on every (re)execution, so the trace and `status` name the process that owns the run now (a
        # finished run resumed for its last steps, the run-finished hooks, keeps its outcome).
        self.store.update_run(self.id, owner=self.rt.owner, **({} if self.row.finished else {"status": "running"}))
        async with AsyncExitStack() as stack:  # what plugins open for this run closes with it
            try:
                ws = await step("prepare_worktree", self._prepare_worktree)
                self.info.worktree = Path(ws["path"])
                provider = self.rt.host.sandbox(self.spec.sandbox.kind)
                self.sandbox = await anyio.to_thread.run_sync(
                    lambda: provider.start(run_id=self.id, worktree=self.info.worktree, spec=self.spec)
                )
                stack.push_async_callback(anyio.to_thread.run_sync, self.sandbox.close)
                await self.rt.host.run_started(self.info)
                for tool in [*self.rt.host.tools(), *await self.rt.host.run_tools(self.info, self.sandbox, stack)]:
                    self.tools.setdefault(tool.name, tool)
                # A step, so a resumed run sends the same stable prefix (and reads it from the cache).
                self.system_sections = await step("system_prompt", self.rt.host.system_prompt, self.info)
                self.pins = await step("oracle_pins", self._oracle_pins)
                self.baselines = await step("baseline", self._baseline)
                outcome = await self._iterate()
            except StopRun as stop:
                outcome = Outcome(stop.status, stop.reason, self.info.iteration)
            except BaseExceptionGroup as group:  # a maker's task group re-raises a stop inside a group
                stops = group.subgroup(StopRun)
                if stops is None:
                    if not isinstance(group, Exception):
                        raise
                    outcome = Outcome("error", f"{type(group).__name__}: {group}", self.info.iteration)
                else:
                    stop = stops.exceptions[0]
                    outcome = Outcome(stop.status, stop.reason, self.info.iteration)
            except ModelError as error:  # typed, so automations react to its kind (a quota pauses them)
                outcome = Outcome("error", str(error), self.info.iteration, error=error.kind)
                if error.kind == "timeout" and self.wall_time_left() <= 0:
                    outcome.status = "failed"
                    outcome.reason = f"max_wall_time: the limit is {self.spec.stop.max_wall_time}, and {error}"
            except Exception as error:  # a missing image, a plugin bug
                outcome = Outcome("error", f"{type(error).__name__}: {error}", self.info.iteration)
        if self.info.worktree != Path("."):
            outcome.commit = await step("commit", self._commit, outcome.status)
        await step("finish", self._finish, asdict(outcome))
        await step("run_finished_hooks", self.rt.host.run_finished, self.info, outcome)
        await step("automations_react", self._automations_react, outcome)
        return outcome

    # --- the loop --------------------------------------------------------------------------

    async def _iterate(self) -> Outcome:
        maker = self.rt.host.agent(self.spec.agent.kind)(self.spec.agent, self.rt.settings)
        memory: list[str] = []
        progress = Progress()
        limits = self.spec.stop
        stages = list(limits.on_stall)
        commits: dict[int, str] = {}  # iteration -> the commit of its tree
        stalled, note, restored = "", "", None
        for iteration in range(1, limits.max_iterations + 1):
            self.info.iteration = iteration
            self.store.update_run(self.id, iteration=iteration)
            opening = context.opening_message(memory, progress, self.id, self.spec.memory.working_chars,
                                              stalled=stalled, note=note, restored=restored)
            stalled, note, restored = "", "", None
            if self.spec.agent.candidates > 1:
                turn, checks = await self._candidates(iteration, opening)
            else:
                turn = Turn(self, iteration, opening)
                await self._take_turn(maker, turn, opening)
                checks = await self._checks("verify", iteration)
            verdict = await self._record_verdict(iteration, checks, turn.summary())
            progress.add(verdict)
            commits[iteration] = await step(f"commit:{iteration}", self._commit_iteration, iteration, verdict.to_dict())
            if verdict.passed:
                return Outcome("succeeded", f"all checks passed in iteration {iteration}", iteration)
            memory.append(context.memory_line(iteration, turn.summary(), progress))
            if self.spec.keep == "best" and progress.worse_than_best():
                assert progress.best is not None
                restored = progress.best.iteration
                await step(f"discard:{iteration}", self._discard_iteration, iteration, restored, commits[restored])
                memory[-1] += f"; set aside (worse than iteration {restored}), the workspace went back to that tree"
            self.store.update_run(self.id, stall_count=progress.streak)
            reason = progress.stall(limits.stall_after)
            if reason is None:
                continue
            stage = stages.pop(0) if stages else "stop"
            if stage == "stop":
                return Outcome("stalled", reason, iteration)
            if stage == "ask":
                note = await self.ask_at_stall(iteration, reason)
            self._event(f"{iteration}.stall", "stall", iteration, {"reason": reason, "stage": stage, "note": note})
            stalled = reason
            progress.restart()
        return Outcome(
            "failed", f"max_iterations: {limits.max_iterations} iterations without passing checks", limits.max_iterations
        )

    async def _take_turn(self, maker: Any, turn: Turn, opening: str) -> None:
        ended_by = await maker.take_turn(turn)
        self._event(f"{turn.prefix}.turn", "turn_end", turn.iteration,
                    {"ended_by": ended_by, "tool_calls": turn.tool_calls, "opening": opening}
                    | ({"candidate": turn.candidate} if turn.candidate else {}))

    async def _checks(self, name: str, iteration: int, *where: Any) -> list[CheckResult]:
        try:
            return [CheckResult(**c) for c in await step(name, self._verify_copy, iteration, *where)]
        except BudgetSpent as spent:  # a checker's model call would have crossed max_cost_usd
            raise StopRun("failed", spent.reason) from None

    async def _candidates(self, iteration: int, opening: str) -> tuple[Turn, list[CheckResult]]:
        """`[agent] candidates = N`: N makers take the iteration's turn side by side, each from the run's tree
        in a worktree and sandbox of its own, and each is verified; the best (passing first, then the most
        checks passed, then the lowest cost) becomes the run's tree. All their calls are in the trace and
        count against the budget; every candidate's worktree and sandbox is removed."""
        n = self.spec.agent.candidates
        paths = await step(f"candidates:{iteration}", self._candidate_worktrees, n)
        provider = self.rt.host.sandbox(self.spec.sandbox.kind)
        boxes: list[Sandbox] = []
        try:
            for k, path in enumerate(paths, 1):
                boxes.append(await anyio.to_thread.run_sync(
                    lambda k=k, path=path: provider.start(run_id=f"{self.id}-c{k}", worktree=Path(path), spec=self.spec)))
            turns = [Turn(self, iteration, opening + context.candidate_note(k, n), k, box, replace(self.info, worktree=Path(path)))
                     for k, (path, box) in enumerate(zip(paths, boxes), 1)]
            async with anyio.create_task_group() as group:
                for turn in turns:
                    maker = self.rt.host.agent(self.spec.agent.kind)(self.spec.agent, self.rt.settings)
                    group.start_soon(self._take_turn, maker, turn, opening)
            results = [await self._checks(f"verify:c{k}", iteration, path, f"{iteration}-c{k}", box)
                       for k, (path, box) in enumerate(zip(paths, boxes), 1)]
        finally:
            for box in boxes:
                await anyio.to_thread.run_sync(box.close)
        costs = await anyio.to_thread.run_sync(self._candidate_costs, iteration, n)
        best = max(range(n), key=lambda i: (all(c.passed for c in results[i]), sum(c.passed for c in results[i]), -costs[i]))
        await step(f"adopt:{iteration}", self._adopt, iteration, paths, best)
        self._event(f"{iteration}.candidates", "candidates", iteration, {"candidates": [
            {"candidate": k, "passed": all(c.passed for c in checks), "headline": Verdict(iteration, checks).headline,
             "cost_usd": round(costs[k - 1], 6), "chosen": k - 1 == best} for k, checks in enumerate(results, 1)]})
        return turns[best], results[best]

    def _candidate_worktrees(self, n: int) -> list[str]:
        wt = self._worktree()
        start = worktrees.head(wt)
        return [str(worktrees.create_worktree(wt.repo, self.rt.settings.worktrees, self.branch_loop(), f"{self.id}-c{k}",
                                              start=start).path) for k in range(1, n + 1)]

    def _candidate_costs(self, iteration: int, n: int) -> list[float]:
        events = self.store.all_events(self.id)
        return [sum(e["cost_usd"] for e in events if e["key"].startswith((f"{iteration}.c{k}.", f"{iteration}-c{k}.")))
                for k in range(1, n + 1)]

    def _adopt(self, iteration: int, paths: list[str], best: int) -> None:
        """The chosen candidate's tree becomes the run's; every candidate's worktree and branch go."""
        wt = self._worktree()
        chosen = replace(wt, path=Path(paths[best]), branch=f"{wt.branch}-c{best + 1}")
        commit = worktrees.commit_all(chosen, f"loopwright: candidate {best + 1} of iteration {iteration}", allow_empty=True)
        assert commit is not None
        worktrees.restore_tree(wt, commit)
        self._remove_candidates()

    def _remove_candidates(self) -> None:
        found = sorted(self.rt.settings.worktrees.glob(f"{self.id}-c*"))
        if not found:
            return
        wt = self._worktree()
        for path in found:
            worktrees.remove_worktree(wt.repo, path, branch=f"{wt.branch}-{path.name.rsplit('-', 1)[1]}")

    async def _record_verdict(self, iteration: int, checks: list[CheckResult], summary: str) -> Verdict:
        verdict = Verdict(iteration, checks)
        self.store.update_run(self.id, last_verdict=verdict.to_dict())
        self._event(f"{iteration}.verdict", "verdict", iteration, verdict.to_dict())
        await step("verdict_hooks", self.rt.host.verdict, self.info, iteration, verdict, summary)  # once per verdict
        return verdict

    # --- steps -------------------------------------------------------------------------------

    def _prepare_worktree(self) -> dict[str, str]:
        reserve = getattr(self.rt.host.sandbox(self.spec.sandbox.kind), "reserve", None)
        # A warm pool moves its ready sandbox's empty folder to where the worktree goes, and starts the next
        # run's; a process that executes this run only has none ready, and no next run to keep one for.
        if reserve is not None and not self.rt.one_run:
            reserve(run_id=self.id, worktree=self.rt.settings.worktrees / self.id, spec=self.spec)
        ws = self.spec.workspace
        start = worktrees.resolve_ref(Path(self.row.repo), ws.ref, ws.remote, ws.fetch) if ws.ref else None
        wt = worktrees.create_worktree(Path(self.row.repo), self.rt.settings.worktrees, self.branch_loop(), self.id,
                                       start=start)
        self.store.update_run(
            self.id, worktree=str(wt.path), base_commit=wt.base_commit, branch=wt.branch, started_at=time.time()
        )
        self._event("0.start", "run_started", 0, {
            "worktree": str(wt.path), "branch": wt.branch, "base_commit": wt.base_commit,
            "network": self.spec.sandbox.network, "image": self.spec.sandbox.image or "default",
        })
        return {"path": str(wt.path), "branch": wt.branch, "base_commit": wt.base_commit}

    def branch_loop(self) -> str:
        """The run's branch is loopwright/<this>/<run id>."""
        return self.spec.name

    def _worktree(self) -> worktrees.Worktree:
        row = self.store.get_run(self.id)
        return worktrees.Worktree(Path(row.repo), Path(row.worktree), row.branch, row.base_commit,
                                  self.spec.workspace.identity)

    # --- verification: a clean copy in a fresh sandbox (docs/verification.md) ------------------

    def _oracle(self, base: verification.Tree) -> verification.Oracle:
        patterns = [p for check in self.spec.verify for p in check.protect]
        runner = any(check.kind == "command" and check.protect_runner for check in self.spec.verify)
        return verification.Oracle.at_base(patterns, runner, base)

    def _oracle_pins(self) -> dict[str, str]:
        wt = self._worktree()
        return self._oracle(worktrees.tree_of(wt, wt.base_commit)).pins()

    def _check_folder(self, name: str) -> Path:
        """An empty folder for a clean copy; a warm pool puts its ready check sandbox's folder there."""
        folder = self.rt.settings.checks / f"{self.id}-{name}"
        shutil.rmtree(folder, ignore_errors=True)  # left by an attempt that crashed
        folder.parent.mkdir(parents=True, exist_ok=True)
        reserve = getattr(self.rt.host.sandbox(self.spec.sandbox.kind), "reserve", None)
        if reserve is not None:
            reserve(run_id=f"{self.id}-check-{name}", worktree=folder, spec=self.spec, verification=True)
        folder.mkdir(exist_ok=True)
        return folder

    def _check_sandbox(self, name: str, folder: Path) -> Sandbox:
        provider = self.rt.host.sandbox(self.spec.sandbox.kind)
        return provider.start(run_id=f"{self.id}-check-{name}", worktree=folder, spec=self.spec, verification=True)

    @staticmethod
    def _discard_check(box: Sandbox | None, folder: Path) -> None:
        """Remove a check's sandbox, then its copy, in the background: the verdict does not wait for it."""
        def discard() -> None:
            if box is not None:
                box.close()
            shutil.rmtree(folder, ignore_errors=True)
        threading.Thread(target=discard, name=f"loopwright-discard-{folder.name}").start()

    def _context(self, iteration: int, index: int, sandbox: Sandbox, changed: list[str],
                 diff: Callable[[], str], label: str | None = None) -> VerifyContext:
        baseline = self.baselines.get(str(index))
        calls = iter(range(1, 1_000_000))
        sent = self._sending  # model -> the request a checker is sending, its event's key and estimate
        data = {"role": "reviewer", "check": self.spec.verify[index].label}

        def key() -> str:
            return f"{label or iteration}.check.{index}.model" + (f".{n}" if (n := next(calls)) > 1 else "")

        def check_budget(model: str, request: dict[str, Any]) -> None:
            cost = self.budget.estimate(self.rt.settings.price(model), model, request)
            if reason := self.over_budget(self.store.get_run(self.id).spent_usd, cost, "check's model call"):
                raise BudgetSpent(reason)
            sent[model] = (request, self.begin_model_call(key(), iteration, model, "reviewer", cost), cost)

        def record(model: str, usage: dict[str, Any], ms: float) -> float:
            if model not in sent:  # a verifier that did not check the budget first
                return self._record_model_call(key(), iteration, model, usage, ms, data)
            request, begun, estimate = sent.pop(model)
            self.budget.sent(model, request, usage)
            return self._record_model_call(begun, iteration, model, usage, ms, data, estimated=estimate)

        return VerifyContext(self.info, sandbox, iteration, changed, diff, record,
                             json.loads(Path(baseline).read_text()) if baseline else None, check_budget,
                             self.call_timeout)

    def _baseline(self) -> dict[str, str]:
        """Run each verifier's `baseline` once on the base commit's tree (the test inventory); kept in files."""
        verifiers = {i: self.rt.host.verifier(c.kind)(c) for i, c in enumerate(self.spec.verify)}
        wanted = {i: v for i, v in verifiers.items() if hasattr(v, "baseline")}
        if not wanted:
            return {}
        self.baselines = {}
        wt = self._worktree()
        base = worktrees.tree_of(wt, wt.base_commit)
        folder = self._check_folder("base")
        box = None
        paths = {}
        try:
            verification.materialize(folder, base, worktrees.read_blobs(wt, (sha for _, sha in base.values())))
            box = self._check_sandbox("base", folder)
            for index, verifier in wanted.items():
                value = verifier.baseline(self._context(0, index, box, [], lambda: ""))
                if value is not None:
                    path = self.rt.settings.runs_dir / self.id / f"baseline-{index}.json"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(value))
                    paths[str(index)] = str(path)
        finally:
            self._discard_check(box, folder)
        return paths

    def _verify_copy(self, iteration: int, path: str | None = None, label: str | None = None,
                     maker_box: Sandbox | None = None) -> list[dict[str, Any]]:
        """The protected-files check, then every check of the spec, on a clean copy in a fresh sandbox; of the
        run's worktree, or of a candidate's (`path`, its checks traced under `label`, its maker's sandbox)."""
        wt = self._worktree()
        if path is not None:
            wt = replace(wt, path=Path(path), branch=f"{wt.branch}-{label}")
        label = label or str(iteration)
        pointer_tampered = worktrees.pointer_tampered(wt)
        base = worktrees.tree_of(wt, wt.base_commit)
        oracle = self._oracle(base)
        folder = self._check_folder(label)
        box = None
        try:
            skipped: list[str] = []
            tree = verification.copy_tree(wt.path, folder, skipped)
            changed = verification.changed(tree, base)
            blobs = worktrees.read_blobs(wt, [base[p][1] for p in changed if p in base] + list(self.pins.values()))
            tampered = oracle.tampered(tree, lambda p: verification.read(folder, p), lambda p: blobs[base[p][1]])
            verification.restore(folder, tampered, base, blobs)
            pinned = verification.scan(folder, lambda p: p in self.pins)
            drifted = sorted(p for p, sha in self.pins.items() if pinned.get(p, ("", ""))[1] != sha)
            results = [self._protect_result(pointer_tampered, tampered, drifted,
                                            skipped + self._left_outside(maker_box or self.sandbox))]
            box = self._check_sandbox(label, folder)
            for index, check in enumerate(self.spec.verify):
                ctx = self._context(iteration, index, box, changed,
                                    lambda: verification.unified_diff(changed, base, blobs, folder), label)
                results.append(self._run_check(ctx, index, check, label))
            during = oracle.tampered(verification.scan(folder, oracle.wants), lambda p: verification.read(folder, p),
                                     lambda p: blobs[base[p][1]])
            if during:
                feedback = ("The checks changed their own oracle while they ran: " + ", ".join(during)
                            + ". Code under test must not write test or runner files.")
                results.append(asdict(CheckResult("oracle unchanged by the checks", False, feedback, _digest(feedback))))
            return results
        finally:
            self._discard_check(box, folder)

    def _left_outside(self, sandbox: Sandbox | None) -> list[str]:
        """Files in the maker's sandbox, outside the tree, that would change how Python starts there."""
        if sandbox is None:
            return []
        found = sandbox.run("find /tmp -xdev \\( -name '*.pth' -o -name sitecustomize.py -o -name usercustomize.py "
                                 "\\) 2>/dev/null | head -20", timeout=30)
        return found.stdout.split()

    def _protect_result(self, pointer: bool, tampered: list[str], drifted: list[str], ignored: list[str]) -> dict[str, Any]:
        problems = []
        if pointer:
            problems.append("The worktree's .git file was changed; it was put back, and Loopwright's git never "
                            "reads it. Leave .git alone.")
        if tampered:
            problems.append("These files are the checks' oracle (protected) and must stay as they were: "
                            + ", ".join(tampered) + ". The checks ran on their base-commit version; restore them "
                            "in your tree and fix the code instead.")
        if drifted:
            problems.append("Pinned oracle files differ from the pins taken when the run started: " + ", ".join(drifted))
        feedback = " ".join(problems)
        signature = _digest(feedback) if problems else ""
        if ignored:  # harmless now, but worth telling: the maker may think they count
            feedback += (" The checks ran on a clean copy in a fresh sandbox, without these files of yours: "
                         + ", ".join(ignored[:10]) + (" ..." if len(ignored) > 10 else "") + ".")
        return asdict(CheckResult("protected files", not problems, feedback.strip(), signature))

    def _run_check(self, ctx: VerifyContext, index: int, check: Any, label: str | None = None) -> dict[str, Any]:
        verifier = self.rt.host.verifier(check.kind)(check)
        started = time.monotonic()
        try:
            result = verifier.verify(ctx)
        finally:  # a call the check began and never recorded failed: it cost nothing
            for model, (_, key, estimate) in self._sending.items():
                self.store.settle_event(self.id, key, {"model": model, "role": "reviewer", "error": "no answer recorded"},
                                        estimate, cost_usd=0.0)
            self._sending.clear()
        result.name = check.label
        result.duration_ms = (time.monotonic() - started) * 1000
        self._event(f"{label or ctx.iteration}.check.{index}", "check", ctx.iteration, asdict(result),
                    duration_ms=result.duration_ms)
        return asdict(result)

    def begin_model_call(self, key: str, iteration: int, model: str, role: str, estimate: float) -> str:
        """Trace a model call before it is sent, its estimated cost counted: if the process dies during the
        call, the trace and the spend still show it. Returns the event's key (a retry after a crash gets its own)."""
        return self.store.begin_event(self.id, key, "model_call", iteration, {
            "model": model, "role": role,
            "unfinished": "the process died during this call; its cost is the estimate made before it",
        }, cost_usd=estimate)

    def _record_model_call(self, key: str, iteration: int, model: str, usage: dict[str, Any], duration_ms: float,
                           data: dict[str, Any], cost: float | None = None, estimated: float | None = None) -> float:
        """Trace a model call with its tokens and cost (priced from the usage unless given); the cost counts
        against max_cost_usd. `data` names the call's role ("maker", "reviewer") and what else the trace keeps.
        `estimated`: the call was traced before it was sent (`begin_model_call`) at this cost, now replaced."""
        cost = self.rt.settings.cost(model, usage) if cost is None else cost
        numbers = dict(
            input_tokens=usage.get("input_tokens", 0), output_tokens=usage.get("output_tokens", 0),
            cache_write_tokens=usage.get("cache_creation_input_tokens") or 0,
            cache_read_tokens=usage.get("cache_read_input_tokens") or 0, cost_usd=cost, duration_ms=duration_ms,
        )
        if estimated is not None:
            self.store.settle_event(self.id, key, {"model": model, **data}, estimated, **numbers)
        else:
            self._event(key, "model_call", iteration, {"model": model, **data}, **numbers)
        return cost

    def _commit(self, status: str) -> str | None:
        """The outcome: the branch's last commit (its tree is the final one, changed or not)."""
        return worktrees.commit_all(self._worktree(), f"loopwright: {self.spec.name} run {self.id} ({status})",
                                    allow_empty=True)

    def _commit_iteration(self, iteration: int, verdict: dict[str, Any]) -> str | None:
        """Every iteration's tree is a commit on the run's branch, its verdict in the message."""
        checks = Verdict.from_dict(verdict)
        lines = [f"{c.name}: {'pass' if c.passed else 'FAIL'}" + (f" ({c.headline})" if c.headline else "")
                 for c in checks.checks]
        message = f"iteration {iteration}: {checks.headline}\n\n" + "\n".join(lines) + f"\n\nLoopwright run {self.id}"
        sha = worktrees.commit_all(self._worktree(), message, allow_empty=True)
        self._event(f"{iteration}.commit", "iteration_commit", iteration, {"commit": sha})
        return sha

    def _discard_iteration(self, iteration: int, best: int, best_commit: str) -> None:
        """keep = "best": set a worse iteration aside; the worktree goes back to the best iteration's tree."""
        wt = self._worktree()
        worktrees.restore_tree(wt, best_commit)
        sha = worktrees.commit_all(wt, f"iteration {iteration} set aside: back to the tree of iteration {best}\n\n"
                                       f"keep = \"best\": iteration {iteration} did worse than iteration {best}.",
                                   allow_empty=True)
        self._event(f"{iteration}.discard", "iteration_discarded", iteration,
                    {"best_iteration": best, "restored": best_commit, "commit": sha})

    def _automations_react(self, outcome: Outcome) -> None:
        """Chained loops (`after` triggers) start, and a quota error pauses the automation that started the run."""
        from .automations import Automations  # only here: the engine runs without automations otherwise

        try:
            Automations(self.rt).run_finished(self.info, outcome)
        except Exception:  # the run has ended either way; a chained run that could not start is logged
            log.exception("automations could not react to the end of run %s", self.id)

    def _finish(self, outcome: dict[str, Any]) -> None:
        for folder in self.rt.settings.checks.glob(f"{self.id}-*"):  # copies whose removal a crash cut short
            shutil.rmtree(folder, ignore_errors=True)
        self._remove_candidates()  # a run that ended among its candidates (`[agent] candidates`)
        self.store.update_run(
            self.id, status=outcome["status"], reason=outcome["reason"], commit_sha=outcome["commit"] or "",
            finished_at=time.time(),
        )
        self._event("end", "run_finished", outcome["iterations"], outcome)

    def _event(self, key: str, kind: str, iteration: int, data: dict[str, Any], **numbers: Any) -> None:
        self.store.add_event(self.id, key, kind, iteration, data, **numbers)

    def stop_reason(self, next_cost: float = 0.0, what: str = "model call", row: Run | RunState | None = None) -> tuple[str, str] | None:
        """The stop rules checked before each model call: a person, the wall clock, the budget (what the run
        spent, plus `next_cost`, the estimate of the call about to start: runtime/budget.py).
        A pause request answers ("paused", ...): the run waits, then checks again."""
        row = row or self.store.get_run(self.id)
        if row.stop_requested:
            return ("stopped", "stopped by a person")
        if row.pause_requested:
            return ("paused", "paused by a person")
        limits = self.spec.stop
        elapsed = time.time() - (row.started_at or row.created_at) - row.paused_s
        if elapsed >= limits.wall_time_s:
            return ("failed", f"max_wall_time: ran {elapsed:.0f}s, the limit is {limits.max_wall_time}")
        if reason := self.over_budget(row.spent_usd, next_cost, what):
            return ("failed", reason)
        return None

    def wall_time_left(self, row: Run | RunState | None = None) -> float:
        row = row or self.store.get_run(self.id)
        return self.spec.stop.wall_time_s - (time.time() - (row.started_at or row.created_at) - row.paused_s)

    def call_timeout(self) -> float:
        """Seconds a model call starting now may take: what is left of max_wall_time, at most MODEL_CALL_LIMIT_S."""
        return max(min(self.wall_time_left(), MODEL_CALL_LIMIT_S), 1.0)


    def over_budget(self, spent: float, next_cost: float, what: str) -> str | None:
        """Why a call estimated at `next_cost` may not start, or None when the budget allows it."""
        cap = self.spec.stop.max_cost_usd
        if spent >= cap:
            return f"max_cost_usd: spent ${spent:.4f} of ${cap:.2f}"
        if spent + next_cost > cap:
            return f"max_cost_usd: spent ${spent:.4f} of ${cap:.2f}, and the next {what} would cost about ${next_cost:.4f}"
        return None


    # --- waiting for a person ----------------------------------------------------------------------

    async def _wait_for_message(self, want: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        """Durably wait for a control message (it survives a restart); a stop message ends the run."""
        deadline = time.time() + timeout
        while True:
            message = await DBOS.recv_async(CONTROL_TOPIC, max(deadline - time.time(), 0.01))
            if message is None:
                return None
            if message.get("type") == "stop":
                raise StopRun("stopped", "stopped by a person")
            if want(message):
                return message

    async def pause(self) -> None:
        """Wait while paused; the time does not count against max_wall_time."""
        started = await step("pause", self._set_status, "paused", "paused by a person", "paused")
        await self._wait_for_message(lambda m: m.get("type") == "resume", PAUSE_LIMIT_S)
        await step("resume", self._resume_after, started, "resumed")

    async def _ask_person(self, approval_id: str, tool: str, input: dict[str, Any], rule: str,
                          timeout: float) -> dict[str, Any]:
        """Wait durably for a person's decision on an approval: allowed, denied or timed_out, with their note."""
        started = await step("approval_request", self._request_approval, approval_id, tool, input, rule, timeout)
        await self._wait_for_message(lambda m: m.get("type") == "approval" and m.get("id") == approval_id, timeout)
        return await step("approval_resolved", self._resolve_approval, approval_id, started)

    async def approve(self, key: str, call: ToolCall, rule: Any) -> ToolResult | None:
        """A gated call waits for a person; None means allowed, else what the maker reads."""
        decision = await self._ask_person(f"{self.id}.{key}", call.name, call.input, rule.describe(), rule.timeout_s)
        if decision["status"] == "allowed":
            return None
        if decision["status"] == "timed_out":
            return ToolResult(f"Not run: no person approved this call within {rule.timeout}. Try another way.", True)
        note = f" Their note: {decision['note']}" if decision["note"] else ""
        return ToolResult(f"Not run: a person denied this call.{note}", True)

    async def ask_at_stall(self, iteration: int, reason: str) -> str:
        """on_stall = "ask": a person allows the run to go on (their note is what the maker reads next) or
        denies it (the run ends `stalled`); no answer within ask_timeout ends it too."""
        decision = await self._ask_person(
            f"{self.id}.{iteration}.stall", STALL_TOOL, {"reason": reason, "iteration": iteration},
            'on_stall = "ask": allow to continue (the maker reads your note next), deny to stop the run',
            self.spec.stop.ask_timeout_s,
        )
        if decision["status"] == "allowed":
            return decision["note"] or "A person looked at the stall and lets the loop go on."
        if decision["status"] == "timed_out":
            raise StopRun("stalled", f"{reason}; no person answered within {self.spec.stop.ask_timeout}")
        raise StopRun("stalled", f"{reason}; a person stopped the run" + (f": {decision['note']}" if decision["note"] else ""))

    def _set_status(self, status: str, reason: str, event: str, **data: Any) -> float:
        self.store.update_run(self.id, status=status)
        self._event(f"{self.info.iteration}.{event}.{time.time():.6f}", event, self.info.iteration, {"reason": reason, **data})
        return time.time()

    def _resume_after(self, started: float, event: str, **data: Any) -> None:
        row = self.store.get_run(self.id)
        self.store.update_run(self.id, status="running", pause_requested=False,
                              paused_s=row.paused_s + (time.time() - started))
        self._event(f"{self.info.iteration}.{event}.{time.time():.6f}", event, self.info.iteration, data)

    def _request_approval(self, approval_id: str, tool: str, input: dict[str, Any], rule: str, timeout: float) -> float:
        self.store.add_approval(approval_id, self.id, self.info.iteration, tool, input, rule, timeout)
        return self._set_status("waiting_approval", rule, "approval_requested", approval=approval_id, tool=tool, input=input)

    def _resolve_approval(self, approval_id: str, started: float) -> dict[str, Any]:
        self.store.decide_approval(approval_id, "timed_out")  # a no-op when a person decided
        approval = self.store.get_approval(approval_id)
        assert approval is not None
        row = self.store.get_run(self.id)
        self.store.update_run(self.id, status="running", paused_s=row.paused_s + (time.time() - started))
        self._event(f"{approval_id}.resolved", "approval_resolved", self.info.iteration,
                    {"approval": approval_id, "status": approval["status"], "note": approval["note"]})
        return {"status": approval["status"], "note": approval["note"]}


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class Turn:
    """One iteration of the maker, as the maker plugin sees it: durable model and tool calls."""

    def __init__(self, run: LoopRun, iteration: int, opening: str, candidate: int = 0,
                 sandbox: Sandbox | None = None, info: RunInfo | None = None):
        self._run = run
        self.run = info or run.info  # the run's id, spec and worktree (a command maker writes its prompt there)
        self.sandbox = sandbox  # a candidate's own (`[agent] candidates`), else the run's
        self.candidate = candidate
        self.prefix = f"{iteration}.c{candidate}" if candidate else str(iteration)  # of its steps' keys
        self.iteration = iteration
        self.spec = run.spec
        self.system = context.system_blocks(run.spec, run.system_sections)
        self.tools = context.tool_schemas([tool.schema() for tool in run.tools.values()])
        self.opening = opening
        self.tool_calls = 0
        self._model_calls = 0
        self._call_timeout = MODEL_CALL_LIMIT_S
        self._tried: list[str] = []
        self._last_text = ""

    @property
    def tool_calls_left(self) -> int:
        return self.spec.agent.max_tool_calls - self.tool_calls

    @property
    def last_words(self) -> str:
        """The first line of what the maker said last."""
        return context.first_line(self._last_text, 200)

    def summary(self) -> str:
        """What the iteration did, in one short line: its tools by count, and the start of what it said last."""
        counts = Counter(self._tried)
        tried = ", ".join(name + (f" x{n}" if n > 1 else "") for name, n in counts.most_common(4)) or "no tool calls"
        said = f'; said "{context.first_line(self._last_text, 80)}"' if self._last_text else ""
        return f"{self.tool_calls} tool calls ({tried}){said}"

    def call_timeout(self) -> float:
        """Seconds the model call now starting may take, its retries included: what is left of the run's
        max_wall_time, at most MODEL_CALL_LIMIT_S. A maker passes it to its client."""
        return self._call_timeout

    async def check_stop_rules(self) -> None:
        """The stop rules a model call checks first, for makers that make none (a CLI agent): ends the
        run (StopRun) when one fires, waits while the run is paused. The agent's run is estimated at the
        largest cost an earlier run of it reported (see `report_usage`)."""
        estimate = self._run.budget.agent_estimate()
        while reason := await step("stop_rules", self._run.stop_reason, estimate, "run of the CLI agent"):
            status, why = reason
            if status != "paused":
                raise StopRun(status, why)
            await self._run.pause()

    async def report_usage(self, model: str, usage: dict[str, Any], cost_usd: float | None = None) -> float:
        """Count what a maker's own agent spent (a CLI agent's usage report) against the budget, traced as a
        model call of the maker; `cost_usd` when the agent priced it, else priced from `usage`. Returns the cost."""
        self._model_calls += 1
        key = f"{self.prefix}.model.{self._model_calls}"
        cost = await step(f"usage:{key}", self._run._record_model_call, key, self.iteration, model, usage, 0.0,
                          {"role": self._run.maker_role, "reported_by": "agent"}, cost_usd)
        self._run.budget.agent_ran(cost)
        return cost

    async def model(self, model: str, request: dict[str, Any], send: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Call the model through `send` as a durable step, after checking the stop rules."""
        self._model_calls += 1
        key = f"{self.prefix}.model.{self._model_calls}"
        while "stop" in (reply := await self._model_step(key, model, request, send)):
            status, reason = reply["stop"]
            if status != "paused":
                raise StopRun(status, reason)
            await self._run.pause()
        self._run.budget.sent(model, request, reply["usage"])
        self._last_text = " ".join(b.get("text", "") for b in reply["content"] if b.get("type") == "text") or self._last_text
        return reply

    async def _model_step(self, key: str, model: str, request: dict[str, Any], send: Callable) -> dict[str, Any]:
        """A durable step whose record is its trace event: an answer recorded under `key` (or a retry's
        `key#n`) is returned again, not asked for. A call that began and never answered (the process died
        during it, or it failed) stays in the trace, its estimate in the spend, and is made again."""
        price = self._run.rt.settings.price(model)  # fail before spending when the price is unknown
        estimate = 0.0 if self._run.replay is not None else self._run.budget.estimate(price, model, request)
        begun = await anyio.to_thread.run_sync(self._begin_model_call, key, model, estimate)
        if "key" not in begun:
            return begun  # the recorded answer, or the stop rule that fired
        key = begun["key"]
        started = time.monotonic()
        if self._run.replay is not None:  # the recorded answer instead of a model call: free
            reply = replay.answer(self._run.replay, key)
        else:
            try:  # a maker that ignores call_timeout() is cut a little later
                with anyio.fail_after(self._call_timeout + GRACE_S):
                    reply = await send(request)
            except BaseException as error:  # the call failed (it cost nothing) or was cancelled: settle it so
                self._run.store.settle_event(self._run.id, key,
                                             {"model": model, "role": self._run.maker_role, "error": str(error)},
                                             estimate, cost_usd=0.0, duration_ms=(time.monotonic() - started) * 1000)
                if isinstance(error, TimeoutError):
                    raise ModelError(f"the maker's call to {model} did not return within {self._call_timeout:.0f}s (the "
                                     "call's limit: the run's remaining wall time, at most 10 minutes)", "timeout") from None
                raise
        self._run._record_model_call(
            key, self.iteration, model, reply["usage"], (time.monotonic() - started) * 1000,
            {"role": self._run.maker_role, "stop_reason": reply.get("stop_reason"), "content": reply["content"],
             **({"replayed": True} if self._run.replay is not None else {})},
            estimated=None if self._run.replay is not None else estimate,
        )
        return reply

    def _begin_model_call(self, key: str, model: str, estimate: float) -> dict[str, Any]:
        """The start of a model call's step, in one worker thread: the answer recorded for it (a "reply"),
        the stop rule that fires (a "stop"), or the call traced with its estimate under its "key"."""
        run = self._run
        attempts, row = run.store.step_state(run.id, key if key in run.begun_steps else None)
        if attempts and "content" in attempts[-1]["data"]:
            return _recorded_reply(attempts[-1])
        if reason := run.stop_reason(estimate, row=row):
            return {"stop": list(reason)}
        self._call_timeout = max(min(run.wall_time_left(row), MODEL_CALL_LIMIT_S), 1.0)
        if run.replay is not None:
            return {"key": key}
        return {"key": run.begin_model_call(key, self.iteration, model, run.maker_role, estimate)}

    async def tool(self, call_id: str, name: str, arguments: dict[str, Any]) -> ToolResult:
        """Run one tool call as a durable step: policy hooks, the sandbox, the trace."""
        self.tool_calls += 1
        self._tried.append(name)
        key = f"{self.prefix}.tool.{self.tool_calls}"
        rule = self.spec.approval_rule(name, arguments) if isinstance(arguments, dict) else None
        if rule is not None:
            refused = await self._run.approve(key, ToolCall(call_id, name, arguments, self.iteration), rule)
            if refused is not None:
                return refused
        while "stop" in (result := await self._tool_step(key, call_id, name, arguments)):
            status, reason = result["stop"]
            if status != "paused":
                raise StopRun(status, reason)
            await self._run.pause()
        return ToolResult(result["content"], result["is_error"])

    async def _tool_step(self, key: str, call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """A durable step whose record is its trace event: a call recorded under `key` answers what it answered;
        a call that began and never finished (the process died while it ran) is not run again."""
        run = self._run
        if (answer := await anyio.to_thread.run_sync(self._begin_tool_call, key, call_id, name, arguments)) is not None:
            return answer  # what the call answered before, or a person's stop or pause
        call = ToolCall(call_id, name, arguments, self.iteration)
        started = time.monotonic()
        result = self._refused(call)  # no policy hook or tool sees a call that cannot run
        if result is None:
            decision = await run.rt.host.before_tool_call(run.info, call)
            if decision.action == "deny":
                result = ToolResult(f"This call was denied: {decision.reason}", is_error=True, details={"denied": True})
            else:
                result = await self._call_tool(call)
                await run.rt.host.after_tool_call(run.info, call, result)
        duration = (time.monotonic() - started) * 1000
        result.content = self._cap_output(key, result.content)
        run.store.settle_event(run.id, key, {"tool": name, "call_id": call_id, "input": arguments,
                                             "is_error": result.is_error, "output": result.content, **result.details},
                               duration_ms=duration)
        return {"content": result.content, "is_error": result.is_error}

    def _begin_tool_call(self, key: str, call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any] | None:
        """The start of a tool call's step, in one worker thread: what it answered before (or, interrupted by
        a crash, the maker told so), a person's stop or pause, or None: the call traced as begun, to be run."""
        run = self._run
        attempts, row = run.store.step_state(run.id, key if key in run.begun_steps else None)
        if attempts:
            data = attempts[-1]["data"]
            if "unfinished" in data:
                return self._interrupted(key, data)
            return {"content": data["output"], "is_error": data["is_error"]}
        if row.stop_requested:
            return {"stop": ["stopped", "stopped by a person"]}
        if row.pause_requested:
            return {"stop": ["paused", "paused by a person"]}
        begun = {"tool": name, "call_id": call_id, "input": arguments, "unfinished": "the process died during this call"}
        run.store.add_event(run.id, key, "tool_call", self.iteration, begun)
        return None

    def _interrupted(self, key: str, data: dict[str, Any]) -> dict[str, Any]:
        """A tool call that began before the process died is not run again: the maker is told."""
        content = ("Not run again: this call was interrupted (Loopwright's process died while it ran). Some of "
                   "its effects may be present in the workspace: check before you repeat it.")
        data = {k: v for k, v in data.items() if k != "unfinished"}
        self._run.store.settle_event(self._run.id, key, {**data, "interrupted": True, "is_error": True, "output": content})
        return {"content": content, "is_error": True}

    def _refused(self, call: ToolCall) -> ToolResult | None:
        """A call of a tool that does not exist, or with input that cannot be what the tool takes."""
        tools = self._run.tools
        tool = tools.get(call.name)
        if tool is None:
            return ToolResult(f"Unknown tool {call.name!r}. Available tools: {', '.join(sorted(tools))}.", is_error=True)
        if problem := _malformed(call.input, tool.input_schema):
            return ToolResult(f"Not run: the input for {call.name!r} is malformed: {problem}. Call it again with "
                              "a JSON object that matches its input schema.", is_error=True)
        return None

    async def _call_tool(self, call: ToolCall) -> ToolResult:
        tool = self._run.tools[call.name]
        sandbox = self.sandbox or self._run.sandbox
        assert sandbox is not None
        ctx = ToolContext(self.run, sandbox, self.spec.sandbox.tool_timeout_s, self._run.rt.settings.output_limit)
        try:
            if inspect.iscoroutinefunction(tool.handler):
                result = await tool.handler(ctx, call.input)
            else:
                result = await anyio.to_thread.run_sync(tool.handler, ctx, call.input)
        except Exception as error:  # a tool failing is information for the maker, not the end of the run
            return ToolResult(f"The tool {call.name!r} failed: {error}", is_error=True)
        return result if isinstance(result, ToolResult) else ToolResult(str(result))

    def _cap_output(self, key: str, content: str) -> str:
        """Long output: the model sees head and tail; the whole of it is kept in the run's folder."""
        limit = self._run.rt.settings.output_limit
        if len(content) <= limit:
            return content
        folder = self._run.rt.settings.runs_dir / self._run.id / "outputs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key}.txt"
        path.write_text(content, encoding="utf-8")
        return context.truncate(content, limit, note=f"; full output in {path}")


def _malformed(arguments: Any, schema: dict[str, Any]) -> str | None:
    """What is wrong with a tool call's input at first sight (not a JSON object, a required field missing)."""
    if not isinstance(arguments, dict):
        return f"expected a JSON object, got {type(arguments).__name__} {context.truncate(repr(arguments), 80)}"
    missing = [name for name in schema.get("required", []) if name not in arguments]
    return f"missing required field(s) {', '.join(missing)}" if missing else None


def _recorded_reply(event: dict[str, Any]) -> dict[str, Any]:
    """A model call's answer as its trace event recorded it, shaped as a maker's `send` returned it."""
    return {"content": event["data"]["content"], "stop_reason": event["data"].get("stop_reason"), "usage": {
        "input_tokens": event["input_tokens"], "output_tokens": event["output_tokens"],
        "cache_creation_input_tokens": event["cache_write_tokens"], "cache_read_input_tokens": event["cache_read_tokens"]}}
