"""One vocabulary: the side a lease shows on the left is `shown_left`, as a judgement records it (it was
`left_side` on leases); what a training round used are votes (a/b/tie judgements; a skip is a judgement
but not a vote): `training_rounds.votes_used` (was `judgements_used`) and `training_round_pairs.votes`
(was `judgements`). Renames only: no data changes.

Revision ID: 7d2e1f0a9b3c
Revises: 4fdb9525a45b
Create Date: 2026-12-03 14:30:00.000000+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "7d2e1f0a9b3c"
down_revision: str | None = "4fdb9525a45b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_leases_left_side"), type_="check")
        batch_op.alter_column("left_side", new_column_name="shown_left")
        batch_op.create_check_constraint(op.f("ck_leases_shown_left"), "shown_left IN ('a', 'b')")
    with op.batch_alter_table("training_rounds", schema=None) as batch_op:
        batch_op.alter_column("judgements_used", new_column_name="votes_used")
    with op.batch_alter_table("training_round_pairs", schema=None) as batch_op:
        batch_op.alter_column("judgements", new_column_name="votes")


def downgrade() -> None:
    with op.batch_alter_table("training_round_pairs", schema=None) as batch_op:
        batch_op.alter_column("votes", new_column_name="judgements")
    with op.batch_alter_table("training_rounds", schema=None) as batch_op:
        batch_op.alter_column("votes_used", new_column_name="judgements_used")
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_leases_shown_left"), type_="check")
        batch_op.alter_column("shown_left", new_column_name="left_side")
        batch_op.create_check_constraint(op.f("ck_leases_left_side"), "left_side IN ('a', 'b')")
