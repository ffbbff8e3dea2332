"""The sandbox with real containers: isolation, worktree round trip, timeouts, cleanup."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sandbox import (
    DockerSandbox,
    SandboxError,
    changed_files,
    commit_all,
    create_worktree,
    diff,
    list_sandboxes,
    reap_orphans,
)

ROOT = Path(__file__).resolve().parent.parent


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "safe.directory=*", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


def _container_ids() -> set[str]:
    return {s["id"] for s in list_sandboxes()}


@pytest.fixture
def make_sandbox(sandbox_image, git_repo, tmp_path):
    """Start sandboxes on worktrees of git_repo; every one is removed at teardown."""
    started = []

    def make(run_id="run1", **kwargs):
        wt = create_worktree(git_repo, tmp_path / "worktrees", "demo", run_id)
        sb = DockerSandbox.start(run_id=run_id, worktree=wt.path, image=sandbox_image, **kwargs)
        started.append(sb)
        return sb, wt

    yield make
    for sb in started:
        sb.close()


def test_command_runs_in_container_as_non_root(make_sandbox):
    sb, _ = make_sandbox()
    r = sb.run("cat /etc/hostname; id -u; pwd", timeout=20)
    hostname, uid, cwd = r.stdout.split()
    assert r.exit_code == 0 and not r.timed_out
    assert hostname == sb.container_id[:12]
    assert uid != "0"
    assert cwd == "/workspace"


def test_exit_code_stderr_and_stdin(make_sandbox):
    sb, _ = make_sandbox()
    r = sb.run("echo out; echo err >&2; exit 3", timeout=20)
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
    r = sb.run("python3 -c 'import json, sys; print(json.load(sys.stdin)[\"x\"] * 2)'", timeout=20, stdin=b'{"x": 21}')
    assert (r.exit_code, r.stdout) == (0, "42\n")


def test_sandbox_writes_reach_worktree_and_commit_all_commits_on_run_branch(make_sandbox, git_repo):
    sb, wt = make_sandbox()
    r = sb.run("mkdir -p src && echo 'print(1)' > src/new.py && rm README.md", timeout=20)
    assert r.exit_code == 0, r.stderr
    assert (wt.path / "src/new.py").read_text() == "print(1)\n"
    assert sorted(changed_files(wt)) == ["README.md", "src/new.py"]
    assert "+print(1)" in diff(wt)

    sha = commit_all(wt, "loop step 1")
    assert sha is not None
    log = _git(git_repo, "log", "--format=%H %s|%an <%ae>", "-1", wt.branch).strip()
    assert log == f"{sha} loop step 1|Loopwright <loopwright@localhost>"
    assert _git(git_repo, "show", f"{wt.branch}:src/new.py") == "print(1)\n"
    assert commit_all(wt, "nothing new") is None
    # The user's own branch and checkout did not move.
    assert _git(git_repo, "log", "--format=%s", "main").split() == ["initial"]
    assert (git_repo / "README.md").exists()


def test_no_network_interface_but_loopback(make_sandbox):
    sb, _ = make_sandbox()
    r = sb.run("ls /sys/class/net; tail -n +3 /proc/net/dev | cut -d: -f1", timeout=20)
    assert r.stdout.split() == ["lo", "lo"]


def test_host_environment_is_not_visible(make_sandbox, monkeypatch):
    monkeypatch.setenv("LOOPWRIGHT_TEST_SECRET", "s3cr3t-value-do-not-leak")
    sb, _ = make_sandbox()
    r = sb.run("env", timeout=20)
    assert r.exit_code == 0
    assert "s3cr3t-value-do-not-leak" not in r.stdout
    assert "LOOPWRIGHT_TEST_SECRET" not in r.stdout
    names = {line.split("=", 1)[0] for line in r.stdout.splitlines()}
    assert names <= {"HOME", "PATH", "HOSTNAME", "PWD", "SHLVL", "LC_CTYPE", "_"}


def test_timeout_kills_command_and_children_and_sandbox_keeps_serving(make_sandbox):
    sb, _ = make_sandbox()
    t0 = time.monotonic()
    r = sb.run("sleep 100 & setsid sleep 101 & sleep 102", timeout=1.5)
    assert r.timed_out and r.exit_code == 124
    assert time.monotonic() - t0 < 15
    ps = sb.run("ps -eo stat=,args=", timeout=20)
    assert ps.exit_code == 0
    assert "sleep 10" not in ps.stdout, ps.stdout  # neither running nor zombie
    assert sb.run("echo still here", timeout=20).stdout == "still here\n"


def test_background_processes_do_not_outlive_their_call(make_sandbox):
    sb, _ = make_sandbox()
    r = sb.run("sleep 100 & echo started", timeout=20)
    assert (r.exit_code, r.stdout, r.timed_out) == (0, "started\n", False)
    assert "sleep 100" not in sb.run("ps -eo args=", timeout=20).stdout


def test_close_removes_container_and_is_idempotent(make_sandbox):
    sb, _ = make_sandbox()
    assert sb.container_id in _container_ids()
    sb.close()
    sb.close()
    assert sb.container_id not in _container_ids()
    with pytest.raises(SandboxError, match="closed"):
        sb.run("true", timeout=5)


def test_reap_orphans_removes_dead_owners_container_only(make_sandbox, sandbox_image, tmp_path):
    live, _ = make_sandbox("live")
    child_wt = tmp_path / "child-wt"
    child_wt.mkdir()
    child_code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from sandbox import DockerSandbox
        sb = DockerSandbox.start(run_id="orphan", worktree={str(child_wt)!r}, image={sandbox_image!r})
        print(sb.name, flush=True)
        time.sleep(300)
    """)
    child = subprocess.Popen([sys.executable, "-c", child_code], stdout=subprocess.PIPE, text=True)
    orphan_name = None
    try:
        orphan_name = child.stdout.readline().strip()
        assert orphan_name.startswith("loopwright-orphan-")
        assert reap_orphans() == []  # owner still alive: left alone
        child.send_signal(signal.SIGKILL)  # no atexit, no cleanup: a real crash
        child.wait(10)
        assert orphan_name in reap_orphans()
        names = {s["name"] for s in list_sandboxes()}
        assert orphan_name not in names
        assert live.name in names
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        if orphan_name:
            subprocess.run(["docker", "rm", "-f", orphan_name], capture_output=True)


