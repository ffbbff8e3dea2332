"""The in-sandbox agent: runs a sandbox's tool calls, about a millisecond each instead of a `docker exec`.

The host mounts this file read-only into the container and starts it as the container's command,
so it is process 1 there: processes inside the container cannot kill it (the kernel ignores
signals from inside a PID namespace that its init has no handler for) and it is not dumpable,
so they cannot ptrace it or open its file descriptors either. Standard library only, so any
image with python3 works.

The agent connects to a Unix socket the host listens on (in a read-only mount: the sandbox can
plant nothing there) and reads newline-delimited JSON requests from that one connection:

    {"id": 1, "cmd": "pytest -q", "timeout": 120, "stdin": "<base64>" or null}

and answers each, in any order, with

    {"id": 1, "exit": 0, "stdout": "...", "stderr": "...", "timed_out": false}

Every call runs under its own supervisor, a forked child of the agent that is a child subreaper:
it starts ``sh -c`` in a new session as the sandbox user, keeps at most ``output_limit`` bytes of
each stream (head and tail, with a marker in between), and when the command ends or times out
kills every process the call started, including double-forked and setsid'd ones. Calls run
concurrently. The agent exits when the host's connection closes (the host process died), after
``idle`` seconds without calls, and after ``lifetime`` seconds in all; it says why first.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

TIMEOUT_EXIT_CODE = 124
KILLED_EXIT_CODE = 137
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
        pass  # not Linux / no libc symbol: the sandbox still works, with less protection


def _processes() -> dict[int, list[tuple[int, str]]]:
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


def _descendants(roots: list[int]) -> list[tuple[int, str]]:
    children = _processes()
    found, stack = [], list(roots)
    while stack:
        for pid, state in children.get(stack.pop(), []):
            found.append((pid, state))
            stack.append(pid)
    return found


def _kill_tree(roots: list[int], include_roots: bool) -> None:
    """SIGKILL the roots' descendants (and the roots) until none is left, reaping as we go."""
    for _ in range(200):
        live = [pid for pid, state in _descendants(roots) if state != "Z"]
        if include_roots:
            live += roots
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        _reap_all()
        if not live:
            return
        include_roots = False  # killed once; they are zombies or gone now


def _reap_all() -> list[int]:
    reaped = []
    while True:
        try:
            pid = os.waitpid(-1, os.WNOHANG)[0]
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append(pid)


