from __future__ import annotations

import datetime as dt

from fastapi import APIRouter

from app.deps import CurrentAdmin, SessionDep, SettingsDep
from app.responses import ADMIN, BEARER, NOT_FOUND, WRITE, error
from app.schemas import IdPath, InviteCreate, InvitePublic, LabellerPublic, LabellerUpdate
from core.db.labellers import create_invite, list_labellers, update_labeller

router = APIRouter(tags=["labellers"], dependencies=[BEARER])


def invite_url(settings: SettingsDep, secret: str) -> str:
    return f"{settings.public_base_url.rstrip('/')}/invite/{secret}"


@router.post(
    "/invites",
    response_model=InvitePublic,
    status_code=201,
    responses=ADMIN | {409: error("A labeller with that name exists.")} | WRITE,
)
def invite(
    body: InviteCreate, session: SessionDep, settings: SettingsDep, admin: CurrentAdmin
) -> InvitePublic:
    """Create a one-time invite link for a new labeller (shown only in this response)."""
    row, secret = create_invite(
        session=session,
        name=body.name,
        role=body.role,
        ttl=dt.timedelta(hours=settings.invite_ttl_hours),
        created_by_id=admin.id,
    )
    session.commit()
    return InvitePublic(
        name=row.name, role=row.role, url=invite_url(settings, secret), expires_at=row.expires_at
    )


@router.get("/labellers", response_model=list[LabellerPublic], responses=ADMIN)
def labellers(session: SessionDep, _: CurrentAdmin) -> list[LabellerPublic]:
    return [LabellerPublic.model_validate(row) for row in list_labellers(session=session)]


@router.patch(
    "/labellers/{labeller_id}",
    response_model=LabellerPublic,
    responses=ADMIN
    | NOT_FOUND
    | {409: error("It would leave no active admin, or it changes your own admin rights.")}
    | WRITE,
)
def change_labeller(
    labeller_id: IdPath, body: LabellerUpdate, session: SessionDep, admin: CurrentAdmin
) -> LabellerPublic:
    """Activate, deactivate, promote or demote a labeller. Deactivation ends their browser sessions and
    stops their token. 409 when it would leave no active admin, or for a change to your own admin rights."""
    row = update_labeller(
        session=session, labeller_id=labeller_id, active=body.active, role=body.role, acting_id=admin.id
    )
    session.commit()
    return LabellerPublic.model_validate(row)
