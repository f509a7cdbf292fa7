"""Compact JSON (no spaces, non-ASCII as is, UTF-8): how store records, control-socket lines and structured log
values are written, in one place so that a check of "can this be stored" (ingest) is the store's own encoding."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def dumps(value: Any, *, default: Callable[[Any], Any] | None = None) -> str:
    """The compact text; `default=str` for replies and logs, where a Path or datetime may appear."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=default)


def encode(value: Any, *, default: Callable[[Any], Any] | None = None) -> bytes:
    """`dumps` in UTF-8. Raises UnicodeEncodeError for a lone surrogate (a surrogate-escaped, undecodable name):
    such text must be made lossless before it is stored."""
    return dumps(value, default=default).encode("utf-8")
