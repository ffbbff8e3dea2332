"""The daemon's dashboard at `/` (docs/observability.md): the runs, each run's page, live updates and
the controls a person needs (stop, pause, resume, approve or deny with a note), and the automations.

Served by the daemon's own HTTP stack behind its token. A browser signs in once at `/login` with the
token; the session cookie holds a value derived from it (an HMAC, so rotating the token ends every
session), HttpOnly and SameSite=Strict. Every action is a POST that must come from the daemon's own
origin and carry a form token derived from the token too: a cross-site request is refused. Pages
update themselves through server-sent events: when the list or the run changes, the page fetches
its new content. No build step, nothing fetched from elsewhere.
"""

from __future__ import annotations

import hmac
import html
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from .daemon import SESSION_COOKIE, Daemon, derived
from .report import page, run_body
from .service import RunError
from .store import UnknownRun

POLL_S = 0.5  # how often a live page's stream looks for a change
LIVE = """
const source = new EventSource(location.pathname.replace(/\\/$/, "") + "/events");
source.onmessage = async () => {
  const answer = await fetch(location.pathname + "?fragment=1", {credentials: "same-origin"});
  if (answer.ok) document.getElementById("live").innerHTML = await answer.text();
};
"""


def mount_dashboard(daemon: Daemon) -> None:
    board = Dashboard(daemon)
    daemon.add_route(Route("/login", board.login, methods=["GET", "POST"]), public=True)
    for route in (Route("/", board.runs_page), Route("/events", board.runs_events),
                  Route("/runs/{run_id}", board.run_page), Route("/runs/{run_id}/events", board.run_events),
                  Route("/runs/{run_id}/{action:str}", board.run_action, methods=["POST"]),
                  Route("/approvals/{approval_id}", board.decide, methods=["POST"])):
        daemon.add_route(route)


