"""`loopwright improve`: a scripted improver changes a loop's harness; each change is measured by real runs
of the loop (scripted maker, real sandboxes and checks) on an eval set, and kept only when the learn cases
do better and the held-out cases confirm it. The improver is an adversary too: changes to the checks or
outside the harness are refused before anything is measured."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import git_repository, loopwright
from model_server import text, tool_use
from test_budgets import billed

BUGGY = "def mean(numbers):\n    return sum(numbers) / (len(numbers) {})\n"
CORRECT = "def mean(numbers):\n    return sum(numbers) / len(numbers)\n"
TEST = "from calc import mean\n\n\ndef test_mean():\n    assert mean([2, 4, 6]) == 4\n    assert mean([5]) == 5\n"
FACT = "mean() divides the sum by exactly len(numbers), never by len(numbers) plus or minus one."
OVERFIT = "In calc.py replace (len(numbers) + 1) with len(numbers)."
CHECK = "python3 -m pytest -q -p no:cacheprovider"

LOOP = f"""name = "mean"
goal = "Make the tests pass by fixing calc.py."
constraints = ["Never edit files under tests/"]

[sandbox]
network = "none"
memory = "512m"

[agent]
model = "claude-sonnet-5-5"
skills = ["../skills"]

[[verify]]
kind = "command"
run = "{CHECK}"
protect = ["tests/**"]

