"""`gitlora train [--now] [REPO]`: ask the daemon to check for (or force) a training round."""
from __future__ import annotations

import argparse
import os
import sys

from ..control import ControlError, DaemonNotRunning, request


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="ask the daemon to start a LoRA round")
    p.add_argument("repo", nargs="?", default=".")
    p.add_argument("--now", action="store_true", help="start now, whatever the thresholds and cooldown say")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    repo = os.path.abspath(args.repo) if os.path.exists(args.repo) else args.repo
    try:
        reply = request({"cmd": "train", "repo": repo, "now": args.now}, timeout=30)
    except DaemonNotRunning as exc:
        print(f"gitlora: {exc}", file=sys.stderr)
        return 1
    except ControlError as exc:
        print(f"gitlora: error: {exc}", file=sys.stderr)
        return 2
    if not reply.get("ok"):
        print(f"gitlora: {reply.get('error')}", file=sys.stderr)
        return 1
    print(reply.get("result", ""))
    return 0
