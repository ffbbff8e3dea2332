"""`loopwright improve LOOP`: a loop whose maker, the improver, changes another loop's harness and whose
verdict is that loop's success rate and cost on an eval set (docs/improve.md).

The improvement is a run like any other: the engine executes it durably, the improver works in a
Docker sandbox on its own worktree (branch ``loopwright/improve/<loop>/<id>`` of the loop's
repository), its calls are traced and count against the budget, and stop requests and wall time hold.
What differs is the iteration: the improver proposes one change to the harness files; the change is
measured by running the loop on the eval set's cases (each case a run of its own, a child of the
improvement, judged by the loop's own checks); it is kept only when it does better beyond the noise
and the held-out cases, which the improver never sees, confirm it. A kept change is a commit on the
branch; a discarded one is set aside and the branch goes back to the best harness (keep or discard,
as autoresearch does). Every candidate, with its scores, cost and decision, is in the ledger.
"""

from __future__ import annotations

import math
import shutil
import tomllib
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from dbos import DBOS, SetWorkflowID
from pydantic import BaseModel, Field, ValidationError, model_validator

from . import context, verification
from . import worktree as worktrees
from .engine import LoopRun, StopRun, Turn, run_workflow, step
from .records import UnknownRun, new_run_id
from .spec import Duration, Float, Int, LoopSpec, SpecError, _problems, _Section, load_spec
from .types import Outcome

if TYPE_CHECKING:
    from .records import Run
    from .service import Runtime

IMPROVE_EVENT = "improve"  # the first event of an improvement's trace: what it improves, on which cases
EVAL_SUFFIX = ".eval.toml"  # loops/NAME.toml's eval set is loops/NAME.eval.toml
COST_MARGIN = 0.05  # a cheaper harness must be cheaper by more than this share (or the measured noise)
# What the improver may not change in the loop's spec: the judge, where and how the loop runs, what starts it.
FIXED = ("name", "goal", "workspace", "sandbox", "verify", "trigger", "approval", "mcp_servers", "http")
FIXED_AGENT = ("kind", "command", "prompt_file", "accept_unknown_cost")
DIGEST_LIMIT = 12_000  # the most characters of traces the improver's opening carries

IMPROVER_SYSTEM = """You are the improver: you make another loop better at its job. That loop gives a \
maker agent a goal and checks the result with verifiers; it was run on a set of cases, and you get the \
traces of the runs that failed or cost the most. Find the cause they share (a fact the maker lacked, a \
misleading instruction, a tool it misused, a stop rule that cut it short) and change the loop's harness \
to remove it: its spec file (constraints, [agent] system, model, max_tool_calls, skills, [stop], \
[memory], keep) or a skill (a folder holding a SKILL.md whose description says when to use it). \
Make one change per turn, the smallest that removes the cause, and say in your last message, in one \
line, what you changed and why. Your change is measured on the cases and on others you never see: it \
is kept only when the loop does better there, so write what holds in general, never answers to \
particular cases. You cannot change the checks, the goal, the sandbox or anything outside the harness."""


# --- the eval set -------------------------------------------------------------------------------


class ImproveSettings(_Section):
    model: str = "claude-sonnet-5-5"  # the improver's model
    max_cost_usd: Float = Field(5.0, gt=0)  # the whole improvement: the improver and every case run
    max_candidates: Int = Field(5, ge=1, le=100)  # changes proposed (the improvement's iterations)
    max_wall_time: Duration = "2h"
    repeats: Int = Field(1, ge=1, le=10)  # runs of each case per measurement: the spread is the noise
    batch: Int | None = Field(None, ge=1)  # learn cases a candidate runs first (default: half of them)
    max_tool_calls: Int = Field(40, ge=1, le=10_000)  # the improver's, per proposal


