"""`gitlora train [--now] [REPO]`: ask the daemon to check for (or force) a training round."""
from __future__ import annotations

import argparse

from .common import ask_daemon, repo_selector


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="ask the daemon to start a LoRA round")
    p.add_argument("repo", nargs="?", default=".")
    p.add_argument("--now", action="store_true", help="start now, whatever the thresholds and cooldown say")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    reply = ask_daemon({"cmd": "train", "repo": repo_selector(args.repo), "now": args.now}, timeout=30)
    print(reply.get("result", ""))
    return 0
