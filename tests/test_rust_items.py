"""Item extraction and item diffs on hand-written Rust, without git."""
from __future__ import annotations

import pytest

from gitlora.daemon.memo import ByteLRU
from gitlora.daemon.rust_items import (FileItems, _Extractor, _line_starts, diff_items, extract_items, module_path,
                                       parse, qualified_name)

ALL_KINDS = b'''use std::fmt;
use crate::net::{Peer, Pool};

/// A documented struct.
#[derive(Debug)]
pub struct Point { x: i32, y: i32 }
pub enum Shape { Dot(Point), Line(Point, Point) }
pub union Bits { i: u32, f: f32 }
pub trait Area { fn area(&self) -> f64; fn zero() -> f64 { 0.0 } }
impl Point { pub fn new(x: i32, y: i32) -> Self { Point { x, y } } const ORIGIN: i32 = 0; }
impl fmt::Display for Point { fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result { Ok(()) } }
pub mod geometry { pub fn dist() -> f64 { 1.0 } pub struct Line; }
mod external;
macro_rules! square { ($x:expr) => { $x * $x }; }
pub const LIMIT: usize = 10;
static mut COUNTER: u64 = 0;
pub type Map = std::collections::HashMap<String, Point>;
pub fn free(a: i32) -> i32 { a + 1 }
'''

EXPECTED_ITEMS = {
    ("struct", "Point"), ("enum", "Shape"), ("union", "Bits"), ("trait", "Area"), ("method", "Area::area"),
    ("method", "Area::zero"), ("impl", "impl Point"), ("method", "Point::new"), ("const", "Point::ORIGIN"),
    ("impl", "impl fmt::Display for Point"), ("method", "<Point as fmt::Display>::fmt"), ("mod", "geometry"),
    ("fn", "geometry::dist"), ("struct", "geometry::Line"), ("mod", "external"), ("macro", "square"),
    ("const", "LIMIT"), ("static", "COUNTER"), ("type", "Map"), ("fn", "free"),
}


def _changes(old: bytes | None, new: bytes | None) -> set[tuple[str, str, str]]:
    return {(c.change_kind, c.kind, c.name) for c in diff_items(
        extract_items(old) if old is not None else None, extract_items(new) if new is not None else None)}


def test_every_item_kind_is_found_with_its_qualified_name():
    items = extract_items(ALL_KINDS)
    assert {(i.kind, i.name) for i in items.items.values()} == EXPECTED_ITEMS
    assert items.imports == ["use std::fmt;", "use crate::net::{Peer, Pool};"]
    assert not items.syntax_error


def test_item_text_includes_doc_comments_and_attributes():
    point = next(i for i in extract_items(ALL_KINDS).items.values() if i.name == "Point" and i.kind == "struct")
    assert point.text.startswith("/// A documented struct.\n#[derive(Debug)]\npub struct Point")


def test_new_file_adds_every_item_and_deleted_file_deletes_every_item():
    assert _changes(None, ALL_KINDS) == {("added", k, n) for k, n in EXPECTED_ITEMS}
    assert _changes(ALL_KINDS, None) == {("deleted", k, n) for k, n in EXPECTED_ITEMS}


