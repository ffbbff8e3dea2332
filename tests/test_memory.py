"""Memory: progress notes and key-value memory that a later run of the same loop reads."""

from pathlib import Path

import anyio
import pytest

from conftest import loopwright, run_id_of, write_spec
from model_server import text, tool_use
from loopwright.plugins.memory.store import KvStore, add_note
from loopwright.runtime.config import load_settings
from loopwright.runtime.context import newest_within, opening_message
from loopwright.runtime.progress import Progress
from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.plugin_host import make_plugin_host
from loopwright.runtime.spec import parse_spec
from loopwright.runtime.store import Store, memory_notes
from loopwright.runtime.types import CheckResult, RunInfo, Verdict

LOOP = "fix-failing-test"  # the example project's loop
NOTES = "# Notes from earlier runs of this loop"
KV = "# Key-value memory of this loop"


def system_text(request: dict) -> str:
    return "".join(block["text"] for block in request["system"])


def section(system: str, title: str) -> str | None:
    if title not in system:
        return None
    start = system.index(title)
    end = system.find("\n\n# ", start)
    return system[start:] if end == -1 else system[start:end]


def store_of(home: Path) -> Store:
    home.mkdir(parents=True, exist_ok=True)
    return Store(f"sqlite:///{home / 'loopwright.sqlite'}")


def run(project: Path, server, **sections) -> tuple[str, list[dict]]:
    """One run of the example loop against `server`; the run's id and the requests the model received."""
    result = loopwright("run", str(write_spec(project, **{"stop": {"max_iterations": 1}, **sections})))
    assert result.returncode == 1, result.stdout + result.stderr  # the example's test still fails
    return run_id_of(result), server.requests


@pytest.mark.hook("loopwright_verdict", "loopwright_system_prompt")
def test_progress_notes_from_run_1_are_in_the_first_prompt_of_run_2(home, project, model):
    first_id, first = run(project, model(lambda request: text("I read calc.py and changed nothing.")),
                          stop={"max_iterations": 2})
    second_id, second = run(project, model([text("done")]))

    assert NOTES not in system_text(first[0])  # nothing earlier to remember
    notes = section(system_text(second[0]), NOTES)
    assert notes is not None
    for iteration in (1, 2):
        assert f"- run {first_id}, iteration {iteration}: " in notes
    assert 'said "I read calc.py and changed nothing." -> failed: command: python3 -m pytest' in notes
    assert f"- run {first_id} ended failed: max_iterations: 2 iterations" in notes
    assert second_id not in notes


@pytest.mark.hook("loopwright_run_tools", "loopwright_system_prompt")
def test_a_value_stored_with_memory_set_in_run_1_is_read_with_memory_get_in_run_2(home, project, model):
    run(project, model([tool_use("memory_set", {"key": "test-command", "value": "python3 -m pytest -q"}),
                        text("noted")]), memory={"kv": True})
    _, second = run(project, model([tool_use("memory_get", {"key": "test-command"}), text("done")]), memory={"kv": True})

    assert "test-command" in section(system_text(second[0]), KV)  # run 2 is told which keys exist
    result = second[1]["messages"][-1]["content"][0]
    assert (result["content"], result.get("is_error", False)) == ("python3 -m pytest -q", False)


def test_a_loop_that_does_not_ask_for_the_key_value_memory_is_not_offered_its_tools(home, project, model):
    _, requests = run(project, model([text("done")]))
    assert [tool["name"] for tool in requests[0]["tools"]] == [
        "run_command", "read_file", "write_file", "edit_file", "list_files"]  # each tool offered costs tokens
    assert KV not in system_text(requests[0])


@pytest.mark.hook("loopwright_system_prompt")
def test_notes_of_many_iterations_stay_within_the_memory_budget(home, project, model):
    store = store_of(home)
    for iteration in range(1, 61):
        add_note(store.engine, LOOP, "20250101-000000-aaaaaa", iteration,
                 f"iteration {iteration}: 3 tool calls (read_file, edit_file) -> failed: command: 1 failed")
    _, requests = run(project, model([text("done")]), memory={"budget_chars": 400})

    notes = section(system_text(requests[0]), NOTES)
    assert len(notes) <= 400
    assert "iteration 60: 3 tool calls" in notes  # the newest stay
    assert "iteration 1: " not in notes
    assert "older notes dropped to keep within the memory budget" in notes


