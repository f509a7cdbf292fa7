"""`gitlora repair [REPO]`: rebuild a damaged store from git and verify the shards against it.

With a daemon running, the daemon repairs (the repository's worker owns its store); without one, this
process does. Either way one line says what happened.
"""
from __future__ import annotations

import argparse
import sys

from .. import config as config_mod
from .. import log
from ..control import ControlError, DaemonNotRunning, request
from ..repos import open_repo
from .common import repo_selector

# A rebuild re-parses the whole history: minutes on a large repository, and the daemon answers only at the end.
_DAEMON_TIMEOUT_S = 6 * 3600.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repair", help="rebuild a damaged store from git; verify and rebuild shards")
    p.add_argument("repo", nargs="?", default=".")
    p.add_argument("--force", action="store_true", help="rebuild even when the store looks sound")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (local repair)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    payload = {"cmd": "repair", "repo": repo_selector(args.repo), "force": args.force,
               "timeout_s": _DAEMON_TIMEOUT_S - 60}  # the daemon answers before this client gives up
    try:
        reply = request(payload, timeout=_DAEMON_TIMEOUT_S)
    except DaemonNotRunning:
        return repair_here(args.repo, force=args.force, progress=not args.no_progress)
    except ControlError as exc:
        print(f"gitlora: error: {exc}", file=sys.stderr)
        return 2
    if not reply.get("ok"):
        print(f"gitlora: repair failed: {reply.get('error')}", file=sys.stderr)
        return 1
    print(reply.get("summary", "repaired"))
    return 0 if reply.get("report", {}).get("ok", True) else 1


def repair_here(repo: str, *, force: bool = False, progress: bool = True) -> int:
    """Repair in this process (no daemon holds the store)."""
    from tqdm import tqdm

    from ..repair import RepairError, repair_store

    config = config_mod.load()
    opened = open_repo(repo, config)
    log.configure(opened.paths.log, console=False)  # the outcome is the one line printed below
    bar = None  # only once a rebuild starts: checking a sound store shows nothing but its outcome

    def on_progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="commit", disable=not progress, dynamic_ncols=True, file=sys.stderr,
                       desc=f"rebuilding the store of {opened.git.name}")
        bar.update(done - bar.n)

    try:
        report = repair_store(opened, config, progress=on_progress, force=force)
    except RepairError as exc:
        print(f"gitlora: repair failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the store was left as it was; rerun `gitlora repair`", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1
