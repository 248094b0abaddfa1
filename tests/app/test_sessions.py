"""Server-side session ends: a cookie copied before logout or deactivation stays dead, and the admins
cannot lock themselves out (no self-deactivation or self-demotion, never zero active admins, also
when two admins act on each other at the same moment)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from core.db.engine import make_engine, make_session_factory
from core.db.errors import LastActiveAdmin, NotAnActiveAdmin
from core.db.labellers import create_labeller, update_labeller
from core.db.models import Labeller
from tests.app.test_authz_matrix import _csrf
from tests.app.test_hostile_input import _session_cookie
from tests.conftest import migrate, scratch_postgres_database

COOKIE = "densealign_session"
MakeLabeller = Callable[..., tuple[Labeller, str]]


def browser_login(app: FastAPI, token: str) -> TestClient:
    """A browser logged in through the /login form with `token`."""
    browser = TestClient(app)
    csrf = _csrf(browser.get("/login").text)
    answer = browser.post("/login", data={"csrf": csrf, "token": token}, follow_redirects=False)
    assert (answer.status_code, answer.headers["location"]) == (303, "/label")
    return browser


def replay(app: FastAPI, cookie: str) -> TestClient:
    """A fresh browser that holds nothing but a copied session cookie."""
    return TestClient(app, cookies={COOKIE: cookie})


ENDED = "this session has ended (logged out, or the account was deactivated); log in again at /login"


def assert_logged_out(browser: TestClient, detail: str = ENDED) -> None:
    me = browser.get("/api/v1/me")
    assert me.status_code == 401, f"a dead session still reads /api/v1/me: {me.status_code} {me.text}"
    assert me.json()["detail"] == detail
    for page in ("/label", "/admin"):
        answer = browser.get(page, follow_redirects=False)
        assert (answer.status_code, answer.headers.get("location")) == (303, "/login"), page


def epoch_of(session: Session, labeller: Labeller) -> tuple[int, bool, str]:
    """(session_epoch, active, role) as the database has them now."""
    row = session.execute(
        select(Labeller.session_epoch, Labeller.active, Labeller.role).where(Labeller.id == labeller.id)
    ).one()
    return row.session_epoch, row.active, row.role


# -- logout --------------------------------------------------------------------------------------


def test_a_cookie_copied_before_logout_is_refused_after_it(
    app: FastAPI, session: Session, make_labeller: MakeLabeller
) -> None:
    labeller, token = make_labeller("lou", role="admin")
    browser = browser_login(app, token)
    laptop = browser_login(app, token)  # a second device, logged in as the same account
    copied = browser.cookies[COOKIE]
    assert replay(app, copied).get("/api/v1/me").json()["name"] == "lou"  # the copy works before logout
    epoch = epoch_of(session, labeller)[0]

    logout_csrf = _csrf(browser.get("/label").text)
    answer = browser.post("/logout", data={"csrf": logout_csrf}, follow_redirects=False)
    assert (answer.status_code, answer.headers["location"]) == (303, "/login")

    assert epoch_of(session, labeller)[0] == epoch + 1
    assert_logged_out(replay(app, copied))
    assert_logged_out(laptop)  # logout ends every session of the account, not only this browser's
    # The browser that logged out holds no session cookie any more.
    assert COOKIE not in browser.cookies
    assert_logged_out(browser, "not authenticated: send 'Authorization: Bearer <token>' or log in")
    # Logging in again starts a session that works, at the new epoch.
    assert browser_login(app, token).get("/api/v1/me").json()["name"] == "lou"


def test_a_cookie_from_before_session_epochs_is_refused(app: FastAPI, make_labeller: MakeLabeller) -> None:
    # Cookies issued before the session_epoch migration name no epoch: their holders log in once more.
    labeller, _ = make_labeller("old-cookie")
    cookie = _session_cookie("test-secret-key", {"labeller_id": labeller.id, "csrf": "c"})
    assert_logged_out(replay(app, cookie))


# -- deactivation --------------------------------------------------------------------------------


def test_deactivation_ends_sessions_and_reactivation_revives_none(
    app: FastAPI,
    session: Session,
    make_labeller: MakeLabeller,
    as_labeller: Callable[..., tuple[TestClient, Labeller]],
) -> None:
    admin_api, _ = as_labeller("admin", name="boss")
    labeller, token = make_labeller("dana")
    copied = browser_login(app, token).cookies[COOKIE]
    bearer = TestClient(app, headers={"Authorization": f"Bearer {token}"})

    off = admin_api.patch(f"/api/v1/labellers/{labeller.id}", json={"active": False})
    assert off.status_code == 200 and off.json()["active"] is False
    assert_logged_out(replay(app, copied))
    assert bearer.get("/api/v1/me").status_code == 401  # the token stops too while deactivated

    on = admin_api.patch(f"/api/v1/labellers/{labeller.id}", json={"active": True})
    assert on.status_code == 200 and on.json()["active"] is True
    assert_logged_out(replay(app, copied))  # the old cookie stays dead after reactivation
    assert bearer.get("/api/v1/me").json()["name"] == "dana"  # the token (not a session) works again
    assert browser_login(app, token).get("/api/v1/me").json()["name"] == "dana"


# -- the admins keep an admin -----------------------------------------------------------------------


@pytest.mark.parametrize("change", [{"active": False}, {"role": "annotator"}], ids=["deactivate", "demote"])
def test_an_admin_cannot_remove_their_own_admin_rights_by_api(
    app: FastAPI, session: Session, make_labeller: MakeLabeller, change: dict[str, object]
) -> None:
    admin, token = make_labeller("ada", role="admin")
    make_labeller("bea", role="admin")  # not the last admin either: refused because it is their own
    before = epoch_of(session, admin)
    api = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    answer = api.patch(f"/api/v1/labellers/{admin.id}", json=change)
    assert answer.status_code == 409, answer.text
    assert answer.json()["detail"] == (
        "labeller 'ada' is you: an admin cannot deactivate or demote their own account; ask another admin "
        "to do it"
    )
    assert epoch_of(session, admin) == before == (0, True, "admin")


def test_an_admin_cannot_deactivate_themselves_on_the_page(
    app: FastAPI, session: Session, make_labeller: MakeLabeller
) -> None:
    admin, token = make_labeller("ada", role="admin")
    browser = browser_login(app, token)
    csrf = _csrf(browser.get("/admin/labellers").text)
    answer = browser.post(f"/admin/labellers/{admin.id}/active", data={"csrf": csrf, "active": "false"})
    assert answer.status_code == 409
    assert '<p class="error">labeller &#39;ada&#39; is you: an admin cannot deactivate' in answer.text
    assert epoch_of(session, admin) == (0, True, "admin")
    assert browser.get("/api/v1/me").json()["name"] == "ada"  # still logged in


def test_another_admin_can_be_deactivated_and_demoted(
    app: FastAPI, session: Session, make_labeller: MakeLabeller
) -> None:
    _, token = make_labeller("ada", role="admin")
    other, _ = make_labeller("bea", role="admin")
    api = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    demoted = api.patch(f"/api/v1/labellers/{other.id}", json={"role": "annotator"})
    assert (demoted.status_code, demoted.json()["role"]) == (200, "annotator")
    assert api.patch(f"/api/v1/labellers/{other.id}", json={"active": False}).json()["active"] is False
    assert epoch_of(session, other) == (1, False, "annotator")
    promoted = api.patch(f"/api/v1/labellers/{other.id}", json={"active": True, "role": "admin"})
    assert (promoted.json()["active"], promoted.json()["role"]) == (True, "admin")


@pytest.mark.parametrize("change", [{"active": False}, {"role": "annotator"}], ids=["deactivate", "demote"])
def test_the_last_active_admin_stays(session: Session, make_labeller: MakeLabeller, change: dict) -> None:
    # With no acting admin (the CLI, a script), only the count of active admins stands in the way.
    admin, _ = make_labeller("solo", role="admin")
    make_labeller("retired", role="admin")[0].active = False
    with pytest.raises(LastActiveAdmin, match="labeller 'solo' is the last active admin; make another"):
        update_labeller(session=session, labeller_id=admin.id, **change)
    assert epoch_of(session, admin) == (0, True, "admin")


# -- two admins deactivating each other at the same moment --------------------------------------------


@pytest.fixture
def committed_engine() -> Iterator[Engine]:
    """An engine on a scratch database of its own: this test needs real commits from two connections."""
    with scratch_postgres_database() as url:
        migrate(url)
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def test_two_admins_deactivating_each_other_leave_one_admin(committed_engine: Engine) -> None:
    sessions = make_session_factory(committed_engine)
    with sessions() as setup:
        ada = create_labeller(session=setup, name="ada", role="admin").labeller.id
        bea = create_labeller(session=setup, name="bea", role="admin").labeller.id
        setup.commit()

    first_locked, commit_first = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def ada_deactivates_bea() -> None:
        with sessions() as own:
            update_labeller(session=own, labeller_id=bea, active=False, acting_id=ada)
            first_locked.set()
            commit_first.wait(timeout=30)  # hold the admins' row locks until the other call is waiting
            own.commit()

    def bea_deactivates_ada() -> None:
        with sessions() as own:
            try:
                update_labeller(session=own, labeller_id=ada, active=False, acting_id=bea)
                own.commit()
                outcome["bea"] = "deactivated ada"
            except NotAnActiveAdmin as exc:
                outcome["bea"] = str(exc)

    first = threading.Thread(target=ada_deactivates_bea)
    first.start()
    assert first_locked.wait(timeout=30), "the first deactivation did not get its locks within 30 s"
    second = threading.Thread(target=bea_deactivates_ada)
    second.start()
    time.sleep(0.5)
    assert second.is_alive(), f"the second deactivation did not wait for the first's locks: {outcome}"
    commit_first.set()
    first.join(timeout=30)
    second.join(timeout=30)

    assert outcome["bea"] == (
        "labeller 'bea' is no longer an active admin (another admin changed the account meanwhile); "
        "nothing was changed"
    )
    with sessions() as check:
        rows = check.execute(select(Labeller.name, Labeller.active).order_by(Labeller.name)).all()
    assert [tuple(row) for row in rows] == [("ada", True), ("bea", False)]


# -- the labeller cache (app.deps.LabellerCache) ---------------------------------------------------


def test_a_cached_token_stops_at_once_when_this_process_deactivates_or_demotes(
    app: FastAPI, as_labeller: Callable[..., tuple[TestClient, Labeller]]
) -> None:
    admin_api, _ = as_labeller("admin", name="boss")
    other_admin, other = as_labeller("admin", name="deputy")
    annotator, annotator_row = as_labeller(name="ann")
    # Both tokens have been seen, so both rows are cached now.
    assert annotator.get("/api/v1/me").json()["name"] == "ann"
    assert other_admin.get("/api/v1/labellers").status_code == 200

    assert admin_api.patch(f"/api/v1/labellers/{annotator_row.id}", json={"active": False}).status_code == 200
    assert annotator.get("/api/v1/me").status_code == 401
    assert admin_api.patch(f"/api/v1/labellers/{other.id}", json={"role": "annotator"}).status_code == 200
    assert other_admin.get("/api/v1/labellers").status_code == 403
    assert other_admin.get("/api/v1/me").json()["role"] == "annotator"


def test_a_change_made_by_another_process_shows_within_the_cache_ttl(
    app: FastAPI, session: Session, as_labeller: Callable[..., tuple[TestClient, Labeller]]
) -> None:
    from app.deps import TOKEN_CACHE_SECONDS, LabellerCache

    now = [0.0]
    app.state.labeller_cache = LabellerCache(clock=lambda: now[0])
    api, labeller = as_labeller(name="far")
    assert api.get("/api/v1/me").status_code == 200
    # Another process (the CLI, another uvicorn worker) deactivates: nothing here hears of it.
    session.execute(update(Labeller).where(Labeller.id == labeller.id).values(active=False))
    session.commit()
    now[0] += TOKEN_CACHE_SECONDS - 0.5
    assert api.get("/api/v1/me").status_code == 200  # the cached row, at most TOKEN_CACHE_SECONDS old
    now[0] += 1.0
    assert api.get("/api/v1/me").status_code == 401


def test_a_row_read_before_a_change_is_not_cached_after_it() -> None:
    from app.deps import LabellerCache

    cache = LabellerCache(clock=lambda: 0.0)
    row = Labeller(id=7, name="raced", role="admin", active=True, token_hash="h", session_epoch=0)
    generation = cache.generation  # a request starts reading the row...
    cache.forget([7])  # ...a demotion commits meanwhile...
    cache.put(row, generation, "h")  # ...and the stale row it read is not kept
    assert cache.by_token("h") is None and cache.by_id(7) is None
    cache.put(row, cache.generation, "h")
    assert cache.by_token("h") is not None and cache.by_token("h") is not cache.by_token("h")  # copies
