"""The store's JSON: orjson's bytes where it can, json's answer where orjson refuses a value."""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
from pathlib import Path

import pytest

from gitlora.daemon import compact_json


def _json(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@pytest.mark.parametrize("value", [
    {"path": "src/é.rs", "after": "fn a() {\n\t\"q\\\" \u2028 \x1f \x7f 𝄞\n}", "n": [0, -1, 2**63 - 1, True, None]},
    {"big": 2**70, "negative": -(2**64)},  # beyond orjson's ints: json writes them
    {1: "int key"},  # json's conversion of a non-string key
    [0.5, -0.0, 1e16, 123456789.123, 3.0],
    "",
])
def test_the_same_bytes_as_json(value):
    assert compact_json.encode(value) == _json(value)
    assert compact_json.loads(compact_json.encode(value)) == json.loads(_json(value))


def test_what_json_refuses_is_refused_with_jsons_error():
    with pytest.raises(UnicodeEncodeError):
        compact_json.encode({"name": "bad\udcff"})  # a surrogate-escaped byte: must be made lossless first

    @dataclasses.dataclass
    class Thing:
        x: int

    for value in (Thing(1), datetime.datetime(2026, 1, 1), Path("a"), {"s": {1, 2}}):
        with pytest.raises(TypeError):
            compact_json.encode(value)


def test_a_default_is_jsons_and_a_nan_token_is_read():
    assert compact_json.encode({"p": Path("a/b")}, default=str) == b'{"p":"a/b"}'
    assert math.isnan(compact_json.loads(b'{"x":NaN}')["x"])
    assert compact_json.loads(memoryview(b'[1,"\xc3\xa9"]')) == [1, "é"]
    with pytest.raises(ValueError):
        compact_json.loads(b"{not json")