def test_worktree_leaves_dirty_checkout_untouched_and_runs_do_not_collide(git_repo, tmp_path):
    (git_repo / "README.md").write_text("user edit, not committed\n")
    (git_repo / "notes.txt").write_text("untracked\n")
    status_before = _git(git_repo, "status", "--porcelain")

    root = tmp_path / "worktrees"
    a = create_worktree(git_repo, root, "demo", "a")
    b = create_worktree(git_repo, root, "demo", "b")
    assert a.path != b.path and a.branch != b.branch
    assert a.base_commit == b.base_commit == _git(git_repo, "rev-parse", "HEAD").strip()
    assert (a.path / "README.md").read_text() == "hello\n"  # from HEAD, not the dirty file
    assert not (a.path / "notes.txt").exists()

    (a.path / "only-in-a.txt").write_text("a\n")
    assert not (b.path / "only-in-a.txt").exists()
    assert changed_files(a) == ["only-in-a.txt"] and changed_files(b) == []

    assert create_worktree(git_repo, root, "demo", "a") == a  # resumed run gets the same worktree
    assert _git(git_repo, "status", "--porcelain") == status_before
    assert (git_repo / "README.md").read_text() == "user edit, not committed\n"


def test_worktree_errors_name_the_problem(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(Exception, match="not a git repository"):
        create_worktree(plain, tmp_path / "wts", "demo", "r")
    subprocess.run(["git", "init", "-q", str(plain)], check=True)
    with pytest.raises(Exception, match="no commits"):
        create_worktree(plain, tmp_path / "wts", "demo", "r")


def test_missing_image_gives_clear_error(git_repo, tmp_path):
    wt = create_worktree(git_repo, tmp_path / "worktrees", "demo", "noimg")
    before = _container_ids()
    with pytest.raises(SandboxError, match="loopwright sandbox build") as err:
        DockerSandbox.start(run_id="noimg", worktree=wt.path, image="loopwright-sandbox:does-not-exist")
    assert "loopwright-sandbox:does-not-exist" in str(err.value)
    assert _container_ids() == before
