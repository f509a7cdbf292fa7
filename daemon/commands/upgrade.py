"""`gitlora upgrade [REPO]`: bring a store written by an older gitlora to the current schema, from git.

It runs in this process, with a progress bar, also while the daemon runs: the daemon's worker does not write
to an outdated store (the repository shows `upgrade needed` and its new commits wait in git and the spool),
and once the upgrade is done this command nudges the daemon, which reopens the store and ingests them.
Interrupted or killed, a rerun continues where it stopped.
"""
from __future__ import annotations

import argparse
import sys

from .. import config as config_mod
from .. import log
from ..control import ControlError, DaemonNotRunning, request
from ..repos import open_repo
from . import CommandFailed

_SERVING = ("ok", "paused")  # states in which a daemon's worker has the store open for writing


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upgrade", help="re-derive a store written by an older gitlora from git (resumable)")
    p.add_argument("repo", nargs="?", default=".")
    p.add_argument("--workers", type=int, default=None, help="parser processes (default: config, else cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..upgrade import UpgradeError, store_schema, upgrade_store
    from ..store import SCHEMA_VERSION

    config = config_mod.load()
    opened = open_repo(args.repo, config)
    git_dir = str(opened.git.common_dir)
    version = store_schema(opened.paths.store)
    if version is not None and version < SCHEMA_VERSION:
        _refuse_if_served(git_dir)
    log.configure(opened.paths.log, console=False)  # the outcome is the one line printed below
    bar = None

    def on_progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="commit", disable=args.no_progress, dynamic_ncols=True, file=sys.stderr,
                       desc=f"upgrading the store of {opened.git.name}")
        bar.update(done - bar.n)

    try:
        report = upgrade_store(opened, config, progress=on_progress, workers=args.workers)
    except UpgradeError as exc:
        print(f"gitlora: upgrade failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: every commit rewritten so far is kept; rerun `gitlora upgrade` to continue",
              file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    if report.action == "upgraded":
        _nudge(git_dir)
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def _refuse_if_served(git_dir: str) -> None:
    """A daemon that serves this outdated store as usual runs an older gitlora: it would go on writing the old
    shape into the upgraded store. It must be restarted (with this gitlora) first."""
    try:
        reply = request({"cmd": "status"}, timeout=10.0)
    except (DaemonNotRunning, ControlError):
        return
    for repo in reply.get("repos", []):
        if repo.get("git_dir") == git_dir and repo.get("state") in _SERVING:
            print(f"gitlora: the running daemon (pid {reply.get('pid')}) writes to this store as it is: it runs an "
                  "older gitlora. Restart it (`systemctl --user restart gitlora`, or stop and start `gitlora "
                  "daemon`), then run `gitlora upgrade` again", file=sys.stderr)
            raise CommandFailed(1)


def _nudge(git_dir: str) -> None:
    """Tell a running daemon the store is current again: its worker reopens it and ingests what waited."""
    try:
        request({"cmd": "ingest", "repo": git_dir}, timeout=10.0)
    except (DaemonNotRunning, ControlError):
        pass  # no daemon, or it cannot answer now: its periodic rescan reopens the store anyway
