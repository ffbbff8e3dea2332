"""Sandbox latency: a tool call through the agent, through `docker exec`, in a new container, on the host.

Measures, side by side in one run (interleaved rounds, so a busy machine slows every path alike):

- tool-call latency, p50 and p95, of a no-op command (`true`):
  the host floor (`subprocess.run(["/bin/true"])`), the sandbox's agent path (`DockerSandbox.run`),
  a plain `docker exec`, the sandbox's docker-exec fallback (images without python3), and a new
  hardened container per call (`docker run --rm`);
- start-to-first-call: from asking for a sandbox to the end of its first call, cold
  (`DockerSandbox.start`) and from the warm pool (reserve + claim, the slot already started);
- verification overhead: the example's check (examples/fix-failing-test) run the old way, in the
  maker's running sandbox, against the new way, the engine's own verification code end to end
  (clean copy, oracle restore and scan, a fresh check sandbox, the pytest report read back, the
  oracle scanned again), with the check sandbox from the pool (as the engine runs it: started while
  the maker worked) and started on the spot (cold), and where the new way's time goes.

    .venv/bin/python bench/sandbox.py            # writes bench/results/sandbox.json
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent

from loopwright.plugins.command_verifier import CommandVerifier  # noqa: E402
from loopwright.plugins.docker_sandbox import DockerSandboxes, _pool_key  # noqa: E402
from loopwright.runtime.engine import LoopRun  # noqa: E402
from loopwright.runtime.spec import load_spec  # noqa: E402
from loopwright.runtime.types import RunInfo  # noqa: E402
from loopwright.sandbox import DockerSandbox, PoolKey, SandboxPool, build_image  # noqa: E402
from loopwright.runtime import worktree as worktrees  # noqa: E402
from loopwright.sandbox.docker import WORKDIR, _sandbox_user  # noqa: E402

ROUNDS = 10
PER_ROUND = {"host_floor": 40, "agent": 40, "docker_exec": 4, "exec_fallback": 4, "new_container": 1}
STARTS = 8
VERIFY_ROUNDS = 15
GOALS_MS = {"overhead_p50": 2.0, "cold_start_to_first_call_p50": 300.0, "warm_start_to_first_call_p50": 30.0,
            "verification_added_p50": 300.0}
EXAMPLE = ROOT / "examples" / "fix-failing-test"
FIX = ("(len(numbers) + 1)", "len(numbers)")  # the maker's edit to the example's calc.py, as in the tests
PHASES = ("copy_and_oracle", "sandbox_start", "check", "rescan_and_hand_off")
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


class BenchRun(LoopRun):
    """The engine's verification code (LoopRun._oracle_pins, _baseline, _verify_copy and what they call)
    with the docker sandbox plugin and the command verifier, but no DBOS, store or trace; times its phases.
    ``warm``: the plugin as the engine has it, whose pool starts the next check sandbox while the maker
    works; otherwise a provider without ``reserve``, so every check sandbox starts when the check begins."""

    def __init__(self, wt: worktrees.Worktree, spec, maker, home: Path, warm: bool):
        self.spec, self.sandbox, self._wt, self.warm = spec, maker, wt, warm
        self.id = f"bench-verify-{'warm' if warm else 'cold'}"
        plugin = DockerSandboxes()
        self.provider = plugin if warm else SimpleNamespace(start=plugin.start)
        host = SimpleNamespace(sandbox=lambda kind: self.provider, verifier=lambda kind: CommandVerifier)
        self.rt = SimpleNamespace(settings=SimpleNamespace(runs_dir=home / "runs", checks=home / "checks"), host=host)
        (home / "runs" / self.id).mkdir(parents=True)
        self.info = RunInfo(self.id, spec.name, spec, wt.branch, wt.path)
        self.pins, self.baselines, self.phases = {}, {}, {}

    def _worktree(self):
        return self._wt

    def _event(self, *args, **numbers):
        pass

    def _check_sandbox(self, name, folder):
        started = time.perf_counter()
        self.phases["copy_and_oracle"] = (started - self.phases.pop("t0", started)) * 1000
        box = super()._check_sandbox(name, folder)
        self.phases["sandbox_start"] = (time.perf_counter() - started) * 1000
        return box

    def _run_check(self, ctx, index, check):
        started = time.perf_counter()
        result = super()._run_check(ctx, index, check)
        self.phases["check"] = (time.perf_counter() - started) * 1000
        return result

    def verify(self, iteration: int) -> tuple[float, dict]:
        """One verification as the engine's `verify` step does it: its time, and the time of each phase."""
        started = time.perf_counter()
        self.phases = {"t0": started}
        results = self._verify_copy(iteration)
        total = (time.perf_counter() - started) * 1000
        failed = [r for r in results if not r["passed"]]
        if failed:
            raise SystemExit(f"the example's check failed the new way: {failed}")
        phases = {**self.phases, "rescan_and_hand_off": total - sum(self.phases.values())}
        return total, phases

    def settle(self) -> None:
        """What the maker's own work between two checks gives the machine: the last check sandbox removed in
        the background, and (warm) the next one started."""
        for thread in threading.enumerate():
            if thread.name.startswith("loopwright-discard-"):
                thread.join()
        if not self.warm:
            return
        key = _pool_key(self.spec, self.rt.settings.checks, verification=True)
        deadline = time.monotonic() + 60
        while not self.provider._pool.ready(key):
            if time.monotonic() > deadline:
                raise SystemExit("no check sandbox was ready within 60 s")
            time.sleep(0.02)


