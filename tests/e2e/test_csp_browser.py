"""The pages work in Chromium under the Content-Security-Policy, with no violation reported: an admin
accepts an invite, judges a pair with a key (stored in Postgres), opens the dashboard, labellers
(inviting someone) and prompts pages; an invited annotator's invite page works too. Another origin
cannot frame /admin. The API docs page starts Swagger UI from its file, with the CDN answered by a
stub (the tests have no network)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import select

from app.middleware import CONTENT_SECURITY_POLICY
from app.routes.docs import SWAGGER_UI
from core.db.engine import make_engine, make_session_factory
from core.db.models import Judgement
from tests.e2e.conftest import LiveApp, chromium, record_csp_violations

pytestmark = pytest.mark.slow

# Stands in for swagger-ui-bundle.js: records the options the init file passes.
SWAGGER_STUB = """
window.SwaggerUIBundle = (options) => {
  document.querySelector(options.dom_id).textContent = "swagger ui for " + options.url;
};
window.SwaggerUIBundle.presets = { apis: {} };
window.SwaggerUIBundle.SwaggerUIStandalonePreset = {};
"""


@pytest.fixture
def served(serve_app: Callable[..., LiveApp]) -> LiveApp:
    return serve_app(
        # Four pairs: the admin judges one and then holds two (shown, prefetched); the annotator gets one.
        prompts=[f"a {colour} kite over a beach" for colour in ("red", "blue", "green", "gold")],
        invites={"root": "admin", "nell": "annotator"},
    )


def judgements(db_url: str) -> list[tuple[int, str]]:
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as session:
            return [(row.pair_id, row.choice) for row in session.scalars(select(Judgement))]
    finally:
        engine.dispose()


def test_pages_work_under_the_policy_with_no_violation(served: LiveApp) -> None:
    from playwright.sync_api import expect

    with chromium() as browser:
        page = browser.new_page()
        violations = record_csp_violations(page)

        invite = page.goto(served.base + served.invites["root"])
        assert invite is not None and invite.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        expect(page.locator("h1")).to_have_text("Welcome, root")
        page.click("#accept")
        expect(page.locator("#token")).to_be_visible()
        page.click("#start")

        # The labelling page: its script runs, the images load, a key press stores a judgement.
        pair = page.locator("#pair")
        expect(pair).to_be_visible(timeout=10_000)
        # A function, not an expression: Playwright evaluates expressions with eval(), which the policy forbids.
        page.wait_for_function(
            "() => ['left', 'right'].every((id) => document.getElementById(id).naturalWidth === 48)"
        )
        pair_id = int(pair.get_attribute("data-pair-id") or 0)
        left = pair.get_attribute("data-left-side")
        page.keyboard.press("ArrowLeft")
        expect(page.locator("#status")).to_have_text("Saved: left")
        expect(page.locator("#total")).to_have_text("1")
        assert judgements(served.db_url) == [(pair_id, left)]

        page.goto(served.base + "/admin")
        expect(page.locator("h1")).to_have_text("Dashboard")
        expect(page.locator("svg.chart").first).to_be_visible()  # the labels-per-hour chart
        page.goto(served.base + "/admin/labellers")
        page.fill("input[name=name]", "olga")
        page.click("text=Invite")
        expect(page.locator("#invite-url")).to_contain_text(served.base + "/invite/")
        page.goto(served.base + "/admin/prompts")
        expect(page.locator("td", has_text="a red kite over a beach")).to_be_visible()
        page.goto(served.base + "/guidelines")
        expect(page.locator("h1")).to_have_text("Labelling guidelines")

        # An annotator's invite page, in a browser of its own.
        other = browser.new_context().new_page()
        other_violations = record_csp_violations(other)
        other.goto(served.base + served.invites["nell"])
        other.click("#accept")
        other.click("#start")
        expect(other.locator("#pair")).to_be_visible(timeout=10_000)

        assert violations == [] and other_violations == []


def test_another_origin_cannot_frame_the_admin_pages(served: LiveApp) -> None:
    with chromium() as browser:
        page = browser.new_page()
        refusals = record_csp_violations(page)
        # about:blank with an iframe is a page of another origin, as a page on another port would be.
        page.set_content(f'<iframe id="victim" src="{served.base}/admin"></iframe>')
        page.wait_for_timeout(1_000)
        frames = [frame for frame in page.frames if frame is not page.main_frame]
        assert all("Dashboard" not in frame.content() for frame in frames)
        assert any("frame-ancestors" in text for text in refusals), refusals


def test_the_api_docs_page_starts_swagger_ui_under_its_policy(served: LiveApp) -> None:
    from playwright.sync_api import expect

    with chromium() as browser:
        page = browser.new_page()
        violations = record_csp_violations(page)
        cdn: list[str] = []

        def stub(route: object) -> None:
            url = route.request.url  # type: ignore[attr-defined]
            cdn.append(url)
            if url.endswith(".js"):
                route.fulfill(status=200, content_type="text/javascript", body=SWAGGER_STUB)  # type: ignore[attr-defined]
            else:
                route.fulfill(status=200, content_type="text/css", body="#swagger-ui { margin: 1rem; }")  # type: ignore[attr-defined]

        page.route(SWAGGER_UI + "**", stub)
        page.goto(served.base + "/api/v1/docs")
        expect(page.locator("#swagger-ui")).to_have_text("swagger ui for /api/v1/openapi.json")
        assert sorted(cdn) == [SWAGGER_UI + "swagger-ui-bundle.js", SWAGGER_UI + "swagger-ui.css"]
        assert violations == []
