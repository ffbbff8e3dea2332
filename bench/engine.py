"""Engine overhead per durable step: an instant model and a no-op tool, so only the engine is measured.

Runs the real runtime in-process (DBOS on SQLite in a temporary LOOPWRIGHT_HOME, the engine, the
plugin host) with N rounds of model call + tool call per run, for several N. The slope of run time
against the number of steps is the engine's cost per step; the intercept is the fixed cost per run
(worktree, sandbox start, oracle pins, baseline, the checks on a clean copy, commit). The same maker loop run without the engine is the floor.

    .venv/bin/python bench/engine.py            # writes bench/results/engine.json
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TMP = tempfile.TemporaryDirectory(prefix="loopwright-bench-")
os.environ["LOOPWRIGHT_HOME"] = str(Path(TMP.name) / "home")  # before any runtime import
os.environ["LOOPWRIGHT_LOAD_PLUGINS"] = ""
os.environ.pop("LOOPWRIGHT_DATABASE_URL", None)
ROOT = Path(__file__).resolve().parent.parent

from dbos import DBOS  # noqa: E402

from loopwright.runtime.config import load_settings  # noqa: E402
from loopwright.runtime.hookspecs import hookimpl  # noqa: E402
from loopwright.runtime.plugin_host import make_plugin_host  # noqa: E402
from loopwright.runtime.service import Runtime  # noqa: E402
from loopwright.runtime.spec import parse_spec  # noqa: E402
from loopwright.runtime.types import ExecResult, Tool  # noqa: E402

GOAL_MS = 10.0
ROUNDS = (0, 50, 200)  # model + tool calls per run: 2N steps in the turn
REPEATS = 3
LONG_ROUNDS = 1000  # one long run, outside the fit: does the cost per step grow with the trace?
# The engine's own steps in a run of one iteration (runtime/engine.py LoopRun.execute, _verify); the
# bench reads each run's steps back (DBOS.list_workflow_steps) and reports any difference.
FIXED_STEPS = ("prepare_worktree", "system_prompt", "oracle_pins", "baseline", "verify", "verdict_hooks",
               "commit", "finish", "run_finished_hooks", "automations_react")
MODEL = "claude-haiku-5-5"
REPLY = {"content": [{"type": "tool_use", "id": "t1", "name": "noop", "input": {}}],
         "stop_reason": "tool_use", "usage": {"input_tokens": 10, "output_tokens": 5}}


async def send(request):
    return REPLY


def noop(ctx, arguments):
    return "ok"


class InstantMaker:
    rounds = 0  # set before each run

    def __init__(self, agent_spec, settings):
        self.spec = agent_spec

    async def take_turn(self, turn):
        started = time.perf_counter()
        request = {"model": self.spec.model, "messages": [{"role": "user", "content": turn.opening}]}
        for _ in range(self.rounds):
            reply = await turn.model(self.spec.model, request, send)
            block = reply["content"][0]
            await turn.tool(block["id"], block["name"], block["input"])
        BenchPlugin.turn_s = time.perf_counter() - started
        return "end_turn"


class NullSandbox:
    def run(self, command, *, timeout, stdin=None):
        return ExecResult(0, "", "", 0.0)

    def close(self):
        pass


class NullSandboxes:
    def start(self, *, run_id, worktree, spec, verification=False):
        return NullSandbox()  # the maker's sandbox and each check's fresh one alike

    def reap_orphans(self):
        return []


class BenchPlugin:
    finished = threading.Event()
    turn_s = 0.0

    @hookimpl
    def loopwright_register_agents(register):
        register("instant", InstantMaker)

    @hookimpl
    def loopwright_register_sandboxes(register):
        register("none", NullSandboxes())

    @hookimpl
    def loopwright_register_tools(register):
        register(Tool("noop", "does nothing", {"type": "object", "properties": {}}, noop))

    @hookimpl
    def loopwright_run_finished(run, outcome):
        BenchPlugin.finished.set()


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    for args in (["init", "-q", "-b", "main"], ["commit", "-q", "--allow-empty", "-m", "initial"]):
        subprocess.run(["git", "-c", "user.name=B", "-c", "user.email=b@example.invalid", "-C", str(path), *args],
                       check=True, capture_output=True)
    return path


def floor_per_step_ms(rounds: int) -> float:
    """The same maker loop calling `send` and the tool's handler directly: no engine at all."""
    class Direct:
        opening = "go"

        async def model(self, model, request, fn):
            return await fn(request)

        async def tool(self, call_id, name, arguments):
            return noop(None, arguments)

    InstantMaker.rounds = rounds
    asyncio.run(InstantMaker(parse_spec(SPEC).agent, None).take_turn(Direct()))
    return BenchPlugin.turn_s * 1000 / (2 * rounds)


