"""`gitlora stats [REPO]`: what the store holds, by commit status, item kind and skip reason, and what hygiene and
deduplication left out (items by reason, messages left out of prompts by reason, test examples), and how often
an example that references another file's definition got it as cross-file context."""
from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from .. import config as config_mod
from ..repos import open_repo
from ..store import Store, StoreDamaged, StoreError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="counts by commit status, item kind and skip reason (files, items, messages)")
    p.add_argument("repo", nargs="?", default=".")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def collect(store: Store) -> dict[str, Any]:
    by_status: Counter[str] = Counter()
    commit_skips: Counter[str] = Counter()
    file_skips: Counter[str] = Counter()
    item_skips: Counter[str] = Counter()
    messages_omitted: Counter[str] = Counter()
    duplicate_commits = 0
    notes = 0
    cross = Counter()
    for _, record in store.iter_commits():
        by_status[record.get("status", "?")] += 1
        if record.get("status") == "skipped":
            commit_skips[str(record.get("reason", "?")).split(":")[0]] += 1
        for skipped in record.get("skipped_files", []):
            file_skips[skipped["reason"].split(":")[0]] += 1
        if record.get("syntax_errors"):
            file_skips["syntax-error (partial)"] += len(record["syntax_errors"])
        item_skips.update(record.get("skipped_items") or {})
        if record.get("duplicates"):  # a store indexed after the fact: duplicates kept, marked per commit
            item_skips["duplicate (kept, marked)"] += record["duplicates"]
            duplicate_commits += record["duplicates"] >= record.get("examples", 0) > 0
        if record.get("message_omitted"):
            messages_omitted[record["message_omitted"]] += 1
        notes += len(record.get("notes", []))
        for key in ("referencing", "resolved", "bytes"):
            cross[key] += record.get(f"cross_file_{key}", 0)
    by_kind: Counter[str] = Counter()
    by_change: Counter[str] = Counter()
    tests = 0
    for _, example in store.iter_examples():
        by_kind[example["kind"]] += 1
        by_change[example["change_kind"]] += 1
        tests += bool(example.get("test"))
    return {
        "commits": dict(by_status), "examples": sum(by_kind.values()), "by_kind": dict(by_kind.most_common()),
        "by_change": dict(by_change.most_common()), "commit_skip_reasons": dict(commit_skips.most_common()),
        "file_skip_reasons": dict(file_skips.most_common()), "item_skip_reasons": dict(item_skips.most_common()),
        "messages_omitted": dict(messages_omitted.most_common()), "test_examples": tests,
        "duplicate_commits": duplicate_commits, "notes": notes, "store_bytes": store.size_bytes(),
        "cross_file": {"referencing": cross["referencing"], "resolved": cross["resolved"],
                       "rate": round(cross["resolved"] / cross["referencing"], 4) if cross["referencing"] else None,
                       "bytes_per_resolved": round(cross["bytes"] / cross["resolved"]) if cross["resolved"] else 0},
    }


def render(stats: dict[str, Any]) -> str:
    lines = ["commits:  " + ", ".join(f"{k} {v}" for k, v in sorted(stats["commits"].items())) or "commits:  none"]
    lines.append(f"examples: {stats['examples']}  (" + ", ".join(f"{k} {v}" for k, v in stats["by_change"].items()) + ")")
    lines.append("by kind:  " + ", ".join(f"{k} {v}" for k, v in stats["by_kind"].items()))
    if stats["commit_skip_reasons"]:
        lines.append("skipped commits: " + ", ".join(f"{k} {v}" for k, v in stats["commit_skip_reasons"].items()))
    if stats["file_skip_reasons"]:
        lines.append("skipped files:   " + ", ".join(f"{k} {v}" for k, v in stats["file_skip_reasons"].items()))
    if stats["item_skip_reasons"]:
        lines.append("skipped items:   " + ", ".join(f"{k} {v}" for k, v in stats["item_skip_reasons"].items()))
    if stats["messages_omitted"]:
        lines.append("messages left out of prompts: " + ", ".join(
            f"{k} {v}" for k, v in stats["messages_omitted"].items()))
    if stats["test_examples"]:
        lines.append(f"test examples:   {stats['test_examples']} (weighted by ingest.test_weight)")
    cross = stats["cross_file"]
    if cross["referencing"]:
        lines.append(f"cross-file context: {cross['resolved']} of {cross['referencing']} examples that reference "
                     f"another file's definitions got them ({cross['rate']:.0%}), {cross['bytes_per_resolved']} "
                     "bytes each")
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