@pytest.mark.parametrize("old_fragment,new_fragment,expected", [
    (b"pub fn free(a: i32) -> i32 { a + 1 }", b"pub fn free(a: i32) -> i32 { a + 2 }", {("modified", "fn", "free")}),
    (b"Point { x, y } }", b"Point { x: x * 2, y } }", {("modified", "method", "Point::new")}),
    (b"fn zero() -> f64 { 0.0 }", b"fn zero() -> f64 { -0.0 }", {("modified", "method", "Area::zero")}),
    (b"Line(Point, Point) }", b"Line(Point, Point), Empty }", {("modified", "enum", "Shape")}),
    (b"union Bits { i: u32, f: f32 }", b"union Bits { i: u32 }", {("modified", "union", "Bits")}),
    (b"($x:expr) => { $x * $x };", b"($x:expr) => { ($x) * ($x) };", {("modified", "macro", "square")}),
    (b"LIMIT: usize = 10", b"LIMIT: usize = 11", {("modified", "const", "LIMIT")}),
    (b"COUNTER: u64 = 0", b"COUNTER: u64 = 1", {("modified", "static", "COUNTER")}),
    (b"HashMap<String, Point>", b"BTreeMap<String, Point>", {("modified", "type", "Map")}),
    (b"pub fn dist() -> f64 { 1.0 }", b"pub fn dist() -> f64 { 2.0 }", {("modified", "fn", "geometry::dist")}),
    (b"mod external;", b"pub mod external;", {("modified", "mod", "external")}),
    (b"#[derive(Debug)]", b"#[derive(Debug, Clone)]", {("modified", "struct", "Point")}),
    # a container's own header changes: the impl changes, its unchanged members do not
    (b"impl fmt::Display for Point {", b"impl fmt::Display for Point where Point: Sized {",
     {("modified", "impl", "impl fmt::Display for Point")}),
    (b"pub trait Area {", b"pub trait Area: Sized {", {("modified", "trait", "Area")}),
    (b"pub fn free(a: i32) -> i32 { a + 1 }", b"pub fn renamed(a: i32) -> i32 { a + 1 }",
     {("deleted", "fn", "free"), ("added", "fn", "renamed")}),
    (b"pub fn free(a: i32) -> i32 { a + 1 }", b"pub fn free(a: i32) -> i32 { a + 1 }\nfn extra() {}",
     {("added", "fn", "extra")}),
])
def test_each_change_kind_on_each_item_kind(old_fragment, new_fragment, expected):
    assert old_fragment in ALL_KINDS
    assert _changes(ALL_KINDS, ALL_KINDS.replace(old_fragment, new_fragment, 1)) == expected


def test_moving_items_or_reformatting_a_container_changes_nothing():
    lines = ALL_KINDS.rstrip(b"\n").split(b"\n")
    reordered = b"\n".join(lines[:3] + [lines[-1], lines[-2]] + lines[3:-2]) + b"\n"
    assert reordered != ALL_KINDS
    assert _changes(ALL_KINDS, reordered) == set()
    assert _changes(ALL_KINDS, ALL_KINDS) == set()


def test_syntax_error_keeps_clean_items_and_suppresses_false_deletions():
    old = b"fn a() {}\nfn b() {}\nfn c() {}\n"
    new = b"fn a() { 1 }\nfn b( {\nfn c() {}\n"
    items = extract_items(new)
    assert items.syntax_error
    names = {i.name for i in items.items.values()}
    assert "b" not in names and "c" in names  # the broken fn is not an item; the one after still is
    assert _changes(old, new) == {("modified", "fn", "a")}


def test_broken_item_is_counted():
    items = extract_items(b"fn good() {}\nstruct S { a: u8,, }\n")
    assert items.syntax_error
    assert {i.name for i in items.items.values()} == {"good"}
    assert items.broken_items == 1


def test_duplicate_names_are_kept_apart():
    src = b"impl A { fn f() {} }\nimpl A { fn f() { 1 } }\n"
    items = extract_items(src)
    assert sorted(k for k in items.items if k[0] == "method") == [("method", "A::f", 0), ("method", "A::f", 1)]


@pytest.mark.parametrize("path,expected", [
    ("src/lib.rs", []), ("src/main.rs", []), ("src/net/mod.rs", ["net"]), ("src/net/peer.rs", ["net", "peer"]),
    ("node/src/net/peer.rs", ["node", "net", "peer"]), ("crates/my-crate/src/lib.rs", ["my_crate"]),
    ("tests/integration.rs", ["tests", "integration"]), ("build.rs", ["build"]),
])
def test_module_path_from_file_path(path, expected):
    assert module_path(path) == expected


def test_qualified_name_joins_module_and_item():
    assert qualified_name("node/src/net/peer.rs", "Peer::connect") == "node::net::peer::Peer::connect"


def _git_style_hunks(old: bytes, new: bytes) -> list[tuple[int, int, int, int]]:
    """Hunks in git's zero-context convention (a count of 0 means "after line start")."""
    import difflib

    a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
    hunks = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag != "equal":
            hunks.append((i1 + 1 if i2 > i1 else i1, i2 - i1, j1 + 1 if j2 > j1 else j1, j2 - j1))
    return hunks


