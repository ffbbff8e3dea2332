"""One locked-down Docker container per run; every tool call of the run executes in it.

A tool call does not pay for a ``docker exec`` (60-70 ms here): the container's command is the
in-sandbox agent (``sandbox/agent.py``, mounted read-only from the host), which connects back to
a Unix socket the host listens on and runs each call in about a millisecond. Images without
python3 fall back to one ``docker exec`` per call.

The run's worktree is the only writable mount (at /workspace); the root file system is read-only,
all capabilities are dropped, privileges cannot be regained, there is no network unless asked
for, and no host environment variable gets in. Containers are labelled with their owner process
(pid + start time) and Loopwright home so containers left by a crashed engine can be found and removed
by ``reap_orphans`` of the same home; the agent also exits by itself when its owner's connection closes.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime as _dt
import itertools
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .agent import TIMEOUT_EXIT_CODE, CappedOutput
from .image import SANDBOX_PATH

WORKDIR = "/workspace"
AGENT_DIR = "/run/loopwright"  # in the container: the agent's code and the host's socket, read-only
AGENT_SOURCE = Path(__file__).with_name("agent.py")
SANDBOX_UID_GID = "1000:1000"  # used when the host process is root
START_TIMEOUT_S = 30.0
OUTPUT_LIMIT = 2 << 20  # bytes kept per stream of one call (head and tail)
AGENT_IDLE_S = 3600.0  # the agent exits after this long without calls (a new one starts on demand)
AGENT_LIFETIME_S = 86400.0  # ... and after this long in all
TMPFS_SIZE = "64m"
_HOST_GRACE_S = 15.0  # extra time the host waits beyond the in-container timeout
_DOCKER_API_TIMEOUT_S = 60
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
LABEL = "loopwright"
HOME_LABEL = "loopwright.home"  # the owner's Loopwright home: a reaper removes only its own home's sandboxes
_AGENT_FOLDER_PREFIX = "loopwright-agent-"  # + owner pid and start time: reap_orphans removes a dead owner's

# The docker-exec path (images without python3): run the command, then kill whatever it left
# running, i.e. every process but the init (1), the container's main process (the oldest child
# of the init) and this shell. POSIX sh only, so any image with a shell works.
_EXEC_WRAPPER = r"""
sh -c "$1"; rc=$?
main= first=
for d in /proc/[0-9]*; do
  { read -r s < "$d/stat"; } 2>/dev/null || continue
  set -- ${s##*") "}
  [ "$2" = 1 ] || continue
  eval "t=\${20}"
  if [ -z "$first" ] || [ "$t" -lt "$first" ]; then first=$t main=${d#/proc/}; fi
done
rounds=0
while [ $rounds -lt 50 ]; do
  rounds=$((rounds + 1)) killed=0
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    case $p in 1|$$|$main) continue;; esac
    kill -9 "$p" 2>/dev/null && killed=1
  done
  [ $killed = 0 ] && break
done
exit $rc
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
_launched = False  # this process has created a container (close_all then looks for its own)
_exiting = False  # close_all has begun: no new container


def _client():
    global _client_obj
    with _client_lock:
        if _client_obj is None:
            import docker

            try:
                c = docker.from_env(timeout=_DOCKER_API_TIMEOUT_S)
                c.ping()
            except Exception as exc:
                raise SandboxError(
                    f"Docker is unreachable ({exc}); start the Docker daemon and check access to its socket"
                ) from exc
            _client_obj = c
        return _client_obj


def loopwright_home() -> str:
    """The Loopwright home this process works for, as runtime/config.py finds it (LOOPWRIGHT_HOME, else
    ~/.loopwright; resolved): its sandboxes carry it in the ``loopwright.home`` label, and its reaper
    removes only sandboxes of that home (other homes may share the Docker engine)."""
    return str(Path(os.environ.get("LOOPWRIGHT_HOME") or Path.home() / ".loopwright").expanduser().resolve())


def _proc_start_time(pid: int) -> str | None:
    """Start time (clock ticks since boot, /proc/<pid>/stat field 22): tells a pid apart from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def owner_tag() -> str:
    """This process as a part of a name, `<pid>-<start time>`: a folder so named is told from a dead process's."""
    return f"{os.getpid()}-{_proc_start_time(os.getpid()) or ''}"


def owner_gone(tag: str) -> bool:
    """Whether the process an `owner_tag()` names has ended (a pid since reused by another process counts as ended)."""
    pid, _, started = tag.partition("-")
    return pid.isdigit() and _proc_start_time(int(pid)) != started


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


def _sandbox_user() -> str:
    """Root on the host runs the sandbox as an unprivileged uid; anyone else as themselves."""
    return SANDBOX_UID_GID if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}"


