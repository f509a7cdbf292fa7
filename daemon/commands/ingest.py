"""`gitlora ingest [REPO]` / `pause` / `resume`: nudge or hold the daemon's work on a repository."""
from __future__ import annotations

import argparse
import os
import sys

from ..control import ControlError, DaemonNotRunning, request


def add_parser(sub: argparse._SubParsersAction) -> None:
    for name, text in (("ingest", "ask the daemon to ingest a repository now"),
                       ("pause", "pause ingest (commits are still spooled)"), ("resume", "resume ingest")):
        p = sub.add_parser(name, help=text)
        p.add_argument("repo", nargs="?", default=None, help="a repository (default: all)")
        p.set_defaults(run=run, cmd=name)


def run(args: argparse.Namespace) -> int:
    payload = {"cmd": args.cmd}
    if args.repo:
        payload["repo"] = os.path.abspath(args.repo) if os.path.exists(args.repo) else args.repo
    try:
        reply = request(payload)
    except DaemonNotRunning as exc:
        print(f"gitlora: the daemon is not running ({exc})", file=sys.stderr)
        return 1
    except ControlError as exc:
        print(f"gitlora: error: {exc}", file=sys.stderr)
        return 2
    if not reply.get("ok"):
        print(f"gitlora: {reply.get('error')}", file=sys.stderr)
        return 1
    print(f"{args.cmd}: " + ", ".join(reply.get("repos", [])))
    return 0
