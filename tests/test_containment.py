"""Containment: each test makes an escape attempt inside a real sandbox and shows that it fails.

No test sends network traffic anywhere: the network checks look at the container's interfaces.
"""

import os
import secrets
import subprocess
import threading

import pytest

from loopwright.plugins import sandbox_tools
from loopwright.runtime.types import ToolContext
from loopwright.runtime.worktree import commit_all
from sandbox_fixtures import git, make_sandbox  # noqa: F401 (fixture)


def tool(sb, name: str, **arguments):
    """Call a built-in file tool as the maker would; returns what the model reads."""
    handler = next(t.handler for t in sandbox_tools.TOOLS if t.name == name)
    return handler(ToolContext(run=None, sandbox=sb, timeout=20, output_limit=30_000), arguments)


@pytest.fixture
def host_secret(tmp_path):
    """A host file and a host folder the sandbox must never read, each with a unique content."""
    secret = f"host-secret-{secrets.token_hex(8)}"
    (tmp_path / "host-secret.txt").write_text(secret + "\n")
    (tmp_path / "host-folder").mkdir()
    (tmp_path / "host-folder" / "inner-secret.txt").write_text(secret + "\n")
    return secret, tmp_path / "host-secret.txt", tmp_path / "host-folder"


def test_no_network_interface_but_loopback(make_sandbox):
    sb, _ = make_sandbox()
    r = sb.run("ls /sys/class/net; tail -n +3 /proc/net/dev | cut -d: -f1; cat /proc/net/route | wc -l", timeout=20)
    assert r.stdout.split() == ["lo", "lo", "1"]  # the route table has its header line only


FORK_BOMB = """
import os, sys, time
end, refused = time.time() + 3, 0
while time.time() < end:
    try:
        os.fork()
    except OSError:
        refused += 1
if refused:
    print("refused", flush=True)
"""


def test_a_fork_bomb_stops_at_the_pids_limit_and_the_host_stays_responsive(make_sandbox):
    sb, _ = make_sandbox(pids_limit=64)
    bombed = {}
    bomb = threading.Thread(target=lambda: bombed.update(result=sb.run("python3 -c '" + FORK_BOMB + "'", timeout=30)))
    bomb.start()
    host_calls = [subprocess.run(["/bin/true"], timeout=10).returncode for _ in range(5)]
    bomb.join(60)
    assert host_calls == [0] * 5
    assert "refused" in bombed["result"].stdout  # forks failed: the limit held
    r = sb.run("cat /sys/fs/cgroup/pids/pids.max; ps -e --no-headers | wc -l", timeout=20)
    limit, processes = r.stdout.split()
    assert limit == "64" and int(processes) < 10  # the bomb is gone; the agent, its supervisors, this call remain


def test_allocating_past_the_memory_limit_is_killed_and_the_sandbox_keeps_serving(make_sandbox):
    sb, _ = make_sandbox(memory="128m")
    r = sb.run("python3 -c \"block = b'x' * (512 << 20); print('allocated')\"", timeout=60)
    assert r.exit_code == 137 and "allocated" not in r.stdout  # SIGKILL from the kernel's OOM killer
    assert sb.run("cat /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes", timeout=20).stdout == f"{128 << 20}\n"
    assert sb.run("echo still here", timeout=20).stdout == "still here\n"


def test_writing_outside_the_workspace_fails(make_sandbox):
    sb, _ = make_sandbox()
    r = sb.run("for f in /x /etc/x /usr/bin/x /root/x /var/x /run/loopwright/x; do "
               "  touch $f 2>/dev/null && echo wrote $f; done; "
               "head -c 100M /dev/zero > /tmp/big || echo tmp full; ls /run/loopwright", timeout=30)
    assert "wrote" not in r.stdout
    assert "No space left on device" in r.stderr and "tmp full" in r.stdout  # /tmp is a small tmpfs
    assert sb.run("touch /workspace/x && echo ok", timeout=20).stdout == "ok\n"


def test_the_root_filesystem_is_mounted_read_only(make_sandbox):
    sb, _ = make_sandbox()
    r = sb.run("awk '$2 == \"/\" {print $4}' /proc/mounts; touch /var/tmp/x", timeout=20)  # /var/tmp: mode 1777
    assert r.stdout.startswith("ro,")
    assert r.exit_code != 0 and "Read-only file system" in r.stderr


