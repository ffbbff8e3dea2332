"""Replay: a loop re-driven by a recorded run's model answers, for free, with everything else real."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import EXAMPLE, FIX, loopwright, run_id_of, trace, write_spec
from model_server import text


def record_an_honest_run(project, model):
    server = model([FIX, text("Fixed the off-by-one in calc.py.")])
    result = loopwright("run", str(write_spec(project)))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_id_of(result), server


def test_a_run_replayed_from_its_session_file_succeeds_and_spends_nothing(home, project, model, tmp_path, monkeypatch):
    recorded, server = record_an_honest_run(project, model)
    session = tmp_path / "session.json"
    session.write_text(loopwright("trace", recorded, "--session").stdout)
    monkeypatch.delenv("ANTHROPIC_API_KEY")  # a replay needs no key
    asked = len(server.requests)

    result = loopwright("run", str(write_spec(project)), "--replay", str(session))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"replaying the model's answers of run {recorded} (2 model calls)" in result.stdout
    assert "succeeded: all checks passed in iteration 1" in result.stdout and "spent $0.0000" in result.stdout
    assert len(server.requests) == asked  # no model was called
    events = trace(run_id_of(result))
    calls = [e for e in events if e["kind"] == "model_call"]
    assert len(calls) == 2 and all(c["data"]["replayed"] and c["cost_usd"] == 0 for c in calls)
    edits = [e for e in events if e["kind"] == "tool_call"]
    assert [(e["data"]["tool"], e["data"]["is_error"]) for e in edits] == [("edit_file", False)]  # really run


def test_a_replay_that_goes_further_than_the_recording_ends_saying_so(home, project, model, monkeypatch):
    recorded, _ = record_an_honest_run(project, model)
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    # A stricter check than the recorded run's: iteration 1 fails, and the recording has no iteration 2.
    spec = write_spec(project, verify=[{"kind": "command", "run": "python3 -m pytest -q -p no:cacheprovider && false"}])
    result = loopwright("run", str(spec), "--replay", recorded)  # a run id works as well as a file
    assert result.returncode == 1
    assert "has no answer for model call 2.model.1: this run went further than the recorded one" in result.stdout


def test_a_replay_of_something_that_is_not_a_session_is_refused_by_name(home, project, tmp_path):
    bogus = tmp_path / "notes.json"
    bogus.write_text('{"hello": 1}')
    result = loopwright("run", str(write_spec(project)), "--replay", str(bogus))
    assert result.returncode == 2
    assert f"{bogus} is not a recorded session" in result.stderr
    unknown = loopwright("run", str(write_spec(project)), "--replay", "no-such-run")
    assert unknown.returncode == 2 and "no-such-run" in unknown.stderr


def test_the_example_runs_with_no_key_by_replaying_its_recorded_session(home, sandbox_image, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    script = shutil.copytree(EXAMPLE, tmp_path / "example") / "run.sh"  # as a user's clone has it
    result = subprocess.run(["bash", str(script)], env={**env, "LOOPWRIGHT": str(Path(sys.executable).parent / "loopwright")},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no ANTHROPIC_API_KEY: replaying a recorded model session; set a key to run it live" in result.stdout
    assert "succeeded: all checks passed" in result.stdout
