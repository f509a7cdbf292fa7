"""Bringing a store written by an older schema to the current one (`gitlora upgrade`).

The store is derived data and its commits are in git, so every stored commit is re-derived and its examples
are rewritten **in place**: the same sequence numbers, so shard groups, shard plans, commit facts, the rounds'
trained commits and the example-key index all stay as they are; only the records gain the new fields (and the
shard files their new bytes). A re-derived commit replaces its old examples only when they are the same
examples (every old field equal, the repository's name aside: a moved repository keeps the name it was
trained with); otherwise (another config, a commit no longer in git) the old records are kept and given what
can be known without git (`examples.upgraded_record`), and the commit is reported and marked (`upgrade`).
Upgrading never adds, drops or reorders an example.

Exactly once, resumable: commits are rewritten in sequence order, a few per transaction, and the same
transaction records how far the rewrite got (`x:upgrade` in `meta`); killed at any instant, a rerun continues
after the last whole commit. Then the shards are rewritten from the store (idempotent) and, last, the
schema version is stamped: until then the store reads as outdated, and nothing but the upgrade writes to it.
`repair.lock` keeps one repair or upgrade per repository.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import compact_json, log
from .config import Config
from .examples import upgraded_record
from .gitrepo import GitRepoError
from .ingest import Ingestor
from .repair import RepairError, rebuild_lock
from .repos import OpenedRepo
from .shards import ShardVerification, ShardWriter, example_meta
from .store import SCHEMA_VERSION, PendingCommit, Store, StoreDamaged, StoreError, example_key

_log = log.get("gitlora.upgrade")
_BATCH = 16  # commits per rewrite transaction

Progress = Callable[[int, int], None]  # (commits done, commits in all)


class UpgradeError(Exception):
    """The upgrade cannot run (a damaged store, another repair or upgrade, a newer schema, disk errors)."""


@dataclass
class UpgradeReport:
    repo: str
    action: str  # "current" or "no store" (nothing to do), "upgraded", or "stopped" (asked to stop: rerun continues)
    from_version: int = SCHEMA_VERSION
    commits: int = 0  # commits whose examples were rewritten (in this run and any run it continued)
    examples: int = 0  # examples in the store
    not_rederived: list[str] = field(default_factory=list)  # not in git any more: their records kept, extended
    differed: list[str] = field(default_factory=list)  # re-derived other examples: the stored ones kept, extended
    shards: ShardVerification = field(default_factory=ShardVerification)

    @property
    def ok(self) -> bool:
        return self.action != "stopped" and self.shards.ok

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "repo": self.repo, "action": self.action, "from_version": self.from_version,
                "to_version": SCHEMA_VERSION, "commits": self.commits, "examples": self.examples,
                "not_rederived": self.not_rederived, "differed": self.differed,
                "shards_checked": self.shards.checked, "shards_rewritten": self.shards.rebuilt,
                "shards_failed": {str(k): v for k, v in self.shards.failed.items()}}

    def summary(self) -> str:
        if self.action == "stopped":
            return (f"{self.repo}: upgrade stopped after {self.commits} commits; rerun `gitlora upgrade` to "
                    "continue (nothing is done twice)")
        if self.action == "no store":
            return f"{self.repo}: no store yet; nothing to upgrade"
        if self.action == "current":
            return f"{self.repo}: store already has schema {SCHEMA_VERSION}; nothing to upgrade"
        text = (f"{self.repo}: store upgraded from schema {self.from_version} to {SCHEMA_VERSION}: "
                f"{self.commits} commits re-derived from git, {self.examples} examples")
        if self.not_rederived:
            text += (f"; {len(self.not_rederived)} commits no longer in git (first {self.not_rederived[0][:12]}) "
                     "keep their examples, without blob ids and spans")
        if self.differed:
            text += (f"; {len(self.differed)} commits re-derived differently (first {self.differed[0][:12]}) "
                     "keep their stored examples, without blob ids and spans")
        shards = self.shards
        text += f"; {shards.checked} shards, {len(shards.rebuilt)} rewritten"
        if shards.failed:
            first = min(shards.failed)
            text += f", {len(shards.failed)} not rewritable (shard {first}: {shards.failed[first]})"
        return text


def upgrade_store(opened: OpenedRepo, config: Config, *, progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None, workers: int | None = None) -> UpgradeReport:
    """Upgrade the repository's store to SCHEMA_VERSION (see the module docstring). Precondition: nothing else
    writes to the store (a daemon's worker does not while it is outdated: it shows `upgrade needed`)."""
    try:
        with rebuild_lock(opened.paths.root, "upgrade"):
            return _upgrade(opened, config, progress, should_stop or (lambda: False), workers)
    except RepairError as exc:
        raise UpgradeError(str(exc)) from None
    except StoreDamaged as exc:
        raise UpgradeError(f"{exc}; repair it first: `gitlora repair {opened.git.common_dir}`") from None
    except (StoreError, OSError) as exc:
        raise UpgradeError(f"upgrade of {opened.git.name} failed: {exc}") from None


def _upgrade(opened: OpenedRepo, config: Config, progress: Progress | None, stop: Callable[[], bool],
             workers: int | None) -> UpgradeReport:
    paths = opened.paths
    report = UpgradeReport(repo=opened.git.name, action="current")
    if not (paths.store / "data.mdb").exists():
        report.action = "no store"
        return report
    with Store(paths.store, outdated_ok=True) as store:
        if store.schema_version >= SCHEMA_VERSION:
            report.examples = store.counters().get("examples", 0)
            return report
        state = store.get_meta("upgrade") or {"from": store.schema_version, "upto": 0, "commits": 0}
        report.from_version = int(state["from"])
        work = _commits_from(store, 0)
        todo = [(oid, seqs) for oid, seqs in work if seqs[0] >= state["upto"]]
        done = len(work) - len(todo)
        if progress:
            progress(done, len(work))
        _log.info("upgrade_start", repo=opened.git.name, from_version=report.from_version, commits=len(work),
                  remaining=len(todo))
        missing = {oid for oid, _ in todo if not _in_git(opened, oid)}
        ingestor = Ingestor(opened.git, store, config.ingest, workers=workers, source="upgrade")
        derived = ingestor.derive([oid for oid, _ in todo if oid not in missing], stop)
        try:
            for start in range(0, len(todo), _BATCH):
                part = todo[start:start + _BATCH]
                state = _rewrite(store, part, missing, derived, state) if not stop() else None
                if state is None:
                    report.action = "stopped"
                    report.commits = (store.get_meta("upgrade") or {}).get("commits", 0)
                    return report
                done += len(part)
                if progress:
                    progress(done, len(work))
        finally:
            derived.close()  # ends the parser processes of a stopped run now, not at garbage collection
        report.commits = state.get("commits", 0)
        report.not_rederived, report.differed = _marked(store, work)
        report.shards = ShardWriter(paths.shards, paths.manifest, store).rewrite(SCHEMA_VERSION)
        store.set_schema_version(SCHEMA_VERSION)  # last: until now the store reads as outdated
        report.examples = store.counters().get("examples", 0)
    report.action = "upgraded"
    _log.info("upgraded", repo=opened.git.name, summary=report.summary())
    return report


def _commits_from(store: Store, start: int) -> list[tuple[str, list[int]]]:
    """(commit, its examples' sequence numbers) in sequence order: a commit's examples are contiguous."""
    work: list[tuple[str, list[int]]] = []
    for seq, raw in store.iter_raw_examples(start):
        commit, _ = example_meta(raw)
        if work and work[-1][0] == commit:
            work[-1][1].append(seq)
        else:
            work.append((commit, [seq]))
    return work


def _in_git(opened: OpenedRepo, oid: str) -> bool:
    try:
        opened.git.resolve_commit(oid)
    except GitRepoError:
        return False
    return True


def _rewrite(store: Store, part: list[tuple[str, list[int]]], missing: set[str],
             derived: Generator[PendingCommit, None, None], state: dict[str, Any]) -> dict[str, Any] | None:
    """One transaction: `part`'s commits rewritten and the progress after them (returned); None when the
    derivation stopped first (nothing of `part` is written then)."""
    examples: dict[int, bytes] = {}
    records: dict[bytes, dict[str, Any]] = {}
    definitions: dict[str, bytes] = {}  # what the derivation parsed, stored as ingest stores it
    for oid, seqs in part:
        old = store.get_raw_examples(seqs)
        pending = None
        if oid not in missing:
            pending = next(derived, None)
            if pending is None:
                return None
            if pending.oid.hex() != oid:
                raise StoreError(f"upgrade re-derived {pending.oid.hex()} where {oid} was expected")
            definitions.update(pending.definitions)
        new = _same_examples(old, pending.examples) if pending is not None else None
        if new is None:
            mark = "not-in-git" if pending is None else "differed"
            new = [compact_json.encode(upgraded_record(json.loads(raw))) for raw in old]
            record = store.get_commit(bytes.fromhex(oid))
            if record is not None:
                records[bytes.fromhex(oid)] = {**record, "upgrade": mark}
            _log.warning("upgrade_kept_records", commit=oid, why=mark)
        examples.update(zip(seqs, new))
    state = {**state, "upto": part[-1][1][-1] + 1, "commits": state.get("commits", 0) + len(part)}
    store.rewrite(examples, records, {"upgrade": state}, definitions)
    return state


_RENAMEABLE = ("repo",)  # what may differ between a stored example and its re-derivation: a moved repository
# Decided by the store when the commit was written, from what it had stored before (the message left out as
# `repeated`): a re-derivation outside the store cannot know it, so the stored value stands.
_STORE_DECIDED = ("message", "message_omitted")


def _same_examples(old: list[bytes], new: list[bytes | dict[str, Any]]) -> list[bytes] | None:
    """The re-derived examples to store in place of `old`, or None when they are not the same examples.

    Matched by example identity (store.example_key: path, item, text after), not by position: the store left out
    duplicates and near-duplicates that a re-derivation produces again (those stay left out)."""
    derived: dict[bytes, tuple[bytes | None, dict[str, Any]]] = {}
    for value in new:
        record = json.loads(value) if isinstance(value, (bytes, bytearray)) else dict(value)
        derived.setdefault(example_key(record), (bytes(value) if isinstance(value, (bytes, bytearray)) else None,
                                                 record))
    chosen = []
    for old_raw in old:
        before = json.loads(old_raw)
        found = derived.get(example_key(before))
        if found is None:
            return None
        raw, after = found[0], dict(found[1])
        changed = False
        for key in _STORE_DECIDED + _RENAMEABLE:
            if before.get(key) != after.get(key) and (key in before or key in _STORE_DECIDED):
                if key in before:
                    after[key] = before[key]
                else:
                    after.pop(key, None)
                changed = True
        if any(after.get(key) != value for key, value in before.items()):
            return None
        chosen.append(raw if raw is not None and not changed else compact_json.encode(after))
    return chosen


def _marked(store: Store, work: list[tuple[str, list[int]]]) -> tuple[list[str], list[str]]:
    """Commits whose records say the upgrade kept their examples: (not in git, re-derived differently)."""
    not_in_git: list[str] = []
    differed: list[str] = []
    for oid, _ in work:
        mark = (store.get_commit(bytes.fromhex(oid)) or {}).get("upgrade")
        if mark == "not-in-git":
            not_in_git.append(oid)
        elif mark == "differed":
            differed.append(oid)
    return not_in_git, differed


def store_schema(store_dir: Path) -> int | None:
    """The schema version of the store at `store_dir` (read-only), or None when there is none."""
    if not (Path(store_dir) / "data.mdb").exists():
        return None
    with Store(store_dir, readonly=True) as store:
        return store.schema_version
