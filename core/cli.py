"""The `densealign` command: one front door to every entry point.

Sub-commands are resolved lazily by dotted module name, so `densealign serve` never imports torch
and the ML commands never import the web app. Each module named here has `main(argv) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import core

# name -> (module with a `main(argv: list[str]) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("app.serve", "run the web app and REST API"),
    "migrate": ("core.db.migrate", "upgrade (or --down) the database schema with Alembic"),
    "invite": ("app.invite", "print a one-time invite link for a new labeller (--role admin)"),
    "worker": ("worker.main", "serve sampling jobs: sample pairs with the current policy"),
    "trainer": ("trainer.main", "train rounds on new labels and publish policy versions"),
    "export": ("trainer.export", "write a published adapter in diffusers or kohya format"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="densealign", description="DenseAlign command line.")
    parser.add_argument("--version", action="version", version=f"densealign {core.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in sorted(COMMANDS.items()):
        sub = commands.add_parser(name, help=help_text, add_help=False)
        sub.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[ns.command][0])
    try:
        return int(module.main(list(ns.args)) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
