"""Tables of the labelling loop. Postgres is the source of truth; large arrays live in the blob store
and are referenced here by key only."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.db.base import Base, UTCDateTime, utcnow

ROLES = ("annotator", "admin")
SPLITS = ("train", "eval")
CHOICES = ("a", "b", "tie", "skip")
SIDES = ("a", "b")
ROUND_STATUSES = ("running", "done", "failed")
PROCESS_ROLES = ("worker", "trainer")
PAIR_KINDS = ("train", "eval")
# How a pair's two trajectories were drawn (see core.pool.PAIRINGS for the training ones).
PAIRINGS = ("independent", "aligned", "same_seed")
CAMPAIGN_STATUSES = ("running", "done", "stopped")
CAMPAIGN_ORIGINS = ("publish", "admin")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Labeller(Base):
    """A person (or a programmatic stand-in) who judges pairs; admins also manage the deployment."""

    __tablename__ = "labellers"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="annotator")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # sha256 hex of the bearer token; the token itself is shown once and never stored.
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    # Browser sessions carry the epoch of their login; logout and deactivation bump it, which ends
    # every cookie issued before (core/db/labellers.py end_sessions).
    session_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Their measured reliability (core/reliability.py), refreshed by the trainer: P(an a/b vote of
    # theirs names the better side) with its 95% interval, and the votes it rests on; NULL until measured.
    ability: Mapped[float | None] = mapped_column(Float)
    ability_low: Mapped[float | None] = mapped_column(Float)
    ability_high: Mapped[float | None] = mapped_column(Float)
    ability_votes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Invite(Base):
    """A one-time link with which an admin lets a new labeller in."""

    __tablename__ = "invites"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16), default="annotator")
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("labellers.id"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    labeller_id: Mapped[int | None] = mapped_column(ForeignKey("labellers.id"))


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (CheckConstraint(_in("split", SPLITS), name="split"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    split: Mapped[str] = mapped_column(String(8), default="train")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class PolicyVersion(Base):
    """An immutable published policy: version 0 is the base model, each later one a LoRA adapter."""

    __tablename__ = "policy_versions"
    __table_args__ = (
        CheckConstraint("version >= 0", name="version_non_negative"),
        CheckConstraint(
            "version = 0 OR (lora_key IS NOT NULL AND lora_sha256 IS NOT NULL)", name="lora_after_base"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer, unique=True)
    parent_version: Mapped[int | None] = mapped_column(ForeignKey("policy_versions.version"))
    lora_key: Mapped[str | None] = mapped_column(String(255))
    lora_sha256: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class CurrentPolicy(Base):
    """Single-row pointer to the version workers sample with; moving it back is a rollback."""

    __tablename__ = "current_policy"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(primary_key=True, default=1)
    version: Mapped[int] = mapped_column(ForeignKey("policy_versions.version"))
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Trajectory(Base):
    """One sampled denoising trajectory; its latents, log-probs and final image are blobs."""

    __tablename__ = "trajectories"

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    policy_version: Mapped[int] = mapped_column(ForeignKey("policy_versions.version"))
    seed: Mapped[int] = mapped_column(BigInteger)
    # The seed of the generator that drew z_0 when it is not `seed`'s (an aligned pair's sides share
    # it); NULL: z_0 and the per-step noise come from one generator seeded with `seed`.
    z0_seed: Mapped[int | None] = mapped_column(BigInteger)
    sampler: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    latents_key: Mapped[str | None] = mapped_column(String(255))
    log_probs_key: Mapped[str | None] = mapped_column(String(255))
    image_key: Mapped[str] = mapped_column(String(255))
    # When retention (core/retention.py) deleted the latents blob, which no round could read again; the
    # keys stay for the record, and a reader of a pruned trajectory gets `LatentsPruned`. NULL: kept.
    latents_pruned_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Pair(Base):
    """Two trajectories of one prompt and one policy version, shown side by side to labellers."""

    __tablename__ = "pairs"
    __table_args__ = (
        CheckConstraint("required_judgements >= 1", name="required_judgements_positive"),
        CheckConstraint("trajectory_a_id <> trajectory_b_id", name="distinct_trajectories"),
        CheckConstraint("judgement_count >= 0", name="judgement_count_non_negative"),
        CheckConstraint(_in("kind", PAIR_KINDS), name="kind"),
        CheckConstraint("(kind = 'eval') = (campaign_id IS NOT NULL)", name="eval_has_campaign"),
        CheckConstraint(_in("pairing", PAIRINGS), name="pairing"),
        CheckConstraint(_in("gold", SIDES), name="gold"),
        # The pairs still wanting judgements, in the order the next-pair lease hands them out (it reads
        # the index backwards), so that query stops at the first few free entries instead of counting
        # judgements for every pair of the newest version.
        Index(
            "ix_pairs_open",
            "policy_version",
            "judgement_count",
            "id",
            postgresql_where=text("judgement_count < required_judgements"),
            sqlite_where=text("judgement_count < required_judgements"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    # For an evaluation pair, the version under evaluation (side a); side b is the campaign's baseline.
    policy_version: Mapped[int] = mapped_column(ForeignKey("policy_versions.version"), index=True)
    # 'train': two samples of one version, for training. 'eval': one sample each of two versions from
    # the same seed, for a human evaluation campaign; never trained on.
    kind: Mapped[str] = mapped_column(String(8), default="train", server_default="train")
    campaign_id: Mapped[int | None] = mapped_column(ForeignKey("eval_campaigns.id"), index=True)
    # How the two sides were drawn: 'independent' (two fresh seeds), 'aligned' (one initial noise z_0,
    # different per-step noise), 'same_seed' (an evaluation pair: one seed, two versions).
    pairing: Mapped[str] = mapped_column(String(16), default="independent", server_default="independent")
    # A known answer an admin marked: the better side, 'a' or 'b'. Labellers' votes on gold pairs
    # measure their reliability (core/reliability.py); NULL for ordinary pairs.
    gold: Mapped[str | None] = mapped_column(String(1))
    trajectory_a_id: Mapped[int] = mapped_column(ForeignKey("trajectories.id"))
    trajectory_b_id: Mapped[int] = mapped_column(ForeignKey("trajectories.id"))
    required_judgements: Mapped[int] = mapped_column(Integer, default=1)
    # Judgements stored for this pair, kept by core.db.judgements as it records and undoes them (in
    # the same transaction), so "still open" is a column comparison the partial index can serve.
    judgement_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class EvalCampaign(Base):
    """A blind A/B test by people: votes on pairs of (version, baseline) images from the same seed.

    Started when a version is published (origin 'publish') or by an admin ('admin'); it runs until
    `target_votes` votes are in ('done') or an admin stops it ('stopped'). At most one campaign per
    (version, baseline) runs at a time.
    """

    __tablename__ = "eval_campaigns"
    __table_args__ = (
        CheckConstraint(_in("status", CAMPAIGN_STATUSES), name="status"),
        CheckConstraint(_in("origin", CAMPAIGN_ORIGINS), name="origin"),
        CheckConstraint(_in("prompt_split", SPLITS), name="prompt_split"),
        CheckConstraint("target_votes >= 1", name="target_votes_positive"),
        CheckConstraint("judgements_per_pair >= 1", name="judgements_per_pair_positive"),
        Index(
            "uq_eval_campaigns_running",
            "version",
            "baseline_version",
            unique=True,
            postgresql_where=text("status = 'running'"),
            sqlite_where=text("status = 'running'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(ForeignKey("policy_versions.version"), index=True)
    baseline_version: Mapped[int] = mapped_column(ForeignKey("policy_versions.version"))
    target_votes: Mapped[int] = mapped_column(Integer)
    judgements_per_pair: Mapped[int] = mapped_column(Integer, default=1)
    prompt_split: Mapped[str] = mapped_column(String(8), default="eval")
    status: Mapped[str] = mapped_column(String(16), default="running")
    origin: Mapped[str] = mapped_column(String(16), default="admin")
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("labellers.id"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # The gate (Settings.eval.promote_if_wins): make `version` current if it wins, and what happened.
    promote_on_win: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    promotion: Mapped[str | None] = mapped_column(String(500))


class Judgement(Base):
    __tablename__ = "judgements"
    __table_args__ = (
        UniqueConstraint("pair_id", "labeller_id"),
        CheckConstraint(_in("choice", CHOICES), name="choice"),
        CheckConstraint(_in("shown_left", SIDES), name="shown_left"),
        CheckConstraint("decide_ms IS NULL OR decide_ms >= 0", name="decide_ms_non_negative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"), index=True)
    labeller_id: Mapped[int] = mapped_column(ForeignKey("labellers.id"), index=True)
    choice: Mapped[str] = mapped_column(String(8))
    # Which trajectory ('a' or 'b') was on the left, to measure and correct side bias.
    shown_left: Mapped[str] = mapped_column(String(1))
    decide_ms: Mapped[int | None] = mapped_column(Integer)
    # Chosen by the client; a repeated POST with the same key records nothing new.
    client_key: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class Lease(Base):
    """Who a pair is reserved for right now; at most one row per pair, reused when it expires."""

    __tablename__ = "leases"
    __table_args__ = (CheckConstraint(_in("shown_left", SIDES), name="shown_left"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"), unique=True)
    labeller_id: Mapped[int] = mapped_column(ForeignKey("labellers.id"), index=True)
    shown_left: Mapped[str] = mapped_column(String(1))
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class TrainingRound(Base):
    __tablename__ = "training_rounds"
    __table_args__ = (CheckConstraint(_in("status", ROUND_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    base_version: Mapped[int] = mapped_column(ForeignKey("policy_versions.version"))
    produced_version: Mapped[int | None] = mapped_column(ForeignKey("policy_versions.version"))
    status: Mapped[str] = mapped_column(String(16), default="running")
    pairs_used: Mapped[int] = mapped_column(Integer, default=0)
    # a/b/tie votes behind the round's pairs (a skip is a judgement but not a vote)
    votes_used: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class TrainingRoundPair(Base):
    """A decided pair a training round used, with the side that won, so no label is counted twice.

    Written when the round starts (so a resumed round trains on exactly the same pairs) and kept
    after it ends; a pair used by a round that finished is never used again.
    """

    __tablename__ = "training_round_pairs"
    __table_args__ = (CheckConstraint(_in("winner", SIDES), name="winner"),)

    round_id: Mapped[int] = mapped_column(ForeignKey("training_rounds.id"), primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"), primary_key=True, index=True)
    winner: Mapped[str] = mapped_column(String(1))
    votes: Mapped[int] = mapped_column(Integer)  # the a/b/tie votes that decided it
    # The pair's loss weight: 1 (a plain majority), or how sure its votes are given each voter's
    # measured reliability (DENSEALIGN_DPO__LABEL_WEIGHTING=reliability; core/reliability.py).
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")


class ProcessHeartbeat(Base):
    """The last sign of life of one worker or trainer process: what it is doing, with which version.

    One row per process (role, host, pid), rewritten every few seconds by the process itself; a clean
    exit stamps `stopped_at`. `densealign health` and the dashboard read it to tell a working process
    from one that is restarting, stuck or gone.
    """

    __tablename__ = "process_heartbeats"
    __table_args__ = (
        UniqueConstraint("role", "host", "pid"),
        CheckConstraint(_in("role", PROCESS_ROLES), name="role"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    # A short word ("starting", "idle", "sampling", "waiting", "training", "stopping", "stopped") and a
    # line saying more ("round 3: step 40/60", "12 of 32 decided pairs").
    state: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(String(500), default="")
    policy_version: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    beat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
