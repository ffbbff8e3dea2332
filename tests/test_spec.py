"""Loop specs: what a valid spec means, and how every kind of bad spec is rejected before anything runs."""

from pathlib import Path

import pytest

from conftest import EXAMPLE, loopwright
from loopwright.runtime.spec import SpecError, load_spec, parse_spec_text

# The example from DESIGN.md ("A loop spec"), verbatim.
DESIGN_EXAMPLE = '''
name = "fix-tests"
goal = "Make the test suite pass without weakening any test."
constraints = ["Never edit files under tests/"]   # re-sent every iteration: no drift

[workspace]
repo = "."            # each run gets a git worktree on branch loopwright/<loop>/<run-id>

[sandbox]
image = "python:3.12-slim"
network = "none"
memory = "1g"
tool_timeout_s = 120

[agent]               # the maker: a sub-agent plugin
kind = "anthropic"
model = "claude-sonnet-5-5"
max_tool_calls = 40   # per iteration
skills = ["skills/python-testing"]

[[verify]]            # deterministic check, run in the sandbox after each iteration
kind = "command"
run = "pytest -q"
protect = ["tests/**"]   # the oracle: a maker edit here fails the iteration

[[verify]]            # agentic check by a separate reviewer with its own context
kind = "rubric"
model = "claude-haiku-5-5"
rubric = "The diff fixes the cause; no assertion was weakened or deleted."

[stop]
max_iterations = 10
max_cost_usd = 5.0
max_wall_time = "30m"
stall_after = 3       # iterations without verifier progress

[[trigger]]
kind = "cron"
schedule = "0 7 * * 1-5"
'''

HEAD = 'name = "fix-tests"\ngoal = "Make the tests pass."\n'
CHECK = '\n[[verify]]\nkind = "command"\nrun = "pytest -q"\n'
VALID = HEAD + CHECK


def write(tmp_path: Path, text: str, name: str = "loop.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    return caught.value.problems


# --- a valid spec --------------------------------------------------------------------------------


def test_the_design_example_loads_with_its_budgets_checks_and_trigger():
    spec = parse_spec_text(DESIGN_EXAMPLE)

    assert spec.name == "fix-tests"
    assert spec.constraints == ["Never edit files under tests/"]
    assert (spec.sandbox.image, spec.sandbox.network, spec.sandbox.tool_timeout_s) == ("python:3.12-slim", "none", 120)
    assert (spec.agent.model, spec.agent.max_tool_calls) == ("claude-sonnet-5-5", 40)
    assert (spec.stop.max_iterations, spec.stop.max_cost_usd, spec.stop.stall_after) == (10, 5.0, 3)
    assert spec.stop.wall_time_s == 1800
    assert [check.kind for check in spec.verify] == ["command", "rubric"]
    assert spec.verify[0].protect == ["tests/**"]
    assert [(t.kind, t.schedule) for t in spec.trigger] == [("cron", "0 7 * * 1-5")]


def test_a_rubric_check_keeps_its_model_and_rubric():
    rubric = parse_spec_text(DESIGN_EXAMPLE).verify[1]

    assert rubric.kind == "rubric"
    assert rubric.model == "claude-haiku-5-5"
    assert rubric.rubric.startswith("The diff fixes the cause")


def test_validate_accepts_the_design_example_with_its_rubric_check(home, tmp_path):
    path = write(tmp_path, DESIGN_EXAMPLE)

    result = loopwright("validate", str(path))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": ok (fix-tests)")


def test_validate_reports_a_verifier_kind_no_plugin_provides(home, tmp_path):
    path = write(tmp_path, DESIGN_EXAMPLE.replace('kind = "rubric"', 'kind = "judge"'))

    result = loopwright("validate", str(path))

    assert result.returncode == 2
    assert str(path) in result.stderr
    assert "verify[1].kind: unknown verifier kind 'judge'" in result.stderr
    assert "verify[0]" not in result.stderr  # the command check is known


def test_validate_accepts_the_fix_failing_test_example(home):
    result = loopwright("validate", str(EXAMPLE / "loop.toml"))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": ok (fix-failing-test)")


def test_defaults_fill_every_section_left_out():
    spec = parse_spec_text(VALID)

    assert (spec.sandbox.kind, spec.sandbox.network, spec.sandbox.memory) == ("docker", "none", "1g")
    assert (spec.agent.kind, spec.agent.max_tool_calls) == ("anthropic", 40)
    assert (spec.stop.max_iterations, spec.stop.max_cost_usd, spec.stop.wall_time_s, spec.stop.stall_after) == (10, 5.0, 1800, 3)
    assert spec.trigger == []


@pytest.mark.parametrize(("value", "seconds"), [("90s", 90), ("30m", 1800), ("1.5h", 5400), ("2d", 172800), (45, 45)])
def test_max_wall_time_takes_a_number_of_seconds_or_a_duration(value, seconds):
    wall = f'"{value}"' if isinstance(value, str) else value
    spec = parse_spec_text(VALID + f"\n[stop]\nmax_wall_time = {wall}\n")

    assert spec.stop.wall_time_s == seconds


def test_a_relative_workspace_repo_is_resolved_against_the_spec_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "loops"
    folder.mkdir(parents=True)
    path = write(folder, VALID + '\n[workspace]\nrepo = ".."\n')
    monkeypatch.chdir(tmp_path)  # not the spec's folder: the working directory must not matter

    assert load_spec(path).workspace.repo == str(tmp_path / "project")


