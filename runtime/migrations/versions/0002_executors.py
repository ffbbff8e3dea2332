"""Heartbeats: every process that executes runs says it is alive, so another machine can tell a dead one's runs.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "loopwright_executors",
        sa.Column("owner", sa.String, primary_key=True),
        sa.Column("beat_at", sa.Float, nullable=False),
    )
