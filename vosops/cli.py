"""The `vosops` command line. Each subcommand is a module in vosops/commands with `register(subparsers)`, which
adds its parser and sets `func` to the function that runs it."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = ["info", "bench", "propagate", "eval", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vosops", description="Fused kernels for VOS mask propagation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"vosops.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from vosops._backends import BackendUnavailableError

    # What a user's input causes (a missing file, an unreadable image, a mask of the wrong size, a backend this
    # machine lacks, a bad option value) is one line naming the command and exit status 2, not a traceback;
    # VOSOPS_DEBUG=1 re-raises.
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, BackendUnavailableError) as exc:
        if os.environ.get("VOSOPS_DEBUG", "0") not in ("", "0"):
            raise
        print(f"vosops {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
