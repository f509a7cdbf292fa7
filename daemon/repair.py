"""Rebuilding a damaged store from git (`gitlora repair`): the store is derived data, the shards are not.

Shards are immutable and their manifest records each one's sha256 and the sequence numbers of its group, so a
rebuilt store must hold every flushed example under its group's numbers, or shards could neither be verified
nor rebuilt and the next flush would take examples a second time. The rebuild therefore goes in two passes:

1. the commits whose examples the shards hold, group by group, in the order of the group's shards (and of the
   lines inside each). Re-ingesting a commit is deterministic, so its examples come out byte for byte as the
   shard has them; re-ordering a group this way keeps every shard's plan and bytes (`plan_group` orders
   commits by commit time, ties by first sequence number, and each shard keeps its own sequence order). The
   shard's bytes are stored whatever git says: a commit no longer in git (rewritten history) keeps its
   examples, and one whose examples now come out differently (another config) is reported.
2. the rest of the history, as backfill would, from every ref tip and spooled commit.

The new store is built beside the old one and swapped in by rename; the damaged one is kept beside it.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gitlora.hooks.spool import parse_spool_chunk

from . import log
from .config import Config
from .gitrepo import GitRepo, GitRepoError
from .ingest import CommitProcessor, Ingestor
from .symbol_index import SymbolIndex
from .repos import OpenedRepo
from .shards import ShardVerification, ShardWriter, example_meta, read_manifest
from .store import SCHEMA_VERSION, PendingCommit, Store, StoreDamaged, StoreError, example_key

_log = log.get("gitlora.repair")
_BATCH = 16  # commits per write transaction in the shard pass

Progress = Callable[[int, int], None]  # (commits done, commits in all)


class RepairError(Exception):
    """Repair cannot run (another repair holds the repository, a store from a newer gitlora, disk errors)."""


@dataclass
class RepairReport:
    repo: str
    action: str  # "checked" (the store was sound), "rebuilt", or "stopped" (asked to stop; nothing changed)
    damage: str | None = None  # why the store was rebuilt
    kept_at: Path | None = None  # where the replaced store was moved
    commits: int = 0  # commits in the store afterwards
    examples: int = 0  # examples in the store afterwards
    from_shards: int = 0  # commits placed in shard order
    not_rederived: list[str] = field(default_factory=list)  # not in git any more: examples kept from the shards
    differed: list[str] = field(default_factory=list)  # re-derived differently: the shards' examples kept
    lost_shards: list[int] = field(default_factory=list)  # shard files gone or wrong when the store was rebuilt
    shards: ShardVerification = field(default_factory=ShardVerification)

    @property
    def ok(self) -> bool:
        return self.action != "stopped" and self.shards.ok

    def as_dict(self) -> dict[str, Any]:
        """For the daemon's reply to {"cmd": "repair"}: {"ok": true, "summary": ..., "report": this}."""
        return {"ok": self.ok, "repo": self.repo, "action": self.action, "damage": self.damage,
                "kept_at": str(self.kept_at) if self.kept_at else None, "commits": self.commits,
                "examples": self.examples, "from_shards": self.from_shards, "not_rederived": self.not_rederived,
                "differed": self.differed, "lost_shards": self.lost_shards, "shards_checked": self.shards.checked,
                "shards_rebuilt": self.shards.rebuilt,
                "shards_failed": {str(k): v for k, v in self.shards.failed.items()}}

    def summary(self) -> str:
        if self.action == "stopped":
            return f"{self.repo}: repair stopped before it finished; the store was left as it was"
        if self.action == "checked":
            head = f"{self.repo}: store is sound ({self.commits} commits, {self.examples} examples)"
        else:
            head = (f"{self.repo}: store rebuilt from git ({self.damage}): {self.commits} commits, "
                    f"{self.examples} examples")
            if self.not_rederived:
                head += (f"; {len(self.not_rederived)} commits no longer in git (first {self.not_rederived[0][:12]}),"
                         " their examples kept from the shards")
            if self.differed:
                head += (f"; {len(self.differed)} commits re-derived differently from their shards "
                         f"(first {self.differed[0][:12]}), the shards' examples kept")
            if self.kept_at:
                head += f"; old store kept at {self.kept_at}"
        return f"{head}; {self.shards.summary()}"


def repair_store(opened: OpenedRepo, config: Config, *, progress: Progress | None = None,
                 should_stop: Callable[[], bool] | None = None, force: bool = False) -> RepairReport:
    """Check the repository's store and rebuild it from git when it is damaged (or always, with `force`),
    then verify every shard against it (rebuilding any that do not match). Precondition: no Store on
    this repository's store path is open in this process. Running it again never doubles anything: a sound
    store is only checked, and a rebuild stores each commit once."""
    try:
        return _repair(opened, config, progress, should_stop or (lambda: False), force)
    except OSError as exc:  # a full disk, a permission: one line, and the old store is still in place
        raise RepairError(f"repair of {opened.git.name} failed: {exc}") from None


