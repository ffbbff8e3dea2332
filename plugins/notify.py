"""People told: when a run ends, each `[[notify]]` of its spec gets one message: what finished, its
outcome and reason, its cost, and a link to the run's page on the daemon's dashboard.

`kind = "slack"` posts `{"text": ...}` (Slack's incoming webhooks, and the many chat tools that take
the same); `kind = "webhook"` posts the run's figures as JSON. The URL is read from the environment
variable `url_env` names, in the process that executes the run, and is never logged.

Delivery is at least once: a message sent is recorded in the run's trace, and the run-finished hook,
which may fire again after a crash, sends only what is not recorded. A crash between the sending and
the record sends the message again, with the same `X-Loopwright-Delivery` header, which a receiver
that must not act twice keys on. `LOOPWRIGHT_PUBLIC_URL` is the dashboard's address for the links
(default: the local daemon's).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from loopwright.runtime.hookspecs import hookimpl

if TYPE_CHECKING:
    from loopwright.runtime.plugin_host import PluginHost
    from loopwright.runtime.spec import NotifySpec
    from loopwright.runtime.types import Outcome, RunInfo

log = logging.getLogger(__name__)
ATTEMPTS = 3


def run_url(host: PluginHost, run_id: str) -> str:
    base = os.environ.get("LOOPWRIGHT_PUBLIC_URL", "")
    if not base:
        try:
            base = json.loads((host.settings.home / "daemon.json").read_text()).get("url", "").removesuffix("/mcp")
        except (OSError, ValueError):
            return ""
    return f"{base.rstrip('/')}/runs/{run_id}"


def message(kind: str, run: RunInfo, outcome: Outcome, host: PluginHost) -> dict[str, Any]:
    row = host.store.get_run(run.id)
    url = run_url(host, run.id)
    figures = {
        "event": "run_finished", "run_id": run.id, "loop": run.loop, "status": outcome.status, "reason": outcome.reason,
        "iterations": outcome.iterations, "spent_usd": round(row.spent_usd, 6), "max_cost_usd": run.spec.stop.max_cost_usd,
        "branch": row.branch, "commit": row.commit_sha, "url": url,
    }
    if kind == "webhook":
        return figures
    link = f" · <{url}|open the run>" if url else f" · `loopwright report {run.id}`"
    return {"text": f"*{run.loop}* run `{run.id}` *{outcome.status}*: {outcome.reason} · "
                    f"${figures['spent_usd']:.4f} of ${figures['max_cost_usd']:.2f} · branch `{row.branch}`{link}"}


def send(run: RunInfo, outcome: Outcome, host: PluginHost, index: int, notify: NotifySpec) -> None:
    key = f"notify.{index}"
    if outcome.status not in notify.on or host.store.event(run.id, key) is not None:
        return  # not wanted, or sent already (before a crash)
    url = os.environ.get(notify.url_env, "")
    if not url:
        log.warning("run %s: no %s message sent: the environment lacks %s", run.id, notify.kind, notify.url_env)
        return
    import httpx2  # here, not at start-up

    body = message(notify.kind, run, outcome, host)
    problem = ""
    for attempt in range(ATTEMPTS):
        try:
            answer = httpx2.post(url, json=body, timeout=15, headers={"X-Loopwright-Delivery": f"{run.id}/{index}"})
            if answer.status_code < 300:
                host.store.add_event(run.id, key, "notified", outcome.iterations,
                                     {"kind": notify.kind, "url_env": notify.url_env, "status_code": answer.status_code})
                return
            problem = f"answered {answer.status_code}"
            if answer.status_code < 500 and answer.status_code != 429:
                break  # refused: the same message again will be too
        except httpx2.HTTPError as error:
            problem = type(error).__name__  # its text may hold the URL, a secret
        if attempt < ATTEMPTS - 1:
            time.sleep(2 ** attempt)
    log.warning("run %s: the %s message to $%s was not delivered (%s)", run.id, notify.kind, notify.url_env, problem)


@hookimpl
def loopwright_run_finished(run: RunInfo, outcome: Outcome, host: PluginHost) -> None:
    for index, notify in enumerate(run.spec.notify):
        send(run, outcome, host, index, notify)