class Case(_Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    path: str = Field(min_length=1)  # a git repository (at `ref`, default its HEAD) or a folder; relative to the file
    ref: str | None = None
    goal: str | None = None  # the case's own goal; default: the loop's
    held_out: bool = False  # never shown to the improver; decides whether a change is kept


class EvalSet(_Section):
    improve: ImproveSettings = ImproveSettings()
    case: list[Case] = Field(min_length=2)

    @model_validator(mode="after")
    def _learn_and_held_out(self) -> EvalSet:
        names = [c.name for c in self.case]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"case name(s) {', '.join(twice)} used twice: give each [[case]] its own name")
        if not self.learn or not self.held_out:
            raise ValueError("an eval set needs cases to learn from and held-out cases (held_out = true): "
                             f"it has {len(self.learn)} and {len(self.held_out)}")
        return self

    @property
    def learn(self) -> list[Case]:
        return [c for c in self.case if not c.held_out]

    @property
    def held_out(self) -> list[Case]:
        return [c for c in self.case if c.held_out]

    @property
    def batch(self) -> int:
        return min(self.improve.batch or math.ceil(len(self.learn) / 2), len(self.learn))


def eval_file_of(spec_file: Path) -> Path:
    return spec_file.with_name(spec_file.name.removesuffix(".toml") + EVAL_SUFFIX)