@pytest.mark.hook("loopwright_system_prompt", "loopwright_run_tools")
def test_switching_memory_off_in_the_spec_removes_notes_and_the_memory_tools(home, project, model):
    store = store_of(home)
    add_note(store.engine, LOOP, "20250101-000000-aaaaaa", 1, "iteration 1: tried something -> failed: tests")
    KvStore(store.engine, LOOP, "20250101-000000-aaaaaa", 10, 100).set("build", "make")
    _, requests = run(project, model([text("done")]), memory={"notes": False, "kv": False})

    system = system_text(requests[0])
    assert NOTES not in system and "tried something" not in system and KV not in system
    assert not [tool for tool in requests[0]["tools"] if tool["name"].startswith("memory_")]
    with store.engine.connect() as db:  # and the run added no notes of its own
        assert len(db.execute(memory_notes.select().where(memory_notes.c.loop == LOOP)).all()) == 1


# --- without a run ---------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [120, 200, 333, 1000, 5000])
def test_newest_within_keeps_the_newest_lines_and_never_exceeds_the_budget(budget):
    lines = [f"- note {i}: " + "x" * (i % 37) for i in range(200)]
    text = newest_within("# Title", lines, budget, older=5)
    assert text is None or len(text) <= budget
    if text is not None:
        kept = text.splitlines()[2:]
        assert kept == lines[len(lines) - len(kept):]
        assert f"[{5 + 200 - len(kept)} older notes dropped" in text


def test_the_working_memory_of_a_long_run_stays_within_the_budget():
    memory = [f"iteration {i}: 2 tool calls (read_file, edit_file) -> failed: tests: 1 failed" for i in range(1, 500)]
    progress = Progress()
    progress.add(Verdict(499, [CheckResult("tests", False, "1 failed", "sig")]))
    message = opening_message(memory, progress, "run-1", memory_budget=600)
    working = message.split("\n\n# Latest verdict")[0]
    assert len(working) <= 600
    assert working.endswith(memory[-1]) and "iteration 1: " not in working
    assert "older notes dropped" in working


def test_kv_values_and_keys_are_capped(tmp_path):
    kv = KvStore(store_of(tmp_path).engine, LOOP, "run-1", max_keys=2, max_value_chars=10)
    assert kv.set("a", "1") == "stored"
    assert kv.set("a", "2") == "replaced"
    with pytest.raises(ValueError, match="11 characters; the limit is 10"):
        kv.set("b", "x" * 11)
    kv.set("b", "3")
    with pytest.raises(ValueError, match="memory is full"):
        kv.set("c", "4")
    assert kv.delete("a") and kv.set("c", "4") == "stored"
    assert [key for key, _size, _run in kv.keys()] == ["b", "c"]


def test_kv_memory_is_scoped_to_the_loop(tmp_path):
    engine = store_of(tmp_path).engine
    KvStore(engine, "loop-a", "run-1", 10, 100).set("k", "a's value")
    assert KvStore(engine, "loop-b", "run-2", 10, 100).get("k") is None
    assert KvStore(engine, "loop-a", "run-3", 10, 100).get("k") == "a's value"


def test_a_note_is_added_once_per_iteration_even_when_the_verdict_hook_runs_again(tmp_path):
    engine = store_of(tmp_path).engine
    add_note(engine, LOOP, "run-1", 1, "first")
    add_note(engine, LOOP, "run-1", 1, "again after a crash")
    with engine.connect() as db:
        assert [row.note for row in db.execute(memory_notes.select())] == ["first"]


@pytest.mark.hook("loopwright_register_memory")
def test_a_third_party_notes_kind_replaces_the_built_in_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPWRIGHT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LOOPWRIGHT_LOAD_PLUGINS", "")
    settings = load_settings(tmp_path)
    add_note(Store(settings.database_url).engine, LOOP, "earlier", 1, "iteration 1: tried -> failed: tests")
    spec = parse_spec({"name": LOOP, "goal": "g", "verify": [{"kind": "command", "run": "true"}]})
    info = RunInfo("now", LOOP, spec, "b", tmp_path)

    class OtherNotes:
        @hookimpl
        def loopwright_register_memory(self, register):
            register("notes", object())

    built_in = anyio.run(make_plugin_host(settings).system_prompt, info)
    replaced = make_plugin_host(settings, extra_plugins=(OtherNotes(),))
    assert any(NOTES in s for s in built_in)
    assert not any(NOTES in s for s in anyio.run(replaced.system_prompt, info))
    assert replaced.registries["memory"]["notes"].plugin != "memory"
