"""Training round pairs: which decided pairs (and winning side) each training round used, so no
label is trained on twice.

Revision ID: a87d62537ce1
Revises: ea2af88a36c8
Create Date: 2026-11-27 02:52:07.338163+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "a87d62537ce1"
down_revision: str | None = "ea2af88a36c8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "training_round_pairs",
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.Integer(), nullable=False),
        sa.Column("winner", sa.String(length=1), nullable=False),
        sa.Column("judgements", sa.Integer(), nullable=False),
        sa.CheckConstraint("winner IN ('a', 'b')", name=op.f("ck_training_round_pairs_winner")),
        sa.ForeignKeyConstraint(
            ["pair_id"], ["pairs.id"], name=op.f("fk_training_round_pairs_pair_id_pairs")
        ),
        sa.ForeignKeyConstraint(
            ["round_id"],
            ["training_rounds.id"],
            name=op.f("fk_training_round_pairs_round_id_training_rounds"),
        ),
        sa.PrimaryKeyConstraint("round_id", "pair_id", name=op.f("pk_training_round_pairs")),
    )
    with op.batch_alter_table("training_round_pairs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_training_round_pairs_pair_id"), ["pair_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("training_round_pairs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_training_round_pairs_pair_id"))

    op.drop_table("training_round_pairs")
