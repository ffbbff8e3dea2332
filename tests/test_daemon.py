"""The daemon's extension points: routes, public routes and background tasks, served for real."""

import json
import threading
import time

import anyio
import httpx2
import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from loopwright.runtime.daemon import Daemon, DaemonError
from loopwright.runtime.service import Runtime


def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def serving(daemon: Daemon) -> threading.Thread:
    errors = []

    def serve() -> None:
        try:
            anyio.run(daemon.serve)
        except Exception as error:  # noqa: BLE001 - handed to the test
            errors.append(error)

    thread = threading.Thread(target=serve)
    thread.errors = errors
    thread.start()
    deadline = time.monotonic() + 30
    while not (daemon.home / "daemon.json").exists() and thread.is_alive():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return thread


def test_contributed_routes_need_the_token_unless_public_and_tasks_run_while_it_serves(home):
    daemon = Daemon(Runtime(), port=0)
    daemon.add_route(Route("/private", hello))
    daemon.add_route(Route("/hooks/ping", hello), public=True)
    ticks = []

    async def ticker(served: Daemon, *, task_status) -> None:
        task_status.started()
        while True:
            ticks.append(served.port)
            await anyio.sleep(0.05)

    daemon.add_task("ticker", ticker)
    thread = serving(daemon)
    try:
        assert httpx2.get(f"{daemon.url}/hooks/ping").text == "hello"
        assert httpx2.get(f"{daemon.url}/private").status_code == 401
        authorized = httpx2.get(f"{daemon.url}/private", headers={"Authorization": f"Bearer {daemon.token}"})
        assert authorized.text == "hello"
        info = json.loads((home / "daemon.json").read_text())
        assert info["url"] == f"{daemon.url}/mcp" and info["owner"] == daemon.runtime.owner
        assert ticks and ticks[0] == daemon.port
    finally:
        daemon.stop()
        thread.join(30)
    assert not thread.errors and not (home / "daemon.json").exists()


def test_a_task_that_fails_to_start_stops_the_daemon_with_its_name(home):
    daemon = Daemon(Runtime(), port=0)

    async def broken(served: Daemon, *, task_status) -> None:
        raise RuntimeError("no schedule file")

    daemon.add_task("cron", broken)
    with pytest.raises(DaemonError, match="daemon task 'cron' failed to start: no schedule file"):
        anyio.run(daemon.serve)
    assert not (home / "daemon.json").exists()


def test_a_task_that_fails_later_is_logged_and_the_daemon_goes_on(home, caplog):
    daemon = Daemon(Runtime(), port=0)
    daemon.add_route(Route("/hooks/ping", hello), public=True)

    async def flaky(served: Daemon, *, task_status) -> None:
        task_status.started()
        raise RuntimeError("watched folder vanished")

    daemon.add_task("watch", flaky)
    thread = serving(daemon)
    try:
        assert httpx2.get(f"{daemon.url}/hooks/ping").text == "hello"
    finally:
        daemon.stop()
        thread.join(30)
    assert "daemon task 'watch' failed" in caplog.text and "watched folder vanished" in caplog.text
