"""Sub-agents in real runs: the command maker (a scripted CLI agent in the container) and the rubric
reviewer (the real SDK against the scripted model server, on a model of its own)."""

import json
import socket
import subprocess
from pathlib import Path

from conftest import loopwright, run_id_of, trace, write_spec
from model_server import text, tool_use

MAKER_MODEL, REVIEWER_MODEL = "claude-sonnet-5-5", "claude-haiku-5-5"
FIX = tool_use("edit_file", {"path": "calc.py", "old_text": "(len(numbers) + 1)", "new_text": "len(numbers)"},
               text="PURPLE-ELEPHANT: I found the off-by-one and I am sure this is right.")
PYTEST = {"kind": "command", "run": "python3 -m pytest -q -p no:cacheprovider", "protect": ["tests/**"]}
RUBRIC = "The fix corrects the divisor in average(); no test is weakened or deleted."


def status(run_id: str) -> dict:
    result = loopwright("status", run_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def git_show(repo: Path, ref: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), "show", ref], capture_output=True, text=True)


# --- the command maker ---------------------------------------------------------------------------


def command_agent(mode: str) -> dict:
    return {"kind": "command", "command": f"python3 fake_agent.py {{prompt_file}} {mode}"}


def test_command_maker_runs_the_cli_agent_inside_the_sandbox_and_the_run_succeeds(home, agent_project):
    result = loopwright("run", str(write_spec(agent_project, agent=command_agent("always"))))
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = run_id_of(result)
    run = status(run_id)
    assert (run["status"], run["iteration"]) == ("succeeded", 1)
    assert "sum(numbers) / len(numbers)" in git_show(agent_project, f"{run['branch']}:calc.py").stdout

    [call] = [e["data"] for e in trace(run_id) if e["kind"] == "tool_call"]
    assert call["tool"] == "run_command"
    assert call["input"] == {"command": "python3 fake_agent.py .loopwright/prompt.md always"}
    assert "in_docker=True" in call["output"] and "cwd=/workspace" in call["output"]
    assert f"hostname={socket.gethostname()} " not in call["output"]


def test_command_maker_prompt_in_iteration_two_holds_the_latest_verdict(home, agent_project):
    result = loopwright("run", str(write_spec(agent_project, agent=command_agent("after-feedback"))))
    assert result.returncode == 0, result.stdout + result.stderr
    run = status(run_id_of(result))
    assert (run["status"], run["iteration"]) == ("succeeded", 2)

    prompt = (Path(run["worktree"]) / ".loopwright" / "prompt.md").read_text()  # the last one written
    assert "Make the test suite pass by fixing calc.py" in prompt  # the goal
    assert "Never edit files under tests/" in prompt  # the constraints
    assert "# Latest verdict (iteration 1): FAILED" in prompt
    assert "assert 1.5 == 2" in prompt  # the failing check's own output


def test_command_maker_prompt_file_stays_out_of_the_runs_commit(home, agent_project):
    result = loopwright("run", str(write_spec(agent_project, agent=command_agent("always"))))
    assert result.returncode == 0, result.stdout + result.stderr
    run = status(run_id_of(result))
    assert (Path(run["worktree"]) / ".loopwright" / "prompt.md").exists()
    assert git_show(agent_project, f"{run['branch']}:.loopwright/prompt.md").returncode != 0
    assert git_show(agent_project, f"{run['branch']}:calc.py").returncode == 0


def test_command_maker_does_not_write_its_prompt_through_a_symlink_the_agent_planted(home, agent_project, tmp_path):
    outside = tmp_path / "host-folder"
    outside.mkdir()
    plant = f"rm -rf .loopwright && ln -s {outside} .loopwright"  # the host path, as an agent could guess it
    spec = write_spec(agent_project, agent={"kind": "command", "command": plant, "accept_unknown_cost": True},
                      stop={"max_iterations": 2})
    result = loopwright("run", str(spec))
    assert result.returncode == 1, result.stdout + result.stderr
    run = status(run_id_of(result))
    assert (run["status"], run["iteration"]) == ("failed", 2)  # iteration 2 wrote its prompt and ran
    assert list(outside.iterdir()) == []


def test_command_maker_run_stops_when_the_wall_time_runs_out(home, agent_project):
    spec = write_spec(agent_project, agent={"kind": "command", "command": "sleep 3", "accept_unknown_cost": True},
                      stop={"max_wall_time": "2s"})
    result = loopwright("run", str(spec))
    assert result.returncode == 1
    run = status(run_id_of(result))
    assert run["status"] == "failed" and run["reason"].startswith("max_wall_time")


# --- the rubric reviewer ---------------------------------------------------------------------------


