"""Runs as MCP resources, and change notifications for the clients that subscribe to them.

`loopwright://runs/{run_id}` is what get_run returns; `loopwright://runs/{run_id}/trace` is the
newest TRACE_EVENTS events of the run's trace (get_run_trace pages through all of it). Both JSON.

Clients hear of changes in whichever of the two ways their protocol version speaks:

- 2026-07-28 clients open a `subscriptions/listen` stream naming the URIs (the SDK's own
  listen handler serves it; we only note which URIs are listened to);
- earlier clients (Claude Code, the MCP Inspector, `ClientSession`) send `resources/subscribe`,
  which MCPServer does not serve, so we do, and get `notifications/resources/updated`.

Runs change in whichever process executes them (the daemon, `loopwright run`), so there is no
in-process event to hook: a watcher polls the runs behind subscribed URIs every POLL_S seconds
and notifies when one changed. A subscription records the resource's state when it is made, so
a change right after subscribing is never missed.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import mcp_types as types
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ResourceUpdated
from mcp.shared.exceptions import MCPError

from loopwright.runtime.service import Runtime
from loopwright.runtime.records import UnknownRun

log = logging.getLogger(__name__)

RUN_URI = "loopwright://runs/{run_id}"
TRACE_URI = "loopwright://runs/{run_id}/trace"
URI_PATTERN = re.compile(r"^loopwright://runs/(?P<run_id>[^/]+)(?P<trace>/trace)?$")
TRACE_EVENTS = 500
POLL_S = 0.5


class RunResources:
    """The two run resources of one MCP server, with their subscriptions and their watcher."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.bus = InMemorySubscriptionBus()  # give it to MCPServer(subscriptions=...)
        self._listen = ListenHandler(self.bus)
        self._listened: Counter[str] = Counter()  # URI -> open listen streams that name it
        self._subscribers: dict[str, set[Connection]] = {}  # URI -> connections that subscribed
        self._seen: dict[str, str | None] = {}  # URI -> its state when last looked at

    # --- reading -------------------------------------------------------------------------------

    def run_json(self, run_id: str) -> str:
        try:
            return json.dumps(self.runtime.status(run_id).to_dict(), indent=1)
        except UnknownRun as error:
            raise ResourceNotFoundError(str(error)) from None

    def trace_json(self, run_id: str) -> str:
        try:
            events = self.runtime.trace(run_id, limit=TRACE_EVENTS + 1, newest=True)
        except UnknownRun as error:
            raise ResourceNotFoundError(str(error)) from None
        complete = len(events) <= TRACE_EVENTS
        return json.dumps({"run_id": run_id, "complete": complete, "events": events[-TRACE_EVENTS:]}, indent=1)

    def state(self, uri: str) -> str | None:
        """What a change of the resource at `uri` changes; None for an unknown run."""
        match = URI_PATTERN.match(uri)
        if match is None:
            return None
        try:
            if match["trace"]:
                newest = self.runtime.trace(match["run_id"], limit=1, newest=True)
                return str(newest[-1]["seq"] if newest else 0)
            return json.dumps(self.runtime.status(match["run_id"]).to_dict(), sort_keys=True)
        except UnknownRun:
            return None

    # --- wiring into an MCPServer ----------------------------------------------------------------

    def install(self, mcp: MCPServer) -> None:
        @mcp.resource(RUN_URI, name="run", mime_type="application/json",
                      description="A run's status, iteration, last verdict, spend and tokens (what get_run returns).")
        def run_resource(run_id: str) -> str:
            return self.run_json(run_id)

        @mcp.resource(TRACE_URI, name="run-trace", mime_type="application/json",
                      description=f"The newest {TRACE_EVENTS} events of a run's trace; get_run_trace pages through all.")
        def trace_resource(run_id: str) -> str:
            return self.trace_json(run_id)

        # MCPServer 2.3 has no public way to add request handlers: these go on its low-level server.
        lowlevel = mcp._lowlevel_server  # noqa: SLF001
        lowlevel.add_request_handler("subscriptions/listen", types.SubscriptionsListenRequestParams, self._on_listen)
        lowlevel.add_request_handler("resources/subscribe", types.SubscribeRequestParams, self._on_subscribe)
        lowlevel.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, self._on_unsubscribe)

    @asynccontextmanager
    async def lifespan(self, _mcp: MCPServer) -> AsyncIterator[None]:
        """For MCPServer(lifespan=...): the watcher runs while the server does."""
        async with anyio.create_task_group() as group:
            group.start_soon(self._watch, name="loopwright-resource-watcher")
            try:
                yield
            finally:
                group.cancel_scope.cancel()

    async def _remember(self, uris: list[str]) -> None:
        new = [uri for uri in uris if uri not in self._seen]
        states = await anyio.to_thread.run_sync(lambda: [self.state(uri) for uri in new])
        for uri, state in zip(new, states):
            self._seen.setdefault(uri, state)

    async def _on_listen(self, ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams) -> Any:
        uris = [uri for uri in params.notifications.resource_subscriptions or () if URI_PATTERN.match(uri)]
        await self._remember(uris)
        self._listened.update(uris)
        try:
            return await self._listen(ctx, params)
        finally:
            self._listened.subtract(uris)
            self._listened += Counter()  # drops the URIs no stream names any more

    async def _on_subscribe(self, ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams) -> types.EmptyResult:
        uri = str(params.uri)
        match = URI_PATTERN.match(uri)
        if match is None:
            raise MCPError(types.INVALID_PARAMS, f"cannot subscribe to {uri!r}: Loopwright's resources are "
                                                 f"{RUN_URI} and {TRACE_URI}")
        if await anyio.to_thread.run_sync(self.state, uri) is None:
            raise MCPError(types.INVALID_PARAMS, str(UnknownRun(match["run_id"])))
        await self._remember([uri])
        connection = _connection_of(ctx)
        subscribers = self._subscribers.setdefault(uri, set())
        if connection not in subscribers:
            subscribers.add(connection)
            connection.exit_stack.callback(self._forget, uri, connection)
        return types.EmptyResult()

    async def _on_unsubscribe(self, ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        self._forget(str(params.uri), _connection_of(ctx))
        return types.EmptyResult()

    def _forget(self, uri: str, connection: Connection) -> None:
        subscribers = self._subscribers.get(uri, set())
        subscribers.discard(connection)
        if not subscribers:
            self._subscribers.pop(uri, None)

    # --- watching --------------------------------------------------------------------------------

    def _watched(self) -> set[str]:
        return set(self._listened) | set(self._subscribers)

    async def _watch(self) -> None:
        while True:
            await anyio.sleep(POLL_S)
            uris = self._watched()
            for uri in set(self._seen) - uris:
                del self._seen[uri]
            if not uris:
                continue
            try:
                states = await anyio.to_thread.run_sync(lambda: {uri: self.state(uri) for uri in uris})
            except Exception:  # e.g. the database is busy: the next look will tell
                log.warning("could not look at subscribed runs; trying again", exc_info=True)
                continue
            for uri, state in states.items():
                changed = uri in self._seen and self._seen[uri] != state
                self._seen[uri] = state
                if changed:
                    await self._notify(uri)

    async def _notify(self, uri: str) -> None:
        await self.bus.publish(ResourceUpdated(uri=uri))
        for connection in list(self._subscribers.get(uri, ())):
            try:
                await connection.send_resource_updated(uri)
            except Exception as error:  # a client that went away: it stops hearing
                log.info("dropping a subscription to %s: %s", uri, error)
                self._forget(uri, connection)


def _connection_of(ctx: ServerRequestContext[Any, Any]) -> Connection:
    # A ServerSession is made per request; a subscription belongs to the connection behind it.
    return ctx.session._connection  # noqa: SLF001
