"""Sandbox latency: a tool call through the agent, through `docker exec`, in a new container, on the host.

Measures, side by side in one run (interleaved rounds, so a busy machine slows every path alike):

- tool-call latency, p50 and p95, of a no-op command (`true`):
  the host floor (`subprocess.run(["/bin/true"])`), the sandbox's agent path (`DockerSandbox.run`),
  a plain `docker exec`, the sandbox's docker-exec fallback (images without python3), and a new
  hardened container per call (`docker run --rm`);
- start-to-first-call: from asking for a sandbox to the end of its first call, cold
  (`DockerSandbox.start`) and from the warm pool (reserve + claim, the slot already started).

    .venv/bin/python bench/sandbox.py            # writes bench/results/sandbox.json
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
sys.path.insert(0, str(ROOT))

from sandbox import DockerSandbox, PoolKey, SandboxPool, build_image  # noqa: E402
from sandbox.docker import WORKDIR, _sandbox_user  # noqa: E402

ROUNDS = 10
PER_ROUND = {"host_floor": 40, "agent": 40, "docker_exec": 4, "exec_fallback": 4, "new_container": 1}
STARTS = 8
GOALS_MS = {"overhead_p50": 2.0, "cold_start_to_first_call_p50": 300.0, "warm_start_to_first_call_p50": 30.0}
HARDENING = ["--network", "none", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--read-only",
             "--pids-limit", "256", "--memory", "1g", "--memory-swap", "1g", "--cpus", "1"]


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def checked(result) -> None:
    if result.exit_code != 0:
        raise SystemExit(f"the benchmark's command failed: {result}")


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered), 3),
            "p95_ms": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 3)}


def call_latency(image: str, tmp: Path) -> dict:
    (tmp / "calls").mkdir()
    (tmp / "fallback").mkdir()
    agent = DockerSandbox.start(run_id="bench-agent", worktree=tmp / "calls", image=image)
    fallback = DockerSandbox.start(run_id="bench-exec", worktree=tmp / "fallback", image=image, agent=False)
    user = _sandbox_user()
    paths = {
        "host_floor": lambda: subprocess.run(["/bin/true"], check=True),
        "agent": lambda: checked(agent.run("true", timeout=30)),
        "docker_exec": lambda: subprocess.run(["docker", "exec", "-u", user, "-w", WORKDIR, agent.container_id,
                                               "sh", "-c", "true"], check=True),
        "exec_fallback": lambda: checked(fallback.run("true", timeout=30)),
        "new_container": lambda: subprocess.run(["docker", "run", "--rm", *HARDENING, "-u", user, image,
                                                 "sh", "-c", "true"], check=True, capture_output=True),
    }
    samples: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for name, fn in paths.items():  # warm-up: first calls, page cache
            fn()
        for _ in range(ROUNDS):
            for name, fn in paths.items():
                samples[name] += [timed(fn) for _ in range(PER_ROUND[name])]
    finally:
        agent.close()
        fallback.close()
    return {name: summary(values) for name, values in samples.items()}


def start_to_first_call(image: str, tmp: Path) -> dict:
    cold, warm = [], []
    pool = SandboxPool(size=1)
    key = PoolKey(worktrees=(tmp / "worktrees").resolve(), image=image)
    key.worktrees.mkdir()
    pool.reserve(key, "bench-fill", key.worktrees / "bench-fill")  # none ready yet: starts filling
    try:
        for i in range(STARTS):
            deadline = time.monotonic() + 60
            while not pool.ready(key):  # also: no refill competes with the cold start for the machine
                if time.monotonic() > deadline:
                    raise SystemExit("the warm pool did not fill within 60 s")
                time.sleep(0.05)

            folder = tmp / f"cold-{i}"
            folder.mkdir()
            started = time.perf_counter()
            sandbox = DockerSandbox.start(run_id=f"bench-cold-{i}", worktree=folder, image=image)
            checked(sandbox.run("true", timeout=30))
            cold.append((time.perf_counter() - started) * 1000)
            sandbox.close()

            run_id, worktree = f"bench-warm-{i}", key.worktrees / f"bench-warm-{i}"
            started = time.perf_counter()
            if not pool.reserve(key, run_id, worktree):
                raise SystemExit("the warm pool had no slot ready")
            sandbox = pool.claim(run_id, worktree)
            checked(sandbox.run("true", timeout=30))
            warm.append((time.perf_counter() - started) * 1000)
            sandbox.close()
    finally:
        pool.close()
    return {"cold": summary(cold), "warm_pool": summary(warm)}


def main() -> None:
    image = build_image(log=lambda m: print(m, file=sys.stderr))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="loopwright-bench-sandbox-") as name:
        tmp = Path(name)
        calls = call_latency(image, tmp)
        starts = start_to_first_call(image, tmp)
    overhead = calls["agent"]["p50_ms"] - calls["host_floor"]["p50_ms"]
    figures = {"overhead_p50": overhead, "cold_start_to_first_call_p50": starts["cold"]["p50_ms"],
               "warm_start_to_first_call_p50": starts["warm_pool"]["p50_ms"]}
    result = {
        "benchmark": "sandbox tool-call latency and start-to-first-call (no-op command `true`)",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "docker": subprocess.run(["docker", "version", "-f", "{{.Server.Version}}"],
                                             capture_output=True, text=True).stdout.strip(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "image": image,
        "call_latency": calls,
        "agent_overhead_over_host_floor_p50_ms": round(overhead, 3),
        "start_to_first_call": starts,
        "goals_ms": GOALS_MS,
        "goals_met": {name: figures[name] <= goal for name, goal in GOALS_MS.items()},
    }
    out = ROOT / "bench" / "results" / "sandbox.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'tool call':<16} {'p50 ms':>9} {'p95 ms':>9} {'n':>5}")
    for name, s in calls.items():
        print(f"{name:<16} {s['p50_ms']:>9.2f} {s['p95_ms']:>9.2f} {s['n']:>5}")
    print(f"agent overhead over the host floor (p50): {overhead:.2f} ms (goal <= {GOALS_MS['overhead_p50']:g})")
    for name, s in starts.items():
        print(f"start to first call, {name:<9} p50 {s['p50_ms']:8.1f} ms  p95 {s['p95_ms']:8.1f} ms")
    print(f"goals met: {result['goals_met']} · written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
