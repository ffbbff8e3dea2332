"""The schema of the first release (made with create_all, before migrations): created unless it is there.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("loopwright_runs"):
        return  # a database the first release made: its tables are these
    String, Text, Integer, Float, Boolean = sa.String, sa.Text, sa.Integer, sa.Float, sa.Boolean

    def column(name, kind, nullable=False, **kwargs):
        return sa.Column(name, kind, nullable=nullable, **kwargs)

    op.create_table(
        "loopwright_runs",
        column("id", String, primary_key=True), column("loop", String, index=True), column("spec", Text),
        column("status", String, index=True), column("reason", Text), column("iteration", Integer),
        column("repo", Text), column("branch", Text), column("worktree", Text), column("base_commit", String),
        column("commit_sha", String), column("last_verdict", Text), column("stop_requested", Boolean),
        column("pause_requested", Boolean), column("paused_s", Float), column("stall_count", Integer),
        column("spent_usd", Float), column("owner", String), column("created_at", Float),
        column("started_at", Float, True), column("finished_at", Float, True),
    )
    op.create_table(
        "loopwright_events",
        column("seq", Integer, primary_key=True, autoincrement=True), column("run_id", String), column("key", String),
        column("at", Float), column("kind", String), column("iteration", Integer), column("data", Text),
        column("input_tokens", Integer), column("output_tokens", Integer), column("cache_write_tokens", Integer),
        column("cache_read_tokens", Integer), column("cost_usd", Float), column("duration_ms", Float),
        sa.UniqueConstraint("run_id", "key", name="loopwright_events_run_key"),
    )
    op.create_table(
        "loopwright_approvals",
        column("id", String, primary_key=True), column("run_id", String, index=True), column("iteration", Integer),
        column("tool", String), column("input", Text), column("rule", Text), column("status", String),
        column("note", Text), column("created_at", Float), column("expires_at", Float), column("decided_at", Float, True),
    )
    op.create_table(
        "loopwright_memory_notes",
        column("seq", Integer, primary_key=True, autoincrement=True), column("loop", String, index=True),
        column("run_id", String), column("iteration", Integer), column("note", Text), column("at", Float),
        sa.UniqueConstraint("run_id", "iteration", name="loopwright_memory_notes_run_iteration"),
    )
    op.create_table(
        "loopwright_memory_kv",
        column("loop", String, primary_key=True), column("key", String, primary_key=True), column("value", Text),
        column("run_id", String), column("updated_at", Float),
    )
    op.create_table(
        "loopwright_automations",
        column("id", String, primary_key=True), column("loop", String, index=True), column("name", String),
        column("kind", String), column("file", Text), column("settings", Text), column("state", Text),
        column("paused", Boolean), column("paused_reason", Text), column("updated_at", Float),
    )
    op.create_table(
        "loopwright_firings",
        column("key", String, primary_key=True), column("automation", String, index=True), column("loop", String),
        column("run_id", String, index=True), column("status", String), column("reason", Text), column("details", Text),
        column("due_at", Float), column("day", String), column("created_at", Float),
    )
