"""The in-sandbox agent: runs a sandbox's tool calls, about a millisecond each instead of a `docker exec`.

The host mounts this file read-only into the container and starts it as the container's command,
so it is process 1 there: processes inside the container cannot kill it (the kernel drops
signals from inside a PID namespace that its init has no handler for), and it is not dumpable,
so they cannot ptrace it or open its file descriptors either. Standard library only, so any
image with python3 works.

The agent connects to a Unix socket the host listens on (in a read-only mount: the sandbox can
plant nothing there) and reads newline-delimited JSON requests from that one connection:

    {"id": 1, "cmd": "pytest -q", "timeout": 120, "stdin": "<base64>" or null}

and answers each, in any order, with

    {"id": 1, "exit": 0, "stdout": "...", "stderr": "...", "timed_out": false}

Every call runs under a supervisor, a forked child of the agent that is a child subreaper and
runs one call at a time: it starts ``sh -c`` in a new session as the sandbox user, keeps at most
``output_limit`` bytes of each stream (head and tail, with a marker in between), and when the
command ends or times out kills every process the call started, including double-forked and
setsid'd ones. Calls run concurrently, each under its own supervisor. The agent exits when the host's connection closes (the host process died), after
``idle`` seconds without calls, and after ``lifetime`` seconds in all (letting running calls
finish); it says why first.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import selectors
import signal
import socket
import sys
import time

TIMEOUT_EXIT_CODE = 124
KILLED_EXIT_CODE = 137
KILL_WAIT_S = 10.0  # how long ending a call's processes may wait for them to die
_BACKSTOP_S = 5.0  # a supervisor that overruns its call's timeout by this much is killed by the agent
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_CHUNK = 65536


class CappedOutput:
    """Keeps the first and last ``limit // 2`` bytes of a stream and counts what lies between."""

    def __init__(self, limit: int):
        self.half = max(limit // 2, 1)
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data:
            return
        self.tail += data
        excess = len(self.tail) - self.half
        if excess > 0:
            del self.tail[:excess]
            self.dropped += excess

    def text(self) -> str:
        if not self.dropped:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", "replace")
        marker = "\n[loopwright: %d bytes of output omitted here]\n" % self.dropped
        return bytes(self.head).decode("utf-8", "replace") + marker + bytes(self.tail).decode("utf-8", "replace")


def _prctl(option: int, value: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # no prctl in this libc: the sandbox still works, with less protection


def _children() -> dict[int, list[tuple[int, str]]]:
    """parent pid -> [(pid, state)] for every process visible in /proc."""
    children: dict[int, list[tuple[int, str]]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append((int(name), fields[0].decode()))
    return children


def _kill_descendants(spare: frozenset[int] = frozenset()) -> None:
    """SIGKILL every descendant of this process (a subreaper: orphans come to it) but the ``spare`` ones
    and theirs, reaping as we go, until a look at /proc finds none, not even a zombie: a look that finds
    only zombies may have missed a child forked while it read /proc by a parent that then exited. Killed
    processes take a moment to die on a loaded machine; this waits for them, up to KILL_WAIT_S."""
    deadline = time.monotonic() + KILL_WAIT_S
    while True:
        children, found, stack = _children(), [], [os.getpid()]
        while stack:
            for pid, state in children.get(stack.pop(), []):
                if pid not in spare:
                    stack.append(pid)
                    found.append((pid, state))
        live = [pid for pid, state in found if state != "Z"]
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        _reap_all()
        if not found or time.monotonic() > deadline:
            return
        if live:
            time.sleep(0.002)  # let them die


def _reap_all(watch: int | None = None) -> int | None:
    """Reap every child that has exited; the wait status of ``watch`` if it was one of them."""
    watched = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return watched
        if pid == 0:
            return watched
        if pid == watch:
            watched = status


def _exit_code(status: int) -> int:
    """Shell convention: 128 + the signal for a command killed by one."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _drain(fd: int) -> None:
    """Empty a non-blocking wake-up pipe."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --- a supervisor: a forked child of the agent that runs one call at a time -----------------------


def supervise(request_fd: int, result_fd: int, workdir: str, output_limit: int) -> None:
    """Run requests read from ``request_fd`` one by one, writing each JSON result; never returns.

    A supervisor is reused for call after call (a fresh fork pays a millisecond or two of
    copy-on-write faults on its first call). That is safe because it is a child subreaper and
    kills every process a call started before it takes the next one.
    """
    try:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")  # when memory runs out, the kernel kills tool calls, not the agent
        except OSError:
            pass
        os.chdir(workdir)
        # Every exit of a child wakes the call's loop: the command's own, and those of the orphans its
        # processes leave, which come to us (a subreaper) and are reaped at once, so that their zombies
        # do not pile up against the pids limit during a long call.
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        requests = os.fdopen(request_fd, "rb")
        for line in requests:
            request = json.loads(line)
            try:
                result = _run_call(request, output_limit, wake_r)
            except Exception as error:  # e.g. no process can be started at the pids limit
                result = {"id": request["id"], "exit": 126, "stdout": "", "timed_out": False,
                          "stderr": "loopwright: could not run the command: %s\n" % error}
            _write_all(result_fd, (json.dumps(result) + "\n").encode())
    finally:
        os._exit(0)


def _run_call(request: dict, output_limit: int, wake_r: int) -> dict:
    stdin = base64.b64decode(request["stdin"]) if request.get("stdin") is not None else None
    deadline = time.monotonic() + float(request["timeout"])
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if stdin is not None else (None, None)
    outputs = {out_r: CappedOutput(output_limit), err_r: CappedOutput(output_limit)}
    sel = selectors.DefaultSelector()
    opened = [out_r, out_w, err_r, err_w] + ([in_r] if stdin is not None else [])  # in_w: closed by the feeding
    try:
        stdin_action = ((os.POSIX_SPAWN_DUP2, in_r, 0) if stdin is not None
                        else (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
        # Our own descriptors are close-on-exec (PEP 446): the command inherits only these three. Python
        # ignores SIGPIPE and SIGXFSZ; the command gets the defaults back, as from any shell.
        try:
            pid = os.posix_spawnp("sh", ["sh", "-c", request["cmd"]], os.environ, setsid=True,
                                  file_actions=[(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2),
                                                stdin_action],
                                  setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        except OSError:
            if in_w is not None:
                os.close(in_w)
            raise
        for fd in (out_w, err_w, in_r):
            if fd is not None:
                os.close(fd)
                opened.remove(fd)
        exit_code, timed_out = _supervise_command(pid, sel, wake_r, outputs, in_w, stdin, deadline)
    finally:
        sel.close()
        for fd in opened:
            os.close(fd)
    stderr = outputs[err_r].text()
    if timed_out:
        stderr += "\nloopwright: command timed out after %gs; it and its children were killed\n" % float(request["timeout"])
    return {"id": request["id"], "exit": exit_code, "stdout": outputs[out_r].text(), "stderr": stderr,
            "timed_out": timed_out}


def _supervise_command(pid: int, sel, wake_r: int, outputs: dict, in_w, stdin, deadline: float) -> tuple[int, bool]:
    """Feed stdin and collect output until the command ends or times out; then end what it left running.
    ``wake_r`` is readable whenever a child of ours has exited."""
    for fd in outputs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    pending = None
    if stdin is not None:
        pending = memoryview(stdin)
        os.set_blocking(in_w, False)
        sel.register(in_w, selectors.EVENT_WRITE)

    def stop_feeding() -> None:  # closing stdin is how the command learns it has all of it
        nonlocal pending
        sel.unregister(in_w)
        os.close(in_w)
        pending = None

    exit_code, timed_out = None, False
    try:
        while sel.get_map():
            if exit_code is None:
                status = _reap_all(watch=pid)
                remaining = deadline - time.monotonic()
                if status is not None or remaining <= 0:
                    if status is not None:
                        exit_code = _exit_code(status)
                    else:
                        timed_out, exit_code = True, TIMEOUT_EXIT_CODE
                    _kill_descendants()  # what the command left running
                    sel.unregister(wake_r)
                    if pending is not None:
                        stop_feeding()
                    continue
                wait = remaining
            else:
                wait = None  # every writer is dead: the pipes reach EOF
            for key, _ in sel.select(wait):
                fd = key.fd
                if fd == wake_r:
                    _drain(wake_r)  # a child exited; reaped at the top of the loop
                    continue
                if pending is not None and fd == in_w:
                    try:
                        pending = pending[os.write(in_w, pending[:_CHUNK]):]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        stop_feeding()
                    continue
                chunk = os.read(fd, _CHUNK)
                if chunk:
                    outputs[fd].add(chunk)
                else:
                    sel.unregister(fd)
    finally:
        if pending is not None:
            stop_feeding()
    return exit_code, timed_out


# --- the agent: process 1 of the container ------------------------------------------------------


class _Supervisor:
    def __init__(self, pid: int, request_fd: int, result_fd: int):
        self.pid = pid
        self.request_fd = request_fd
        self.result_fd = result_fd
        self.call_id = None  # the call it is running, if any
        self.deadline = 0.0
        self.overran = False
        self.data = bytearray()


class Agent:
    _MAX_IDLE_SUPERVISORS = 2

    def __init__(self, sock: socket.socket, workdir: str, output_limit: int, idle: float, lifetime: float):
        self.sock = sock
        self.workdir = workdir
        self.output_limit = output_limit
        self.idle = idle
        self.lifetime = lifetime
        self.started = self.last_active = time.monotonic()
        self.retiring = False
        self.sel = selectors.DefaultSelector()
        self.inbox = b""
        self.supervisors: dict[int, _Supervisor] = {}  # by result fd
        self.ready: list[_Supervisor] = []  # those waiting for a call
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        self.wake_r = wake_r
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop up
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ)
        self.sel.register(wake_r, selectors.EVENT_READ)
        self.fork_supervisor()

    @property
    def busy(self) -> list[_Supervisor]:
        return [s for s in self.supervisors.values() if s.call_id is not None]

    def send(self, data: bytes) -> None:
        self.sock.setblocking(True)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)

    def answer(self, message: dict) -> None:
        self.send((json.dumps(message) + "\n").encode())

    def serve(self) -> str:
        """Serve until the host leaves or a limit is reached; return why."""
        while True:
            now = time.monotonic()
            busy = self.busy
            if now - self.started >= self.lifetime and not self.retiring:
                self.retiring = True  # read no more calls; those running finish within their timeouts
                self.sel.unregister(self.sock)
            if self.retiring and not busy:
                return "lifetime"
            if not busy and now - self.last_active >= self.idle:
                return "idle"
            wake_at = [] if self.retiring else [self.started + self.lifetime]
            wake_at += [s.deadline for s in busy] if busy else [self.last_active + self.idle]
            for key, _ in self.sel.select(max(min(wake_at) - now, 0)):
                if key.fileobj is self.sock:
                    if not self.read_requests():
                        return "host closed the connection"
                elif key.fd == self.wake_r:
                    _drain(self.wake_r)
                else:
                    self.read_result(self.supervisors[key.fd])
            self.enforce_backstop()
            _reap_all()
            if not self.ready:
                self.fork_supervisor()  # now rather than when the next call is waiting for it

    def fork_supervisor(self) -> None:
        try:
            request_r, request_w = os.pipe()
            result_r, result_w = os.pipe()
            pid = os.fork()
        except OSError:
            return  # e.g. at the pids limit: tried again later
        if pid == 0:
            keep = {request_r, result_w}
            for fd in os.listdir("/proc/self/fd"):
                if int(fd) > 2 and int(fd) not in keep:
                    try:
                        os.close(int(fd))
                    except OSError:
                        pass
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            supervise(request_r, result_w, self.workdir, self.output_limit)
        os.close(request_r)
        os.close(result_w)
        os.set_blocking(result_r, False)
        supervisor = _Supervisor(pid, request_w, result_r)
        self.supervisors[result_r] = supervisor
        self.ready.append(supervisor)
        self.sel.register(result_r, selectors.EVENT_READ)

    def read_requests(self) -> bool:
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.inbox += data
        while b"\n" in self.inbox:
            line, self.inbox = self.inbox.split(b"\n", 1)
            self.start_call(line + b"\n")
        return True

    def start_call(self, line: bytes) -> None:
        self.last_active = time.monotonic()
        request = json.loads(line)
        if not self.ready:
            self.fork_supervisor()
        if not self.ready:
            self.answer({"id": request["id"], "exit": 126, "stdout": "", "timed_out": False,
                         "stderr": "loopwright: could not start the command: no process can be created "
                                   "(the sandbox's pids limit is reached)\n"})
            return
        supervisor = self.ready.pop()
        supervisor.call_id = request["id"]
        supervisor.deadline = time.monotonic() + float(request["timeout"]) + _BACKSTOP_S
        try:
            _write_all(supervisor.request_fd, line)
        except BrokenPipeError:
            pass  # it died (killed); reported when its result pipe closes

    def read_result(self, supervisor: _Supervisor) -> None:
        try:
            chunk = os.read(supervisor.result_fd, 1 << 20)
        except BlockingIOError:
            return
        if not chunk:
            self.lost(supervisor)
            return
        supervisor.data += chunk
        if not supervisor.data.endswith(b"\n"):
            return
        self.send(bytes(supervisor.data))
        supervisor.data.clear()
        supervisor.call_id = None
        self.last_active = time.monotonic()
        if len(self.ready) < self._MAX_IDLE_SUPERVISORS:
            self.ready.append(supervisor)
        else:
            self.retire(supervisor)

    def retire(self, supervisor: _Supervisor) -> None:
        """Let an idle supervisor go: closing its requests makes it exit."""
        self.sel.unregister(supervisor.result_fd)
        os.close(supervisor.result_fd)
        os.close(supervisor.request_fd)
        del self.supervisors[supervisor.result_fd]

    def lost(self, supervisor: _Supervisor) -> None:
        """A supervisor died (killed by the backstop, or by its command): end what it left behind."""
        self.retire(supervisor)
        if supervisor in self.ready:
            self.ready.remove(supervisor)
        try:
            os.waitpid(supervisor.pid, 0)  # once it is reaped, its orphans have been handed to us
        except ChildProcessError:
            pass
        self.kill_strays()
        if supervisor.call_id is not None:
            self.answer({"id": supervisor.call_id, "exit": KILLED_EXIT_CODE, "stdout": "", "timed_out": supervisor.overran,
                         "stderr": "loopwright: the call's supervisor was killed; the call and its processes were ended\n"})

    def enforce_backstop(self) -> None:
        now = time.monotonic()
        for supervisor in self.busy:
            if now >= supervisor.deadline and not supervisor.overran:
                supervisor.overran = True
                try:
                    os.kill(supervisor.pid, signal.SIGKILL)
                except OSError:
                    pass

    def kill_strays(self) -> None:
        """Processes whose supervisor died are adopted by us, process 1: they must not live on."""
        _kill_descendants(spare=frozenset(s.pid for s in self.supervisors.values()))


USAGE = ("usage: agent.py --socket PATH [--workdir DIR] [--output-limit BYTES] [--idle SECONDS] "
         "[--lifetime SECONDS]")


def main(argv: list[str]) -> int:
    # No argparse: its import costs tens of milliseconds, and this start is on every run's critical path.
    options = {"--workdir": "/workspace", "--output-limit": str(2 << 20), "--idle": "3600", "--lifetime": "86400"}
    pairs = dict(zip(argv[::2], argv[1::2]))
    if len(argv) % 2 or "--socket" not in pairs or set(pairs) - set(options) - {"--socket"}:
        sys.exit(USAGE)
    options.update(pairs)

    _prctl(_PR_SET_DUMPABLE, 0)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # when not process 1 (e.g. run by hand), orphans still come here
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as process 1: ignored unless sent from outside
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(options["--socket"])
    agent = Agent(sock, options["--workdir"], int(options["--output-limit"]), float(options["--idle"]),
                  float(options["--lifetime"]))
    agent.answer({"hello": {"pid": os.getpid(), "python": sys.version.split()[0]}})
    reason = agent.serve()
    try:
        agent.answer({"bye": reason})
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
