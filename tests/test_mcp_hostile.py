"""Hostile MCP arguments: every bad call is a tool error that names what was wrong, never a traceback,
never a bare "Error executing tool", and no loop file is read from outside the loops folder (the MCP
SDK's in-process client against the real server; generated calls by hypothesis)."""

import json

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client

from loopwright.mcp_server.server import build_server
from loopwright.runtime.service import Runtime

TOOLS = {
    "list_loops": {},
    "start_loop": {"loop": str, "spec": str, "max_iterations": int, "max_cost_usd": float, "max_wall_time": str},
    "get_run": {"run_id": str},
    "list_runs": {"loop": str, "status": str, "limit": int},
    "wait_for_run": {"run_id": str, "timeout_s": float},
    "get_run_trace": {"run_id": str, "after": int, "limit": int, "newest": bool},
    "stop_run": {"run_id": str},
    "pause_run": {"run_id": str},
    "resume_run": {"run_id": str},
    "list_approvals": {"run_id": str},
    "decide_approval": {"approval_id": str, "allow": bool, "note": str},
    "improve_loop": {"loop": str},
    "get_ledger": {"loop": str},
}
HOSTILE_TEXT = st.one_of(
    st.sampled_from(["", " ", "../outside", "../../etc/passwd", "/etc/passwd", "a/b", ".hidden", "x" * 5000,
                     "nul\x00byte", "name = [[[[", "\udcff", "fix-tests", "20260101-000000-abcdef"]),
    st.text(max_size=200),
)
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), HOSTILE_TEXT,
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def arguments(tool: str) -> st.SearchStrategy[dict]:
    """Mostly the tool's own fields with hostile values, sometimes unknown fields too."""
    fields = TOOLS[tool]
    own = st.fixed_dictionaries({}, optional={name: ANY_VALUE for name in fields})
    extra = st.dictionaries(st.sampled_from(["bogus", "loops_dir", "__class__"]), ANY_VALUE, max_size=1)
    return st.builds(lambda a, b: {**a, **b}, own, extra)


UNKNOWN = ("no run with id", "no approval with id", "no loop named")
CALLS = st.sampled_from(sorted(TOOLS)).flatmap(lambda tool: st.tuples(st.just(tool), arguments(tool)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    loops = base / "loops"
    loops.mkdir()
    (loops / "fix-tests.toml").write_text('name = "fix-tests"\ngoal = "g"\n[workspace]\nrepo = "/nonexistent"\n'
                                          '[[verify]]\nkind = "command"\nrun = "true"\n')
    (base / "outside.toml").write_text('name = "read from outside the loops folder\n')  # its error would quote it
    return base, loops


def test_bad_arguments_are_tool_errors_that_name_the_problem(world, monkeypatch):
    base, loops = world
    monkeypatch.setenv("LOOPWRIGHT_HOME", str(base / "home"))
    monkeypatch.setenv("LOOPWRIGHT_LOAD_PLUGINS", "")
    server = build_server(Runtime(), loops)
    seen: list[tuple[str, dict, str]] = []

    @settings(max_examples=500, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(CALLS)
    def call(tool_and_arguments):
        tool, args = tool_and_arguments

        async def go():
            async with Client(server) as client:
                return await client.call_tool(tool, args)

        result = anyio.run(go)
        text = " ".join(getattr(block, "text", "") for block in result.content)
        seen.append((tool, args, text))
        if result.is_error:  # it names the argument, or the run, approval or loop that is not there
            assert "Traceback" not in text, (tool, args, text)
            said = text.removeprefix(f"Error executing tool {tool}:").strip()
            assert any(field in said for field in [*TOOLS[tool], *args]) or said.startswith(UNKNOWN), (tool, args, text)
        extra = sorted(set(args) - set(TOOLS[tool]))
        if extra:  # an argument the tool does not take is refused by its name, never ignored
            assert result.is_error and f"{tool} takes no argument {extra[0]!r}" in text, (tool, args, text)
        assert "read from outside the loops folder" not in text, (tool, args, text)

    call()
    assert len(seen) >= 500
    assert sum("validation error" in text for _, _, text in seen) > 100  # the generated calls were mostly bad


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["../outside", "../loops/../outside", "/etc/passwd", "a/../../outside", ".", ""])
async def test_a_loop_name_cannot_reach_outside_the_loops_folder(world, monkeypatch, name):
    base, loops = world
    monkeypatch.setenv("LOOPWRIGHT_HOME", str(base / "home"))
    async with Client(build_server(Runtime(), loops)) as client:
        result = await client.call_tool("start_loop", {"loop": name})
    text = result.content[0].text
    assert result.is_error and "not a loop name" in text and "read from outside" not in text, text


@pytest.mark.anyio
@pytest.mark.parametrize("value", [-1.0, 0.0, "lots", True])  # JSON has no NaN or infinity: a client sends null
async def test_budgets_given_to_start_loop_must_be_real_positive_numbers(world, monkeypatch, value):
    base, loops = world
    monkeypatch.setenv("LOOPWRIGHT_HOME", str(base / "home"))
    async with Client(build_server(Runtime(), loops)) as client:
        result = await client.call_tool("start_loop", {"loop": "fix-tests", "max_cost_usd": value})
    text = result.content[0].text
    assert result.is_error and "max_cost_usd" in text, json.dumps(text)
