from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.deps import CurrentAdmin, SessionDep, SettingsDep
from app.responses import ADMIN, BEARER
from core.db.dataset import iter_judged_pairs

router = APIRouter(tags=["dataset"], dependencies=[BEARER])


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses=ADMIN
    | {200: {"content": {"application/x-ndjson": {}}, "description": "One judgement per line."}},
)
def export(session: SessionDep, settings: SettingsDep, _: CurrentAdmin) -> StreamingResponse:
    """Every judgement as JSON lines: prompt, image URLs, choice, labeller id, policy version, and per
    side the trajectory id, seed and sampler record (settings, scheduler, base model)."""
    base = settings.public_base_url.rstrip("/")
    rows = list(iter_judged_pairs(session=session))  # read now: the session closes after this returns

    def lines() -> Iterator[bytes]:
        for row in rows:
            pair_id = row["pair_id"]
            row["image_a_url"] = f"{base}/api/v1/pairs/{pair_id}/images/a"
            row["image_b_url"] = f"{base}/api/v1/pairs/{pair_id}/images/b"
            yield (json.dumps(row) + "\n").encode()

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="judgements.jsonl"'},
    )
