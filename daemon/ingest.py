"""Commit -> examples -> store, exactly once. Shared by `gitlora backfill` and the daemon's writer thread.

Parsing dominates the cost and a commit's new blob is usually the next commit's old blob, so each process
keeps an LRU of parsed blobs keyed by oid and parses every blob once. Backfill spreads *contiguous runs* of
commits over a process pool (tree-sitter holds the GIL); each worker reads git, parses and renders JSON, and
the parent only writes transactions, in order. Anything that goes wrong with one file becomes that file's
recorded skip, with one commit that commit's recorded skip: ingest always moves on.

A file change stored before (the same paths and blobs: a merge replaying its branch, a cherry-pick onto the same
base) yields the same items again, every one an exact duplicate the store would drop, so it is not built at all:
the parent walks the commits' diffs in order ahead of the workers (`ReplayPlanner`) and tells each worker which
of its commits' file changes were met before; the store, which indexed each first occurrence with what it yielded,
counts the replay's examples as duplicates of it (`store.FileOutcome`), and when a first occurrence was never
stored built (its commit skipped) the replaying commit is built in full and written again (`ReplayUnconfirmed`).
Stores with `[ingest] dedup = false` keep every example, so there everything is built.

Memory is bounded by (estimated) bytes, not counts: a syntax tree costs tens of times its source. A long-lived
process (the daemon) parses in-process only what is small; a batch with many or large .rs files goes to a
spawned process, whose memory leaves with it, and which does not hold the daemon's GIL while it parses.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tree_sitter import Tree

from . import compact_json, dedup, hygiene, log, memory
from .config import IngestConfig
from .examples import file_examples, path_fields
from .memo import ByteLRU, TextMemos
from .gitrepo import BlobUnreadable, CommitDiff, CommitInfo, FileChange, GitRepo, SkippedFile
from .rust_items import FileItems, extract_items, parse
from .store import FileOutcome, PendingCommit, ReplayUnconfirmed, Store, WriteResult, example_key
from .symbol_index import NO_DEFINITIONS, SymbolIndex, encoded_definitions

_log = log.get("gitlora.ingest")
_MAX_RECORDED_SKIPS = 50
# Commits per worker task (and per write transaction).
_CHUNK_COMMITS = 16
# Consecutive chunks one pool worker takes at a time (`Ingestor._pooled`): long enough that most of a commit's
# old blobs were parsed by the same worker, short enough to balance the cores and bound the results held.
_RUN_CHUNKS = 8
# What a tree-sitter-rust syntax tree costs in memory per byte of its source (tens of bytes: one node per
# token or so, each larger than the token), plus the source kept beside it for incremental reparsing.
_TREE_BYTES_PER_SOURCE_BYTE = 48
# The syntax trees a pool worker keeps (by that estimate): a tree kept turns the next version of its file into an
# incremental reparse, and a worker sees only some of the chunks, so it keeps more than an in-process parse does.
_WORKER_TREE_BYTES = 768 << 20
# Bump when a change to item extraction, example making or hygiene changes what a file change yields: file changes
# indexed by an older gitlora are then built again rather than taken as replays of a different outcome.
_OUTCOME_VERSION = 1
# Ingest settings that do not change which items a file change yields, nor which are skipped (they shape the
# examples' other fields, the diff, the screening or the run); every other setting is part of a file change's key.
_NOT_OUTCOME_SETTINGS = frozenset({
    "batch_commits", "workers", "exclude", "include_remotes", "skip_vendored_crates", "context_above_bytes",
    "context_below_bytes", "cross_file_bytes", "test_weight", "bot_authors", "template_messages", "dedup",
    "repeated_message_limit", "near_duplicate_cap", "near_duplicate_threshold"})
Replays = Mapping[str, frozenset[bytes]]  # commit -> keys of its file changes to leave out as replays


def outcome_fingerprint(config: IngestConfig) -> bytes:
    """What besides a file change's paths and blobs decides the items it yields: the settings that do, this
    module's outcome version and the parser's versions."""
    settings = {k: v for k, v in config.model_dump(mode="json").items() if k not in _NOT_OUTCOME_SETTINGS}
    versions = [_OUTCOME_VERSION]
    for package in ("tree-sitter", "tree-sitter-rust"):
        try:
            versions.append(importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:
            versions.append(None)
    return hashlib.blake2b(json.dumps([settings, versions], sort_keys=True).encode(), digest_size=16).digest()


def file_change_key(change: FileChange, fingerprint: bytes) -> bytes:
    """The key of a file change (`store.FileOutcome.key`): its paths (as bytes), its old and new blob, and the
    `outcome_fingerprint`. Equal keys yield equal items."""
    old = change.old_raw if change.old_raw is not None else (change.old_path or "").encode()
    new = change.new_raw if change.new_raw is not None else (change.new_path or "").encode()
    digest = hashlib.blake2b(fingerprint, digest_size=16)
    for part in (old, new, (change.old_oid or "").encode(), (change.new_oid or "").encode()):
        digest.update(len(part).to_bytes(4, "big") + part)
    digest.update(bytes([change.old_path is None, change.new_path is None]))
    return digest.digest()


@dataclass(frozen=True, slots=True)
class Unparsable:
    reason: str


def parse_blob(data: bytes, previous: tuple[bytes, Tree] | None = None, hunks: list | None = None,
               memo: ByteLRU | None = None) -> tuple[FileItems | Unparsable, Tree | None]:
    try:
        tree = parse(data, previous, hunks)
        return extract_items(data, tree, memo), tree
    except Exception as exc:  # a tree-sitter or decoding bug must cost one file, not the run
        return Unparsable(f"parse-error: {type(exc).__name__}: {exc}"), None


def estimated_items_bytes(items: FileItems | Unparsable) -> int:
    """About what an item map costs in memory: its strings plus per-item object overhead."""
    if isinstance(items, Unparsable):
        return 64 + len(items.reason)
    size = 256 + sum(sys.getsizeof(i) for i in items.imports)
    for item in items.items.values():
        size += 400 + sys.getsizeof(item.text) + sys.getsizeof(item.name)  # the Item and its Span
        if item.compare_text is not item.text:
            size += sys.getsizeof(item.compare_text)
    return size


def _clean(text: str) -> str:
    """Text that any UTF-8 encoder accepts: an exception's message may quote a surrogate-escaped name."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class CommitProcessor:
    """Turns commits into PendingCommits (git read, cached parse, compose, JSON). One per process."""

    def __init__(self, repo: GitRepo, config: IngestConfig, *, source: str, cache_bytes: int = 192 << 20,
                 tree_bytes: int = 256 << 20, sketch_scheme: str = dedup.SCHEME):
        """`sketch_scheme`: how near-duplicate sketches are computed: the store's (`Store.sketch_scheme`)."""
        self.repo = repo
        self.config = config
        self.source = source
        self.sketch_scheme = sketch_scheme
        self.repo_name = repo.name
        self.fingerprint = outcome_fingerprint(config)
        # What is computed from a text alone is memoised (a merge replays its branch's items, a file's next
        # version repeats most of its top-level items), sized like this processor's item cache, so the daemon's
        # stays small; this processor's own, as everything here is its thread's alone.
        self.memos = TextMemos.within(cache_bytes * 3 // 4)
        # Item maps of parsed blobs by oid (each blob is parsed once), and the syntax trees of recently parsed
        # blobs with their source, so the next version of the same file reparses incrementally.
        self._cache = ByteLRU(cache_bytes)
        self._trees = ByteLRU(tree_bytes)
        # The blob of each path parsed last: when a version's predecessor has no tree here (another worker
        # parsed it, or the history switched branches), the path's latest tree still makes the parse incremental.
        self._latest_of_path: dict[str, str] = {}
        # Definitions of the blobs parsed since the last commit was composed: they travel with that commit to
        # the process that keeps the symbol index (and into the store), so no blob is parsed twice for them.
        self._fresh_definitions: dict[str, bytes] = {}

    def process(self, oids: list[str], replays: Replays | None = None) -> list[PendingCommit]:
        """The commits' PendingCommits; `replays` names per commit the file changes to leave out (not built: the
        store holds their first occurrence by then; see the module's docstring)."""
        shallow = self.repo.shallow_boundary()
        return [self._one(oid, shallow, (replays or {}).get(oid, frozenset())) for oid in oids]

    def _one(self, oid: str, shallow: frozenset[str], replays: frozenset[bytes] = frozenset()) -> PendingCommit:
        base: dict[str, Any] = {"source": self.source}
        started = time.perf_counter()
        if oid in shallow:
            # Diffing against the empty tree would present the whole crate as newly added code.
            return self._skipped(oid, base, "shallow-boundary: its parents are not in this clone "
                                            "(git fetch --unshallow)")
        try:
            info = self.repo.commit_info(oid)
            diff = self.repo.changed_rust_files(oid, hunks=False)  # a parse that can use them asks (`_parsed`)
        except Exception as exc:
            return self._skipped(oid, base, f"unreadable commit: {type(exc).__name__}: {exc}")
        diff_done = time.perf_counter()
        try:
            pending = self._compose(oid, info, diff, base, replays)
            compact_json.encode(pending.record)  # what the store will do: a record it cannot write is this commit's skip
        except Exception as exc:  # a bug on one commit is recorded, and the run goes on
            reason = f"error: {type(exc).__name__}: {exc}"
            _log.error("commit_failed", commit=oid, reason=_clean(reason), traceback=_clean(traceback.format_exc()))
            return self._skipped(oid, {**base, "commit_time": info.commit_time}, reason)
        pending.record["timings_ms"] = {"diff": round((diff_done - started) * 1000, 2),
                                        "parse": round((time.perf_counter() - diff_done) * 1000, 2)}
        pending.record["stored_at"] = time.time()
        return pending

    @staticmethod
    def _skipped(oid: str, base: dict[str, Any], reason: str) -> PendingCommit:
        reason = _clean(reason)
        _log.warning("commit_skipped", commit=oid, reason=reason)
        return PendingCommit(bytes.fromhex(oid), {**base, "status": "skipped", "reason": reason,
                                                  "stored_at": time.time()})

    def _parsed(self, blob: str | None, path: str | None = None,
                previous: str | None = None) -> tuple[FileItems | Unparsable | None, tuple[bytes, Tree] | None]:
        """A blob's items, and its bytes and syntax tree where at hand (just parsed, or still cached): the
        examples read their identifiers from the tree instead of parsing each item again. Parsed incrementally,
        with git's line hunks, from the `previous` version's tree when that is at hand, else from the tree of the
        version of `path` parsed last (a parse from any version of the text gives the same tree)."""
        if blob is None:
            return None, None
        cached = self._cache.get(blob)
        if cached is not None:
            return cached, self._trees.get(blob)
        if self.config.cross_file_bytes:  # off: nothing stored, so turning it on later parses what it needs
            self._fresh_definitions[blob] = NO_DEFINITIONS  # unless it parses
        try:
            data = self.repo.read_text_blob(blob, self.config.max_file_bytes)
        except BlobUnreadable as exc:
            parsed: FileItems | Unparsable = Unparsable(str(exc))
            self._cache.put(blob, parsed, estimated_items_bytes(parsed))
            return parsed, None
        generated = hygiene.generated_reason(data, self.config)
        if generated is not None:  # recorded as the file's skip, like an unreadable blob
            parsed = Unparsable(generated)
            self._cache.put(blob, parsed, estimated_items_bytes(parsed))
            return parsed, None
        prior = self._trees.get(previous) if previous is not None else None
        if prior is None and path is not None:
            previous = self._latest_of_path.get(path)
            prior = self._trees.get(previous) if previous is not None else None
        hunks = self.repo.line_hunks(previous, blob) if prior is not None and previous is not None else None
        parsed, tree = parse_blob(data, prior, list(hunks) if hunks is not None else None, self.memos.items)
        if tree is not None and self.config.cross_file_bytes:
            try:
                self._fresh_definitions[blob] = encoded_definitions(data, tree, self.memos.definitions)
            except Exception as exc:  # costs this blob's definitions, not its examples
                _log.error("definitions_failed", blob=blob, reason=_clean(f"{type(exc).__name__}: {exc}"))
        self._cache.put(blob, parsed, estimated_items_bytes(parsed))
        if tree is None:
            return parsed, None
        self._trees.put(blob, (data, tree), len(data) * _TREE_BYTES_PER_SOURCE_BYTE)
        if path is not None:
            self._latest_of_path[path] = blob
        return parsed, (data, tree)

    def definitions_of(self, blob: str) -> bytes:
        """The encoded definitions of a blob no commit's parse gave (the symbol index asks, through a spawned
        process: see `Ingestor.parse_definitions`); none for a blob that is unreadable, generated or unparsable."""
        try:
            data = self.repo.read_text_blob(blob, self.config.max_file_bytes)
        except BlobUnreadable:
            return NO_DEFINITIONS
        if hygiene.generated_reason(data, self.config) is not None:
            return NO_DEFINITIONS
        try:
            return encoded_definitions(data, parse(data))
        except Exception:  # a parser bug costs this file's definitions
            return NO_DEFINITIONS

    def _text(self, blob: str | None) -> bytes | None:
        """A parsed blob's bytes (for the examples' file context): kept beside its syntax tree when recently
        parsed, else read again."""
        if blob is None:
            return None
        cached = self._trees.get(blob)
        if cached is not None:
            return cached[0]
        return self.repo.read_text_blob(blob, self.config.max_file_bytes)

    def _compose(self, oid: str, info: CommitInfo, diff: CommitDiff, base: dict[str, Any],
                 replays: frozenset[bytes] = frozenset()) -> PendingCommit:
        examples: list[bytes] = []
        outcomes: list[FileOutcome] = []
        keys: list[bytes] = []
        sketches: list[bytes | None] = []
        references: list[tuple[str, list[str], list[str]] | None] = []
        item_skips: Counter[str] = Counter()
        skipped = list(diff.skipped)
        syntax_errors: list[dict[str, Any]] = []
        omitted = hygiene.message_omission(info.message, info.author, self.config)
        message_key = None if omitted else hygiene.message_key(info.message)
        if omitted:
            info = replace(info, message="")
        for change in diff.files:
            key = file_change_key(change, self.fingerprint) if self.config.dedup else b""
            if key in replays:
                outcomes.append(FileOutcome(key, built=False))
                continue
            files_skipped, files_broken = len(skipped), len(syntax_errors)
            try:
                encoded, made_keys, sketched, skips, refs = self._file(info, change, skipped, syntax_errors, omitted)
                examples.extend(encoded)
                keys.extend(made_keys)
                sketches.extend(sketched)
                references.extend(refs)
                item_skips.update(skips)
                skip = skipped[files_skipped] if len(skipped) > files_skipped else None
                outcomes.append(FileOutcome(
                    key, len(encoded), dict(skips), _skip_entry(skip) if skip is not None else None,
                    syntax_errors[files_broken] if len(syntax_errors) > files_broken else None,
                    # a blob missing from a partial clone may be fetched by the time the change is met again
                    indexable=skip is None or not skip.reason.startswith("missing-object")))
            except Exception as exc:  # a bug on one file costs that file, not the commit
                reason = _clean(f"error: {type(exc).__name__}: {exc}")
                _log.error("file_failed", commit=oid, path=change.new_path or change.old_path, reason=reason,
                           traceback=_clean(traceback.format_exc()))
                skipped.append(_skipped_file(change, reason))
                outcomes.append(FileOutcome(key, 0, indexable=False))
        record: dict[str, Any] = {**base, "status": "ingested", "parent": info.parent,
                                  "commit_time": info.commit_time, "rust_files": len(diff.files)}
        if skipped:
            record["skipped_files"] = [_skip_entry(s) for s in skipped[:_MAX_RECORDED_SKIPS]]
            record["skipped_files_total"] = len(skipped)
        if syntax_errors:
            record["syntax_errors"] = syntax_errors[:_MAX_RECORDED_SKIPS]
        if diff.notes:
            record["notes"] = [_clean(note) for note in diff.notes]
        if item_skips:
            record["skipped_items"] = dict(item_skips)
        if omitted:
            record["message_omitted"] = omitted
        screen = dedup.Screen(tuple(sketches), message_key, self.config.near_duplicate_cap,
                              self.config.near_duplicate_threshold, self.config.repeated_message_limit,
                              scheme=self.sketch_scheme, keys=tuple(keys))
        definitions, self._fresh_definitions = self._fresh_definitions, {}
        changes = [(change.old_path, change.new_path, change.new_oid) for change in diff.files]
        return PendingCommit(bytes.fromhex(oid), record, examples, screen if self.config.dedup else None,
                             definitions, changes, references, outcomes if self.config.dedup else None)

    def _file(self, info: CommitInfo, change: FileChange, skipped: list[SkippedFile],
              syntax_errors: list[dict[str, Any]],
              message_omitted: str | None = None
              ) -> tuple[list[bytes], list[bytes], list[bytes | None], Counter[str],
                         list[tuple[str, list[str], list[str]] | None]]:
        """One changed file's examples, encoded, with their keys (`store.example_key`) and their targets'
        near-duplicate sketches, the items hygiene left out and what resolving each one's cross-file context needs;
        or its skip (appended to `skipped`) and none."""
        old, old_file = self._parsed(change.old_oid, change.old_path)
        new, new_file = self._parsed(change.new_oid, change.new_path, previous=change.old_oid)
        unreadable = next((s for s in (old, new) if isinstance(s, Unparsable)), None)
        if unreadable is not None:
            skipped.append(_skipped_file(change, unreadable.reason))
            return [], [], [], Counter(), []
        assert not isinstance(old, Unparsable) and not isinstance(new, Unparsable)
        made, skips = hygiene.screen_file(
            file_examples(self.repo_name, info, change, old, new,
                          new_file[0] if new_file else self._text(change.new_oid),
                          above=self.config.context_above_bytes, below=self.config.context_below_bytes,
                          new_tree=new_file[1] if new_file else None, old_file=old_file,
                          memo=self.memos.identifiers),
            change.new_path, new, change.old_path, old, self.config, message_omitted)
        encoded = [compact_json.encode(e) for e in made]
        sketched = [i for i, e in enumerate(made) if e["after"]] if self.config.near_duplicate_cap else []
        sketches: list[bytes | None] = [None] * len(made)
        signatures = dedup.signatures([made[i]["after"] for i in sketched], self.sketch_scheme, self.memos.sketches)
        for i, sketch in zip(sketched, signatures):
            sketches[i] = sketch
        if new is not None and new.syntax_error:
            syntax_errors.append({**path_fields("path", change.new_path, change.new_raw),
                                  "broken_items": new.broken_items})
        references = [None if e["change_kind"] == "deleted" else (e["path"], e["identifiers"], e["imports"])
                      for e in made]
        return encoded, [example_key(e) for e in made], sketches, skips, references


def _skip_entry(skipped: SkippedFile) -> dict[str, Any]:
    """A skipped file as its commit's record lists it."""
    return {**path_fields("path", skipped.path, skipped.raw), "reason": _clean(skipped.reason)}


def _skipped_file(change: FileChange, reason: str) -> SkippedFile:
    if change.new_path is not None:
        return SkippedFile(change.new_path, reason, change.new_raw)
    return SkippedFile(change.old_path or "?", reason, change.old_raw)


# -- the worker side of the pool ---------------------------------------------------------------------
_worker: CommitProcessor | None = None


def _die_with_parent(parent_pid: int) -> None:
    """A worker must not outlive the process that owns its pool (a SIGKILLed daemon or backfill): it holds
    the write end of its own task pipe, so it would wait on it forever. Linux's PR_SET_PDEATHSIG has the kernel
    kill it instead; it is one prctl call, which ctypes makes without a dependency (no maintained library wraps
    just this). The signal comes when the *thread* that spawned the worker ends: the thread that runs an
    Ingestor outlives its pool. A parent that died before the call is caught by the getppid check."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker_init(repo_path: str, config_json: str, source: str, parent_pid: int, sketch_scheme: str) -> None:
    global _worker
    _die_with_parent(parent_pid)
    memory.collect_cycles_rarely()  # a parser process: short-lived, its heap mostly caches
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    config = IngestConfig.model_validate_json(config_json)
    repo = GitRepo(repo_path, exclude=config.exclude, include_remotes=config.include_remotes,
                   skip_vendored=config.skip_vendored_crates)
    _worker = CommitProcessor(repo, config, source=source, sketch_scheme=sketch_scheme, tree_bytes=_WORKER_TREE_BYTES)


def _worker_process(oids: list[str], replays: Replays | None = None) -> list[PendingCommit]:
    assert _worker is not None
    return _worker.process(oids, replays)


def _worker_definitions(blobs: list[str]) -> dict[str, bytes]:
    assert _worker is not None
    return {blob: _worker.definitions_of(blob) for blob in blobs}


@dataclass
class IngestSummary:
    commits: int = 0
    ingested: int = 0
    skipped: int = 0
    examples: int = 0
    already_present: int = 0
    replayed_files: int = 0  # file changes stored as replays of their first occurrence (most not even built)
    seconds: float = 0.0
    last_commit: str | None = None
    errors: list[str] = field(default_factory=list)


class Ingestor:
    """Writes commits into one store. Used by backfill (many commits, a pool) and the daemon (a few)."""

    def __init__(self, repo: GitRepo, store: Store, config: IngestConfig | None = None, *,
                 workers: int | None = None, source: str = "backfill", cache_bytes: int = 192 << 20,
                 tree_bytes: int = 256 << 20, isolate_files: int | None = None,
                 isolate_bytes: int | None = None) -> None:
        self.repo = repo
        self.store = store
        self.config = config or IngestConfig()
        if workers is None:
            workers = self.config.workers or (os.cpu_count() or 1)
        self.workers = max(1, workers)
        self.source = source
        # Near-duplicate sketches are computed in the store's scheme (a new store takes the current one).
        self.sketch_scheme = store.sketch_scheme() or dedup.SCHEME
        self.processor = CommitProcessor(repo, self.config, source=source, cache_bytes=cache_bytes,
                                         tree_bytes=tree_bytes, sketch_scheme=self.sketch_scheme)
        # A long-lived process (the daemon) sends a run of commits touching more .rs files, or more .rs bytes
        # (old and new blobs), than these to a spawned process: parsing holds the GIL (the control thread would
        # stall), a syntax tree costs tens of times its source, and a whole crate's parse leaves a fragmented
        # heap behind. None: parse in-process (a backfill, whose process ends anyway).
        self.isolate_files = isolate_files
        self.isolate_bytes = isolate_bytes
        self._crash_guard = _CrashGuard(store.path.parent)
        # Leave out file changes met before (when the store screens duplicates); False builds every one, as a
        # reference that must store the same (tests, benchmarks).
        self.leave_out_replays = True
        # The one place that sees this Ingestor's commits in order: it resolves their cross-file context.
        self.symbols = SymbolIndex(repo, store, self.config, self.parse_definitions)

    @classmethod
    def for_daemon(cls, repo: GitRepo, store: Store, config: IngestConfig) -> "Ingestor":
        """The daemon's sizing: live commits touch a few small files, so small in-process caches keep the idle
        daemon small and every parse short (the control thread waits on the GIL meanwhile); many or large files
        (a new repository's history, a generated bindings file) go to spawned processes."""
        return cls(repo, store, config, source="daemon", cache_bytes=2 << 20, tree_bytes=12 << 20,
                   isolate_files=200, isolate_bytes=1 << 20)

    def pending(self, tips: Iterable[str] | None = None) -> list[str]:
        """Commits reachable from the tips that the store does not hold yet, parents first."""
        return self.repo.new_commits(self.store.known_commits, tips, self.store.shallow_boundaries())

    def run(self, oids: list[str], *, on_batch: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] = lambda: False, extra: dict[str, Any] | None = None) -> IngestSummary:
        """Ingest `oids` (parents first), one transaction per run of commits, in order. `on_batch(commits,
        examples)` reports each committed transaction; `should_stop` is polled between them."""
        summary = IngestSummary()
        started = time.perf_counter()
        planner = (ReplayPlanner(self.repo, self.store, self.processor.fingerprint)
                   if self.config.dedup and self.leave_out_replays else None)
        for batch in self._batches(oids, should_stop, planner):
            if should_stop():
                break
            self.symbols.annotate(batch)
            if extra:
                for item in batch:
                    item.record.update(extra)
            result, batch = self._write(batch, extra)
            summary.already_present += result.already_present
            summary.examples += result.examples
            summary.replayed_files += result.replayed_files
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

    def _write(self, batch: list[PendingCommit], extra: dict[str, Any] | None) -> tuple[WriteResult, list[PendingCommit]]:
        """`write_isolating`, building in full each commit whose left-out file changes the store has not seen
        built (their first occurrence's commit was skipped, or the file failed): its examples are not lost."""
        while True:
            try:
                return write_isolating(self.store, batch)
            except ReplayUnconfirmed as exc:
                at = next(i for i, pending in enumerate(batch) if pending.oid == exc.oid)
                _log.info("replay_rebuilt", commit=exc.oid.hex(),
                          detail="a file change left out as a replay was never stored built: built in full")
                # In a process of its own, as a retried chunk is: the first occurrence may have killed its parser.
                rebuilt = self._one_by_one([exc.oid.hex()], lambda: False)
                self.symbols.annotate(rebuilt)
                for item in rebuilt:
                    item.record.update(extra or {})
                batch = [*batch[:at], *rebuilt, *batch[at + 1:]]

    def derive(self, oids: list[str], should_stop: Callable[[], bool] = lambda: False) -> Iterator[PendingCommit]:
        """The commits as ingest would store them, in order, without storing them (`gitlora upgrade`
        rewrites stored records with them): the same pool, isolation and crash handling as `run`."""
        for batch in self._batches(oids, should_stop):
            self.symbols.annotate(batch)
            yield from batch

    def parse_definitions(self, blobs: list[str]) -> dict[str, bytes]:
        """Definitions of blobs that no commit's parse gave (the symbol index moving onto a tree parsed before),
        parsed in a spawned process: they may be a whole tree, and one of them may crash its parser (the commit
        that holds it was stored as `parser-died`), which must not take this process with it. When the process
        dies, the blobs are split and retried; a blob whose parser dies alone has no definitions."""
        if not blobs:
            return {}
        try:
            with self._pool(1) as alone:
                return alone.submit(_worker_definitions, blobs).result()
        except BrokenProcessPool:
            if len(blobs) == 1:
                _log.warning("definitions_parser_died", blob=blobs[0])
                return {blobs[0]: NO_DEFINITIONS}
            half = len(blobs) // 2
            return {**self.parse_definitions(blobs[:half]), **self.parse_definitions(blobs[half:])}

    def _heavy(self, oids: list[str]) -> bool:
        """Should a long-lived process parse these commits elsewhere?"""
        if self.isolate_files is None and self.isolate_bytes is None:
            return False
        files = size = 0
        for oid in oids:
            more_files, more_bytes = self.repo.rust_change_size(oid)
            files, size = files + more_files, size + more_bytes
        return (self.isolate_files is not None and files > self.isolate_files) or \
            (self.isolate_bytes is not None and size > self.isolate_bytes)

    def _pool(self, workers: int) -> ProcessPoolExecutor:
        # spawn, not fork: the daemon has threads, and a forked LMDB env or libgit2 handle is unsafe.
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                   initargs=(str(self.repo.common_dir), self.config.model_dump_json(), self.source,
                                             os.getpid(), self.sketch_scheme))

    def _batches(self, oids: list[str], should_stop: Callable[[], bool],
                 planner: "ReplayPlanner | None" = None) -> Iterator[list[PendingCommit]]:
        """The commits processed, a chunk at a time, in order; with `planner`, each commit's file changes met
        before are left out (see the module's docstring); without, everything is built."""
        chunk = max(1, min(self.config.batch_commits, _CHUNK_COMMITS))
        chunks = [oids[i:i + chunk] for i in range(0, len(oids), chunk)]
        plan: Callable[[list[str]], Replays] = planner.replays if planner is not None else (lambda _: {})
        if self.workers > 1 and len(chunks) >= 2:
            yield from self._pooled(chunks, should_stop, plan)
            return
        suspects = self._crash_guard.take_suspects()
        spawned: ProcessPoolExecutor | None = None  # started at the first heavy chunk, kept for this run
        try:
            for part in chunks:
                replays = plan(part)
                if not (self._heavy(part) or suspects.intersection(part)):
                    with self._crash_guard.parsing(part):
                        done = self.processor.process(part, replays)
                    yield done
                    continue
                spawned = spawned or self._pool(1)
                try:
                    yield spawned.submit(_worker_process, part, replays).result()
                except BrokenProcessPool:
                    spawned.shutdown(wait=True)
                    spawned = None
                    yield self._one_by_one(part, should_stop, replays)
        finally:
            if spawned is not None:
                spawned.shutdown(wait=True, cancel_futures=True)

    def _pooled(self, chunks: list[list[str]], should_stop: Callable[[], bool],
                plan: Callable[[list[str]], Replays]) -> Iterator[list[PendingCommit]]:
        """The chunks processed by `self.workers` processes, yielded in order. Each process takes a run of
        consecutive chunks (`_RUN_CHUNKS`) at a time, not whichever chunk is next: a commit's old blobs are mostly
        the new blobs of the chunk before it, which the same process then has parsed (cached, or a kept tree to
        reparse incrementally), where the other would parse them again in full."""
        while chunks:
            lanes = [self._pool(1) for _ in range(min(self.workers, len(chunks)))]
            runs = _runs(len(chunks), len(lanes))
            futures: dict[int, Future[list[PendingCommit]]] = {}
            working: list[list[Future[list[PendingCommit]]]] = [[] for _ in lanes]  # not done yet, per lane
            # Results not yet written stay under this many chunks: a lane that runs ahead of a slow one waits
            # rather than piling its results up in this process (the-block's whole history is ~150 MB).
            ahead = _RUN_CHUNKS * (len(lanes) + 1)

            def feed() -> None:
                """A lane about to run out of work (on its last chunk) gets the next run."""
                for lane in range(len(lanes)):
                    working[lane] = [f for f in working[lane] if not f.done()]
                for lane, pool in enumerate(lanes):
                    if len(working[lane]) > 1 or len(futures) >= ahead:
                        continue
                    taken = next(runs, None)
                    if taken is None:
                        return
                    for index in taken:
                        try:
                            future = pool.submit(_worker_process, chunks[index], plan(chunks[index]))
                        except BrokenProcessPool as exc:  # its process died: met in order below, as a result
                            future = Future()
                            future.set_exception(exc)
                        futures[index] = future
                        working[lane].append(future)

            broken_at: int | None = None
            try:
                for index in range(len(chunks)):
                    feed()
                    while not futures[index].done():
                        wait([futures[index], *(lane[0] for lane in working if lane)], return_when=FIRST_COMPLETED)
                        feed()
                    try:
                        done = futures.pop(index).result()
                    except BrokenProcessPool:
                        broken_at = index
                        break
                    yield done
            finally:
                for pool in lanes:
                    pool.shutdown(wait=True, cancel_futures=True)
            if broken_at is None:
                return
            # A worker died (a parser crash, the OOM killer): which chunk killed it is unknown, so the first
            # unfinished one is retried commit by commit, and fresh processes take the rest.
            yield self._one_by_one(chunks[broken_at], should_stop, plan(chunks[broken_at]))
            chunks = chunks[broken_at + 1:]

    def _one_by_one(self, oids: list[str], should_stop: Callable[[], bool],
                    replays: Replays | None = None) -> list[PendingCommit]:
        """Each commit in a process of its own. One whose process dies again is recorded as skipped: a poison
        commit must cost itself, never the commits after it, and never be retried forever."""
        done: list[PendingCommit] = []
        for oid in oids:
            if should_stop():
                break  # e.g. the service stopping, which may be what killed the worker: retried on next start
            with self._pool(1) as alone:
                try:
                    done.extend(alone.submit(_worker_process, [oid], replays).result())
                except BrokenProcessPool:
                    base: dict[str, Any] = {"source": self.source}
                    try:
                        base["commit_time"] = self.repo.commit_info(oid).commit_time
                    except Exception:
                        pass  # the skip is recorded all the same
                    done.append(CommitProcessor._skipped(oid, base, "parser-died: the process parsing this "
                                                                    "commit died (a parser crash, or out of memory)"))
        return done


