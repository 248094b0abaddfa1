"""`densealign health --role worker|trainer`: exit 0 when such a process on this host is alive.

Alive means it recorded a heartbeat (core/heartbeat.py) within `--max-age` seconds and has not
exited. By default only processes on this host (the container's hostname under compose) count, so
a container's healthcheck speaks for the process inside it; `--any-host` asks about the deployment.
Exit codes: 0 alive; 1 not alive, or the database cannot be read (one line says which): Docker
reserves 2 for itself, and either way the process cannot be vouched for.
"""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import sys

from core.db.engine import make_engine, make_session_factory
from core.db.heartbeats import process_statuses
from core.db.models import PROCESS_ROLES
from core.settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="densealign health", description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=PROCESS_ROLES, required=True)
    parser.add_argument(
        "--max-age", type=float, default=60.0, help="seconds since the last heartbeat (default 60)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--host", default=None, help="the host whose process to check (default: this one)")
    where.add_argument("--any-host", action="store_true", help="any process of the role counts")
    args = parser.parse_args(argv)
    if args.max_age <= 0:
        parser.error(f"--max-age {args.max_age} must be positive")
    host = None if args.any_host else (args.host or socket.gethostname())
    try:
        settings = load_settings()
        engine = make_engine(settings.database_url)
        try:
            with make_session_factory(engine)() as session:
                rows = process_statuses(
                    session=session, max_age=dt.timedelta(seconds=args.max_age), role=args.role, host=host
                )
        finally:
            engine.dispose()
    except SettingsError as exc:
        print(f"densealign health: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the database is down or unmigrated: we cannot tell
        print(f"densealign health: cannot read heartbeats: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    where_text = "any host" if host is None else f"host {host}"
    alive = [row for row in rows if row.alive]
    if alive:
        row = alive[0]
        version = "-" if row.policy_version is None else row.policy_version
        print(
            f"{args.role} pid {row.pid} on {row.host}: {row.state} (version {version}), {row.age_seconds:.0f}s ago"
        )
        return 0
    if not rows:
        print(f"no {args.role} has ever recorded a heartbeat on {where_text}", file=sys.stderr)
    else:
        row = rows[0]
        why = (
            "exited"
            if row.stopped_at is not None
            else f"silent for {row.age_seconds:.0f}s > {args.max_age:g}s"
        )
        print(
            f"{args.role} pid {row.pid} on {row.host} is not alive: {why} (last state {row.state})",
            file=sys.stderr,
        )
    return 1
