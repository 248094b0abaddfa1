"""Evaluation campaigns on real Postgres: pairs of two versions from one seed, served blind at a share,
never trained on, counted as votes, and ended at their target."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy.orm import Session

from core.db.assignment import next_pair
from core.db.campaigns import (
    CampaignRunning,
    NoPromptsToEvaluate,
    campaign_results,
    campaign_votes,
    create_eval_pair,
    pairs_wanted,
    start_auto_campaign,
    start_campaign,
    stop_campaign,
)
from core.db.errors import InvalidInput, PairInvalid
from core.db.judgements import record_judgement
from core.db.models import EvalCampaign, Labeller, Pair, PolicyVersion, Prompt, Trajectory
from core.db.pairs import create_trajectory
from core.db.policies import get_current_policy, publish_policy_version, set_current_policy
from core.db.prompts import add_prompt
from core.db.training import fresh_pair_groups, preference_pairs, record_round_pairs, start_training_round
from core.pool import refill_pool
from core.queue import MemorySlots
from core.settings import EvalConfig

SAMPLER = {"num_steps": 3}


@pytest.fixture
def versions(session: Session, policy_version: PolicyVersion) -> tuple[int, int]:
    publish_policy_version(
        session=session, version=1, parent_version=0, lora_key="loras/1", lora_sha256="0" * 64
    )
    return 1, 0


@pytest.fixture
def eval_prompts(session: Session) -> list[Prompt]:
    return [add_prompt(session=session, text=f"held-out prompt {i}", split="eval") for i in range(3)]


@pytest.fixture
def campaign(session: Session, versions: tuple[int, int], eval_prompts: list[Prompt]) -> EvalCampaign:
    return start_campaign(session=session, version=1, baseline_version=0, target_votes=6)


def eval_pair(session: Session, campaign: EvalCampaign, prompt_id: int, rng: random.Random) -> Pair:
    seed = rng.getrandbits(40)
    ours, theirs = (
        create_trajectory(
            session=session,
            prompt_id=prompt_id,
            policy_version=v,
            seed=seed,
            image_key=f"images/eval/{uuid.uuid4().hex}.png",
            sampler=SAMPLER,
        )
        for v in (campaign.version, campaign.baseline_version)
    )
    return create_eval_pair(
        session=session,
        campaign_id=campaign.id,
        version_trajectory_id=ours.id,
        baseline_trajectory_id=theirs.id,
        rng=rng,
    )


def judge(session: Session, labeller: Labeller, choose: Callable[[Pair], str]) -> Pair:
    """Lease the next evaluation pair to `labeller` and store the choice `choose(pair)` makes."""
    assignment = next_pair(session=session, labeller_id=labeller.id, lease_seconds=60, eval_share=1.0)
    assert assignment is not None and assignment.pair.kind == "eval"
    pair = assignment.pair
    record_judgement(
        session=session,
        labeller_id=labeller.id,
        pair_id=pair.id,
        choice=choose(pair),
        client_key=uuid.uuid4().hex,
    )
    return pair


def version_side(session: Session, pair: Pair) -> str:
    a = session.get_one(Trajectory, pair.trajectory_a_id)
    return "a" if a.policy_version == pair.policy_version else "b"


def test_campaign_needs_prompts_and_one_at_a_time(
    session: Session, versions: tuple[int, int], eval_prompts: list[Prompt]
) -> None:
    with pytest.raises(NoPromptsToEvaluate, match="no active prompts of split 'train'"):
        start_campaign(session=session, version=1, baseline_version=0, target_votes=5, prompt_split="train")
    first = start_campaign(session=session, version=1, baseline_version=0, target_votes=5)
    with pytest.raises(CampaignRunning, match=f"campaign {first.id} "):
        start_campaign(session=session, version=1, baseline_version=0, target_votes=5)
    stop_campaign(session=session, campaign_id=first.id)
    second = start_campaign(session=session, version=1, baseline_version=0, target_votes=5)
    assert (first.status, second.status) == ("stopped", "running")


def test_one_automatic_campaign_at_a_time_for_the_newest_version(
    session: Session, versions: tuple[int, int], eval_prompts: list[Prompt]
) -> None:
    publish_policy_version(session=session, version=2, parent_version=1, lora_key="l/2", lora_sha256="1" * 64)
    assert start_auto_campaign(session=session, auto=EvalConfig(auto_votes=0)) is None
    first = start_auto_campaign(session=session, auto=EvalConfig(auto_votes=40, compare_with="previous"))
    assert first is not None
    assert (first.version, first.baseline_version, first.origin, first.target_votes) == (2, 1, "publish", 40)
    # versions published while it runs wait; an admin's campaign does not count as the automatic one
    publish_policy_version(session=session, version=3, parent_version=2, lora_key="l/3", lora_sha256="3" * 64)
    start_campaign(session=session, version=1, baseline_version=0, target_votes=5)
    assert start_auto_campaign(session=session, auto=EvalConfig(auto_votes=40)) is None
    publish_policy_version(session=session, version=4, parent_version=3, lora_key="l/4", lora_sha256="4" * 64)
    stop_campaign(session=session, campaign_id=first.id)
    # the next one takes the newest version (3 is skipped), against version 0 by default
    second = start_auto_campaign(session=session, auto=EvalConfig(auto_votes=40))
    assert second is not None and (second.version, second.baseline_version) == (4, 0)
    stop_campaign(session=session, campaign_id=second.id)
    assert start_auto_campaign(session=session, auto=EvalConfig(auto_votes=40)) is None, "4 was evaluated"


def test_eval_pair_must_share_prompt_and_seed(
    session: Session, campaign: EvalCampaign, eval_prompts: list[Prompt]
) -> None:
    a, b = (
        create_trajectory(
            session=session, prompt_id=eval_prompts[0].id, policy_version=v, seed=seed, image_key=f"i/{v}.png"
        )
        for v, seed in ((1, 5), (0, 6))
    )
    with pytest.raises(PairInvalid, match="differ in prompt or seed"):
        create_eval_pair(
            session=session,
            campaign_id=campaign.id,
            version_trajectory_id=a.id,
            baseline_trajectory_id=b.id,
            rng=random.Random(0),
        )
    with pytest.raises(PairInvalid, match="not of campaign"):
        create_eval_pair(
            session=session,
            campaign_id=campaign.id,
            version_trajectory_id=b.id,
            baseline_trajectory_id=a.id,
            rng=random.Random(0),
        )


def test_votes_count_for_the_chosen_version_whichever_side_it_is_on(
    session: Session,
    campaign: EvalCampaign,
    eval_prompts: list[Prompt],
    make_labeller: Callable[..., tuple[Labeller, str]],
) -> None:
    rng = random.Random(3)
    pairs = [eval_pair(session, campaign, eval_prompts[i % 3].id, rng) for i in range(6)]
    assert {version_side(session, p) for p in pairs} == {"a", "b"}, (
        "the version's image should be on either side"
    )
    # The labeller prefers version 1's image 4 times, the baseline's once, and ties once: 4.5 / 6.
    wanted = ["win", "win", "loss", "win", "tie", "win"]
    labeller = make_labeller()[0]
    for outcome in wanted:

        def choose(pair: Pair, outcome: str = outcome) -> str:
            ours = version_side(session, pair)
            return {"win": ours, "loss": "b" if ours == "a" else "a", "tie": "tie"}[outcome]

        judge(session, labeller, choose)
    votes = campaign_votes(session=session, campaign_ids=[campaign.id])
    assert [v.outcome for v in votes] == wanted
    result = campaign_results(session=session, campaigns=[campaign])[campaign.id]
    assert (result.votes, result.wins, result.losses, result.ties) == (6, 4, 1, 1)
    assert result.rate == pytest.approx(4.5 / 6)
    # the sixth vote reached the target of 6: the campaign ended, and its pairs are no longer served
    session.refresh(campaign)
    assert campaign.status == "done" and campaign.finished_at is not None


def test_eval_pairs_never_enter_a_training_round(
    session: Session,
    campaign: EvalCampaign,
    eval_prompts: list[Prompt],
    make_labeller: Callable[..., tuple[Labeller, str]],
    make_pair: Callable[..., Pair],
) -> None:
    rng = random.Random(1)
    evals = [eval_pair(session, campaign, eval_prompts[0].id, rng) for _ in range(3)]
    train = make_pair()
    labeller = make_labeller()[0]
    for _ in evals:
        judge(session, labeller, lambda pair: "a")
    assignment = next_pair(session=session, labeller_id=labeller.id, lease_seconds=60)
    assert assignment is not None and assignment.pair.id == train.id
    record_judgement(session=session, labeller_id=labeller.id, pair_id=train.id, choice="a", client_key="t1")
    decided = preference_pairs(session=session, complete_only=False)
    assert [p.pair_id for p in decided] == [train.id]
    groups = fresh_pair_groups(session=session, min_version=0, sampler=None)
    assert [p.pair_id for p in groups.usable] == [train.id]
    assert sum(c.pairs for c in groups.counts) == 1
    round_ = start_training_round(session=session, base_version=1)
    smuggled = [type(decided[0])(**{**decided[0].__dict__, "pair_id": evals[0].id})]
    with pytest.raises(InvalidInput, match=f"pair {evals[0].id} is an evaluation pair"):
        record_round_pairs(session=session, round_id=round_.id, pairs=smuggled)


def test_share_of_eval_pairs_is_honoured(
    session: Session,
    campaign: EvalCampaign,
    eval_prompts: list[Prompt],
    make_labeller: Callable[..., tuple[Labeller, str]],
    make_pair: Callable[..., Pair],
) -> None:
    campaign.target_votes = 10_000
    rng = random.Random(7)
    for i in range(120):
        eval_pair(session, campaign, eval_prompts[i % 3].id, rng)
        make_pair()
    labeller = make_labeller()[0]
    served = []
    draw = random.Random(11)
    for _ in range(100):
        assignment = next_pair(
            session=session, labeller_id=labeller.id, lease_seconds=60, rng=draw, eval_share=0.25
        )
        assert assignment is not None
        served.append(assignment.pair.kind)
        record_judgement(
            session=session,
            labeller_id=labeller.id,
            pair_id=assignment.pair.id,
            choice="skip",
            client_key=uuid.uuid4().hex,
        )
    # 100 draws at p = 0.25: mean 25, sd 4.3; 4 sd either side.
    assert 8 <= served.count("eval") <= 42
    # share 0 never serves one; a stopped campaign's pairs are not served either
    assignment = next_pair(session=session, labeller_id=labeller.id, lease_seconds=60, eval_share=0.0)
    assert assignment is not None and assignment.pair.kind == "train"
    stop_campaign(session=session, campaign_id=campaign.id)
    other = make_labeller()[0]
    for _ in range(5):
        assignment = next_pair(session=session, labeller_id=other.id, lease_seconds=60, eval_share=1.0)
        assert assignment is not None and assignment.pair.kind == "train"
        record_judgement(
            session=session,
            labeller_id=other.id,
            pair_id=assignment.pair.id,
            choice="skip",
            client_key=uuid.uuid4().hex,
        )


def test_pairs_wanted_stops_at_the_votes_still_missing(
    session: Session, campaign: EvalCampaign, eval_prompts: list[Prompt]
) -> None:
    # target 6 votes, 1 per pair, pool of 4: four now (the pool), then up to the target
    assert pairs_wanted(session=session, campaign=campaign, pool_pairs=4, queued=0) == 4
    assert pairs_wanted(session=session, campaign=campaign, pool_pairs=4, queued=3) == 1
    rng = random.Random(2)
    for i in range(4):
        eval_pair(session, campaign, eval_prompts[i % 3].id, rng)
    assert pairs_wanted(session=session, campaign=campaign, pool_pairs=8, queued=0) == 2
    assert pairs_wanted(session=session, campaign=campaign, pool_pairs=8, queued=2) == 0


@pytest.mark.parametrize(("outcome", "promoted"), [("win", True), ("loss", False)])
def test_the_gate_promotes_a_version_only_when_people_prefer_it(
    session: Session,
    versions: tuple[int, int],
    eval_prompts: list[Prompt],
    make_labeller: Callable[..., tuple[Labeller, str]],
    outcome: str,
    promoted: bool,
) -> None:
    # version 2 published by a gated trainer: not current; its campaign compares it with the current (1)
    set_current_policy(session=session, version=1)
    publish_policy_version(
        session=session, version=2, parent_version=1, lora_key="l/2", lora_sha256="2" * 64, make_current=False
    )
    gate = EvalConfig(auto_votes=8, promote_if_wins=True)
    campaign = start_auto_campaign(session=session, auto=gate)
    assert campaign is not None and (campaign.baseline_version, campaign.promote_on_win) == (1, True)
    rng = random.Random(4)
    for i in range(8):
        eval_pair(session, campaign, eval_prompts[i % 3].id, rng)
    labeller = make_labeller()[0]
    for _ in range(8):

        def choose(pair: Pair) -> str:
            ours = version_side(session, pair)
            return ours if outcome == "win" else ("b" if ours == "a" else "a")

        judge(session, labeller, choose)
    session.refresh(campaign)
    assert campaign.status == "done"
    assert get_current_policy(session=session).version == (2 if promoted else 1)
    assert campaign.promotion is not None
    if promoted:
        assert campaign.promotion.startswith("promoted: version 2 beat version 1 (100% of 8 votes")
    else:
        assert campaign.promotion.startswith(
            "not promoted: people did not clearly prefer version 2 to version 1 (0% of 8"
        )


def test_the_gate_does_not_promote_over_a_newer_current_version(
    session: Session,
    versions: tuple[int, int],
    eval_prompts: list[Prompt],
    make_labeller: Callable[..., tuple[Labeller, str]],
) -> None:
    campaign = start_campaign(
        session=session, version=1, baseline_version=0, target_votes=8, promote_on_win=True
    )
    set_current_policy(session=session, version=0)
    rng = random.Random(9)
    for i in range(8):
        eval_pair(session, campaign, eval_prompts[i % 3].id, rng)
    publish_policy_version(session=session, version=2, parent_version=0, lora_key="l/2", lora_sha256="2" * 64)
    labeller = make_labeller()[0]
    for _ in range(8):
        judge(session, labeller, lambda pair: version_side(session, pair))
    session.refresh(campaign)
    assert get_current_policy(session=session).version == 2
    assert campaign.promotion is not None and "version 2 has become current since" in campaign.promotion


class RecordingQueue:
    """The embedded queue's interface, recording evaluation jobs; `done` marks jobs as finished."""

    def __init__(self) -> None:
        self.slots = MemorySlots()
        self.jobs: list[tuple[int, list[int]]] = []
        self.done: set[str] = set()

    @contextmanager
    def claim_slots(self) -> Iterator[MemorySlots]:
        yield self.slots

    def enqueue_eval_pairs(self, campaign_id: int, prompt_ids: list[int]) -> str:
        self.jobs.append((campaign_id, prompt_ids))
        return f"job-{len(self.jobs)}"

    def enqueue_sample_pairs(self, prompt_ids: list[int]) -> str:
        raise AssertionError("no training prompts here")

    def is_active(self, job_id: str) -> bool:
        return job_id not in self.done

    def depth(self) -> int:
        return len(self.jobs) - len(self.done)


