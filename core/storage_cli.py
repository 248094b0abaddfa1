"""`densealign storage report|prune`: bytes by kind in the blob store, and pruning trained latents.

`report` prints files and bytes per kind (trajectories, images, evaluation images, policies, round
checkpoints), trajectory rows by what became of their latents, and what `prune` would delete under
the current retention settings (DENSEALIGN_RETENTION__KEEP_ROUNDS, or --keep-rounds). `prune` marks,
commits, then deletes (core/retention.py), whether or not DENSEALIGN_RETENTION__DROP_TRAINED_LATENTS
is on (that setting makes the trainer prune after each version); `--dry-run` changes nothing.
Exit codes: 0 done; 1 the database or the store could not be read; 2 bad arguments or settings; each
error is one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import NoReturn

from core.blob_stores import open_blob_store
from core.db import make_engine, make_session_factory
from core.retention import StorageReport, human_bytes, prune_latents, storage_report
from core.settings import SettingsError, load_settings


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def _print_report(report: StorageReport) -> None:
    print(f"{'kind':<14}{'files':>10}{'bytes':>16}")
    for name, usage in [*report.usage.items(), ("total", report.total)]:
        print(f"{name:<14}{usage.files:>10}{usage.bytes:>16}  {human_bytes(usage.bytes)}")
    if report.temp_files.files:
        print(
            f"temp files left by killed writes: {report.temp_files.files} ({human_bytes(report.temp_files.bytes)})"
        )
    t = report.trajectories
    print(
        f"trajectory rows: {t.trajectories} ({t.kept} with latents, {t.pruned} pruned, {t.without} image only)"
    )
    print(
        f"prunable now (keep_rounds={report.keep_rounds}): {report.prunable.files} latents, "
        f"{report.prunable.bytes} bytes ({human_bytes(report.prunable.bytes)})"
    )
    if report.pending.files:
        print(
            f"marked pruned but still stored: {report.pending.files} ({human_bytes(report.pending.bytes)}); "
            "`densealign storage prune` deletes them"
        )


def _rounds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of rounds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="densealign storage", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser)
    report = commands.add_parser("report", help="bytes and files by kind, and what is prunable now")
    report.add_argument("--json", action="store_true", help="print the report as one JSON object")
    prune = commands.add_parser("prune", help="delete the latents no round will read again")
    prune.add_argument("--dry-run", action="store_true", help="say what would be deleted; change nothing")
    for sub in (report, prune):
        sub.add_argument(
            "--keep-rounds",
            type=_rounds,
            default=None,
            metavar="N",
            help="keep the newest N finished rounds' latents (default DENSEALIGN_RETENTION__KEEP_ROUNDS)",
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        settings = load_settings()
        keep = settings.retention.keep_rounds if args.keep_rounds is None else args.keep_rounds
        store = open_blob_store(settings.blob_url, settings.blob_dir)
        engine = make_engine(settings.database_url)
        try:
            with make_session_factory(engine)() as session:
                if args.action == "report":
                    got = storage_report(session=session, store=store, keep_rounds=keep)
                else:
                    result = prune_latents(
                        session=session, store=store, keep_rounds=keep, dry_run=args.dry_run
                    )
        finally:
            engine.dispose()
    except SettingsError as exc:
        print(f"densealign storage: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the database is down or unmigrated, the store unreadable
        print(f"densealign storage: {exc.__class__.__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    if args.action == "report":
        if args.json:
            print(json.dumps(got.to_dict(), sort_keys=True))
        else:
            _print_report(got)
    elif result.dry_run:
        print(
            f"dry run: would delete {result.deleted.files} latents blobs, {result.deleted.bytes} bytes "
            f"({human_bytes(result.deleted.bytes)}); nothing changed"
        )
    else:
        print(
            f"marked {result.marked} trajectories pruned; deleted {result.deleted.files} latents blobs, "
            f"{result.deleted.bytes} bytes ({human_bytes(result.deleted.bytes)})"
        )
    return 0
