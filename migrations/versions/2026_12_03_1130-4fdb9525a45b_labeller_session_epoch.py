"""Labellers carry a session epoch: browser cookies name the epoch of their login, and logout or
deactivation bumps it, so a cookie copied before then no longer works. Existing labellers start at 0;
cookies issued before this migration carry no epoch and are refused (everyone logs in once more).

Revision ID: 4fdb9525a45b
Revises: 9c4e5a7b2d18
Create Date: 2026-12-03 11:30:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "4fdb9525a45b"
down_revision: str | None = "9c4e5a7b2d18"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("labellers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("session_epoch", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("labellers", schema=None) as batch_op:
        batch_op.drop_column("session_epoch")
