"""Alembic's entry point for Loopwright's schema; runtime/store.py `migrate` calls it with an open connection."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table="loopwright_schema_version")
with context.begin_transaction():
    context.run_migrations()
