"""`gitlora stats [REPO]`: what the store holds, by commit status, item kind and skip reason."""
from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from .. import config as config_mod
from ..repos import open_repo
from ..store import Store, StoreDamaged, StoreError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="counts by commit status, item kind and skip reason")
    p.add_argument("repo", nargs="?", default=".")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def collect(store: Store) -> dict[str, Any]:
    by_status: Counter[str] = Counter()
    commit_skips: Counter[str] = Counter()
    file_skips: Counter[str] = Counter()
    notes = 0
    for _, record in store.iter_commits():
        by_status[record.get("status", "?")] += 1
        if record.get("status") == "skipped":
            commit_skips[str(record.get("reason", "?")).split(":")[0]] += 1
        for skipped in record.get("skipped_files", []):
            file_skips[skipped["reason"].split(":")[0]] += 1
        if record.get("syntax_errors"):
            file_skips["syntax-error (partial)"] += len(record["syntax_errors"])
        notes += len(record.get("notes", []))
    by_kind: Counter[str] = Counter()
    by_change: Counter[str] = Counter()
    for _, example in store.iter_examples():
        by_kind[example["kind"]] += 1
        by_change[example["change_kind"]] += 1
    return {
        "commits": dict(by_status), "examples": sum(by_kind.values()), "by_kind": dict(by_kind.most_common()),
        "by_change": dict(by_change.most_common()), "commit_skip_reasons": dict(commit_skips.most_common()),
        "file_skip_reasons": dict(file_skips.most_common()), "notes": notes, "store_bytes": store.size_bytes(),
    }


def render(stats: dict[str, Any]) -> str:
    lines = ["commits:  " + ", ".join(f"{k} {v}" for k, v in sorted(stats["commits"].items())) or "commits:  none"]
    lines.append(f"examples: {stats['examples']}  (" + ", ".join(f"{k} {v}" for k, v in stats["by_change"].items()) + ")")
    lines.append("by kind:  " + ", ".join(f"{k} {v}" for k, v in stats["by_kind"].items()))
    if stats["commit_skip_reasons"]:
        lines.append("skipped commits: " + ", ".join(f"{k} {v}" for k, v in stats["commit_skip_reasons"].items()))
    if stats["file_skip_reasons"]:
        lines.append("skipped files:   " + ", ".join(f"{k} {v}" for k, v in stats["file_skip_reasons"].items()))
    lines.append(f"store:    {stats['store_bytes'] / 1e6:.1f} MB")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    opened = open_repo(args.repo, config_mod.load())
    try:
        store = Store(opened.paths.store, readonly=True)
    except StoreDamaged:
        raise  # not "nothing stored": the CLI says what is damaged and how to rebuild it
    except StoreError:
        print(f"nothing stored yet for {opened.git.name}: run `gitlora backfill` or `gitlora install`")
        return 1
    with store:
        stats = collect(store)
    print(json.dumps(stats, indent=2) if args.json else render(stats))
    return 0
