"""Commit -> examples -> store, exactly once. Shared by `gitlora backfill` and the daemon's writer thread.

Parsing dominates the cost, and a commit's new blob is usually a later commit's old blob, so every blob is
parsed once (an LRU cache keyed by blob oid) and, in backfill, on all cores (a process pool: tree-sitter
holds the GIL). Anything that goes wrong with one commit becomes that commit's recorded skip reason.
"""
from __future__ import annotations

import os
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import log
from .config import IngestConfig
from .examples import file_examples
from .gitrepo import BlobUnreadable, CommitDiff, CommitInfo, GitRepo
from .rust_items import FileItems, extract_items
from .store import PendingCommit, Store

_log = log.get("gitlora.ingest")
_MAX_RECORDED_SKIPS = 50
# Below this many new blobs a batch is parsed in-process: a pool round trip costs more than it saves.
_POOL_MIN_BLOBS = 16


@dataclass(frozen=True, slots=True)
class Unparsable:
    reason: str


def parse_blob(data: bytes) -> tuple[FileItems | Unparsable, float]:
    """Worker entry point: parse one blob, never raise."""
    started = time.perf_counter()
    try:
        result: FileItems | Unparsable = extract_items(data)
    except Exception as exc:  # a tree-sitter or decoding bug must cost one file, not the run
        result = Unparsable(f"parse-error: {type(exc).__name__}: {exc}")
    return result, time.perf_counter() - started


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


@dataclass
class _Prepared:
    oid: str
    info: CommitInfo | None = None
    diff: CommitDiff | None = None
    failure: str | None = None
    diff_ms: float = 0.0
    parse_s: float = 0.0


