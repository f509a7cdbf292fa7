"""Commit -> examples -> store, exactly once. Shared by `gitlora backfill` and the daemon's writer thread.

Parsing dominates the cost and a commit's new blob is usually the next commit's old blob, so each process
keeps an LRU of parsed blobs keyed by oid and parses every blob once. Backfill spreads *contiguous runs* of
commits over a process pool (tree-sitter holds the GIL); each worker reads git, parses and renders JSON, and
the parent only writes transactions, in order. Anything that goes wrong with one commit becomes that
commit's recorded skip reason.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from tree_sitter import Tree

from . import log
from .config import IngestConfig
from .examples import file_examples
from .gitrepo import BlobUnreadable, CommitDiff, CommitInfo, GitRepo
from .rust_items import FileItems, extract_items, parse
from .store import PendingCommit, Store

_log = log.get("gitlora.ingest")
_MAX_RECORDED_SKIPS = 50
# Commits per worker task: long enough runs that the blob cache hits, short enough to balance the cores.
_CHUNK_COMMITS = 16


@dataclass(frozen=True, slots=True)
class Unparsable:
    reason: str


def parse_blob(data: bytes, previous: tuple[bytes, Tree] | None = None,
               hunks: list | None = None) -> tuple[FileItems | Unparsable, Tree | None]:
    try:
        tree = parse(data, previous, hunks)
        return extract_items(data, tree), tree
    except Exception as exc:  # a tree-sitter or decoding bug must cost one file, not the run
        return Unparsable(f"parse-error: {type(exc).__name__}: {exc}"), None


class _BlobCache:
    """LRU of parsed blobs bounded by source bytes (an item map costs about its source size)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[str, tuple[FileItems | Unparsable, int]] = OrderedDict()

    def get(self, oid: str) -> FileItems | Unparsable | None:
        entry = self._entries.get(oid)
        if entry is None:
            return None
        self._entries.move_to_end(oid)
        return entry[0]

    def put(self, oid: str, value: FileItems | Unparsable, size: int) -> None:
        if oid in self._entries:
            return
        self._entries[oid] = (value, size)
        self.size += size
        while self.size > self.max_bytes and len(self._entries) > 1:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.size -= evicted


