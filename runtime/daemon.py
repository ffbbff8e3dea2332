"""The daemon, `loopwright serve`: one long-lived process that executes queued runs and serves HTTP.

What it does, in order: takes an exclusive lock on LOOPWRIGHT_HOME (one daemon per home), binds
its socket (127.0.0.1 unless told otherwise), launches the Runtime so its workers take queued
runs, enters the lifespans and starts the tasks it was given, then writes
`LOOPWRIGHT_HOME/daemon.json` ({"owner", "url", "pid"}) so `loopwright mcp` knows runs will be
executed here. SIGTERM or SIGINT shut it down cleanly: daemon.json is removed, runs in flight are
left for recovery (the next process that launches the Runtime continues them from their last
finished step), and sandboxes are removed by the sandbox module's exit handler. Every
TAKEOVER_INTERVAL_S it also takes over runs whose process died meanwhile: several daemons (one per
home) on one database share the run queue, and the survivors finish a dead one's runs.

Other parts of Loopwright plug into it without the daemon knowing them (this module imports
neither `mcp_server` nor any plugin):

- `add_route(route, public=False)`: a Starlette route or mount. Every route requires the bearer
  token (`Authorization: Bearer <token>`, see `loopwright token`) unless it is `public`, for
  routes that authenticate their callers themselves, such as HMAC-signed webhooks.
- `add_lifespan(factory)`: an async context manager entered before serving and left after,
  e.g. the MCP session manager.
- `add_task(name, fn)`: a background job for the daemon's whole life, e.g. a cron schedule or
  a file watch: `async def fn(daemon, *, task_status)`, which calls `task_status.started()`
  once it is ready. A task that is not ready within STARTUP_TIMEOUT_S, or fails before, stops
  the start-up with an error naming it; a task that fails later is logged with its traceback
  and the daemon goes on serving.

Security: the token is generated at first start into LOOPWRIGHT_HOME/token (mode 0600) and is
compared in constant time; it never appears in logs or error messages. A browser signed in to the
dashboard (runtime/dashboard.py) sends a session cookie derived from the token instead; a browser
without either is sent to the sign-in page. Binding to an address
that is not loopback is refused unless `allow_remote` is given; the token is required either
way. `allowed_hosts` / `allowed_origins` (the bound host:port, plus loopback names) are what
contributed apps check the Host and Origin headers against, against DNS rebinding.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from .service import DAEMON_FILE, Runtime

log = logging.getLogger(__name__)

TOKEN_FILE = "token"
SESSION_COOKIE = "loopwright_session"  # a browser's sign-in to the dashboard (runtime/dashboard.py)
LOCK_FILE = "daemon.lock"
DEFAULT_PORT = 8765
STARTUP_TIMEOUT_S = 30
GRACEFUL_SHUTDOWN_S = 3  # open streams (waits, subscriptions) are cut after this
TAKEOVER_INTERVAL_S = 10.0  # how often a daemon looks for runs whose process died (another daemon's, a worker's)


class DaemonError(Exception):
    """The daemon cannot start; the message says why and what to do."""


async def _take_over(daemon: Daemon, *, task_status: Any) -> None:
    """Runs whose process died while the daemon serves (another daemon on the same database, a worker)
    continue here, from their last finished step; each goes back on the shared queue once."""
    task_status.started()
    while True:
        await anyio.sleep(TAKEOVER_INTERVAL_S)
        taken = await anyio.to_thread.run_sync(daemon.runtime.recover_orphaned_runs)
        if taken:
            log.warning("took over runs whose process died: %s", ", ".join(taken))


def derived(token: str, purpose: str) -> str:
    """A value made from the daemon's token for one purpose (the dashboard's session cookie, its form token):
    worth nothing once the token changes, and it does not reveal the token."""
    return hmac.new(token.encode(), purpose.encode(), hashlib.sha256).hexdigest()


# --- the token -----------------------------------------------------------------------------------


def token_path(home: Path) -> Path:
    return home / TOKEN_FILE


def load_or_create_token(home: Path) -> str:
    """The bearer token of this LOOPWRIGHT_HOME, created (mode 0600) if there is none yet."""
    path = token_path(home)
    home.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_urlsafe(32) + "\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise DaemonError(f"{path} can be read by other users (mode {mode:04o}): run `chmod 600 {path}`")
    token = path.read_text().strip()
    if not token:
        raise DaemonError(f"{path} is empty: delete it and a new token is made at the next start")
    return token


class RequireToken:
    """ASGI middleware: every HTTP request outside the public paths must carry the bearer token."""

    def __init__(self, app: ASGIApp, token: str, public_paths: frozenset[str] = frozenset(), session: str = ""):
        self.app = app
        self._token = token.encode()
        self._public_paths = public_paths
        self._session = session.encode()  # the dashboard's session cookie, derived from the token

    def _is_public(self, path: str) -> bool:
        return any(path == p or path.startswith(p.rstrip("/") + "/") for p in self._public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token) or \
                self._session and hmac.compare_digest(_cookie(headers, SESSION_COOKIE).encode(), self._session):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "GET" and "text/html" in headers.get("accept", ""):  # a browser: the sign-in page
            await RedirectResponse("/login", status_code=303)(scope, receive, send)
            return
        response = JSONResponse(
            {"error": "missing or wrong bearer token: send the header `Authorization: Bearer <token>` "
                      "with the token that `loopwright token` prints"},
            status_code=401, headers={"WWW-Authenticate": 'Bearer realm="loopwright"'},
        )
        await response(scope, receive, send)


def _cookie(headers: Headers, name: str) -> str:
    cookies = SimpleCookie()
    cookies.load(headers.get("cookie", ""))
    return cookies[name].value if name in cookies else ""


# --- addresses -----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise DaemonError(f"cannot resolve --host {host!r}: give an IP address or a name this machine resolves") from None
    return all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise DaemonError(f"cannot listen on {host}:{port} ({error.strerror}): pass --port with a free port, or 0 for any") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@dataclass(frozen=True)
class _Task:
    name: str
    fn: Callable[..., Awaitable[None]]


class _Uvicorn(uvicorn.Server):
    """uvicorn re-raises a caught SIGTERM after shutting down, which would kill the process before
    the daemon cleans up; here a signal only asks the server to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class Daemon:
    """`loopwright serve`. See the module docstring for what plugs into it."""

    def __init__(self, runtime: Runtime, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 allow_remote: bool = False, allowed_hosts: tuple[str, ...] = ()):
        self.runtime = runtime
        self.home = runtime.settings.home
        self.host = host
        loopback = is_loopback(host)
        if not loopback and not allow_remote:
            raise DaemonError(
                f"refusing to listen on {host}, which is not a loopback address: anyone who can reach it could "
                "try to drive runs on this machine. Pass --allow-remote to do it anyway (the bearer token is "
                "still required on every request), or use --host 127.0.0.1"
            )
        self.token = load_or_create_token(self.home)
        self._lock = self._take_lock()
        self._socket = _bind(host, port)
        self.port = self._socket.getsockname()[1]
        wildcard = host in ("0.0.0.0", "::", "")
        local_name = "127.0.0.1" if wildcard or loopback else _bracketed(host)
        self.url = f"http://{local_name}:{self.port}"
        names = {"127.0.0.1", "localhost", "[::1]"}
        if not loopback:
            names |= {socket.gethostname(), socket.getfqdn()} if wildcard else {_bracketed(host)}
        extra = {name if ":" in name else f"{name}:{self.port}" for name in allowed_hosts}
        self.allowed_hosts = sorted({f"{name}:{self.port}" for name in names} | extra)
        self.allowed_origins = [f"http://{h}" for h in self.allowed_hosts]
        self._routes: list[BaseRoute] = []
        self._public_paths: set[str] = set()
        self._lifespans: list[Callable[[], AbstractAsyncContextManager[Any]]] = []
        self._tasks: list[_Task] = [_Task("take over runs of dead processes", _take_over)]
        self._server: _Uvicorn | None = None
        self._startup_error: Exception | None = None

    # --- contributions ---------------------------------------------------------------------------

    def add_route(self, route: BaseRoute, *, public: bool = False) -> None:
        """Serve `route`; unless `public`, only to requests that carry the bearer token."""
        self._routes.append(route)
        if public:
            self._public_paths.add(getattr(route, "path"))

    def add_lifespan(self, factory: Callable[[], AbstractAsyncContextManager[Any]]) -> None:
        """Enter `factory()` before serving; leave it after (in reverse order of adding)."""
        self._lifespans.append(factory)

    def add_task(self, name: str, fn: Callable[..., Awaitable[None]]) -> None:
        """Run `await fn(daemon, task_status=...)` in the background while the daemon lives."""
        self._tasks.append(_Task(name, fn))

    # --- serving ---------------------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(
            routes=self._routes,
            middleware=[Middleware(RequireToken, token=self.token, public_paths=frozenset(self._public_paths),
                                   session=derived(self.token, "dashboard session"))],
            lifespan=lambda _app: self._lifespan(),
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            try:
                for factory in self._lifespans:
                    await stack.enter_async_context(factory())
                group = await stack.enter_async_context(anyio.create_task_group())  # inside the lifespans
                for task in self._tasks:
                    await self._start_task(group, task)
            except Exception as error:
                self._startup_error = error  # uvicorn would only log it; serve() raises it
                raise
            self._write_info()
            log.warning("loopwright daemon ready at %s (home %s; clients send `Authorization: Bearer "
                        "$(loopwright token)`)", self.url, self.home)
            try:
                yield
            finally:
                self._remove_info()
                group.cancel_scope.cancel()

    async def _start_task(self, group: anyio.abc.TaskGroup, task: _Task) -> None:
        async def guarded(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            status = _Readiness(task_status)
            try:
                await task.fn(self, task_status=status)
            except Exception:
                if not status.ready:
                    raise  # start-up fails with it
                log.exception("daemon task %r failed; the daemon goes on without it", task.name)

        try:
            with anyio.fail_after(STARTUP_TIMEOUT_S):
                await group.start(guarded, name=task.name)
        except TimeoutError:
            raise DaemonError(f"daemon task {task.name!r} was not ready within {STARTUP_TIMEOUT_S} s") from None
        except Exception as error:
            raise DaemonError(f"daemon task {task.name!r} failed to start: {error}") from error

    async def serve(self) -> None:
        """Serve until stop() or a signal. The Runtime must already be launched to execute runs."""
        config = uvicorn.Config(self.app(), lifespan="on", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        self._server = _Uvicorn(config)
        with contextlib.suppress(SystemExit):  # how uvicorn reports a failed start-up
            await self._server.serve(sockets=[self._socket])
        if self._startup_error is not None:
            raise self._startup_error
        if not self._server.started:
            raise DaemonError("the daemon did not start; the error is logged above")

    @property
    def stopping(self) -> bool:
        """The daemon is shutting down: open streams should end now."""
        return self._server is not None and self._server.should_exit

    def stop(self) -> None:
        """Ask a serving daemon to shut down (from any thread)."""
        if self._server is not None:
            self._server.should_exit = True

    def run(self) -> None:
        """Launch the Runtime, serve until SIGTERM/SIGINT, then clean up. Blocks."""
        try:
            self.runtime.launch()
            anyio.run(self.serve)
        finally:
            self._remove_info()
            self.runtime.shutdown()
            self._socket.close()
            self._lock.close()

    # --- daemon.json and the lock ------------------------------------------------------------------

    def _take_lock(self) -> Any:
        lock = open(self.home / LOCK_FILE, "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            running = self.runtime.running_daemon() or {}
            raise DaemonError(
                f"a daemon already serves {self.home}" + (f" at {running['url']}" if running.get("url") else "")
                + ": stop it first, or set LOOPWRIGHT_HOME to another folder"
            ) from None
        return lock

    def _write_info(self) -> None:
        # `url` is the MCP endpoint, what `loopwright mcp` and clients look for
        info = {"owner": self.runtime.owner, "url": f"{self.url}/mcp", "pid": os.getpid(), "started_at": time.time()}
        path = self.home / DAEMON_FILE
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(info) + "\n")
        partial.replace(path)

    def _remove_info(self) -> None:
        path = self.home / DAEMON_FILE
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(path.read_text()).get("owner") == self.runtime.owner:
                path.unlink()


class _Readiness:
    """The task_status handed to a daemon task; remembers whether the task said it is ready."""

    def __init__(self, status: anyio.abc.TaskStatus[None]):
        self._status = status
        self.ready = False

    def started(self, value: None = None) -> None:
        self.ready = True
        self._status.started(value)
