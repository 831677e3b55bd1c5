"""The ``sftint`` command: ``sftint {info,explain,track,demo,bench} ...``.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args)``; heavy imports happen
inside ``_run_*`` so ``sftint --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions, C++ extension status, devices, Triton mode")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from sftint_fast.info import main as info_main

    info_main()
    return 0


# Subcommands register here, in the order `sftint --help` lists them.
_COMMANDS = [_add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