class Dashboard:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.runtime = daemon.runtime
        self.session = derived(daemon.token, "dashboard session")
        self.form_token = derived(daemon.token, "dashboard form")

    # --- signing in ------------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return HTMLResponse(self._login_form())
        if refused := self._cross_site(request):
            return refused
        form = await request.form()
        if not hmac.compare_digest(str(form.get("token", "")).encode(), self.daemon.token.encode()):
            return HTMLResponse(self._login_form("That is not the daemon's token."), status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, self.session, httponly=True, samesite="strict", path="/")
        return response

    def _login_form(self, problem: str = "") -> str:
        return page("Loopwright · sign in", (
            "<h1>Loopwright</h1><p>Sign in with the daemon's token (<code>loopwright token</code> prints it).</p>"
            + (f'<p class="fail" id="problem">{html.escape(problem)}</p>' if problem else "")
            + '<form method="post" action="/login"><input type="password" name="token" autocomplete="off" '
              'aria-label="token" size="50"> <button type="submit">Sign in</button></form>'))

    # --- the runs --------------------------------------------------------------------------------

    async def runs_page(self, request: Request) -> Response:
        body = await anyio.to_thread.run_sync(self._runs_fragment)
        if request.query_params.get("fragment"):
            return HTMLResponse(body)
        return HTMLResponse(page("Loopwright · runs", f'<h1>Loopwright</h1><div id="live">{body}</div>', LIVE))

    async def runs_events(self, request: Request) -> Response:
        return self._stream(request, self._runs_fingerprint)

    def _runs_fingerprint(self) -> str:
        return json.dumps([(r.id, r.status, r.iteration, round(r.spent_usd, 6)) for r in self.runtime.list_runs(limit=100)])

    def _runs_fragment(self) -> str:
        e, now = html.escape, time.time()
        found = self.runtime.list_runs(limit=100)
        triggers = self.runtime.store.triggers_of([r.id for r in found])
        rows = "".join(
            f'<tr data-run="{e(r.id)}"><td><a href="/runs/{e(r.id)}">{e(r.id)}</a></td><td>{e(r.loop)}</td>'
            f'<td class="status">{e(r.status)}</td><td>{r.iteration} of {r.spec["stop"]["max_iterations"]}</td>'
            f'<td>${r.spent_usd:.4f} of ${r.spec["stop"]["max_cost_usd"]:.2f}</td><td>{_age(now - r.created_at)}</td>'
            f'<td>{e(triggers.get(r.id, "by hand"))}</td></tr>' for r in found)
        table = ('<table id="runs"><tr><th>run</th><th>loop</th><th>status</th><th>iteration</th><th>spend</th>'
                 f'<th>age</th><th>trigger</th></tr>{rows}</table>' if found else '<p id="runs">No runs yet.</p>')
        return "<h2>Runs</h2>" + table + self._automations()

    def _automations(self) -> str:
        e = html.escape
        now = datetime.now(timezone.utc)
        found = self.runtime.store.automation_rows(now.strftime("%Y-%m-%d"))
        if not found:
            return ""
        rows = "".join(
            f'<tr><td>{e(a["id"])}</td><td>{e(a["kind"])}</td><td>{"paused: " + e(a["paused_reason"]) if a["paused"] else _next(a, now)}</td>'
            f'<td>{a["runs_today"]} runs, ${a["spent_today"]:.4f}</td></tr>' for a in found)
        return ('<h2>Automations</h2><table id="automations"><tr><th>automation</th><th>kind</th><th>next</th>'
                f'<th>today</th></tr>{rows}</table>')

    # --- a run -----------------------------------------------------------------------------------

    async def run_page(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]
        try:
            body = await anyio.to_thread.run_sync(self._run_fragment, run_id)
        except UnknownRun:
            return HTMLResponse(page("Loopwright", f"<h1>No run {html.escape(run_id)}</h1>"), status_code=404)
        if request.query_params.get("fragment"):
            return HTMLResponse(body)
        return HTMLResponse(page(f"Loopwright · run {run_id}", f'<p><a href="/">all runs</a></p><div id="live">{body}</div>', LIVE))

    async def run_events(self, request: Request) -> Response:
        run_id = request.path_params["run_id"]

        def fingerprint() -> str:
            newest = self.runtime.store.events(run_id, limit=1, newest=True)
            run = self.runtime.get_run(run_id)
            return json.dumps([run.status, newest[0]["seq"] if newest else 0, newest[0]["data"] if newest else None])

        return self._stream(request, fingerprint)

    def _run_fragment(self, run_id: str) -> str:
        run = self.runtime.get_run(run_id)
        status = self.runtime.status(run_id).to_dict()
        events = self.runtime.store.all_events(run_id)
        approvals = "".join(self._approval_form(run_id, a) for a in status["pending_approvals"])
        return self._controls(run) + run_body(status, events, approvals=approvals)

    def _controls(self, run: Any) -> str:
        if run.finished:
            return ""
        actions = ["stop"] + (["resume"] if run.status == "paused" or run.pause_requested else ["pause"])
        return '<div id="controls">' + " ".join(
            f'<form method="post" action="/runs/{html.escape(run.id)}/{action}" style="display:inline">'
            f'<input type="hidden" name="form_token" value="{self.form_token}"><button name="action" value="{action}">'
            f'{action}</button></form>' for action in actions) + "</div>"

    def _approval_form(self, run_id: str, approval: dict[str, Any]) -> str:
        e = html.escape
        return (f'<li id="approval-{e(approval["approval_id"])}">{e(approval["tool"])} '
                f'<code>{e(json.dumps(approval["input"])[:300])}</code> ({e(approval["rule"])})'
                f'<form method="post" action="/approvals/{e(approval["approval_id"])}">'
                f'<input type="hidden" name="form_token" value="{self.form_token}">'
                f'<input type="hidden" name="run" value="{e(run_id)}">'
                '<input name="note" placeholder="a note for the maker" aria-label="note" size="40"> '
                '<button name="decision" value="allow">approve</button> <button name="decision" value="deny">deny</button>'
                "</form></li>")

    # --- actions ---------------------------------------------------------------------------------

    async def run_action(self, request: Request) -> Response:
        run_id, action = request.path_params["run_id"], request.path_params["action"]
        if refused := await self._refuse(request):
            return refused
        act = {"stop": self.runtime.stop_run, "pause": self.runtime.pause_run, "resume": self.runtime.resume_run}.get(action)
        if act is None:
            return HTMLResponse(f"No action {html.escape(action)}: stop, pause or resume.", status_code=404)
        try:
            await anyio.to_thread.run_sync(act, run_id)
        except (UnknownRun, RunError) as error:
            return HTMLResponse(html.escape(str(error)), status_code=409)
        return RedirectResponse(f"/runs/{run_id}", status_code=303)

    async def decide(self, request: Request) -> Response:
        if refused := await self._refuse(request):
            return refused
        form = await request.form()
        decision = form.get("decision")
        if decision not in ("allow", "deny"):
            return HTMLResponse("decision: allow or deny", status_code=400)
        try:
            await anyio.to_thread.run_sync(self.runtime.decide_approval, request.path_params["approval_id"],
                                           decision == "allow", str(form.get("note", ""))[:2000])
        except RunError as error:
            return HTMLResponse(html.escape(str(error)), status_code=409)
        return RedirectResponse(f"/runs/{form.get('run', '')}" if form.get("run") else "/", status_code=303)

    async def _refuse(self, request: Request) -> Response | None:
        """An action is done only for a request from the daemon's own pages: its origin, its form token."""
        if refused := self._cross_site(request):
            return refused
        form = await request.form()
        if not hmac.compare_digest(str(form.get("form_token", "")).encode(), self.form_token.encode()):
            return HTMLResponse("Refused: this form did not come from the dashboard (no valid form token).", status_code=403)
        return None

    def _cross_site(self, request: Request) -> Response | None:
        origin = request.headers.get("origin")
        if origin is not None and origin not in self.daemon.allowed_origins:
            return HTMLResponse(f"Refused: a cross-site request (from {html.escape(origin)}).", status_code=403)
        return None

    # --- live ------------------------------------------------------------------------------------

    def _stream(self, request: Request, fingerprint: Any) -> Response:
        async def changes() -> AsyncIterator[str]:
            last = None
            while not self.daemon.stopping and not await request.is_disconnected():
                try:
                    now = await anyio.to_thread.run_sync(fingerprint)
                except UnknownRun:
                    return
                if now != last:
                    if last is not None:
                        yield "data: changed\n\n"
                    last = now
                await anyio.sleep(POLL_S)

        return StreamingResponse(changes(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _next(automation: dict[str, Any], now: datetime) -> str:
    """When a cron automation fires next; other kinds fire on their event."""
    settings = automation["settings"]
    if automation["kind"] != "cron" or not isinstance(settings.get("schedule"), str):
        return f"on its event ({html.escape(automation['kind'])})"
    from zoneinfo import ZoneInfo

    from croniter import croniter

    zone = ZoneInfo(settings.get("timezone") or "UTC")
    return croniter(settings["schedule"], now.astimezone(zone)).get_next(datetime).strftime("%Y-%m-%d %H:%M %Z")
