"""Schema changes go through migrations (runtime/migrations, alembic): an upgrade keeps every run."""

from __future__ import annotations

import json
import threading

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from loopwright.runtime.store import MIGRATIONS, SCHEMA_VERSION, Store, metadata


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def schema_differences(engine: sa.Engine) -> list:
    """What the database lacks or has more than store.py's tables (DBOS's own tables aside)."""
    with engine.connect() as db:
        found = compare_metadata(MigrationContext.configure(db), metadata)
    return [d for d in found if not (d[0] == "remove_table" and not d[1].name.startswith("loopwright_"))
            and not (d[0] == "remove_table" and d[1].name == "loopwright_schema_version")]


def test_the_schema_version_is_the_newest_migration_and_matches_the_tables(database):
    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == SCHEMA_VERSION
    store = Store(database)
    assert schema_differences(store.engine) == []


def test_a_database_of_the_first_release_is_upgraded_with_its_runs(database):
    """The first release made its tables with create_all and kept no version: such a database, with a
    finished run and its trace, opens in this release with both intact and the newer tables added."""
    engine = sa.create_engine(database.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as db:
        config = alembic_config()
        config.attributes["connection"] = db
        command.upgrade(config, "0001")
        db.execute(sa.text("DROP TABLE loopwright_schema_version"))  # as create_all left it
        assert not sa.inspect(db).has_table("loopwright_executors")
        db.execute(sa.text(
            "INSERT INTO loopwright_runs (id, loop, spec, status, reason, iteration, repo, branch, worktree, base_commit,"
            " commit_sha, last_verdict, stop_requested, pause_requested, paused_s, stall_count, spent_usd, owner,"
            " created_at, finished_at) VALUES ('20260101-000000-aaaaaa', 'fix', :spec, 'succeeded', 'checks passed', 2,"
            " '/repo', 'loopwright/fix/1', '', 'abc', 'def', '', false, false, 0, 0, 0.42, '', 1.0, 2.0)"),
            {"spec": json.dumps({"name": "fix"})})
        db.execute(sa.text(
            "INSERT INTO loopwright_events (run_id, key, at, kind, iteration, data, input_tokens, output_tokens,"
            " cache_write_tokens, cache_read_tokens, cost_usd, duration_ms) VALUES"
            " ('20260101-000000-aaaaaa', '1.model.1', 1.5, 'model_call', 1, '{}', 100, 10, 0, 0, 0.42, 5)"))
    engine.dispose()

    store = Store(database)
    run = store.get_run("20260101-000000-aaaaaa")
    assert (run.status, run.reason, run.iteration, run.spent_usd) == ("succeeded", "checks passed", 2, 0.42)
    assert store.totals(run.id).cost_usd == 0.42
    store.beat("host:1:1")  # a table the first release did not have
    assert store.last_beat("host:1:1") is not None
    assert schema_differences(store.engine) == []


def test_processes_starting_together_on_a_new_database_migrate_it_once(database):
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            Store(database).get_run  # noqa: B018 (opening is the test)
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with Store(database).engine.connect() as db:
        assert db.execute(sa.text("SELECT version_num FROM loopwright_schema_version")).scalars().all() == [SCHEMA_VERSION]
