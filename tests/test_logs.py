"""The terminal, live: `loopwright logs RUN --follow` and the foreground `loopwright run` print each tool
call as it starts and ends, the verdict, and a wait for a person with the command that answers it."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time

from conftest import FIX, LOOPWRIGHT, loopwright, write_spec
from model_server import text, tool_use

from loopwright.runtime.store import Store

SLOW = "sleep 4 && echo finished-sleeping"


class Lines:
    """A process's stdout, line by line, as it comes."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.lines, self._queue = process, [], queue.Queue()
        threading.Thread(target=lambda: [self._queue.put(line.rstrip("\n")) for line in process.stdout], daemon=True).start()

    def until(self, predicate, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            self.lines.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"no such line in {timeout} s; got:\n" + "\n".join(self.lines))


def test_logs_follow_prints_each_tool_call_and_the_verdict_while_the_run_goes_on(home, project, model):
    model([tool_use("run_command", {"command": SLOW}), FIX, text("Fixed the off-by-one.")])
    run = subprocess.Popen([*LOOPWRIGHT, "run", str(write_spec(project, stop={"max_iterations": 2}))],
                           stdout=subprocess.PIPE, text=True)
    run_id = run.stdout.readline().split()[1]
    logs = subprocess.Popen([*LOOPWRIGHT, "logs", run_id, "--follow"], stdout=subprocess.PIPE, text=True)
    followed = Lines(logs)
    store = Store(f"sqlite:///{home / 'loopwright.sqlite'}")
    try:
        started = followed.until(lambda line: line.startswith("  → run_command"))
        assert SLOW in started
        # seen while it happens: the command is still running and the run has no verdict yet
        assert "unfinished" in store.event(run_id, "1.tool.1")["data"]
        assert store.get_run(run_id).status == "running"
        ended = followed.until(lambda line: line.startswith("    "))
        assert ended.startswith("    ok · ") and "exit code 0" in ended
        followed.until(lambda line: line.startswith("  → edit_file"))
        followed.until(lambda line: line.startswith("iteration 1: pass"))
        last = followed.until(lambda line: line.startswith("succeeded: "))
        assert "spent $" in last
        assert logs.wait(timeout=30) == 0  # --follow ends with the run
    finally:
        run.wait(timeout=120)
        logs.kill()
    assert followed.lines.index(started) < followed.lines.index(ended)

    later = loopwright("logs", run_id)  # after the fact: the same lines, at once
    assert later.returncode == 0
    assert later.stdout.splitlines() == followed.lines


def test_the_foreground_run_shows_a_waiting_approval_with_the_command_that_answers_it(home, project, model):
    model([tool_use("run_command", {"command": "echo deploy now"}), FIX, text("fixed")])
    spec = write_spec(project, approval=[{"tool": "run_command"}])
    run = subprocess.Popen([*LOOPWRIGHT, "run", str(spec)], stdout=subprocess.PIPE, text=True)
    shown = Lines(run)
    try:
        waiting = shown.until(lambda line: line.startswith("waiting for a person"))
        approval_id = waiting.split("`loopwright approve ")[1].split("`")[0]
        assert 'run_command {"command": "echo deploy now"}' in waiting
        run_id = shown.lines[0].split()[1]
        assert waiting in loopwright("status", run_id).stdout.splitlines()  # `status` says which call waits
        answered = loopwright("approve", approval_id, "--note", "go ahead")
        assert answered.returncode == 0, answered.stderr
        shown.until(lambda line: line == f"  approval {approval_id}: allowed (go ahead)")
        assert shown.until(lambda line: line.startswith("    ")).startswith("    ok · ")
        shown.until(lambda line: line.startswith("succeeded: "))
    finally:
        assert run.wait(timeout=120) == 0


def test_logs_follow_without_a_run_prints_every_run_that_starts(home, project, model):
    home.mkdir(parents=True, exist_ok=True)
    model([tool_use("run_command", {"command": "echo hello"}), FIX, text("Fixed.")])
    logs = subprocess.Popen([*LOOPWRIGHT, "logs", "--follow"], stdout=subprocess.PIPE, text=True)
    followed = Lines(logs)
    try:
        time.sleep(2)  # following before the run exists
        run = loopwright("run", str(write_spec(project, stop={"max_iterations": 2})))
        run_id = run.stdout.split()[1]
        followed.until(lambda line: line.startswith(f"{run_id} started: loop fix-failing-test"))
        followed.until(lambda line: line.startswith(f"{run_id}   → run_command"))
        followed.until(lambda line: line.startswith(f"{run_id} iteration 1: pass"))
        followed.until(lambda line: line.startswith(f"{run_id} succeeded: "))
    finally:
        logs.send_signal(signal.SIGINT)
        assert logs.wait(timeout=30) == 130
