"""The hook contract holds against plugins that are async, or that catch too much.

An async hook that abstains must not turn another plugin's deny into an allow, and a maker that
wraps its model calls in ``except Exception`` must not swallow a person's stop. The plugins here are
installed as a user's would be: modules with a ``loopwright`` entry point, on the `loopwright`
process's PYTHONPATH.
"""

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import LOOPWRIGHT, loopwright, run_id_of, trace, wait_for, write_spec
from model_server import text, tool_use
from loopwright.runtime.store import Store

ABSTAINS = '''
from pathlib import Path
from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.plugin_host import plugin_settings

@hookimpl(tryfirst=True)  # asked before the plugin that denies
async def loopwright_before_tool_call(run, call):
    Path(plugin_settings("abstains")["asked"]).write_text(call.name)
    return None
'''

DENIES = '''
from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.types import Decision

@hookimpl
def loopwright_before_tool_call(call):
    if call.name == "run_command":
        return Decision.deny("no commands in this repository")
'''

STUBBORN = '''
import anyio
from loopwright.runtime.hookspecs import hookimpl

REPLY = {"content": [{"type": "text", "text": "still working"}], "stop_reason": "end_turn",
         "usage": {"input_tokens": 10, "output_tokens": 2}}

async def send(request):
    return REPLY

class Stubborn:
    """A maker that treats every failure of a model call as something to retry."""

    def __init__(self, agent, settings):
        self.agent = agent

    async def take_turn(self, turn):
        while True:
            try:
                await turn.model(self.agent.model, {"messages": []}, send)
            except Exception:
                pass
            await anyio.sleep(0.05)

@hookimpl
def loopwright_register_agents(register):
    register("stubborn", Stubborn)
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """`plugins(name=source, ...)`: installs each module as the loopwright plugin of that name."""

    def install(**sources: str) -> None:
        folder = tmp_path / "site"
        info = folder / "loopwright_hook_contract-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: loopwright-hook-contract\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(
            "[loopwright]\n" + "".join(f"{name} = contract_{name}\n" for name in sources)
        )
        for name, source in sources.items():
            (folder / f"contract_{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        monkeypatch.delenv("LOOPWRIGHT_LOAD_PLUGINS")

    return install


@pytest.mark.hook("loopwright_before_tool_call")
def test_an_async_plugin_that_abstains_does_not_overrule_another_plugins_deny(plugins, home, project, model):
    plugins(abstains=ABSTAINS, denies=DENIES)
    asked = home.parent / "asked.txt"
    home.mkdir(parents=True, exist_ok=True)
    (home / "plugins.toml").write_text(f'[plugins.abstains]\nasked = "{asked}"\n')
    server = model([tool_use("run_command", {"command": "touch ran.txt"}), text("Denied, so I stop.")])

    result = loopwright("run", str(write_spec(project, stop={"max_iterations": 1})))

    assert "iteration 1: FAIL" in result.stdout, result.stdout + result.stderr  # the run went on to verification
    assert asked.read_text() == "run_command"  # the async plugin was asked, and abstained
    answer = next(b for b in server.requests[1]["messages"][-1]["content"] if b["type"] == "tool_result")
    assert answer["is_error"] is True
    assert answer["content"] == "This call was denied: no commands in this repository"
    events = trace(run_id_of(result))
    [call] = [e["data"] for e in events if e["kind"] == "tool_call"]
    assert (call["tool"], call["denied"]) == ("run_command", True)
    worktree = Path(next(e["data"]["worktree"] for e in events if e["kind"] == "run_started"))
    assert (worktree / "calc.py").exists() and not (worktree / "ran.txt").exists()  # the command never ran


@pytest.mark.hook("loopwright_register_agents")
def test_a_maker_that_catches_every_exception_still_stops_when_a_person_stops_the_run(plugins, home, project):
    plugins(stubborn=STUBBORN)
    spec = write_spec(project, agent={"kind": "stubborn"})
    process = subprocess.Popen([*LOOPWRIGHT, "run", str(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_id = process.stdout.readline().split()[1]
        store = Store(f"sqlite:///{home / 'loopwright.sqlite'}")
        wait_for(lambda: any(e["kind"] == "model_call" for e in store.events(run_id)))  # the maker is at work

        stopped = loopwright("stop", run_id)
        assert stopped.stdout == f"stop requested for run {run_id}\n", stopped.stderr

        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1, out + err
    assert out.splitlines()[-1].startswith("stopped: stopped by a person"), out + err
    assert store.get_run(run_id).status == "stopped"
