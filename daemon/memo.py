"""A memo of a pure function of a text, bounded by the text it holds: ingest meets the same item text many times
(a merge replays its branch's items; a cherry-pick or a revert repeats them), and what it computes from an
item's text alone (its near-duplicate sketch, the names it references) need not be computed again."""
from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")
D = TypeVar("D")


class TextMemo(Generic[V]):
    """key -> value, holding keys of at most `max_chars` characters (or bytes) in all; emptied when full, which
    costs only recomputation (its values are pure functions of their keys)."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.chars = 0
        self._values: dict[Hashable, V] = {}

    def resize(self, max_chars: int) -> None:
        self.max_chars = max_chars
        if self.chars > max_chars:
            self._values.clear()
            self.chars = 0

    def get(self, key: Hashable, default: D) -> V | D:
        return self._values.get(key, default)

    def put(self, key: Hashable, size: int, value: V) -> None:
        if key in self._values or size > self.max_chars:
            return  # the value of a key stored before is the same: a pure function of it
        if self.chars + size > self.max_chars:
            self._values.clear()
            self.chars = 0
        self.chars += size
        self._values[key] = value
