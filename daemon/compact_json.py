"""Compact JSON (no spaces, non-ASCII as is, UTF-8): how store records, control-socket lines and structured log
values are written, in one place so that a check of "can this be stored" (ingest) is the store's own encoding.

Bytes are written and read by orjson where it can: ingest encodes and the store decodes every example (hundreds
of MB in a backfill), and orjson does that about 5x faster than the json module, with the same bytes for
strings, ints, lists and objects (a float may be spelt otherwise, 1e-7 for 1e-07, and reads back the same).
Where orjson refuses a value, the json module decides, so what can be written, and the error for what cannot,
stay json's: a lone surrogate, an int beyond 64 bits, a key that is not a string, a subclass of a builtin type,
a dataclass or a datetime. One difference is left: a NaN or infinite float, which json writes as a non-standard
token and orjson as null; none of the values stored today holds one (counts, offsets, times, texts)."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

_STRICT = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS


def dumps(value: Any, *, default: Callable[[Any], Any] | None = None) -> str:
    """The compact text; `default=str` for replies and logs, where a Path or datetime may appear."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=default)


def encode(value: Any, *, default: Callable[[Any], Any] | None = None) -> bytes:
    """`dumps` in UTF-8. Raises UnicodeEncodeError for a lone surrogate (a surrogate-escaped, undecodable name):
    such text must be made lossless before it is stored."""
    if default is None:
        try:
            return orjson.dumps(value, option=_STRICT)
        except orjson.JSONEncodeError:
            pass  # json's answer: the value written its way, or json's own error
    return dumps(value, default=default).encode("utf-8")


def loads(raw: bytes | bytearray | memoryview | str) -> Any:
    """A value `encode` wrote (or any JSON: a NaN token, which orjson refuses, is read by json). Raises
    ValueError for text that is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(bytes(raw) if isinstance(raw, memoryview) else raw)
