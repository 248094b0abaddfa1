"""Handing pairs to labellers under short leases.

A labeller is given a pair that (1) they have not judged, (2) still needs judgements, (3) nobody else
holds an unexpired lease on; newest policy version first, then pairs whose overlap is already under
way (so agreement pairs complete), then the newest pair (within a version all pairs are equally
fresh; this order is the partial index `ix_pairs_open` read backwards). The lease is claimed with one upsert on the unique
`leases.pair_id` whose WHERE only lets it through when the existing lease has expired or is already
ours: the database, not this code, guarantees one live lease per pair. On Postgres the candidate scan
also uses `FOR UPDATE SKIP LOCKED`, so concurrent requests fan out over different pairs instead of
queueing on the same row; SQLite serialises writers, and the upsert alone is enough there.

On Postgres all of it is one statement (`LEASE_OR_CLAIM`, one database round trip): data-modifying
CTEs renew the labeller's held lease or, when there is none, pick and claim a candidate (of the kind
`eval_share` prefers this time, else of the other), and the statement returns the pair's row with
its prompt's text and the side shown on the left. It is sent
again, without the candidate it saw, only when another request claimed that pair between this
statement's snapshot and its upsert. SQLite has no data-modifying CTEs: there the same steps are
separate statements (`_next_pair_stepwise`), which is fine for the embedded single-machine mode.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import (
    ARRAY,
    Boolean,
    ColumnElement,
    Integer,
    String,
    Text,
    bindparam,
    column,
    or_,
    select,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import InstrumentedAttribute, Session

from core.db.base import UTCDateTime, utcnow
from core.db.models import EvalCampaign, Judgement, Lease, Pair, Prompt

CANDIDATES_PER_TRY = 16

# Postgres: renew the held lease, or claim the first free candidate, in one statement. Each candidate
# CTE is the stepwise candidate query for one kind (it reads ix_pairs_open backwards) behind a
# one-time "nothing held" filter; `candidate` takes the preferred kind's (:eval_first) and falls back
# to the other's, scanning it only when needed (and evaluation pairs only when :eval_allowed).
# `claimed` is the guarded upsert. The last UNION branch reports a candidate whose claim lost a race
# (shown_left NULL), so the caller can try again without it.
_CANDIDATE = """\
    SELECT pairs.id FROM pairs JOIN prompts ON prompts.id = pairs.prompt_id {campaign_join}
    WHERE NOT EXISTS (SELECT 1 FROM held)
      AND prompts.active AND pairs.judgement_count < pairs.required_judgements AND pairs.kind = '{kind}'
      AND NOT EXISTS (SELECT 1 FROM leases WHERE leases.pair_id = pairs.id AND leases.expires_at > :now)
      AND NOT EXISTS (SELECT 1 FROM judgements
                      WHERE judgements.pair_id = pairs.id AND judgements.labeller_id = :labeller_id)
      AND pairs.id <> ALL(:exclude)
    ORDER BY pairs.policy_version DESC, pairs.judgement_count DESC, pairs.id DESC
    LIMIT 1 FOR UPDATE OF pairs SKIP LOCKED"""
LEASE_OR_CLAIM = f"""\
WITH held AS (
    SELECT leases.id FROM leases
    WHERE leases.labeller_id = :labeller_id AND leases.expires_at > :now
      AND leases.pair_id <> ALL(:exclude)
      AND NOT EXISTS (SELECT 1 FROM judgements
                      WHERE judgements.pair_id = leases.pair_id AND judgements.labeller_id = :labeller_id)
    ORDER BY leases.id LIMIT 1
), renewed AS (
    UPDATE leases SET expires_at = :expires FROM held WHERE leases.id = held.id
    RETURNING leases.pair_id, leases.shown_left
), train_candidate AS (
{_CANDIDATE.format(campaign_join="", kind="train")}
), eval_candidate AS (
{
    _CANDIDATE.format(
        campaign_join="JOIN eval_campaigns ON eval_campaigns.id = pairs.campaign_id AND eval_campaigns.status = 'running'",
        kind="eval",
    )
}
), candidate AS (
    SELECT id FROM eval_candidate WHERE :eval_first
    UNION ALL SELECT id FROM train_candidate WHERE NOT (:eval_first AND EXISTS (SELECT 1 FROM eval_candidate))
    UNION ALL SELECT id FROM eval_candidate
              WHERE NOT :eval_first AND :eval_allowed AND NOT EXISTS (SELECT 1 FROM train_candidate)
), claimed AS (
    INSERT INTO leases (pair_id, labeller_id, shown_left, expires_at)
    SELECT candidate.id, :labeller_id, :shown_left, :expires FROM candidate
    ON CONFLICT (pair_id) DO UPDATE
        SET labeller_id = excluded.labeller_id, shown_left = excluded.shown_left, expires_at = excluded.expires_at
        WHERE leases.expires_at <= :now OR leases.labeller_id = :labeller_id
    RETURNING leases.pair_id, leases.shown_left
), chosen AS (
    SELECT pair_id, shown_left FROM renewed
    UNION ALL SELECT pair_id, shown_left FROM claimed
    UNION ALL SELECT candidate.id, NULL FROM candidate WHERE NOT EXISTS (SELECT 1 FROM claimed)
)
SELECT {
    ", ".join(f"pairs.{c.name}" for c in Pair.__table__.columns)
}, prompts.text AS prompt_text, chosen.shown_left
FROM chosen JOIN pairs ON pairs.id = chosen.pair_id JOIN prompts ON prompts.id = pairs.prompt_id
"""
_LEASE_OR_CLAIM = (
    sql_text(LEASE_OR_CLAIM)
    .bindparams(
        bindparam("exclude", type_=ARRAY(Integer)),
        bindparam("now", type_=UTCDateTime()),
        bindparam("expires", type_=UTCDateTime()),
        bindparam("eval_first", type_=Boolean()),
        bindparam("eval_allowed", type_=Boolean()),
    )
    .columns(*Pair.__table__.columns, column("prompt_text", Text), column("shown_left", String))
)
_PAIR_COLUMNS = tuple(c.key for c in Pair.__table__.columns)


@dataclass(frozen=True)
class Assignment:
    pair: Pair
    prompt_text: str
    shown_left: str  # 'a' or 'b': which trajectory the labeller sees on the left
    expires_at: dt.datetime


def next_pair(
    *,
    session: Session,
    labeller_id: int,
    lease_seconds: int,
    rng: random.Random | None = None,
    exclude: Collection[int] = (),
    now: dt.datetime | None = None,
    eval_share: float = 0.0,
) -> Assignment | None:
    """Lease a pair to `labeller_id`, or None when the pool has nothing for them.

    `eval_share` of the pairs handed out are evaluation pairs of running campaigns (core.db.campaigns)
    when there are any; they carry the same fields as training pairs, so nobody can tell them apart.
    A live lease the labeller already holds (and does not list in `exclude`, the pairs the client is
    already showing) is returned again, so reloading the page does not burn pairs.
    """
    now = now or utcnow()
    rng = rng or random.Random()
    expires = now + dt.timedelta(seconds=lease_seconds)
    if session.get_bind().dialect.name != "postgresql":
        return _next_pair_stepwise(session, labeller_id, rng, exclude, now, expires, eval_share)
    tried = list(exclude)
    eval_first = _kinds_in_order(rng, eval_share)[0] == "eval"
    while True:
        params = {"labeller_id": labeller_id, "now": now, "expires": expires, "exclude": tried}
        params |= {"eval_first": eval_first, "eval_allowed": eval_share > 0, "shown_left": rng.choice("ab")}
        # A Core row, not an ORM load: the ORM's per-statement bookkeeping cost more CPU than the
        # rest of the call. The Pair handed back is a transient copy of the row.
        row = session.connection().execute(_LEASE_OR_CLAIM, params).first()
        if row is None:
            return None  # nothing held, no candidate of either kind
        if row.shown_left is not None:
            pair = Pair(**{key: getattr(row, key) for key in _PAIR_COLUMNS})
            return Assignment(
                pair=pair, prompt_text=row.prompt_text, shown_left=row.shown_left, expires_at=expires
            )
        tried.append(row.id)  # someone claimed it first


def _next_pair_stepwise(
    session: Session,
    labeller_id: int,
    rng: random.Random,
    exclude: Collection[int],
    now: dt.datetime,
    expires: dt.datetime,
    eval_share: float,
) -> Assignment | None:
    """next_pair as separate statements, for SQLite."""
    held: Lease | None = session.scalars(
        select(Lease)
        .where(Lease.labeller_id == labeller_id, Lease.expires_at > now, Lease.pair_id.not_in(list(exclude)))
        .where(~_judged_by(labeller_id, Lease.pair_id))
        .order_by(Lease.id)
        .limit(1)
    ).first()
    if held is not None:
        held.expires_at = expires
        session.flush()
        return _assignment(session, held.pair_id, held.shown_left, expires)
    tried: set[int] = set(exclude)
    for kind in _kinds_in_order(rng, eval_share):
        while True:
            candidates = _candidates(session, labeller_id, now, tried, kind)
            if not candidates:
                break
            for pair_id in candidates:
                tried.add(pair_id)
                shown_left = rng.choice(("a", "b"))
                if _claim(session, pair_id, labeller_id, shown_left, expires, now):
                    return _assignment(session, pair_id, shown_left, expires)
    return None


def _kinds_in_order(rng: random.Random, eval_share: float) -> tuple[str, ...]:
    """Which kind of pair to look for first: an evaluation pair with probability `eval_share`.

    Either kind falls back to the other when none is free, so nobody waits while pairs exist; with
    a share of 0 evaluation pairs are never served.
    """
    if eval_share <= 0:
        return ("train",)
    return ("eval", "train") if rng.random() < eval_share else ("train", "eval")


def _judged_by(
    labeller_id: int, pair_id: ColumnElement[int] | InstrumentedAttribute[int]
) -> ColumnElement[bool]:
    return (
        select(Judgement.id)
        .where(Judgement.pair_id == pair_id, Judgement.labeller_id == labeller_id)
        .exists()
    )


def _candidates(
    session: Session, labeller_id: int, now: dt.datetime, tried: set[int], kind: str = "train"
) -> list[int]:
    # Reads ix_pairs_open backwards: open pairs, newest version, most-judged first, then newest pair.
    free = ~select(Lease.id).where(Lease.pair_id == Pair.id, Lease.expires_at > now).exists()
    query = (
        select(Pair.id)
        .join(Prompt, Prompt.id == Pair.prompt_id)
        .where(Prompt.active.is_(True), Pair.judgement_count < Pair.required_judgements, free)
        .where(Pair.kind == kind, ~_judged_by(labeller_id, Pair.id))
        .order_by(Pair.policy_version.desc(), Pair.judgement_count.desc(), Pair.id.desc())
    )
    if kind == "eval":  # only while their campaign runs
        query = query.join(EvalCampaign, EvalCampaign.id == Pair.campaign_id).where(
            EvalCampaign.status == "running"
        )
    if tried:
        query = query.where(Pair.id.not_in(list(tried)))
    return list(session.scalars(query.limit(CANDIDATES_PER_TRY)))


def _claim(
    session: Session, pair_id: int, labeller_id: int, shown_left: str, expires: dt.datetime, now: dt.datetime
) -> bool:
    """Insert or take over the pair's lease row; False when someone else holds it live."""
    values = {"pair_id": pair_id, "labeller_id": labeller_id, "shown_left": shown_left, "expires_at": expires}
    upsert = sqlite.insert(Lease).values(**values)
    stmt = upsert.on_conflict_do_update(
        index_elements=[Lease.pair_id],
        set_={"labeller_id": labeller_id, "shown_left": shown_left, "expires_at": expires},
        where=or_(Lease.expires_at <= now, Lease.labeller_id == labeller_id),
    ).returning(Lease.id)
    return session.execute(stmt).scalar_one_or_none() is not None


def _assignment(session: Session, pair_id: int, shown_left: str, expires: dt.datetime) -> Assignment:
    pair = session.get_one(Pair, pair_id)
    prompt = session.get_one(Prompt, pair.prompt_id)
    return Assignment(pair=pair, prompt_text=prompt.text, shown_left=shown_left, expires_at=expires)


def lease_for(*, session: Session, pair_id: int, labeller_id: int) -> Lease | None:
    """The lease row on `pair_id` if it belongs to `labeller_id` (live, or expired but not re-leased)."""
    return session.scalar(select(Lease).where(Lease.pair_id == pair_id, Lease.labeller_id == labeller_id))
