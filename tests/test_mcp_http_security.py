"""The HTTP endpoint's defences, over real HTTP against a real `loopwright serve`."""

import json
import os
import stat

import httpx2
import pytest

from conftest import loopwright
from daemon_process import DaemonProcess

INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}}
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon for this module's requests, none of which starts a run."""
    root = tmp_path_factory.mktemp("security")
    env = dict(os.environ, LOOPWRIGHT_LOAD_PLUGINS="")
    served = DaemonProcess(root / "home", root, env=env)
    yield served
    assert served.stop() == 0, served.output()


def post(daemon: DaemonProcess, headers: dict, body: bytes | None = None) -> httpx2.Response:
    content = json.dumps(INITIALIZE).encode() if body is None else body
    return httpx2.post(daemon.url, headers={**ACCEPT, **headers}, content=content, timeout=30)


def test_the_token_opens_the_endpoint(daemon):
    response = post(daemon, daemon.headers)
    assert response.status_code == 200
    assert '"serverInfo":{"name":"loopwright"' in response.text


def test_a_request_without_the_token_is_refused_with_401(daemon):
    response = post(daemon, {})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "loopwright token" in response.json()["error"]


def test_a_request_with_a_wrong_token_is_refused_with_401(daemon):
    for value in ("Bearer wrong-token", f"Basic {daemon.token}", f"Bearer {daemon.token}x", "Bearer", daemon.token):
        response = post(daemon, {"Authorization": value})
        assert response.status_code == 401, value
        assert "wrong-token" not in response.text and daemon.token not in response.text


def test_every_method_needs_the_token(daemon):
    assert httpx2.get(daemon.url, headers={"Accept": "text/event-stream"}, timeout=30).status_code == 401
    assert httpx2.delete(daemon.url, timeout=30).status_code == 401
    assert httpx2.get(daemon.url.removesuffix("/mcp") + "/anything", timeout=30).status_code == 401


def test_a_foreign_origin_is_refused_with_403(daemon):
    response = post(daemon, {**daemon.headers, "Origin": "http://attacker.example"})
    assert response.status_code == 403


def test_a_foreign_host_is_refused_with_421(daemon):
    response = post(daemon, {**daemon.headers, "Host": "attacker.example"})
    assert response.status_code == 421
    port = daemon.url.split(":")[2].split("/")[0]
    rebinding = post(daemon, {**daemon.headers, "Host": f"attacker.example:{port}"})
    assert rebinding.status_code == 421


def test_the_local_origin_is_accepted(daemon):
    origin = daemon.url.removesuffix("/mcp")
    assert post(daemon, {**daemon.headers, "Origin": origin}).status_code == 200


def test_an_oversized_body_is_refused_with_413(daemon):
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": "' + b"a" * (2 * 1024 * 1024) + b'"}}'
    assert post(daemon, daemon.headers, body).status_code == 413


def test_the_token_never_appears_in_the_daemon_log(daemon):
    post(daemon, {"Authorization": "Bearer guessed-token"})
    post(daemon, {**daemon.headers, "Host": "attacker.example"})
    log = daemon.output()
    assert "ready at" in log
    assert daemon.token not in log and "guessed-token" not in log


def test_the_token_file_is_private_and_loopwright_token_prints_it(daemon):
    token_file = daemon.home / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    printed = loopwright("token", env=dict(os.environ, LOOPWRIGHT_HOME=str(daemon.home)))
    assert printed.returncode == 0 and printed.stdout.strip() == daemon.token


def test_a_second_daemon_for_the_same_home_is_refused(daemon, tmp_path):
    second = loopwright("serve", "--port", "0", env=dict(os.environ, LOOPWRIGHT_HOME=str(daemon.home)), timeout=60)
    assert second.returncode == 2
    assert f"a daemon already serves {daemon.home} at {daemon.url}" in second.stderr


def test_listening_on_a_non_loopback_address_is_refused_unless_allowed(tmp_path):
    refused = loopwright("serve", "--host", "0.0.0.0", "--port", "0",
                         env=dict(os.environ, LOOPWRIGHT_HOME=str(tmp_path / "home")), timeout=60)
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0" in refused.stderr and "--allow-remote" in refused.stderr
    assert not (tmp_path / "home" / "daemon.json").exists()


def test_a_token_file_others_can_read_stops_the_daemon(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "token").write_text("shared-secret\n")
    (home / "token").chmod(0o644)
    refused = loopwright("serve", "--port", "0", env=dict(os.environ, LOOPWRIGHT_HOME=str(home)), timeout=60)
    assert refused.returncode == 2
    assert "can be read by other users" in refused.stderr and "chmod 600" in refused.stderr
    assert "shared-secret" not in refused.stderr


def test_sigterm_stops_the_daemon_and_removes_daemon_json(tmp_path):
    served = DaemonProcess(tmp_path / "home", tmp_path, env=dict(os.environ, LOOPWRIGHT_LOAD_PLUGINS=""))
    assert (served.home / "daemon.json").exists()
    assert served.stop() == 0
    assert not (served.home / "daemon.json").exists()
    with pytest.raises(httpx2.TransportError):
        post(served, served.headers)
