"""Workers and the trainer record a heartbeat (state, version, time) that health checks and the dashboard read.

Revision ID: 3b1e7c2d9f40
Revises: 6caf2d5b0298
Create Date: 2026-12-03 06:30:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "3b1e7c2d9f40"
down_revision: str | None = "6caf2d5b0298"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "process_heartbeats",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.String(length=500), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('worker', 'trainer')", name=op.f("ck_process_heartbeats_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_process_heartbeats")),
        sa.UniqueConstraint("role", "host", "pid", name=op.f("uq_process_heartbeats_role_host_pid")),
    )
    op.create_index(op.f("ix_process_heartbeats_beat_at"), "process_heartbeats", ["beat_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_process_heartbeats_beat_at"), table_name="process_heartbeats")
    op.drop_table("process_heartbeats")