def verdict(*criteria: tuple[str, bool, str]) -> dict:
    return tool_use("submit_verdict", {
        "criteria": [{"criterion": c, "passed": ok, "reason": why} for c, ok, why in criteria],
        "passed": all(ok for _, ok, _ in criteria),
    })


PASS = verdict(("divisor fixed", True, "calc.py now divides by len(numbers)"), ("tests intact", True, "no test changed"))


def scripted(maker: list[dict], reviewer: list[dict]):
    """Replies by model: the maker and the reviewer each follow their own script."""
    def reply(request: dict) -> dict:
        return (reviewer if request["model"] == REVIEWER_MODEL else maker).pop(0)
    return reply


def requests_of(server, model: str) -> list[dict]:
    return [r for r in server.requests if r["model"] == model]


def rubric_spec(project: Path) -> Path:
    return write_spec(project, verify=[PYTEST, {"kind": "rubric", "model": REVIEWER_MODEL, "rubric": RUBRIC}])


def test_rubric_reviewer_sees_goal_rubric_and_diff_but_no_text_of_the_maker(home, project, model):
    server = model(scripted([FIX, text("Done. PURPLE-ELEPHANT says all tests pass.")], [PASS]))
    result = loopwright("run", str(rubric_spec(project)))
    assert result.returncode == 0, result.stdout + result.stderr

    [review] = requests_of(server, REVIEWER_MODEL)
    seen = json.dumps(review)
    assert "PURPLE-ELEPHANT" not in seen  # the maker's own account never reaches the reviewer
    assert "PURPLE-ELEPHANT" in json.dumps(requests_of(server, MAKER_MODEL))
    assert RUBRIC in seen and "Make the test suite pass by fixing calc.py" in seen
    assert "-    return sum(numbers) / (len(numbers) + 1)" in seen and "+    return sum(numbers) / len(numbers)" in seen
    assert [tool["name"] for tool in review["tools"]] == ["submit_verdict"]
    assert review["tool_choice"] == {"type": "tool", "name": "submit_verdict"}
    assert len(review["messages"]) == 1  # a conversation of its own


def test_failing_rubric_fails_the_iteration_and_its_reasons_open_the_next(home, project, model):
    failing = verdict(("divisor fixed", True, "the divisor is len(numbers)"),
                      ("no special cases", False, "calc.py hard-codes a branch for lists of length three"))
    server = model(scripted([FIX, text("done"), text("I kept the fix.")], [failing, PASS]))
    result = loopwright("run", str(rubric_spec(project)))
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = run_id_of(result)
    assert (status(run_id)["iteration"]) == 2

    first = [e["data"] for e in trace(run_id) if e["kind"] == "verdict"][0]
    checks = {c["name"]: c for c in first["checks"]}
    assert checks[f"command: {PYTEST['run']}"]["passed"] is True
    assert checks["rubric"]["passed"] is False
    assert "no special cases: calc.py hard-codes a branch for lists of length three" in checks["rubric"]["feedback"]

    opening = json.dumps(requests_of(server, MAKER_MODEL)[2]["messages"][0])
    assert "## rubric: FAILED" in opening
    assert "calc.py hard-codes a branch for lists of length three" in opening


def test_passing_rubric_and_passing_command_succeed(home, project, model):
    model(scripted([FIX, text("done")], [PASS]))
    result = loopwright("run", str(rubric_spec(project)))
    assert result.returncode == 0, result.stdout + result.stderr
    run = status(run_id_of(result))
    assert (run["status"], run["iteration"]) == ("succeeded", 1)
    assert [c["passed"] for c in run["last_verdict"]["checks"]] == [True, True, True]


def test_rubric_reviewers_model_call_is_traced_and_counts_against_the_budget(home, project, model):
    model(scripted([FIX, text("done")], [PASS]))
    result = loopwright("run", str(rubric_spec(project)))
    run_id = run_id_of(result)
    calls = [e for e in trace(run_id) if e["kind"] == "model_call"]
    reviews = [e for e in calls if e["data"]["model"] == REVIEWER_MODEL]
    assert len(reviews) == 1 and reviews[0]["cost_usd"] > 0 and reviews[0]["output_tokens"] > 0
    assert status(run_id)["spent_usd"] == round(sum(e["cost_usd"] for e in calls), 6)


def test_rubric_reviewer_without_an_api_key_refuses_the_run_before_it_starts(home, agent_project):
    spec = write_spec(agent_project, agent=command_agent("always"),
                      verify=[PYTEST, {"kind": "rubric", "rubric": RUBRIC}])
    result = loopwright("run", str(spec))
    assert result.returncode == 2
    assert "rubric reviewer needs ANTHROPIC_API_KEY" in result.stderr