def _exit_code(status: int) -> int:
    """Shell convention: 128 + the signal for a command killed by one."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


# --- one call: runs in a forked child of the agent --------------------------------------------


def supervise(request: dict, result_fd: int, workdir: str, output_limit: int) -> None:
    """Run one call to completion and write its JSON result to ``result_fd``; never returns."""
    code = 1
    try:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")  # when memory runs out, the kernel kills tool calls, not the agent
        except OSError:
            pass
        try:
            result = _run_call(request, workdir, output_limit)
        except Exception as error:  # e.g. no fork possible at the pids limit
            result = {"id": request["id"], "exit": 126, "stdout": "", "timed_out": False,
                      "stderr": "loopwright: could not run the command: %s\n" % error}
        data = (json.dumps(result) + "\n").encode()
        while data:
            data = data[os.write(result_fd, data):]
        code = 0
    finally:
        os._exit(code)


def _run_call(request: dict, workdir: str, output_limit: int) -> dict:
    started = time.monotonic()
    stdin = base64.b64decode(request["stdin"]) if request.get("stdin") is not None else None
    deadline = started + float(request["timeout"])
    proc = subprocess.Popen(
        ["sh", "-c", request["cmd"]], cwd=workdir, start_new_session=True,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    outputs = {proc.stdout: CappedOutput(output_limit), proc.stderr: CappedOutput(output_limit)}
    sel = selectors.DefaultSelector()
    for stream in outputs:
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(proc.pid)
            sel.register(pidfd, selectors.EVENT_READ)
        except OSError:
            pidfd = None
    pending_stdin = memoryview(stdin) if stdin is not None else None
    if pending_stdin is not None:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)

    exit_code, timed_out = None, False
    while sel.get_map():
        if exit_code is None:
            status = os.waitpid(proc.pid, os.WNOHANG)
            if status[0]:
                exit_code = _exit_code(status[1])
                _kill_tree([os.getpid()], include_roots=False)  # what the command left running
                if pidfd is not None:
                    sel.unregister(pidfd)
                if pending_stdin is not None:
                    sel.unregister(proc.stdin)
                    proc.stdin.close()
                    pending_stdin = None
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out, exit_code = True, TIMEOUT_EXIT_CODE
                _kill_tree([os.getpid()], include_roots=False)
                for fd in [pidfd, proc.stdin if pending_stdin is not None else None]:
                    if fd is not None:
                        sel.unregister(fd)
                continue
            wait = remaining if pidfd is not None else min(remaining, 0.05)
        else:
            wait = None  # every writer is dead: the pipes reach EOF
        for key, _ in sel.select(wait):
            stream = key.fileobj
            if key.fd == pidfd:
                continue  # the command exited; handled at the top of the loop
            if stream is proc.stdin:
                try:
                    sent = os.write(proc.stdin.fileno(), pending_stdin[:_CHUNK])
                    pending_stdin = pending_stdin[sent:]
                except BrokenPipeError:
                    pending_stdin = pending_stdin[:0]
                if not pending_stdin:
                    sel.unregister(proc.stdin)
                    proc.stdin.close()
                    pending_stdin = None
                continue
            chunk = os.read(stream.fileno(), _CHUNK)
            if chunk:
                outputs[stream].add(chunk)
            else:
                sel.unregister(stream)
    stderr = outputs[proc.stderr].text()
    if timed_out:
        stderr += "\nloopwright: command timed out after %gs; it and its children were killed\n" % float(request["timeout"])
    return {
        "id": request["id"], "exit": exit_code, "stdout": outputs[proc.stdout].text(), "stderr": stderr,
        "timed_out": timed_out, "ms": (time.monotonic() - started) * 1000,
    }


# --- the agent: process 1 of the container ------------------------------------------------------


class Agent:
    def __init__(self, sock: socket.socket, workdir: str, output_limit: int, idle: float, lifetime: float):
        self.sock = sock
        self.workdir = workdir
        self.output_limit = output_limit
        self.idle = idle
        self.lifetime = lifetime
        self.started = self.last_active = time.monotonic()
        self.sel = selectors.DefaultSelector()
        self.inbox = b""
        self.calls: dict[int, dict] = {}  # result pipe fd -> {"id", "pid", "data", "deadline"}
        self.supervisors: set[int] = set()
        self.retiring = False
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        self.wake_r = wake_r
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop up
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ)
        self.sel.register(wake_r, selectors.EVENT_READ)

    def send(self, message: dict) -> None:
        self.sock.setblocking(True)
        try:
            self.sock.sendall((json.dumps(message) + "\n").encode())
        finally:
            self.sock.setblocking(False)

    def serve(self) -> str:
        """Serve until the host leaves or a limit is reached; return why."""
        while True:
            now = time.monotonic()
            if now - self.started >= self.lifetime and not self.retiring:
                self.retiring = True  # read no more calls; those running finish within their timeouts
                self.sel.unregister(self.sock)
            if self.retiring and not self.calls:
                return "lifetime"
            if not self.calls and now - self.last_active >= self.idle:
                return "idle"
            wake_at = [] if self.retiring else [self.started + self.lifetime]
            wake_at += [c["deadline"] for c in self.calls.values()] if self.calls else [self.last_active + self.idle]
            for key, _ in self.sel.select(max(min(wake_at) - now, 0)):
                if key.fileobj is self.sock:
                    if not self.read_requests():
                        return "host closed the connection"
                elif key.fileobj == self.wake_r:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                else:
                    self.read_result(key.fileobj)
            self.enforce_backstop()
            _reap_all()

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
            self.start_call(json.loads(line))
        return True

    def start_call(self, request: dict) -> None:
        self.last_active = time.monotonic()
        try:
            read_fd, write_fd = os.pipe()
            pid = os.fork()
        except OSError as error:  # e.g. the pids limit is reached
            self.send({"id": request["id"], "exit": 126, "stdout": "", "timed_out": False,
                       "stderr": "loopwright: could not start the command: %s\n" % error})
            return
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.close(read_fd)
            self.sock.close()
            supervise(request, write_fd, self.workdir, self.output_limit)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.supervisors.add(pid)
        deadline = time.monotonic() + float(request["timeout"]) + _BACKSTOP_S
        self.calls[read_fd] = {"id": request["id"], "pid": pid, "data": bytearray(), "deadline": deadline}
        self.sel.register(read_fd, selectors.EVENT_READ)

    def read_result(self, fd: int) -> None:
        call = self.calls[fd]
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return
        if chunk:
            call["data"] += chunk
            return
        self.sel.unregister(fd)
        os.close(fd)
        del self.calls[fd]
        self.supervisors.discard(call["pid"])
        self.last_active = time.monotonic()
        if call["data"].endswith(b"\n"):
            self.sock.setblocking(True)
            try:
                self.sock.sendall(bytes(call["data"]))
            finally:
                self.sock.setblocking(False)
        else:  # the supervisor died before answering: killed by the backstop or by the command
            try:
                os.waitpid(call["pid"], 0)  # once it is reaped, its orphans have been handed to us
            except ChildProcessError:
                pass
            self.kill_strays()
            self.send({"id": call["id"], "exit": KILLED_EXIT_CODE, "stdout": "", "timed_out": call.get("overran", False),
                       "stderr": "loopwright: the call's supervisor was killed; the call and its processes were ended\n"})

    def enforce_backstop(self) -> None:
        now = time.monotonic()
        for call in self.calls.values():
            if now >= call["deadline"] and not call.get("overran"):
                call["overran"] = True
                try:
                    os.kill(call["pid"], signal.SIGKILL)
                except OSError:
                    pass

    def kill_strays(self) -> None:
        """Processes whose supervisor died are adopted by us, process 1: they must not live on."""
        strays = [pid for pid, _ in _processes().get(os.getpid(), []) if pid not in self.supervisors]
        if strays:
            _kill_tree(strays, include_roots=True)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--socket", required=True, help="the host's Unix socket to connect to")
    parser.add_argument("--workdir", default="/workspace")
    parser.add_argument("--output-limit", type=int, default=2 << 20, help="bytes kept per stream and call")
    parser.add_argument("--idle", type=float, default=3600.0, help="exit after this many seconds without calls")
    parser.add_argument("--lifetime", type=float, default=86400.0, help="exit after this many seconds in all")
    args = parser.parse_args(argv)

    _prctl(_PR_SET_DUMPABLE, 0)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # when not process 1 (e.g. run by hand), orphans still come here
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as process 1: ignored unless sent from outside
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    agent = Agent(sock, args.workdir, args.output_limit, args.idle, args.lifetime)
    agent.send({"hello": {"pid": os.getpid(), "python": sys.version.split()[0]}})
    reason = agent.serve()
    try:
        agent.send({"bye": reason})
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