def give_worktree_to_sandbox_user(worktree: Path) -> None:
    """Make the sandbox user own the worktree's files, so it can edit them (only needed for a root host)."""
    if os.getuid() == 0:
        uid, gid = (int(part) for part in SANDBOX_UID_GID.split(":"))
        _chown_tree(worktree, uid, gid)


class _AgentGone(Exception):
    """The agent's connection closed: ``reason`` is what it said last (idle, lifetime) or why;
    ``unsent`` when the call never reached the agent whole, so running it elsewhere is safe."""

    def __init__(self, reason: str, unsent: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.unsent = unsent


class _AgentChannel:
    """The host's end of the one connection to a sandbox's agent: calls go out, answers come back by id."""

    _MAX_LINE = 64 << 20

    def __init__(self, sock: socket.socket, name: str):
        self.sock = sock
        self.reader = sock.makefile("rb")
        self.ids = itertools.count(1)
        self.lock = threading.Lock()  # guards pending and gone; the reader takes it for each answer
        self.send_lock = threading.Lock()  # apart, so a long send never keeps the reader from reading
        self.pending: dict[int, tuple[threading.Event, list]] = {}
        self.gone: str | None = None
        hello = self._read_line()
        if "hello" not in hello:
            raise SandboxError(f"the agent of sandbox {name} sent {hello!r} instead of its hello")
        threading.Thread(target=self._read_answers, name=f"loopwright-agent-{name}", daemon=True).start()

    def _read_line(self) -> dict:
        line = self.reader.readline(self._MAX_LINE)
        if not line.endswith(b"\n"):
            raise _AgentGone("the connection closed")
        return json.loads(line)

    def _read_answers(self) -> None:
        reason = "the connection closed"
        try:
            while True:
                answer = self._read_line()
                if "bye" in answer:
                    reason = answer["bye"]
                    continue
                with self.lock:
                    waiter = self.pending.pop(answer["id"], None)
                if waiter is not None:  # None: the host stopped waiting for it (its timeout passed)
                    waiter[1].append(answer)
                    waiter[0].set()
        except (_AgentGone, OSError, ValueError):
            pass
        with self.lock:
            self.gone = reason
            waiters = list(self.pending.values())
            self.pending.clear()
        for event, _ in waiters:
            event.set()

    def call(self, command: str, timeout: float, stdin: bytes | None) -> dict | None:
        """The agent's answer, or None when none came within ``timeout`` plus a grace period."""
        event, slot = threading.Event(), []
        request = {"cmd": command, "timeout": timeout,
                   "stdin": base64.b64encode(stdin).decode() if stdin is not None else None}
        with self.lock:
            if self.gone is not None:
                raise _AgentGone(self.gone, unsent=True)
            request["id"] = call_id = next(self.ids)
            self.pending[call_id] = (event, slot)
        try:
            with self.send_lock:
                self.sock.sendall((json.dumps(request) + "\n").encode())
        except OSError as exc:
            with self.lock:
                self.pending.pop(call_id, None)
            # Only a whole line is ever run, and a send that failed did not deliver one.
            raise _AgentGone(f"sending failed: {exc}", unsent=True) from exc
        if not event.wait(timeout + _HOST_GRACE_S):
            with self.lock:
                self.pending.pop(call_id, None)
            return None
        if not slot:
            raise _AgentGone(self.gone or "the connection closed")
        return slot[0]

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class DockerSandbox:
    """A running sandbox container for one run. Create with ``DockerSandbox.start``."""

    def __init__(self, *, container_id: str, name: str, run_id: str, worktree: Path, image: str,
                 network: str, user: str, channel: _AgentChannel | None, options: dict):
        self.container_id = container_id
        self.name = name
        self.run_id = run_id
        self.worktree = worktree
        self.image = image
        self.network = network
        self.user = user
        self._channel = channel
        self._options = options  # what start() was given, to start a fresh agent when one retires
        self._closed = False
        self._lock = threading.Lock()  # guards _closed and replacing the container
        self._exec_lock = threading.Lock()  # the docker-exec path runs one call at a time

    def __repr__(self) -> str:
        return f"DockerSandbox(name={self.name!r}, image={self.image!r}, worktree={str(self.worktree)!r})"

    @property
    def uses_agent(self) -> bool:
        """False when the image has no python3 and every call is a ``docker exec``."""
        return self._channel is not None

    @classmethod
    def start(cls, *, run_id: str, worktree: Path, image: str, network: str = "none", memory: str = "1g",
              pids_limit: int = 256, cpus: float = 1.0, output_limit: int = OUTPUT_LIMIT, agent: bool = True,
              agent_idle_s: float = AGENT_IDLE_S, agent_lifetime_s: float = AGENT_LIFETIME_S,
              pooled: bool = False, environment: dict[str, str] | None = None) -> "DockerSandbox":
        """Start the run's container and wait until it can run a command; on any failure nothing is left.

        ``agent=False`` runs every call through ``docker exec`` (as for an image without python3);
        ``pooled`` marks a warm pool's sandbox, whose run is named later by ``hand_over``;
        ``environment`` adds variables to the container's own (HOME and PATH).
        """
        if not _SAFE_ID.match(run_id):
            raise SandboxError(f"run id {run_id!r} is not usable in a container name; use letters, digits, '.', '_', '-'")
        if network not in ("none", "bridge"):
            raise SandboxError(f"network {network!r} is not allowed; use 'none' (default) or 'bridge'")
        if cpus <= 0:
            raise SandboxError(f"cpus={cpus!r} must be positive")
        if output_limit < 1024:
            raise SandboxError(f"output_limit={output_limit!r} is too small; give at least 1024 bytes")
        worktree = Path(worktree).resolve()
        if worktree.is_dir():
            give_worktree_to_sandbox_user(worktree)
        options = dict(run_id=run_id, worktree=worktree, image=image, network=network, memory=memory,
                       pids_limit=pids_limit, cpus=cpus, output_limit=output_limit, agent=agent,
                       agent_idle_s=agent_idle_s, agent_lifetime_s=agent_lifetime_s, pooled=pooled,
                       environment=dict(environment or {}))
        sb = cls(**_launch(options), run_id=run_id, worktree=worktree, image=image, network=network,
                 user=_sandbox_user(), options=options)
        with _live_lock:
            _LIVE.add(sb)
        return sb

    def run(self, command: str, *, timeout: float, stdin: bytes | None = None) -> ExecResult:
        """Run ``sh -c command`` in /workspace as the sandbox user; on timeout kill it and all its children."""
        if self._closed:
            raise SandboxError(f"sandbox {self.name} is closed; start a new one for run {self.run_id}")
        if timeout <= 0:
            raise SandboxError(f"timeout={timeout!r} must be positive (seconds)")
        channel = self._channel
        if channel is None:
            return self._exec_run(command, timeout=timeout, stdin=stdin)
        t0 = time.monotonic()
        try:
            answer = channel.call(command, timeout, stdin)
        except _AgentGone as gone:
            name = self.name
            ended = self._replace_agent(channel)
            if ended is None:
                raise SandboxError(f"sandbox {name} was closed during this call") from gone
            if gone.unsent or gone.reason in ("idle", "lifetime"):  # a retiring agent reads no more calls
                return self.run(command, timeout=timeout, stdin=stdin)
            raise SandboxError(
                f"the agent of sandbox {name} stopped during this call ({gone.reason}{ended}); the call's effects "
                "are unknown, a fresh sandbox on the same worktree serves the next calls"
            ) from gone
        duration_ms = (time.monotonic() - t0) * 1000
        if answer is None:
            return ExecResult(TIMEOUT_EXIT_CODE, "", f"loopwright: the sandbox agent did not answer within "
                              f"{timeout + _HOST_GRACE_S:g}s", duration_ms, timed_out=True)
        return ExecResult(answer["exit"], answer["stdout"], answer["stderr"], duration_ms, answer["timed_out"])

    @property
    def environment(self) -> dict[str, str]:
        """The variables ``start`` added to the container's own."""
        return dict(self._options["environment"])

    @property
    def retired(self) -> bool:
        """True once the agent has exited (idle, too old, or gone); the next call starts a fresh container."""
        return self._channel is not None and self._channel.gone is not None

    def hand_over(self, run_id: str, worktree: Path) -> None:
        """Give a pooled sandbox to a run, its folder now at ``worktree``. The container is renamed after the
        run (for `sandbox gc` and humans) in the background: that is slower than the rest of the hand-over."""
        self.run_id = self._options["run_id"] = run_id
        self.worktree = self._options["worktree"] = Path(worktree).resolve()
        self.name = _container_name(run_id)
        threading.Thread(target=_rename, args=(self.container_id, self.name), daemon=True).start()

    def _replace_agent(self, dead: _AgentChannel) -> str | None:
        """Start a new container for this sandbox after its agent retired or died, and say how the old one
        ended (see ``_how_it_ended``); None once closed."""
        with self._lock:
            if self._closed:
                return None
            ended = ""
            if self._channel is dead:
                old = self.container_id
                ended = _how_it_ended(old)
                launched = _launch(self._options)
                self.container_id, self.name, self._channel = launched["container_id"], launched["name"], launched["channel"]
                dead.close()
                _force_remove(old)
            return ended

    def _exec_run(self, command: str, *, timeout: float, stdin: bytes | None = None) -> ExecResult:
        """Run a command through ``docker exec``: the path for images without python3."""
        argv = ["docker", "exec", *(["-i"] if stdin is not None else []), "-u", self.user, "-w", WORKDIR,
                self.container_id, "sh", "-c", _EXEC_WRAPPER, "loopwright-call", command]
        limit = self._options["output_limit"]
        with self._exec_lock:
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            outputs = [CappedOutput(limit), CappedOutput(limit)]
            helpers = [threading.Thread(target=_drain, args=(stream, out), daemon=True)
                       for stream, out in zip((proc.stdout, proc.stderr), outputs)]
            if stdin is not None:
                helpers.append(threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True))
            for helper in helpers:
                helper.start()
            try:
                exit_code, timed_out = proc.wait(timeout), False
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                # Killing the client does not stop the command: the wrapper's cleanup, run alone, does.
                subprocess.run(["docker", "exec", "-u", self.user, self.container_id, "sh", "-c", _EXEC_WRAPPER,
                                "loopwright-cleanup", "true"], capture_output=True, timeout=START_TIMEOUT_S)
                exit_code, timed_out = TIMEOUT_EXIT_CODE, True
            for helper in helpers:
                helper.join(START_TIMEOUT_S)
        stdout, stderr = outputs[0].text(), outputs[1].text()
        if timed_out:
            stderr += f"\nloopwright: command timed out after {timeout:g}s; it and its children were killed\n"
        elif exit_code in (125, 126, 1) and stderr.startswith(("Error response from daemon", "Error: No such container")):
            raise SandboxError(f"docker exec in sandbox {self.name} failed: {stderr.strip()}")
        return ExecResult(exit_code, stdout, stderr, (time.monotonic() - t0) * 1000, timed_out)

    def close(self) -> None:
        """Remove the container (forcefully). Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._channel is not None:
            self._channel.close()
        _force_remove(self.container_id)
        with _live_lock:
            _LIVE.discard(self)

    def __enter__(self) -> "DockerSandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drain(stream, out: CappedOutput) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        out.add(chunk)


def _feed(stream, data: bytes) -> None:
    try:
        stream.write(data)
        stream.close()
    except (BrokenPipeError, ValueError):
        pass  # the command stopped reading, or was killed


def _rename(container_id: str, name: str) -> None:
    import docker

    try:
        _client().api.rename(container_id, name)
    except docker.errors.APIError:
        pass  # removed meanwhile; the name was only for show


def _container_name(run_id: str) -> str:
    return f"loopwright-{run_id}-{secrets.token_hex(3)}"


def _run_of(name: str, labels: dict) -> str | None:
    """A pooled container's run is in its name (labels cannot change once it was handed over)."""
    if labels.get("loopwright.pool") == "1":
        return name.removeprefix("loopwright-")[:-7]
    return labels.get("loopwright.run")


