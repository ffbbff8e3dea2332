"""A run survives the death of its process: a new process continues it from its last finished step."""

import signal
import subprocess
import time

import docker

from conftest import FIX, LOOPWRIGHT, loopwright, wait_for, write_spec
from model_server import text, tool_use
from loopwright.runtime.records import new_run_id
from loopwright.runtime.spec import load_spec
from loopwright.runtime.store import Store



def containers_of(run_id: str) -> list:
    return docker.from_env().containers.list(all=True, filters={"label": f"loopwright.run={run_id}"})


def test_a_run_killed_mid_iteration_resumes_in_a_new_process_and_completes(database, project, model):
    server = model([
        tool_use("run_command", {"command": "echo once >> log.txt"}),
        tool_use("run_command", {"command": "sleep 4"}),  # the process dies during this call
        FIX,
        text("fixed"),
    ])
    process = subprocess.Popen([*LOOPWRIGHT, "run", str(write_spec(project))], stdout=subprocess.PIPE, text=True)
    run_id = process.stdout.readline().split()[1]
    store = Store(database)
    wait_for(lambda: len(server.requests) == 2 and any(e["kind"] == "tool_call" for e in store.events(run_id)))
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(containers_of(run_id)) == 1  # the dead process's sandbox is still there

    resumed = loopwright("recover", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"recovering run {run_id}" in resumed.stdout

    run = store.get_run(run_id)
    assert (run.status, run.iteration) == ("succeeded", 1)
    assert len(server.requests) == 4  # the two finished model calls were not sent again
    log = subprocess.run(["git", "-C", str(project), "show", f"{run.branch}:log.txt"], capture_output=True, text=True)
    assert log.stdout == "once\n"  # the finished tool call did not run twice
    assert containers_of(run_id) == []  # neither the dead process's sandbox nor the new one is left


def test_recover_with_nothing_orphaned_says_so(home):
    result = loopwright("recover")
    assert result.returncode == 0
    assert "no orphaned runs to recover" in result.stdout


def test_a_run_recorded_but_never_queued_before_its_process_died_is_recovered(database, project, model):
    model([FIX, text("fixed")])
    spec = load_spec(write_spec(project))
    store = Store(database)
    run_id = new_run_id()
    store.create_run(run_id, spec.name, spec.model_dump(mode="json"), spec.workspace.repo, f"loopwright/{spec.name}/{run_id}")
    store.update_run(run_id, created_at=time.time() - 120)  # its process died two minutes ago, before queueing it

    resumed = loopwright("recover", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"recovering run {run_id}" in resumed.stdout
    assert store.get_run(run_id).status == "succeeded"
