"""Ingest's symbol index: the definitions of the repository at the commit being stored, and each example's
cross-file context resolved against them (DESIGN.md, *Cross-file context*).

One SymbolIndex per Ingestor, fed the commits in the order they are written (backfill's parent process, the
daemon's writer, `upgrade`'s derivation), so it is the one place that knows which tree it reflects. A commit
whose first parent is that tree moves it by the commit's own diff; any other (a branch switch, a commit after
a skipped one, the first commit after a restart) first moves it by a tree-to-tree diff. Definitions are
content-addressed by blob: the workers return those of the blobs they parsed, the store keeps them, and only a
blob never parsed (unchanged since before the first ingested commit) is parsed here, once.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import compact_json, log
from .config import IngestConfig
from .gitrepo import GitRepo
from .memo import ByteLRU
from .store import PendingCommit, Store
from .symbols import Definition, LookupMemo, NameIndex, definitions, resolve

_log = log.get("gitlora.symbols")
_RECENT_BLOBS = 1024  # definitions kept for blobs not in the index's tree (a branch switch back finds them)
_STALE = "stale"  # `at` after a failed move: no parent equals it, so the next commit rebuilds the index


def encoded_definitions(data: bytes, tree: Any, memo: ByteLRU | None = None) -> bytes:
    """A parsed blob's definitions as the store keeps them (`memo`: see `symbols.definitions`)."""
    return compact_json.encode([d.encode() for d in definitions(data, tree, memo)])


NO_DEFINITIONS = b"[]"


