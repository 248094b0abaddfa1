"""Admin pages: dashboard, prompts and labellers. Forms post back here with a CSRF token."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from app.charts import bar_chart, line_chart
from app.deps import SessionDep, SettingsDep, check_csrf, cookie_labeller
from app.errors import LoginRequired, status_for
from app.routes.evaluations import evaluation_panel
from app.routes.labellers import invite_url
from app.routes.pages import render
from app.routes.stats import collect_stats
from app.schemas import IdPath
from core.db.errors import DomainError
from core.db.heartbeats import process_statuses
from core.db.labellers import create_invite, update_labeller
from core.db.models import Labeller
from core.db.policies import get_current_policy, list_policy_versions, set_current_policy
from core.db.prompts import add_prompt, import_prompts, list_prompts, update_prompt
from core.db.reliability import is_paused
from core.db.sampler_groups import configured_sampler
from core.db.stats import sampler_backlog

router = APIRouter(prefix="/admin", include_in_schema=False)
CsrfField = Annotated[str | None, Form(alias="csrf")]


def admin_page(request: Request, session: SessionDep) -> Labeller:
    """The signed-in admin; without a session the browser goes to the login page (`LoginRequired`)."""
    labeller = cookie_labeller(request, session)
    if labeller is None:
        raise LoginRequired
    if labeller.role != "admin":
        raise HTTPException(status_code=403, detail=f"labeller {labeller.name!r} is not an admin")
    return labeller


def admin_form(request: Request, session: SessionDep, csrf: CsrfField = None) -> Labeller:
    """The signed-in admin posting a form of ours: its CSRF token is checked first."""
    check_csrf(request, csrf)
    return admin_page(request, session)


AdminPage = Annotated[Labeller, Depends(admin_page)]
AdminForm = Annotated[Labeller, Depends(admin_form)]


@router.get("")
def dashboard(request: Request, session: SessionDep, settings: SettingsDep, admin: AdminPage) -> Response:
    stats = collect_stats(session)
    processes = process_statuses(session=session, max_age=heartbeat_max_age(settings.heartbeat_seconds))
    backlog = sampler_backlog(
        session=session,
        sampler=configured_sampler(settings.sampler),
        max_version_lag=settings.dpo.max_version_lag,
        min_new_pairs=settings.dpo.min_new_pairs,
    )
    versions = list_policy_versions(session=session)
    current = get_current_policy(session=session).version if versions else None
    metric_names = sorted({name for v in versions for name, value in v.metrics.items() if _is_number(value)})
    charts = {
        name: line_chart(
            [(v.version, float(v.metrics[name])) for v in versions if _is_number(v.metrics.get(name))]
        )
        for name in metric_names
    }
    return render(
        request,
        "admin/dashboard.html",
        labeller=admin,
        stats=stats,
        versions=versions,
        current=current,
        charts=charts,
        rate_chart=bar_chart(stats.labels_per_hour),
        processes=processes,
        sampler_backlog=backlog,
        **evaluation_panel(session, settings),
    )


def heartbeat_max_age(period: float) -> dt.timedelta:
    """How long a process may stay silent before the dashboard calls it gone: three missed beats."""
    return dt.timedelta(seconds=max(30.0, 3 * period))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@router.post("/policies/current")
def rollback(
    request: Request, session: SessionDep, version: Annotated[int, Form()], admin: AdminForm
) -> Response:
    set_current_policy(session=session, version=version)
    session.commit()
    return RedirectResponse("/admin", status_code=303)


@router.get("/prompts")
def prompts_page(
    request: Request, session: SessionDep, admin: AdminPage, error: str | None = None
) -> Response:
    rows = list_prompts(session=session, limit=1000)
    return render(request, "admin/prompts.html", labeller=admin, prompts=rows, error=error)


@router.post("/prompts")
def add_prompt_form(
    request: Request,
    session: SessionDep,
    admin: AdminForm,
    text: Annotated[str, Form()] = "",
    split: Annotated[str, Form()] = "train",
) -> Response:
    try:
        add_prompt(session=session, text=text, split=split)
    except DomainError as exc:
        return _prompts_error(request, session, admin, str(exc))
    session.commit()
    return RedirectResponse("/admin/prompts", status_code=303)


@router.post("/prompts/import")
async def import_prompts_form(
    request: Request,
    session: SessionDep,
    admin: AdminForm,
    file: UploadFile,
    split: Annotated[str, Form()] = "train",
) -> Response:
    try:
        lines = (await file.read()).decode("utf-8").splitlines()
        import_prompts(session=session, lines=lines, split=split)
    except UnicodeDecodeError:
        return _prompts_error(
            request, session, admin, "the file is not UTF-8 text; save it as UTF-8 and retry"
        )
    except DomainError as exc:
        return _prompts_error(request, session, admin, str(exc))
    session.commit()
    return RedirectResponse("/admin/prompts", status_code=303)


@router.post("/prompts/{prompt_id}/active")
def toggle_prompt(
    prompt_id: IdPath,
    request: Request,
    session: SessionDep,
    admin: AdminForm,
    active: Annotated[bool, Form()],
) -> Response:
    update_prompt(session=session, prompt_id=prompt_id, active=active)
    session.commit()
    return RedirectResponse("/admin/prompts", status_code=303)


def _prompts_error(request: Request, session: SessionDep, admin: Labeller, message: str) -> HTMLResponse:
    session.rollback()
    rows = list_prompts(session=session, limit=1000)
    return render(request, "admin/prompts.html", status_code=422, labeller=admin, prompts=rows, error=message)


@router.get("/labellers")
def labellers_page(request: Request, session: SessionDep, admin: AdminPage) -> Response:
    return _labellers(request, session, admin)


def _labellers(
    request: Request,
    session: SessionDep,
    admin: Labeller,
    *,
    invite: str | None = None,
    error: str | None = None,
    status_code: int = 422,
) -> HTMLResponse:
    stats = collect_stats(session)
    reliability = request.app.state.settings.reliability
    measured = session.scalars(select(Labeller).where(Labeller.ability_high.is_not(None)))
    paused = {
        row.id
        for row in measured
        if is_paused(row, pause_below=reliability.pause_below, min_votes=reliability.pause_min_votes)
    }
    return render(
        request,
        "admin/labellers.html",
        status_code=status_code if error else 200,
        labeller=admin,
        rows=stats.labellers,
        paused=paused,
        invite=invite,
        error=error,
    )


@router.post("/labellers/invite")
def invite_form(
    request: Request,
    session: SessionDep,
    admin: AdminForm,
    settings: SettingsDep,
    name: Annotated[str, Form()] = "",
    role: Annotated[str, Form()] = "annotator",
) -> Response:
    if not name.strip():
        return _labellers(request, session, admin, error="give the new labeller a name")
    try:
        _, secret = create_invite(
            session=session,
            name=name.strip(),
            role=role,
            ttl=dt.timedelta(hours=settings.invite_ttl_hours),
            created_by_id=admin.id,
        )
    except DomainError as exc:
        session.rollback()
        return _labellers(request, session, admin, error=str(exc))
    session.commit()
    return _labellers(request, session, admin, invite=invite_url(settings, secret))


@router.post("/labellers/{labeller_id}/active")
def toggle_labeller(
    labeller_id: IdPath,
    request: Request,
    session: SessionDep,
    admin: AdminForm,
    active: Annotated[bool, Form()],
) -> Response:
    try:
        update_labeller(session=session, labeller_id=labeller_id, active=active, acting_id=admin.id)
    except DomainError as exc:
        session.rollback()
        return _labellers(request, session, admin, error=str(exc), status_code=status_for(exc))
    session.commit()
    return RedirectResponse("/admin/labellers", status_code=303)
