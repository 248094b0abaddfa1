"""In a real browser, the labelling page serves an evaluation pair like any other, and the key press
lands as a vote in its campaign (for the version whose image was on the side pressed)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from core.db.campaigns import campaign_results, create_eval_pair, start_campaign
from core.db.engine import make_engine, make_session_factory
from core.db.models import EvalCampaign, Judgement, Pair, Trajectory
from core.db.pairs import create_trajectory
from core.db.policies import publish_policy_version
from core.db.prompts import add_prompt
from core.storage import LocalBlobStore
from tests.app.conftest import png_bytes
from tests.e2e.conftest import LiveApp, chromium, record_csp_violations

pytestmark = pytest.mark.slow
PROMPT = "a held-out blue circle"


def add_eval_pair(db_url: str, blobs: Path) -> tuple[int, int]:
    """Version 1, one held-out prompt and a campaign of 1 vs 0 with one pair; returns (campaign, pair)."""
    store = LocalBlobStore(blobs)
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as session, session.begin():
            publish_policy_version(
                session=session, version=1, parent_version=0, lora_key="l/1", lora_sha256="0" * 64
            )
            prompt = add_prompt(session=session, text=PROMPT, split="eval")
            campaign = start_campaign(session=session, version=1, baseline_version=0, target_votes=1)
            ids = []
            for version, color in ((1, (20, 60, 220)), (0, (200, 200, 200))):
                key = f"images/eval-{version}.png"
                store.put(key, png_bytes(color, size=48))
                ids.append(
                    create_trajectory(
                        session=session, prompt_id=prompt.id, policy_version=version, seed=42, image_key=key
                    ).id
                )
            pair = create_eval_pair(
                session=session,
                campaign_id=campaign.id,
                version_trajectory_id=ids[0],
                baseline_trajectory_id=ids[1],
                rng=random.Random(0),
            )
            return campaign.id, pair.id
    finally:
        engine.dispose()


def test_an_eval_pair_is_judged_on_the_page_and_counts_in_its_campaign(
    serve_app: Callable[..., LiveApp], tmp_path: Path
) -> None:
    served = serve_app(prompts=[], invites={"kim": "annotator"}, eval={"share": 0.5})
    campaign_id, pair_id = add_eval_pair(served.db_url, tmp_path / "blobs")
    with chromium() as browser:
        page = browser.new_page()
        violations = record_csp_violations(page)
        page.goto(served.base + served.invites["kim"])
        page.click("#accept")
        page.click("#start")
        page.wait_for_selector(f"#prompt:has-text('{PROMPT}')")
        left_src = page.get_attribute("img#left", "src")
        page.keyboard.press("ArrowLeft")
        page.wait_for_selector("#status:has-text('Saved')")
        assert violations == []
    assert left_src is not None and left_src.startswith(f"/api/v1/pairs/{pair_id}/images/")
    shown_left = left_src.rsplit("/", 1)[-1]
    engine = make_engine(served.db_url)
    try:
        with make_session_factory(engine)() as session:
            (judgement,) = session.query(Judgement).filter(Judgement.pair_id == pair_id).all()
            assert (judgement.choice, judgement.shown_left) == (shown_left, shown_left)
            pair = session.get_one(Pair, pair_id)
            chosen = session.get_one(
                Trajectory, pair.trajectory_a_id if shown_left == "a" else pair.trajectory_b_id
            )
            campaign = session.get_one(EvalCampaign, campaign_id)
            result = campaign_results(session=session, campaigns=[campaign])[campaign_id]
            won = chosen.policy_version == 1
            assert (result.votes, result.wins, result.losses) == (1, int(won), int(not won))
            assert campaign.status == "done"  # its one vote was the target
    finally:
        engine.dispose()
