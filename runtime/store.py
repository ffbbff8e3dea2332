"""Runs and their traces, in the same database as the durable workflows (SQLite or Postgres)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .records import RoleSpend, Run, RunState, Totals, UnknownRun, approval_from_row, new_run_id, run_from_row, spend_by_role

__all__ = ["Run", "Store", "Totals", "UnknownRun", "new_run_id"]  # the records, for those who read them from here

metadata = sa.MetaData()

runs = sa.Table(
    "loopwright_runs",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("loop", sa.String, nullable=False, index=True),
    sa.Column("spec", sa.Text, nullable=False),  # JSON of the validated LoopSpec
    sa.Column("status", sa.String, nullable=False, index=True),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("iteration", sa.Integer, nullable=False, default=0),
    sa.Column("repo", sa.Text, nullable=False),
    sa.Column("branch", sa.Text, nullable=False),
    sa.Column("worktree", sa.Text, nullable=False, default=""),
    sa.Column("base_commit", sa.String, nullable=False, default=""),
    sa.Column("commit_sha", sa.String, nullable=False, default=""),
    sa.Column("last_verdict", sa.Text, nullable=False, default=""),
    sa.Column("stop_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("pause_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("paused_s", sa.Float, nullable=False, default=0.0),  # not counted against max_wall_time
    sa.Column("stall_count", sa.Integer, nullable=False, default=0),
    sa.Column("spent_usd", sa.Float, nullable=False, default=0.0),  # kept with the trace, read before each call
    sa.Column("owner", sa.String, nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
)

events = sa.Table(
    "loopwright_events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("key", sa.String, nullable=False),  # makes writes from re-run steps idempotent
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("iteration", sa.Integer, nullable=False, default=0),
    sa.Column("data", sa.Text, nullable=False, default="{}"),
    sa.Column("input_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("output_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("cache_write_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("cache_read_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("cost_usd", sa.Float, nullable=False, default=0.0),
    sa.Column("duration_ms", sa.Float, nullable=False, default=0.0),
    sa.UniqueConstraint("run_id", "key", name="loopwright_events_run_key"),
)


approvals = sa.Table(
    "loopwright_approvals",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("run_id", sa.String, nullable=False, index=True),
    sa.Column("iteration", sa.Integer, nullable=False),
    sa.Column("tool", sa.String, nullable=False),
    sa.Column("input", sa.Text, nullable=False),
    sa.Column("rule", sa.Text, nullable=False),
    sa.Column("status", sa.String, nullable=False),  # pending, allowed, denied, timed_out
    sa.Column("note", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("decided_at", sa.Float),
)

# Memory scoped to a loop, so a later run of the loop reads what an earlier one left (plugins/memory.py).
memory_notes = sa.Table(
    "loopwright_memory_notes",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("loop", sa.String, nullable=False, index=True),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("iteration", sa.Integer, nullable=False),
    sa.Column("note", sa.Text, nullable=False),  # one line: what the iteration tried and what the checks said
    sa.Column("at", sa.Float, nullable=False),
    sa.UniqueConstraint("run_id", "iteration", name="loopwright_memory_notes_run_iteration"),
)

memory_kv = sa.Table(
    "loopwright_memory_kv",
    metadata,
    sa.Column("loop", sa.String, primary_key=True),
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("run_id", sa.String, nullable=False),  # the run that wrote it last
    sa.Column("updated_at", sa.Float, nullable=False),
)

# Automations (runtime/automations.py): each [[trigger]] of a loop, its checkpoint and pause state,
# and every firing, keyed so that a firing repeated after a crash or by a second daemon is one firing.
automations = sa.Table(
    "loopwright_automations",
    metadata,
    sa.Column("id", sa.String, primary_key=True),  # <loop>/<trigger name>
    sa.Column("loop", sa.String, nullable=False, index=True),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("file", sa.Text, nullable=False, default=""),  # the loop spec it was read from
    sa.Column("settings", sa.Text, nullable=False, default="{}"),  # the [[trigger]] table, as JSON
    sa.Column("state", sa.Text, nullable=False, default="{}"),  # the kind's checkpoint, as JSON
    sa.Column("paused", sa.Boolean, nullable=False, default=False),
    sa.Column("paused_reason", sa.Text, nullable=False, default=""),
    sa.Column("updated_at", sa.Float, nullable=False),
)

firings = sa.Table(
    "loopwright_firings",
    metadata,
    sa.Column("key", sa.String, primary_key=True),  # <automation id>:<the kind's key, e.g. the due time>
    sa.Column("automation", sa.String, nullable=False, index=True),
    sa.Column("loop", sa.String, nullable=False),
    sa.Column("run_id", sa.String, nullable=False, index=True),  # the run it starts (or would have)
    sa.Column("status", sa.String, nullable=False),  # pending, started, skipped, failed
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("details", sa.Text, nullable=False, default="{}"),
    sa.Column("due_at", sa.Float, nullable=False),  # when the trigger says it fired (the due time for cron)
    sa.Column("day", sa.String, nullable=False),  # UTC day of the firing, for daily budgets
    sa.Column("created_at", sa.Float, nullable=False),
)


# Every process that executes runs says it is alive here, so a process on another machine can tell a dead one's runs.
executors = sa.Table(
    "loopwright_executors",
    metadata,
    sa.Column("owner", sa.String, primary_key=True),  # <host>:<pid>:<start time>, as runs' `owner`
    sa.Column("beat_at", sa.Float, nullable=False),
)


# The engine's hot path, built once (building a statement costs more than running it on SQLite).
NO_NUMBERS = dict(input_tokens=0, output_tokens=0, cache_write_tokens=0, cache_read_tokens=0, cost_usd=0.0, duration_ms=0.0)
_THIS_EVENT = (events.c.run_id == sa.bindparam("b_run_id"), events.c.key == sa.bindparam("b_key"))
_SETTLE = events.update().where(*_THIS_EVENT)  # the columns to set are the parameters given
_EVENT_COST = sa.select(events.c.cost_usd).where(*_THIS_EVENT)
_ADD_SPEND = runs.update().where(runs.c.id == sa.bindparam("b_id")).values(spent_usd=runs.c.spent_usd + sa.bindparam("b_delta"))
_ATTEMPTS = (sa.select(events).where(events.c.run_id == sa.bindparam("run_id"), events.c.key >= sa.bindparam("key"),
                                     events.c.key < sa.bindparam("before")).order_by(events.c.seq))
_RUN_STATE = sa.select(*(runs.c[name] for name in RunState._fields)).where(runs.c.id == sa.bindparam("id"))


class Store:
    def __init__(self, url: str):
        if url.startswith("postgresql://"):  # the driver DBOS brings (psycopg 3), not SQLAlchemy's default psycopg2
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        self.engine = sa.create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._insert_event = _dialect_insert(self.engine)(events).on_conflict_do_nothing(
            index_elements=["run_id", "key"]).returning(events.c.seq)  # (a row count says nothing with psycopg)
        migrate(self.engine)

    def beat(self, owner: str) -> None:
        """`owner` is alive now."""
        insert = _dialect_insert(self.engine)(executors).values(owner=owner, beat_at=time.time())
        with self.engine.begin() as db:
            db.execute(insert.on_conflict_do_update(index_elements=["owner"], set_={"beat_at": time.time()}))

    def last_beat(self, owner: str) -> float | None:
        with self.engine.connect() as db:
            return db.execute(sa.select(executors.c.beat_at).where(executors.c.owner == owner)).scalar()

    def create_run(self, run_id: str, loop: str, spec: dict[str, Any], repo: str, branch: str) -> Run:
        """Create a queued run; a run that already has this id is returned as it is (automations
        choose deterministic ids, so a firing repeated after a crash creates no second run)."""
        insert = _dialect_insert(self.engine)(runs).values(
            id=run_id, loop=loop, spec=json.dumps(spec), status="queued", reason="", iteration=0,
            repo=repo, branch=branch, worktree="", base_commit="", commit_sha="", last_verdict="",
            stop_requested=False, pause_requested=False, paused_s=0.0, stall_count=0, spent_usd=0.0, owner="",
            created_at=time.time(),
        ).on_conflict_do_nothing(index_elements=["id"])
        with self.engine.begin() as db:
            db.execute(insert)
        return self.get_run(run_id)

    def get_run(self, run_id: str) -> Run:
        with self.engine.connect() as db:
            row = db.execute(runs.select().where(runs.c.id == run_id)).first()
        if row is None:
            raise UnknownRun(run_id)
        return run_from_row(row._mapping)

    def list_runs(self, loop: str | None = None, status: str | None = None, limit: int = 50) -> list[Run]:
        query = runs.select().order_by(runs.c.created_at.desc()).limit(limit)
        if loop:
            query = query.where(runs.c.loop == loop)
        if status:
            query = query.where(runs.c.status == status)
        with self.engine.connect() as db:
            return [run_from_row(row._mapping) for row in db.execute(query)]

    def update_run(self, run_id: str, **values: Any) -> None:
        if "last_verdict" in values and isinstance(values["last_verdict"], dict):
            values["last_verdict"] = json.dumps(values["last_verdict"])
        with self.engine.begin() as db:
            db.execute(runs.update().where(runs.c.id == run_id).values(**values))

    # --- approvals ----------------------------------------------------------------------------

    def add_approval(self, approval_id: str, run_id: str, iteration: int, tool: str, input: dict[str, Any],
                     rule: str, timeout_s: float) -> None:
        """A pending approval, and its run `waiting_approval`, in one transaction: no reader sees a run that
        says `running` with a call waiting for a person."""
        now = time.time()
        with self.engine.begin() as db:
            if db.execute(sa.select(approvals.c.id).where(approvals.c.id == approval_id)).first() is None:
                db.execute(approvals.insert().values(
                    id=approval_id, run_id=run_id, iteration=iteration, tool=tool, input=json.dumps(input),
                    rule=rule, status="pending", note="", created_at=now, expires_at=now + timeout_s,
                ))
            db.execute(runs.update().where(runs.c.id == run_id).values(status="waiting_approval"))

    def get_approval(self, approval_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as db:
            row = db.execute(approvals.select().where(approvals.c.id == approval_id)).first()
        return approval_from_row(row._mapping) if row else None

    def list_approvals(self, run_id: str | None = None, pending_only: bool = True) -> list[dict[str, Any]]:
        query = approvals.select().order_by(approvals.c.created_at)
        if run_id:
            query = query.where(approvals.c.run_id == run_id)
        if pending_only:
            query = query.where(approvals.c.status == "pending")
        with self.engine.connect() as db:
            return [approval_from_row(row._mapping) for row in db.execute(query)]

    def decide_approval(self, approval_id: str, status: str, note: str = "") -> bool:
        """Record a decision once; False when the approval was no longer pending."""
        with self.engine.begin() as db:
            result = db.execute(
                approvals.update()
                .where(approvals.c.id == approval_id, approvals.c.status == "pending")
                .values(status=status, note=note, decided_at=time.time())
            )
        return result.rowcount == 1

    # --- the trace ------------------------------------------------------------------------------

    def add_event(self, run_id: str, key: str, kind: str, iteration: int, data: dict[str, Any], **numbers: Any) -> bool:
        """Append to the trace once per key; a step that re-runs after a crash does not double it (False:
        the key was there already). A cost is added to the run's spend in the same transaction."""
        values = dict(run_id=run_id, key=key, at=time.time(), kind=kind, iteration=iteration,
                      data=json.dumps(data, default=str), **{**NO_NUMBERS, **numbers})
        with self.engine.begin() as db:
            added = db.execute(self._insert_event, values).first() is not None
            if added and numbers.get("cost_usd"):
                db.execute(_ADD_SPEND, {"b_id": run_id, "b_delta": numbers["cost_usd"]})
        return added

    def begin_event(self, run_id: str, key: str, kind: str, iteration: int, data: dict[str, Any], **numbers: Any) -> str:
        """Record a call before it is made, under the first key of `key`, `key#2`, `key#3`... still free: a
        call a crash interrupted stays in the trace (and its estimated cost in the spend) beside its retry.
        `settle_event` replaces the estimate with what the call did. Returns the key used."""
        attempt = 1
        while not self.add_event(run_id, key if attempt == 1 else f"{key}#{attempt}", kind, iteration, data, **numbers):
            attempt += 1
        return key if attempt == 1 else f"{key}#{attempt}"

    def settle_event(self, run_id: str, key: str, data: dict[str, Any], estimated: float | None = None,
                     **numbers: Any) -> None:
        """A begun event's outcome: its data and numbers replaced, the spend corrected (by the cost it was
        begun with, `estimated` when the caller knows it), in one transaction."""
        where = {"b_run_id": run_id, "b_key": key}
        with self.engine.begin() as db:
            if estimated is None and "cost_usd" in numbers:
                estimated = db.execute(_EVENT_COST, where).scalar_one()
            db.execute(_SETTLE, {**where, "data": json.dumps(data, default=str), **numbers})
            if "cost_usd" in numbers and numbers["cost_usd"] != estimated:
                db.execute(_ADD_SPEND, {"b_id": run_id, "b_delta": numbers["cost_usd"] - estimated})

    def step_state(self, run_id: str, key: str | None) -> tuple[list[dict[str, Any]], RunState]:
        """What a step of the engine reads first, in one go: the events of its attempts, oldest first (`key`,
        then `key#2`, `key#3`...: see begin_event; none looked for when `key` is None), and its run's state."""
        with self.engine.connect() as db:
            found = [] if key is None else [dict(row._mapping) for row in db.execute(
                _ATTEMPTS, {"run_id": run_id, "key": key, "before": f"{key}$"})]  # '#' < '$': one index range
            row = db.execute(_RUN_STATE, {"id": run_id}).first()
        if row is None:
            raise UnknownRun(run_id)
        for event in found:
            event["data"] = json.loads(event["data"])
        return found, RunState(bool(row.stop_requested), bool(row.pause_requested), *row[2:])

    def step_keys(self, run_id: str) -> set[str]:
        """The keys of every step a run has begun (a retry's `key#n` as its `key`)."""
        with self.engine.connect() as db:
            return {key.split("#")[0] for key in db.execute(sa.select(events.c.key).where(events.c.run_id == run_id)).scalars()}

    def event(self, run_id: str, key: str) -> dict[str, Any] | None:
        """One event of a run's trace by its key, or None."""
        with self.engine.connect() as db:
            row = db.execute(sa.select(events).where(events.c.run_id == run_id, events.c.key == key)).first()
        if row is None:
            return None
        found = dict(row._mapping)
        found["data"] = json.loads(found["data"])
        return found

    def events(self, run_id: str, after: int = 0, limit: int = 100, newest: bool = False) -> list[dict[str, Any]]:
        query = sa.select(events).where(events.c.run_id == run_id)
        if newest:
            query = query.order_by(events.c.seq.desc()).limit(limit)
        else:
            query = query.where(events.c.seq > after).order_by(events.c.seq).limit(limit)
        with self.engine.connect() as db:
            rows = [dict(row._mapping) for row in db.execute(query)]
        if newest:
            rows.reverse()
        for row in rows:
            row["data"] = json.loads(row["data"])
        return rows

    def triggers_of(self, run_ids: list[str]) -> dict[str, str]:
        """The automation that started each of these runs (runs started by hand are not in it)."""
        query = sa.select(firings.c.run_id, firings.c.automation).where(firings.c.run_id.in_(run_ids),
                                                                         firings.c.status == "started")
        with self.engine.connect() as db:
            return {run_id: automation for run_id, automation in db.execute(query)}

    def automation_rows(self, day: str) -> list[dict[str, Any]]:
        """Every automation with the runs it started on `day` (UTC, YYYY-MM-DD) and what they spent."""
        started = (sa.select(firings.c.automation, sa.func.count().label("runs"),
                             sa.func.coalesce(sa.func.sum(runs.c.spent_usd), 0.0).label("spent_usd"))
                   .select_from(firings.join(runs, runs.c.id == firings.c.run_id))
                   .where(firings.c.day == day, firings.c.status == "started").group_by(firings.c.automation).subquery())
        query = (sa.select(automations, sa.func.coalesce(started.c.runs, 0).label("runs_today"),
                           sa.func.coalesce(started.c.spent_usd, 0.0).label("spent_today"))
                 .select_from(automations.outerjoin(started, started.c.automation == automations.c.id))
                 .order_by(automations.c.id))
        with self.engine.connect() as db:
            rows = [dict(row._mapping) for row in db.execute(query)]
        for row in rows:
            row["settings"] = json.loads(row["settings"])
        return rows

    def all_events(self, run_id: str) -> list[dict[str, Any]]:
        """A run's whole trace, oldest first."""
        found: list[dict[str, Any]] = []
        while batch := self.events(run_id, after=found[-1]["seq"] if found else 0, limit=1000):
            found += batch
        return found

    def totals(self, run_id: str, through: int | None = None) -> Totals:
        """The run's tokens, cost and calls; with `through`, only those of iterations up to that one."""
        c = events.c
        query = sa.select(
            sa.func.coalesce(sa.func.sum(c.cost_usd), 0.0),
            sa.func.coalesce(sa.func.sum(c.input_tokens), 0),
            sa.func.coalesce(sa.func.sum(c.output_tokens), 0),
            sa.func.coalesce(sa.func.sum(c.cache_write_tokens), 0),
            sa.func.coalesce(sa.func.sum(c.cache_read_tokens), 0),
            sa.func.count().filter(c.kind == "model_call"),
            sa.func.count().filter(c.kind == "tool_call"),
        ).where(c.run_id == run_id)
        if through is not None:
            query = query.where(c.iteration <= through)
        with self.engine.connect() as db:
            return Totals(*db.execute(query).one())

    def spend_by_role(self, run_id: str) -> list[RoleSpend]:
        c = events.c
        query = sa.select(c.data, c.cost_usd).where(c.run_id == run_id, c.kind == "model_call")
        with self.engine.connect() as db:
            return spend_by_role([tuple(row) for row in db.execute(query)])


