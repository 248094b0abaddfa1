"""`trajectories.latents_pruned_at`: when retention (core/retention.py) deleted the trajectory's latents
blob, once no round could read it again. NULL for every existing trajectory: its latents are kept.

Revision ID: b7e3d91c4a56
Revises: 5a8c3e1d7f02
Create Date: 2026-12-03 19:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b7e3d91c4a56"
down_revision: str | None = "5a8c3e1d7f02"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("trajectories", schema=None) as batch_op:
        batch_op.add_column(sa.Column("latents_pruned_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trajectories", schema=None) as batch_op:
        batch_op.drop_column("latents_pruned_at")
