"""`gitlora install [REPO]`: hooks in, repo registered, its history ingested in the background."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from gitlora.hooks import install as hooks

from .. import config as config_mod
from .. import paths, repos
from ..control import DaemonNotRunning, request
from ..gitenv import git_env
from ..gitrepo import GitRepo
from .common import print_hook_actions


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install", help="install git hooks and start learning from a repository")
    p.add_argument("repo", nargs="?", default=".")
    p.add_argument("--allow-hooks-path", action="store_true",
                   help="install into core.hooksPath when the repository sets one")
    p.add_argument("--no-backfill", action="store_true", help="do not ingest existing history now")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = config_mod.load()
    git = GitRepo(args.repo, exclude=config.ingest.exclude, include_remotes=config.ingest.include_remotes)
    try:
        result = hooks.install(Path(args.repo), allow_hooks_path=args.allow_hooks_path)
    except hooks.HookError as exc:
        print(f"gitlora: {exc}", file=sys.stderr)
        return 2
    print_hook_actions(result.actions)
    try:
        # The daemon adopts a moved repository's state itself: it may be serving the old path.
        reply = request({"cmd": "register", "path": str(git.common_dir)}, timeout=120.0)
        if not reply.get("ok"):
            print(f"the daemon refused the repository: {reply.get('error')}", file=sys.stderr)
            return 1
        report_adopted(git, reply.get("adopted_from"))
        print(f"registered {git.name} with the running daemon; it ingests the history now")
    except DaemonNotRunning:
        report_adopted(git, adopt_if_moved(git))
        opened = repos.open_repo(args.repo, config)
        repos.register(opened.git.common_dir)
        print(f"registered {opened.git.name}; the daemon is not running (start it: `gitlora daemon` or "
              "`gitlora service install`); commits are spooled meanwhile")
        if not args.no_backfill:
            log_path = opened.paths.root / "backfill.out"
            with open(log_path, "ab") as out:
                subprocess.Popen([sys.executable, "-m", "gitlora.daemon", "backfill", "--no-progress",
                                  str(opened.git.common_dir)], stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=git_env(), cwd=os.path.expanduser("~"))
            print(f"backfilling history in the background (output: {log_path})")
    return 0


def adopt_if_moved(git: GitRepo) -> str | None:
    """Without a daemon: a repository whose state sits under a path that is gone (same root commits, its
    stored commits here) takes that state over instead of ingesting its history a second time."""
    if paths.RepoPaths.for_git_dir(git.common_dir).store.exists():
        return None
    moved_from = repos.find_moved(git)
    if moved_from is not None:
        repos.adopt(moved_from, git)
    return moved_from


def report_adopted(git: GitRepo, moved_from: str | None) -> None:
    if moved_from:
        print(f"recognised {git.name} as moved from {moved_from}: its store, shards and adapters now live in "
              f"{paths.RepoPaths.for_git_dir(git.common_dir).root}; nothing is ingested again")
