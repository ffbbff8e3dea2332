"""What loops cost: per-call input that stays flat, and a `max_cost_usd` that holds for every maker and
every role (the real CLI, Docker sandboxes, the real SDK against the scripted model server)."""

import itertools
import json
import re

import pytest

from conftest import loopwright, run_id_of, trace, write_spec
from model_server import text, tool_use
from loopwright.plugins.command_maker import usage_report
from loopwright.runtime.config import DEFAULT_PRICES

MAKER_MODEL, REVIEWER_MODEL = "claude-haiku-5-5", "claude-opus-5-5"
PYTEST = {"kind": "command", "run": "python3 -m pytest -q -p no:cacheprovider", "protect": ["tests/**"]}


def status(run_id: str) -> dict:
    result = loopwright("status", run_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def prompt_tokens(response: dict) -> int:
    usage = response["usage"]
    return usage["input_tokens"] + usage["cache_creation_input_tokens"] + usage["cache_read_input_tokens"]


def billed(server, model: str | None = None) -> float:
    """What the model server's answers cost at the default prices: the spend as the provider sees it."""
    total = 0.0
    for response in server.responses:
        if model and response["model"] != model:
            continue
        price, usage = DEFAULT_PRICES[response["model"]], response["usage"]
        total += (usage["input_tokens"] * price["input"] + usage["output_tokens"] * price["output"]
                  + usage["cache_creation_input_tokens"] * price["cache_write"]
                  + usage["cache_read_input_tokens"] * price["cache_read"]) / 1_000_000
    return total


# --- context that stays flat -------------------------------------------------------------------------


def eight_calls_then_text():
    """Eight commands of 2,000 characters of output each, then the end of the turn in words of its own."""
    turns = itertools.count(1)

    def reply(request: dict) -> dict:
        done = sum(1 for m in request["messages"] if m["role"] == "assistant" for b in m["content"] if b["type"] == "tool_use")
        if done < 8:
            return tool_use("run_command", {"command": f"python3 -c \"print('{done}' * 2000)\""})
        attempt = next(turns)
        return text(f"Attempt {attempt}: ran the eight checks of plan {attempt * 37 % 101}; the average "
                    f"of {attempt} numbers is still off by {attempt % 7 + 1}.")
    return reply


def test_every_call_of_twelve_long_iterations_stays_within_1_2x_of_the_same_call_in_iteration_2(home, project, model):
    server = model(eight_calls_then_text())
    spec = write_spec(project, stop={"max_iterations": 12, "stall_after": 20, "max_cost_usd": 50.0})
    result = loopwright("run", str(spec))
    assert result.returncode == 1, result.stdout + result.stderr
    assert status(run_id_of(result))["iteration"] == 12

    iterations: list[list[int]] = []  # per iteration, each call's whole prompt in tokens, from the server's log
    for request, response in zip(server.requests, server.responses):
        if len(request["messages"]) == 1:
            iterations.append([])
        iterations[-1].append(prompt_tokens(response))
    assert len(iterations) == 12 and all(len(calls) == 9 for calls in iterations)
    second = iterations[1]
    for number, calls in enumerate(iterations[2:], start=3):
        for call, (tokens, reference) in enumerate(zip(calls, second), start=1):
            assert tokens <= 1.2 * reference, f"iteration {number}, call {call}: {tokens} tokens, iteration 2 sent {reference}"
    # Within an iteration older outputs are elided: no call carries more than five whole outputs (500 tokens each).
    assert second[6] < second[5] and max(second) < second[0] + 5.5 * 500


def test_the_run_prints_each_iterations_own_cost_and_its_total_against_the_budget(home, project, model):
    model([tool_use("read_file", {"path": "calc.py"}), text("Looked."),
           tool_use("edit_file", {"path": "calc.py", "old_text": "(len(numbers) + 1)", "new_text": "len(numbers)"}),
           text("Fixed.")])
    result = loopwright("run", str(write_spec(project, stop={"max_cost_usd": 2.0})))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("iteration")]
    costs = [re.search(r"\$(\d+\.\d+) this iteration \(2 model calls, 1 tool calls\) · spent \$(\d+\.\d+) of \$2\.00", line)
             for line in lines]
    assert len(lines) == 2 and all(costs), lines
    calls = [e for e in trace(run_id_of(result)) if e["kind"] == "model_call"]
    for iteration, found in enumerate(costs, start=1):
        own = sum(e["cost_usd"] for e in calls if e["iteration"] == iteration)
        assert float(found[1]) == pytest.approx(own, abs=1e-4)
        assert float(found[2]) == pytest.approx(sum(e["cost_usd"] for e in calls if e["iteration"] <= iteration), abs=1e-4)
    assert float(costs[0][1]) > 0
    assert re.search(r"^succeeded: .* · spent \$\d+\.\d{4} of \$2\.00$", result.stdout.splitlines()[-1])


def test_the_maker_does_not_start_a_call_that_would_cross_the_cap(home, project, model):
    reading = tool_use("run_command", {"command": "python3 -c \"print('x' * 6000)\""})
    server = model([reading] * 40)
    result = loopwright("run", str(write_spec(project, stop={"max_cost_usd": 0.05, "max_iterations": 1},
                                              agent={"max_tool_calls": 40})))
    assert result.returncode == 1, result.stdout + result.stderr
    run = status(run_id_of(result))
    assert run["status"] == "failed"
    assert re.fullmatch(r"max_cost_usd: spent \$0\.0\d+ of \$0\.05, and the next model call would cost about \$0\.\d+",
                        run["reason"])
    assert 2 < len(server.requests) < 40
    assert billed(server) <= 0.05 and run["spent_usd"] == pytest.approx(billed(server), abs=1e-6)


# --- a CLI agent's spend ------------------------------------------------------------------------------