def load_eval_set(path: Path) -> EvalSet:
    """Read and check an eval set; each case's path becomes absolute (relative to the file) and must exist."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(str(path), ["file not found: an eval set lists the cases to measure the loop on "
                                    "(docs/improve.md); give another with --eval"]) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise SpecError(str(path), [f"cannot read the eval set: {error}"]) from None
    try:
        evals = EvalSet.model_validate(data)
    except ValidationError as error:
        raise SpecError(str(path), _problems(error)) from None
    problems = []
    for case in evals.case:
        case.path = str((path.parent / case.path).resolve())
        folder = Path(case.path)
        if not folder.is_dir():
            problems.append(f"case {case.name}: {case.path} is not a folder or repository")
        elif case.ref and not (folder / ".git").exists():
            problems.append(f"case {case.name}: ref {case.ref!r} given, but {case.path} is not a git repository")
        elif (folder / ".git").exists():
            try:
                worktrees.resolve_ref(folder, case.ref or "HEAD")
            except worktrees.WorktreeError:
                problems.append(f"case {case.name}: {case.ref or 'HEAD'} is no commit of {case.path}")
    if problems:
        raise SpecError(str(path), problems)
    return evals


# --- starting an improvement ----------------------------------------------------------------------


def improve_name(loop: str) -> str:
    return f"{loop[:55]}.improve"


def eval_name(loop: str) -> str:
    return f"{loop[:58]}.eval"


def start_improvement(runtime: Runtime, spec_file: Path, eval_file: Path | None = None, *, here: bool = True) -> Run:
    """Check the loop and its eval set, then create the improvement and execute it: in this process, or
    (`here=False`) queued for the daemon or a worker, like any run."""
    from .service import RunError

    spec = load_spec(spec_file)
    evals = load_eval_set(eval_file or eval_file_of(spec_file))
    repo = Path(spec.workspace.repo)
    try:
        relative = spec_file.resolve().relative_to(repo)
    except ValueError:
        raise RunError(f"{spec_file} is not inside the loop's repository {repo}: the improvement changes it on a "
                       "branch of that repository, so it must be there") from None
    if not worktrees.has_file_at_head(repo, relative.as_posix()):
        raise RunError(f"commit {relative.as_posix()} first: the improvement's branch starts from the repository's HEAD")
    runtime.preflight(spec, here=here)  # the loop itself can run (its maker, checks and sandbox)
    settings = evals.improve
    improver = LoopSpec.model_validate({
        "name": improve_name(spec.name),
        "goal": f"Make the loop {spec.name!r} (its spec: {relative.as_posix()}) succeed on more of its cases, "
                "or on as many at a lower cost, by changing its harness.",
        "workspace": {"repo": str(repo)},
        "sandbox": {**spec.sandbox.model_dump(mode="json"), "network": "none"},
        "agent": {"kind": "anthropic", "model": settings.model, "max_tool_calls": settings.max_tool_calls,
                  "system": IMPROVER_SYSTEM},
        "verify": [{"kind": "eval", "name": f"{spec.name}'s success rate and cost on its eval set "
                                            "(learn cases, then held-out cases)"}],
        "stop": {"max_iterations": settings.max_candidates, "max_cost_usd": settings.max_cost_usd,
                 "max_wall_time": settings.max_wall_time},
        "memory": {"notes": False},
    })
    if here:  # a queued improvement is checked by the process that executes it (it may hold a key this one lacks)
        runtime.host.agent("anthropic")(improver.agent, runtime.settings).check()
    runtime.settings.price(settings.model)
    runtime.wait_launched()
    run_id = new_run_id()
    run = runtime.store.create_run(run_id, improver.name, improver.model_dump(mode="json"), str(repo),
                                   f"loopwright/improve/{spec.name}/{run_id}")
    runtime.store.add_event(run_id, IMPROVE_EVENT, IMPROVE_EVENT, 0, {
        "loop": spec.name, "spec_file": relative.as_posix(), "eval": evals.model_dump(mode="json"),
        "loop_spec": spec.model_dump(mode="json"),
    })
    runtime.execute(run_id, here=here)
    return run


# --- scores ---------------------------------------------------------------------------------------


def score(results: list[dict[str, Any]]) -> dict[str, Any]:
    """A measurement's figures: passed of all runs, the success rate, the mean cost of a run (as billed, and
    with every input token at the uncached price: what harnesses are compared on, since what the prompt
    cache held depends on which runs went before, not on the harness)."""
    passed = sum(r["status"] == "succeeded" for r in results)
    def mean(key: str) -> float:
        return round(sum(r[key] for r in results) / len(results), 6) if results else 0.0
    return {"passed": passed, "runs": len(results), "rate": passed / len(results) if results else 0.0,
            "cost_usd": mean("cost_usd"), "uncached_cost_usd": mean("uncached_cost_usd")}


def describe(figures: dict[str, Any] | None) -> str:
    """Passed of all runs and the mean cost of a run: billed, and uncached (the one compared)."""
    if not figures:
        return "-"
    return (f"{figures['passed']}/{figures['runs']} · ${figures['cost_usd']:.4f} a run, "
            f"${figures['uncached_cost_usd']:.4f} uncached")


def noise(results: list[dict[str, Any]], repeats: int) -> dict[str, float]:
    """The spread of the success rate and the mean cost between repeats of one measurement (0 with one)."""
    if repeats < 2:
        return {"rate": 0.0, "uncached_cost_usd": 0.0}
    rounds = [score([r for r in results if r["repeat"] == k]) for k in range(repeats)]
    return {key: max(r[key] for r in rounds) - min(r[key] for r in rounds) for key in ("rate", "uncached_cost_usd")}


def gain(new: dict[str, Any], old: dict[str, Any], margin: dict[str, float]) -> str | None:
    """How `new` beats `old` beyond the noise: "success rate", "cost" (as many succeed, cheaper), or None."""
    if new["rate"] > old["rate"] + margin["rate"]:
        return "success rate"
    cheaper_by = max(margin["uncached_cost_usd"], COST_MARGIN * old["uncached_cost_usd"])
    if new["rate"] >= old["rate"] and new["uncached_cost_usd"] < old["uncached_cost_usd"] - cheaper_by:
        return "cost"
    return None


def worse(new: dict[str, Any], old: dict[str, Any], margin: dict[str, float]) -> bool:
    return new["rate"] < old["rate"] - margin["rate"]


def of_cases(results: list[dict[str, Any]], names: set[str]) -> list[dict[str, Any]]:
    return [r for r in results if r["case"] in names]


# --- the run ----------------------------------------------------------------------------------------


class ImproveRun(LoopRun):
    """An improvement: the improver takes turns; each turn's change is measured on the eval set, kept or set aside."""

    maker_role = "improver"

    def __init__(self, runtime: Runtime, run_id: str):
        super().__init__(runtime, run_id)
        plan = self.store.event(run_id, IMPROVE_EVENT)["data"]
        self.loop: str = plan["loop"]
        self.spec_file: str = plan["spec_file"]
        self.evals = EvalSet.model_validate(plan["eval"])
        self.loop_spec: dict[str, Any] = plan["loop_spec"]

    # The engine's steps that an improvement does differently.

    def branch_loop(self) -> str:
        return f"improve/{self.loop}"

    def _oracle_pins(self) -> dict[str, str]:
        return {}  # the judge is the loop's checks on the cases, not files of this tree

    def _baseline(self) -> dict[str, str]:
        return {}

    def _commit(self, status: str) -> str | None:
        """The branch ends at the best harness: a change being measured when the run stopped is set aside."""
        best = self._best_commit()
        if worktrees.head(self._worktree()) != best:
            self._set_aside(best)
        return best

    async def _iterate(self) -> Outcome:
        evals, repeats = self.evals, self.evals.improve.repeats
        learn, held = {c.name for c in evals.learn}, {c.name for c in evals.held_out}
        self.case_repos = await step("case_repos", self._case_repos)
        base_commit = self.store.get_run(self.id).base_commit
        best = await self._measure("base", base_commit, evals.case)
        margin = noise(of_cases(best, learn), repeats)
        self._event("0.baseline", "eval_baseline", 0, {
            "commit": base_commit, "learn": score(of_cases(best, learn)), "held_out": score(of_cases(best, held)),
            "noise": margin, "results": best})
        maker = self.rt.host.agent(self.spec.agent.kind)(self.spec.agent, self.rt.settings)
        kept = 0
        for iteration in range(1, self.spec.stop.max_iterations + 1):
            if kept and score(best)["rate"] == 1.0:
                break  # a kept change made every case pass
            self.info.iteration = iteration
            self.store.update_run(self.id, iteration=iteration)
            opening = await step(f"opening:{iteration}", self._opening, of_cases(best, learn))
            turn = Turn(self, iteration, opening)
            await self._take_turn(maker, turn, opening)
            change = turn.last_words or turn.summary()
            proposed = await step(f"propose:{iteration}", self._propose, iteration, change)
            entry: dict[str, Any] = {"candidate": iteration, "change": change, **proposed}
            entry |= await self._judge(iteration, proposed, best, margin)
            spent = self.store.totals(self.id, iteration).cost_usd - self.store.totals(self.id, iteration - 1).cost_usd
            entry["cost_usd"] = round(spent, 6)
            if entry["decision"] == "kept":
                entry["commit"] = await step(f"keep:{iteration}", self._keep, iteration, entry)
                best, kept = entry["results"], kept + 1
            else:
                await step(f"set_aside:{iteration}", self._set_aside, self._best_commit())
            self._event(f"{iteration}.candidate", "candidate", iteration, entry)
        summary = self._summary()
        if kept:
            return Outcome("succeeded", f"kept {kept} change(s) on the branch: {summary}", self.info.iteration)
        return Outcome("failed", f"no change did better than the harness as it was: {summary}", self.info.iteration)

    async def _judge(self, iteration: int, proposed: dict[str, Any], best: list[dict[str, Any]],
                     margin: dict[str, float]) -> dict[str, Any]:
        """Measure a proposed change as the ratchet wants it: a small batch of learn cases first, then the
        rest, then the held-out cases; stop at the first that says no. Its decision, reason, figures, results."""
        evals = self.evals
        learn, held = {c.name for c in evals.learn}, {c.name for c in evals.held_out}
        first = {c.name for c in evals.learn[:evals.batch]}
        found: dict[str, Any] = {"decision": "discarded", "reason": proposed.get("problem", ""), "results": []}
        if found["reason"]:
            return found
        results = found["results"] = await self._measure(f"{iteration}b", proposed["commit"], evals.learn[:evals.batch])
        found["batch"], before = score(results), score(of_cases(best, first))
        if worse(found["batch"], before, margin):
            found["reason"] = f"worse on the first {len(first)} learn cases: {describe(found['batch'])} (was {describe(before)})"
            return found
        results += await self._measure(str(iteration), proposed["commit"], evals.learn[evals.batch:])
        found["learn"], before_learn = score(results), score(of_cases(best, learn))
        won = gain(found["learn"], before_learn, margin)
        if won is None:
            found["reason"] = f"no better on the learn cases: {describe(found['learn'])} (was {describe(before_learn)})"
            return found
        results += await self._measure(f"{iteration}h", proposed["commit"], evals.held_out)
        found["held_out"], before = score(of_cases(results, held)), score(of_cases(best, held))
        if gain(found["held_out"], before, margin) or found["held_out"]["rate"] == before["rate"] == 1.0:
            found["decision"] = "kept"
            found["reason"] = (f"better {won}: learn {describe(before_learn)} -> {describe(found['learn'])}; "
                               f"held-out {describe(before)} -> {describe(found['held_out'])}")
        else:
            found["reason"] = f"the held-out cases did not confirm it: {describe(found['held_out'])} (was {describe(before)})"
        return found

    def _summary(self) -> str:
        events = self.store.all_events(self.id)
        base = next(e["data"] for e in events if e["kind"] == "eval_baseline")
        kept = [e["data"] for e in events if e["kind"] == "candidate" and e["data"]["decision"] == "kept"]
        now = kept[-1] if kept else base
        return (f"learn {describe(base['learn'])} -> {describe(now['learn'])}, "
                f"held-out {describe(base['held_out'])} -> {describe(now['held_out'])}")

    # --- measuring: the loop's runs on the cases, children of this run ---------------------------

    async def _measure(self, label: str, commit: str, cases: list[Any]) -> list[dict[str, Any]]:
        """Run the loop, with the harness of `commit`, on each case (`repeats` times): a few at once, each a
        durable child run whose spend is added to this run's. Their results, in order."""
        if not cases:
            return []
        spec_file = await step(f"harness:{label}", self._export_harness, label, commit)
        wanted = [(case.name, k) for case in cases for k in range(self.evals.improve.repeats)]
        results = []
        width = max(1, self.rt.settings.max_parallel_runs)
        for start in range(0, len(wanted), width):
            if reason := self.stop_reason(what="case run"):
                raise StopRun(*reason)
            if self.spec.stop.max_cost_usd - self.store.get_run(self.id).spent_usd < 1e-6:
                raise StopRun("failed", f"max_cost_usd: the budget of ${self.spec.stop.max_cost_usd:.2f} is spent, "
                                        f"with candidate {label}'s measurement unfinished")
            chunk = wanted[start:start + width]
            ids = await step(f"cases:{label}:{start}", self._create_case_runs, label, spec_file, chunk)
            handles = []
            for run_id in ids:
                with SetWorkflowID(run_id):
                    handles.append(await DBOS.start_workflow_async(run_workflow, run_id))
            for handle in handles:
                await handle.get_result()
            results += await step(f"results:{label}:{start}", self._record_cases, label, ids, chunk)
            if cut := [r["case"] for r in results if r.get("cut")]:
                raise StopRun("failed", f"max_cost_usd: the improvement's budget of ${self.spec.stop.max_cost_usd:.4f} "
                                        f"ran out while measuring {_measured(label)} (case {', '.join(cut)} stopped at "
                                        "its share of what was left); nothing was decided on an incomplete measurement")
        return results

    def _export_harness(self, label: str, commit: str) -> str:
        """The harness files of `commit` in a folder of their own; the path of the loop's spec there."""
        wt = self._worktree()
        tree = worktrees.tree_of(wt, commit)
        spec_blob = worktrees.read_blobs(wt, [tree[self.spec_file][1]])[tree[self.spec_file][1]]
        prefixes = self._skill_folders(tomllib.loads(spec_blob.decode()))
        files = {p: e for p, e in tree.items() if p == self.spec_file or any(p.startswith(d + "/") for d in prefixes)}
        dest = self.rt.settings.runs_dir / self.id / f"harness-{label}"
        shutil.rmtree(dest, ignore_errors=True)
        verification.materialize(dest, files, worktrees.read_blobs(wt, (sha for _, sha in files.values())))
        return str(dest / self.spec_file)

    def _skill_folders(self, raw: dict[str, Any]) -> list[str]:
        """The skill folders a spec names, relative to the repository; those outside it, or the whole of
        it, are not harness the improver may change."""
        folder = PurePosixPath(self.spec_file).parent
        found = []
        for entry in (raw.get("agent") or {}).get("skills") or []:
            parts: list[str] = []
            for part in (folder / str(entry)).parts:
                if part == "..":
                    if not parts:
                        break
                    parts.pop()
                elif part not in (".", ""):
                    parts.append(part)
            else:
                if parts:
                    found.append("/".join(parts))
        return found

    def _case_repos(self) -> dict[str, str]:
        """Each case as a repository of this run's, its HEAD the case's start: a clone of a repository
        (at its `ref`), a folder committed as it is. The loop's runs leave their branches there."""
        repos = {}
        for case in self.evals.case:
            dest = self.rt.settings.runs_dir / self.id / "cases" / case.name
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            worktrees.snapshot(Path(case.path), dest, case.ref)
            repos[case.name] = str(dest)
        return repos

    def _create_case_runs(self, label: str, spec_file: str, chunk: list[tuple[str, int]]) -> list[str]:
        """The runs of one chunk, created once (again after a crash: the same ids). Each gets an equal share of
        what is left of the budget and of the wall time; the checks are the loop's own, never the candidate's."""
        row = self.store.get_run(self.id)
        left = self.spec.stop.max_cost_usd - row.spent_usd
        harness = load_spec(spec_file)
        cases = {c.name: c for c in self.evals.case}
        ids = []
        for name, k in chunk:
            run_id = f"{self.id}.{label}.{name}" + (f".{k + 1}" if self.evals.improve.repeats > 1 else "")
            ids.append(run_id)
            try:
                self.store.get_run(run_id)
                continue
            except UnknownRun:
                pass
            data = harness.model_dump(mode="json")
            data.update({key: self.loop_spec[key] for key in FIXED})
            data.update(name=eval_name(self.loop), trigger=[], workspace={"repo": self.case_repos[name]},
                        goal=cases[name].goal or self.loop_spec["goal"])
            data["memory"].update(notes=False, kv=False)  # a clean slate: no case learns from another
            stop, share = harness.stop, left / len(chunk)
            data["stop"].update(max_cost_usd=min(stop.max_cost_usd, share),
                                max_wall_time=max(1.0, min(stop.wall_time_s, self.wall_time_left(row))))
            spec = LoopSpec.model_validate(data)
            self.rt.preflight(spec)
            self.store.create_run(run_id, spec.name, spec.model_dump(mode="json"), spec.workspace.repo,
                                  f"loopwright/{spec.name}/{run_id}")
            self.store.add_event(run_id, "trigger", "triggered", 0, {
                "kind": "improve", "run": self.id, "candidate": label, "case": name, "repeat": k + 1,
                "budget_share": share < stop.max_cost_usd})  # capped by what is left of the improvement's budget
            self.store.update_run(run_id, owner=self.rt.owner)
        return ids

    def _record_cases(self, label: str, ids: list[str], chunk: list[tuple[str, int]]) -> list[dict[str, Any]]:
        held = {c.name for c in self.evals.held_out}
        results = []
        for run_id, (name, k) in zip(ids, chunk):
            run = self.store.get_run(run_id)
            uncached = sum(self.rt.settings.cost(e["data"]["model"], {
                "input_tokens": e["input_tokens"] + e["cache_write_tokens"] + e["cache_read_tokens"],
                "output_tokens": e["output_tokens"]}) for e in self.store.all_events(run_id) if e["kind"] == "model_call")
            result = {"case": name, "repeat": k, "held_out": name in held, "run": run_id, "status": run.status,
                      "reason": run.reason, "cost_usd": round(run.spent_usd, 6), "uncached_cost_usd": round(uncached, 6)}
            if run.reason.startswith("max_cost_usd") and self.store.event(run_id, "trigger")["data"]["budget_share"]:
                result["cut"] = True  # stopped by the improvement's budget, not the loop's: no measurement
            self._event(f"{label}.case.{name}.{k}", "eval_case", self.info.iteration, result, cost_usd=run.spent_usd)
            results.append(result)
        return results

    # --- the improver's turn and its change ----------------------------------------------------

    def _opening(self, learn: list[dict[str, Any]]) -> str:
        """What the improver reads: the learn cases' results, the traces of failed and costly runs, and
        the changes tried so far. Nothing of the held-out cases."""
        failed = [r for r in learn if r["status"] != "succeeded"]
        costly = sorted((r for r in learn if r["status"] == "succeeded"), key=lambda r: -r["cost_usd"])[:2]
        lines = [f"# The loop on its learn cases\n{describe(score(learn))}; "
                 f"{len(failed)} run(s) did not succeed."]
        repeated: dict[str, list[str]] = {}
        digests = []
        for result in failed + costly:
            digest, failure = self._digest(result)
            digests.append(digest)
            if failure:
                repeated.setdefault(failure, []).append(result["case"])
        shared = [f"- in {len(cases)} cases ({', '.join(cases)}): {failure}"
                  for failure, cases in sorted(repeated.items(), key=lambda item: -len(item[1])) if len(cases) > 1]
        if shared:
            lines.append("# Failures that repeat\n" + "\n".join(shared))
        lines.append("# Traces of failed and costly runs\n" + "\n\n".join(digests)[:DIGEST_LIMIT])
        tried = [e["data"] for e in self.store.all_events(self.id) if e["kind"] == "candidate"]
        if tried:
            lines.append("# Changes tried so far (the branch holds only the kept ones)\n" + "\n".join(
                f"- candidate {t['candidate']}, {t['decision']}: {t['change']} ({', '.join(t.get('files', [])) or 'no files'})"
                + (f" -- learn {describe(t.get('learn') or t.get('batch'))}" if t.get("learn") or t.get("batch") else "")
                for t in tried))
        lines.append(f"# Your turn\nChange one thing in the harness ({self.spec_file} or a skill folder it names) "
                     "and end with one line saying what you changed and why.")
        return "\n\n".join(lines)

    def _digest(self, result: dict[str, Any]) -> tuple[str, str]:
        """One case run's trace, short: how it ended, the checks' last word, what the maker did and said,
        where the money went. And its failure's headline, to find those that repeat."""
        events = self.store.all_events(result["run"])
        verdicts = [e["data"] for e in events if e["kind"] == "verdict"]
        failing = [c for c in (verdicts[-1]["checks"] if verdicts else []) if not c["passed"]]
        tools: dict[str, int] = {}
        said = ""
        for event in events:
            if event["kind"] == "tool_call":
                tools[event["data"]["tool"]] = tools.get(event["data"]["tool"], 0) + 1
            elif event["kind"] == "model_call" and event["data"].get("role") == "maker":
                texts = [b.get("text", "") for b in event["data"].get("content", []) if b.get("type") == "text"]
                said = " ".join(texts).strip() or said
        roles = ", ".join(f"{r.role} ${r.cost_usd:.4f}" for r in self.store.spend_by_role(result["run"]))
        lines = [f"## case {result['case']}: {result['status']} ({result['reason']}), ${result['cost_usd']:.4f}"
                 + (f" ({roles})" if roles else "")]
        for check in failing:
            lines.append(f"- check {check['name']}: {check.get('headline') or context.first_line(check['feedback'])}\n"
                         + "  " + check["feedback"][:600].replace("\n", "\n  "))
        lines.append("- the maker used: " + (", ".join(f"{t} x{n}" for t, n in tools.items()) or "no tools"))
        if said:
            lines.append(f"- the maker said last: {said[:300]}")
        failure = (failing[0].get("headline") or context.first_line(failing[0]["feedback"])) if failing else ""
        return "\n".join(lines), failure

    def _propose(self, iteration: int, summary: str) -> dict[str, Any]:
        """Commit the improver's change; say what is wrong with it if it leaves the harness or cannot run."""
        wt = self._worktree()
        before = worktrees.head(wt)
        commit = worktrees.commit_all(wt, f"candidate {iteration}: {summary}")
        if commit is None:
            return {"files": [], "problem": "no change: the improver changed no file"}
        tree = worktrees.tree_of(wt, commit)
        changed = verification.changed(tree, worktrees.tree_of(wt, before))
        proposed = {"commit": commit, "files": changed}
        if links := [p for p in changed if tree.get(p, ("",))[0] == "120000"]:
            return proposed | {"problem": f"symbolic links in the harness: {', '.join(links[:10])} (a harness is text)"}
        spec_path = wt.path / self.spec_file
        try:
            raw = tomllib.loads(spec_path.read_text(encoding="utf-8"))
            load_spec(spec_path)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, SpecError) as error:
            return proposed | {"problem": f"the loop's spec no longer loads: {error}"}
        at_base = worktrees.tree_of(wt, wt.base_commit)[self.spec_file][1]
        original = tomllib.loads(worktrees.read_blobs(wt, [at_base])[at_base].decode())
        touched = [k for k in FIXED if raw.get(k) != original.get(k)]
        touched += [f"agent.{k}" for k in FIXED_AGENT if (raw.get("agent") or {}).get(k) != (original.get("agent") or {}).get(k)]
        if touched:
            return proposed | {"problem": f"changes what the improver may not change: {', '.join(touched)} "
                                          "(the checks, the goal, the sandbox and what starts the loop are fixed)"}
        folders = self._skill_folders(raw)
        outside = [p for p in changed if p != self.spec_file and not any(p.startswith(d + "/") for d in folders)]
        if outside:
            return proposed | {"problem": f"changes files outside the harness: {', '.join(outside[:10])}"}
        return proposed

    def _keep(self, iteration: int, entry: dict[str, Any]) -> str:
        """The kept change becomes one commit on the branch, after the best harness, its scores in the message."""
        wt = self._worktree()
        best = self._best_commit()
        worktrees.move_branch(wt, best)
        sha = worktrees.commit_all(wt, f"improve {self.loop}: {entry['change']}\n\n{entry['reason']}\n\n"
                                       f"Files: {', '.join(entry['files'])}\nLoopwright improvement {self.id}, candidate {iteration}")
        assert sha is not None
        return sha

    def _set_aside(self, best: str) -> None:
        wt = self._worktree()
        worktrees.restore_tree(wt, best)
        worktrees.move_branch(wt, best)

    def _best_commit(self) -> str:
        kept = [e["data"]["commit"] for e in self.store.all_events(self.id)
                if e["kind"] == "candidate" and e["data"]["decision"] == "kept"]
        return kept[-1] if kept else self.store.get_run(self.id).base_commit


