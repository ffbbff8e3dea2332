"""People told: each `[[notify]]` of a loop gets one message when a run ends (a generic JSON webhook and
a Slack-compatible one), also when the run's process was killed and the run recovered."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import FIX, LOOPWRIGHT, loopwright, trace, wait_for, write_spec
from model_server import hang, text

NOTIFY = [{"kind": "webhook", "url_env": "RUNS_WEBHOOK"}, {"kind": "slack", "url_env": "SLACK_WEBHOOK"}]


class Receiver:
    """A local webhook receiver that records each POST; `delay` holds its first answer that long."""

    def __init__(self, delay: float = 0.0):
        self.received: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                receiver.received.append({"path": self.path, "delivery": self.headers.get("x-loopwright-delivery"),
                                          "body": body})
                if len(receiver.received) == 1 and delay:
                    time.sleep(delay)
                self.send_response(204)
                self.end_headers()

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def at(self, path: str) -> list[dict]:
        return [r for r in self.received if r["path"] == path]

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def receiver(monkeypatch):
    made = []

    def start(delay: float = 0.0) -> Receiver:
        made.append(Receiver(delay))
        monkeypatch.setenv("RUNS_WEBHOOK", made[-1].url + "/runs")
        monkeypatch.setenv("SLACK_WEBHOOK", made[-1].url + "/slack")
        return made[-1]

    yield start
    for one in made:
        one.stop()


def fixes(request: dict) -> dict:
    answered = sum(1 for m in request["messages"] if m["role"] == "assistant")
    return [FIX, text("Fixed.")][min(answered, 1)]


def assert_told_once(got: Receiver, run_id: str, status: str) -> None:
    [runs] = {r["delivery"]: r for r in got.at("/runs")}.values()  # one message (by its delivery id)
    assert runs["delivery"] == f"{run_id}/0"
    assert runs["body"]["run_id"] == run_id and runs["body"]["status"] == status and runs["body"]["loop"] == "fix-failing-test"
    assert runs["body"]["spent_usd"] > 0 and runs["body"]["branch"].endswith(run_id)
    [slack] = {r["delivery"]: r for r in got.at("/slack")}.values()
    assert run_id in slack["body"]["text"] and f"*{status}*" in slack["body"]["text"]
    assert [e["key"] for e in trace(run_id) if e["kind"] == "notified"] == ["notify.0", "notify.1"]
    assert json.loads(loopwright("status", run_id, "--json").stdout)["status"] == status


def test_a_finished_run_sends_one_message_to_each_notify(home, project, model, receiver):
    model(fixes)
    got = receiver()
    result = loopwright("run", str(write_spec(project, notify=NOTIFY)))
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = result.stdout.split()[1]
    assert_told_once(got, run_id, "succeeded")
    assert len(got.received) == 2
    assert got.url not in result.stdout + result.stderr  # the URLs are secrets


def test_a_run_killed_midway_and_recovered_sends_one_message(home, project, model, receiver):
    asked = []

    def hangs_at_first(request: dict) -> dict:
        asked.append(request)
        return hang(30) if len(asked) == 1 else fixes(request)

    server = model(hangs_at_first)
    got = receiver()
    process = subprocess.Popen([*LOOPWRIGHT, "run", str(write_spec(project, notify=NOTIFY))], stdout=subprocess.PIPE, text=True)
    run_id = process.stdout.readline().split()[1]
    wait_for(lambda: server.requests, "the first model call to be on its way")
    process.send_signal(signal.SIGKILL)
    process.wait()

    recovered = loopwright("recover", run_id)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert_told_once(got, run_id, "succeeded")
    assert len(got.received) == 2


def test_a_run_killed_while_its_message_is_sent_sends_it_again_with_the_same_delivery_id(
        home, project, model, receiver):
    model(fixes)
    got = receiver(delay=5)  # the first message is held: the run's process dies while sending it
    process = subprocess.Popen([*LOOPWRIGHT, "run", str(write_spec(project, notify=NOTIFY))], stdout=subprocess.PIPE, text=True)
    run_id = process.stdout.readline().split()[1]
    wait_for(lambda: got.received, "the first message to arrive", timeout=120)
    process.send_signal(signal.SIGKILL)
    process.wait()

    recovered = loopwright("recover", run_id)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert "recovering run" in recovered.stdout
    first, again = got.at("/runs")
    assert first["delivery"] == again["delivery"] == f"{run_id}/0" and first["body"] == again["body"]
    assert_told_once(got, run_id, "succeeded")
