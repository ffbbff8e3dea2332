"""The sandbox with real containers: the agent's calls, timeouts, output limits, the exec fallback, cleanup."""

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import docker
import pytest

from loopwright.runtime.verification import changed, scan, unified_diff
from loopwright.sandbox import SandboxError, list_sandboxes, reap_orphans
from loopwright.runtime.worktree import commit_all, create_worktree, read_blobs, tree_of
from loopwright.runtime.service import process_start_time
from loopwright.sandbox import docker as sandbox_docker
from sandbox_fixtures import container_ids, containers_of, git, make_sandbox, owner_process, shell_only_image  # noqa: F401



def test_command_runs_in_container_as_non_root(make_sandbox):
    sb, _ = make_sandbox()
    r = sb.run("cat /etc/hostname; id -u; pwd", timeout=20)
    hostname, uid, cwd = r.stdout.split()
    assert r.exit_code == 0 and not r.timed_out
    assert hostname == sb.container_id[:12]
    assert uid != "0"
    assert cwd == "/workspace"


def test_calls_go_through_the_agent_not_docker_exec(make_sandbox):
    sb, _ = make_sandbox()
    assert sb.uses_agent
    assert sb.run("cat /proc/1/cmdline", timeout=20).stdout.split("\0")[3] == "/run/loopwright/agent.py"


def test_exit_code_stderr_and_stdin(make_sandbox):
    sb, _ = make_sandbox()
    r = sb.run("echo out; echo err >&2; exit 3", timeout=20)
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
    r = sb.run("python3 -c 'import json, sys; print(json.load(sys.stdin)[\"x\"] * 2)'", timeout=20, stdin=b'{"x": 21}')
    assert (r.exit_code, r.stdout) == (0, "42\n")


def test_a_command_killed_by_a_signal_reports_128_plus_the_signal(make_sandbox):
    sb, _ = make_sandbox()
    assert sb.run("kill -TERM $$", timeout=20).exit_code == 128 + signal.SIGTERM


def test_large_stdin_reaches_the_command_whole(make_sandbox):
    sb, _ = make_sandbox()
    data = bytes(range(256)) * 20_000  # 5 MB, every byte value
    r = sb.run("sha256sum | cut -d' ' -f1", timeout=30, stdin=data)
    assert r.stdout.strip() == hashlib.sha256(data).hexdigest()


def test_sandbox_writes_reach_worktree_and_commit_all_commits_on_run_branch(make_sandbox, git_repo):
    sb, wt = make_sandbox()
    r = sb.run("mkdir -p src && echo 'print(1)' > src/new.py && rm README.md", timeout=20)
    assert r.exit_code == 0, r.stderr
    assert (wt.path / "src/new.py").read_text() == "print(1)\n"
    base = tree_of(wt, wt.base_commit)
    paths = changed(scan(wt.path), base)
    assert paths == ["README.md", "src/new.py"]
    diff = unified_diff(paths, base, read_blobs(wt, [sha for _, sha in base.values()]), wt.path)
    assert "+print(1)" in diff and "-hello" in diff

    sha = commit_all(wt, "loop step 1")
    assert sha is not None
    log = git(git_repo, "log", "--format=%H %s|%an <%ae>", "-1", wt.branch).strip()
    assert log == f"{sha} loop step 1|Loopwright <loopwright@localhost>"
    assert git(git_repo, "show", f"{wt.branch}:src/new.py") == "print(1)\n"
    assert commit_all(wt, "nothing new") is None
    # The user's own branch and checkout did not move.
    assert git(git_repo, "log", "--format=%s", "main").split() == ["initial"]
    assert (git_repo / "README.md").exists()


def test_timeout_kills_command_and_children_and_sandbox_keeps_serving(make_sandbox):
    sb, _ = make_sandbox()
    r = sb.run("sleep 100 & setsid sleep 101 & (sleep 103 &) ; sleep 102", timeout=1.5)
    assert r.timed_out and r.exit_code == 124
    assert "timed out after 1.5s" in r.stderr
    ps = sb.run("ps -eo stat=,args=", timeout=20)
    assert ps.exit_code == 0
    assert "sleep 10" not in ps.stdout, ps.stdout  # neither running nor zombie
    assert sb.run("echo still here", timeout=20).stdout == "still here\n"


