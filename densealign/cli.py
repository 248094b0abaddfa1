"""The `densealign` command: one front door to every entry point.

It lives in the composition root (this package), the only place that names every room: the core
library imports nothing above it. Sub-commands are resolved lazily by dotted module name, so
`densealign serve` never imports torch and the ML commands never import the web app. Each module
named here has `main(argv) -> int`.
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
    "health": ("core.health", "exit 0 when this host's worker or trainer recorded a heartbeat lately"),
    "export": ("trainer.export", "write a published adapter in diffusers or kohya format"),
    "storage": ("core.storage_cli", "blob store bytes by kind; prune latents no round reads again"),
    "demo": ("densealign.demo", "run app, worker and trainer on this machine (SQLite, no Redis, CPU)"),
    "label": ("densealign.labeller", "a programmatic labeller over the REST API (--preference faithfulness)"),
    "eval": (
        "trainer.judging",
        "the faithfulness judge's acceptance of a version's samples, next to version 0's",
    ),
    "train-base": ("core.basemodel.train", "train the shipped shapes base model from scratch (seeded)"),
    "eval-base": ("core.basemodel.evaluate", "judge acceptance of a shapes model's samples, with baselines"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        # Everything after the command name belongs to the command's own parser.
        module = importlib.import_module(COMMANDS[args[0]][0])
        try:
            return int(module.main(args[1:]) or 0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    parser = argparse.ArgumentParser(prog="densealign", description="DenseAlign command line.")
    parser.add_argument("--version", action="version", version=f"densealign {core.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in sorted(COMMANDS.items()):
        commands.add_parser(name, help=help_text)
    parser.parse_args(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