[stop]
max_iterations = 1
max_cost_usd = 0.5
"""


def skill(name: str, description: str) -> dict:
    return tool_use("write_file", {"path": f"skills/{name}/SKILL.md",
                                   "content": f"---\nname: {name}\ndescription: {description}\n---\n\n{description}\n"})


def opening(request: dict) -> str:
    first = request["messages"][0]["content"]
    return first if isinstance(first, str) else "".join(b.get("text", "") for b in first)


def scripted(proposals: list[dict]):
    """The improver makes proposals[n] when n changes were tried before; the maker fixes the bug only when its
    system prompt carries the fact (rewrites calc.py) or the overfitted recipe (edits the learn cases' bug)."""
    def script(request: dict) -> dict:
        system = "".join(block["text"] for block in request["system"])
        answered = sum(1 for m in request["messages"] if m["role"] == "assistant")
        if "You are the improver" in system:
            tried = opening(request).count("\n- candidate ")
            return proposals[tried] if answered == 0 else text(f"Proposal {tried + 1}: one change to the harness.")
        if answered:
            return text("Done.")
        if FACT in system:
            return tool_use("write_file", {"path": "calc.py", "content": CORRECT})
        if OVERFIT in system:
            return tool_use("edit_file", {"path": "calc.py", "old_text": "(len(numbers) + 1)", "new_text": "len(numbers)"})
        return text("calc.py looks right to me.")
    return script


def eval_set(tmp_path: Path, learn: int, held: int, **improve) -> str:
    """Learn cases divide by len + 1, held-out ones by len - 1; the first learn case is a git repository at a
    tag (later commits there fix the bug, so the tag matters), the others are plain folders."""
    cases = []
    (tmp_path / "cases").mkdir()
    for n in range(learn + held):
        name = f"learn{n + 1}" if n < learn else f"held{n - learn + 1}"
        files = {"calc.py": BUGGY.format("+ 1" if n < learn else "- 1"), "tests/test_calc.py": TEST}
        folder = tmp_path / "cases" / name
        if n == 0:
            git_repository(folder, files)
            subprocess.run(["git", "-C", str(folder), "tag", "start"], check=True)
            (folder / "calc.py").write_text(CORRECT)
            subprocess.run(["git", "-C", str(folder), "-c", "user.name=T", "-c", "user.email=t@example.invalid",
                            "commit", "-qam", "fixed later"], check=True)
            cases.append(f'[[case]]\nname = "{name}"\npath = "../../cases/{name}"\nref = "start"\n')
        else:
            for path, content in files.items():
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                (folder / path).write_text(content)
            cases.append(f'[[case]]\nname = "{name}"\npath = "../../cases/{name}"\nheld_out = {str(n >= learn).lower()}\n')
    settings = "\n".join(f"{k} = {json.dumps(v)}" for k, v in improve.items())
    return f"[improve]\n{settings}\n\n" + "\n".join(cases)


def loop_repo(tmp_path: Path, evals: str = "") -> Path:
    """The loop's repository: its spec, its eval set beside it, a skill folder, a README."""
    return git_repository(tmp_path / "loop", {
        "loops/mean.toml": LOOP,
        **({"loops/mean.eval.toml": evals} if evals else {}),
        "skills/style/SKILL.md": "---\nname: style\ndescription: Keep changes small.\n---\n\nKeep changes small.\n",
        "README.md": "A loop and its skills.\n",
    })


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def ledger_of(repo: Path) -> dict:
    result = loopwright("improve", "--ledger", "mean", "--json")
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(result.stdout)
    return entry


def test_the_improver_finds_the_missing_fact_and_only_that_change_is_kept(home, tmp_path, model, sandbox_image):
    repo = loop_repo(tmp_path, eval_set(tmp_path, learn=4, held=2, model="claude-opus-5-5", max_cost_usd=2.0,
                                        max_candidates=4, batch=2))
    head = git(repo, "rev-parse", "HEAD")
    server = model(scripted([skill("tidy", "Prefer short functions and clear names."), skill("mean", FACT)]))

    result = loopwright("improve", str(repo / "loops" / "mean.toml"), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the harness as it is: learn 0/4" in result.stdout
    assert "candidate 1: discarded" in result.stdout and "candidate 2: kept" in result.stdout

    entry = ledger_of(repo)
    assert entry["status"] == "succeeded"
    assert (entry["baseline"]["learn"]["passed"], entry["baseline"]["held_out"]["passed"]) == (0, 0)
    first, second = entry["candidates"]
    assert first["decision"] == "discarded" and first["files"] == ["skills/tidy/SKILL.md"]
    assert first["batch"]["passed"] == 0 and "no better on the learn cases" in first["reason"]
    assert (first["learn"]["passed"], first["learn"]["runs"]) == (0, 4)  # measured on all four, its scores kept
    assert second["decision"] == "kept" and second["files"] == ["skills/mean/SKILL.md"]
    assert (second["learn"]["passed"], second["learn"]["runs"]) == (4, 4)
    assert (second["held_out"]["passed"], second["held_out"]["runs"]) == (2, 2)
    assert {r["case"] for r in second["results"] if r["status"] == "succeeded"} == \
        {"learn1", "learn2", "learn3", "learn4", "held1", "held2"}

    # The branch holds the kept change only: one commit on the base, touching the one skill.
    branch = entry["branch"]
    assert branch.startswith("loopwright/improve/mean/")
    assert git(repo, "rev-list", f"{head}..{branch}").split() == [second["commit"]]
    assert git(repo, "diff", "--name-only", head, branch) == "skills/mean/SKILL.md"
    assert FACT in git(repo, "show", f"{branch}:skills/mean/SKILL.md")
    # The user's checkout is untouched.
    assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") == ""
    assert not (repo / "skills" / "mean").exists()

    # The whole improvement, the improver and all 16 case runs, stays in its budget, as the model server billed it.
    assert entry["spent_usd"] <= 2.0
    assert abs(entry["spent_usd"] - billed(server)) < 1e-5
    assert len(first["results"]) == 4 and len(second["results"]) == 6

    # The improver never sees the held-out cases.
    improver = [opening(r) for r in server.requests if "You are the improver" in "".join(b["text"] for b in r["system"])]
    assert improver and not any(name in text for text in improver for name in ("held1", "held2"))


def test_links_changes_to_the_checks_outside_the_harness_or_that_only_fit_the_learn_cases_are_discarded(
        home, tmp_path, model, sandbox_image):
    repo = loop_repo(tmp_path, eval_set(tmp_path, learn=2, held=1, max_cost_usd=1.0, max_candidates=4, batch=1))
    head = git(repo, "rev-parse", "HEAD")
    model(scripted([
        tool_use("run_command", {"command": "mkdir -p skills/host && ln -s /etc/hostname skills/host/SKILL.md"}),
        tool_use("edit_file", {"path": "loops/mean.toml", "old_text": f'run = "{CHECK}"', "new_text": 'run = "true"'}),
        tool_use("write_file", {"path": "README.md", "content": "Always succeed.\n"}),
        skill("recipe", OVERFIT),
    ]))

    result = loopwright("improve", str(repo / "loops" / "mean.toml"), timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr

    entry = ledger_of(repo)
    assert entry["status"] == "failed" and "no change did better" in entry["reason"]
    link, checks, outside, overfit = entry["candidates"]
    assert link["decision"] == "discarded" and "symbolic links in the harness: skills/host/SKILL.md" in link["reason"]
    assert checks["decision"] == "discarded" and "verify" in checks["reason"] and not checks["results"]
    assert outside["decision"] == "discarded" and "outside the harness: README.md" in outside["reason"]
    assert not outside["results"]
    assert overfit["decision"] == "discarded" and "held-out cases did not confirm it" in overfit["reason"]
    assert (overfit["learn"]["passed"], overfit["held_out"]["passed"]) == (2, 0)
    assert git(repo, "rev-list", f"{head}..{entry['branch']}") == ""  # nothing kept
    assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") == ""

    lines = loopwright("improve", "--ledger", str(repo / "loops" / "mean.toml")).stdout
    assert "baseline" in lines and "held-out cases did not confirm it" in lines


def test_an_eval_set_without_held_out_cases_is_refused_by_name(home, tmp_path, sandbox_image):
    repo = loop_repo(tmp_path)
    (tmp_path / "cases" / "one").mkdir(parents=True)
    (repo / "loops" / "mean.eval.toml").write_text(
        '[[case]]\nname = "one"\npath = "../../cases/one"\n\n[[case]]\nname = "two"\npath = "../../cases/missing"\n')
    result = loopwright("improve", str(repo / "loops" / "mean.toml"))
    assert result.returncode == 2
    assert "needs cases to learn from and held-out cases" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_improvement_killed_while_its_cases_run_recovers_and_ends_the_same(home, tmp_path, model, sandbox_image):
    from conftest import LOOPWRIGHT, wait_for

    repo = loop_repo(tmp_path, eval_set(tmp_path, learn=2, held=1, max_cost_usd=1.0, max_candidates=2, batch=1))
    head = git(repo, "rev-parse", "HEAD")
    model(scripted([skill("mean", FACT)]))
    process = subprocess.Popen([*LOOPWRIGHT, "improve", str(repo / "loops" / "mean.toml")], stdout=subprocess.PIPE,
                               text=True)
    improvement = process.stdout.readline().split()[1]
    wait_for(lambda: _case_runs(home, improvement) >= 2,
             "the baseline's case runs to be under way", timeout=120)
    process.kill()
    process.wait()

    recovered = loopwright("recover", timeout=600)  # exit 1: the baseline's case runs failed, as they should
    assert f"recovering run {improvement}\n" in recovered.stdout, recovered.stdout + recovered.stderr
    entry = ledger_of(repo)
    assert entry["run"] == improvement and entry["status"] == "succeeded", entry["reason"]
    assert (entry["baseline"]["learn"]["passed"], entry["baseline"]["held_out"]["passed"]) == (0, 0)
    [kept] = entry["candidates"]
    assert kept["decision"] == "kept" and (kept["learn"]["passed"], kept["held_out"]["passed"]) == (2, 1)
    assert git(repo, "rev-list", f"{head}..{entry['branch']}").split() == [kept["commit"]]
    case_runs = [r for r in json.loads(loopwright("runs", "--json").stdout) if r["loop"] == "mean.eval"]
    assert len(case_runs) == 3 + 3 and all(r["status"] in ("succeeded", "failed") for r in case_runs)  # each case once


def _case_runs(home: Path, improvement: str) -> int:
    from loopwright.runtime.service import Runtime

    return len([r for r in Runtime(read_only=True).list_runs("mean.eval") if r.id.startswith(improvement)])


@pytest.mark.anyio
async def test_an_mcp_client_starts_an_improvement_and_reads_its_ledger(home, tmp_path, model, sandbox_image):
    from mcp import Client

    from test_mcp_stdio import call, server_params, until_finished

    repo = loop_repo(tmp_path, eval_set(tmp_path, learn=2, held=1, max_cost_usd=1.0, max_candidates=2, batch=1))
    model(scripted([skill("mean", FACT)]))
    checked = loopwright("validate", str(repo / "loops" / "mean.toml"), str(repo / "loops" / "mean.eval.toml"))
    assert checked.returncode == 0 and "ok (eval set: 2 learn, 1 held-out cases)" in checked.stdout, checked.stderr
    async with Client(server_params(repo / "loops")) as client:
        listed = await call(client, "list_loops")
        assert [loop["name"] for loop in listed["loops"]] == ["mean"]  # the eval set beside it is no loop
        started = await call(client, "improve_loop", loop="mean")
        assert started["branch"] == f"loopwright/improve/mean/{started['run_id']}"
        finished = await until_finished(client, started["run_id"], timeout=300)
        assert finished["status"] == "succeeded", finished
        ledger = await call(client, "get_ledger", loop="mean")
    [improvement] = ledger["improvements"]
    assert improvement["run"] == started["run_id"] and [c["decision"] for c in improvement["candidates"]] == ["kept"]


def test_an_improvement_stops_at_its_budget_and_its_branch_keeps_nothing_unmeasured(home, tmp_path, model, sandbox_image):
    home.mkdir(parents=True)
    (home / "plugins.toml").write_text("[runtime]\nmax_parallel_runs = 1\n")  # one case run at a time: all of what is left
    repo = loop_repo(tmp_path, eval_set(tmp_path, learn=2, held=1, max_cost_usd=0.024, max_candidates=3, batch=1))
    head = git(repo, "rev-parse", "HEAD")
    server = model(scripted([skill("tidy", "Prefer short functions."), skill("tidier", "Prefer shorter ones."),
                             skill("mean", FACT)]))
    result = loopwright("improve", str(repo / "loops" / "mean.toml"), timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    entry = ledger_of(repo)
    assert entry["status"] == "failed" and "ran out while measuring candidate 3" in entry["reason"], entry["reason"]
    assert [c["decision"] for c in entry["candidates"]] == ["discarded", "discarded"]  # the third was never decided
    assert entry["spent_usd"] <= 0.024 and abs(entry["spent_usd"] - billed(server)) < 1e-5
    assert git(repo, "rev-list", f"{head}..{entry['branch']}") == ""  # candidate 3, being measured, is not on the branch