def _runs(chunks: int, lanes: int) -> Iterator[range]:
    """The chunks' indices in runs for `lanes` pool workers (`Ingestor._pooled`): `_RUN_CHUNKS` long, shorter
    towards the end (at most half the remaining chunks per lane), so that no worker is left with a long last run
    while the others have nothing more to do."""
    start = 0
    while start < chunks:
        length = max(1, min(_RUN_CHUNKS, (chunks - start) // (2 * lanes)))
        yield range(start, min(start + length, chunks))
        start += length


class ReplayPlanner:
    """Which file changes of each commit were met earlier in one run, or stored before it: the parent's view, in
    commit order, of what the workers may leave out. Ahead of the workers, it walks each commit's diff without
    hunks or rename detection (which files and blobs changed; a renamed file's keys then match no worker's, and
    it is built). A hint, not the authority: the store decides in its transaction
    (`store.FileOutcome`), and a replay whose first occurrence was not stored built is built after all. Each
    chunk is planned once (a chunk retried after a worker died is planned as it first was)."""

    def __init__(self, repo: GitRepo, store: Store, fingerprint: bytes) -> None:
        self.repo = repo
        self.store = store
        self.fingerprint = fingerprint
        self.seen: set[bytes] = set()
        self.planned: dict[str, frozenset[bytes]] = {}

    def replays(self, oids: list[str]) -> Replays:
        fresh = [oid for oid in oids if oid not in self.planned]
        keys_of: dict[str, list[bytes]] = {}
        for oid in fresh:
            try:
                files = self.repo.changed_rust_files(oid, hunks=False, renames=False).files
            except Exception:  # a commit git cannot diff is a recorded skip: there is nothing to leave out
                files = []
            keys_of[oid] = [file_change_key(change, self.fingerprint) for change in files]
        stored = self.store.known_file_changes(
            {key for keys in keys_of.values() for key in keys if key not in self.seen})
        for oid in fresh:
            keys = keys_of[oid]
            self.planned[oid] = frozenset(key for key in keys if key in self.seen or key in stored)
            self.seen.update(keys)
        return {oid: self.planned[oid] for oid in oids if self.planned.get(oid)}


class _CrashGuard:
    """Which commits this process is parsing in-process, in a file of its own beside the store, so that when a
    parser bug kills the process (a segfault, the OOM killer) the next run parses those commits in a spawned
    process instead: a second death there costs only the commit (parser-died), not the daemon again and again.
    A plain write: it must survive the process, not the machine."""

    _PREFIX = "parsing-in-process."

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.own = directory / f"{self._PREFIX}{os.getpid()}"

    def take_suspects(self) -> set[str]:
        """Commits that processes now dead were parsing when they died (their files are removed)."""
        suspects: set[str] = set()
        try:
            markers = [m for m in self.directory.iterdir() if m.name.startswith(self._PREFIX)]
        except OSError:
            return suspects
        for marker in markers:
            pid = marker.name[len(self._PREFIX):]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue  # a backfill beside the daemon, working (our own pid: a dead predecessor's)
            try:
                suspects.update(line for line in marker.read_text().split() if len(line) == 40)
                marker.unlink()
            except OSError:
                continue
        if suspects:
            _log.warning("crashed_while_parsing", commits=sorted(suspects),
                         detail="a process died while parsing these: they are parsed in a spawned process now")
        return suspects

    @contextmanager
    def parsing(self, oids: list[str]) -> Iterator[None]:
        try:
            self.own.write_text("\n".join(oids))
        except OSError:
            pass  # no marker: a crash would be retried in-process, as before
        try:
            yield
        finally:
            try:
                self.own.unlink()
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_isolating(store: Store, batch: list[PendingCommit]) -> tuple[WriteResult, list[PendingCommit]]:
    """Write a batch in one transaction; if a record cannot be encoded, write the commits one by one and
    store each that fails as skipped, with the reason: one commit never blocks the others, nor is it retried
    forever. Only errors about a record's content are isolated (a full disk is the store's problem, and
    must not turn commits into skips). Returns the result and the batch as written."""
    try:
        return store.write(batch), batch
    except (ValueError, TypeError) as exc:  # json.dumps: UnicodeEncodeError, unserialisable values
        _log.error("batch_unwritable", commits=len(batch), error=_clean(f"{type(exc).__name__}: {exc}"))
    stored = already = examples = written = replayed = 0
    outcome: list[PendingCommit] = []
    for item in batch:
        try:
            result = store.write([item])
        except (ValueError, TypeError) as exc:
            keep = {k: item.record[k] for k in ("source", "commit_time", "noticed_at") if k in item.record}
            item = CommitProcessor._skipped(item.oid.hex(), keep, f"unstorable record: {type(exc).__name__}: {exc}")
            result = store.write([item])  # a plain record: if this fails, the store is what is broken
        stored, already = stored + result.stored, already + result.already_present
        examples, written = examples + result.examples, written + result.bytes_written
        replayed += result.replayed_files
        outcome.append(item)
    return WriteResult(stored, already, examples, written, replayed), outcome
