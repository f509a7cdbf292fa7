"""`gitlora uninstall [REPO]`: restore the hooks exactly and stop serving the repository (data is kept)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gitlora.hooks import install as hooks

from .. import paths, repos
from ..control import DaemonNotRunning, request
from ..gitrepo import GitRepo, GitRepoError
from .common import print_hook_actions


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("uninstall", help="remove gitlora's hooks (restoring yours) and unregister")
    p.add_argument("repo", nargs="?", default=".")
    p.add_argument("--forget", action="store_true",
                   help="stop serving a repository that is gone (moved or deleted); its state dir is kept")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # A repository that still exists is uninstalled properly (hooks restored) even with --forget: forgetting
    # it alone would leave hooks that keep writing spool lines for nobody.
    if not _is_repository(args.repo):
        gone = repos.registered_match(args.repo)
        if gone:
            return forget(gone)
        print(f"gitlora: {args.repo!r} is not a git repository, and no registered repository matches it",
              file=sys.stderr)
        return 2
    git = GitRepo(args.repo)  # not open_repo: uninstalling must not create a state dir for a stranger
    state_root = paths.RepoPaths.for_git_dir(git.common_dir).root
    try:
        result = hooks.uninstall(Path(args.repo))
    except hooks.HookError as exc:
        print(f"gitlora: {exc}", file=sys.stderr)
        return 2
    print_hook_actions(result.actions)
    try:
        request({"cmd": "unregister", "repo": str(git.common_dir)})
    except DaemonNotRunning:
        pass
    if repos.unregister(git.common_dir):
        print(f"unregistered {git.name}; its examples, shards and adapters stay in {state_root}")
    else:
        print(f"{git.name} was not registered with gitlora; nothing to unregister")
    return 0


def _is_repository(path: str) -> bool:
    try:
        GitRepo(path)
    except GitRepoError:
        return False
    return True


def forget(git_dirs: list[str]) -> int:
    """Unregister repositories that are gone (their hooks went with them). Their state dirs are kept: a moved
    repository's `gitlora install NEWPATH` adopts it; delete it by hand to free the space."""
    for git_dir in git_dirs:
        try:
            request({"cmd": "unregister", "repo": git_dir})
        except DaemonNotRunning:
            pass
        repos.unregister(Path(git_dir))
        state = paths.RepoPaths.for_git_dir(git_dir).root
        print(f"forgot {paths.repo_name(git_dir)} ({git_dir}): no longer served; its state stays in {state} "
              "(`gitlora install NEWPATH` adopts it if the repository moved; delete it to free the space)")
    return 0