class Ingestor:
    def __init__(self, repo: GitRepo, store: Store, config: IngestConfig | None = None, *,
                 workers: int | None = None, source: str = "backfill", cache_bytes: int = 256 << 20) -> None:
        self.repo = repo
        self.store = store
        self.config = config or IngestConfig()
        if workers is None:
            workers = self.config.workers or (os.cpu_count() or 1)
        self.workers = max(1, workers)
        self.source = source
        self.repo_name = repo.name
        self._cache = _BlobCache(cache_bytes)
        self._pool: ProcessPoolExecutor | None = None
        self._shallow_boundary: frozenset[str] = frozenset()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "Ingestor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pending(self, tips: Iterable[str] | None = None) -> list[str]:
        """Commits reachable from the tips that the store does not hold yet, parents first."""
        return self.repo.new_commits(self.store.known_commits, tips)

    def run(self, oids: list[str], *, on_batch: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] = lambda: False, extra: dict[str, Any] | None = None) -> IngestSummary:
        """Ingest `oids` (parents first) in transactions of `batch_commits`. `on_batch(commits, examples)`
        reports progress after each committed transaction; `should_stop` is polled between them."""
        summary = IngestSummary()
        started = time.perf_counter()
        batch_size = self.config.batch_commits
        for start in range(0, len(oids), batch_size):
            if should_stop():
                break
            pending = self.prepare_batch(oids[start:start + batch_size], extra=extra)
            result = self.store.write(pending)
            summary.already_present += result.already_present
            summary.examples += result.examples
            for item in pending:
                summary.commits += 1
                if item.record["status"] == "skipped":
                    summary.skipped += 1
                    summary.errors.append(f"{item.oid.hex()[:12]}: {item.record.get('reason')}")
                else:
                    summary.ingested += 1
                summary.last_commit = item.oid.hex()
            if on_batch:
                on_batch(len(pending), result.examples)
        summary.seconds = time.perf_counter() - started
        return summary

    # -- one batch -------------------------------------------------------------------------------
    def prepare_batch(self, oids: list[str], extra: dict[str, Any] | None = None) -> list[PendingCommit]:
        self._shallow_boundary = self.repo.shallow_boundary()
        prepared = [self._read_commit(oid) for oid in oids]
        fresh = self._parse_needed_blobs(prepared)
        return [self._compose(item, fresh, extra or {}) for item in prepared]

    def _read_commit(self, oid: str) -> _Prepared:
        item = _Prepared(oid)
        started = time.perf_counter()
        if oid in self._shallow_boundary:
            # Diffing against the empty tree would present the whole crate as newly added code.
            item.failure = "shallow-boundary: its parents are not in this clone (git fetch --unshallow)"
            return item
        try:
            item.info = self.repo.commit_info(oid)
            item.diff = self.repo.changed_rust_files(oid)
        except Exception as exc:
            item.failure = f"unreadable commit: {type(exc).__name__}: {exc}"
        item.diff_ms = (time.perf_counter() - started) * 1000
        return item

    def _parse_needed_blobs(self, prepared: list[_Prepared]) -> dict[str, FileItems | Unparsable]:
        """Parse every blob this batch needs that the cache lacks; returns them so that composing the batch
        never depends on what the LRU kept."""
        fresh: dict[str, FileItems | Unparsable] = {}
        needed: dict[str, tuple[bytes, _Prepared]] = {}
        for item in prepared:
            if item.diff is None:
                continue
            for change in item.diff.files:
                for blob in (change.old_oid, change.new_oid):
                    if blob is None or blob in needed or blob in fresh:
                        continue
                    hit = self._cache.get(blob)
                    if hit is not None:
                        fresh[blob] = hit
                        continue
                    try:
                        data = self.repo.read_text_blob(blob, self.config.max_file_bytes)
                    except BlobUnreadable as exc:
                        fresh[blob] = Unparsable(str(exc))
                        self._cache.put(blob, fresh[blob], 64)
                        continue
                    needed[blob] = (data, item)
        if not needed:
            return fresh
        blobs = list(needed)
        datas = [needed[b][0] for b in blobs]
        if self.workers > 1 and len(blobs) >= _POOL_MIN_BLOBS:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers)
            results = self._pool.map(parse_blob, datas, chunksize=max(1, len(datas) // (self.workers * 4)))
        else:
            results = map(parse_blob, datas)
        for blob, data, (parsed, seconds) in zip(blobs, datas, results):
            fresh[blob] = parsed
            self._cache.put(blob, parsed, len(data))
            needed[blob][1].parse_s += seconds
        return fresh

    def _compose(self, item: _Prepared, fresh: dict[str, FileItems | Unparsable],
                 extra: dict[str, Any]) -> PendingCommit:
        oid = bytes.fromhex(item.oid)
        base: dict[str, Any] = {"source": self.source, "stored_at": time.time(), **extra}
        if item.failure is not None or item.info is None or item.diff is None:
            _log.warning("commit_skipped", commit=item.oid, reason=item.failure)
            return PendingCommit(oid, {**base, "status": "skipped", "reason": item.failure or "unreadable"})
        try:
            return self._compose_examples(item, oid, base, fresh)
        except Exception as exc:  # a bug on one commit is recorded, and the run goes on
            reason = f"error: {type(exc).__name__}: {exc}"
            _log.error("commit_failed", commit=item.oid, reason=reason, traceback=traceback.format_exc())
            return PendingCommit(oid, {**base, "status": "skipped", "reason": reason,
                                       "commit_time": item.info.commit_time})

    def _compose_examples(self, item: _Prepared, oid: bytes, base: dict[str, Any],
                          fresh: dict[str, FileItems | Unparsable]) -> PendingCommit:
        def lookup(blob: str | None) -> FileItems | Unparsable | None:
            if blob is None:
                return None
            return fresh[blob]

        info, diff = item.info, item.diff
        assert info is not None and diff is not None
        examples: list[dict[str, Any]] = []
        skipped = list(diff.skipped)
        syntax_errors: list[dict[str, Any]] = []
        for change in diff.files:
            old = lookup(change.old_oid)
            new = lookup(change.new_oid)
            unreadable = next((s for s in (old, new) if isinstance(s, Unparsable)), None)
            if unreadable is not None:
                skipped.append((change.new_path or change.old_path or "?", unreadable.reason))
                continue
            if new is not None and new.syntax_error:
                syntax_errors.append({"path": change.new_path, "broken_items": new.broken_items})
            examples.extend(file_examples(self.repo_name, info, change, old, new))
        record: dict[str, Any] = {
            **base,
            "status": "ingested",
            "parent": info.parent,
            "commit_time": info.commit_time,
            "rust_files": len(diff.files),
            "timings_ms": {"diff": round(item.diff_ms, 2), "parse": round(item.parse_s * 1000, 2)},
        }
        if skipped:
            record["skipped_files"] = [{"path": p, "reason": r} for p, r in skipped[:_MAX_RECORDED_SKIPS]]
            record["skipped_files_total"] = len(skipped)
        if syntax_errors:
            record["syntax_errors"] = syntax_errors[:_MAX_RECORDED_SKIPS]
        if diff.notes:
            record["notes"] = diff.notes
        return PendingCommit(oid, record, examples)