def timed_run(runtime: Runtime, spec, rounds: int) -> dict:
    InstantMaker.rounds = rounds
    BenchPlugin.finished.clear()
    started = time.perf_counter()
    run = runtime.start_run(spec)
    if not BenchPlugin.finished.wait(300):
        raise SystemExit(f"run {run.id} did not finish in 300 s")
    elapsed = time.perf_counter() - started
    row = runtime.get_run(run.id)
    if row.status != "succeeded":
        raise SystemExit(f"run {run.id} ended {row.status}: {row.reason}")
    DBOS.retrieve_workflow(run.id).get_result()  # the hook's own step is recorded after the hook returns
    steps = [s["function_name"] for s in DBOS.list_workflow_steps(run.id, load_output=False)]
    engine_steps = [name for name in steps if not name.startswith(("model:", "tool:"))]
    return {"rounds": rounds, "steps": len(steps), "engine_steps": engine_steps,
            "events": len(runtime.trace(run.id, limit=100_000)),
            "run_ms": round(elapsed * 1000, 2), "turn_ms": round(BenchPlugin.turn_s * 1000, 2)}


SPEC = {
    "name": "bench", "goal": "measure the engine",
    "agent": {"kind": "instant", "model": MODEL, "max_tool_calls": 10_000},
    "sandbox": {"kind": "none"},
    "verify": [{"kind": "command", "run": "true"}],
    "stop": {"max_iterations": 1},
}


def main() -> None:
    SPEC["workspace"] = {"repo": str(make_repo(Path(TMP.name) / "repo"))}
    spec = parse_spec(SPEC)
    settings = load_settings(Path(TMP.name))
    runtime = Runtime(settings, make_plugin_host(settings, extra_plugins=(BenchPlugin,)))
    runtime.launch()
    try:
        timed_run(runtime, spec, 5)  # warm-up: imports, connections, first worktree
        points = [timed_run(runtime, spec, n) for _ in range(REPEATS) for n in ROUNDS]
        long = timed_run(runtime, spec, LONG_ROUNDS)
    finally:
        runtime.shutdown()
    seen = {tuple(p.pop("engine_steps")) for p in [*points, long]}
    if seen != {FIXED_STEPS}:
        print(f"note: the engine's steps were {sorted(seen)}, not FIXED_STEPS {FIXED_STEPS}; update FIXED_STEPS",
              file=sys.stderr)
    fit = statistics.linear_regression([p["steps"] for p in points], [p["run_ms"] for p in points])
    in_turn = [p["turn_ms"] / (2 * p["rounds"]) for p in points if p["rounds"]]
    long["ms_per_step_in_turn"] = round(long["turn_ms"] / (2 * LONG_ROUNDS), 3)
    floor = min(floor_per_step_ms(max(ROUNDS)) for _ in range(5))
    result = {
        "benchmark": "engine overhead per durable step (instant model, no-op tool, null sandbox, SQLite)",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "sqlite": sqlite3.sqlite_version, "database": "sqlite in a temporary directory " + TMP.name},
        "goal_ms_per_step": GOAL_MS,
        "per_step_ms": round(fit.slope, 3),
        "per_step_ms_in_turn_median": round(statistics.median(in_turn), 3),
        "per_run_fixed_ms": round(fit.intercept, 1),
        "run_ms_without_maker_steps_median": statistics.median(p["run_ms"] for p in points if not p["rounds"]),
        "floor_per_step_ms": round(floor, 5),
        "engine_steps_per_run": [list(names) for names in sorted(seen)],
        "engine_steps_as_expected": seen == {FIXED_STEPS},
        "goal_met": fit.slope <= GOAL_MS,
        "goal_met_in_long_run": long["ms_per_step_in_turn"] <= GOAL_MS,
        "points": points,
        "long_run": long,
    }
    out = ROOT / "bench" / "results" / "engine.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'rounds':>6} {'steps':>6} {'events':>6} {'run ms':>9} {'turn ms':>9} {'ms/step in turn':>16}")
    for p in points:
        per = f"{p['turn_ms'] / (2 * p['rounds']):.2f}" if p["rounds"] else "-"
        print(f"{p['rounds']:>6} {p['steps']:>6} {p['events']:>6} {p['run_ms']:>9.1f} {p['turn_ms']:>9.1f} {per:>16}")
    print(f"\nper step (slope of run time vs steps): {fit.slope:.2f} ms   goal <= {GOAL_MS:g} ms: "
          f"{'met' if result['goal_met'] else 'NOT met'}")
    print(f"per step, model+tool inside the turn (median): {result['per_step_ms_in_turn_median']:.2f} ms")
    print(f"long run, {long['steps']} steps: {long['ms_per_step_in_turn']:.2f} ms per step inside the turn")
    print(f"fixed per run (intercept): {fit.intercept:.0f} ms   floor without the engine: {floor * 1000:.2f} us/step\n"
          f"a run without maker steps ({len(FIXED_STEPS)} engine steps): {result['run_ms_without_maker_steps_median']:.0f} ms")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
