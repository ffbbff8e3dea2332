"""A loop end to end: the real CLI, a real container, the real SDK against the scripted model."""

import json
import socket
import subprocess

from conftest import FIX, LOOPWRIGHT, loopwright, run_id_of, trace, wait_for, write_spec
from model_server import error, text, tool_use



def events(run_id, kind):
    return [e for e in trace(run_id) if e["kind"] == kind]


def status(run_id) -> dict:
    result = loopwright("status", run_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_red_then_fixed_succeeds_after_two_iterations_with_the_fix_committed(home, project, model):
    model([
        tool_use("run_command", {"command": "python3 -m pytest -q -p no:cacheprovider"}),
        text("I have looked at the failure."),
        tool_use("read_file", {"path": "calc.py"}),
        FIX,
        text("Fixed the off-by-one in average()."),
    ])
    result = loopwright("run", str(write_spec(project)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "iteration 1: FAIL" in result.stdout and "iteration 2: pass" in result.stdout
    run_id = run_id_of(result)

    run = status(run_id)
    assert (run["status"], run["iteration"]) == ("succeeded", 2)
    branch_file = subprocess.run(["git", "-C", str(project), "show", f"{run['branch']}:calc.py"],
                                 capture_output=True, text=True, check=True).stdout
    assert "sum(numbers) / len(numbers)" in branch_file
    assert "(len(numbers) + 1)" in (project / "calc.py").read_text()  # the user's checkout is untouched

    model_calls = events(run_id, "model_call")
    assert len(model_calls) == 5
    assert all(e["cost_usd"] > 0 and e["output_tokens"] > 0 for e in model_calls)
    assert sum(e["cache_read_tokens"] for e in model_calls) > 0  # the stable prefix is read from the cache
    tool_calls = events(run_id, "tool_call")
    assert [e["data"]["tool"] for e in tool_calls] == ["run_command", "read_file", "edit_file"]
    assert all(e["duration_ms"] > 0 for e in tool_calls)
    verdicts = events(run_id, "verdict")
    assert [v["data"]["passed"] for v in verdicts] == [False, True]
    assert run["spent_usd"] == round(sum(e["cost_usd"] for e in model_calls), 6)


def test_the_iteration_line_and_the_working_memory_carry_the_checks_headline(home, project, model):
    server = model([text("Not sure yet."), FIX, text("Fixed.")])
    result = loopwright("run", str(write_spec(project)))
    assert result.returncode == 0, result.stdout + result.stderr
    check = "command: python3 -m pytest -q -p no:cacheprovider"
    assert f"iteration 1: FAIL {check} (2 failed)" in result.stdout  # the test report's counts
    opening = server.requests[1]["messages"][0]["content"]  # iteration 2 opens with iteration 1's working memory
    text_of = opening if isinstance(opening, str) else "".join(block.get("text", "") for block in opening)
    memory = next(line for line in text_of.splitlines() if line.startswith("- iteration 1:"))
    assert memory.endswith(f"-> failed: {check}: 2 failed")  # the counts, not the wrapper "... did not pass"
    verdicts = events(run_id_of(result), "verdict")
    assert [c["headline"] for c in verdicts[-1]["data"]["checks"]] == ["", "2 passed"]  # protected files, the tests


def test_tool_calls_run_inside_the_container_not_on_the_host(home, project, model):
    server = model([
        tool_use("run_command", {"command": "id -u; cat /etc/hostname; test -e /.dockerenv && echo in-docker"}),
        text("done"),
    ])
    result = loopwright("run", str(write_spec(project, stop={"max_iterations": 1})))
    assert result.returncode == 1
    output = server.requests[1]["messages"][-1]["content"][0]["content"]
    uid, hostname, marker = output.split("\n")[1:4]
    assert uid != "0"
    assert hostname != socket.gethostname()
    assert marker == "in-docker"


def test_maker_saying_done_while_checks_fail_does_not_succeed(home, project, model):
    model(lambda request: text("All tests pass now. The task is complete."))
    result = loopwright("run", str(write_spec(project, stop={"max_iterations": 2})))
    assert result.returncode == 1
    run = status(run_id_of(result))
    assert run["status"] == "failed"
    assert run["reason"].startswith("max_iterations: 2 iterations")


def test_editing_a_protected_test_file_fails_the_iteration(home, project, model):
    model([
        tool_use("write_file", {"path": "tests/test_calc.py", "content": "def test_nothing():\n    pass\n"}),
        text("Tests pass now."),
    ])
    result = loopwright("run", str(write_spec(project, stop={"max_iterations": 1})))
    assert result.returncode == 1
    run = status(run_id_of(result))
    checks = {c["name"]: c for c in run["last_verdict"]["checks"]}
    assert checks["protected files"]["passed"] is False
    assert "tests/test_calc.py" in checks["protected files"]["feedback"]


def test_stall_stops_a_run_that_fails_the_same_way_again_and_again(home, project, model):
    model(lambda request: text("Still thinking."))
    result = loopwright("run", str(write_spec(project, stop={"max_iterations": 6, "stall_after": 2})))
    assert result.returncode == 1
    run = status(run_id_of(result))
    assert (run["status"], run["iteration"]) == ("stalled", 2)
    assert run["reason"].startswith("stall_after: the same failure")


def test_wall_time_limit_fails_the_run(home, project, model):
    model(lambda request: tool_use("run_command", {"command": "sleep 1"}))
    result = loopwright("run", str(write_spec(project, stop={"max_wall_time": "3s"}, agent={"max_tool_calls": 100})))
    assert result.returncode == 1
    run = status(run_id_of(result))
    assert run["status"] == "failed" and run["reason"].startswith("max_wall_time")


def test_tool_call_budget_ends_the_makers_turn_and_verification_runs(home, project, model):
    model(lambda request: tool_use("run_command", {"command": "echo busy"}))
    spec = write_spec(project, stop={"max_iterations": 1}, agent={"max_tool_calls": 3})
    result = loopwright("run", str(spec))
    assert result.returncode == 1
    run_id = run_id_of(result)
    assert len(events(run_id, "tool_call")) == 3
    turn = events(run_id, "turn_end")[0]["data"]
    assert (turn["ended_by"], turn["tool_calls"]) == ("max_tool_calls", 3)
    assert turn["opening"].startswith("Start working toward the goal")  # what the maker was told
    assert len(events(run_id, "verdict")) == 1


def test_a_person_stops_a_running_loop_from_another_process(home, project, model):
    model(lambda request: tool_use("run_command", {"command": "sleep 0.5"}))
    spec = write_spec(project, agent={"max_tool_calls": 1000})
    process = subprocess.Popen([*LOOPWRIGHT, "run", str(spec)], stdout=subprocess.PIPE, text=True)
    run_id = process.stdout.readline().split()[1]
    wait_for(lambda: any(e["kind"] == "tool_call" for e in trace(run_id)), "the loop is calling tools")
    stop = loopwright("stop", run_id)
    assert stop.returncode == 0 and "stop requested" in stop.stdout
    assert process.wait(timeout=60) == 1
    run = status(run_id)
    assert (run["status"], run["reason"]) == ("stopped", "stopped by a person")


def test_stopping_a_finished_run_is_refused_with_a_reason(home, project, model):
    model([text("done")])
    result = loopwright("run", str(write_spec(project, stop={"max_iterations": 1})))
    stop = loopwright("stop", run_id_of(result))
    assert stop.returncode == 2
    assert "already finished (failed)" in stop.stderr


def test_model_api_failures_are_retried_then_end_the_run_with_a_clear_error(home, project, model):
    server = model([error(529, "overloaded_error", "Overloaded")] * 5)
    result = loopwright("run", str(write_spec(project)))
    assert result.returncode == 1
    run = status(run_id_of(result))
    assert run["status"] == "error"
    assert "529" in run["reason"] and "Overloaded" in run["reason"]
    assert len(server.requests) == 5  # the first try and four retries


def test_without_an_api_key_the_run_is_refused_and_says_what_to_set(home, project, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    result = loopwright("run", str(write_spec(project)))
    assert result.returncode == 2
    assert "ANTHROPIC_API_KEY" in result.stderr


def test_live_lines_report_each_iteration_with_spend(home, project, model):
    model([text("nothing yet"), FIX, text("fixed")])
    result = loopwright("run", str(write_spec(project)))
    lines = [line for line in result.stdout.splitlines() if line.startswith("iteration")]
    assert len(lines) == 2
    assert all("spent $" in line for line in lines)
    assert result.stdout.splitlines()[-1].startswith("succeeded: all checks passed in iteration 2")