def test_refill_keeps_a_campaign_pool_in_full_jobs_spread_over_prompts(
    session: Session,
    campaign: EvalCampaign,
    eval_prompts: list[Prompt],
    make_labeller: Callable[..., tuple[Labeller, str]],
) -> None:
    campaign.target_votes = 20
    queue = RecordingQueue()

    def refill() -> int:
        return refill_pool(
            session=session,
            queue=queue,  # type: ignore[arg-type]
            target_per_prompt=2,
            max_version_lag=2,
            pairs_per_job=4,
            eval_pool_pairs=8,
        )

    assert refill() == 8
    assert [len(ids) for _, ids in queue.jobs] == [4, 4]
    spread = Counter(pid for _, ids in queue.jobs for pid in ids)
    assert sorted(spread.values()) == [2, 3, 3] and set(spread) == {p.id for p in eval_prompts}
    assert refill() == 0, "queued jobs count against the pool"
    # the worker runs both jobs: 8 open pairs
    rng = random.Random(6)
    for _, ids in queue.jobs:
        for pid in ids:
            eval_pair(session, campaign, pid, rng)
    queue.done = {"job-1", "job-2"}
    assert refill() == 0
    labeller = make_labeller()[0]
    judge(session, labeller, lambda pair: "a")
    assert refill() == 0, "one free slot is not a full job while the pool is mostly on hand"
    for _ in range(2):
        judge(session, labeller, lambda pair: "a")
    assert refill() == 0, "3 free slots: still not a full job, 5 of 8 on hand"
    judge(session, labeller, lambda pair: "a")
    # 4 open, 4 free slots, 12 votes still missing beyond the open pairs: one full job of 4
    assert refill() == 4 and [len(ids) for _, ids in queue.jobs] == [4, 4, 4]
    queue.done.add("job-3")
    for _ in range(3):
        judge(session, labeller, lambda pair: "a")
    # job 3 ended without pairs (it failed for good): 1 open pair, 7 free slots; the full job of 4 brings
    # half the pool on hand, so the 3 left wait for more votes
    assert refill() == 4 and [len(ids) for _, ids in queue.jobs][3:] == [4]
    for _ in range(1):
        judge(session, labeller, lambda pair: "a")
    queue.done.add("job-4")
    # nothing open and nothing queued (job 4 made no pairs either): all 8, as full jobs
    assert refill() == 8 and [len(ids) for _, ids in queue.jobs][4:] == [4, 4]
