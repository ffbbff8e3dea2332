"""Verdicts that measure progress, through the real engine with a scripted maker: scores, what
changed, stall by trend, a person asked at a stall, keep-best, and a commit per iteration."""

import subprocess
from pathlib import Path

import anyio
import pytest
from mcp import Client

from conftest import git_repository, loopwright, run_id_of, trace, write_spec
from model_server import text, tool_use
from test_engine import status
from test_mcp_stdio import call, server_params, until_finished

NAMES = ["one", "two", "three", "four", "five"]
TEST = "tests.test_funcs::test_"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def funcs(fixed: set[str], broken_with: str = "") -> str:
    """funcs.py with the functions in `fixed` right; the others return 0 (or raise `broken_with`)."""
    wrong = f"raise ValueError({broken_with!r})" if broken_with else "return 0"
    return "".join(f"def {name}():\n    {'return ' + str(i + 1) if name in fixed else wrong}\n\n"
                   for i, name in enumerate(NAMES))


@pytest.fixture
def five(project) -> Path:
    """A repository with five failing tests, one per function of funcs.py; its spec is loop.toml."""
    repo = project.parent / "five"
    tests = "from funcs import " + ", ".join(NAMES) + "\n\n" + "".join(
        f"def test_{name}():\n    assert {name}() == {i + 1}\n\n" for i, name in enumerate(NAMES))
    spec = (project / "loop.toml").read_text().replace("calc.py", "funcs.py")
    return git_repository(repo, {"funcs.py": funcs(set()), "tests/test_funcs.py": tests, "loop.toml": spec})


@pytest.fixture
def scored(project) -> Path:
    """A repository whose check prints a figure, read from value.txt, that higher is better."""
    repo = project.parent / "scored"
    score = "value = open('value.txt').read().split()[0]\nprint('evaluating ...')\nprint(f'score: {value}')\n"
    spec = (project / "loop.toml").read_text().split("[[verify]]")[0] + (
        '[[verify]]\nkind = "command"\nrun = "python3 score.py"\nprotect = ["score.py"]\n'
        '[verify.metric]\npattern = "score: ([0-9.]+)"\nbetter = "higher"\n\n[stop]\nmax_iterations = 4\n')
    return git_repository(repo, {"score.py": score, "value.txt": "0.5\n", "loop.toml": spec})


def writes(path: str, content: str) -> list[dict]:
    """One iteration of the maker: write a file, then end the turn."""
    return [tool_use("write_file", {"path": path, "content": content}), text("Done for now.")]


def opening(request: dict) -> str:
    content = request["messages"][0]["content"]
    return content if isinstance(content, str) else "".join(block.get("text", "") for block in content)


def opening_of(server, iteration: int) -> str:
    """The first message of the given iteration (the first request of each iteration has one message)."""
    openings = [opening(r) for r in server.requests if len(r["messages"]) == 1]
    return openings[iteration - 1]