def test_background_processes_do_not_outlive_their_call(make_sandbox):
    sb, _ = make_sandbox()
    r = sb.run("sleep 100 & echo started", timeout=20)
    assert (r.exit_code, r.stdout, r.timed_out) == (0, "started\n", False)
    assert "sleep 100" not in sb.run("ps -eo args=", timeout=20).stdout


def test_a_call_that_leaves_many_short_lived_orphans_does_not_run_out_of_processes(make_sandbox):
    # Each `(sleep 0.01 &)` leaves an orphan that the call's supervisor adopts; 200 of them, each gone in
    # 10 ms. Unless the supervisor reaps them as they go, their zombies fill a pids limit of 64: "Cannot fork".
    sb, _ = make_sandbox(pids_limit=64)
    r = sb.run("for i in $(seq 200); do (sleep 0.01 &); done; sleep 0.2; ps -e --no-headers | wc -l", timeout=120)
    assert (r.exit_code, r.stderr) == (0, ""), r
    assert int(r.stdout) < 10  # the agent, its supervisors, this call's sh, ps and wc


def test_calls_run_concurrently(make_sandbox):
    sb, _ = make_sandbox()
    waiting = {}
    waiter = threading.Thread(target=lambda: waiting.update(
        result=sb.run("while [ ! -e /tmp/go ]; do sleep 0.05; done; echo released", timeout=30)))
    waiter.start()
    time.sleep(0.3)
    assert sb.run("touch /tmp/go && echo sent", timeout=20).stdout == "sent\n"  # not queued behind the waiter
    waiter.join(40)
    assert (waiting["result"].stdout, waiting["result"].timed_out) == ("released\n", False)


def test_output_beyond_the_limit_keeps_head_and_tail_with_a_marker(make_sandbox):
    sb, _ = make_sandbox(output_limit=10_000)
    r = sb.run("echo FIRST; head -c 5000000 /dev/zero | tr '\\0' x; echo; echo LAST; echo err >&2", timeout=30)
    assert r.exit_code == 0
    assert r.stdout.startswith("FIRST\nxxx") and r.stdout.endswith("xxx\nLAST\n")
    assert "bytes of output omitted here]" in r.stdout
    assert len(r.stdout) < 10_100
    assert r.stderr == "err\n"  # each stream has its own limit


def test_a_container_killed_during_a_call_is_named_in_the_error_and_the_next_call_gets_a_fresh_one(make_sandbox):
    sb, _ = make_sandbox()
    first = sb.container_id
    killer = threading.Timer(1.0, lambda: docker.from_env().containers.get(first).kill())
    killer.start()
    with pytest.raises(SandboxError, match=r"stopped during this call \(the connection closed; the container exited "
                                           r"with code 137\); the call's effects are unknown"):
        sb.run("sleep 30", timeout=60)
    killer.join()
    assert sb.run("echo fresh", timeout=20).stdout == "fresh\n" and sb.container_id != first


def test_a_command_that_kills_its_supervisor_ends_its_call_and_leaves_nothing_behind(make_sandbox):
    sb, _ = make_sandbox()
    r = sb.run("sleep 100 & kill -9 $PPID; sleep 50", timeout=20)
    assert r.exit_code == 137
    assert "supervisor was killed" in r.stderr
    assert "sleep" not in sb.run("ps -eo args=", timeout=20).stdout
    assert sb.run("echo still here", timeout=20).stdout == "still here\n"


def test_an_idle_agent_retires_and_the_next_call_gets_a_fresh_container(make_sandbox):
    sb, wt = make_sandbox(agent_idle_s=0.5)
    first = sb.container_id
    (wt.path / "kept.txt").write_text("on the worktree\n")
    wait_until_exited(first, "the idle agent did not exit")
    assert sb.run("cat kept.txt", timeout=20).stdout == "on the worktree\n"
    assert sb.container_id != first
    assert first not in container_ids()


def test_an_agent_past_its_lifetime_finishes_the_running_call_first(make_sandbox):
    sb, _ = make_sandbox(agent_lifetime_s=1)
    r = sb.run("sleep 2; echo finished", timeout=20)
    assert (r.exit_code, r.stdout) == (0, "finished\n")
    assert sb.run("echo on a fresh agent", timeout=20).stdout == "on a fresh agent\n"


