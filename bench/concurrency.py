"""Many runs at once over MCP: a real `loopwright serve` daemon, the MCP SDK's HTTP client, an instant model.

N runs of the example loop (one edit that fixes the bug, then "fixed"; real Docker sandboxes, real
verification) are started with `start_loop` in one burst. While they run, `get_run` and `list_runs`
are called in a loop and timed, and the daemon's memory is read from /proc. Reported: the time until
every run finished, their outcomes, `get_run` / `list_runs` p50 and p95 during the load, and the
daemon's peak RSS (VmHWM).

    .venv/bin/python bench/concurrency.py [N]     # default 50; writes bench/results/concurrency.json
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
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from daemon_process import DaemonProcess  # noqa: E402
from model_server import ModelServer, text, tool_use  # noqa: E402

FIX = tool_use("edit_file", {"path": "calc.py", "old_text": "(len(numbers) + 1)", "new_text": "len(numbers)"})
GOALS = {"get_run_p95_ms": 100.0, "peak_rss_mb": 500.0}


def instant_model(request: dict) -> dict:
    return FIX if len(request["messages"]) == 1 else text("fixed")


def project(path: Path) -> Path:
    shutil.copytree(ROOT / "examples" / "fix-failing-test", path, ignore=shutil.ignore_patterns("run.sh", "__pycache__"))
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.name=B", "-c", "user.email=b@example.invalid", "commit", "-q", "-m", "start"]):
        subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True)
    return path


def spec_text(repo: Path) -> str:
    """The example's spec, its workspace the given repository (an inline spec names it absolutely)."""
    return (repo / "loop.toml").read_text().replace('repo = "."', f"repo = {json.dumps(str(repo))}")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def load(daemon: DaemonProcess, spec: str, count: int) -> dict:
    get_ms: list[float] = []
    list_ms: list[float] = []
    async with daemon.client() as client:
        started = time.monotonic()
        ids = []
        for _ in range(count):
            result = await client.call_tool("start_loop", {"spec": spec})
            assert not result.is_error, result.content[0].text
            ids.append(result.structured_content["run_id"])
        burst_s = time.monotonic() - started
        finished: dict[str, dict] = {}
        with anyio.fail_after(1800):
            while len(finished) < count:
                for run_id in ids:
                    if run_id in finished:
                        continue
                    t0 = time.monotonic()
                    run = (await client.call_tool("get_run", {"run_id": run_id})).structured_content
                    get_ms.append((time.monotonic() - t0) * 1000)
                    if run["finished_at"] is not None:
                        finished[run_id] = run
                t0 = time.monotonic()
                await client.call_tool("list_runs", {"limit": 50})
                list_ms.append((time.monotonic() - t0) * 1000)
                await anyio.sleep(0.2)
        total_s = time.monotonic() - started
    outcomes: dict[str, int] = {}
    for run in finished.values():
        outcomes[run["status"]] = outcomes.get(run["status"], 0) + 1
    return {
        "runs": count, "start_burst_s": round(burst_s, 2), "all_finished_s": round(total_s, 1), "outcomes": outcomes,
        "get_run_ms": {"calls": len(get_ms), "p50": round(statistics.median(get_ms), 1),
                       "p95": round(percentile(get_ms, 0.95), 1)},
        "list_runs_ms": {"calls": len(list_ms), "p50": round(statistics.median(list_ms), 1),
                         "p95": round(percentile(list_ms, 0.95), 1)},
    }


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    with tempfile.TemporaryDirectory(prefix="loopwright-concurrency-") as scratch:
        base = Path(scratch)
        repo = project(base / "project")
        (base / "loops").mkdir()
        with ModelServer(instant_model) as model:
            env = {**os.environ, "ANTHROPIC_BASE_URL": model.url, "ANTHROPIC_API_KEY": "test-key",
                   "LOOPWRIGHT_LOAD_PLUGINS": ""}
            env.pop("LOOPWRIGHT_DATABASE_URL", None)
            daemon = DaemonProcess(base / "home", base / "loops", env=env)
            try:
                figures = anyio.run(load, daemon, spec_text(repo), count)
                figures["daemon_peak_rss_mb"] = round(peak_rss_mb(daemon.process.pid), 1)
            finally:
                daemon.stop()
    result = {
        "benchmark": "N runs at once over MCP (streamable HTTP) against one daemon, instant model, real sandboxes",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        **figures,
        "goals": GOALS,
        "goals_met": {
            "all_succeeded": figures["outcomes"] == {"succeeded": count},
            "get_run_p95_ms": figures["get_run_ms"]["p95"] <= GOALS["get_run_p95_ms"],
            "peak_rss_mb": figures["daemon_peak_rss_mb"] <= GOALS["peak_rss_mb"],
        },
    }
    out = ROOT / "bench" / "results" / "concurrency.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
