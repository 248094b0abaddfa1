from __future__ import annotations

import random
import re
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse

from app.deps import BlobStoreDep, CurrentAdmin, CurrentLabeller, SessionDep, SettingsDep
from app.responses import ADMIN, AUTH, BEARER, BLOB_CORRUPT, NOT_FOUND, WRITE, error
from app.schemas import (
    ID_LIST_PATTERN,
    GoldMark,
    IdPath,
    ImagePublic,
    NextPairPublic,
    PairAssignmentPublic,
    PairPublic,
    PromptRefPublic,
    SamplerRecordPublic,
    Side,
    TrajectorySamplingPublic,
)
from core.db.assignment import Assignment, next_pair
from core.db.errors import InvalidInput
from core.db.models import Trajectory
from core.db.pairs import mark_gold, pair_record, pair_trajectory
from core.db.reliability import is_paused

router = APIRouter(prefix="/pairs", tags=["pairs"], dependencies=[BEARER])
EMPTY_POOL = "No pairs are waiting for you right now; new ones appear as the workers sample them."
PAUSED = (
    "Your judgements are paused: on pairs with a known answer or judged by others too, your choices "
    "have agreed with them less often than this project requires. Everything you judged is kept; "
    "please read the guidelines and ask an admin to look at it with you."
)


# `url_for` walks the route table on every call; the image path differs only in its two parameters,
# so it is built once per root path and then filled in.
_IMAGE_PATHS: dict[str, str] = {}


def image_url(request: Request, pair_id: int, side: str) -> str:
    root_path = request.scope.get("root_path", "")
    template = _IMAGE_PATHS.get(root_path)
    if template is None:
        sample = str(request.url_for("pair_image", pair_id=1, side="a").path)  # ends in pair_image's path
        template = _IMAGE_PATHS[root_path] = sample.removesuffix("/1/images/a") + "/{pair_id}/images/{side}"
    return template.format(pair_id=pair_id, side=side)


def assignment_public(request: Request, assignment: Assignment) -> PairAssignmentPublic:
    left = assignment.shown_left
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
    """The pair ids in `exclude` (the first 50); its documented pattern is the whole check."""
    if raw is None:
        return []
    if not re.fullmatch(ID_LIST_PATTERN, raw):
        raise InvalidInput(f"exclude={raw!r} must be comma-separated pair ids, e.g. exclude=12,15")
    return [int(part) for part in raw.split(",") if part][:50]


@router.get("/next", response_model=NextPairPublic, responses=AUTH)
def get_next_pair(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    labeller: CurrentLabeller,
    exclude: Annotated[
        str | None,
        Query(
            description="Pair ids the client already shows, e.g. 12,15",
            json_schema_extra={"pattern": ID_LIST_PATTERN},
        ),
    ] = None,
) -> NextPairPublic:
    """Lease a pair to the caller (a short reservation), with left/right order chosen at random; none
    while the caller is paused for low measured reliability (`paused`, with a message)."""
    reliability = settings.reliability
    if is_paused(labeller, pause_below=reliability.pause_below, min_votes=reliability.pause_min_votes):
        return NextPairPublic(pair=None, message=PAUSED, paused=True)
    assignment = next_pair(
        session=session,
        labeller_id=labeller.id,
        lease_seconds=settings.lease_seconds,
        rng=random.SystemRandom(),
        exclude=_parse_exclude(exclude),
        eval_share=settings.eval.share,
    )
    session.commit()
    if assignment is None:
        return NextPairPublic(pair=None, message=EMPTY_POOL)
    return NextPairPublic(pair=assignment_public(request, assignment))


@router.get("/{pair_id}", response_model=PairPublic, responses=ADMIN | NOT_FOUND)
def get_pair(pair_id: IdPath, request: Request, session: SessionDep, _: CurrentAdmin) -> PairPublic:
    """A pair's sampling record: per side the seed, policy version, sampler settings, scheduler and
    base model the worker drew it with, enough to redraw the image in a stock diffusers pipeline."""
    record = pair_record(session=session, pair_id=pair_id)
    pair = record.pair

    def side(name: str, trajectory: Trajectory) -> TrajectorySamplingPublic:
        return TrajectorySamplingPublic(
            trajectory_id=trajectory.id,
            seed=trajectory.seed,
            z0_seed=trajectory.z0_seed,
            policy_version=trajectory.policy_version,
            image_url=image_url(request, pair.id, name),
            sampler=SamplerRecordPublic.from_record(trajectory.sampler or {}),
        )

    return PairPublic(
        id=pair.id,
        prompt=PromptRefPublic(id=record.prompt.id, text=record.prompt.text),
        policy_version=pair.policy_version,
        created_at=pair.created_at,
        required_judgements=pair.required_judgements,
        judgement_count=pair.judgement_count,
        pairing=pair.pairing,
        gold=pair.gold,  # type: ignore[arg-type]
        a=side("a", record.a),
        b=side("b", record.b),
    )


@router.put(
    "/{pair_id}/gold",
    response_model=PairPublic,
    responses=ADMIN | NOT_FOUND | {409: error("The pair is an evaluation pair.")} | WRITE,
)
def put_gold(
    pair_id: IdPath, body: GoldMark, request: Request, session: SessionDep, admin: CurrentAdmin
) -> PairPublic:
    """Mark a training pair's known answer (admin): votes on it then measure each labeller's reliability
    (the labellers page); `judgements` lets more labellers see it. `answer: null` unmarks it."""
    mark_gold(session=session, pair_id=pair_id, answer=body.answer, judgements=body.judgements)
    session.commit()
    return get_pair(pair_id, request, session, admin)


@router.get(
    "/{pair_id}/images/{side}",
    name="pair_image",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The image."}}
    | AUTH
    | NOT_FOUND
    | BLOB_CORRUPT,
)
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