def example_worktree(tmp: Path) -> worktrees.Worktree:
    """The example as run.sh sets it up (a git repository), its run's worktree, and the maker's fix in it."""
    repo = tmp / "example"
    repo.mkdir()
    shutil.copy(EXAMPLE / "calc.py", repo)
    shutil.copy(EXAMPLE / "loop.toml", repo)
    shutil.copytree(EXAMPLE / "tests", repo / "tests")
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "example: a failing test"]):
        subprocess.run(["git", "-c", "user.name=B", "-c", "user.email=b@example.invalid", "-C", str(repo), *args],
                       check=True, capture_output=True)
    wt = worktrees.create_worktree(repo, tmp / "worktrees-verify", "fix-failing-test", "bench-verify")
    calc = wt.path / "calc.py"
    calc.write_text(calc.read_text().replace(*FIX))
    return wt


def verification_overhead(image: str, tmp: Path) -> dict:
    wt = example_worktree(tmp)
    spec = load_spec(wt.repo / "loop.toml")
    spec.sandbox.image = image
    command = spec.verify[0].run
    maker = DockerSandboxes().start(run_id="bench-verify-maker", worktree=wt.path, spec=spec)
    ways = {"warm": BenchRun(wt, spec, maker, tmp / "home", warm=True),
            "cold": BenchRun(wt, spec, maker, tmp / "home", warm=False)}

    def old_way() -> None:  # the check in the maker's running sandbox, on its worktree
        result = maker.run(command, timeout=spec.sandbox.tool_timeout_s)
        if result.exit_code != 0:
            raise SystemExit(f"the example's check failed the old way: {result}")

    old, baseline = [], []
    new: dict[str, list[float]] = {way: [] for way in ways}
    phases = {way: {name: [] for name in PHASES} for way in ways}
    try:
        for run in ways.values():
            run.pins = run._oracle_pins()  # once per run, as the engine's steps oracle_pins and baseline
        started = time.perf_counter()
        for run in ways.values():
            run.baselines = run._baseline()
        first_baseline_ms = (time.perf_counter() - started) * 1000 / len(ways)
        old_way()  # warm-up: first calls, page cache
        for run in ways.values():
            run.settle()
            run.verify(0)
        order = ("old", "warm", "cold")
        for i in range(VERIFY_ROUNDS):
            for way in order[i % 3:] + order[:i % 3]:  # rotate which goes first
                for run in ways.values():
                    run.settle()
                if way == "old":
                    old.append(timed(old_way))
                else:
                    total, times = ways[way].verify(i + 1)
                    new[way].append(total)
                    for name in PHASES:
                        phases[way][name].append(times[name])
            started = time.perf_counter()
            ways["cold"].baselines = ways["cold"]._baseline()
            baseline.append((time.perf_counter() - started) * 1000)
    finally:
        for run in ways.values():
            run.settle()
            if run.warm:
                run.provider._pool.close()
        maker.close()
    inventory = json.loads(Path(ways["cold"].baselines["0"]).read_text())["tests"]
    added = {way: statistics.median(samples) - statistics.median(old) for way, samples in new.items()}
    return {
        "check": command,
        "example": "examples/fix-failing-test with calc.py fixed; the base commit's inventory: "
                   + ", ".join(f"{test} {status}" for test, status in sorted(inventory.items())),
        "old_in_maker_sandbox": summary(old),
        "new_warm_check_sandbox": summary(new["warm"]),
        "new_cold_check_sandbox": summary(new["cold"]),
        "added_p50_ms": round(added["warm"], 1),
        "ratio_p50": round(statistics.median(new["warm"]) / statistics.median(old), 2),
        "cold_added_p50_ms": round(added["cold"], 1),
        "cold_ratio_p50": round(statistics.median(new["cold"]) / statistics.median(old), 2),
        "goal_added_p50_ms": GOALS_MS["verification_added_p50"],
        "goal_met": added["warm"] <= GOALS_MS["verification_added_p50"],
        "new_phases": {way: {name: summary(values) for name, values in by_phase.items()}
                       for way, by_phase in phases.items()},
        "baseline_once_per_run": {**summary(baseline), "first_ms": round(first_baseline_ms, 1)},
        "note": "warm: as the engine runs it, the check sandbox started by the pool while the maker worked "
                "(each sample waits for it, as a maker's model call and tool calls would); cold: the first "
                "check in a process, or pool_size = 0. Removing the check sandbox happens after the verdict, "
                "in the background, in both.",
    }