def test_close_removes_container_and_is_idempotent(make_sandbox):
    sb, _ = make_sandbox()
    assert sb.container_id in container_ids()
    sb.close()
    sb.close()
    assert sb.container_id not in container_ids()
    with pytest.raises(SandboxError, match="closed"):
        sb.run("true", timeout=5)


def test_an_image_without_python3_runs_calls_through_docker_exec(make_sandbox, shell_only_image):
    sb, _ = make_sandbox(image=shell_only_image)
    assert not sb.uses_agent
    r = sb.run("id -u; echo err >&2; cat; exit 3", timeout=20, stdin=b"piped\n")
    assert (r.exit_code, r.stdout, r.stderr) == (3, "1000\npiped\n", "err\n")


def test_docker_exec_path_kills_a_timed_out_call_and_what_it_left(make_sandbox, shell_only_image):
    sb, _ = make_sandbox(image=shell_only_image)
    r = sb.run("sleep 100 & sleep 101", timeout=1)
    assert r.timed_out and r.exit_code == 124
    assert sb.run("sleep 102 & echo started", timeout=20).stdout == "started\n"
    listing = sb.run("for p in /proc/[0-9]*; do cat $p/cmdline; echo; done", timeout=20).stdout
    assert "sleep10" not in listing.replace("\0", "")  # none of the three survived its call
    assert "sleep86400" in listing.replace("\0", "")  # the container's own process did


def test_a_start_that_times_out_leaves_no_container(sandbox_image, tmp_path, monkeypatch):
    silent = tmp_path / "silent_agent.py"
    silent.write_text("import time\ntime.sleep(60)\n")  # never connects back
    monkeypatch.setattr(sandbox_docker, "AGENT_SOURCE", silent)
    monkeypatch.setattr(sandbox_docker, "START_TIMEOUT_S", 1.0)
    (tmp_path / "wt").mkdir()
    run_id = f"silent-{secrets.token_hex(4)}"
    with pytest.raises(SandboxError, match="did not connect within 1s"):
        sandbox_docker.DockerSandbox.start(run_id=run_id, worktree=tmp_path / "wt", image=sandbox_image)
    assert containers_of(run_id) == []


def test_missing_image_gives_clear_error(git_repo, tmp_path):
    run_id = f"noimg-{secrets.token_hex(4)}"
    wt = create_worktree(git_repo, tmp_path / "worktrees", "demo", run_id)
    with pytest.raises(SandboxError, match="loopwright sandbox build") as err:
        sandbox_docker.DockerSandbox.start(run_id=run_id, worktree=wt.path, image="loopwright-sandbox:does-not-exist")
    assert "loopwright-sandbox:does-not-exist" in str(err.value)
    assert containers_of(run_id) == []


def wait_until_exited(container_id: str, what: str) -> None:
    client = docker.from_env()
    deadline = time.monotonic() + 30
    while client.api.inspect_container(container_id)["State"]["Status"] != "exited":
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_reap_orphans_removes_dead_owners_container_only(make_sandbox, sandbox_image, tmp_path):
    live, _ = make_sandbox("live")
    (tmp_path / "child-wt").mkdir()
    with owner_process(sandbox_image, tmp_path / "child-wt") as (child, orphan, _):
        assert orphan.startswith("loopwright-orphan-")
        assert orphan not in reap_orphans()  # owner still alive: left alone
        child.send_signal(signal.SIGKILL)  # no atexit, no cleanup: a real crash
        child.wait(10)
        assert orphan in reap_orphans()
        names = {s["name"] for s in list_sandboxes()}
        assert orphan not in names
        assert live.name in names


def test_reap_orphans_removes_agent_folders_a_dead_owner_left(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = os.getpid()
    left = Path(tempfile.mkdtemp(prefix=f"loopwright-agent-{dead.pid}-12345-"))
    mine = Path(tempfile.mkdtemp(prefix=f"loopwright-agent-{me}-{process_start_time(me)}-"))
    try:
        reap_orphans()
        assert not left.exists() and mine.exists()
    finally:
        shutil.rmtree(left, ignore_errors=True)
        shutil.rmtree(mine, ignore_errors=True)


def test_the_agent_exits_when_its_owner_dies(sandbox_image, tmp_path):
    (tmp_path / "child-wt").mkdir()
    with owner_process(sandbox_image, tmp_path / "child-wt") as (child, _, container_id):
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        wait_until_exited(container_id, "the agent kept running after its owner died")
