"""Every labelling key in a real browser: ← 1 (left), → 2 (right), ↓ t T (tie), s S Space (skip) each
store the choice they name, and U / u undo the last judgement so the pair can be judged again.

Uses the Chromium and flags of tests/e2e/conftest.py; the app runs on a scratch Postgres database with
one pair per key press.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import select

from core.db.engine import make_engine, make_session_factory
from core.db.models import Judgement, Labeller
from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, LiveApp

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
def keys_app(serve_app: Callable[..., LiveApp]) -> tuple[str, str, str]:
    """The app over a scratch database with one pair per key and an invite for kim; yields
    (base URL, invite path, database URL)."""
    served = serve_app(
        prompts=[f"pair {i}: a green triangle" for i in range(len(KEYS))],
        invites={"kim": "annotator"},
        undo_window_seconds=600,
    )
    return served.base, served.invites["kim"], served.db_url


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
