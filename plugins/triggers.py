"""Built-in automation kinds: `cron`, `webhook`, `watch` and `after` (docs/automations.md).

Each kind checks its settings when built (a wrong one is reported by `loopwright validate` and by
the daemon, with the setting and what was expected) and starts runs through `ctx.fire(key)`, whose
key makes the firing happen once: the due time, the signed delivery, the commit, the finished run.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import os
import re
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.types import OUTCOMES, Outcome, RunInfo, WebhookRequest, WebhookResponse

if TYPE_CHECKING:
    from loopwright.runtime.automations import Context, Fired
    from loopwright.runtime.spec import TriggerSpec

log = logging.getLogger(__name__)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SIGNATURE_HEADER = "x-loopwright-signature"
TIMESTAMP_HEADER = "x-loopwright-timestamp"
DELIVERY_HEADER = "x-loopwright-delivery"


def _settings(trigger: TriggerSpec, allowed: set[str]) -> dict[str, Any]:
    """The kind's own keys; an unknown one is an error, so a typo cannot switch a setting off."""
    extra = dict(trigger.model_extra or {})
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)} for a {trigger.kind!r} trigger; "
                         f"it takes {', '.join(sorted(allowed))}")
    return extra


def _duration(settings: dict[str, Any], key: str, default: str, least: float) -> float:
    from loopwright.runtime.spec import parse_duration

    try:
        seconds = parse_duration(settings.get(key, default))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{key}: {error}") from None
    if seconds < least:
        raise ValueError(f"{key}: at least {least} s, got {settings[key]!r}")
    return seconds


class Cron:
    """Fires at each time of a 5-field cron schedule. After downtime it fires once, for the latest
    due time it missed; a new schedule starts counting when the daemon first sees it."""

    def __init__(self, trigger: TriggerSpec):
        from croniter import croniter  # here, not at start-up

        settings = _settings(trigger, {"schedule", "timezone"})
        schedule = settings.get("schedule")
        if not isinstance(schedule, str) or len(schedule.split()) != 5 or not croniter.is_valid(schedule):
            raise ValueError(f"schedule: expected a 5-field cron expression such as '0 7 * * 1-5', got {schedule!r}")
        try:
            self.zone = ZoneInfo(str(settings.get("timezone", "UTC")))
        except (ZoneInfoNotFoundError, ValueError, OSError):  # a name too long for a file: OSError
            raise ValueError("timezone: expected an IANA name such as 'Europe/Paris', got "
                             f"{str(settings['timezone'])[:80]!r}") from None
        self.schedule = schedule

    def poll(self, ctx: Context) -> None:
        from croniter import croniter

        now = ctx.now()
        last = ctx.state.get("last_due")
        if last is None:
            ctx.save_state({"last_due": now.isoformat()})
            return
        if croniter(self.schedule, datetime.fromisoformat(last).astimezone(self.zone)).get_next(datetime) > now:
            return
        # The latest due time not after now (get_prev excludes its start, hence the microsecond).
        due = croniter(self.schedule, (now + timedelta(microseconds=1)).astimezone(self.zone)).get_prev(datetime)
        due = due.astimezone(timezone.utc)
        ctx.fire(due.isoformat(), when=due, details={"schedule": self.schedule, "due": due.isoformat()})
        ctx.save_state({"last_due": due.isoformat()})


class Webhook:
    """POST /hooks/<loop>/<name>, signed with HMAC-SHA256 over "<timestamp>.<raw body>"."""

    def __init__(self, trigger: TriggerSpec):
        settings = _settings(trigger, {"secret_env", "window"})
        self.secret_env = settings.get("secret_env")
        if not isinstance(self.secret_env, str) or not ENV_NAME.match(self.secret_env):
            raise ValueError("secret_env: expected the name of the environment variable that holds the secret "
                             f"(the secret itself never goes in the spec), got {self.secret_env!r}")
        self.window = _duration(settings, "window", "5m", 1)

    def handle(self, ctx: Context, request: WebhookRequest) -> WebhookResponse:
        secret = os.environ.get(self.secret_env, "")
        if not secret:
            return WebhookResponse(503, {"error": f"this webhook is not configured: the daemon's environment lacks "
                                                  f"{self.secret_env}, which holds its secret"})
        stamp = request.headers.get(TIMESTAMP_HEADER, "").strip()
        given = request.headers.get(SIGNATURE_HEADER, "").strip()
        expected = "sha256=" + hmac.new(secret.encode(), stamp.encode() + b"." + request.body, hashlib.sha256).hexdigest()
        if not stamp or not hmac.compare_digest(given.encode(), expected.encode()):
            return WebhookResponse(401, {"error": "bad or missing signature: send X-Loopwright-Timestamp (Unix "
                                                  "seconds) and X-Loopwright-Signature: sha256=<hex HMAC-SHA256 of "
                                                  "'<timestamp>.<raw body>' keyed with the trigger's secret>"})
        try:
            sent = datetime.fromtimestamp(int(stamp), timezone.utc)
        except (ValueError, OverflowError):
            return WebhookResponse(401, {"error": f"X-Loopwright-Timestamp must be Unix seconds, got {stamp!r}"})
        age = (ctx.now() - sent).total_seconds()
        if abs(age) > self.window:
            return WebhookResponse(401, {"error": f"the timestamp is {age:.0f} s from now, outside the {self.window:.0f} s "
                                                  "window: sign each request when you send it (old ones are refused as replays)"})
        details = {"delivery": request.headers.get(DELIVERY_HEADER, "")[:200], "body_bytes": len(request.body)}
        fired = ctx.fire(given.removeprefix("sha256="), when=sent, details=details)
        if fired.repeated:
            first = f"it started run {fired.run_id}" if fired.status == "started" else f"it was {fired.status}: {fired.reason}"
            return WebhookResponse(409, {"error": f"this request was delivered before ({first}): a replayed request "
                                                  "is refused; sign a new request to try again"})
        return answer(ctx, fired)