def _repair(opened: OpenedRepo, config: Config, progress: Progress | None, stop: Callable[[], bool],
            force: bool) -> RepairReport:
    paths = opened.paths
    with rebuild_lock(paths.root, "repair"):
        damage = diagnose(paths.store, read_manifest(paths.manifest))
        report = RepairReport(repo=opened.git.name, action="checked")
        if damage is not None or force:
            report.damage = damage or "rebuild asked for"
            building = paths.store.with_name(paths.store.name + ".rebuilding")
            shutil.rmtree(building, ignore_errors=True)  # left by a repair that died: ours to remove
            try:
                finished = _rebuild(opened, config, building, report, progress, stop)
            except BaseException:
                shutil.rmtree(building, ignore_errors=True)
                raise
            if not finished:
                shutil.rmtree(building, ignore_errors=True)
                report.action = "stopped"
                return report
            report.kept_at = _swap_in(building, paths.store, "damaged" if damage else "replaced")
            report.action = "rebuilt"
        try:
            with Store(paths.store, outdated_ok=True) as store:  # an outdated store's shards are verified too
                report.shards = ShardWriter(paths.shards, paths.manifest, store).verify(rebuild=True)
                counters = store.counters()
        except StoreError as exc:
            raise RepairError(f"the store is still unusable after repair: {exc}") from None
        report.commits = sum(v for k, v in counters.items() if k.startswith("commits_"))
        report.examples = counters.get("examples", 0)
        _log.info("repaired", repo=opened.git.name, summary=report.summary())
        return report


def diagnose(store_dir: Path, manifest: dict[str, Any]) -> str | None:
    """Why the store must be rebuilt, or None when it is sound: it opens, every record reads, and it holds
    every example the shards were made of. A store from a newer gitlora is not ours to rebuild: RepairError."""
    if not (store_dir / "data.mdb").exists():
        return "there is no store" if not store_dir.exists() else "data.mdb is missing"
    try:
        with Store(store_dir, readonly=True) as store:
            for _ in store.iter_commits():
                pass
            for _ in store.iter_examples():
                pass
            next_seq = store.next_seq()
    except StoreDamaged as exc:
        return exc.reason
    except StoreError as exc:
        if "not initialised" in str(exc):
            return "its databases were never created"
        raise RepairError(str(exc)) from None
    groups = manifest.get("groups", [])
    flushed = groups[-1]["last_seq"] + 1 if groups else 0
    if next_seq < flushed:
        return f"it holds {next_seq} examples, but the shards were made of {flushed}"
    return None


def _rebuild(opened: OpenedRepo, config: Config, target: Path, report: RepairReport,
             progress: Progress | None, stop: Callable[[], bool]) -> bool:
    """Build the new store at `target`; False when asked to stop first. One shard in memory at a time."""
    git = opened.git
    with Store(target) as store:
        writer = ShardWriter(opened.paths.shards, opened.paths.manifest, store)
        manifest = writer.manifest()
        everything = git.new_commits(lambda oids: set(), _tips(opened))  # the whole history, parents first
        done = 0

        def advance(commits: int, _examples: int = 0) -> None:
            nonlocal done
            done += commits
            if progress:
                progress(done, max(done, len(everything) + len(report.not_rederived)))

        processor = CommitProcessor(git, config.ingest, source="repair")
        ingestor = Ingestor(git, store, config.ingest, source="repair")  # its symbol index sees every commit
        for group in manifest.get("groups", []):
            for entry in sorted((s for s in manifest.get("shards", []) if s.get("group") == group["id"]),
                                key=lambda s: s["id"]):
                body = writer.verified_body(entry)
                if body is None:  # its commits are unknown: the second pass stores them, a later flush takes them
                    report.lost_shards.append(entry["id"])
                    continue
                commits = _commits_in(body)
                for start in range(0, len(commits), _BATCH):
                    if stop():
                        return False
                    part = commits[start:start + _BATCH]
                    store.write([_from_shard(processor, ingestor.symbols, git, oid, lines, report)
                                 for oid, lines in part])
                    report.from_shards += len(part)
                    advance(len(part))
            # Keep a lost shard's numbers free, so that later groups keep theirs.
            store.reserve_seqs(group["last_seq"] + 1)
        stored = store.known_commits(bytes.fromhex(oid) for oid in everything)
        remaining = [oid for oid in everything if bytes.fromhex(oid) not in stored]
        summary = ingestor.run(remaining, on_batch=advance, should_stop=stop)
        # Examples taken from shards of an older schema keep its shape: the store says so (never mixed
        # silently), and `gitlora upgrade` re-derives them.
        oldest = min((int(g.get("schema_version", 1)) for g in manifest.get("groups", [])), default=SCHEMA_VERSION)
        if oldest < SCHEMA_VERSION and report.from_shards:
            store.set_schema_version(oldest)
        return summary.commits == len(remaining)


