"""End to end in a real browser: an invited annotator logs in through the invite link, judges five
pairs with the keyboard (and undoes one with U), the status line names the side pressed ("Saved:
left"), and the five judgements are in Postgres with the sides they saw."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from sqlalchemy import select

from app.main import create_app
from core.db.engine import make_engine, make_session_factory
from core.db.labellers import create_invite
from core.db.models import Judgement, Labeller
from core.db.pairs import create_pair, create_trajectory
from core.db.policies import publish_policy_version
from core.db.prompts import add_prompt
from core.settings import Settings
from core.storage import LocalBlobStore
from tests.app.conftest import png_bytes
from tests.conftest import migrate, scratch_postgres_database, skip_or_fail

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
PAIRS = 5

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def live_app(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """Serve the app on a free port over a migrated scratch database with 5 pairs; yields
    (base URL, invite path, database URL)."""
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        skip_or_fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium package")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_or_fail("the playwright Python package is not installed; `make test` installs it")
    with scratch_postgres_database() as url:
        migrate(url)
        store = LocalBlobStore(tmp_path / "blobs")
        engine = make_engine(url)
        factory = make_session_factory(engine)
        with factory() as session:
            publish_policy_version(session=session, version=0)
            for i in range(PAIRS):
                prompt = add_prompt(session=session, text=f"prompt number {i}: a striped umbrella")
                ids = []
                for side, color in (("a", (200, 40 * i, 30)), ("b", (30, 40 * i, 200))):
                    key = f"images/{i}-{side}.png"
                    store.put(key, png_bytes(color, size=64))
                    ids.append(
                        create_trajectory(
                            session=session, prompt_id=prompt.id, policy_version=0, seed=i, image_key=key
                        ).id
                    )
                create_pair(session=session, trajectory_a_id=ids[0], trajectory_b_id=ids[1])
            _, secret = create_invite(
                session=session, name="ursula", role="annotator", ttl=dt.timedelta(hours=1)
            )
            session.commit()
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        settings = Settings(
            database_url=url,
            secret_key="e2e-secret",  # type: ignore[arg-type]
            cookie_secure=False,
            public_base_url=base,
            blob_dir=str(tmp_path / "blobs"),
        )
        app = create_app(settings, session_factory=factory, blob_store=store)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start within 20 s"
            time.sleep(0.05)
        try:
            yield base, f"/invite/{secret}", url
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            engine.dispose()


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
            page.wait_for_function("document.getElementById('left').complete")
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
