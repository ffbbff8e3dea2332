"""`loopwright export`: runs as JSON lines, one per iteration, with the verdict as the reward."""

from __future__ import annotations

import json

from conftest import FIX, loopwright, run_id_of, write_spec
from model_server import text, tool_use


def test_export_of_two_runs_writes_each_iteration_with_its_verdict(home, project, model, tmp_path):
    model([tool_use("run_command", {"command": "python3 -m pytest -q -p no:cacheprovider"}), text("Looked."),
           FIX, text("Fixed the off-by-one."),  # run 1: FAIL, then pass
           FIX, text("Fixed it at once.")])  # run 2: pass
    spec = write_spec(project, stop={"max_iterations": 3})
    first, second = loopwright("run", str(spec)), loopwright("run", str(spec))
    assert first.returncode == 0 and second.returncode == 0, first.stdout + second.stdout
    runs = [run_id_of(first), run_id_of(second)]

    out = tmp_path / "runs.jsonl"
    result = loopwright("export", *runs, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote 3 iterations of 2 runs to {out}"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["run"], r["iteration"]) for r in records] == [(runs[0], 1), (runs[0], 2), (runs[1], 1)]
    assert [r["verdict"]["passed"] for r in records] == [False, True, True]
    checks = records[0]["verdict"]["checks"]
    assert records[0]["reward"] == sum(c["passed"] for c in checks) / len(checks) < 1.0  # the share that passed
    assert [r["reward"] for r in records[1:]] == [1.0, 1.0]
    assert records[0]["actions"][0]["tool"] == "run_command" and "exit code 1" in records[0]["actions"][0]["output"]
    assert records[1]["actions"][0]["tool"] == "edit_file" and records[1]["said"] == ["Fixed the off-by-one."]
    assert records[0]["goal"] and records[0]["model"]
    assert "FAIL" in records[1]["prompt"]  # iteration 2 was told what failed
    assert all(r["cost_usd"] > 0 for r in records)

    by_loop = loopwright("export", "--loop", "fix-failing-test")
    assert [json.loads(line)["run"] for line in by_loop.stdout.splitlines()] == [runs[0], runs[0], runs[1]]
    assert loopwright("export").returncode != 0
