"""Human evaluation campaigns: blind votes by people on (version, baseline) image pairs.

An evaluation pair shows one image of the version under evaluation (side a) and one of the
campaign's baseline (side b), drawn from the same prompt, seed and sampler settings, so that the
policy is the only difference. Labellers get them mixed into their stream (core.db.assignment) and
cannot tell them from training pairs; the trainer never reads them (core.db.training selects
kind 'train' only). A vote is a judgement on an evaluation pair: 'a' is a win for the version,
'b' a loss, 'tie' a tie; skips are not votes. The statistics are in core.eval_stats.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from sqlalchemy import Select, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from core.db.base import utcnow
from core.db.errors import Conflict, InvalidInput, NotFound, PairInvalid
from core.db.models import SPLITS, EvalCampaign, Judgement, Pair, PolicyVersion, Prompt, Trajectory
from core.db.pairs import two_trajectories
from core.db.policies import get_current_policy, get_policy_version, set_current_policy
from core.eval_stats import Score, Vote, WinRate, bradley_terry, figures, win_rate
from core.jobs import in_full_jobs
from core.settings import EvalConfig


class CampaignNotFound(NotFound):
    def __init__(self, campaign_id: int) -> None:
        super().__init__(
            f"evaluation campaign {campaign_id} does not exist; list campaigns with GET /api/v1/evaluations"
        )


class CampaignRunning(Conflict):
    def __init__(self, existing: EvalCampaign) -> None:
        super().__init__(
            f"evaluation campaign {existing.id} (version {existing.version} vs {existing.baseline_version}) "
            "is already running; stop it first or wait for it to finish"
        )


class NoPromptsToEvaluate(Conflict):
    def __init__(self, split: str) -> None:
        super().__init__(
            f"there are no active prompts of split {split!r} to evaluate on; add some "
            f'(POST /api/v1/prompts with "split": "{split}") and start the campaign again'
        )


class CampaignNotRunning(Conflict):
    def __init__(self, campaign: EvalCampaign) -> None:
        super().__init__(f"evaluation campaign {campaign.id} has already ended ({campaign.status})")


def eval_prompt_ids(*, session: Session, split: str) -> list[int]:
    """Active prompts of `split`, in id order: the prompts a campaign draws its pairs from."""
    return list(
        session.scalars(
            select(Prompt.id).where(Prompt.active.is_(True), Prompt.split == split).order_by(Prompt.id)
        )
    )


def start_campaign(
    *,
    session: Session,
    version: int,
    baseline_version: int,
    target_votes: int,
    judgements_per_pair: int = 1,
    prompt_split: str = "eval",
    origin: str = "admin",
    created_by_id: int | None = None,
    promote_on_win: bool = False,
) -> EvalCampaign:
    """Start a campaign of `version` against `baseline_version` (the same version is allowed: an A/A
    test, whose win rate should sit at 50%)."""
    get_policy_version(session=session, version=version)
    get_policy_version(session=session, version=baseline_version)
    if target_votes < 1:
        raise InvalidInput(f"target_votes {target_votes} must be at least 1")
    if judgements_per_pair < 1:
        raise InvalidInput(f"judgements_per_pair {judgements_per_pair} must be at least 1")
    if prompt_split not in SPLITS:
        raise InvalidInput(f"prompt_split {prompt_split!r} is not one of {', '.join(SPLITS)}")
    if not eval_prompt_ids(session=session, split=prompt_split):
        raise NoPromptsToEvaluate(prompt_split)
    running = session.scalar(
        select(EvalCampaign).where(
            EvalCampaign.version == version,
            EvalCampaign.baseline_version == baseline_version,
            EvalCampaign.status == "running",
        )
    )
    if running is not None:
        raise CampaignRunning(running)
    row = EvalCampaign(
        version=version,
        baseline_version=baseline_version,
        target_votes=target_votes,
        judgements_per_pair=judgements_per_pair,
        prompt_split=prompt_split,
        status="running",
        origin=origin,
        created_by_id=created_by_id,
        created_at=utcnow(),
        promote_on_win=promote_on_win,
    )
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:  # started by someone else between the check and the insert
        raise CampaignRunning(session.scalars(_running_of(version, baseline_version)).one()) from None
    return row


def _running_of(version: int, baseline: int) -> Select[EvalCampaign]:
    return select(EvalCampaign).where(
        EvalCampaign.version == version,
        EvalCampaign.baseline_version == baseline,
        EvalCampaign.status == "running",
    )


def start_auto_campaign(*, session: Session, auto: EvalConfig) -> EvalCampaign | None:
    """Start the automatic campaign of the newest version, unless one runs already; returns it, or None.

    One automatic campaign at a time: votes then go to one comparison, which completes, instead of
    spreading over every version a fast trainer publishes (a 10-minute demo published 13 versions and
    no campaign reached its votes). Versions published while one runs are skipped; when it ends, the
    next check (each publish, and the trainer's idle loop) starts the newest version's. None also when
    auto is off, there are no prompts to evaluate on, or the comparison would be the version itself.

    The comparison is version 0 (`compare_with` base) or the version it was trained from (previous);
    with the gate on it is the current version (the one it would replace), and the campaign promotes
    the new version if it wins (`finish_if_reached`)."""
    if auto.auto_votes < 1:
        return None
    running = select(EvalCampaign.id).where(
        EvalCampaign.status == "running", EvalCampaign.origin == "publish"
    )
    if session.scalar(running.limit(1)) is not None:
        return None
    newest = session.scalar(select(PolicyVersion).order_by(PolicyVersion.version.desc()).limit(1))
    if newest is None or newest.version == 0:
        return None
    evaluated = select(EvalCampaign.id).where(
        EvalCampaign.version == newest.version, EvalCampaign.origin == "publish"
    )
    if session.scalar(evaluated.limit(1)) is not None:
        return None
    if auto.promote_if_wins:
        baseline = get_current_policy(session=session).version
    elif auto.compare_with == "base" or newest.parent_version is None:
        baseline = 0
    else:
        baseline = newest.parent_version
    if baseline == newest.version or not eval_prompt_ids(session=session, split=auto.prompt_split):
        return None
    return start_campaign(
        session=session,
        version=newest.version,
        baseline_version=baseline,
        target_votes=auto.auto_votes,
        judgements_per_pair=auto.judgements_per_pair,
        prompt_split=auto.prompt_split,
        origin="publish",
        promote_on_win=auto.promote_if_wins,
    )


def get_campaign(*, session: Session, campaign_id: int) -> EvalCampaign:
    row = session.get(EvalCampaign, campaign_id)
    if row is None:
        raise CampaignNotFound(campaign_id)
    return row


def list_campaigns(*, session: Session, version: int | None = None) -> list[EvalCampaign]:
    query = select(EvalCampaign).order_by(EvalCampaign.id)
    if version is not None:
        query = query.where(EvalCampaign.version == version)
    return list(session.scalars(query))


def running_campaigns(*, session: Session) -> list[EvalCampaign]:
    return list(
        session.scalars(
            select(EvalCampaign).where(EvalCampaign.status == "running").order_by(EvalCampaign.id)
        )
    )


def stop_campaign(*, session: Session, campaign_id: int) -> EvalCampaign:
    """End a running campaign now; its votes stay and its open pairs are no longer served."""
    row = session.get(EvalCampaign, campaign_id, with_for_update=True)
    if row is None:
        raise CampaignNotFound(campaign_id)
    if row.status != "running":
        raise CampaignNotRunning(row)
    row.status = "stopped"
    row.finished_at = utcnow()
    session.flush()
    return row


def vote_counts(*, session: Session, campaign_ids: Sequence[int] | None = None) -> dict[int, int]:
    """Votes (judgements other than skips) per campaign."""
    query = (
        select(Pair.campaign_id, func.count(Judgement.id))
        .join(Judgement, Judgement.pair_id == Pair.id)
        .where(Pair.kind == "eval", Judgement.choice != "skip")
        .group_by(Pair.campaign_id)
    )
    if campaign_ids is not None:
        query = query.where(Pair.campaign_id.in_(list(campaign_ids)))
    return {int(cid): n for cid, n in session.execute(query) if cid is not None}


def finish_if_reached(*, session: Session, campaign_id: int) -> bool:
    """Mark a running campaign done once it has its target votes; True when this call ended it."""
    row = session.get(EvalCampaign, campaign_id)
    if row is None or row.status != "running":
        return False
    if vote_counts(session=session, campaign_ids=[campaign_id]).get(campaign_id, 0) < row.target_votes:
        return False
    ended = session.execute(
        update(EvalCampaign)
        .where(EvalCampaign.id == campaign_id, EvalCampaign.status == "running")
        .values(status="done", finished_at=utcnow())
        .returning(EvalCampaign.id)
    ).scalar_one_or_none()
    session.flush()
    session.refresh(row)
    if ended is not None and row.promote_on_win:
        row.promotion = _promote_if_won(session, row)
        session.flush()
    return ended is not None


def _promote_if_won(session: Session, campaign: EvalCampaign) -> str:
    """The gate's decision at the end of a campaign, applied; returns it as a sentence."""
    result = win_rate(campaign_votes(session=session, campaign_ids=[campaign.id]))
    current = get_current_policy(session=session).version
    said = figures(result) or "no votes"
    if result.verdict != "better":
        return (
            f"not promoted: people did not clearly prefer version {campaign.version} to version "
            f"{campaign.baseline_version} ({said})"
        )
    if current != campaign.baseline_version:
        return (
            f"not promoted: it beat version {campaign.baseline_version} ({said}), but version {current} "
            "has become current since; start a campaign against it"
        )
    set_current_policy(session=session, version=campaign.version)
    return f"promoted: version {campaign.version} beat version {campaign.baseline_version} ({said})"


def campaign_votes(*, session: Session, campaign_ids: Sequence[int] | None = None) -> list[Vote]:
    """Every vote of the given campaigns (all campaigns when None), as `core.eval_stats.Vote`s."""
    return [vote for _, vote in _votes(session, campaign_ids)]


def _votes(session: Session, campaign_ids: Sequence[int] | None) -> list[tuple[int, Vote]]:
    """(campaign id, vote) for every vote of the campaigns, in judgement order, from one query.

    A choice of the side whose trajectory is the campaign's version is a win (in an A/A campaign,
    where both sides are that version, side a counts as the version).
    """
    traj_a = aliased(Trajectory)
    query = (
        select(
            EvalCampaign.id,
            Pair.prompt_id,
            EvalCampaign.version,
            EvalCampaign.baseline_version,
            traj_a.policy_version,
            Judgement.choice,
        )
        .join(Judgement, Judgement.pair_id == Pair.id)
        .join(EvalCampaign, EvalCampaign.id == Pair.campaign_id)
        .join(traj_a, traj_a.id == Pair.trajectory_a_id)
        .where(Pair.kind == "eval", Judgement.choice != "skip")
        .order_by(Judgement.id)
    )
    if campaign_ids is not None:
        query = query.where(Pair.campaign_id.in_(list(campaign_ids)))
    votes = []
    for campaign_id, prompt_id, version, baseline, version_a, choice in session.execute(query):
        version_side = "a" if version_a == version else "b"
        outcome = "tie" if choice == "tie" else ("win" if choice == version_side else "loss")
        votes.append((campaign_id, Vote(prompt_id, version, baseline, outcome)))
    return votes


def eval_pairs_per_prompt(*, session: Session, campaign_id: int) -> dict[int, int]:
    """Per prompt, how many pairs the campaign has sampled so far (to spread new ones evenly)."""
    rows = session.execute(
        select(Pair.prompt_id, func.count(Pair.id))
        .where(Pair.campaign_id == campaign_id)
        .group_by(Pair.prompt_id)
    )
    return {prompt_id: n for prompt_id, n in rows}


def pairs_wanted(
    *, session: Session, campaign: EvalCampaign, pool_pairs: int, queued: int, pairs_per_job: int = 1
) -> int:
    """How many more evaluation pairs to sample now: enough to collect the votes still missing, at most
    `pool_pairs` waiting at a time (`queued`: pairs already on their way in sampling jobs), in jobs of
    `pairs_per_job` kept full as the training pool's are (`core.jobs.in_full_jobs`)."""
    votes = vote_counts(session=session, campaign_ids=[campaign.id]).get(campaign.id, 0)
    open_pairs, open_capacity = session.execute(
        select(
            func.count(Pair.id), func.coalesce(func.sum(Pair.required_judgements - Pair.judgement_count), 0)
        ).where(Pair.campaign_id == campaign.id, Pair.judgement_count < Pair.required_judgements)
    ).one()
    missing_votes = campaign.target_votes - votes - int(open_capacity)
    by_votes = math.ceil(max(0, missing_votes) / campaign.judgements_per_pair) - queued
    wanted = max(0, min(pool_pairs - open_pairs - queued, by_votes))
    return in_full_jobs(wanted, on_hand=open_pairs + queued, pool=pool_pairs, pairs_per_job=pairs_per_job)


def create_eval_pair(
    *,
    session: Session,
    campaign_id: int,
    version_trajectory_id: int,
    baseline_trajectory_id: int,
    rng: random.Random,
) -> Pair:
    """Pair the version's trajectory with the baseline's (same prompt, same seed).

    Which one is side a is drawn at random: side letters appear in image URLs, so a fixed side would
    tell a curious labeller which image is the new version.
    """
    campaign = get_campaign(session=session, campaign_id=campaign_id)
    ours, theirs = two_trajectories(
        session=session, first_id=version_trajectory_id, second_id=baseline_trajectory_id
    )
    if (ours.policy_version, theirs.policy_version) != (campaign.version, campaign.baseline_version):
        raise PairInvalid(
            f"trajectories {ours.id} (version {ours.policy_version}) and {theirs.id} (version "
            f"{theirs.policy_version}) are not of campaign {campaign.id}'s versions {campaign.version} and "
            f"{campaign.baseline_version}"
        )
    if (ours.prompt_id, ours.seed) != (theirs.prompt_id, theirs.seed):
        raise PairInvalid(
            f"trajectories {ours.id} and {theirs.id} differ in prompt or seed; an evaluation pair needs both"
        )
    a, b = (ours, theirs) if rng.random() < 0.5 else (theirs, ours)
    pair = Pair(
        prompt_id=ours.prompt_id,
        policy_version=campaign.version,
        kind="eval",
        campaign_id=campaign.id,
        pairing="same_seed",
        trajectory_a_id=a.id,
        trajectory_b_id=b.id,
        required_judgements=campaign.judgements_per_pair,
    )
    session.add(pair)
    session.flush()
    return pair


def campaign_results(*, session: Session, campaigns: Sequence[EvalCampaign]) -> dict[int, WinRate]:
    """Each campaign's win rate of its version over its baseline, with intervals (core.eval_stats)."""
    by_campaign: dict[int, list[Vote]] = {c.id: [] for c in campaigns}
    for campaign_id, vote in _votes(session, list(by_campaign)):
        by_campaign[campaign_id].append(vote)
    return {campaign_id: win_rate(votes) for campaign_id, votes in by_campaign.items()}


def version_scores(*, session: Session) -> list[Score]:
    """A Bradley-Terry score per version from every campaign's votes, version 0 anchored at 0."""
    return bradley_terry(campaign_votes(session=session))
