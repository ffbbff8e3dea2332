"""GitHub in and out (docs/github.md): the `github` trigger kind starts runs from GitHub's webhooks, and
a run's end is sent back per the spec's `[github]` section (its branch pushed, a pull request opened or
updated, a comment on the pull request or issue that started it, a commit status).

The token is read here, in the process that executes the run, and only here: it is sent to the API in
a header and to `git push` through git's environment, never into a sandbox, the trace or a log.
`GITHUB_API_URL` points the API elsewhere (GitHub Enterprise, tests).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.types import WebhookRequest, WebhookResponse

from .triggers import ENV_NAME, _settings, answer

if TYPE_CHECKING:
    from loopwright.runtime.automations import Context
    from loopwright.runtime.plugin_host import PluginHost
    from loopwright.runtime.spec import GitHubSpec, LoopSpec, TriggerSpec
    from loopwright.runtime.types import Outcome, RunInfo

log = logging.getLogger(__name__)
API_URL = "https://api.github.com"
TEXT_LIMIT = 4000  # the most characters of an issue's or comment's text a goal carries
PLACEHOLDER = re.compile(r"\{\{\s*event\.([a-z_]+)\s*\}\}")
FAILED = {"failure", "timed_out", "action_required", "startup_failure"}


# --- in: the `github` trigger ----------------------------------------------------------------------


def _strings(settings: dict[str, Any], key: str) -> list[str]:
    value = settings.get(key, [])
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{key}: expected a string or a list of strings, got {value!r}")
    return value


class GitHubTrigger:
    """POST /hooks/<loop>/<name> from a GitHub webhook: `X-Hub-Signature-256` checked, each delivery
    (`X-GitHub-Delivery`) starting at most one run, only the selected events and actions."""

    def __init__(self, trigger: TriggerSpec):
        settings = _settings(trigger, {"secret_env", "events", "command", "labels", "remote"})
        self.secret_env = settings.get("secret_env")
        if not isinstance(self.secret_env, str) or not ENV_NAME.match(self.secret_env):
            raise ValueError("secret_env: expected the name of the environment variable that holds the webhook's "
                             f"secret (the secret itself never goes in the spec), got {self.secret_env!r}")
        self.events = _strings(settings, "events")
        if not self.events:
            raise ValueError("events: name the events that start runs, e.g. ['pull_request.opened', "
                             "'pull_request.synchronize', 'issues.labeled', 'check_run.completed', 'issue_comment.created']")
        self.command = settings.get("command")  # an issue comment must start with it
        if self.command is not None and not (isinstance(self.command, str) and self.command.strip()):
            raise ValueError(f"command: expected the text a comment starts with, such as '/fix', got {self.command!r}")
        self.labels = _strings(settings, "labels")  # a `labeled` action must add one of these
        self.remote = settings.get("remote", "origin")  # where a pull request's head is fetched from

    def handle(self, ctx: Context, request: WebhookRequest) -> WebhookResponse:
        secret = os.environ.get(self.secret_env, "")
        if not secret:
            return WebhookResponse(503, {"error": f"this webhook is not configured: the daemon's environment lacks "
                                                  f"{self.secret_env}, which holds its secret"})
        given = request.headers.get("x-hub-signature-256", "").strip()
        expected = "sha256=" + hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return WebhookResponse(401, {"error": "bad or missing X-Hub-Signature-256: set the webhook's secret on "
                                                  "GitHub to the value of the trigger's secret_env"})
        event, delivery = request.headers.get("x-github-event", ""), request.headers.get("x-github-delivery", "")
        if not event or not delivery:
            return WebhookResponse(400, {"error": "a GitHub webhook sends X-GitHub-Event and X-GitHub-Delivery"})
        if event == "ping":
            return WebhookResponse(200, {"ok": "pong"})
        try:
            payload = json.loads(request.body)
            assert isinstance(payload, dict)
        except (ValueError, AssertionError):
            return WebhookResponse(400, {"error": "the body is not a JSON object: set the webhook's content type "
                                                  "to application/json"})
        why = self._ignored(event, payload)
        if why:
            return WebhookResponse(200, {"ignored": why})
        details = fields(event, payload, delivery[:100])
        fired = ctx.fire(f"delivery:{delivery[:100]}", details=details, spec=self._spec(ctx.spec, details))
        if fired.repeated:
            return WebhookResponse(200, {"duplicate": f"delivery {delivery[:100]} was received before "
                                                      f"({fired.status}, run {fired.run_id}): nothing started"})
        return answer(ctx, fired)

    def _ignored(self, event: str, payload: dict[str, Any]) -> str:
        action = str(payload.get("action", ""))
        if event not in self.events and f"{event}.{action}" not in self.events:
            return f"{event}.{action} is not among this trigger's events ({', '.join(self.events)})"
        if action == "labeled" and self.labels and (payload.get("label") or {}).get("name") not in self.labels:
            return f"the label added is not one of {', '.join(self.labels)}"
        if event in ("check_run", "check_suite", "workflow_run"):
            conclusion = (payload.get(event) or {}).get("conclusion")
            if conclusion not in FAILED:
                return f"the {event} did not fail (conclusion {conclusion!r})"
        if event == "issue_comment" and self.command:
            if not str((payload.get("comment") or {}).get("body", "")).lstrip().startswith(self.command):
                return f"the comment does not start with {self.command}"
        return ""

    def _spec(self, spec: LoopSpec, details: dict[str, Any]) -> LoopSpec:
        """The loop as this event runs it: from the event's head commit, its text in the goal's placeholders."""
        changes: dict[str, Any] = {"goal": fill(spec.goal, details)}
        if details.get("head_sha"):
            fetch = f"refs/pull/{details['number']}/head" if details.get("pull_request") else details.get("head_ref")
            changes["workspace"] = spec.workspace.model_copy(update={
                "ref": details["head_sha"], "remote": self.remote, "fetch": fetch})
        return spec.model_copy(update=changes)


def fill(text: str, event: dict[str, Any]) -> str:
    """`{{ event.<field> }}` in `text` replaced by that field of the event (empty when it has none)."""
    return PLACEHOLDER.sub(lambda m: str(event.get(m.group(1), "")), text)


def fields(event: str, payload: dict[str, Any], delivery: str) -> dict[str, Any]:
    """What a run may know of its event: in its trace's first event and as {{ event.<field> }} in the goal."""
    subject = payload.get("pull_request") or payload.get("issue") or {}
    run = payload.get("check_run") or payload.get("workflow_run") or payload.get("check_suite") or {}
    head = (payload.get("pull_request") or {}).get("head") or {}
    found = {
        "event": event, "action": payload.get("action", ""), "delivery": delivery,
        "repository": (payload.get("repository") or {}).get("full_name", ""),
        "sender": (payload.get("sender") or {}).get("login", ""),
        "number": subject.get("number") or payload.get("number"),
        "pull_request": bool(payload.get("pull_request") or (payload.get("issue") or {}).get("pull_request")),
        "title": str(subject.get("title") or run.get("name") or "")[:300],
        "body": str(subject.get("body") or "")[:TEXT_LIMIT],
        "url": subject.get("html_url") or run.get("html_url") or "",
        "head_ref": head.get("ref") or run.get("head_branch") or (run.get("check_suite") or {}).get("head_branch") or "",
        "head_sha": head.get("sha") or run.get("head_sha") or "",
        "comment": str((payload.get("comment") or {}).get("body") or "")[:TEXT_LIMIT],
        "label": (payload.get("label") or {}).get("name", ""),
    }
    if not found["number"] and run.get("pull_requests"):
        found["number"], found["pull_request"] = run["pull_requests"][0].get("number"), True
    return {k: v for k, v in found.items() if v not in ("", None)}


