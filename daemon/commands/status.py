"""`gitlora status [--json]`: ask the daemon what it is doing; without one, say so and show the stores."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gitlora.trainer import registry  # torch-free: adapter versions on disk

from .. import paths, repos
from ..control import ControlError, DaemonNotRunning, request
from ..status_view import (adapter_vs_base, damaged_next_step, error_entry, missing_next_step, outdated_next_step,
                           render, render_repo)
from ..store import SCHEMA_VERSION, Store, StoreDamaged, StoreError, StoreOutdated
from .common import store_error_line


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="what the daemon is doing")
    p.add_argument("--json", action="store_true", help="print the daemon's status reply as JSON")
    p.set_defaults(run=run)


def offline_view() -> list[dict]:
    """What each registered repo's store holds, read-only, for when no daemon answers."""
    views = []
    for git_dir in repos.registered():
        repo_paths = paths.RepoPaths.for_git_dir(git_dir)
        view = {"name": paths.repo_name(git_dir), "git_dir": git_dir, "commits_ingested": 0, "commits_skipped": 0,
                "examples": 0}
        counters: dict = {}
        if not Path(git_dir).exists():
            view.update(state="missing", reason="repository not found", next_step=missing_next_step(git_dir))
        try:
            with Store(repo_paths.store, readonly=True) as store:
                counters = store.counters()
                version = store.schema_version
            if version < SCHEMA_VERSION:  # the same state, reason and next step as the daemon shows
                view.update(state="upgrade needed", reason=StoreOutdated(repo_paths.store, version).reason,
                            next_step=outdated_next_step(git_dir))
        except StoreDamaged as exc:  # the same state, reason, next step and error entry as the daemon shows
            view.update(state="damaged", reason=exc.reason, next_step=damaged_next_step(exc.reason, git_dir),
                        errors=[error_entry("store", store_error_line(exc))])
        except (StoreError, OSError):
            pass
        view.update(commits_ingested=counters.get("commits_ingested", 0),
                    commits_skipped=counters.get("commits_skipped", 0), examples=counters.get("examples", 0))
        current = registry.current_version(repo_paths.adapters)
        if current:  # what the adapter does against the base, from its round's metrics.json
            try:
                metrics = json.loads((repo_paths.adapters / current / registry.METRICS).read_text())
            except (OSError, ValueError):
                metrics = None
            view["training"] = {"current_adapter": current, "vs_base": adapter_vs_base(metrics)}
        views.append(view)
    return views


def run(args: argparse.Namespace) -> int:
    try:
        reply = request({"cmd": "status"}, timeout=10.0, check=True)  # an error reply is one line, not a traceback
    except DaemonNotRunning as exc:
        stores = offline_view()
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc), "daemon": None, "repos": stores}, indent=2))
        else:
            print(f"{exc}\nWhat the stores hold (read-only):", file=sys.stderr)
            for view in stores:
                print("\n".join(render_repo(view)))
            if not stores:
                print("no repositories registered")
        return 1
    except ControlError as exc:
        print(f"gitlora: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(reply, indent=2) if args.json else render(reply))
    return 0