def answer(ctx: Context, fired: Fired) -> WebhookResponse:
    """A webhook's answer for a new firing: the run started (202), or why not."""
    if fired.status == "skipped":
        code = 423 if fired.reason.startswith("paused") else 429
        return WebhookResponse(code, {"error": f"no run started: {fired.reason}"})
    if fired.status == "failed":
        return WebhookResponse(500, {"error": f"the run could not be started: {fired.reason}"})
    return WebhookResponse(202, {"run_id": fired.run_id, "loop": ctx.automation.loop})


def _fingerprint(root: Path, patterns: list[str]) -> str:
    """A digest of the names, sizes and modification times of the files under `root` (not .git)."""
    entries = []
    if root.is_file():
        stat = root.stat()
        entries.append((root.name, stat.st_size, stat.st_mtime_ns))
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in files:
            path = Path(folder, name)
            relative = path.relative_to(root).as_posix()
            if patterns and not any(fnmatch.fnmatchcase(relative, p) for p in patterns):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((relative, stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(repr(sorted(entries)).encode()).hexdigest()


class Watch:
    """Fires when files under `path` change (once they hold still for one interval), or when `branch`
    gets a new commit. Changes made while no daemon ran fire once at the next start."""

    def __init__(self, trigger: TriggerSpec):
        settings = _settings(trigger, {"path", "pattern", "branch", "repo", "interval"})
        self.path, self.branch = settings.get("path"), settings.get("branch")
        if (self.path is None) == (self.branch is None):
            raise ValueError("give exactly one of 'path' (files to watch, relative to workspace.repo) "
                             "or 'branch' (a git branch whose new commits start runs)")
        for key in ("path", "branch", "repo"):
            if key in settings and not (isinstance(settings[key], str) and settings[key].strip()):
                raise ValueError(f"{key}: expected a non-empty string, got {settings[key]!r}")
        pattern = settings.get("pattern", [])
        self.patterns = [pattern] if isinstance(pattern, str) else pattern
        if not isinstance(self.patterns, list) or not all(isinstance(p, str) for p in self.patterns):
            raise ValueError(f"pattern: expected a glob or a list of globs such as '**/*.py', got {pattern!r}")
        if self.branch is not None and self.patterns:
            raise ValueError("pattern: only for a 'path' watch")
        self.repo = settings.get("repo", ".")
        self.interval = _duration(settings, "interval", "2s", 0.1)
        self._next_look = 0.0
        self._settling: str | None = None

    def _look(self, ctx: Context) -> str | None:
        repo = Path(ctx.spec.workspace.repo) / self.repo
        if self.branch is not None:
            found = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "-q", f"refs/heads/{self.branch}"],
                                   capture_output=True, text=True)
            return found.stdout.strip() or None
        return _fingerprint(repo / self.path, self.patterns)

    def poll(self, ctx: Context) -> None:
        if time.monotonic() < self._next_look:
            return
        self._next_look = time.monotonic() + self.interval
        current = self._look(ctx)
        state = ctx.state
        if current is None:
            return  # no such branch (yet)
        if "seen" not in state:
            ctx.save_state({"seen": current, "count": 0})  # the baseline: what is there at first sight
            return
        if current == state["seen"]:
            self._settling = None
            return
        if self.path is not None and self._settling != current:
            self._settling = current  # still changing, perhaps: fire when it holds still one interval
            return
        count = state.get("count", 0) + 1
        if self.branch is not None:
            fired = ctx.fire(f"commit:{current}", details={"branch": self.branch, "commit": current})
        else:
            fired = ctx.fire(f"change:{count}:{current[:16]}", details={"path": self.path})
        ctx.save_state({"seen": current, "count": count, "run_id": fired.run_id})
        self._settling = None


class After:
    """Fires when a run of `loop` ends (with one of `outcome`, if given): chaining."""

    def __init__(self, trigger: TriggerSpec):
        settings = _settings(trigger, {"loop", "outcome"})
        self.loop = settings.get("loop")
        if not isinstance(self.loop, str) or not self.loop:
            raise ValueError(f"loop: expected the name of the loop whose runs start this one, got {self.loop!r}")
        wanted = settings.get("outcome", [])
        self.outcomes = [wanted] if isinstance(wanted, str) else wanted
        if not isinstance(self.outcomes, list) or not set(self.outcomes) <= set(OUTCOMES):
            raise ValueError(f"outcome: expected one or a list of {', '.join(OUTCOMES)}, got {wanted!r}")

    def on_run_finished(self, ctx: Context, run: RunInfo, outcome: Outcome) -> None:
        if run.loop == self.loop and (not self.outcomes or outcome.status in self.outcomes):
            ctx.fire(f"run:{run.id}", details={"after_run": run.id, "after_loop": run.loop, "outcome": outcome.status})


@hookimpl(trylast=True)
def loopwright_register_automations(register):
    register("cron", Cron)
    register("webhook", Webhook)
    register("watch", Watch)
    register("after", After)
