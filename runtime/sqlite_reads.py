"""The reads `loopwright runs` and `loopwright status` need, from a local SQLite store, with the standard
library's sqlite3: importing SQLAlchemy alone takes longer than those commands may (bench/cli.py).

Only reads, on a read-only connection, of the tables runtime/store.py defines (their names and
columns are its schema; tests/test_store_reads.py checks both agree). Any other use goes through
the Store.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from .records import RoleSpend, Run, Totals, UnknownRun, approval_from_row, run_from_row, spend_by_role

SQLITE_URL = "sqlite:///"


class SqliteReads:
    def __init__(self, path: Path):
        self.path = path

    def _rows(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        if not self.path.exists():  # a fresh home: nothing has run yet
            return []
        with sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30) as db:
            db.row_factory = sqlite3.Row
            try:
                return [dict(row) for row in db.execute(sql, params)]
            except sqlite3.OperationalError as error:
                if "no such table" in str(error):  # a home whose store was never written
                    return []
                raise

    def get_run(self, run_id: str) -> Run:
        rows = self._rows("SELECT * FROM loopwright_runs WHERE id = ?", (run_id,))
        if not rows:
            raise UnknownRun(run_id)
        return run_from_row(rows[0])

    def list_runs(self, loop: str | None = None, status: str | None = None, limit: int = 50) -> list[Run]:
        where = " AND ".join(["1 = 1", *(["loop = ?"] if loop else []), *(["status = ?"] if status else [])])
        params = tuple(v for v in (loop, status) if v) + (limit,)
        return [run_from_row(r) for r in self._rows(
            f"SELECT * FROM loopwright_runs WHERE {where} ORDER BY created_at DESC LIMIT ?", params)]

    def totals(self, run_id: str, through: int | None = None) -> Totals:
        rows = self._rows(
            "SELECT COALESCE(SUM(cost_usd), 0.0), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), "
            "COALESCE(SUM(cache_write_tokens), 0), COALESCE(SUM(cache_read_tokens), 0), "
            "COUNT(*) FILTER (WHERE kind = 'model_call'), COUNT(*) FILTER (WHERE kind = 'tool_call') "
            "FROM loopwright_events WHERE run_id = ? AND iteration <= COALESCE(?, iteration)", (run_id, through))
        return Totals(*rows[0].values()) if rows else Totals(0.0, 0, 0, 0, 0, 0, 0)

    def spend_by_role(self, run_id: str) -> list[RoleSpend]:
        return spend_by_role([(r["data"], r["cost_usd"]) for r in self._rows(
            "SELECT data, cost_usd FROM loopwright_events WHERE run_id = ? AND kind = 'model_call' ORDER BY seq",
            (run_id,))])

    def list_approvals(self, run_id: str | None = None, pending_only: bool = True) -> list[dict[str, Any]]:
        where = " AND ".join(["1 = 1", *(["run_id = ?"] if run_id else []), *(["status = 'pending'"] if pending_only else [])])
        return [approval_from_row(r) for r in self._rows(
            f"SELECT * FROM loopwright_approvals WHERE {where} ORDER BY created_at", (run_id,) if run_id else ())]


def reads_for(url: str) -> SqliteReads | None:
    """A reader for a local SQLite store's URL; None for any other database."""
    return SqliteReads(Path(url[len(SQLITE_URL):])) if url.startswith(SQLITE_URL) else None