def test_file_tools_refuse_a_planted_symlink_to_a_host_file(make_sandbox, host_secret):
    secret, secret_file, _ = host_secret
    sb, wt = make_sandbox()
    os.symlink(secret_file, wt.path / "leak.txt")
    answers = [
        tool(sb, "read_file", path="leak.txt"),
        tool(sb, "write_file", path="leak.txt", content="overwritten"),
        tool(sb, "edit_file", path="leak.txt", old_text="host", new_text="x"),
    ]
    for answer in answers:
        assert answer.is_error and "outside /workspace" in answer.content and secret not in answer.content
    assert secret_file.read_text() == secret + "\n"


def test_file_tools_do_not_enter_a_planted_link_to_a_host_folder(make_sandbox, host_secret):
    secret, _, host_folder = host_secret
    sb, wt = make_sandbox()
    os.symlink(host_folder, wt.path / "linked")
    listing = tool(sb, "list_files")
    assert "inner-secret.txt" not in listing.content and "README.md" in listing.content
    for answer in (tool(sb, "list_files", path="linked"), tool(sb, "read_file", path="linked/inner-secret.txt"),
                   tool(sb, "write_file", path="linked/new.txt", content="x")):
        assert answer.is_error and "outside /workspace" in answer.content
    assert sorted(p.name for p in host_folder.iterdir()) == ["inner-secret.txt"]


def test_the_shell_cannot_read_a_host_file_through_a_planted_symlink(make_sandbox, host_secret):
    secret, secret_file, host_folder = host_secret
    sb, wt = make_sandbox()
    os.symlink(secret_file, wt.path / "leak.txt")
    os.symlink(host_folder, wt.path / "linked")
    r = sb.run("cat leak.txt; cat linked/inner-secret.txt; ls -la linked/; cat $(readlink leak.txt)", timeout=20)
    assert secret not in r.stdout + r.stderr
    assert "No such file or directory" in r.stderr  # the link resolves inside the container, where nothing is


def test_committing_stores_a_planted_symlink_as_a_link_not_the_host_file(make_sandbox, host_secret, git_repo):
    secret, secret_file, _ = host_secret
    _, wt = make_sandbox()
    os.symlink(secret_file, wt.path / "leak.txt")
    commit_all(wt, "with a link")
    assert git(git_repo, "cat-file", "-p", f"{wt.branch}:leak.txt") == str(secret_file)
    assert secret not in git(git_repo, "log", "-p", wt.branch)


def test_no_capabilities_so_mount_and_raw_sockets_fail(make_sandbox):
    sb, _ = make_sandbox()
    status = sb.run("grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status", timeout=20).stdout.split()
    assert status == ["CapEff:", "0000000000000000", "CapBnd:", "0000000000000000", "NoNewPrivs:", "1"]
    r = sb.run("mkdir -p /tmp/m; mount -t tmpfs none /tmp/m || echo mount refused; "
               "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)' "
               "|| echo raw socket refused; unshare --user true || echo unshare refused", timeout=20)
    assert r.stdout.split("\n")[:3] == ["mount refused", "raw socket refused", "unshare refused"]
    assert "PermissionError: [Errno 1] Operation not permitted" in r.stderr


def test_no_docker_socket_or_any_host_socket_is_reachable(make_sandbox):
    sb, _ = make_sandbox()
    r = sb.run("ls -la /var/run/docker.sock /run/docker.sock /run/containerd/containerd.sock; "
               "find / \\( -path /proc -o -path /sys \\) -prune -o -type s -print; grep -ci -e docker -e containerd /proc/net/unix", timeout=30)
    assert r.stderr.count("No such file or directory") == 3
    assert r.stdout.split() == ["0"]  # no socket file on any file system, none of Docker's in the socket table


def test_the_host_environment_is_not_visible(make_sandbox, monkeypatch):
    monkeypatch.setenv("LOOPWRIGHT_TEST_SECRET", "s3cr3t-value-do-not-leak")
    sb, _ = make_sandbox()
    r = sb.run("env", timeout=20)
    assert r.exit_code == 0
    assert "s3cr3t-value-do-not-leak" not in r.stdout
    names = {line.split("=", 1)[0] for line in r.stdout.splitlines()}
    assert names <= {"HOME", "PATH", "HOSTNAME", "PWD", "SHLVL", "LC_CTYPE", "_"}


def test_processes_inside_cannot_kill_the_agent(make_sandbox):
    sb, _ = make_sandbox()
    before = sb.run("cat /proc/1/stat", timeout=20).stdout.split()[21]  # the agent's start time
    sb.run("kill -9 1; kill -TERM 1; kill -INT 1", timeout=20)
    assert sb.run("cat /proc/1/stat", timeout=20).stdout.split()[21] == before
