from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.deps import CurrentLabeller, SessionDep, SettingsDep
from app.ratelimit import RateLimitedLabeller
from app.responses import AUTH, BEARER, RATE_LIMITED, WRITE, error
from app.routes.pairs import assignment_public
from app.schemas import IdPath, JudgementCreate, JudgementPublic, MePublic, PairAssignmentPublic
from core.db.judgements import record_judgement, undo_judgement
from core.db.stats import labeller_progress

router = APIRouter(tags=["judgements"], dependencies=[BEARER])


@router.post(
    "/judgements",
    response_model=JudgementPublic,
    status_code=201,
    responses={200: {"model": JudgementPublic, "description": "A repeat of an earlier client_key's request."}}
    | AUTH
    | {403: error("The pair is not leased to you, or a session cookie's X-CSRF-Token is missing or wrong.")}
    | {404: error("The pair does not exist.")}
    | {409: error("You judged the pair already, it is complete, or the client_key was used for another.")}
    | RATE_LIMITED
    | WRITE,
)
def create_judgement(
    body: JudgementCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    labeller: RateLimitedLabeller,
) -> JudgementPublic:
    """Record a judgement of a pair leased to you. Idempotent: a repeated client_key records one."""
    recorded = record_judgement(
        session=session,
        labeller_id=labeller.id,
        pair_id=body.pair_id,
        choice=body.choice,
        client_key=body.client_key,
        decide_ms=body.decide_ms,
    )
    session.commit()
    if not recorded.created:
        response.status_code = 200
    elif request.app.state.refiller is not None:
        request.app.state.refiller.poke()
    return JudgementPublic.model_validate(recorded.judgement)


@router.delete(
    "/judgements/{judgement_id}",
    response_model=PairAssignmentPublic,
    responses=AUTH
    | {403: error("The undo window has passed, or a session cookie's X-CSRF-Token is missing or wrong.")}
    | {404: error("No such judgement of yours.")}
    | {409: error("Someone else is judging the pair right now.")}
    | WRITE,
)
def undo(
    judgement_id: IdPath,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    labeller: CurrentLabeller,
) -> PairAssignmentPublic:
    """Undo your own judgement within the undo window; the pair is leased back to you."""
    assignment = undo_judgement(
        session=session,
        labeller_id=labeller.id,
        judgement_id=judgement_id,
        window_seconds=settings.undo_window_seconds,
        lease_seconds=settings.lease_seconds,
    )
    session.commit()
    return assignment_public(request, assignment)


@router.get("/me", response_model=MePublic, tags=["labellers"], responses=AUTH)
def me(session: SessionDep, labeller: CurrentLabeller) -> MePublic:
    """Who you are and how many judgements you made today (UTC) and in total."""
    progress = labeller_progress(session=session, labeller_id=labeller.id)
    return MePublic(
        id=labeller.id, name=labeller.name, role=labeller.role, today=progress.today, total=progress.total
    )
