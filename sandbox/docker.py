"""One locked-down Docker container per run; every tool call of the run executes in it.

The container idles and each command is a ``docker exec``. The run's worktree is the only
mount (read-write at /workspace); the root file system is read-only, all capabilities are
dropped, there is no network unless asked for, and no host environment variable gets in.
Containers are labelled with their owner process (pid + start time) so containers left by
a crashed engine can be found and removed by ``reap_orphans``.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import os
import re
import secrets
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .image import SANDBOX_PATH, image_exists

WORKDIR = "/workspace"
SANDBOX_UID_GID = "1000:1000"  # used when the host process is root
START_TIMEOUT_S = 30.0
_HOST_GRACE_S = 15.0  # extra time the host waits beyond the in-container timeout
TIMEOUT_EXIT_CODE = 124
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
LABEL = "loopwright"

# Runs inside the container for every command. It starts `sh -c CMD` in its own session,
# becomes a child subreaper (so even double-forked/setsid'd descendants stay under it),
# and when the command ends or times out kills every remaining descendant and reaps it.
# A tool call therefore never leaves processes behind, and zombies never pile up.
# It runs with `python3 -I -S` so modules the agent writes into /workspace (the cwd) can
# never shadow the stdlib modules it imports.
_SUPERVISOR = r"""
import ctypes, os, signal, subprocess, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except Exception:
    pass
timeout, cmd = float(sys.argv[1]), sys.argv[2]
def descendants():
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                f = open("/proc/%s/stat" % d).read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            kids.setdefault(int(f[1]), []).append((int(d), f[0]))
    out, stack = [], [os.getpid()]
    while stack:
        for pid, state in kids.get(stack.pop(), []):
            out.append((pid, state)); stack.append(pid)
    return out
def kill_all():
    for _ in range(100):
        live = [p for p, s in descendants() if s != "Z"]
        for p in live:
            try: os.kill(p, signal.SIGKILL)
            except OSError: pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0: break
            except ChildProcessError: break
        if not live: return
p = subprocess.Popen(["sh", "-c", cmd], start_new_session=True)
try:
    rc = p.wait(timeout)
    timed_out = False
except subprocess.TimeoutExpired:
    timed_out = True
kill_all()
if timed_out:
    sys.stderr.write("\nloopwright: command timed out after %gs; it and its children were killed\n" % timeout)
    sys.stderr.flush()
    os._exit(124)
sys.stdout.flush()
os._exit(rc if rc >= 0 else 128 - rc)
"""


class SandboxError(RuntimeError):
    """The sandbox could not be started or used; the message says what to do."""


@dataclass
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str
    duration_ms: float
    timed_out: bool = False


_client_lock = threading.Lock()
_client_obj = None
_live_lock = threading.Lock()
_LIVE: set["DockerSandbox"] = set()


def _client():
    global _client_obj
    with _client_lock:
        if _client_obj is None:
            import docker

            try:
                c = docker.from_env(timeout=int(START_TIMEOUT_S))
                c.ping()
            except Exception as exc:
                raise SandboxError(
                    f"Docker is unreachable ({exc}); start the Docker daemon and check access to its socket"
                ) from exc
            _client_obj = c
        return _client_obj


def _proc_start_time(pid: int) -> str | None:
    """Start time (clock ticks since boot, /proc/<pid>/stat field 22): tells a pid apart from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alive(labels: dict) -> bool | None:
    """True/False for containers owned from this host; None when owned from elsewhere (cannot tell)."""
    if labels.get("loopwright.owner.host") != socket.gethostname():
        return None
    try:
        pid = int(labels.get("loopwright.owner.pid", ""))
    except ValueError:
        return False
    started = _proc_start_time(pid)
    return started is not None and started == labels.get("loopwright.owner.started")


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def _parse_user(user: str) -> tuple[int, int]:
    uid, gid = user.split(":")
    return int(uid), int(gid)


