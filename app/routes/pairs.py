from __future__ import annotations

import random
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse

from app.deps import BlobStoreDep, CurrentLabeller, SessionDep, SettingsDep
from app.schemas import MAX_ID, IdPath, ImagePublic, NextPairPublic, PairAssignmentPublic, Side
from core.db.assignment import Assignment, next_pair
from core.db.errors import InvalidInput
from core.db.pairs import pair_trajectory

router = APIRouter(prefix="/pairs", tags=["pairs"])
EMPTY_POOL = "No pairs are waiting for you right now; new ones appear as the workers sample them."


def image_url(request: Request, pair_id: int, side: str) -> str:
    return str(request.url_for("pair_image", pair_id=pair_id, side=side).path)


def assignment_public(request: Request, assignment: Assignment) -> PairAssignmentPublic:
    left = assignment.left_side
    right = "b" if left == "a" else "a"
    pair_id = assignment.pair.id
    return PairAssignmentPublic(
        pair_id=pair_id,
        prompt=assignment.prompt_text,
        policy_version=assignment.pair.policy_version,
        left=ImagePublic(side=left, url=image_url(request, pair_id, left)),  # type: ignore[arg-type]
        right=ImagePublic(side=right, url=image_url(request, pair_id, right)),  # type: ignore[arg-type]
        lease_expires_at=assignment.expires_at,
    )


def _parse_exclude(raw: str | None) -> list[int]:
    if not raw:
        return []
    try:
        ids = [int(part) for part in raw.split(",") if part.strip()][:50]
    except ValueError:
        ids = [-1]
    if not all(1 <= i <= MAX_ID for i in ids):
        raise InvalidInput(f"exclude={raw!r} must be comma-separated pair ids, e.g. exclude=12,15")
    return ids


@router.get("/next", response_model=NextPairPublic)
def get_next_pair(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    labeller: CurrentLabeller,
    exclude: Annotated[str | None, Query(description="Pair ids the client already shows, e.g. 12,15")] = None,
) -> NextPairPublic:
    """Lease a pair to the caller (a short reservation), with left/right order chosen at random."""
    assignment = next_pair(
        session=session,
        labeller_id=labeller.id,
        lease_seconds=settings.lease_seconds,
        rng=random.SystemRandom(),
        exclude=_parse_exclude(exclude),
    )
    session.commit()
    if assignment is None:
        return NextPairPublic(pair=None, message=EMPTY_POOL)
    return NextPairPublic(pair=assignment_public(request, assignment))


@router.get("/{pair_id}/images/{side}", name="pair_image", response_class=Response)
def pair_image(
    pair_id: IdPath, side: Side, session: SessionDep, store: BlobStoreDep, _: CurrentLabeller
) -> Response:
    """The final image of trajectory `side` of a pair (PNG)."""
    trajectory = pair_trajectory(session=session, pair_id=pair_id, side=side)
    headers = {"Cache-Control": "private, max-age=3600"}
    path = store.local_path(trajectory.image_key)
    if path is not None:
        return FileResponse(path, media_type="image/png", headers=headers)
    return Response(store.get(trajectory.image_key), media_type="image/png", headers=headers)
