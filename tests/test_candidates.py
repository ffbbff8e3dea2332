"""Best-of-N: `[agent] candidates = N` runs N makers per iteration from the same tree, each in its own
worktree and sandbox, verifies each, and keeps the best; all count against the budget and are traced."""

from __future__ import annotations

import json
import re
import subprocess

from conftest import FIX, loopwright, run_id_of, trace, wait_for, write_spec
from model_server import text, tool_use


def candidate_of(request: dict) -> int:
    opening = json.dumps(request["messages"][0]["content"])
    return int(re.search(r"You are candidate (\d) of 3", opening).group(1))


def script(request: dict) -> dict:
    """Candidate 2 fixes the bug; candidates 1 and 3 look around and give up."""
    k = candidate_of(request)
    turn = sum(1 for m in request["messages"] if m["role"] == "assistant")
    replies = [FIX, text("Fixed the off-by-one.")] if k == 2 else \
        [tool_use("run_command", {"command": f"echo candidate {k} was here > notes-{k}.txt"}), text("I could not fix it.")]
    return replies[min(turn, len(replies) - 1)]


def test_three_candidates_one_fixes_the_bug_and_only_its_tree_is_kept(home, project, model):
    server = model(script)
    result = loopwright("run", str(write_spec(project, agent={"candidates": 3}, stop={"max_iterations": 1})))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "iteration 1: pass" in result.stdout
    run_id = run_id_of(result)

    events = trace(run_id)
    [chosen] = [e["data"]["candidates"] for e in events if e["kind"] == "candidates"]
    assert [c["candidate"] for c in chosen] == [1, 2, 3]
    assert [c["passed"] for c in chosen] == [False, True, False]
    assert [c["chosen"] for c in chosen] == [False, True, False]
    assert all(c["cost_usd"] > 0 for c in chosen)
    model_calls = [e for e in events if e["kind"] == "model_call"]
    assert len(model_calls) == len(server.requests) == 6  # two per candidate, all in the trace
    spent = sum(e["cost_usd"] for e in model_calls)
    assert abs(sum(c["cost_usd"] for c in chosen) - spent) < 3e-6  # (each rounded to 6 decimals)
    status = json.loads(loopwright("status", run_id, "--json").stdout)
    assert abs(status["spent_usd"] - spent) < 1e-6  # every candidate counts against the budget

    branch = f"loopwright/fix-failing-test/{run_id}"
    shown = subprocess.run(["git", "-C", str(project), "show", f"{branch}:calc.py"], capture_output=True, text=True)
    assert "sum(numbers) / len(numbers)" in shown.stdout
    files = subprocess.run(["git", "-C", str(project), "ls-tree", "-r", "--name-only", branch],
                           capture_output=True, text=True).stdout.split()
    assert not [f for f in files if f.startswith("notes-")]  # the losers' edits are not in the run's tree

    worktrees = subprocess.run(["git", "-C", str(project), "worktree", "list"], capture_output=True, text=True).stdout
    assert f"{run_id}-c" not in worktrees and not list((home / "worktrees").glob(f"{run_id}-c*"))
    branches = subprocess.run(["git", "-C", str(project), "branch", "--list", f"{branch}-c*"], capture_output=True, text=True)
    assert branches.stdout.strip() == ""

    def containers() -> str:
        return subprocess.run(["docker", "ps", "-a", "--filter", f"name=loopwright-{run_id}", "--format", "{{.Names}}"],
                              capture_output=True, text=True).stdout.strip()

    wait_for(lambda: containers() == "", "every candidate's container is removed", timeout=30)
