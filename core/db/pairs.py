"""Trajectories and the pairs built from them."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.errors import Conflict, InvalidInput, PairInvalid, PairNotFound
from core.db.models import Pair, Prompt, Trajectory
from core.db.policies import get_policy_version
from core.db.prompts import get_prompt


def required_judgements(
    *, rng: random.Random, overlap_k: int, agreement_k: int, agreement_share: float
) -> int:
    """How many labellers should judge a new pair: `agreement_k` for a random share, else `overlap_k`."""
    return agreement_k if rng.random() < agreement_share else overlap_k


def create_trajectory(
    *,
    session: Session,
    prompt_id: int,
    policy_version: int,
    seed: int,
    image_key: str,
    sampler: dict[str, Any] | None = None,
    latents_key: str | None = None,
    log_probs_key: str | None = None,
    z0_seed: int | None = None,
) -> Trajectory:
    get_prompt(session=session, prompt_id=prompt_id)
    get_policy_version(session=session, version=policy_version)
    row = Trajectory(
        prompt_id=prompt_id,
        policy_version=policy_version,
        seed=seed,
        z0_seed=z0_seed,
        sampler=sampler or {},
        image_key=image_key,
        latents_key=latents_key,
        log_probs_key=log_probs_key,
    )
    session.add(row)
    session.flush()
    return row


def create_pair(
    *,
    session: Session,
    trajectory_a_id: int,
    trajectory_b_id: int,
    required: int = 1,
    pairing: str = "independent",
) -> Pair:
    """Pair two trajectories of the same prompt and policy version. An 'aligned' pair's sides must share
    their initial noise (one `z0_seed`) and differ in the per-step noise (their `seed`)."""
    if required < 1:
        raise InvalidInput(f"required judgements {required} must be at least 1")
    if pairing not in ("independent", "aligned"):
        raise InvalidInput(f"pairing {pairing!r} is not one of 'independent', 'aligned' for a training pair")
    a, b = two_trajectories(session=session, first_id=trajectory_a_id, second_id=trajectory_b_id)
    if (a.prompt_id, a.policy_version) != (b.prompt_id, b.policy_version):
        raise PairInvalid(
            f"trajectories {a.id} (prompt {a.prompt_id}, version {a.policy_version}) and {b.id} "
            f"(prompt {b.prompt_id}, version {b.policy_version}) differ; a pair needs one prompt "
            "and one version"
        )
    if pairing == "aligned" and (a.z0_seed is None or a.z0_seed != b.z0_seed or a.seed == b.seed):
        raise PairInvalid(
            f"trajectories {a.id} and {b.id} are not aligned: an aligned pair needs one z0_seed (got "
            f"{a.z0_seed} and {b.z0_seed}) and two step-noise seeds (got {a.seed} and {b.seed})"
        )
    pair = Pair(
        prompt_id=a.prompt_id,
        policy_version=a.policy_version,
        pairing=pairing,
        trajectory_a_id=a.id,
        trajectory_b_id=b.id,
        required_judgements=required,
    )
    session.add(pair)
    session.flush()
    return pair


def two_trajectories(*, session: Session, first_id: int, second_id: int) -> tuple[Trajectory, Trajectory]:
    """The two trajectories a new pair is made of: both must exist and be different."""
    first = session.get(Trajectory, first_id)
    second = session.get(Trajectory, second_id)
    if first is None or second is None:
        missing = first_id if first is None else second_id
        raise PairInvalid(f"trajectory {missing} does not exist; insert both trajectories before the pair")
    if first.id == second.id:
        raise PairInvalid(f"trajectory {first.id} given twice; a pair needs two different trajectories")
    return first, second


def get_pair(*, session: Session, pair_id: int) -> Pair:
    pair = session.get(Pair, pair_id)
    if pair is None:
        raise PairNotFound(pair_id)
    return pair


def pair_trajectory(*, session: Session, pair_id: int, side: str) -> Trajectory:
    """The trajectory on side 'a' or 'b' of a pair."""
    pair = get_pair(session=session, pair_id=pair_id)
    if side not in ("a", "b"):
        raise InvalidInput(f"side {side!r} is not 'a' or 'b'")
    trajectory_id = pair.trajectory_a_id if side == "a" else pair.trajectory_b_id
    trajectory = session.scalar(select(Trajectory).where(Trajectory.id == trajectory_id))
    assert trajectory is not None  # foreign key
    return trajectory


@dataclass(frozen=True)
class PairRecord:
    """A pair with its prompt and both trajectories: everything that says how its images were drawn."""

    pair: Pair
    prompt: Prompt
    a: Trajectory
    b: Trajectory


def pair_record(*, session: Session, pair_id: int) -> PairRecord:
    pair = get_pair(session=session, pair_id=pair_id)
    a = session.get_one(Trajectory, pair.trajectory_a_id)  # foreign keys: both exist
    b = session.get_one(Trajectory, pair.trajectory_b_id)
    return PairRecord(pair, session.get_one(Prompt, pair.prompt_id), a, b)


def mark_gold(*, session: Session, pair_id: int, answer: str | None, judgements: int | None = None) -> Pair:
    """Give a training pair a known answer (`answer` 'a' or 'b'; None unmarks it). Labellers' votes on it
    are then scored against the answer (core/reliability.py); `judgements` raises how many it collects
    so that several labellers are measured on it (never lowered below the judgements it already has)."""
    pair = get_pair(session=session, pair_id=pair_id)
    if answer not in (None, "a", "b"):
        raise InvalidInput(f"gold answer {answer!r} must be 'a', 'b' or null")
    if pair.kind != "train":
        raise Conflict(
            f"pair {pair_id} is an evaluation pair (two versions); mark a training pair as gold instead"
        )
    if judgements is not None:
        if judgements < 1:
            raise InvalidInput(f"judgements {judgements} must be at least 1")
        pair.required_judgements = max(pair.required_judgements, judgements)
    pair.gold = answer
    session.flush()
    return pair
