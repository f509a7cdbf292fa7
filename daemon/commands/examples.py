"""`gitlora examples [--commit OID] [--limit N]`: the stored examples, readable or as JSON lines."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import config as config_mod
from ..repos import open_repo
from ..store import Store, StoreDamaged, StoreError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("examples", help="show stored training examples")
    p.add_argument("repo", nargs="?", default=".")
    p.add_argument("--commit", help="only this commit (any revision git understands)")
    p.add_argument("--limit", type=int, default=10, help="at most N examples (0 = all)")
    p.add_argument("--json", action="store_true", help="one JSON object per line, exactly as stored")
    p.set_defaults(run=run)


def render(example: dict[str, Any]) -> str:
    head = (f"{example['commit'][:10]} {example['change_kind']:8} {example['kind']:6} "
            f"{example['qualified_name']}  ({example['path']})")
    body = []
    subject = example["message"].splitlines()[0] if example["message"] else ""
    body.append(f"    message: {subject}")
    for label in ("before", "after"):
        text = example[label]
        if text:
            lines = text.splitlines()
            shown = "\n".join("      " + line for line in lines[:8])
            more = f"\n      … {len(lines) - 8} more lines" if len(lines) > 8 else ""
            body.append(f"    {label}:\n{shown}{more}")
    return head + "\n" + "\n".join(body)


def run(args: argparse.Namespace) -> int:
    opened = open_repo(args.repo, config_mod.load())
    try:
        store = Store(opened.paths.store, readonly=True)
    except StoreDamaged:
        raise  # not "nothing stored": the CLI says what is damaged and how to rebuild it
    except StoreError:
        print(f"nothing stored yet for {opened.git.name}", file=sys.stderr)
        return 1
    with store:
        if args.commit:
            oid = opened.git.resolve_commit(args.commit)
            record = store.get_commit(bytes.fromhex(oid))
            if record is None:
                print(f"commit {oid} is not stored (yet)", file=sys.stderr)
                return 1
            if record.get("status") == "skipped":
                print(f"commit {oid} was skipped: {record.get('reason')}", file=sys.stderr)
            if not record.get("examples"):
                return 0
            examples = store.iter_examples(record["first_seq"], record["last_seq"] + 1)
        else:
            examples = store.iter_examples()
        for shown, (_, example) in enumerate(examples):
            if args.limit and shown >= args.limit:
                break
            print(json.dumps(example, ensure_ascii=False) if args.json else render(example) + "\n")
    return 0
