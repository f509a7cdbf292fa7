"""`gitlora daemon`: run the daemon in the foreground (what the systemd unit starts)."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("daemon", help="run the daemon in the foreground (one per user)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..service import main

    return main()
