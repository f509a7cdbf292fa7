"""Stored examples -> JSONL shards + manifest (DESIGN.md, *Shards and manifest*), written atomically, never rewritten.

A flush takes every example stored since the last flush (whole commits only: a commit's examples land in
one transaction) as one *group* of shards of about `shard_size` examples, commits in time order, never split.
Groups flushed before the rolling held-out window existed also hold an eval shard (their newest
`eval_fraction` of commits); new groups record `eval_fraction` 0. Which commits a round trains, replays or
holds out is not the shards' business: each manifest entry lists the commits it holds (`commits`: commit,
examples, time, duplicate) and the round planner works on those facts. The plan of a group is a pure function
of its examples, so deleting shards and re-flushing the recorded groups from the store reproduces them byte
for byte.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_bytes, atomic_write_text
from .store import Store, StoreError


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


def example_meta(raw: bytes) -> tuple[str, int]:
    """(commit, commit_time) of a stored example. Quotes inside JSON strings are escaped, so these top-level
    keys cannot be matched inside the code text; a full parse is the fallback."""
    commit, commit_time = _COMMIT.search(raw), _COMMIT_TIME.search(raw)
    if commit and commit_time:
        return commit.group(1).decode(), int(commit_time.group(1))
    record = json.loads(raw)
    return record["commit"], int(record["commit_time"])


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest, or an empty one when there is none yet (or it does not parse)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"shards": [], "groups": []}


class ShardWriter:
    """Owns `shards/` and `manifest.json` of one repository."""

    def __init__(self, shards_dir: Path, manifest_path: Path, store: Store) -> None:
        self.dir = shards_dir
        self.manifest_path = manifest_path
        self.store = store
        # The ingest thread flushes, and so does `train --now` on a control thread: one flush at a time, or
        # two could plan the same group and overwrite each other's files. Reentrant: a flush reads the
        # manifest, which may add commit facts to an old one.
        self._lock = threading.RLock()

    def manifest(self) -> dict[str, Any]:
        """The manifest, every readable shard's entry with its commit facts (derived once, from the shard's
        own file, for a manifest written before they existed)."""
        manifest = read_manifest(self.manifest_path)
        if all("commits" in entry for entry in manifest["shards"]):
            return manifest
        with self._lock:
            manifest = read_manifest(self.manifest_path)
            added = 0
            for entry in manifest["shards"]:
                if "commits" not in entry:
                    body = self.verified_body(entry)
                    if body is not None:  # else left for `verify` to rebuild, and derived on a later read
                        entry["commits"] = self._commit_facts([example_meta(line) for line in body.splitlines()
                                                               if line.strip()])
                        added += 1
            if added:
                atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1) + "\n")
            return manifest

    def _commit_facts(self, metas: list[tuple[str, int]]) -> list[dict[str, Any]]:
        """[(commit, commit_time)] of a shard's examples, in order -> one fact per commit, in first-seen order:
        its example count, commit time and whether the store marked it a duplicate of earlier commits."""
        counts: dict[str, int] = {}
        times: dict[str, int] = {}
        for commit, commit_time in metas:
            counts[commit] = counts.get(commit, 0) + 1
            times[commit] = commit_time
        facts = []
        for commit, count in counts.items():
            record = self.store.get_commit(bytes.fromhex(commit)) or {}
            duplicate = bool(record.get("examples")) and record.get("duplicates", 0) >= record["examples"]
            facts.append({"commit": commit, "examples": count, "time": times[commit], "duplicate": duplicate})
        return facts

    def verified_body(self, entry: dict[str, Any]) -> bytes | None:
        """A shard file's bytes when they match the sha256 its manifest entry records, else None."""
        try:
            body = (self.dir / entry["file"]).read_bytes()
        except OSError:
            return None
        return body if hashlib.sha256(body).hexdigest() == entry["sha256"] else None

    def flushed_upto(self) -> int:
        """The first example sequence no flush has taken yet."""
        groups = self.manifest().get("groups", [])
        return groups[-1]["last_seq"] + 1 if groups else 0

    def unflushed(self) -> int:
        return self.store.next_seq() - self.flushed_upto()

    def flush(self, shard_size: int, eval_fraction: float = 0.0) -> list[dict[str, Any]]:
        """Write every unflushed example as one group; returns the new manifest entries. (`eval_fraction` > 0
        only to reproduce the layout of groups written before the held-out window.)"""
        with self._lock:
            return self._flush(shard_size, eval_fraction)

    def _flush(self, shard_size: int, eval_fraction: float) -> list[dict[str, Any]]:
        start, stop = self.flushed_upto(), self.store.next_seq()
        if stop <= start:
            return []
        manifest = self.manifest()
        group = {"id": len(manifest.get("groups", [])) + 1, "first_seq": start, "last_seq": stop - 1,
                 "shard_size": shard_size, "eval_fraction": eval_fraction,
                 "schema_version": self.store.schema_version}
        entries = self._write_group(group, next_id=len(manifest["shards"]) + 1)
        manifest["shards"].extend(entries)
        manifest.setdefault("groups", []).append(group)
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1) + "\n")
        return entries

    def verify(self, rebuild: bool = True) -> "ShardVerification":
        """Check every shard file against the sha256 its manifest entry records; with `rebuild`, rewrite a
        missing or mismatching one from the store (a group's plan is a pure function of its examples, so
        this reproduces it byte for byte). A shard the store cannot reproduce is reported in `failed`,
        never accepted: training on it would train on something the manifest does not describe."""
        with self._lock:
            return self._verify(rebuild)

    def _verify(self, rebuild: bool) -> "ShardVerification":
        manifest = self.manifest()
        result = ShardVerification()
        for group in manifest.get("groups", []):
            recorded = sorted((s for s in manifest["shards"] if s.get("group") == group["id"]), key=lambda s: s["id"])
            bad = {}
            for entry in recorded:
                result.checked += 1
                problem = _file_problem(self.dir / entry["file"], entry["sha256"])
                if problem:
                    bad[entry["id"]] = problem
            if not bad:
                continue
            if not rebuild:
                result.failed.update(bad)
                continue
            reproduced, why_not = self._reproduce(group, recorded)
            for entry in recorded:
                if entry["id"] not in bad:
                    continue
                plan = reproduced.get(entry["id"])
                if plan is None:
                    result.failed[entry["id"]] = f"{bad[entry['id']]}; cannot rebuild: {why_not}"
                    continue
                body = self._body(plan.seqs)
                if hashlib.sha256(body).hexdigest() != entry["sha256"]:
                    result.failed[entry["id"]] = (f"{bad[entry['id']]}; cannot rebuild: the store's examples "
                                                  "differ from those the shard was made of")
                    continue
                atomic_write_bytes(self.dir / entry["file"], body)
                result.rebuilt.append(entry["id"])
        return result

    def rewrite(self, schema_version: int) -> "ShardVerification":
        """Rewrite every shard from the store, whose examples `upgrade` rewrote in place (same sequence numbers,
        so the same plans; new bytes): each changed file atomically, then the manifest with their sha256 and
        `schema_version` on each group. Idempotent: killed before the manifest is written, a rerun writes the
        same files again. A group the store cannot reproduce (a lost shard) is reported and left as it was."""
        with self._lock:
            manifest = self.manifest()
            result = ShardVerification()
            for group in manifest.get("groups", []):
                recorded = sorted((s for s in manifest["shards"] if s.get("group") == group["id"]),
                                  key=lambda s: s["id"])
                reproduced, why_not = self._reproduce(group, recorded)
                result.checked += len(recorded)
                if not reproduced:
                    result.failed.update({entry["id"]: f"cannot rewrite: {why_not}" for entry in recorded})
                    continue
                for entry in recorded:
                    body = self._body(reproduced[entry["id"]].seqs)
                    digest = hashlib.sha256(body).hexdigest()
                    if digest != entry["sha256"] or _file_problem(self.dir / entry["file"], digest):
                        atomic_write_bytes(self.dir / entry["file"], body)
                        entry["sha256"] = digest
                        result.rebuilt.append(entry["id"])
                group["schema_version"] = schema_version
            atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1) + "\n")
            return result

    def _reproduce(self, group: dict[str, Any], recorded: list[dict[str, Any]]) -> tuple[dict[int, ShardPlan], str]:
        """The group's plans from the store by shard id, or ({}, why) when the store cannot give them all."""
        try:
            metas = self._metas(group)
        except StoreError as exc:
            return {}, str(exc)
        expected = group["last_seq"] - group["first_seq"] + 1
        if len(metas) != expected:
            return {}, (f"the store holds {len(metas)} of the {expected} examples "
                        f"{group['first_seq']}..{group['last_seq']} of group {group['id']}")
        plans = plan_group([(s, *metas[s]) for s in sorted(metas)], group["shard_size"], group["eval_fraction"])
        if len(plans) != len(recorded):
            return {}, f"the store's examples plan into {len(plans)} shards, not {len(recorded)}"
        return {entry["id"]: plan for entry, plan in zip(recorded, plans)}, ""

    def _metas(self, group: dict[str, Any]) -> dict[int, tuple[str, int]]:
        return {seq: example_meta(data) for seq, data in self.store.iter_raw_examples(group["first_seq"],
                                                                               group["last_seq"] + 1)}

    def _body(self, seqs: tuple[int, ...]) -> bytes:
        return b"".join(raw + b"\n" for raw in self.store.get_raw_examples(seqs))

    def _write_group(self, group: dict[str, Any], next_id: int) -> list[dict[str, Any]]:
        # Two passes so memory stays at one shard, not one group (a first backfill is one group of ~100k
        # examples): metadata only, then each shard's examples fetched by sequence.
        metas = self._metas(group)
        plans = plan_group([(s, *metas[s]) for s in sorted(metas)], group["shard_size"], group["eval_fraction"])
        self.dir.mkdir(parents=True, exist_ok=True)
        entries = []
        for offset, plan in enumerate(plans):
            shard_id = next_id + offset
            body = self._body(plan.seqs)
            path = self.dir / f"{shard_id:06d}.jsonl"
            entries.append({
                "id": shard_id, "file": path.name, "first_seq": plan.seqs[0], "last_seq": plan.seqs[-1],
                "count": len(plan.seqs), "first_commit_time": min(metas[s][1] for s in plan.seqs),
                "last_commit_time": max(metas[s][1] for s in plan.seqs),
                "sha256": hashlib.sha256(body).hexdigest(), "split": plan.split, "group": group["id"],
                "commits": self._commit_facts([metas[s] for s in plan.seqs]),
            })
            atomic_write_bytes(path, body)
        return entries


@dataclass
class ShardVerification:
    """What `ShardWriter.verify` found: shards checked, rewritten from the store, and those that are wrong
    and could not be rewritten (shard id -> why)."""

    checked: int = 0
    rebuilt: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        if not self.checked:
            return "no shards yet"
        text = f"{self.checked} shards verified, {len(self.rebuilt)} rebuilt from the store"
        if self.failed:
            first = min(self.failed)
            text += f", {len(self.failed)} not rebuildable (shard {first}: {self.failed[first]})"
        return text


def _file_problem(path: Path, sha256: str) -> str | None:
    """Why the shard file does not match its recorded sha256, or None when it does."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror or exc})"
    if digest.hexdigest() != sha256:
        return f"{path.name} does not match its sha256"
    return None

