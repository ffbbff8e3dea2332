"""The MCP tools over streamable HTTP at /mcp, served by the daemon (`loopwright serve`)."""

from __future__ import annotations

import os
from pathlib import Path

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from loopwright.runtime.automations import install_automations
from loopwright.runtime.dashboard import mount_dashboard
from loopwright.runtime.daemon import Daemon
from loopwright.runtime.service import Runtime

from .server import build_server

MCP_PATH = "/mcp"
MAX_REQUEST_BYTES = 1024 * 1024  # a whole inline loop spec is a few kB; bigger bodies get 413


def mount_mcp(daemon: Daemon, mcp: MCPServer) -> None:
    """Serve `mcp` at /mcp of the daemon: bearer token (the daemon's), Host and Origin checked
    against the daemon's bound address (DNS rebinding), request bodies capped."""
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=daemon.allowed_hosts,
        allowed_origins=daemon.allowed_origins,
    )
    app = mcp.streamable_http_app(streamable_http_path=MCP_PATH, transport_security=security,
                                  max_request_body_size=MAX_REQUEST_BYTES)
    for route in app.routes:
        daemon.add_route(route)
    daemon.add_lifespan(mcp.session_manager.run)  # the sub-app's own lifespan does not run when mounted


def serve_http(host: str, port: int, loops_dir: Path | None, allow_remote: bool = False,
               allowed_hosts: tuple[str, ...] = ()) -> None:
    """`loopwright serve`: the daemon, executing queued runs and serving MCP at /mcp."""
    runtime = Runtime()
    daemon = Daemon(runtime, host=host, port=port, allow_remote=allow_remote, allowed_hosts=allowed_hosts)
    loops = loops_dir or Path(os.environ.get("LOOPWRIGHT_LOOPS", "loops")).resolve()
    mount_mcp(daemon, build_server(runtime, loops))
    install_automations(daemon, loops)  # the loops' [[trigger]]s: schedules, watches, webhooks at /hooks
    mount_dashboard(daemon)  # the dashboard at / for a person with a browser
    daemon.run()