def test_a_cli_agent_that_reports_its_spend_stops_at_max_cost_usd(home, agent_project):
    agent = {"kind": "command", "command": "python3 fake_agent.py {prompt_file} never 0.30"}
    spec = write_spec(agent_project, agent=agent, stop={"max_cost_usd": 1.0, "max_iterations": 10, "stall_after": 10})
    result = loopwright("run", str(spec))
    assert result.returncode == 1, result.stdout + result.stderr
    run = status(run_id_of(result))
    assert run["status"] == "failed" and run["iteration"] == 4
    assert run["reason"] == ("max_cost_usd: spent $0.9000 of $1.00, and the next run of the CLI agent "
                             "would cost about $0.3000")
    assert run["spent_usd"] == pytest.approx(0.9)
    assert run["spend_by_role"] == [{"role": "maker", "model": "claude-sonnet-5-5", "calls": 3, "cost_usd": 0.9}]
    assert len([e for e in trace(run["id"]) if e["kind"] == "tool_call"]) == 3  # the fourth run never started
    assert "iteration 3: FAIL" in result.stdout and "$0.3000 this iteration" in result.stdout


def test_a_cli_agent_that_reports_nothing_is_refused_with_what_to_set(home, agent_project):
    agent = {"kind": "command", "command": "python3 fake_agent.py {prompt_file} always no-report"}
    result = loopwright("run", str(write_spec(agent_project, agent=agent)))
    assert result.returncode == 1, result.stdout + result.stderr
    run = status(run_id_of(result))
    assert run["status"] == "error"
    assert "printed no usage report" in run["reason"] and "accept_unknown_cost = true" in run["reason"]
    assert "claude -p --output-format json" in run["reason"]

    accepted = {**agent, "accept_unknown_cost": True}
    result = loopwright("run", str(write_spec(agent_project, agent=accepted)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert status(run_id_of(result))["spent_usd"] == 0


def test_usage_reports_of_claude_code_and_codex_are_read():
    claude = json.dumps({"type": "result", "subtype": "success", "result": "Done", "total_cost_usd": 0.0421,
                         "usage": {"input_tokens": 5, "cache_creation_input_tokens": 1200, "cache_read_input_tokens": 8000,
                                   "output_tokens": 300, "service_tier": "standard"},
                         "modelUsage": {"claude-haiku-5-5": {"costUSD": 0.001}, "claude-sonnet-5-5": {"costUSD": 0.0411}}})
    assert usage_report(f"exit code 0\n{claude}\n") == (
        "claude-sonnet-5-5",
        {"input_tokens": 5, "output_tokens": 300, "cache_creation_input_tokens": 1200, "cache_read_input_tokens": 8000},
        0.0421,
    )
    codex = "\n".join(json.dumps(e) for e in [
        {"type": "thread.started", "thread_id": "t-1"}, {"type": "turn.started"},
        {"type": "item.completed", "item": {"type": "agent_message", "text": "{not a report}"}},
        {"type": "turn.completed", "usage": {"input_tokens": 24763, "cached_input_tokens": 24448, "output_tokens": 122}},
    ])
    assert usage_report(f"exit code 0\n{codex}\n[stderr]\nwarning\n") == (
        None, {"input_tokens": 315, "cache_read_input_tokens": 24448, "output_tokens": 122}, None)
    assert usage_report("exit code 0\nall done\n{\"type\": \"result\"}\n") is None


# --- a reviewer's spend -------------------------------------------------------------------------------


def failing_review(request: dict) -> dict:
    return tool_use("submit_verdict", {"criteria": [{"criterion": "small change", "passed": False,
                                                     "reason": "notes.txt is far too long"}], "passed": False})


def test_a_rubric_reviewers_calls_count_against_the_budget_and_stop_the_run(home, project, model):
    def reply(request: dict) -> dict:
        if request["model"] == REVIEWER_MODEL:
            return failing_review(request)
        if request["messages"][-1]["role"] == "user" and len(request["messages"]) == 1:
            iteration = len([r for r in server.requests if r["model"] == MAKER_MODEL and len(r["messages"]) == 1])
            return tool_use("write_file", {"path": "notes.txt", "content": f"draft {iteration} " + "words " * 4000})
        return text("Wrote the notes.")

    server = model(reply)
    rubric = {"kind": "rubric", "model": REVIEWER_MODEL, "rubric": "The change is small.", "name": "review"}
    spec = write_spec(project, agent={"model": MAKER_MODEL}, verify=[PYTEST, rubric],
                      stop={"max_cost_usd": 0.10, "max_iterations": 10, "stall_after": 10})
    result = loopwright("run", str(spec))
    assert result.returncode == 1, result.stdout + result.stderr
    run = status(run_id_of(result))
    assert run["status"] == "failed"
    assert re.fullmatch(r"max_cost_usd: spent \$0\.0\d+ of \$0\.10, and the next check's model call would cost about "
                        r"\$0\.\d+", run["reason"])
    reviews = [e for e in trace(run["id"]) if e["kind"] == "model_call" and e["data"]["role"] == "reviewer"]
    assert len(reviews) == len([r for r in server.requests if r["model"] == REVIEWER_MODEL]) >= 2
    roles = {row["role"]: row for row in run["spend_by_role"]}
    assert roles["reviewer"]["model"] == REVIEWER_MODEL and roles["reviewer"]["calls"] == len(reviews)
    assert roles["reviewer"]["cost_usd"] == pytest.approx(billed(server, REVIEWER_MODEL), abs=1e-6)
    assert roles["reviewer"]["cost_usd"] > roles["maker"]["cost_usd"] > 0
    assert billed(server) <= 0.10 and run["spent_usd"] == pytest.approx(billed(server), abs=1e-6)
