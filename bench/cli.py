"""Start-up of the `loopwright` command: whole processes, side by side, against the interpreter's own start.

Each figure is the median wall time of a whole process, from spawn to exit (or, for `loopwright mcp`,
to its answer to `initialize` on stdin), in interleaved rounds so a busy machine slows every command
alike. The reference is `python -c pass` with the same interpreter; each command is reported as its
time above that, and as a ratio to it.

    .venv/bin/python bench/cli.py            # writes bench/results/cli.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 15))
# Goals (issue 9): seconds above the interpreter's own start, at the median.
GOALS_S = {"--help": 0.3, "runs": 0.3, "status RUN": 0.4, "validate": 0.6, "mcp initialize": 0.5}
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "bench", "version": "1"}}}


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr}")
    return elapsed


def first_line(argv: list[str], env: dict[str, str]) -> float:
    """From spawning a process to the first line it prints (its interpreter's shutdown not counted)."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    process.stdout.readline()
    elapsed = time.perf_counter() - started
    process.wait(60)
    return elapsed


def mcp_initialize(argv: list[str], env: dict[str, str]) -> float:
    """From spawning `loopwright mcp` to its answer to `initialize`; then the process is ended."""
    started = time.perf_counter()
    server = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        server.stdin.write(json.dumps(INITIALIZE) + "\n")
        server.stdin.flush()
        answer = json.loads(server.stdout.readline())
        elapsed = time.perf_counter() - started
        if answer.get("id") != 1 or "result" not in answer:
            raise SystemExit(f"loopwright mcp answered initialize with {answer}")
        return elapsed
    finally:
        server.stdin.close()  # end of input: the server exits
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.terminate()
            server.wait(30)


def a_finished_run(env: dict[str, str]) -> str:
    """A run in the benchmark's home, as `status` would find one (no model or sandbox needed)."""
    code = (
        "from loopwright.runtime.service import Runtime; from loopwright.runtime.spec import load_spec\n"
        "r = Runtime(); s = load_spec('examples/fix-failing-test/loop.toml')\n"
        "run = r.store.create_run('bench-run', s.name, s.model_dump(mode='json'), '.', 'loopwright/bench')\n"
        "import time; r.store.update_run(run.id, status='succeeded', reason='bench', finished_at=time.time())\n"
        "print(run.id)"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    loopwright = [sys.executable, "-m", "loopwright.cli"]
    with tempfile.TemporaryDirectory(prefix="loopwright-bench-cli-") as home:
        env = {**os.environ, "LOOPWRIGHT_HOME": home, "LOOPWRIGHT_LOAD_PLUGINS": ""}
        env.pop("LOOPWRIGHT_DATABASE_URL", None)
        run_id = a_finished_run(env)
        commands = {
            "python -c pass": lambda: timed([sys.executable, "-c", "pass"], env),
            "--help": lambda: timed([*loopwright, "--help"], env),
            "runs": lambda: timed([*loopwright, "runs"], env),
            "status RUN": lambda: timed([*loopwright, "status", run_id], env),
            "validate": lambda: timed([*loopwright, "validate", "examples/fix-failing-test/loop.toml"], env),
            "mcp initialize": lambda: mcp_initialize([*loopwright, "mcp", "--loops", str(Path(home) / "loops")], env),
            # the floor under `loopwright mcp`: importing the MCP SDK's server, nothing else (to its end, not the exit)
            "import mcp server SDK": lambda: first_line([sys.executable, "-c", "import mcp.server.mcpserver; print(1)"], env),
        }
        load_before = os.getloadavg()
        for fn in commands.values():  # warm-up: page cache, bytecode
            fn()
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(ROUNDS):
            for name, fn in commands.items():
                samples[name].append(fn())
    floor = statistics.median(samples["python -c pass"])
    figures = {}
    for name, values in samples.items():
        median = statistics.median(values)
        figures[name] = {"median_s": round(median, 4), "above_interpreter_s": round(median - floor, 4),
                         "ratio_to_interpreter": round(median / floor, 2), "n": len(values)}
    result = {
        "benchmark": "loopwright start-up: whole processes, medians, against `python -c pass`",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "figures": figures,
        "goals_above_interpreter_s": GOALS_S,
        "goals_met": {name: figures[name]["above_interpreter_s"] <= goal for name, goal in GOALS_S.items()},
    }
    out = ROOT / "bench" / "results" / "cli.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'command':<22} {'median s':>9} {'above python':>13} {'ratio':>6}  goal")
    for name, f in figures.items():
        goal = GOALS_S.get(name)
        verdict = "" if goal is None else f"<= {goal:g} s above: {'met' if f['above_interpreter_s'] <= goal else 'NOT met'}"
        print(f"{name:<22} {f['median_s']:>9.3f} {f['above_interpreter_s']:>13.3f} {f['ratio_to_interpreter']:>6.1f}  {verdict}")
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
