"""Plugins from outside: installed by pip, listed, configured, switched off, and every hook exercised.

The plugin packages are really built and installed by pip, each into a folder of its own that a
test puts on PYTHONPATH, so the `loopwright` process finds their entry points while the venv, and
so every other test, never sees them. `examples/plugin-example` is the one users copy;
`tests/plugin_packages/probe` implements every hook and records each lifecycle call;
`tests/plugin_packages/broken` cannot be imported.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, loopwright, run_id_of, trace, write_spec
from model_server import text, tool_use

PACKAGES = {
    "example": ROOT / "examples" / "plugin-example",
    "probe": ROOT / "tests" / "plugin_packages" / "probe",
    "broken": ROOT / "tests" / "plugin_packages" / "broken",
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install` each plugin package into its own folder; removing the folder uninstalls it."""
    root = tmp_path_factory.mktemp("plugins")
    builds = {}
    for name, source in PACKAGES.items():
        copy = shutil.copytree(source, root / "src" / name)  # a build leaves build/ and *.egg-info behind
        builds[name] = subprocess.Popen(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--target", str(root / name), str(copy)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    for name, build in builds.items():
        output, _ = build.communicate(timeout=300)
        assert build.returncode == 0, f"pip could not install {name}:\n{output}"
    yield {name: root / name for name in PACKAGES}
    shutil.rmtree(root)


@pytest.fixture
def install(home, installed, monkeypatch):
    """`install("example", ...)`: those plugins are installed, and loaded as a user's would be."""

    def use(*names: str) -> None:
        paths = [str(installed[name]) for name in names]
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        monkeypatch.delenv("LOOPWRIGHT_LOAD_PLUGINS", raising=False)  # `home` sets it to '' for every other test

    return use


def configure(home: Path, toml: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "plugins.toml").write_text(toml)


def probe_settings(home: Path, **settings) -> Path:
    """Write [plugins.probe] settings; returns the file the probe records each hook call in."""
    record = home.parent / "probe.jsonl"
    lines = [f"{key} = {json.dumps(value)}" for key, value in {"record": str(record), **settings}.items()]
    configure(home, "[plugins.probe]\n" + "\n".join(lines) + "\n")
    return record


def recorded(record: Path, hook: str | None = None) -> list[dict]:
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return [c for c in calls if hook is None or c["hook"] == hook]


def listing() -> dict:
    result = loopwright("plugins", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def plugin(name: str) -> dict | None:
    return next((p for p in listing()["plugins"] if p["name"] == name), None)


def tool_result(server, request: int) -> dict:
    """The first tool result the maker sent back in its `request`-th model call (from 0)."""
    return next(b for b in server.requests[request]["messages"][-1]["content"] if b["type"] == "tool_result")


def one_iteration(project: Path, **sections) -> Path:
    return write_spec(project, stop={"max_iterations": 1}, **sections)


# --- the example plugin --------------------------------------------------------------------------


@pytest.mark.hook("loopwright_register_tools")
def test_the_maker_calls_the_example_plugins_tool_and_the_trace_names_it(install, project, model):
    install("example")
    server = model([tool_use("word_count", {"path": "calc.py"}), text("Counted.")])
    result = loopwright("run", str(one_iteration(project)))
    assert result.returncode == 1, result.stdout + result.stderr  # the goal is not met; the tool worked
    words = len((project / "calc.py").read_text().split())
    assert tool_result(server, 1)["content"] == f"calc.py: {words} words"
    assert "word_count" in [t["name"] for t in server.requests[0]["tools"]]
    calls = [e["data"] for e in trace(run_id_of(result)) if e["kind"] == "tool_call"]
    assert [(c["tool"], c["is_error"]) for c in calls] == [("word_count", False)]


def test_a_failing_plugin_tool_gives_the_maker_its_error_and_the_run_goes_on(install, project, model):
    install("example")
    server = model([tool_use("word_count", {"path": "no-such-file.txt"}), text("That file is missing.")])
    result = loopwright("run", str(one_iteration(project)))
    assert "iteration 1: FAIL" in result.stdout, result.stdout + result.stderr
    answer = tool_result(server, 1)
    assert answer["is_error"] is True
    assert "cannot read 'no-such-file.txt'" in answer["content"]


@pytest.mark.hook("loopwright_run_finished")
def test_the_example_plugin_reports_each_finished_run_to_the_file_its_settings_name(install, home, project, model):
    install("example")
    report = home.parent / "reports" / "runs.txt"
    configure(home, f'[plugins.example]\nreport = "{report}"\n')
    model([text("Nothing to do.")])
    result = loopwright("run", str(one_iteration(project)))
    lines = report.read_text().splitlines()
    assert len(lines) == 1
    assert f"fix-failing-test {run_id_of(result)}: failed after 1 iteration(s)" in lines[0]


def test_plugins_shows_the_example_with_its_version_source_hooks_and_tool(install):
    install("example")
    result = loopwright("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index("example  loopwright-example 0.1.0  (loopwright_example)")
    assert lines[start + 1:start + 3] == ["    hooks: loopwright_register_tools, loopwright_run_finished",
                                          "    tools: word_count"]


def test_plugins_json_describes_each_plugin_and_what_it_contributes(install, home):
    install("example")
    configure(home, '[plugins.example]\nreport = "/tmp/secret-location.txt"\n')
    assert plugin("example") == {
        "name": "example",
        "source": "loopwright-example",
        "version": "0.1.0",
        "module": "loopwright_example",
        "hooks": ["loopwright_register_tools", "loopwright_run_finished"],
        "settings": ["report"],  # the keys only: values may be secrets
        "contributes": {"tools": ["word_count"]},
        "shadowed": [],
    }


# --- turning plugins on and off ------------------------------------------------------------------


def test_disabling_a_plugin_in_plugins_toml_removes_it(install, home):
    install("example")
    configure(home, '[plugins]\ndisabled = ["example"]\n')
    report = listing()
    assert "example" not in [p["name"] for p in report["plugins"]]
    assert {"name": "example", "reason": "disabled in plugins.toml"} in report["not_loaded"]


def test_disabling_a_plugin_that_is_not_installed_is_pointed_out(home):
    configure(home, '[plugins]\ndisabled = ["exmaple"]\n')
    assert "not loaded: exmaple (disabled in plugins.toml, but no plugin of this name is installed)" in (
        loopwright("plugins").stdout.splitlines()
    )


def test_a_disabled_setting_that_is_not_a_list_is_refused_with_what_to_write(home):
    configure(home, '[plugins]\ndisabled = "example"\n')
    result = loopwright("plugins")
    assert result.returncode == 2
    assert result.stderr == (
        'error: plugins.toml: [plugins] disabled must be a list of plugin names, such as ["example"], not \'example\'\n'
    )


def test_an_empty_load_plugins_variable_loads_no_installed_plugin(install, monkeypatch):
    install("example", "probe")
    monkeypatch.setenv("LOOPWRIGHT_LOAD_PLUGINS", "")
    names = [p["name"] for p in listing()["plugins"]]
    assert "example" not in names and "probe" not in names
    assert "sandbox_tools" in names  # built-ins are part of Loopwright, not installed plugins


def test_load_plugins_loads_only_the_plugins_it_names(install, monkeypatch):
    install("example", "probe")
    monkeypatch.setenv("LOOPWRIGHT_LOAD_PLUGINS", "example")
    report = listing()
    assert "example" in [p["name"] for p in report["plugins"]]
    assert {"name": "probe", "reason": "not named in LOOPWRIGHT_LOAD_PLUGINS"} in report["not_loaded"]


def test_a_plugin_that_fails_to_import_is_named_in_a_one_line_error(install):
    install("example", "broken")
    result = loopwright("plugins")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith('error: Error importing plugin "broken" (loopwright_broken): RuntimeError:')
    assert "LOOPWRIGHT_LOAD_PLUGINS=''" in result.stderr and "disabled in plugins.toml" in result.stderr


def test_a_broken_plugin_disabled_in_plugins_toml_no_longer_stops_start_up(install, home):
    install("example", "broken")
    configure(home, '[plugins]\ndisabled = ["broken"]\n')
    assert plugin("example") is not None


def test_a_plugin_that_fails_while_registering_is_named_in_the_error(install, home):
    install("probe")
    probe_settings(home, fail_at_start_up=True)
    result = loopwright("plugins")
    assert result.returncode == 2
    assert 'plugin "probe" failed in loopwright_register_tools: RuntimeError: the probe was told to fail' in result.stderr
    assert "Traceback" not in result.stderr


# --- built-ins are plugins like any other --------------------------------------------------------


def test_built_ins_are_listed_as_plugins_with_loopwrights_version(home):
    sandbox_tools = plugin("sandbox_tools")
    assert (sandbox_tools["source"], sandbox_tools["module"]) == ("built-in", "loopwright.plugins.sandbox_tools")
    assert sandbox_tools["version"] == loopwright("--version").stdout.split()[-1]
    assert "run_command" in sandbox_tools["contributes"]["tools"]


def test_disabling_the_built_in_sandbox_tools_removes_run_command(home):
    configure(home, '[plugins]\ndisabled = ["sandbox_tools"]\n')
    report = listing()
    tools = [t for p in report["plugins"] for t in p["contributes"].get("tools", [])]
    assert "run_command" not in tools
    assert {"name": "sandbox_tools", "reason": "disabled in plugins.toml"} in report["not_loaded"]


@pytest.mark.hook("loopwright_register_tools")
def test_a_third_party_tool_overrides_a_built_in_of_the_same_name(install, project, model):
    install("probe")
    server = model([tool_use("list_files", {}), text("Listed.")])
    loopwright("run", str(one_iteration(project)))
    assert tool_result(server, 1)["content"] == "listed by the probe"


def test_plugins_shows_which_plugin_shadows_a_built_in_tool(install):
    install("probe")
    assert plugin("sandbox_tools")["shadowed"] == [{"kind": "tools", "name": "list_files", "by": "probe"}]
    assert "list_files (shadowed by probe)" in loopwright("plugins").stdout


@pytest.mark.hook("loopwright_register_commands")
def test_a_plugin_adds_a_command_to_the_command_line(install):
    install("probe")
    assert loopwright("probe-hello", "you").stdout == "hello you, from the probe\n"
    assert "probe-hello" in loopwright("--help").stdout
    sandbox = loopwright("sandbox", "--help")  # the built-in docker plugin adds its commands the same way
    assert sandbox.returncode == 0 and all(name in sandbox.stdout for name in ("build", "gc", "prune"))


# --- every other hook, through the probe plugin ---------------------------------------------------


@pytest.mark.hook("loopwright_register_automations", "loopwright_register_skill_sources", "loopwright_register_memory",
                  "loopwright_register_agents", "loopwright_register_verifiers", "loopwright_register_sandboxes")
def test_plugins_lists_each_contribution_with_the_plugin_that_gave_it(install):
    install("probe")
    assert plugin("probe")["contributes"] == {
        "automations": ["probe-trigger"],
        "skill_sources": ["probe-skills"],
        "tools": ["list_files"],
        "agents": ["probe-agent"],
        "memory": ["probe-memory"],
        "verifiers": ["probe-file"],
        "sandboxes": ["probe-host"],
    }


@pytest.mark.hook("loopwright_register_agents", "loopwright_register_verifiers", "loopwright_register_sandboxes")
def test_a_loop_runs_on_a_third_party_maker_sandbox_and_verifier(install, home, project):
    install("probe")
    record = probe_settings(home)
    spec = write_spec(project, agent={"kind": "probe-agent"}, sandbox={"kind": "probe-host"},
                      verify=[{"kind": "probe-file", "path": "done.txt"}])
    result = loopwright("run", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "succeeded: all checks passed in iteration 1" in result.stdout
    branch = f"loopwright/fix-failing-test/{run_id_of(result)}"
    made = subprocess.run(["git", "-C", str(project), "show", f"{branch}:done.txt"], capture_output=True, text=True)
    assert made.stdout == "made by the probe agent\n"
    # The maker's sandbox, then a fresh one for the check on a clean copy; both closed.
    sandboxes = [c for c in recorded(record) if c["hook"].startswith("sandbox_")]
    assert [(c["hook"], c.get("verification")) for c in sandboxes] == [
        ("sandbox_started", False), ("sandbox_started", True), ("sandbox_closed", None), ("sandbox_closed", None)]


@pytest.mark.hook("loopwright_run_started", "loopwright_system_prompt", "loopwright_run_tools",
                  "loopwright_before_tool_call", "loopwright_after_tool_call", "loopwright_verdict",
                  "loopwright_run_finished")
def test_lifecycle_hooks_fire_in_order_once_each_for_one_tool_call(install, home, project, model):
    install("probe")
    record = probe_settings(home)
    model([tool_use("run_command", {"command": "true"}), text("Done.")])
    run_id = run_id_of(loopwright("run", str(one_iteration(project))))
    assert [c["hook"] for c in recorded(record)] == [
        "run_started", "run_tools", "system_prompt", "before_tool_call", "after_tool_call", "verdict",
        "run_tools_closed", "run_finished",
    ]
    assert recorded(record, "run_finished") == [
        {"hook": "run_finished", "run": run_id, "status": "failed",
         "reason": "max_iterations: 1 iterations without passing checks"},
    ]


@pytest.mark.hook("loopwright_system_prompt")
def test_a_plugins_system_prompt_section_reaches_the_model(install, home, project, model):
    install("probe")
    probe_settings(home, system_prompt="Greet the probe before anything else.")
    server = model([text("Hello, probe.")])
    loopwright("run", str(one_iteration(project)))
    system = json.dumps(server.requests[0]["system"])
    assert "Greet the probe before anything else." in system


@pytest.mark.hook("loopwright_before_tool_call")
def test_a_denied_tool_call_tells_the_maker_why_and_the_run_goes_on(install, home, project, model):
    install("probe")
    record = probe_settings(home, deny=["run_command"])
    server = model([
        tool_use("run_command", {"command": "touch denied.txt"}),
        tool_use("read_file", {"path": "calc.py"}),
        text("I read the file instead."),
    ])
    result = loopwright("run", str(one_iteration(project)))
    denied = tool_result(server, 1)
    assert denied["is_error"] is True
    assert "denied: the probe plugin forbids run_command" in denied["content"]
    assert "def average" in tool_result(server, 2)["content"]
    assert "iteration 1: FAIL" in result.stdout  # the run went on to verification
    assert [c["tool"] for c in recorded(record, "after_tool_call")] == ["read_file"]  # not after a denied call
    calls = [e["data"] for e in trace(run_id_of(result)) if e["kind"] == "tool_call"]
    assert [(c["tool"], c.get("denied", False)) for c in calls] == [("run_command", True), ("read_file", False)]


@pytest.mark.hook("loopwright_after_tool_call")
def test_after_tool_call_sees_the_result_the_maker_sees(install, home, project, model):
    install("probe")
    record = probe_settings(home)
    server = model([tool_use("run_command", {"command": "echo from the sandbox; exit 3"}), text("It failed.")])
    loopwright("run", str(one_iteration(project)))
    maker_saw = tool_result(server, 1)
    [seen] = recorded(record, "after_tool_call")
    assert (seen["tool"], seen["content"], seen["is_error"]) == ("run_command", maker_saw["content"], True)
    assert "from the sandbox" in seen["content"]


@pytest.mark.hook("loopwright_verdict")
def test_the_verdict_hook_gets_each_iterations_verdict_and_what_the_maker_did(install, home, project, model):
    install("probe")
    record = probe_settings(home)
    model(lambda request: text("Still thinking."))
    loopwright("run", str(write_spec(project, stop={"max_iterations": 2, "stall_after": 3})))
    verdicts = recorded(record, "verdict")
    assert [(v["iteration"], v["passed"]) for v in verdicts] == [(1, False), (2, False)]
    assert all('said "Still thinking."' in v["summary"] for v in verdicts)


@pytest.mark.hook("loopwright_run_tools")
def test_a_per_run_tool_is_offered_to_the_maker_and_closed_with_the_run(install, home, project, model):
    install("probe")
    record = probe_settings(home)
    server = model([tool_use("probe_run_id", {}), text("Got it.")])
    run_id = run_id_of(loopwright("run", str(one_iteration(project))))
    assert "probe_run_id" in [t["name"] for t in server.requests[0]["tools"]]
    assert tool_result(server, 1)["content"] == f"this is run {run_id}"
    assert recorded(record, "run_tools_closed") == [{"hook": "run_tools_closed", "run": run_id}]
