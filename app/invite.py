"""`densealign invite NAME [--role admin]`: print a one-time invite link (bootstraps the first admin)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from core.db.engine import make_engine, make_session_factory
from core.db.errors import DomainError
from core.db.labellers import create_invite
from core.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="densealign invite", description=__doc__)
    parser.add_argument("name", help="the new labeller's display name (unique)")
    parser.add_argument("--role", choices=("annotator", "admin"), default="annotator")
    args = parser.parse_args(argv)
    settings = get_settings()
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            _, secret = create_invite(
                session=session,
                name=args.name,
                role=args.role,
                ttl=dt.timedelta(hours=settings.invite_ttl_hours),
            )
            session.commit()
    except DomainError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    finally:
        engine.dispose()
    sys.stdout.write(f"{settings.public_base_url.rstrip('/')}/invite/{secret}\n")
    return 0
