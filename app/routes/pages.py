"""Pages for labellers: invite acceptance, login by token, the labelling page, the guidelines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from app.deps import SessionDep, SettingsDep, check_csrf, cookie_labeller, csrf_token, log_in
from app.ratelimit import LoginLimit
from core.db.errors import InviteInvalid
from core.db.labellers import accept_invite, end_sessions, find_invite, labeller_by_token

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).resolve().parent.parent / "templates")


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("csrf_token", csrf_token(request))
    return templates.TemplateResponse(request, template, context, status_code=status_code)


@router.get("/")
def home(request: Request, session: SessionDep) -> Response:
    return RedirectResponse("/label" if cookie_labeller(request, session) else "/login", status_code=303)


@router.get("/invite/{secret}")
def invite_page(secret: str, request: Request, session: SessionDep) -> HTMLResponse:
    try:
        invite = find_invite(session=session, secret=secret)
    except InviteInvalid as exc:
        return render(request, "message.html", status_code=404, title="Invite not valid", message=str(exc))
    return render(request, "invite.html", name=invite.name, secret=secret)


@router.post("/invite/{secret}", dependencies=[LoginLimit])
def accept(
    secret: str, request: Request, session: SessionDep, csrf: Annotated[str | None, Form()] = None
) -> HTMLResponse:
    check_csrf(request, csrf)
    try:
        issued = accept_invite(session=session, secret=secret)
    except InviteInvalid as exc:
        return render(request, "message.html", status_code=404, title="Invite not valid", message=str(exc))
    session.commit()
    log_in(request, issued.labeller)
    return render(request, "welcome.html", labeller=issued.labeller, token=issued.token)


@router.get("/login")
def login_page(request: Request) -> HTMLResponse:
    return render(request, "login.html", error=None)


@router.post("/login", dependencies=[LoginLimit])
def login(
    request: Request,
    session: SessionDep,
    csrf: Annotated[str | None, Form()] = None,
    token: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf)
    labeller = labeller_by_token(session=session, token=token.strip()) if token.strip() else None
    if labeller is None:
        return render(
            request,
            "login.html",
            status_code=401,
            error="That token is unknown or its account is deactivated.",
        )
    log_in(request, labeller)
    return RedirectResponse("/label", status_code=303)


@router.post("/logout")
def logout(request: Request, session: SessionDep, csrf: Annotated[str | None, Form()] = None) -> Response:
    """End this session and every other browser session of the account (see README, Security)."""
    check_csrf(request, csrf)
    labeller = cookie_labeller(request, session)
    if labeller is not None:
        end_sessions(session=session, labeller_id=labeller.id)
        session.commit()
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


@router.get("/label")
def label_page(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    labeller = cookie_labeller(request, session)
    if labeller is None:
        return RedirectResponse("/login", status_code=303)
    return render(request, "label.html", labeller=labeller, undo_window=settings.undo_window_seconds)


@router.get("/guidelines")
def guidelines(request: Request) -> HTMLResponse:
    return render(request, "guidelines.html")
