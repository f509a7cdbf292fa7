"""One bounded cache for ingest: a least-recently-used map bounded by the (estimated) bytes of what it holds.

Ingest keeps parsed blobs and trees in it (per `CommitProcessor`), and the results of pure functions of an item's
text (its near-duplicate sketch, the names it references), which it meets many times: a merge replays its
branch's items, a cherry-pick or a revert repeats them. Written here rather than taken from a library because
it needs a byte bound with a per-entry size the caller estimates, and a refusal of entries larger than the
whole bound; `functools.lru_cache` bounds only the count, and cachetools would be a dependency for twenty lines.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any


class ByteLRU:
    """key -> value, at most `max_bytes` of the sizes given to `put` in all; the least recently used entry goes
    first. A value larger than the whole budget is not kept: it would evict everything else and then stay
    resident in an idle process."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable | None, default: Any = None) -> Any:
        """The value stored under `key` (now the most recently used), else `default` (a stored None is a value:
        pass a sentinel to tell it from a miss)."""
        entry = self._entries.get(key) if key is not None else None
        if entry is None:
            return default
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: Any, size: int) -> None:
        if key in self._entries or size > self.max_bytes:
            return  # a key stored before keeps its value: callers store what a pure function gives for it
        self._entries[key] = (value, size)
        self.size += size
        self._evict()

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._evict()

    def _evict(self) -> None:
        while self.size > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.size -= evicted


@dataclass(frozen=True)
class TextMemos:
    """Memos of pure functions of a text (an item's sketch and referenced names, a top-level item's items and
    definitions), one set per `CommitProcessor` and so per thread (a daemon's repository worker, a pool
    process): a ByteLRU's check-then-update is not safe between threads, and each owner sizes its own."""

    sketches: ByteLRU
    identifiers: ByteLRU
    items: ByteLRU
    definitions: ByteLRU

    @classmethod
    def within(cls, max_bytes: int) -> "TextMemos":
        """Memos of `max_bytes` in all: half for top-level items and definitions, which a file's next version
        mostly repeats, half for sketches and names, which a merge or cherry-pick repeats."""
        return cls(ByteLRU(max_bytes // 4), ByteLRU(max_bytes // 4), ByteLRU(max_bytes // 4), ByteLRU(max_bytes // 4))
