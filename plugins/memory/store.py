"""The memory plugin's database: the loops' notes and key-value memory, beside the runs."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from loopwright.runtime.context import first_line
from loopwright.runtime.store import UnknownRun, memory_kv, memory_notes

from . import KEEP_NOTES


def add_note(engine: sa.Engine, loop: str, run_id: str, iteration: int, note: str) -> None:
    """Once per (run, iteration): a verdict hook that re-runs after a crash adds nothing."""
    c = memory_notes.c
    with engine.begin() as db:
        if db.execute(sa.select(c.seq).where(c.run_id == run_id, c.iteration == iteration)).first():
            return
        db.execute(memory_notes.insert().values(loop=loop, run_id=run_id, iteration=iteration, note=note,
                                                at=time.time()))
        cutoff = db.execute(sa.select(c.seq).where(c.loop == loop).order_by(c.seq.desc())
                            .offset(KEEP_NOTES).limit(1)).scalar()
        if cutoff is not None:
            db.execute(memory_notes.delete().where(c.loop == loop, c.seq <= cutoff))


def earlier_notes(store: Any, loop: str, run_id: str, most: int) -> tuple[list[str], int]:
    """The newest `most` lines of the loop's notes from other runs, oldest first, with each run's
    outcome after its last note; and how many older notes there are besides."""
    c = memory_notes.c
    others = sa.and_(c.loop == loop, c.run_id != run_id)
    with store.engine.connect() as db:
        total = db.execute(sa.select(sa.func.count()).where(others)).scalar() or 0
        rows = list(db.execute(sa.select(c.run_id, c.iteration, c.note).where(others)
                               .order_by(c.seq.desc()).limit(most)))
    rows.reverse()
    lines = []
    for index, (rid, _iteration, note) in enumerate(rows):
        lines.append(f"- run {rid}, {note}")
        if index + 1 == len(rows) or rows[index + 1][0] != rid:
            lines += _outcome(store, rid)
    return lines, total - len(rows)


def _outcome(store: Any, run_id: str) -> list[str]:
    try:
        run = store.get_run(run_id)
    except UnknownRun:
        return []
    if not run.finished:
        return []
    return [f"- run {run_id} ended {run.status}: {first_line(run.reason, 200)}"]




class KvStore:
    """One loop's keys and values, with the caps the maker is told about when it exceeds them."""

    def __init__(self, engine: sa.Engine, loop: str, run_id: str, max_keys: int, max_value_chars: int):
        self.engine = engine
        self.loop = loop
        self.run_id = run_id
        self.max_keys = max_keys
        self.max_value_chars = max_value_chars

    def _where(self, key: str | None = None) -> Any:
        condition = memory_kv.c.loop == self.loop
        return condition if key is None else sa.and_(condition, memory_kv.c.key == key)

    def keys(self) -> list[tuple[str, int, str]]:
        c = memory_kv.c
        query = sa.select(c.key, sa.func.length(c.value), c.run_id).where(self._where()).order_by(c.key)
        with self.engine.connect() as db:
            return [tuple(row) for row in db.execute(query)]

    def get(self, key: str) -> str | None:
        with self.engine.connect() as db:
            return db.execute(sa.select(memory_kv.c.value).where(self._where(key))).scalar()

    def set(self, key: str, value: str) -> str:
        if len(value) > self.max_value_chars:
            raise ValueError(f"the value has {len(value)} characters; the limit is {self.max_value_chars}. "
                             "Store a shorter summary, or split it over several keys.")
        for attempt in range(2):  # two runs of the loop may set a new key at once; the second retries
            try:
                with self.engine.begin() as db:
                    existed = db.execute(memory_kv.delete().where(self._where(key))).rowcount > 0
                    if not existed:
                        count = db.execute(sa.select(sa.func.count()).where(self._where())).scalar() or 0
                        if count >= self.max_keys:
                            raise ValueError(f"the memory is full ({count} keys, the limit is {self.max_keys}); "
                                             "delete a key with memory_delete or overwrite one")
                    db.execute(memory_kv.insert().values(loop=self.loop, key=key, value=value, run_id=self.run_id,
                                                         updated_at=time.time()))
                return "replaced" if existed else "stored"
            except sa.exc.IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def delete(self, key: str) -> bool:
        with self.engine.begin() as db:
            return db.execute(memory_kv.delete().where(self._where(key))).rowcount > 0