def _launch(options: dict) -> dict:
    """Create and start a container; return its id, name and agent channel (None on the exec path)."""
    import docker

    client = _client()
    run_id, image = options["run_id"], options["image"]
    if not options["worktree"].is_dir():  # Docker would make an empty folder there and mount that
        raise SandboxError(f"worktree {options['worktree']} does not exist; create it (sandbox.create_worktree) first")
    name = _container_name(run_id)
    labels = {
        LABEL: "1",
        "loopwright.run": run_id,
        **_owner_labels(),
        HOME_LABEL: loopwright_home(),
        "loopwright.created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if options["pooled"]:
        labels["loopwright.pool"] = "1"
    mounts = [f"{options['worktree']}:{WORKDIR}:rw"]
    listener, private = None, None
    if options["agent"]:
        # The socket sits in a folder only the owner can enter on the host (the container mounts the
        # inner folder directly), so no other host user can pose as the agent while it starts.
        private = Path(tempfile.mkdtemp(prefix=f"{_AGENT_FOLDER_PREFIX}{owner_tag()}-"))
        shared = private / "agent"
        shared.mkdir(mode=0o755)
        shutil.copyfile(AGENT_SOURCE, shared / "agent.py")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(shared / "host.sock"))
        os.chmod(shared / "host.sock", 0o666)
        listener.listen(1)
        mounts.append(f"{shared}:{AGENT_DIR}:ro")
        entrypoint = ["python3", "-I", "-S", f"{AGENT_DIR}/agent.py", "--socket", f"{AGENT_DIR}/host.sock",
                      "--workdir", WORKDIR, "--output-limit", str(options["output_limit"]),
                      "--idle", str(options["agent_idle_s"]), "--lifetime", str(options["agent_lifetime_s"])]
    else:
        entrypoint = ["sleep", str(int(options["agent_lifetime_s"]))]
    host_config = client.api.create_host_config(
        binds=mounts,
        init=not options["agent"],  # the agent is process 1 itself: nothing inside can kill it
        network_mode=options["network"],
        mem_limit=options["memory"],
        memswap_limit=options["memory"],
        pids_limit=options["pids_limit"],
        nano_cpus=int(options["cpus"] * 1e9),
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        read_only=True,
        tmpfs={"/tmp": f"rw,exec,nosuid,nodev,size={TMPFS_SIZE},mode=1777"},
        log_config={"type": "json-file", "config": {"max-size": "1m", "max-file": "1"}},
    )
    global _launched
    with _live_lock:
        if _exiting:
            raise SandboxError(f"not starting sandbox {name}: this process is exiting")
        _launched = True
    try:
        try:
            container_id = client.api.create_container(
                image, entrypoint=entrypoint, command=[], name=name, labels=labels, user=_sandbox_user(),
                working_dir=WORKDIR, environment={**options.get("environment", {}), "HOME": "/tmp", "PATH": SANDBOX_PATH},
                host_config=host_config, use_config_proxy=False,  # the client's proxy settings are host config
            )["Id"]
            if _exiting:  # close_all may have looked for this process's containers before this one existed
                raise SandboxError(f"not starting sandbox {name}: this process is exiting")
        except docker.errors.ImageNotFound:
            raise SandboxError(
                f"sandbox image {image!r} is not present in the local Docker engine; "
                "run `loopwright sandbox build` or set `[sandbox] image` to an image you have"
            ) from None
        try:
            client.api.start(container_id)
        except docker.errors.APIError as exc:
            if options["agent"] and "python3" in str(exc) and "not found" in str(exc):
                _force_remove(container_id)
                return _launch({**options, "agent": False})  # an image without python3: use docker exec
            raise
        channel = _accept_agent(listener, container_id, name, image) if listener else None
        if channel is None:
            _wait_running(container_id, name, image)
        return {"container_id": container_id, "name": name, "channel": channel}
    except Exception as exc:
        _force_remove(name)
        if isinstance(exc, SandboxError):
            raise
        raise SandboxError(f"could not start sandbox container {name} from image {image!r}: {exc}") from exc
    finally:
        if listener is not None:
            listener.close()
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def _accept_agent(listener: socket.socket, container_id: str, name: str, image: str) -> _AgentChannel:
    deadline = time.monotonic() + START_TIMEOUT_S
    listener.settimeout(0.25)
    while True:
        try:
            sock, _ = listener.accept()
            break
        except socket.timeout:
            if time.monotonic() > deadline:
                raise SandboxError(f"the agent in sandbox {name} did not connect within {START_TIMEOUT_S:g}s") from None
            status = _client().api.inspect_container(container_id)["State"]["Status"]
            if status in ("exited", "dead"):
                raise _start_failure(container_id, name, image, status) from None
    sock.settimeout(START_TIMEOUT_S)
    channel = _AgentChannel(sock, name)
    sock.settimeout(None)
    return channel


