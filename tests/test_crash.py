"""A run's process killed at random points, inside steps and between them, then recovered: the same
outcome, every side effect once or the maker told of the interrupted call, every model request that
reached the model in the trace and in the spend, and nothing left behind (the real CLI, Docker, the SDK)."""

import json
import random
import signal
import subprocess
import time

import docker
import pytest

from conftest import FIX, LOOPWRIGHT, loopwright, write_spec
from model_server import text, tool_use
from loopwright.runtime.config import DEFAULT_PRICES
from loopwright.runtime.store import Store

CALLS = 4  # each appends its number to ledger.txt, then takes a moment: a window between a tool's effect and its record


def maker(request: dict) -> dict:
    """Appends 1..CALLS to the ledger, fixes the bug, says so; it follows the conversation, so a call it
    was told was interrupted is not repeated."""
    done = sum(1 for m in request["messages"] if m["role"] == "assistant" for b in m["content"] if b["type"] == "tool_use")
    if done < CALLS:
        return tool_use("run_command", {"command": f"echo {done + 1} >> ledger.txt && sleep 0.4"})
    if done == CALLS:
        return FIX
    return text("Fixed the divisor; the ledger holds one line per step.")


def billed(server) -> float:
    price = DEFAULT_PRICES["claude-sonnet-5-5"]
    return sum((r["usage"]["input_tokens"] * price["input"] + r["usage"]["output_tokens"] * price["output"]
                + r["usage"]["cache_creation_input_tokens"] * price["cache_write"]
                + r["usage"]["cache_read_input_tokens"] * price["cache_read"]) / 1_000_000 for r in server.responses)


def leftovers(home, run_id: str) -> list[str]:
    """Containers, check copies and warm-pool folders of the run (or of the dead process) still there."""
    found = [c.name for c in docker.from_env().containers.list(all=True, filters={"label": f"loopwright.run={run_id}"})]
    found += [str(p) for p in (home / "checks").glob(f"{run_id}-*")]
    found += [str(p) for p in home.glob("*/.pool/*")]
    return found


@pytest.mark.parametrize("database, point", [*(("sqlite", p) for p in range(20)), *(("postgres", p) for p in range(6))],
                         indirect=["database"])
def test_a_run_killed_at_a_random_point_recovers_exactly(home, database, project, model, point):
    server = model(maker)
    process = subprocess.Popen([*LOOPWRIGHT, "run", str(write_spec(project))], stdout=subprocess.PIPE, text=True)
    run_id = process.stdout.readline().split()[1]
    time.sleep(random.Random(point).uniform(0.3, 6.0))  # a run takes about 6 s here
    process.send_signal(signal.SIGKILL)
    process.wait()

    recovered = loopwright("recover", run_id)
    store = Store(database)
    run = store.get_run(run_id)
    if run.status != "succeeded" or "recovering" not in recovered.stdout:  # finished before the kill: nothing to see
        assert run.status == "succeeded", recovered.stdout + recovered.stderr
    events = store.events(run_id, limit=10_000)

    ledger = subprocess.run(["git", "-C", str(project), "show", f"{run.branch}:ledger.txt"],
                            capture_output=True, text=True).stdout.split()
    calls = {e["key"]: e["data"] for e in events if e["kind"] == "tool_call"}
    for number in range(1, CALLS + 1):
        data = calls[f"1.tool.{number}"]
        if data.get("interrupted"):  # not run again, and the maker was told
            assert ledger.count(str(number)) <= 1
            told = [b for r in server.requests for m in r["messages"] if m["role"] == "user" and isinstance(m["content"], list)
                    for b in m["content"] if b.get("type") == "tool_result" and "Not run again" in str(b.get("content"))]
            assert told, f"call {number} was interrupted and the maker was never told"
        else:
            assert ledger.count(str(number)) == 1, (number, ledger)
    assert not any(d.get("unfinished") for d in calls.values())

    model_calls = [e for e in events if e["kind"] == "model_call"]
    assert len(model_calls) >= len(server.requests)  # every request that reached the model is in the trace
    assert run.spent_usd >= billed(server) - 1e-9  # and in the spend
    assert run.spent_usd == pytest.approx(sum(e["cost_usd"] for e in model_calls), abs=1e-9)
    settled = [e for e in model_calls if not e["data"].get("unfinished")]  # answered and recorded: billed as recorded
    assert sum(e["cost_usd"] for e in settled) <= billed(server) + 1e-9
    assert json.loads(loopwright("status", run_id, "--json").stdout)["status"] == "succeeded"
    assert leftovers(home, run_id) == []
