"""Initial schema: labellers, invites, prompts, policy versions, trajectories, pairs, judgements,
leases and training rounds.

Revision ID: ea2af88a36c8
Revises:
Create Date: 2026-11-27 02:34:07.433621+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "ea2af88a36c8"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "labellers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("role IN ('annotator', 'admin')", name=op.f("ck_labellers_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labellers")),
        sa.UniqueConstraint("name", name=op.f("uq_labellers_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_labellers_token_hash")),
    )
    op.create_table(
        "policy_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("lora_key", sa.String(length=255), nullable=True),
        sa.Column("lora_sha256", sa.String(length=64), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "version = 0 OR (lora_key IS NOT NULL AND lora_sha256 IS NOT NULL)",
            name=op.f("ck_policy_versions_lora_after_base"),
        ),
        sa.CheckConstraint("version >= 0", name=op.f("ck_policy_versions_version_non_negative")),
        sa.ForeignKeyConstraint(
            ["parent_version"],
            ["policy_versions.version"],
            name=op.f("fk_policy_versions_parent_version_policy_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_versions")),
        sa.UniqueConstraint("version", name=op.f("uq_policy_versions_version")),
    )
    op.create_table(
        "prompts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("split", sa.String(length=8), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("split IN ('train', 'eval')", name=op.f("ck_prompts_split")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompts")),
    )
    op.create_table(
        "current_policy",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_current_policy_single_row")),
        sa.ForeignKeyConstraint(
            ["version"], ["policy_versions.version"], name=op.f("fk_current_policy_version_policy_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_current_policy")),
    )
    op.create_table(
        "invites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("labeller_id", sa.Integer(), nullable=True),
        sa.CheckConstraint("role IN ('annotator', 'admin')", name=op.f("ck_invites_role")),
        sa.ForeignKeyConstraint(
            ["created_by_id"], ["labellers.id"], name=op.f("fk_invites_created_by_id_labellers")
        ),
        sa.ForeignKeyConstraint(
            ["labeller_id"], ["labellers.id"], name=op.f("fk_invites_labeller_id_labellers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invites")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_invites_token_hash")),
    )
    op.create_table(
        "training_rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("base_version", sa.Integer(), nullable=False),
        sa.Column("produced_version", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("pairs_used", sa.Integer(), nullable=False),
        sa.Column("judgements_used", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('running', 'done', 'failed')", name=op.f("ck_training_rounds_status")),
        sa.ForeignKeyConstraint(
            ["base_version"],
            ["policy_versions.version"],
            name=op.f("fk_training_rounds_base_version_policy_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["produced_version"],
            ["policy_versions.version"],
            name=op.f("fk_training_rounds_produced_version_policy_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_rounds")),
    )
    op.create_table(
        "trajectories",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("sampler", sa.JSON(), nullable=False),
        sa.Column("latents_key", sa.String(length=255), nullable=True),
        sa.Column("log_probs_key", sa.String(length=255), nullable=True),
        sa.Column("image_key", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["policy_version"],
            ["policy_versions.version"],
            name=op.f("fk_trajectories_policy_version_policy_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompts.id"], name=op.f("fk_trajectories_prompt_id_prompts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trajectories")),
    )
    with op.batch_alter_table("trajectories", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_trajectories_prompt_id"), ["prompt_id"], unique=False)

    op.create_table(
        "pairs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("trajectory_a_id", sa.Integer(), nullable=False),
        sa.Column("trajectory_b_id", sa.Integer(), nullable=False),
        sa.Column("required_judgements", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("required_judgements >= 1", name=op.f("ck_pairs_required_judgements_positive")),
        sa.CheckConstraint("trajectory_a_id <> trajectory_b_id", name=op.f("ck_pairs_distinct_trajectories")),
        sa.ForeignKeyConstraint(
            ["policy_version"],
            ["policy_versions.version"],
            name=op.f("fk_pairs_policy_version_policy_versions"),
        ),
        sa.ForeignKeyConstraint(["prompt_id"], ["prompts.id"], name=op.f("fk_pairs_prompt_id_prompts")),
        sa.ForeignKeyConstraint(
            ["trajectory_a_id"], ["trajectories.id"], name=op.f("fk_pairs_trajectory_a_id_trajectories")
        ),
        sa.ForeignKeyConstraint(
            ["trajectory_b_id"], ["trajectories.id"], name=op.f("fk_pairs_trajectory_b_id_trajectories")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pairs")),
    )
    with op.batch_alter_table("pairs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pairs_policy_version"), ["policy_version"], unique=False)
        batch_op.create_index(batch_op.f("ix_pairs_prompt_id"), ["prompt_id"], unique=False)

    op.create_table(
        "judgements",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.Integer(), nullable=False),
        sa.Column("labeller_id", sa.Integer(), nullable=False),
        sa.Column("choice", sa.String(length=8), nullable=False),
        sa.Column("shown_left", sa.String(length=1), nullable=False),
        sa.Column("decide_ms", sa.Integer(), nullable=True),
        sa.Column("client_key", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("choice IN ('a', 'b', 'tie', 'skip')", name=op.f("ck_judgements_choice")),
        sa.CheckConstraint("shown_left IN ('a', 'b')", name=op.f("ck_judgements_shown_left")),
        sa.CheckConstraint(
            "decide_ms IS NULL OR decide_ms >= 0", name=op.f("ck_judgements_decide_ms_non_negative")
        ),
        sa.ForeignKeyConstraint(
            ["labeller_id"], ["labellers.id"], name=op.f("fk_judgements_labeller_id_labellers")
        ),
        sa.ForeignKeyConstraint(["pair_id"], ["pairs.id"], name=op.f("fk_judgements_pair_id_pairs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_judgements")),
        sa.UniqueConstraint("client_key", name=op.f("uq_judgements_client_key")),
        sa.UniqueConstraint("pair_id", "labeller_id", name=op.f("uq_judgements_pair_id_labeller_id")),
    )
    with op.batch_alter_table("judgements", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_judgements_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_judgements_labeller_id"), ["labeller_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_judgements_pair_id"), ["pair_id"], unique=False)

    op.create_table(
        "leases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pair_id", sa.Integer(), nullable=False),
        sa.Column("labeller_id", sa.Integer(), nullable=False),
        sa.Column("left_side", sa.String(length=1), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("left_side IN ('a', 'b')", name=op.f("ck_leases_left_side")),
        sa.ForeignKeyConstraint(
            ["labeller_id"], ["labellers.id"], name=op.f("fk_leases_labeller_id_labellers")
        ),
        sa.ForeignKeyConstraint(["pair_id"], ["pairs.id"], name=op.f("fk_leases_pair_id_pairs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_leases")),
        sa.UniqueConstraint("pair_id", name=op.f("uq_leases_pair_id")),
    )
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_leases_labeller_id"), ["labeller_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_leases_labeller_id"))

    op.drop_table("leases")
    with op.batch_alter_table("judgements", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_judgements_pair_id"))
        batch_op.drop_index(batch_op.f("ix_judgements_labeller_id"))
        batch_op.drop_index(batch_op.f("ix_judgements_created_at"))

    op.drop_table("judgements")
    with op.batch_alter_table("pairs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pairs_prompt_id"))
        batch_op.drop_index(batch_op.f("ix_pairs_policy_version"))

    op.drop_table("pairs")
    with op.batch_alter_table("trajectories", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_trajectories_prompt_id"))

    op.drop_table("trajectories")
    op.drop_table("training_rounds")
    op.drop_table("invites")
    op.drop_table("current_policy")
    op.drop_table("prompts")
    op.drop_table("policy_versions")
    op.drop_table("labellers")