def _measured(label: str) -> str:
    """What a measurement's label (`base`, `3b`, `3`, `3h`) stands for, in words."""
    if label == "base":
        return "the harness as it was"
    what = {"b": "its first learn cases", "h": "the held-out cases"}.get(label[-1], "the other learn cases")
    return f"candidate {label.rstrip('bh')} on {what}"


# --- the ledger -------------------------------------------------------------------------------------


def ledger(store: Any, loop: str) -> list[dict[str, Any]]:
    """Every improvement of `loop`, newest first: its baseline and each candidate with its change, scores,
    per-case results, cost and whether it was kept."""
    found = []
    for run in store.list_runs(improve_name(loop), limit=1000):
        events = store.all_events(run.id)
        found.append({
            "run": run.id, "status": run.status, "reason": run.reason, "branch": run.branch,
            "spent_usd": round(run.spent_usd, 6), "max_cost_usd": run.spec["stop"]["max_cost_usd"],
            "baseline": next((e["data"] for e in events if e["kind"] == "eval_baseline"), None),
            "candidates": [e["data"] for e in events if e["kind"] == "candidate"],
        })
    return found


def ledger_lines(entries: list[dict[str, Any]]) -> list[str]:
    lines = []
    for entry in entries:
        lines.append(f"improvement {entry['run']} ({entry['status']}: {entry['reason']})")
        lines.append(f"  branch {entry['branch']} · spent ${entry['spent_usd']:.4f} of ${entry['max_cost_usd']:.2f}")
        lines.append(f"  {'#':>3}  {'decision':<10} {'learn':<14} {'held-out':<14} {'cost':>9}  change")
        base = entry["baseline"]
        if base:
            lines.append(f"  {'-':>3}  {'baseline':<10} {_short(base['learn']):<14} {_short(base['held_out']):<14} "
                         f"{'':>9}  the harness as it was")
        for c in entry["candidates"]:
            learn = _short(c.get("learn")) if c.get("learn") else (f"{_short(c['batch'])} first" if c.get("batch") else "-")
            lines.append(f"  {c['candidate']:>3}  {c['decision']:<10} {learn:<14} {_short(c.get('held_out')):<14} "
                         f"${c['cost_usd']:>8.4f}  {c['change'][:80]}")
            lines.append(f"  {'':>3}  {'':<10} {c['reason']}")
    return lines


def _short(figures: dict[str, Any] | None) -> str:
    return "-" if not figures else f"{figures['passed']}/{figures['runs']} ${figures['cost_usd']:.4f}"


def event_line(event: dict[str, Any]) -> str | None:
    """An improvement's own trace events, as `loopwright improve` and `logs` print them."""
    data = event["data"]
    if event["kind"] == "eval_case":
        return (f"  case {data['case']}{' (held out)' if data['held_out'] else ''}: {data['status']}"
                f" · ${data['cost_usd']:.4f} · run {data['run']}")
    if event["kind"] == "eval_baseline":
        return f"the harness as it is: learn {describe(data['learn'])}; held-out {describe(data['held_out'])}"
    if event["kind"] == "candidate":
        return f"candidate {data['candidate']}: {data['decision']} ({data['reason']}) · ${data['cost_usd']:.4f}"
    return None

