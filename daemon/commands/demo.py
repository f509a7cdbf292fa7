"""`gitlora demo [--dir DIR]`: the README's main job, shown on a freshly built demo repository."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..demo_repo import build_demo_repo
from . import backfill as backfill_cmd
from . import examples as examples_cmd
from . import stats as stats_cmd


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a demo Rust repo and run gitlora on it end to end")
    p.add_argument("--dir", type=Path, default=None, help="where to build it (kept for you to look at)")
    p.set_defaults(run=run)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run(args: argparse.Namespace) -> int:
    base = args.dir or Path(tempfile.mkdtemp(prefix="gitlora-demo-"))
    repo = base / "demo-crate"
    if repo.exists():
        print(f"{repo} already exists: pass an empty --dir")
        return 2
    _banner(f"building a demo Rust repository with a realistic history in {repo}")
    build_demo_repo(repo)
    _banner("backfilling its history into the example store")
    summary = backfill_cmd.backfill(str(repo), progress=True)
    print(f"{summary.commits} commits, {summary.examples} examples, {summary.skipped} commits skipped")
    _banner("gitlora stats")
    stats_cmd.run(argparse.Namespace(repo=str(repo), json=False))
    _banner("a few examples (gitlora examples --limit 3)")
    examples_cmd.run(argparse.Namespace(repo=str(repo), commit="HEAD~10", limit=2, json=False))
    examples_cmd.run(argparse.Namespace(repo=str(repo), commit="HEAD", limit=3, json=False))
    _banner("done")
    print(f"the demo repository stays at {repo}; try `gitlora stats {repo}`")
    return 0