class SymbolIndex:
    def __init__(self, repo: GitRepo, store: Store, config: IngestConfig,
                 parse_definitions: Callable[[list[str]], dict[str, bytes]]) -> None:
        """`parse_definitions`: blob -> encoded definitions for blobs neither a worker nor the store has (the
        Ingestor parses them in a spawned process)."""
        self.repo = repo
        self.store = store
        self.config = config
        self.parse_definitions = parse_definitions
        self.index = NameIndex()
        self.lookups = LookupMemo()  # what identifiers name in `index`, kept while the names they read are unchanged
        self.at: str | None = None  # the commit whose tree the index reflects; None: the empty tree
        self.parsed = 0  # blobs this index had to parse itself (none after a restart: the store has them)
        self._recent: OrderedDict[str, bytes] = OrderedDict()

    def annotate(self, batch: list[PendingCommit]) -> None:
        """Give each example of the batch its `cross_file` blocks and each commit record its counts, moving the
        index commit by commit. Nothing here may cost a commit: a failure is logged and the context left empty."""
        for pending in batch:
            for blob, value in pending.definitions.items():
                self._remember(blob, value)
            if pending.changes is None or pending.references is None:
                continue  # a skipped commit: the index stays where it is
            try:
                self._annotate(pending)
            except Exception as exc:  # a bug here must not stop ingest: the commit is stored without context
                _log.error("symbol_index_failed", commit=pending.oid.hex(), error=f"{type(exc).__name__}: {exc}")
                self.at = _STALE
                pending.record["symbol_index_error"] = f"{type(exc).__name__}: {exc}"
                _splice_all(pending, [[] for _ in pending.examples])

    def _annotate(self, pending: PendingCommit) -> None:
        oid = pending.oid.hex()
        budget = self.config.cross_file_bytes
        if budget <= 0:
            _splice_all(pending, [[] for _ in pending.examples])
            return
        started = time.perf_counter()
        parent = pending.record.get("parent")
        if self.at != parent:
            parsed_before = self.parsed
            moved = self._move(parent, pending)
            pending.record["symbol_index"] = {"moved_files": moved, "parsed": self.parsed - parsed_before}
        self._apply([(old, new, blob) for old, new, blob in pending.changes or []], pending)
        self.at = oid
        blocks: list[list[dict[str, str]]] = []
        referencing = resolved = used = 0
        self.lookups.forget(self.index.take_changed())
        for reference in pending.references or []:
            if reference is None:
                blocks.append([])
                continue
            path, identifiers, imports = reference
            found = resolve(self.index, path, identifiers, imports, budget, self.lookups)
            blocks.append(found.blocks)
            referencing += found.referencing
            resolved += found.referencing and bool(found.blocks)
            used += sum(len(b["path"].encode()) + len(b["text"].encode()) for b in found.blocks)
        _splice_all(pending, blocks)
        pending.record["cross_file_referencing"] = referencing
        pending.record["cross_file_resolved"] = resolved
        pending.record["cross_file_bytes"] = used
        timings = pending.record.setdefault("timings_ms", {})
        if isinstance(timings, dict):
            timings["symbols"] = round((time.perf_counter() - started) * 1000, 2)

    def _move(self, target: str | None, pending: PendingCommit) -> int:
        """Make the index reflect `target`'s tree (None: the empty tree); returns the files it changed."""
        start = self.at
        if start == _STALE:
            self._new_index()
            start = None
        try:
            changes = self.repo.rust_tree_changes(start, target)
        except Exception as exc:  # a missing tree (shallow or partial clone): start over from the empty tree
            _log.warning("symbol_index_rebuilt", commit=pending.oid.hex(), error=f"{type(exc).__name__}: {exc}")
            self._new_index()
            try:
                changes = self.repo.rust_tree_changes(None, target) if target is not None else []
            except Exception:  # the parent itself is missing: its commit was diffed against the empty tree too
                changes, target = [], None
        self._apply([(c.old_path, c.new_path, c.new_oid) for c in changes], pending)
        self.at = target
        return len(changes)

    def _new_index(self) -> None:
        self.index = NameIndex()
        self.lookups.clear()  # they describe the index replaced

    def _apply(self, changes: list[tuple[str | None, str | None, str | None]], pending: PendingCommit) -> None:
        for old, _, _ in changes:
            if old is not None:
                self.index.remove(old)
        needed = [blob for _, new, blob in changes if new is not None and blob is not None]
        found = self._definitions(needed, pending)
        for _, new, blob in changes:
            if new is not None and blob is not None:
                self.index.put(new, blob, found[blob])

    def _definitions(self, blobs: list[str], pending: PendingCommit) -> dict[str, list[Definition]]:
        """Each blob's definitions: from the batch or recent memory, else the store, else parsed here (and then
        stored with `pending`)."""
        raw: dict[str, bytes] = {}
        missing = []
        for blob in dict.fromkeys(blobs):
            if self.index.has_blob(blob):
                continue
            value = pending.definitions.get(blob) or self._recent.get(blob)
            if value is None:
                missing.append(blob)
            else:
                raw[blob] = value
        if missing:
            stored = self.store.get_definitions(missing)
            raw.update(stored)
            unparsed = [blob for blob in missing if blob not in stored]
            if unparsed:
                parsed = self.parse_definitions(unparsed)
                raw.update(parsed)
                pending.definitions.update(parsed)  # stored with this commit
                self.parsed += len(unparsed)
        decoded: dict[str, list[Definition]] = {blob: [] for blob in blobs}
        for blob, value in raw.items():
            self._remember(blob, value)
            decoded[blob] = [Definition.decode(d) for d in compact_json.loads(value)]
        return decoded

    def _remember(self, blob: str, value: bytes) -> None:
        self._recent[blob] = value
        self._recent.move_to_end(blob)
        while len(self._recent) > _RECENT_BLOBS:
            self._recent.popitem(last=False)


def _splice_all(pending: PendingCommit, blocks: list[list[dict[str, str]]]) -> None:
    """Add `cross_file` to each example; an encoded one gets it spliced in before its closing brace (the
    worker's JSON is not decoded again)."""
    examples: list[dict[str, Any] | bytes] = []
    for example, found in zip(pending.examples, blocks):
        if isinstance(example, (bytes, bytearray)):
            examples.append(bytes(example[:-1]) + b',"cross_file":' + compact_json.encode(found) + b"}")
        else:
            examples.append({**example, "cross_file": found})
    pending.examples = examples