# --- out: what a run's end sends to GitHub ------------------------------------------------------------


class Publisher:
    """One run's end, sent to GitHub. Each effect is recorded in the run's trace once done, so the hook,
    which may fire again after a crash, does it once."""

    def __init__(self, run: RunInfo, outcome: Outcome, host: PluginHost, config: GitHubSpec):
        self.run, self.outcome, self.host, self.config = run, outcome, host, config
        self.store = host.store
        trigger = self.store.event(run.id, "trigger")
        self.event: dict[str, Any] = trigger["data"] if trigger else {}
        self.token = self._token()
        self.api = os.environ.get("GITHUB_API_URL", API_URL).rstrip("/")

    def _token(self) -> str:
        if self.config.token_file:
            try:
                return Path(self.config.token_file).expanduser().read_text().strip()
            except OSError as error:
                log.warning("run %s: cannot read the GitHub token file %s (%s)", self.run.id, self.config.token_file,
                            type(error).__name__)
                return ""
        return os.environ.get(self.config.token_env, "").strip()

    def publish(self) -> None:
        if not self.token:
            log.warning("run %s: nothing sent to GitHub: no token in %s", self.run.id,
                        self.config.token_file or f"${self.config.token_env}")
            return
        repo = self.config.repo or self._repo_from_remote()
        if not repo:
            log.warning("run %s: nothing sent to GitHub: give [github] repo = \"owner/name\" (the remote %r is "
                        "not a github.com URL)", self.run.id, self.config.remote)
            return
        import httpx2  # here, not at start-up

        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/vnd.github+json",
                   "X-GitHub-Api-Version": "2022-11-28", "User-Agent": "loopwright"}
        with httpx2.Client(base_url=self.api, headers=headers, timeout=30) as self.http:
            self.repo = repo
            for effect in (self._push_and_pull_request, self._comment, self._status):
                try:
                    effect()
                except Exception as error:  # one refused call must not keep the others from being made
                    log.warning("run %s: GitHub: %s", self.run.id, self._safe(str(error)))

    def _once(self, key: str, do: Any) -> None:
        if self.store.event(self.run.id, key) is None:
            self.store.add_event(self.run.id, key, "github", self.outcome.iterations, do())

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            body = response.json() if "json" in response.headers.get("content-type", "") else {}
            message = body.get("message", "") if isinstance(body, dict) else ""
            raise RuntimeError(f"{method} {path} answered {response.status_code} {message}".strip())
        return response.json() if response.content else {}

    def _safe(self, text: str) -> str:
        return text.replace(self.token, "***") if self.token else text

    # The effects.

    @property
    def branch(self) -> str:
        """The branch on the remote: one per loop, or per pull request or issue when one started the run."""
        number = self.event.get("number")
        kind = "pr" if self.event.get("pull_request") else "issue"
        return f"loopwright/{self.run.loop}" + (f"/{kind}-{number}" if number else "")

    def _push_and_pull_request(self) -> None:
        if self.outcome.status not in self.config.on or not self.config.push:
            return
        commit = self.outcome.commit or self.store.get_run(self.run.id).commit_sha
        if not commit:
            return
        self._once("github.push", lambda: self._push(commit))
        if self.config.pull_request:
            self._once("github.pull_request", self._pull_request)

    def _push(self, commit: str) -> dict[str, Any]:
        repo = self.store.get_run(self.run.id).repo
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | {"GIT_TERMINAL_PROMPT": "0"}
        url = self._remote_url("--push")
        if url.startswith("https://") and urlsplit(url).hostname in self._github_hosts():
            # The loop's token only, and only to GitHub: in git's environment, never on a command line.
            basic = base64.b64encode(f"x-access-token:{self.token}".encode()).decode()
            env |= {"GIT_CONFIG_COUNT": "2", "GIT_CONFIG_KEY_0": "credential.helper", "GIT_CONFIG_VALUE_0": "",
                    "GIT_CONFIG_KEY_1": f"http.{url}.extraheader", "GIT_CONFIG_VALUE_1": f"Authorization: Basic {basic}"}
        pushed = subprocess.run(["git", "-c", "core.hooksPath=/dev/null", "-C", repo, "push", "--force", "--quiet",
                                 self.config.remote, f"{commit}:refs/heads/{self.branch}"],
                                capture_output=True, text=True, env=env)
        if pushed.returncode != 0:
            raise RuntimeError(f"git push to {self.config.remote} failed: {self._safe(pushed.stderr.strip())}")
        return {"pushed": self.branch, "commit": commit, "remote": self.config.remote}

    def _github_hosts(self) -> set[str]:
        """Where the token may go with a push: github.com, or the GitHub Enterprise host the API is on."""
        api = urlsplit(self.api).hostname
        return {"github.com"} | ({api} if api and api != "api.github.com" else set())

    def _pull_request(self) -> dict[str, Any]:
        owner = self.repo.split("/")[0]
        body = self._body()
        title = f"{self.run.loop}: {self.run.spec.goal.splitlines()[0][:100]}"
        found = self._call("GET", f"/repos/{self.repo}/pulls", params={"head": f"{owner}:{self.branch}", "state": "open"})
        if found:
            number = found[0]["number"]
            self._call("PATCH", f"/repos/{self.repo}/pulls/{number}", json={"title": title, "body": body})
            return {"pull_request": number, "updated": True}
        base = fill(self.config.base or "", self.event) or self._call("GET", f"/repos/{self.repo}").get("default_branch", "main")
        made = self._call("POST", f"/repos/{self.repo}/pulls",
                          json={"title": title, "head": self.branch, "base": base, "body": body})
        return {"pull_request": made.get("number"), "url": made.get("html_url", ""), "updated": False}

    def _comment(self) -> None:
        if self.config.comment and self.event.get("number"):
            self._once("github.comment", lambda: {"comment": self._call(
                "POST", f"/repos/{self.repo}/issues/{self.event['number']}/comments",
                json={"body": self._written() + self._body()}).get("id")})

    def _written(self) -> str:
        """`comment_file` as the run's final tree holds it (a review the maker wrote), if any."""
        row = self.store.get_run(self.run.id)
        if not self.config.comment_file or not row.commit_sha:
            return ""
        shown = subprocess.run(["git", "-C", row.repo, "show", f"{row.commit_sha}:{self.config.comment_file}"],
                               capture_output=True, text=True)
        return shown.stdout[:60_000].rstrip() + "\n\n---\n\n" if shown.returncode == 0 and shown.stdout.strip() else ""

    def _status(self) -> None:
        if self.config.status and self.event.get("head_sha"):
            self._once("github.status", self._set_status)

    def _set_status(self) -> dict[str, Any]:
        state = {"succeeded": "success", "error": "error"}.get(self.outcome.status, "failure")
        self._call("POST", f"/repos/{self.repo}/statuses/{self.event['head_sha']}", json={
            "state": state, "context": f"loopwright/{self.run.loop}",
            "description": f"{self.outcome.status}: {self.outcome.reason}"[:140]})
        return {"status": state, "sha": self.event["head_sha"]}

    def _body(self) -> str:
        """The goal, the verdict of each iteration, the cost, where the work is."""
        row = self.store.get_run(self.run.id)
        verdicts = [e["data"] for e in self.store.all_events(self.run.id) if e["kind"] == "verdict"]
        lines = [f"**{self.run.loop}** run `{self.run.id}`: **{self.outcome.status}** ({self.outcome.reason})", "",
                 "Goal:", "", *[f"> {line}" for line in self.run.spec.goal.splitlines()], "", "| iteration | verdict |",
                 "|---|---|"]
        from loopwright.runtime.types import Verdict

        lines += [f"| {v['iteration']} | {Verdict.from_dict(v).headline} |" for v in verdicts] or ["| - | no verdict |"]
        lines += ["", f"Cost: ${row.spent_usd:.4f} of ${self.run.spec.stop.max_cost_usd:.2f} · branch "
                      f"`{self.branch}`" + (f" · commit {row.commit_sha[:10]}" if row.commit_sha else "")]
        return "\n".join(lines)

    def _remote_url(self, *options: str) -> str:
        repo = self.store.get_run(self.run.id).repo
        return subprocess.run(["git", "-C", repo, "remote", "get-url", *options, self.config.remote],
                              capture_output=True, text=True).stdout.strip()

    def _repo_from_remote(self) -> str:
        match = re.search(r"github\.com[:/]([^/]+/[^/]+?)(?:\.git)?/?$", self._remote_url())
        return match.group(1) if match else ""


@hookimpl(trylast=True)
def loopwright_register_automations(register):
    register("github", GitHubTrigger)


@hookimpl
def loopwright_run_finished(run: RunInfo, outcome: Outcome, host: PluginHost) -> None:
    if run.spec.github is not None:
        Publisher(run, outcome, host, run.spec.github).publish()
