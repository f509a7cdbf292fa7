"""`gitlora install [REPO]`: hooks in, repo registered, its history ingested in the background."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from gitlora.hooks import install as hooks

from .. import config as config_mod
from .. import repos
from ..control import DaemonNotRunning, request
from .common import print_hook_actions
from ..gitrepo import clean_git_env


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install", help="install git hooks and start learning from a repository")
    p.add_argument("repo", nargs="?", default=".")
    p.add_argument("--allow-hooks-path", action="store_true",
                   help="install into core.hooksPath when the repository sets one")
    p.add_argument("--no-backfill", action="store_true", help="do not ingest existing history now")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    opened = repos.open_repo(args.repo, config_mod.load())
    try:
        result = hooks.install(Path(args.repo), allow_hooks_path=args.allow_hooks_path)
    except hooks.HookError as exc:
        print(f"gitlora: {exc}", file=sys.stderr)
        return 2
    print_hook_actions(result.actions)
    repos.register(opened.git.common_dir)
    try:
        reply = request({"cmd": "register", "path": str(opened.git.common_dir)})
        if reply.get("ok"):
            print(f"registered {opened.git.name} with the running daemon; it ingests the history now")
        else:
            print(f"the daemon refused the repository: {reply.get('error')}", file=sys.stderr)
            return 1
    except DaemonNotRunning:
        print(f"registered {opened.git.name}; the daemon is not running (start it: `gitlora daemon` or "
              "`gitlora service install`); commits are spooled meanwhile")
        if not args.no_backfill:
            log_path = opened.paths.root / "backfill.out"
            with open(log_path, "ab") as out:
                subprocess.Popen([sys.executable, "-m", "gitlora.daemon", "backfill", "--no-progress",
                                  str(opened.git.common_dir)], stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=clean_git_env(), cwd=os.path.expanduser("~"))
            print(f"backfilling history in the background (output: {log_path})")
    return 0