def main() -> None:
    image = build_image(log=lambda m: print(m, file=sys.stderr))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="loopwright-bench-sandbox-") as name:
        tmp = Path(name)
        calls = call_latency(image, tmp)
        starts = start_to_first_call(image, tmp)
        verification = verification_overhead(image, tmp)
    overhead = calls["agent"]["p50_ms"] - calls["host_floor"]["p50_ms"]
    figures = {"overhead_p50": overhead, "cold_start_to_first_call_p50": starts["cold"]["p50_ms"],
               "warm_start_to_first_call_p50": starts["warm_pool"]["p50_ms"],
               "verification_added_p50": verification["added_p50_ms"]}
    result = {
        "benchmark": "sandbox tool-call latency and start-to-first-call (no-op command `true`); verification overhead",
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
        "verification_overhead": verification,
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
    v = verification
    print(f"\nverification of `{v['check']}`:")
    for name in ("old_in_maker_sandbox", "new_warm_check_sandbox", "new_cold_check_sandbox"):
        print(f"  {name:<30} p50 {v[name]['p50_ms']:8.1f} ms  p95 {v[name]['p95_ms']:8.1f} ms")
    print(f"  added at p50: {v['added_p50_ms']:.0f} ms (x{v['ratio_p50']:g}), goal <= {v['goal_added_p50_ms']:g} ms: "
          f"{'met' if v['goal_met'] else 'NOT met'}; cold: {v['cold_added_p50_ms']:.0f} ms (x{v['cold_ratio_p50']:g})")
    for way, by_phase in v["new_phases"].items():
        for name, s in by_phase.items():
            print(f"    {way} {name:<26} p50 {s['p50_ms']:8.1f} ms  p95 {s['p95_ms']:8.1f} ms")
    b = v["baseline_once_per_run"]
    print(f"  baseline (once per run): p50 {b['p50_ms']:.1f} ms, first {b['first_ms']:.1f} ms")
    print(f"goals met: {result['goals_met']} · written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
