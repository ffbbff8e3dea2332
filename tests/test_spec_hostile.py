"""Hostile loop specs: whatever the file holds, validation answers with SpecError naming every broken field
in one pass, never with a traceback (generated specs, by hypothesis, plus the cases found by hand)."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import loopwright
from loopwright.runtime.spec import SpecError, parse_spec_text

BASE = {
    "name": "fix-tests", "goal": "Make the tests pass.",
    "sandbox": {"memory": "1g"}, "agent": {"max_tool_calls": 10},
    "verify": [{"kind": "command", "run": "pytest -q"}],
    "stop": {"max_iterations": 5, "max_cost_usd": 1.0, "max_wall_time": "10m", "stall_after": 3},
}
# Where a value can be broken, and values that break it: the error must name that path.
BROKEN = {
    ("name",): ["Bad Name", "../outside", "a/b", "", "x" * 100, 7],
    ("goal",): ["", "   ", 3, ["a"]],
    ("keep",): ["first", True],
    ("sandbox", "memory"): ["lots", 5, "-1g"],
    ("sandbox", "network"): ["host", False],
    ("sandbox", "pids_limit"): [1, True, math.nan, "many"],
    ("sandbox", "cpus"): [0, math.inf, True, -2.5],
    ("agent", "max_tool_calls"): [0, True, 2.5, "forty"],
    ("agent", "max_tokens"): [-1, math.nan],
    ("stop", "max_iterations"): [0, True, 1.5, "ten", 10**12],
    ("stop", "max_cost_usd"): [math.nan, math.inf, -1, 0, True, "5 dollars"],
    ("stop", "max_wall_time"): [math.nan, math.inf, -math.inf, True, False, "soon", -5, 0, "10 minutes"],
    ("stop", "stall_after"): [1, True, math.nan],
    ("stop", "on_stall"): ["maybe", ["hint", "never"], 3],
    ("stop", "ask_timeout"): [math.nan, True, "later"],
    ("memory", "working_chars"): [10, True, math.inf],
}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return json.dumps(value)


def toml(spec: dict) -> str:
    """The spec as TOML: top-level values, then its tables, then its arrays of tables."""
    lines = [f"{k} = {toml_value(v)}" for k, v in spec.items() if not isinstance(v, (dict, list)) or
             (isinstance(v, list) and not all(isinstance(i, dict) for i in v))]
    for key, value in spec.items():
        if isinstance(value, dict):
            lines += [f"[{key}]", *(f"{k} = {toml_value(v)}" for k, v in value.items())]
        elif isinstance(value, list) and value and all(isinstance(i, dict) for i in value):
            for item in value:
                lines += [f"[[{key}]]", *(f"{k} = {toml_value(v)}" for k, v in item.items())]
    return "\n".join(lines) + "\n"


BREAKAGES = st.lists(st.sampled_from(sorted(BROKEN)), min_size=1, max_size=5, unique=True).flatmap(
    lambda paths: st.tuples(*(st.tuples(st.just(p), st.sampled_from(BROKEN[p])) for p in paths)))


@settings(max_examples=700, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(BREAKAGES)
def test_every_broken_field_is_named_in_one_pass(breakages):
    spec = json.loads(json.dumps(BASE))
    for path, value in breakages:
        table = spec
        for key in path[:-1]:
            table = table.setdefault(key, {})
        table[path[-1]] = value
    with pytest.raises(SpecError) as raised:
        parse_spec_text(toml(spec), "generated.toml")
    named = [problem.split(":")[0] for problem in raised.value.problems]
    for path, value in breakages:
        field = ".".join(path)
        assert any(n == field or n.startswith((f"{field}[", f"{field}.")) for n in named), (path, value, named)


TOML_PIECES = st.sampled_from([
    'name = "x"', 'goal = "g"', "[stop]", "[[verify]]", 'kind = "command"', 'run = "true"', "max_wall_time = nan",
    "max_wall_time = true", "max_iterations = 99999999999999999999", "[agent]", "skills = [[[]]]", "[[trigger]]",
    'kind = "cron"', 'schedule = "* * * *"', 'timezone = "' + "a" * 300 + '"', "[memory]", "kv = 3", "= broken",
    'name = "\\u0000"', "v = " + "[" * 3000 + "]" * 3000, "[stop.nested]", "x = {a = {b = {c = 1}}}",
])
HOSTILE_TEXT = st.one_of(
    st.lists(TOML_PIECES, max_size=12).map("\n".join),
    st.text(max_size=300),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),
)


@settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(HOSTILE_TEXT)
def test_any_text_is_a_spec_or_a_spec_error(text):
    try:
        parse_spec_text(text, "generated.toml")
    except SpecError as error:
        assert error.problems and all(":" in problem for problem in error.problems), error.problems


@pytest.mark.parametrize("line, named", [
    ("max_wall_time = nan", "stop.max_wall_time: expected a finite number, got nan"),
    ("max_wall_time = true", "stop.max_wall_time: expected a number, got true"),
    ("max_cost_usd = inf", "stop.max_cost_usd: expected a finite number, got inf"),
    ("max_iterations = false", "stop.max_iterations: expected a number, got false"),
])
def test_nan_infinity_and_booleans_are_no_numbers(line, named):
    with pytest.raises(SpecError) as raised:
        parse_spec_text(f'name = "x"\ngoal = "g"\n[[verify]]\nkind = "command"\nrun = "true"\n[stop]\n{line}\n')
    assert named in raised.value.problems


def test_a_spec_nested_thousands_deep_is_refused_by_name():
    with pytest.raises(SpecError) as raised:
        parse_spec_text('name = "x"\nv = ' + "[" * 5000 + "]" * 5000 + "\n")
    assert raised.value.problems == ["(top level): arrays or tables nested too deeply to be a loop spec"]


def test_validate_names_a_timezone_too_long_for_a_file_name(tmp_path):
    spec = tmp_path / "loop.toml"
    spec.write_text('name = "x"\ngoal = "g"\n[[verify]]\nkind = "command"\nrun = "true"\n'
                    f'[[trigger]]\nkind = "cron"\nschedule = "0 7 * * *"\ntimezone = "{"a" * 300}"\n')
    result = loopwright("validate", str(spec))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "trigger[0] (cron): timezone: expected an IANA name such as 'Europe/Paris'" in result.stdout + result.stderr
