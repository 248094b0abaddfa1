"""Admin forms that start and stop human evaluation campaigns (the dashboard shows them)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from app.deps import SessionDep
from app.errors import status_for
from app.routes.admin import AdminForm
from app.routes.pages import render
from core.db.campaigns import start_campaign, stop_campaign
from core.db.errors import DomainError

router = APIRouter(prefix="/admin/evaluations", include_in_schema=False)


@router.post("")
def start_form(
    request: Request,
    session: SessionDep,
    admin: AdminForm,
    version: Annotated[int, Form(ge=0)],
    baseline_version: Annotated[int, Form(ge=0)] = 0,
    target_votes: Annotated[int, Form(ge=1, le=1_000_000)] = 200,
    prompt_split: Annotated[str, Form()] = "eval",
) -> Response:
    settings = request.app.state.settings
    try:
        start_campaign(
            session=session,
            version=version,
            baseline_version=baseline_version,
            target_votes=target_votes,
            judgements_per_pair=settings.eval.judgements_per_pair,
            prompt_split=prompt_split,
            origin="admin",
            created_by_id=admin.id,
        )
    except DomainError as exc:
        return _refused(request, "Evaluation not started", exc)
    session.commit()
    return RedirectResponse("/admin#evaluation", status_code=303)


@router.post("/{campaign_id}/stop")
def stop_form(request: Request, session: SessionDep, campaign_id: int, _: AdminForm) -> Response:
    try:
        stop_campaign(session=session, campaign_id=campaign_id)
    except DomainError as exc:
        return _refused(request, "Evaluation not stopped", exc)
    session.commit()
    return RedirectResponse("/admin#evaluation", status_code=303)


def _refused(request: Request, title: str, exc: DomainError) -> Response:
    return render(request, "message.html", status_code=status_for(exc), title=title, message=str(exc))
