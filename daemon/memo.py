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
