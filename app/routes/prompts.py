from __future__ import annotations

from fastapi import APIRouter, Query

from app.deps import CurrentAdmin, CurrentLabeller, SessionDep
from app.responses import ADMIN, AUTH, BEARER, NOT_FOUND, WRITE
from app.schemas import MAX_ID, IdPath, PromptCreate, PromptPublic, PromptUpdate, Split
from core.db import prompts as queries

router = APIRouter(prefix="/prompts", tags=["prompts"], dependencies=[BEARER])


@router.get("", response_model=list[PromptPublic], responses=AUTH)
def list_prompts(
    session: SessionDep,
    _: CurrentLabeller,
    active: bool | None = None,
    split: Split | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=MAX_ID),  # ids are 32-bit; past a bigint Postgres raised (a 500)
) -> list[PromptPublic]:
    rows = queries.list_prompts(session=session, active=active, split=split, limit=limit, offset=offset)
    return [PromptPublic.model_validate(row) for row in rows]


@router.post("", response_model=PromptPublic, status_code=201, responses=ADMIN | WRITE)
def create_prompt(body: PromptCreate, session: SessionDep, _: CurrentAdmin) -> PromptPublic:
    prompt = queries.add_prompt(session=session, text=body.text, split=body.split)
    session.commit()
    return PromptPublic.model_validate(prompt)


@router.get("/{prompt_id}", response_model=PromptPublic, responses=AUTH | NOT_FOUND)
def get_prompt(prompt_id: IdPath, session: SessionDep, _: CurrentLabeller) -> PromptPublic:
    return PromptPublic.model_validate(queries.get_prompt(session=session, prompt_id=prompt_id))


@router.patch("/{prompt_id}", response_model=PromptPublic, responses=ADMIN | NOT_FOUND | WRITE)
def update_prompt(
    prompt_id: IdPath, body: PromptUpdate, session: SessionDep, _: CurrentAdmin
) -> PromptPublic:
    prompt = queries.update_prompt(
        session=session, prompt_id=prompt_id, text=body.text, split=body.split, active=body.active
    )
    session.commit()
    return PromptPublic.model_validate(prompt)


@router.delete("/{prompt_id}", response_model=PromptPublic, responses=ADMIN | NOT_FOUND | WRITE)
def deactivate_prompt(prompt_id: IdPath, session: SessionDep, _: CurrentAdmin) -> PromptPublic:
    """Deactivate (pairs and judgements keep referring to it, so it is never deleted)."""
    prompt = queries.update_prompt(session=session, prompt_id=prompt_id, active=False)
    session.commit()
    return PromptPublic.model_validate(prompt)
