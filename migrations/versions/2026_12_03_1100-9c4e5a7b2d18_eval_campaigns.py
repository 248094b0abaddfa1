"""Human evaluation campaigns: blind votes on pairs of (version, baseline) images, kept apart from training.

Pairs gain a kind ('train' or 'eval', existing pairs are 'train') and, for evaluation pairs, the
campaign they belong to.

Revision ID: 9c4e5a7b2d18
Revises: 3b1e7c2d9f40
Create Date: 2026-12-03 11:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "9c4e5a7b2d18"
down_revision: str | None = "3b1e7c2d9f40"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUNNING = "status = 'running'"


def upgrade() -> None:
    op.create_table(
        "eval_campaigns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("baseline_version", sa.Integer(), nullable=False),
        sa.Column("target_votes", sa.Integer(), nullable=False),
        sa.Column("judgements_per_pair", sa.Integer(), nullable=False),
        sa.Column("prompt_split", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("promote_on_win", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("promotion", sa.String(length=500), nullable=True),
        sa.CheckConstraint("status IN ('running', 'done', 'stopped')", name=op.f("ck_eval_campaigns_status")),
        sa.CheckConstraint("origin IN ('publish', 'admin')", name=op.f("ck_eval_campaigns_origin")),
        sa.CheckConstraint("prompt_split IN ('train', 'eval')", name=op.f("ck_eval_campaigns_prompt_split")),
        sa.CheckConstraint("target_votes >= 1", name=op.f("ck_eval_campaigns_target_votes_positive")),
        sa.CheckConstraint(
            "judgements_per_pair >= 1", name=op.f("ck_eval_campaigns_judgements_per_pair_positive")
        ),
        sa.ForeignKeyConstraint(
            ["baseline_version"],
            ["policy_versions.version"],
            name=op.f("fk_eval_campaigns_baseline_version_policy_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["created_by_id"], ["labellers.id"], name=op.f("fk_eval_campaigns_created_by_id_labellers")
        ),
        sa.ForeignKeyConstraint(
            ["version"], ["policy_versions.version"], name=op.f("fk_eval_campaigns_version_policy_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_campaigns")),
    )
    op.create_index(op.f("ix_eval_campaigns_version"), "eval_campaigns", ["version"], unique=False)
    op.create_index(
        "uq_eval_campaigns_running",
        "eval_campaigns",
        ["version", "baseline_version"],
        unique=True,
        postgresql_where=sa.text(RUNNING),
        sqlite_where=sa.text(RUNNING),
    )
    with op.batch_alter_table("pairs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=8), server_default="train", nullable=False))
        batch_op.add_column(sa.Column("campaign_id", sa.Integer(), nullable=True))
        batch_op.create_check_constraint(op.f("ck_pairs_kind"), "kind IN ('train', 'eval')")
        batch_op.create_check_constraint(
            op.f("ck_pairs_eval_has_campaign"), "(kind = 'eval') = (campaign_id IS NOT NULL)"
        )
        batch_op.create_foreign_key(
            op.f("fk_pairs_campaign_id_eval_campaigns"), "eval_campaigns", ["campaign_id"], ["id"]
        )
        batch_op.create_index(op.f("ix_pairs_campaign_id"), ["campaign_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("pairs", schema=None) as batch_op:
        batch_op.drop_index(op.f("ix_pairs_campaign_id"))
        batch_op.drop_constraint(op.f("fk_pairs_campaign_id_eval_campaigns"), type_="foreignkey")
        batch_op.drop_constraint(op.f("ck_pairs_eval_has_campaign"), type_="check")
        batch_op.drop_constraint(op.f("ck_pairs_kind"), type_="check")
        batch_op.drop_column("campaign_id")
        batch_op.drop_column("kind")
    op.drop_index("uq_eval_campaigns_running", table_name="eval_campaigns")
    op.drop_index(op.f("ix_eval_campaigns_version"), table_name="eval_campaigns")
    op.drop_table("eval_campaigns")