class DockerSandbox:
    """A running sandbox container for one run. Create with ``DockerSandbox.start``."""

    def __init__(self, *, container_id: str, name: str, run_id: str, worktree: Path, image: str,
                 network: str, user: str):
        self.container_id = container_id
        self.name = name
        self.run_id = run_id
        self.worktree = worktree
        self.image = image
        self.network = network
        self.user = user
        self._closed = False
        self._close_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DockerSandbox(name={self.name!r}, image={self.image!r}, worktree={str(self.worktree)!r})"

    @classmethod
    def start(cls, *, run_id: str, worktree: Path, image: str, network: str = "none", memory: str = "1g",
              pids_limit: int = 256, cpus: float = 1.0) -> "DockerSandbox":
        """Start the run's container; on any failure nothing is left running."""
        if not _SAFE_ID.match(run_id):
            raise SandboxError(f"run id {run_id!r} is not usable in a container name; use letters, digits, '.', '_', '-'")
        if network not in ("none", "bridge"):
            raise SandboxError(f"network {network!r} is not allowed; use 'none' (default) or 'bridge'")
        if cpus <= 0:
            raise SandboxError(f"cpus={cpus!r} must be positive")
        worktree = Path(worktree).resolve()
        if not worktree.is_dir():
            raise SandboxError(f"worktree {worktree} does not exist; create it (sandbox.create_worktree) before starting")
        client = _client()
        if not image_exists(image):
            raise SandboxError(
                f"sandbox image {image!r} is not present in the local Docker engine; "
                "run `loopwright sandbox build` or set `[sandbox] image` to an image you have"
            )

        if os.getuid() == 0:
            user = SANDBOX_UID_GID
            _chown_tree(worktree, *_parse_user(user))  # so the sandbox user owns what it edits
        else:
            user = f"{os.getuid()}:{os.getgid()}"

        me = os.getpid()
        name = f"loopwright-{run_id}-{secrets.token_hex(3)}"
        labels = {
            LABEL: "1",
            "loopwright.run": run_id,
            "loopwright.owner.pid": str(me),
            "loopwright.owner.started": _proc_start_time(me) or "",
            "loopwright.owner.host": socket.gethostname(),
            "loopwright.created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            container = client.containers.run(
                image,
                command=["sleep", "infinity"],
                name=name,
                detach=True,
                init=True,  # docker-init reaps anything that still ends up orphaned at pid 1
                labels=labels,
                user=user,
                working_dir=WORKDIR,
                environment={"HOME": "/tmp", "PATH": SANDBOX_PATH},
                volumes={str(worktree): {"bind": WORKDIR, "mode": "rw"}},
                network_mode=network,
                mem_limit=memory,
                memswap_limit=memory,
                pids_limit=pids_limit,
                nano_cpus=int(cpus * 1e9),
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                read_only=True,
                tmpfs={"/tmp": "rw,exec,nosuid,nodev,size=64m,mode=1777"},
            )
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                container.reload()
                if container.status == "running":
                    break
                if container.status in ("exited", "dead") or time.monotonic() > deadline:
                    logs = container.logs(tail=20).decode("utf-8", "replace").strip()
                    raise SandboxError(
                        f"sandbox container {name} did not start (status {container.status!r}) from image "
                        f"{image!r}: {logs or 'no output'}"
                    )
                time.sleep(0.05)
        except Exception as exc:
            _force_remove(name)
            if isinstance(exc, SandboxError):
                raise
            raise SandboxError(f"could not start sandbox container {name} from image {image!r}: {exc}") from exc

        sb = cls(container_id=container.id, name=name, run_id=run_id, worktree=worktree, image=image,
                 network=network, user=user)
        with _live_lock:
            _LIVE.add(sb)
        return sb

    def run(self, command: str, *, timeout: float, stdin: bytes | None = None) -> ExecResult:
        """Run ``sh -c command`` in /workspace as the sandbox user; on timeout kill it and all its children."""
        if self._closed:
            raise SandboxError(f"sandbox {self.name} is closed; start a new one for run {self.run_id}")
        if timeout <= 0:
            raise SandboxError(f"timeout={timeout!r} must be positive (seconds)")
        argv = ["docker", "exec"]
        if stdin is not None:
            argv.append("-i")
        argv += ["-u", self.user, "-w", WORKDIR, self.container_id,
                 "python3", "-I", "-S", "-c", _SUPERVISOR, repr(float(timeout)), command]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                argv,
                input=stdin if stdin is not None else None,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout + _HOST_GRACE_S,
            )
        except subprocess.TimeoutExpired as exc:
            # The in-container supervisor should have ended it already; the engine is not answering.
            return ExecResult(
                exit_code=TIMEOUT_EXIT_CODE,
                stdout=(exc.stdout or b"").decode("utf-8", "replace"),
                stderr=(exc.stderr or b"").decode("utf-8", "replace")
                + f"\nloopwright: docker exec did not return within {timeout + _HOST_GRACE_S:g}s",
                duration_ms=(time.monotonic() - t0) * 1000,
                timed_out=True,
            )
        duration_ms = (time.monotonic() - t0) * 1000
        stderr = proc.stderr.decode("utf-8", "replace")
        if proc.returncode in (125, 126, 1) and stderr.startswith(("Error response from daemon", "Error: No such container")):
            raise SandboxError(f"docker exec in sandbox {self.name} failed: {stderr.strip()}")
        return ExecResult(
            exit_code=proc.returncode,
            stdout=proc.stdout.decode("utf-8", "replace"),
            stderr=stderr,
            duration_ms=duration_ms,
            timed_out=proc.returncode == TIMEOUT_EXIT_CODE and duration_ms >= timeout * 1000,
        )

    def close(self) -> None:
        """Remove the container (forcefully). Safe to call more than once."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _force_remove(self.container_id)
        with _live_lock:
            _LIVE.discard(self)

    def __enter__(self) -> "DockerSandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _force_remove(name_or_id: str) -> None:
    import docker

    try:
        _client().api.remove_container(name_or_id, force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if "already in progress" not in str(exc):
            raise


def close_all() -> None:
    """Remove every sandbox this process started and has not closed yet (exit / signal path)."""
    with _live_lock:
        live = list(_LIVE)
    for sb in live:
        try:
            sb.close()
        except Exception:
            pass  # best effort at exit; reap_orphans catches leftovers


atexit.register(close_all)


def _labelled_containers():
    return _client().containers.list(all=True, filters={"label": f"{LABEL}=1"})


def list_sandboxes() -> list[dict]:
    """All loopwright containers on this engine, with owner liveness (None = owned from another host)."""
    out = []
    for c in _labelled_containers():
        labels = c.labels or {}
        out.append({
            "name": c.name,
            "id": c.id,
            "run_id": labels.get("loopwright.run"),
            "owner_pid": int(labels["loopwright.owner.pid"]) if labels.get("loopwright.owner.pid", "").isdigit() else None,
            "owner_host": labels.get("loopwright.owner.host"),
            "alive": _owner_alive(labels),
            "created": labels.get("loopwright.created"),
            "status": c.status,
        })
    return out


def reap_orphans() -> list[str]:
    """Remove loopwright containers whose owning process (on this host) is gone; return their names."""
    removed = []
    for c in _labelled_containers():
        if _owner_alive(c.labels or {}) is False:
            _force_remove(c.id)
            removed.append(c.name)
    return removed
