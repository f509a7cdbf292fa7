"""`gitlora ingest [REPO]` / `pause` / `resume`: nudge or hold the daemon's work on a repository."""
from __future__ import annotations

import argparse

from .common import ask_daemon, repo_selector


def add_parser(sub: argparse._SubParsersAction) -> None:
    for name, text in (("ingest", "ask the daemon to ingest a repository now"),
                       ("pause", "pause ingest (commits are still spooled)"), ("resume", "resume ingest")):
        p = sub.add_parser(name, help=text)
        p.add_argument("repo", nargs="?", default=None, help="a repository (default: all)")
        p.set_defaults(run=run, cmd=name)


def run(args: argparse.Namespace) -> int:
    payload = {"cmd": args.cmd, **({"repo": repo_selector(args.repo)} if args.repo else {"all": True})}
    reply = ask_daemon(payload)
    print(f"{args.cmd}: " + ", ".join(reply.get("repos", [])))
    return 0
