"""End to end in a real browser: an invited annotator logs in through the invite link, judges five
pairs with the keyboard (and undoes one with U), the status line names the side pressed ("Saved:
left"), and the five judgements are in Postgres with the sides they saw."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from core.db.engine import make_engine, make_session_factory
from core.db.models import Judgement, Labeller
from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, LiveApp

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
PAIRS = 5

pytestmark = pytest.mark.slow


@pytest.fixture
def live_app(serve_app: Callable[..., LiveApp]) -> tuple[str, str, str]:
    """The app over a scratch database with 5 pairs and an invite for ursula; yields
    (base URL, invite path, database URL)."""
    served = serve_app(
        prompts=[f"prompt number {i}: a striped umbrella" for i in range(PAIRS)],
        invites={"ursula": "annotator"},
    )
    return served.base, served.invites["ursula"], served.db_url


def test_annotator_judges_five_pairs_with_the_keyboard(live_app: tuple[str, str, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, invite_path, db_url = live_app
    expected: dict[int, tuple[str, str]] = {}  # pair id -> (choice, side shown left)
    keys = ["ArrowLeft", "ArrowRight", "1", "2", "ArrowLeft"]
    # What the status line says after each key: the side as the annotator saw it, never 'a'/'b'.
    said = {"ArrowLeft": "Saved: left", "1": "Saved: left", "ArrowRight": "Saved: right", "2": "Saved: right"}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(base + invite_path)
            page.click("#accept")
            page.click("#start")
            pair = page.locator("#pair")
            status = page.locator("#status")
            expect(pair).to_be_visible(timeout=10_000)
            # A function, not an expression: Playwright evaluates expressions with eval(), which the
            # page's Content-Security-Policy forbids.
            page.wait_for_function("() => document.getElementById('left').complete")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "label_page.png"), full_page=True)
            for key in keys:
                pair_id = int(pair.get_attribute("data-pair-id") or 0)
                left = pair.get_attribute("data-left-side") or ""
                right = "b" if left == "a" else "a"
                expected[pair_id] = (left if key in ("ArrowLeft", "1") else right, left)
                page.keyboard.press(key)
                page.wait_for_function(
                    "id => document.getElementById('pair').dataset.pairId !== String(id)"
                    " || !document.getElementById('empty').hidden",
                    arg=pair_id,
                )
                expect(status).to_have_text(said[key])
            expect(page.locator("#empty")).to_be_visible()
            expect(page.locator("#total")).to_have_text("5")
            # U brings the last pair back (same side on the left); judging it again replaces the choice.
            last_id = list(expected)[-1]
            page.keyboard.press("u")
            expect(pair).to_have_attribute("data-pair-id", str(last_id))
            expect(pair).to_have_attribute("data-left-side", expected[last_id][1])
            expect(page.locator("#total")).to_have_text("4")
            left = expected[last_id][1]
            expected[last_id] = ("b" if left == "a" else "a", left)
            page.keyboard.press("ArrowRight")
            expect(page.locator("#empty")).to_be_visible()
            expect(status).to_have_text("Saved: right")
            expect(page.locator("#total")).to_have_text("5")
            page.screenshot(path=str(ARTIFACTS / "label_page_done.png"))
        finally:
            browser.close()

    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as session:
            ursula = session.scalars(select(Labeller).where(Labeller.name == "ursula")).one()
            rows = session.scalars(select(Judgement).where(Judgement.labeller_id == ursula.id)).all()
            recorded = {row.pair_id: (row.choice, row.shown_left) for row in rows}
            assert all(row.decide_ms is not None and row.decide_ms >= 0 for row in rows)
    finally:
        engine.dispose()
    assert len(expected) == PAIRS
    assert recorded == expected


def test_a_busy_server_is_retried_with_the_same_client_key(live_app: tuple[str, str, str]) -> None:
    """The first judgement POST answers 503 with Retry-After (as during a database restart): the page
    says it is retrying, posts again with the same client key, and exactly one judgement is stored."""
    import json

    from playwright.sync_api import expect, sync_playwright

    base, invite_path, db_url = live_app
    posts: list[dict[str, object]] = []

    def busy_once(route: object) -> None:
        request = route.request  # type: ignore[attr-defined]
        if request.method != "POST":
            route.continue_()  # type: ignore[attr-defined]
            return
        posts.append(json.loads(request.post_data or "{}"))
        if len(posts) == 1:
            route.fulfill(  # type: ignore[attr-defined]
                status=503,
                headers={"Retry-After": "1", "Content-Type": "application/json"},
                body='{"detail": "the database is unavailable; retry shortly"}',
            )
        else:
            route.continue_()  # type: ignore[attr-defined]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(base + invite_path)
            page.click("#accept")
            page.click("#start")
            pair = page.locator("#pair")
            expect(pair).to_be_visible(timeout=10_000)
            page.route("**/api/v1/judgements", busy_once)
            pair_id = int(pair.get_attribute("data-pair-id") or 0)
            page.keyboard.press("ArrowLeft")
            expect(page.locator("#status")).to_contain_text("retrying", timeout=5_000)
            expect(page.locator("#total")).to_have_text("1", timeout=10_000)
        finally:
            browser.close()

    assert len(posts) == 2
    assert posts[0]["client_key"] == posts[1]["client_key"] and posts[0]["pair_id"] == pair_id
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as session:
            rows = session.scalars(select(Judgement)).all()
    finally:
        engine.dispose()
    assert [(row.pair_id, row.client_key) for row in rows] == [(pair_id, posts[0]["client_key"])]


def test_a_paused_labeller_is_told_why(live_app: tuple[str, str, str]) -> None:
    """/pairs/next says `paused` (the server's side is tests/app/test_reliability.py): the page shows the
    message in place of 'nothing to judge', rather than leaving the annotator waiting for pairs."""
    import json

    from playwright.sync_api import expect, sync_playwright

    base, invite_path, _ = live_app
    message = "Your judgements are paused: test message."
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route(
                "**/api/v1/pairs/next*",
                lambda route: route.fulfill(
                    status=200,
                    headers={"Content-Type": "application/json"},
                    body=json.dumps({"pair": None, "message": message, "paused": True}),
                ),
            )
            page.goto(base + invite_path)
            page.click("#accept")
            page.click("#start")
            expect(page.locator("#empty")).to_be_visible(timeout=10_000)
            expect(page.locator("#empty-reason")).to_have_text(message)
            expect(page.locator("#pair")).to_be_hidden()
        finally:
            browser.close()