def _commits_in(body: bytes) -> list[tuple[str, list[bytes]]]:
    """A shard's lines grouped by commit, in the shard's order (a commit's examples are contiguous in it)."""
    commits: list[tuple[str, list[bytes]]] = []
    for line in body.split(b"\n")[:-1]:
        commit, _ = example_meta(line)
        if commits and commits[-1][0] == commit:
            commits[-1][1].append(line)
        else:
            commits.append((commit, [line]))
    return commits


def _from_shard(processor: CommitProcessor, symbols: SymbolIndex, git: GitRepo, oid: str, lines: list[bytes],
                report: RepairReport) -> PendingCommit:
    """The commit re-derived from git, holding exactly the examples its shard has."""
    try:
        git.resolve_commit(oid)
    except GitRepoError:
        report.not_rederived.append(oid)
        commit_time = example_meta(lines[0])[1]
        return PendingCommit(bytes.fromhex(oid), {"source": "repair", "status": "ingested", "commit_time": commit_time,
                                                  "recovered_from": "shards", "stored_at": time.time()}, lines)
    pending = processor.process([oid])[0]
    symbols.annotate([pending])  # the record's cross-file counts, as when it was first stored
    # The store screened the commit when it was first stored (duplicates and near-duplicates left out, a
    # repeated message left out): its shard lines are then the re-derived examples less some, and are stored
    # as they are, the screening state counted (enforce=False) for the commits ingested after them.
    screen = replace(pending.screen, enforce=False) if pending.screen is not None else None
    if pending.examples == lines:
        return replace(pending, screen=screen)
    kept = _kept_positions(pending.examples, lines)
    if kept is not None and screen is not None:
        chosen = set(kept)
        return replace(pending, examples=lines, screen=replace(
            screen, sketches=tuple(screen.sketches[i] if i < len(screen.sketches) else None for i in kept),
            left_out=tuple(example_key(e) for i, e in enumerate(pending.examples) if i not in chosen)))
    report.differed.append(oid)
    record = {k: v for k, v in pending.record.items() if k != "reason"}
    return PendingCommit(pending.oid, {**record, "status": "ingested", "recovered_from": "shards"}, lines,
                         replace(screen, sketches=()) if screen is not None else None)


def _kept_positions(derived: list, lines: list[bytes]) -> list[int] | None:
    """Where each shard line's example (by its key) is among the re-derived examples, in order; None when the
    lines are not the re-derived examples less some."""
    keys = [example_key(e) for e in derived]
    positions, at = [], 0
    for line in lines:
        key = example_key(line)
        while at < len(keys) and keys[at] != key:
            at += 1
        if at == len(keys):
            return None
        positions.append(at)
        at += 1
    return positions


def _tips(opened: OpenedRepo) -> list[str]:
    """Every ref tip, and every commit the hooks spooled that git still has (a deleted branch's commits were
    stored too)."""
    tips = list(opened.git.tips().values())
    spool = opened.paths.spool
    for path in (spool.with_name(spool.name + ".old"), spool):
        try:
            entries, _ = parse_spool_chunk(path.read_bytes())
        except OSError:
            continue
        for entry in entries:
            try:
                tips.append(opened.git.resolve_commit(entry.new))
            except GitRepoError:
                pass
    return tips


def _swap_in(building: Path, store_dir: Path, label: str) -> Path | None:
    """Move the old store aside (kept, never deleted) and the new one into its place."""
    kept = None
    if store_dir.exists():
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        kept = store_dir.with_name(f"{store_dir.name}.{label}-{stamp}")
        n = 1
        while kept.exists():
            n += 1
            kept = store_dir.with_name(f"{store_dir.name}.{label}-{stamp}-{n}")
        os.rename(store_dir, kept)
    os.rename(building, store_dir)
    return kept


@contextmanager
def rebuild_lock(root: Path, what: str) -> Iterator[None]:
    """One repair or upgrade of a repository at a time (`what` names the one asking, for the refusal)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "repair.lock", "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RepairError(f"another repair or upgrade of {root.name} is running; {what} after it") from None
        yield
