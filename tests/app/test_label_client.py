"""The programmatic labeller (`densealign label`) through the REST API, as it runs against a deployment."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.models import Judgement, Labeller, Pair
from densealign.labeller import label_loop


def test_a_prompt_the_judge_cannot_read_is_skipped_not_fatal(
    annotator: tuple[TestClient, Labeller], pair_with_images: Pair, session: Session
) -> None:
    # The `pair` fixture's prompt, "a red cube on a blue table", is outside the shapes grammar the
    # faithfulness judge reads: an operator's own prompt. The labeller used to die on it.
    client, labeller = annotator
    token = client.headers["Authorization"].removeprefix("Bearer ")
    done = label_loop(base_url="", token=token, client=client, preference="faithfulness", idle_wait=0)
    assert done == 1
    stored = session.scalars(select(Judgement).where(Judgement.labeller_id == labeller.id)).all()
    assert [(j.pair_id, j.choice) for j in stored] == [(pair_with_images.id, "skip")]
