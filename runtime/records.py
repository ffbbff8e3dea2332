"""What a store reads back: a run and its totals, and the errors about them. No database code here:
runtime/store.py keeps them with SQLAlchemy; runtime/sqlite_reads.py reads a local SQLite store
without it, for commands that must answer at once (`loopwright runs`, `status`)."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple


class UnknownRun(LookupError):
    def __init__(self, run_id: str):
        super().__init__(f"no run with id {run_id!r}: list runs with `loopwright runs` or the list_runs tool")


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


@dataclass
class Run:
    id: str
    loop: str
    spec: dict[str, Any]
    status: str
    reason: str
    iteration: int
    repo: str
    branch: str
    worktree: str
    base_commit: str
    commit_sha: str
    last_verdict: dict[str, Any] | None
    stop_requested: bool
    pause_requested: bool
    paused_s: float
    stall_count: int
    spent_usd: float
    owner: str
    created_at: float
    started_at: float | None
    finished_at: float | None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


@dataclass
class RoleSpend:
    """What one role (the maker, a reviewer) spent on one model in a run."""

    role: str
    model: str
    calls: int
    cost_usd: float


def spend_by_role(calls: list[tuple[str, float]]) -> list[RoleSpend]:
    """Model calls, as (their event's data as JSON, cost), summed per role and model, dearest first."""
    spent: dict[tuple[str, str], RoleSpend] = {}
    for data, cost in calls:
        fields = json.loads(data)
        key = (fields.get("role", "maker"), fields.get("model", "?"))
        row = spent.setdefault(key, RoleSpend(*key, 0, 0.0))
        row.calls += 1
        row.cost_usd += cost
    return sorted(spent.values(), key=lambda row: -row.cost_usd)


@dataclass
class Totals:
    cost_usd: float
    input_tokens: int
    output_tokens: int
    cache_write_tokens: int
    cache_read_tokens: int
    model_calls: int
    tool_calls: int


class RunState(NamedTuple):
    """What the stop rules read of a run before each step (a few columns, not the spec)."""
    stop_requested: bool
    pause_requested: bool
    started_at: float | None
    created_at: float
    paused_s: float
    spent_usd: float


def run_from_row(data: dict[str, Any]) -> Run:
    """A run from its row's columns, whichever driver read them."""
    data = dict(data)
    data["spec"] = json.loads(data["spec"])
    data["last_verdict"] = json.loads(data["last_verdict"]) if data["last_verdict"] else None
    for flag in ("stop_requested", "pause_requested"):
        data[flag] = bool(data[flag])
    return Run(**data)


def approval_from_row(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["input"] = json.loads(data["input"])
    return data
