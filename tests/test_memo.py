"""The bounded memo ingest keeps of what it computes from an item's text alone."""
from __future__ import annotations

from gitlora.daemon.dedup import SHA1_SCHEME, TOKEN_SCHEME, signature, signatures
from gitlora.daemon.memo import ByteLRU
from gitlora.daemon.rust_items import extract_items, item_identifiers, parse, referenced_identifiers


def test_memo_holds_at_most_its_bound_and_tells_a_stored_none_from_a_miss():
    memo = ByteLRU(10)
    missing = object()
    memo.put("abcd", None, 4)
    memo.put("efgh", b"x", 4)
    assert memo.get("abcd", missing) is None and memo.get("efgh", missing) == b"x"
    memo.put("efgh", b"x", 4)  # a key stored again does not count twice
    assert memo.size == 8
    memo.put("ijkl", b"z", 4)  # over the bound: the least recently used ("abcd") goes
    assert memo.get("abcd", missing) is missing and memo.get("efgh", missing) == b"x"
    assert memo.get("ijkl", missing) == b"z" and memo.size == 8
    memo.put("x" * 11, b"big", 11)  # larger than the whole bound: not kept, nothing evicted
    assert memo.get("x" * 11, missing) is missing and memo.get("ijkl", missing) == b"z"
    memo.resize(4)  # a smaller bound evicts down to it, oldest first
    assert memo.get("efgh", missing) is missing and memo.get("ijkl", missing) == b"z" and memo.size == 4


def test_a_text_met_again_gets_the_same_sketch_and_names():
    source = b"use crate::net::Peer;\n\npub fn connect(p: &Peer) -> Result<Conn, Error> {\n    Conn::open(p.addr)\n}\n"
    tree = parse(source)
    item = next(iter(extract_items(source, tree).items.values()))
    first = item_identifiers(tree, source, item.span)
    again = item_identifiers(tree, source, item.span)
    assert first == again == referenced_identifiers(item.text) == ["Peer", "Result", "Conn", "Error", "Conn::open"]
    again.append("changed by a caller")  # the memo hands out copies
    assert item_identifiers(tree, source, item.span) == first
    for scheme in (SHA1_SCHEME, TOKEN_SCHEME):
        assert signatures([item.text, item.text], scheme) == [signature(item.text, scheme)] * 2