def test_a_maker_that_fixes_one_test_per_iteration_never_stalls_and_every_iteration_is_a_commit(home, five, model):
    script = [step for k in range(1, 6) for step in writes("funcs.py", funcs(set(NAMES[:k])))]
    server = model(script)
    result = loopwright("run", str(write_spec(five, stop={"stall_after": 2, "max_iterations": 6})))
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = run_id_of(result)
    run = status(run_id)
    assert (run["status"], run["iteration"]) == ("succeeded", 5)

    third = opening_of(server, 3)
    assert f"- fixed: {TEST}two" in third
    assert f"- still failing: {TEST}three (assert 0 == 3" in third  # each failure with its first error line
    assert "(3 failed, 2 passed), was 4 failed, 1 passed" in third and "- score 3 (lower is better" in third

    subjects = git(five, "log", "--format=%s", f"main..{run['branch']}").splitlines()[::-1]
    check = "command: python3 -m pytest -q -p no:cacheprovider"
    assert subjects[:5] == [f"iteration {k}: FAIL {check} ({5 - k} failed, {k} passed)" for k in range(1, 5)] + [
        "iteration 5: pass"]
    assert subjects[5] == f"loopwright: fix-failing-test run {run_id} (succeeded)"  # the outcome

    third = loopwright("diff", run_id, "3")
    assert third.returncode == 0, third.stderr
    changed = [line for line in third.stdout.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == ["-    return 0", "+    return 3"]  # iteration 3 fixed three(), nothing else
    whole = loopwright("diff", run_id).stdout
    assert whole.count("+    return ") == 5
    missing = loopwright("diff", run_id, "9")
    assert missing.returncode == 2 and "no commit for iteration 9" in missing.stderr


def test_the_same_tests_failing_with_new_words_each_iteration_stall_after_stall_after(home, five, model):
    words = ["apple", "banana", "cherry", "damson", "elder", "fig"]
    model([step for word in words for step in writes("funcs.py", funcs(set(), broken_with=word))])
    result = loopwright("run", str(write_spec(five, stop={"stall_after": 3, "max_iterations": 6})))
    assert result.returncode == 1
    run = status(run_id_of(result))
    assert (run["status"], run["iteration"]) == ("stalled", 3)
    assert run["reason"].startswith("stall_after: the same failure 3 iterations in a row")
    assert f"{TEST}one, {TEST}two, {TEST}three" in run["reason"]


def test_going_back_and_forth_between_two_failure_sets_stalls(home, five, model):
    a, b = funcs({"one", "two"}), funcs({"three", "four"})  # three tests fail either way
    model(writes("funcs.py", a) + writes("funcs.py", b) + writes("funcs.py", a) + writes("funcs.py", b))
    result = loopwright("run", str(write_spec(five, stop={"stall_after": 2, "max_iterations": 4})))
    run = status(run_id_of(result))
    assert (run["status"], run["iteration"]) == ("stalled", 3)
    assert "goes back and forth between the same failures" in run["reason"]


def test_a_regression_is_named_with_the_iteration_that_broke_it(home, five, model):
    server = model([text("Reading first.")] + writes("funcs.py", funcs({"one"}))
                   + writes("funcs.py", funcs({"two", "three"})) + [text("Looking again.")])
    result = loopwright("run", str(write_spec(five, stop={"stall_after": 3, "max_iterations": 4})))
    run_id = run_id_of(result)
    fourth = opening_of(server, 4)
    assert f"- regression: {TEST}one (assert 0 == 1" in fourth
    assert f"passed in iteration 2, broken in iteration 3 (`loopwright diff {run_id} 3`" in fourth
    assert f"- fixed: {TEST}two" in fourth  # and the working memory says what changed, not the wrapper
    assert f"(fixed 2, 1 regression(s) ({TEST}one))" in fourth


def test_a_metric_that_improves_never_stalls_and_a_flat_one_does(home, scored, model):
    model([step for value in ("0.61", "0.70", "0.80", "0.87") for step in writes("value.txt", value)])
    result = loopwright("run", str(write_spec(scored, stop={"stall_after": 2})))
    run = status(run_id_of(result))
    assert (run["status"], run["iteration"]) == ("failed", 4)  # no target: it improved until max_iterations
    scores = [c["score"] for e in trace(run_id_of(result)) if e["kind"] == "verdict" for c in e["data"]["checks"][1:]]
    assert scores == [0.61, 0.70, 0.80, 0.87]

    model([step for note in ("first", "second", "third") for step in writes("value.txt", f"0.5 {note} try")])
    result = loopwright("run", str(write_spec(scored, stop={"stall_after": 2})))
    run = status(run_id_of(result))
    assert (run["status"], run["iteration"]) == ("stalled", 2)


def test_a_metric_target_reached_passes(home, scored, model):
    model(writes("value.txt", "0.7") + writes("value.txt", "0.93"))
    spec = (scored / "loop.toml").read_text().replace('better = "higher"', 'better = "higher"\ntarget = 0.9')
    (scored / "loop.toml").write_text(spec)
    result = loopwright("run", str(write_spec(scored)))
    assert result.returncode == 0, result.stdout
    assert "iteration 1: FAIL command: python3 score.py (metric 0.7 (target 0.9))" in result.stdout


def test_keep_best_sets_a_worse_iteration_aside_and_the_next_starts_from_the_best_tree(home, scored, model):
    server = model(writes("value.txt", "0.6") + writes("value.txt", "0.8") + writes("value.txt", "0.7")
                   + [tool_use("read_file", {"path": "value.txt"}), text("Read it.")])
    result = loopwright("run", str(write_spec(scored, keep="best", stop={"stall_after": 3})))
    run_id = run_id_of(result)
    fourth = opening_of(server, 4)
    assert "Iteration 3 did worse than iteration 2, so its changes were set aside" in fourth
    read = next(r for r in server.requests if len(r["messages"]) > 1 and opening(r) == fourth)
    assert "0.8" in read["messages"][-1]["content"][0]["content"]  # iteration 4 reads iteration 2's file
    [discard] = [e for e in trace(run_id) if e["kind"] == "iteration_discarded"]
    assert (discard["iteration"], discard["data"]["best_iteration"]) == (3, 2)
    run = status(run_id)
    assert git(scored, "show", f"{run['branch']}:value.txt").strip() == "0.8"  # the outcome is the best tree
    assert "iteration 3 set aside: back to the tree of iteration 2" in git(scored, "log", "--format=%s", run["branch"])


def test_on_stall_hint_tells_the_maker_and_gives_it_another_round(home, project, model):
    server = model(lambda request: text("Still thinking."))
    result = loopwright("run", str(write_spec(project, stop={"stall_after": 2, "on_stall": "hint", "max_iterations": 8})))
    run = status(run_id_of(result))
    assert (run["status"], run["iteration"]) == ("stalled", 4)  # a hint at 2, then stop at the next stall
    assert "The loop has stalled (the same failure 2 iterations in a row" in opening_of(server, 3)


async def stalled_run_asking(client: Client, project: Path) -> tuple[str, dict]:
    spec = write_spec(project, stop={"stall_after": 2, "on_stall": "ask", "max_iterations": 5}).read_text()
    started = await call(client, "start_loop", spec=spec)
    progress = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    with anyio.fail_after(120):
        while True:
            result = await client.call_tool("wait_for_run", {"run_id": started["run_id"], "timeout_s": 5},
                                            progress_callback=on_progress)
            if result.structured_content["status"] == "waiting_approval":
                break
    [approval] = (await call(client, "list_approvals", run_id=started["run_id"]))["approvals"]
    assert approval["tool"] == "(stall)" and "the same failure 2 iterations in a row" in approval["input"]["reason"]
    assert any(f"answer approval {approval['approval_id']} with decide_approval" in m for m in progress)
    return started["run_id"], approval


@pytest.mark.anyio
async def test_on_stall_ask_pauses_for_a_person_whose_note_the_maker_reads_next(home, project, model):
    from conftest import FIX

    server = model([text("Thinking."), text("Still thinking."), FIX, text("Fixed.")])
    async with Client(server_params(project / "loops")) as client:
        run_id, approval = await stalled_run_asking(client, project)
        assert (await call(client, "get_run", run_id=run_id))["iteration"] == 2
        await call(client, "decide_approval", approval_id=approval["approval_id"], allow=True,
                   note="The bug is in average(): look at the divisor.")
        run = await until_finished(client, run_id)
    assert (run["status"], run["iteration"]) == ("succeeded", 3)
    assert "# A person's note (read it first)\nThe bug is in average(): look at the divisor." in opening_of(server, 3)


@pytest.mark.anyio
async def test_on_stall_ask_denied_stops_the_run(home, project, model):
    server = model(lambda request: text("Thinking."))
    async with Client(server_params(project / "loops")) as client:
        run_id, approval = await stalled_run_asking(client, project)
        await call(client, "decide_approval", approval_id=approval["approval_id"], allow=False, note="not worth it")
        run = await until_finished(client, run_id)
    assert (run["status"], run["iteration"]) == ("stalled", 2)
    assert run["reason"].endswith("a person stopped the run: not worth it")
    assert len(server.requests) == 2  # the maker was not called again
