"""What the browser tests share: the app served by uvicorn over a migrated scratch database with one
pair per prompt and some invites, Debian's Chromium launched headless through Playwright, and a
recorder of Content-Security-Policy violations.

Chromium is /usr/bin/chromium (Debian's package), never a browser Playwright downloads.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.main import create_app
from app.serve import proxy_options
from core.db.engine import make_engine, make_session_factory
from core.db.labellers import create_invite
from core.db.pairs import create_pair, create_trajectory
from core.db.policies import publish_policy_version
from core.db.prompts import add_prompt
from core.settings import Settings
from core.storage import LocalBlobStore
from tests.app.conftest import png_bytes
from tests.conftest import migrate, scratch_postgres_database, skip_or_fail
from tests.live_server import free_port, serving

CHROMIUM = "/usr/bin/chromium"
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


@dataclass(frozen=True)
class LiveApp:
    base: str  # e.g. http://127.0.0.1:41234
    db_url: str
    invites: dict[str, str]  # labeller name -> invite path (/invite/<secret>)


def require_browser() -> None:
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        skip_or_fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium package")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_or_fail("the playwright Python package is not installed; `make test` installs it")


@contextmanager
def live_app(
    tmp_path: Path, *, prompts: list[str], invites: dict[str, str], **settings: Any
) -> Iterator[LiveApp]:
    """Serve the app on a free port over a fresh migrated database: one pair of distinct images per
    prompt (policy version 0) and an invite per name (name -> role). `settings` override Settings."""
    require_browser()
    with scratch_postgres_database() as url:
        migrate(url)
        store = LocalBlobStore(tmp_path / "blobs")
        engine = make_engine(url)
        factory = make_session_factory(engine)
        paths = {}
        with factory() as session:
            publish_policy_version(session=session, version=0)
            for i, text in enumerate(prompts):
                prompt = add_prompt(session=session, text=text)
                ids = []
                for side, color in (("a", (210, 25 * i % 256, 30)), ("b", (30, 25 * i % 256, 210))):
                    key = f"images/{i}-{side}.png"
                    store.put(key, png_bytes(color, size=48))
                    ids.append(
                        create_trajectory(
                            session=session, prompt_id=prompt.id, policy_version=0, seed=i, image_key=key
                        ).id
                    )
                create_pair(session=session, trajectory_a_id=ids[0], trajectory_b_id=ids[1])
            for name, role in invites.items():
                _, secret = create_invite(session=session, name=name, role=role, ttl=dt.timedelta(hours=1))
                paths[name] = f"/invite/{secret}"
            session.commit()
        port = free_port()
        config = Settings(
            database_url=url,
            secret_key="e2e-secret",  # type: ignore[arg-type]
            cookie_secure=False,
            public_base_url=f"http://127.0.0.1:{port}",
            blob_dir=str(tmp_path / "blobs"),
            **settings,
        )
        app = create_app(config, session_factory=factory, blob_store=store)
        try:
            with serving(app, port, **proxy_options(config)) as base:
                yield LiveApp(base=base, db_url=url, invites=paths)
        finally:
            engine.dispose()


@pytest.fixture
def serve_app(tmp_path: Path) -> Iterator[Callable[..., LiveApp]]:
    """`serve_app(prompts=[...], invites={name: role}, **settings)` starts the app; it stops after the test."""
    with ExitStack() as stack:
        yield lambda **kwargs: stack.enter_context(live_app(tmp_path, **kwargs))


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, through Playwright: yields the browser."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def record_csp_violations(page: Any) -> list[str]:
    """A list that fills with every Content-Security-Policy violation on `page`: Chromium's console
    reports ("Refused to ... Content Security Policy ...") and the DOM's securitypolicyviolation events."""
    seen: list[str] = []
    page.on(
        "console",
        lambda message: seen.append(message.text) if "Content Security Policy" in message.text else None,
    )
    page.expose_function("__cspViolation", lambda text: seen.append(text))
    page.add_init_script(
        "document.addEventListener('securitypolicyviolation', (e) =>"
        " window.__cspViolation(`${e.violatedDirective} blocked ${e.blockedURI} on ${e.documentURI}`));"
    )
    return seen