def _wait_running(container_id: str, name: str, image: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        status = _client().api.inspect_container(container_id)["State"]["Status"]
        if status == "running":
            return
        if status in ("exited", "dead") or time.monotonic() > deadline:
            raise _start_failure(container_id, name, image, status)
        time.sleep(0.05)


def _start_failure(container_id: str, name: str, image: str, status: str) -> SandboxError:
    logs = _client().api.logs(container_id, tail=20).decode("utf-8", "replace").strip()
    return SandboxError(f"sandbox container {name} did not start (status {status!r}) from image {image!r}: "
                        f"{logs or 'no output'}")


def _how_it_ended(container_id: str) -> str:
    """How a container whose agent went away ended, for the error that says so: its exit code, whether it
    was killed for lack of memory, and the agent's last words on stderr. Empty when the engine cannot say."""
    import docker

    api = _client().api
    try:
        state = api.inspect_container(container_id)["State"]
        deadline = time.monotonic() + 5  # the engine may record the exit a moment after the connection closed
        while state["Running"] and time.monotonic() < deadline:
            time.sleep(0.1)
            state = api.inspect_container(container_id)["State"]
        last_words = api.logs(container_id, stdout=False, stderr=True, tail=5).decode(errors="replace").strip()
    except docker.errors.DockerException:
        return ""
    if state["Running"]:
        ended = "; the container still runs"
    else:
        ended = f"; the container exited with code {state['ExitCode']}"
        ended += ", killed for lack of memory" if state.get("OOMKilled") else ""
    return ended + (f"; the agent's last words: {last_words[-600:]}" if last_words else "")


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
    """Remove every sandbox this process started and has not closed yet, and those another thread is still
    starting (exit / signal path: that thread dies with the process)."""
    global _exiting
    with _live_lock:
        _exiting = True
        live, launched = list(_LIVE), _launched
    for sb in live:
        with contextlib.suppress(Exception):  # best effort at exit; reap_orphans catches leftovers
            sb.close()
    if launched:  # and those another thread is still starting, found by their owner labels
        mine = _owner_labels().items()
        with contextlib.suppress(Exception):
            for c in _labelled_containers():
                if mine <= c["labels"].items():
                    _force_remove(c["id"])


def _owner_labels() -> dict[str, str]:
    """The labels that name this process as a container's owner: pid, kernel start time and host."""
    me = os.getpid()
    return {"loopwright.owner.pid": str(me), "loopwright.owner.started": _proc_start_time(me) or "",
            "loopwright.owner.host": socket.gethostname()}


atexit.register(close_all)


def _labelled_containers() -> list[dict]:
    """One listing call (no inspect per container), so a container removed meanwhile is no error."""
    found = _client().api.containers(all=True, filters={"label": f"{LABEL}=1"})
    return [{"id": c["Id"], "name": c["Names"][0].lstrip("/"), "labels": c.get("Labels") or {}, "status": c["State"]}
            for c in found]


def list_sandboxes() -> list[dict]:
    """All loopwright containers on this engine, with owner liveness (None = owned from another host),
    the owner's Loopwright home (None = a container from before homes were labelled) and whether a warm
    pool started them."""
    out = []
    for c in _labelled_containers():
        labels = c["labels"]
        out.append({
            "name": c["name"],
            "id": c["id"],
            "run_id": _run_of(c["name"], labels),
            "pooled": labels.get("loopwright.pool") == "1",
            "owner_pid": int(labels["loopwright.owner.pid"]) if labels.get("loopwright.owner.pid", "").isdigit() else None,
            "owner_host": labels.get("loopwright.owner.host"),
            "home": labels.get(HOME_LABEL),
            "alive": _owner_alive(labels),
            "created": labels.get("loopwright.created"),
            "status": c["status"],
        })
    return out


def reap_orphans(home: str | os.PathLike | None = None) -> list[str]:
    """Remove the loopwright containers of one Loopwright home (default: this process's, see
    ``loopwright_home``) whose owning process (on this host) is gone; return their names. Containers of
    other homes on the same engine, and unlabelled ones, are left alone: their owners may be at work.

    Also removes the agent folders a dead process left in the temporary folder (killed mid-start). They
    are keyed by owner pid and start time, so a live process's folder is never removed, whatever its home.
    """
    home = loopwright_home() if home is None else str(Path(home).expanduser().resolve())
    removed = []
    for c in _labelled_containers():
        if c["labels"].get(HOME_LABEL) == home and _owner_alive(c["labels"]) is False:
            _force_remove(c["id"])
            removed.append(c["name"])
    for folder in Path(tempfile.gettempdir()).glob(f"{_AGENT_FOLDER_PREFIX}*"):
        try:
            mine = folder.stat().st_uid == os.getuid()
        except FileNotFoundError:  # removed meanwhile (its start finished, or another home's reaper)
            continue
        if mine and owner_gone(folder.name.removeprefix(_AGENT_FOLDER_PREFIX).rpartition("-")[0]):
            shutil.rmtree(folder, ignore_errors=True)
    return removed
