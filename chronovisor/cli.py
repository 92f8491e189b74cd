"""The ``chronovisor`` command line.

Each subcommand has one ``_add_<name>`` function that declares its arguments and points
``func`` at the code that runs it; the heavy imports happen inside those functions so that
``chronovisor --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chronovisor",
        description="Steer MoE routing with a P×T controller, and measure it honestly.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
