"""Stored examples -> JSONL shards + manifest (DESIGN.md contract), written atomically, never rewritten.

A flush takes every example stored since the last flush (whole commits only: a commit's examples land in
one transaction) as one *group*. Inside a group the split is temporal: the newest `eval_fraction` of its
commits (by commit time) become the group's eval shard, the rest its train shards. Rounds evaluate on the
newest eval shards and train on older data, so no eval commit is older than a commit it is tested against.
The plan of a group is a pure function of its examples, so deleting shards and re-flushing the recorded
groups from the store reproduces them byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .repos import atomic_write_text
from .store import Store


@dataclass(frozen=True)
class ShardPlan:
    split: str  # train | eval
    seqs: tuple[int, ...]


def plan_group(examples: list[tuple[int, str, int]], shard_size: int, eval_fraction: float) -> list[ShardPlan]:
    """(seq, commit, commit_time) in seq order -> shards. Pure.

    Commits are ordered by (commit time, first seq); the newest ceil(eval_fraction * n) of them (none for a
    single-commit group) form one eval shard; the rest fill train shards of about `shard_size` examples,
    never splitting a commit."""
    by_commit: dict[str, list[int]] = {}
    times: dict[str, int] = {}
    for seq, commit, commit_time in examples:
        by_commit.setdefault(commit, []).append(seq)
        times[commit] = commit_time
    commits = sorted(by_commit, key=lambda c: (times[c], by_commit[c][0]))
    n_eval = math.ceil(eval_fraction * len(commits)) if len(commits) >= 2 else 0
    train_commits, eval_commits = commits[:len(commits) - n_eval], commits[len(commits) - n_eval:]
    plans: list[ShardPlan] = []
    current: list[int] = []
    for commit in train_commits:
        current.extend(by_commit[commit])
        if len(current) >= shard_size:
            plans.append(ShardPlan("train", tuple(sorted(current))))
            current = []
    if current:
        plans.append(ShardPlan("train", tuple(sorted(current))))
    eval_seqs = sorted(s for c in eval_commits for s in by_commit[c])
    if eval_seqs:
        plans.append(ShardPlan("eval", tuple(eval_seqs)))
    return plans


_COMMIT = re.compile(rb'"commit":"([0-9a-f]{40,64})"')
_COMMIT_TIME = re.compile(rb'"commit_time":(-?\d+)[,}]')


def _meta(raw: bytes) -> tuple[str, int]:
    """(commit, commit_time) of a stored example. Quotes inside JSON strings are escaped, so these top-level
    keys cannot be matched inside the code text; a full parse is the fallback."""
    commit, commit_time = _COMMIT.search(raw), _COMMIT_TIME.search(raw)
    if commit and commit_time:
        return commit.group(1).decode(), int(commit_time.group(1))
    record = json.loads(raw)
    return record["commit"], int(record["commit_time"])


class ShardWriter:
    """Owns `shards/` and `manifest.json` of one repository."""

    def __init__(self, shards_dir: Path, manifest_path: Path, store: Store) -> None:
        self.dir = shards_dir
        self.manifest_path = manifest_path
        self.store = store
        # The ingest thread flushes, and so does `train --now` on a control thread: one flush at a time, or
        # two could plan the same group and overwrite each other's files.
        self._lock = threading.Lock()

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return {"shards": [], "groups": []}

    def flushed_upto(self) -> int:
        """The first example sequence no flush has taken yet."""
        groups = self.manifest().get("groups", [])
        return groups[-1]["last_seq"] + 1 if groups else 0

    def unflushed(self) -> int:
        return self.store.next_seq() - self.flushed_upto()

    def flush(self, shard_size: int, eval_fraction: float) -> list[dict[str, Any]]:
        """Write every unflushed example as one group; returns the new manifest entries."""
        with self._lock:
            return self._flush(shard_size, eval_fraction)

    def _flush(self, shard_size: int, eval_fraction: float) -> list[dict[str, Any]]:
        start, stop = self.flushed_upto(), self.store.next_seq()
        if stop <= start:
            return []
        manifest = self.manifest()
        group = {"id": len(manifest.get("groups", [])) + 1, "first_seq": start, "last_seq": stop - 1,
                 "shard_size": shard_size, "eval_fraction": eval_fraction}
        entries = self._write_group(group, next_id=len(manifest["shards"]) + 1)
        manifest["shards"].extend(entries)
        manifest.setdefault("groups", []).append(group)
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1) + "\n")
        return entries

    def rebuild(self) -> int:
        """Re-create missing shard files from the store using the recorded groups; verifies each sha256."""
        with self._lock:
            return self._rebuild()

    def _rebuild(self) -> int:
        manifest = self.manifest()
        written = 0
        next_id = 1
        for group in manifest.get("groups", []):
            expected = [s for s in manifest["shards"] if s.get("group") == group["id"]]
            entries = self._write_group(group, next_id=next_id, only_missing=True)
            for entry, recorded in zip(entries, expected):
                if entry["sha256"] != recorded["sha256"]:
                    raise RuntimeError(f"shard {recorded['id']} does not reproduce: store and manifest disagree")
            written += sum(1 for e in entries if e.pop("_written", False))
            next_id += len(entries)
        return written

    def _write_group(self, group: dict[str, Any], next_id: int, only_missing: bool = False) -> list[dict[str, Any]]:
        # Two passes so memory stays at one shard, not one group (a first backfill is one group of ~100k
        # examples): metadata only, then each shard's examples fetched by sequence.
        metas = {seq: _meta(data) for seq, data in self.store.iter_raw_examples(group["first_seq"],
                                                                                group["last_seq"] + 1)}
        plans = plan_group([(s, *metas[s]) for s in sorted(metas)], group["shard_size"], group["eval_fraction"])
        self.dir.mkdir(parents=True, exist_ok=True)
        entries = []
        for offset, plan in enumerate(plans):
            shard_id = next_id + offset
            body = b"".join(raw + b"\n" for raw in self.store.get_raw_examples(plan.seqs))
            path = self.dir / f"{shard_id:06d}.jsonl"
            entry: dict[str, Any] = {
                "id": shard_id, "file": path.name, "first_seq": plan.seqs[0], "last_seq": plan.seqs[-1],
                "count": len(plan.seqs), "first_commit_time": min(metas[s][1] for s in plan.seqs),
                "last_commit_time": max(metas[s][1] for s in plan.seqs),
                "sha256": hashlib.sha256(body).hexdigest(), "split": plan.split, "group": group["id"],
            }
            if not (only_missing and path.exists()):
                _atomic_write_bytes(path, body)
                entry["_written"] = True
            entries.append(entry)
        if not only_missing:
            for entry in entries:
                entry.pop("_written", None)
        return entries


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)


def read_shard(path: Path) -> Iterable[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