def test_an_absolute_workspace_repo_is_kept(tmp_path):
    path = write(tmp_path, VALID + f'\n[workspace]\nrepo = "{tmp_path / "elsewhere"}"\n')

    assert load_spec(path).workspace.repo == str(tmp_path / "elsewhere")


# --- bad specs -------------------------------------------------------------------------------------

BAD_SPECS = [
    pytest.param(HEAD + CHECK + "\n[stop]\nmax_iterations = 0\n", "stop.max_iterations", "greater than or equal to 1", id="zero-iterations"),
    pytest.param(HEAD + CHECK + '\n[sandbox]\nnetwork = "host"\n', "sandbox.network", "'none' or 'bridge'", id="unknown-network"),
    pytest.param(HEAD + '\n[[verify]]\nrun = "pytest -q"\n', "verify[0].kind", "required", id="check-without-kind"),
    pytest.param(HEAD + CHECK + "\n[agent]\nmax_tool_calls = 0\n", "agent.max_tool_calls", "greater than or equal to 1", id="zero-tool-calls"),
    pytest.param('name = "Fix Tests"\ngoal = "g"\n' + CHECK, "name", "lowercase", id="name-with-capitals-and-space"),
    pytest.param('name = "fix..tests"\ngoal = "g"\n' + CHECK, "name", "git branch", id="name-git-refuses"),
    pytest.param('name = "fix-tests"\ngoal = "   "\n' + CHECK, "goal", "what the loop is for", id="blank-goal"),
    pytest.param('name = "fix-tests"\n' + CHECK, "goal", "required", id="missing-goal"),
    pytest.param(HEAD + CHECK + "\n[sandbox]\nfoo = 1\n", "sandbox.foo", "unknown field", id="unknown-field-in-section"),
    pytest.param(HEAD + CHECK + "\n[stopp]\nmax_iterations = 3\n", "stopp", "unknown field", id="misspelt-section"),
    pytest.param(HEAD + 'sandbox = "docker"\n' + CHECK, "sandbox", "table", id="section-not-a-table"),
    pytest.param("name: fix-tests\ngoal: make the tests pass\n", "not valid TOML", "line 1", id="not-toml"),
    pytest.param(HEAD + CHECK + '\n[stop]\nmax_cost_usd = "five"\n', "stop.max_cost_usd", "number", id="cost-not-a-number"),
    pytest.param(HEAD + CHECK + "\n[stop]\nmax_cost_usd = -1.0\n", "stop.max_cost_usd", "greater than 0", id="negative-cost"),
    pytest.param(HEAD + CHECK + '\n[stop]\nmax_wall_time = "soon"\n', "stop.max_wall_time", "duration", id="duration-not-understood"),
    pytest.param(HEAD + CHECK + '\n[stop]\nmax_wall_time = "0s"\n', "stop.max_wall_time", "longer than zero", id="zero-duration"),
    pytest.param(HEAD + CHECK + "\n[stop]\nstall_after = 1\n", "stop.stall_after", "greater than or equal to 2", id="stall-after-one"),
    pytest.param(HEAD + CHECK + '\n[sandbox]\nmemory = "lots"\n', "sandbox.memory", "size", id="memory-not-a-size"),
    pytest.param(HEAD + "verify = []\n", "verify", "at least 1", id="empty-verify-list"),
    pytest.param(HEAD, "verify", "required", id="no-verify"),
    pytest.param(HEAD + '\n[[verify]]\nkind = "command"\n', "verify[0]", "needs 'run'", id="command-check-without-run"),
    pytest.param(VALID + '\n[[verify]]\nkind = "command"\nrun = " "\n', "verify[1]", "needs 'run'", id="second-check-blank-run"),
    pytest.param(HEAD + CHECK + "timeout_s = 0\n", "verify[0].timeout_s", "greater than 0", id="zero-check-timeout"),
]


@pytest.mark.parametrize(("text", "field", "expected"), BAD_SPECS)
def test_a_bad_spec_is_rejected_with_one_problem_naming_the_field_and_what_was_expected(tmp_path, text, field, expected):
    problems = problems_of(write(tmp_path, text))

    assert len(problems) == 1, problems
    where, _, what = problems[0].partition(": ")
    assert where == field, problems
    assert expected in what, problems


def test_every_problem_of_a_spec_is_reported_at_once(tmp_path):
    text = 'name = "Fix Tests"\ngoal = ""\n\n[[verify]]\nkind = "command"\n\n[sandbox]\nnetwork = "host"\n\n[stop]\nstall_after = 1\n'

    problems = problems_of(write(tmp_path, text))

    assert len(problems) >= 3
    fields = {problem.partition(": ")[0] for problem in problems}
    assert {"name", "goal", "verify[0]", "sandbox.network", "stop.stall_after"} <= fields


def test_a_missing_spec_file_is_reported_with_its_path(tmp_path):
    path = tmp_path / "loops" / "nowhere.toml"

    with pytest.raises(SpecError) as caught:
        load_spec(path)

    assert caught.value.problems == ["file not found"]
    assert str(caught.value).startswith(f"{path}: invalid loop spec")


def test_validate_of_a_bad_file_exits_2_naming_the_file_and_field_without_a_traceback(home, tmp_path):
    good = write(tmp_path, VALID, "good.toml")
    bad = write(tmp_path, HEAD + CHECK + "\n[stop]\nmax_iterations = 0\n", "bad.toml")

    result = loopwright("validate", str(good), str(bad))

    assert result.returncode == 2
    assert f"{good}: ok (fix-tests)" in result.stdout
    assert f"{bad}: invalid loop spec" in result.stderr
    assert "stop.max_iterations" in result.stderr
    assert "Traceback" not in result.stderr