def _encode(example: dict[str, Any]) -> bytes:
    return json.dumps(example, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class CommitProcessor:
    """Turns commits into PendingCommits (git read, cached parse, compose, JSON). One per process."""

    def __init__(self, repo: GitRepo, config: IngestConfig, *, source: str, cache_bytes: int = 192 << 20,
                 max_trees: int = 512):
        self.repo = repo
        self.config = config
        self.source = source
        self.repo_name = repo.name
        self._cache = _BlobCache(cache_bytes)
        # Syntax trees of recently parsed blobs, so the next version of the same file reparses incrementally.
        self._trees: OrderedDict[str, tuple[bytes, Tree]] = OrderedDict()
        self._max_trees = max_trees

    def process(self, oids: list[str]) -> list[PendingCommit]:
        shallow = self.repo.shallow_boundary()
        return [self._one(oid, shallow) for oid in oids]

    def _one(self, oid: str, shallow: frozenset[str]) -> PendingCommit:
        base: dict[str, Any] = {"source": self.source}
        started = time.perf_counter()
        if oid in shallow:
            # Diffing against the empty tree would present the whole crate as newly added code.
            return self._skipped(oid, base, "shallow-boundary: its parents are not in this clone "
                                            "(git fetch --unshallow)")
        try:
            info = self.repo.commit_info(oid)
            diff = self.repo.changed_rust_files(oid)
        except Exception as exc:
            return self._skipped(oid, base, f"unreadable commit: {type(exc).__name__}: {exc}")
        diff_done = time.perf_counter()
        try:
            pending = self._compose(oid, info, diff, base)
        except Exception as exc:  # a bug on one commit is recorded, and the run goes on
            reason = f"error: {type(exc).__name__}: {exc}"
            _log.error("commit_failed", commit=oid, reason=reason, traceback=traceback.format_exc())
            return self._skipped(oid, {**base, "commit_time": info.commit_time}, reason)
        pending.record["timings_ms"] = {"diff": round((diff_done - started) * 1000, 2),
                                        "parse": round((time.perf_counter() - diff_done) * 1000, 2)}
        pending.record["stored_at"] = time.time()
        return pending

    @staticmethod
    def _skipped(oid: str, base: dict[str, Any], reason: str) -> PendingCommit:
        _log.warning("commit_skipped", commit=oid, reason=reason)
        return PendingCommit(bytes.fromhex(oid), {**base, "status": "skipped", "reason": reason,
                                                  "stored_at": time.time()})

    def _items(self, blob: str | None, previous: str | None = None, hunks=None) -> FileItems | Unparsable | None:
        if blob is None:
            return None
        cached = self._cache.get(blob)
        if cached is not None:
            return cached
        try:
            data = self.repo.read_text_blob(blob, self.config.max_file_bytes)
        except BlobUnreadable as exc:
            parsed: FileItems | Unparsable = Unparsable(str(exc))
            self._cache.put(blob, parsed, 64)
            return parsed
        parsed, tree = parse_blob(data, self._trees.get(previous) if previous else None, hunks)
        self._cache.put(blob, parsed, len(data))
        if tree is not None:
            self._trees[blob] = (data, tree)
            while len(self._trees) > self._max_trees:
                self._trees.popitem(last=False)
        return parsed

    def _compose(self, oid: str, info: CommitInfo, diff: CommitDiff, base: dict[str, Any]) -> PendingCommit:
        examples: list[bytes] = []
        skipped = list(diff.skipped)
        syntax_errors: list[dict[str, Any]] = []
        for change in diff.files:
            old = self._items(change.old_oid)
            new = self._items(change.new_oid, previous=change.old_oid, hunks=change.hunks)
            unreadable = next((s for s in (old, new) if isinstance(s, Unparsable)), None)
            if unreadable is not None:
                skipped.append((change.new_path or change.old_path or "?", unreadable.reason))
                continue
            assert not isinstance(old, Unparsable) and not isinstance(new, Unparsable)
            if new is not None and new.syntax_error:
                syntax_errors.append({"path": change.new_path, "broken_items": new.broken_items})
            examples.extend(_encode(e) for e in file_examples(self.repo_name, info, change, old, new))
        record: dict[str, Any] = {**base, "status": "ingested", "parent": info.parent,
                                  "commit_time": info.commit_time, "rust_files": len(diff.files)}
        if skipped:
            record["skipped_files"] = [{"path": p, "reason": r} for p, r in skipped[:_MAX_RECORDED_SKIPS]]
            record["skipped_files_total"] = len(skipped)
        if syntax_errors:
            record["syntax_errors"] = syntax_errors[:_MAX_RECORDED_SKIPS]
        if diff.notes:
            record["notes"] = diff.notes
        return PendingCommit(bytes.fromhex(oid), record, examples)


# -- the worker side of the pool ---------------------------------------------------------------------
_worker: CommitProcessor | None = None


def _worker_init(repo_path: str, config_json: str, source: str) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    config = IngestConfig.model_validate_json(config_json)
    repo = GitRepo(repo_path, exclude=config.exclude, include_remotes=config.include_remotes)
    _worker = CommitProcessor(repo, config, source=source)


def _worker_process(oids: list[str]) -> list[PendingCommit]:
    assert _worker is not None
    return _worker.process(oids)


@dataclass
class IngestSummary:
    commits: int = 0
    ingested: int = 0
    skipped: int = 0
    examples: int = 0
    already_present: int = 0
    seconds: float = 0.0
    last_commit: str | None = None
    errors: list[str] = field(default_factory=list)


class Ingestor:
    """Writes commits into one store. Used by backfill (many commits, a pool) and the daemon (a few)."""

    def __init__(self, repo: GitRepo, store: Store, config: IngestConfig | None = None, *,
                 workers: int | None = None, source: str = "backfill", cache_bytes: int = 192 << 20,
                 max_trees: int = 512, isolate_files: int | None = None) -> None:
        self.repo = repo
        self.store = store
        self.config = config or IngestConfig()
        if workers is None:
            workers = self.config.workers or (os.cpu_count() or 1)
        self.workers = max(1, workers)
        self.source = source
        self.processor = CommitProcessor(repo, self.config, source=source, cache_bytes=cache_bytes,
                                         max_trees=max_trees)
        # A long-lived process (the daemon) sends a batch touching more .rs files than this to a spawned
        # process even when it is one commit: parsing a whole crate leaves a fragmented heap behind.
        self.isolate_files = isolate_files

    def pending(self, tips: Iterable[str] | None = None) -> list[str]:
        """Commits reachable from the tips that the store does not hold yet, parents first."""
        return self.repo.new_commits(self.store.known_commits, tips, self.store.shallow_boundaries())

    def run(self, oids: list[str], *, on_batch: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] = lambda: False, extra: dict[str, Any] | None = None) -> IngestSummary:
        """Ingest `oids` (parents first), one transaction per run of commits, in order. `on_batch(commits,
        examples)` reports each committed transaction; `should_stop` is polled between them."""
        summary = IngestSummary()
        started = time.perf_counter()
        for batch in self._batches(oids):
            if should_stop():
                break
            if extra:
                for item in batch:
                    item.record.update(extra)
            result = self.store.write(batch)
            summary.already_present += result.already_present
            summary.examples += result.examples
            for item in batch:
                summary.commits += 1
                if item.record["status"] == "skipped":
                    summary.skipped += 1
                    summary.errors.append(f"{item.oid.hex()[:12]}: {item.record.get('reason')}")
                else:
                    summary.ingested += 1
                summary.last_commit = item.oid.hex()
            if on_batch:
                on_batch(len(batch), result.examples)
        summary.seconds = time.perf_counter() - started
        return summary

    def _batches(self, oids: list[str]) -> Iterator[list[PendingCommit]]:
        chunk = max(1, min(self.config.batch_commits, _CHUNK_COMMITS))
        chunks = [oids[i:i + chunk] for i in range(0, len(oids), chunk)]
        large = self.isolate_files is not None and len(chunks) == 1 and \
            sum(self.repo.count_rust_changes(oid) for oid in chunks[0]) > self.isolate_files
        if not large and (self.workers == 1 or len(chunks) < 2):
            for part in chunks:
                yield self.processor.process(part)
            return
        # spawn, not fork: the daemon has threads, and a forked LMDB env or libgit2 handle is unsafe.
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max(1, min(self.workers, len(chunks))), mp_context=context, initializer=_worker_init,
                                   initargs=(str(self.repo.common_dir), self.config.model_dump_json(), self.source))
        try:
            # Not pool.map: it submits every chunk at once, and results pile up in the parent faster than it
            # writes them (the-block's whole history, ~150 MB, at once). A few chunks ahead per worker keep
            # the workers busy and the parent's peak, and the fragmented heap it leaves, small.
            chunk_iter = iter(chunks)
            in_flight: deque[Future[list[PendingCommit]]] = deque(
                pool.submit(_worker_process, chunk) for chunk in islice(chunk_iter, 2 * self.workers))
            while in_flight:
                done = in_flight.popleft().result()
                following = next(chunk_iter, None)
                if following is not None:
                    in_flight.append(pool.submit(_worker_process, following))
                yield done
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
