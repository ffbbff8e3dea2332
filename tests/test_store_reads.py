"""`loopwright runs` and `status` read a local SQLite store without SQLAlchemy; they must read what the Store wrote."""

import time

import pytest

from loopwright.runtime.records import UnknownRun
from loopwright.runtime.sqlite_reads import SqliteReads, reads_for
from loopwright.runtime.store import Store


@pytest.fixture
def stores(tmp_path):
    path = tmp_path / "loopwright.sqlite"
    store = Store(f"sqlite:///{path}")
    for n, (loop, status) in enumerate([("a", "succeeded"), ("b", "running"), ("a", "failed")]):
        store.create_run(f"run-{n}", loop, {"name": loop, "stop": {"max_iterations": 3}}, "/repo", f"loopwright/{loop}/{n}")
        store.update_run(f"run-{n}", status=status, last_verdict={"passed": status == "succeeded", "checks": []},
                         stop_requested=status == "running", created_at=time.time() + n)
    store.add_event("run-1", "1.model.1", "model_call", 1, {"model": "m"}, input_tokens=10, output_tokens=5,
                    cache_write_tokens=3, cache_read_tokens=7, cost_usd=0.25)
    store.add_event("run-1", "1.tool.1", "tool_call", 1, {"tool": "t"}, duration_ms=4.0)
    store.add_event("run-1", "1.check.0.model", "model_call", 1, {"model": "r", "role": "reviewer"}, cost_usd=0.5)
    store.add_event("run-1", "2.model.1", "model_call", 2, {"model": "m", "role": "maker"}, output_tokens=2, cost_usd=0.125)
    store.create_run("run-3", "c", {"name": "c", "stop": {"max_iterations": 3}}, "/repo", "loopwright/c/3")
    store.add_approval("ap-1", "run-3", 1, "run_command", {"command": "rm -rf build"}, "run_command: rm *", 60)
    return store, reads_for(f"sqlite:///{path}")


def test_the_sqlite_reader_reads_what_the_store_wrote(stores):
    store, reads = stores
    assert isinstance(reads, SqliteReads)
    assert reads.get_run("run-1") == store.get_run("run-1")
    assert reads.list_runs() == store.list_runs()
    assert [r.id for r in reads.list_runs(loop="a")] == [r.id for r in store.list_runs(loop="a")] == ["run-2", "run-0"]
    assert reads.list_runs(status="running") == store.list_runs(status="running")
    assert [r.id for r in reads.list_runs(status="waiting_approval")] == ["run-3"]
    assert reads.list_runs(limit=1) == store.list_runs(limit=1)
    assert reads.totals("run-1") == store.totals("run-1")
    assert reads.totals("run-0") == store.totals("run-0")
    assert reads.totals("run-1", through=1) == store.totals("run-1", through=1) != store.totals("run-1")
    assert store.totals("run-1", through=1).cost_usd == 0.75
    assert reads.spend_by_role("run-1") == store.spend_by_role("run-1")
    assert [(r.role, r.model, r.calls, r.cost_usd) for r in store.spend_by_role("run-1")] == [
        ("reviewer", "r", 1, 0.5), ("maker", "m", 2, 0.375)]
    assert reads.list_approvals() == store.list_approvals()
    assert reads.list_approvals("run-3", pending_only=False) == store.list_approvals("run-3", pending_only=False)


def test_the_sqlite_reader_names_an_unknown_run_and_reads_a_fresh_home_as_empty(stores, tmp_path):
    _, reads = stores
    with pytest.raises(UnknownRun, match="no run with id 'nope'"):
        reads.get_run("nope")
    fresh = SqliteReads(tmp_path / "no-such.sqlite")
    assert fresh.list_runs() == [] and fresh.list_approvals() == []
    assert not (tmp_path / "no-such.sqlite").exists()  # reading created nothing
    assert reads_for("postgresql://db/loopwright") is None  # another database goes through the Store
