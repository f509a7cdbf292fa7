"""`gitlora uninstall [REPO]`: restore the hooks exactly and stop serving the repository (data is kept)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gitlora.hooks import install as hooks

from .. import config as config_mod
from .. import repos
from ..control import DaemonNotRunning, request
from .common import print_hook_actions


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("uninstall", help="remove gitlora's hooks (restoring yours) and unregister")
    p.add_argument("repo", nargs="?", default=".")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    opened = repos.open_repo(args.repo, config_mod.load())
    try:
        result = hooks.uninstall(Path(args.repo))
    except hooks.HookError as exc:
        print(f"gitlora: {exc}", file=sys.stderr)
        return 2
    print_hook_actions(result.actions)
    try:
        request({"cmd": "unregister", "repo": str(opened.git.common_dir)})
    except DaemonNotRunning:
        pass
    if repos.unregister(opened.git.common_dir):
        print(f"unregistered {opened.git.name}; its examples, shards and adapters stay in {opened.paths.root}")
    else:
        print(f"{opened.git.name} was not registered with gitlora; nothing to unregister")
    return 0