@pytest.mark.parametrize("edit", [
    lambda s: s.replace(b"a + 1", b"a + 2"),                      # one line changed
    lambda s: b"// header\n" + s,                                  # insertion at the top
    lambda s: s + b"fn tail() {}",                                 # at the end, no trailing newline
    lambda s: s.replace(b"pub const LIMIT: usize = 10;\n", b""),   # a deleted line
    lambda s: s.replace(b"mod external;", b"mod external;\nmod more;\nmod most;").replace(b"u64 = 0", b"u64 = 9"),
    lambda s: s.replace(b"{ 1.0 }", b"{\n        let x = 1.0;\n        x\n    }"),  # one line becomes four
])
def test_incremental_reparse_with_git_hunks_equals_a_full_parse(edit):
    from gitlora.daemon.rust_items import parse

    new = edit(ALL_KINDS)
    assert new != ALL_KINDS
    old_tree = parse(ALL_KINDS)
    incremental = parse(new, (ALL_KINDS, old_tree), _git_style_hunks(ALL_KINDS, new))
    full = parse(new)
    assert str(incremental.root_node) == str(full.root_node)
    assert incremental.root_node.end_point == full.root_node.end_point
    assert extract_items(new, incremental).items == extract_items(new, full).items


@pytest.mark.parametrize("data", [b"", b"\n", b"a", b"a\n", b"\n\n", b"fn a() {}\r\n// \xc3\xa9\nstruct S;", b"x\ny"])
def test_line_starts_are_offset_zero_and_the_byte_after_each_newline(data):
    assert _line_starts(data) == [0, *(i + 1 for i, byte in enumerate(data) if byte == 0x0A)]


def _without_memo(source: bytes) -> FileItems:
    """What `extract_items` gives with nothing memoised: every item walked from its nodes."""
    extractor = _Extractor(source)
    tree = parse(source)
    extractor.walk(tree.root_node.children, "", False)
    extractor.result.syntax_error = extractor.result.syntax_error or tree.root_node.has_error
    return extractor.result


@pytest.mark.parametrize("edit", [
    lambda s: b"// header\n/// doc\nfn first() {}\n" + s,  # everything below moves down: memo hits, new spans
    lambda s: s.replace(b"pub fn free", b"  pub fn free"),  # the same text at another column
    lambda s: s.replace(b"pub const LIMIT", b"pub struct Point { x: i32, y: i32 }\npub const LIMIT"),  # a 2nd Point
    lambda s: s + b"impl Point { pub fn new(x: i32, y: i32) -> Self { Point { x, y } } const ORIGIN: i32 = 0; }\n",
    lambda s: s.replace(b"pub fn free(a: i32) -> i32 { a + 1 }", b"pub fn free(a: i32) -> i32 { a + }"),  # broken
])
def test_items_from_the_top_level_memo_equal_items_walked_from_their_nodes(edit):
    """A file's next version repeats most top-level items, which come from the memo with their spans moved:
    keys (with occurrences), texts, spans and lines as a walk of the new version's nodes gives them. A file with
    a syntax error does not use the memo."""
    memo = ByteLRU(64 << 20)
    extract_items(ALL_KINDS, memo=memo)
    new = edit(ALL_KINDS)
    hits = len(memo)
    found = extract_items(new, memo=memo)
    assert list(found.items.items()) == list(_without_memo(new).items.items())
    assert (found.imports, found.syntax_error, found.broken_items) == \
        (_without_memo(new).imports, _without_memo(new).syntax_error, _without_memo(new).broken_items)
    if not found.syntax_error:
        assert len(memo) - hits <= 2  # only the new or changed top-level items were walked
    for item in found.items.values():
        assert new[item.span.start_byte:item.span.end_byte].decode() == item.text
        line_start = new.rfind(b"\n", 0, item.span.start_byte) + 1
        assert item.span.start_col == item.span.start_byte - line_start
        assert new.count(b"\n", 0, item.span.start_byte) + 1 == item.span.start_line
