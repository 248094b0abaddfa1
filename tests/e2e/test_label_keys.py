"""Every labelling key in a real browser: ← 1 (left), → 2 (right), ↓ t T (tie), s S Space (skip) each
store the choice they name, and U / u undo the last judgement so the pair can be judged again.

Uses the Chromium and flags of test_label_browser.py; the app runs on a scratch Postgres database with
one pair per key press.
"""

from __future__ import annotations

import datetime as dt
import shutil
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
from tests.e2e.test_label_browser import CHROMIUM, CHROMIUM_ARGS, _free_port

# (key pressed, what it stands for): one pair each, in this order.
KEYS = [
    ("ArrowLeft", "left"),
    ("ArrowRight", "right"),
    ("1", "left"),
    ("2", "right"),
    ("ArrowDown", "tie"),
    ("t", "tie"),
    ("T", "tie"),
    ("s", "skip"),
    ("S", "skip"),
    ("Space", "skip"),
]

pytestmark = pytest.mark.slow


@pytest.fixture
def keys_app(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """The app on a free port over a scratch database with one pair per key; yields
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
            for i in range(len(KEYS)):
                prompt = add_prompt(session=session, text=f"pair {i}: a green triangle")
                ids = []
                for side, color in (("a", (220, 20 * i, 20)), ("b", (20, 20 * i, 220))):
                    key = f"images/{i}-{side}.png"
                    store.put(key, png_bytes(color, size=32))
                    ids.append(
                        create_trajectory(
                            session=session, prompt_id=prompt.id, policy_version=0, seed=i, image_key=key
                        ).id
                    )
                create_pair(session=session, trajectory_a_id=ids[0], trajectory_b_id=ids[1])
            _, secret = create_invite(
                session=session, name="kim", role="annotator", ttl=dt.timedelta(hours=1)
            )
            session.commit()
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        settings = Settings(
            database_url=url,
            secret_key="e2e-keys-secret",  # type: ignore[arg-type]
            cookie_secure=False,
            public_base_url=base,
            blob_dir=str(tmp_path / "blobs"),
            undo_window_seconds=600,
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


def stored(db_url: str) -> dict[int, tuple[str, str]]:
    """kim's judgements: pair id -> (choice, side shown on the left)."""
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as session:
            kim = session.scalars(select(Labeller).where(Labeller.name == "kim")).one()
            rows = session.scalars(select(Judgement).where(Judgement.labeller_id == kim.id)).all()
            return {row.pair_id: (row.choice, row.shown_left) for row in rows}
    finally:
        engine.dispose()


def choice_for(meaning: str, left: str) -> str:
    """The stored choice a key should produce, given which trajectory ('a'/'b') was on the left."""
    if meaning == "left":
        return left
    if meaning == "right":
        return "b" if left == "a" else "a"
    return meaning


def test_every_key_stores_the_choice_it_names_and_u_undoes(keys_app: tuple[str, str, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, invite_path, db_url = keys_app
    expected: dict[int, tuple[str, str]] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(base + invite_path)
            page.click("#accept")
            page.click("#start")
            pair = page.locator("#pair")
            expect(pair).to_be_visible(timeout=10_000)

            def press(key: str, meaning: str) -> int:
                pair_id = int(pair.get_attribute("data-pair-id") or 0)
                left = pair.get_attribute("data-left-side") or ""
                expected[pair_id] = (choice_for(meaning, left), left)
                page.keyboard.press(key)
                page.wait_for_function(
                    "id => document.getElementById('pair').dataset.pairId !== String(id)"
                    " || !document.getElementById('empty').hidden",
                    arg=pair_id,
                )
                return pair_id

            for n, (key, meaning) in enumerate(KEYS, start=1):
                press(key, meaning)
                expect(page.locator("#total")).to_have_text(str(n))
            expect(page.locator("#empty")).to_be_visible()
            # Every choice is in the database as the key named it, before any undo.
            assert stored(db_url) == expected

            # U brings the last pair back and deletes its judgement; judged again with 1 (left), then
            # u brings it back once more and 2 (right) is what stays.
            last = list(expected)[-1]
            for undo, (key, meaning) in (("U", ("1", "left")), ("u", ("2", "right"))):
                page.keyboard.press(undo)
                expect(pair).to_have_attribute("data-pair-id", str(last))
                expect(page.locator("#status")).to_contain_text("Undone")
                expect(page.locator("#total")).to_have_text(str(len(KEYS) - 1))
                assert last not in stored(db_url)
                assert press(key, meaning) == last
                expect(page.locator("#total")).to_have_text(str(len(KEYS)))
        finally:
            browser.close()

    final = stored(db_url)
    assert final == expected
    choices = [choice for choice, _ in final.values()]
    # three ties; three skips, less the Space one judged again as right
    assert (choices.count("tie"), choices.count("skip"), len(final)) == (3, 2, len(KEYS))
    assert final[last][0] == choice_for("right", final[last][1])