SCHEMA_VERSION = "0002"  # the newest of runtime/migrations/versions
MIGRATIONS = Path(__file__).parent / "migrations"


def migrate(engine: sa.Engine) -> None:
    """Bring the database to SCHEMA_VERSION through the migrations, one process at a time; the runs,
    traces and automations in it are kept. A database already there costs one query (no alembic import)."""
    if _schema_version(engine) == SCHEMA_VERSION:
        return
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as db:
        if engine.dialect.name == "postgresql":  # two daemons starting on one database take turns
            db.execute(sa.text("SELECT pg_advisory_xact_lock(7417901)"))
        else:
            db.exec_driver_sql("BEGIN IMMEDIATE")
        config.attributes["connection"] = db
        command.upgrade(config, "head")


def _schema_version(engine: sa.Engine) -> str | None:
    with engine.connect() as db:
        if not sa.inspect(db).has_table("loopwright_schema_version"):
            return None
        return db.execute(sa.text("SELECT version_num FROM loopwright_schema_version")).scalar()


def _dialect_insert(engine: sa.Engine) -> Any:
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    deadline = time.monotonic() + 30
    # Once per database file, which keeps the mode. Setting it takes a lock and waits for none, so
    # connections opening a new file together take turns here.
    while cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives the process dying; a power cut may lose the last
    cursor.close()
