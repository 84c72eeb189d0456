"""``python -m pytest_isolate doctor`` and the ``pytest-isolate`` console script."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .doctor import run_doctor

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pytest-isolate`` / ``python -m pytest_isolate``; returns the exit status."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "pytest-isolate"
    if prog in ("__main__.py", "-c", ""):
        prog = "python -m pytest_isolate"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Tools for pytest-isolate-linux. Tests are run with `pytest --isolate`.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    commands.add_parser(
        "doctor",
        help="try every isolation feature on this host and print the fix for each one missing",
        description="Try every kernel feature pytest-isolate uses, each in a throw-away child "
        "process, and print a table with the fix for each one missing. Exit status "
        "0 when the default isolation works here, 1 otherwise.",
    )
    args = parser.parse_args(argv)
    if args.command == "doctor":
        return run_doctor(lambda line: print(line, flush=True))
    parser.error(f"unknown command {args.command!r}")  # argparse rejects it first
    return 2


if __name__ == "__main__":
    sys.exit(main())
