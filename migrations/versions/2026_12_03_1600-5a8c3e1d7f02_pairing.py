"""How a pair was chosen: `pairs.pairing` ('independent': two fresh seeds, as every pair so far;
'aligned': both sides start from the same initial noise z_0 and differ only in the per-step noise;
'same_seed': an evaluation pair, one seed drawn by two versions). `trajectories.z0_seed`: the seed of
the generator that drew z_0 when it is not the trajectory's own `seed` (aligned pairs); NULL means
z_0 and the step noise come from one generator seeded with `seed`, as before. `pairs.gold`: a
known answer ('a' or 'b') an admin marked, against which labellers' votes are scored (core/reliability.py).
`training_round_pairs.weight`: the loss weight a round gave the pair (1 for every earlier round).
`labellers.ability*`: each labeller's measured reliability with its interval, refreshed by the trainer.

Revision ID: 5a8c3e1d7f02
Revises: 7d2e1f0a9b3c
Create Date: 2026-12-03 16:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5a8c3e1d7f02"
down_revision: str | None = "7d2e1f0a9b3c"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("trajectories", schema=None) as batch_op:
        batch_op.add_column(sa.Column("z0_seed", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("pairs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("pairing", sa.String(length=16), server_default="independent", nullable=False)
        )
        batch_op.add_column(sa.Column("gold", sa.String(length=1), nullable=True))
    with op.batch_alter_table("training_round_pairs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("weight", sa.Float(), server_default="1", nullable=False))
    with op.batch_alter_table("labellers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ability", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("ability_low", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("ability_high", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("ability_votes", sa.Integer(), server_default="0", nullable=False))
    op.execute("UPDATE pairs SET pairing = 'same_seed' WHERE kind = 'eval'")
    with op.batch_alter_table("pairs", schema=None) as batch_op:
        batch_op.create_check_constraint(
            op.f("ck_pairs_pairing"), "pairing IN ('independent', 'aligned', 'same_seed')"
        )
        batch_op.create_check_constraint(op.f("ck_pairs_gold"), "gold IN ('a', 'b')")


def downgrade() -> None:
    with op.batch_alter_table("labellers", schema=None) as batch_op:
        for column in ("ability_votes", "ability_high", "ability_low", "ability"):
            batch_op.drop_column(column)
    with op.batch_alter_table("training_round_pairs", schema=None) as batch_op:
        batch_op.drop_column("weight")
    with op.batch_alter_table("pairs", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_pairs_gold"), type_="check")
        batch_op.drop_constraint(op.f("ck_pairs_pairing"), type_="check")
        batch_op.drop_column("gold")
        batch_op.drop_column("pairing")
    with op.batch_alter_table("trajectories", schema=None) as batch_op:
        batch_op.drop_column("z0_seed")
