"""A real `loopwright serve` in a subprocess on a free loopback port, and MCP clients for it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from conftest import LOOPWRIGHT, ROOT


class DaemonProcess:
    def __init__(self, home: Path, loops_dir: Path, *args: str, env: dict[str, str] | None = None):
        self.home = home
        self.log = home.parent / f"daemon-{time.monotonic_ns()}.log"
        home.mkdir(parents=True, exist_ok=True)
        environment = dict(env if env is not None else os.environ, LOOPWRIGHT_HOME=str(home))
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [*LOOPWRIGHT, "serve", "--port", "0", "--loops", str(loops_dir), *args],
                cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
            )
        self.info = self._wait_until_ready()
        self.url: str = self.info["url"]
        self.token = (home / "token").read_text().strip()
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def _wait_until_ready(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"loopwright serve exited with {self.process.returncode}:\n{self.output()}")
            try:
                info = json.loads((self.home / "daemon.json").read_text())
            except (FileNotFoundError, ValueError):
                info = {}
            if info.get("pid") == self.process.pid:
                return info
            time.sleep(0.1)
        raise AssertionError(f"loopwright serve did not get ready in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text()

    @asynccontextmanager
    async def client(self, **options) -> AsyncIterator[Client]:
        """The mcp SDK's client over streamable HTTP, sending the bearer token."""
        async with httpx2.AsyncClient(headers=self.headers, timeout=httpx2.Timeout(30, read=300)) as http:
            async with Client(streamable_http_client(self.url, http_client=http), **options) as client:
                yield client

    def stop(self) -> int:
        """SIGTERM, as a service manager would; returns the exit code (and checks that the daemon
        logged no traceback: a crash in shutdown would not change the exit code)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"loopwright serve ignored SIGTERM:\n{self.output()}") from None
        assert "Traceback" not in self.output(), self.output()
        return self.process.returncode
