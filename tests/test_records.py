"""Example records that can rebuild their context: blob ids as git has them, byte and line spans that give back
the item's text from the file's bytes (old and new side), the item's indentation, and the names it uses."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from gitlora.daemon.commands.backfill import backfill
from gitlora.daemon.config import Config
from gitlora.daemon.examples import CONTEXT_FIELDS
from gitlora.daemon.repos import open_repo
from gitlora.daemon import demo_repo, ingest
from gitlora.daemon.gitrepo import GitRepo
from gitlora.daemon.ingest import CommitProcessor
from gitlora.daemon.rust_items import extract_items, item_identifiers, parse, referenced_identifiers
from gitlora.daemon.store import Store

from gitutil import commit_files, init_repo

LIB_V1 = """use std::fmt;

/// Crabs 🦀 and accents: é, ü, 漢字 take several bytes each.
pub fn greet(name: &str) -> String {
    format!("héllo {name} 🦀")
}

pub fn doomed() -> u8 { Frame::SIZE as u8 + helpers::one() }

pub mod net {
    use crate::wire::Frame;

    pub struct Peer { addr: String }

    impl Peer {
        /// Opens a connection.
        #[inline]
        pub fn connect(addr: &str) -> Peer {
            let frame = Frame::new(addr);
            Peer { addr: crate::wire::encode(&frame) }
        }
    }

    pub mod inner {
        pub fn deep() -> u32 {
            7 // 七
        }
    }
}
"""

LIB_V2 = """use std::fmt;

/// Crabs 🦀 and accents: é, ü, 漢字 take several bytes each. Now longer: ñ.
pub fn greet(name: &str) -> String {
    format!("¡héllo {name} 🦀!")
}

pub mod net {
    use crate::wire::Frame;

    pub struct Peer { addr: String }

    impl Peer {
        /// Opens a connection.
        #[inline]
        pub fn connect(addr: &str) -> Peer {
            let frame = Frame::new(addr);
            let checked = crate::wire::checksum(&frame, MAX_FRAME);
            Peer { addr: crate::wire::encode(&frame) + &checked }
        }

        pub fn close(&self) -> Result<(), fmt::Error> {
            helpers::flush(self);
            Ok(())
        }
    }

    pub mod inner {
        pub fn deep() -> u32 {
            8 // 八
        }
    }
}
"""


LATIN1_CONTENT = b"pub fn s() -> &'static str { \"caf\xe9\" }\n"


def _blob(repo: Path, oid: str) -> bytes:
    return subprocess.run(["git", "cat-file", "blob", oid], cwd=repo, check=True, capture_output=True).stdout


def _rev(repo: Path, spec: bytes) -> str | None:
    done = subprocess.run(["git", "rev-parse", "--verify", "-q", os.fsdecode(spec)], cwd=repo, capture_output=True)
    return done.stdout.decode().strip() or None


def _check_span(blob: bytes, span: dict, text: str) -> None:
    """The span gives back the item's text, its lines and its indentation from the blob's bytes."""
    start, end = span["start_byte"], span["end_byte"]
    assert blob[start:end] == text.encode("utf-8")
    line_start = blob.rfind(b"\n", 0, start) + 1
    assert span["start_line"] == blob.count(b"\n", 0, start) + 1
    assert span["end_line"] == blob.count(b"\n", 0, end - 1) + 1
    assert span["start_col"] == start - line_start
    lines = blob.splitlines(keepends=True)[span["start_line"] - 1:span["end_line"]]
    joined = b"".join(lines)
    assert joined[span["start_col"]:span["start_col"] + end - start] == text.encode("utf-8")


@pytest.fixture
def history(tmp_path) -> tuple[Path, list[str]]:
    repo = init_repo(tmp_path / "crate")
    latin1_name = os.fsdecode(b"src/caf\xe9.rs")  # a name that is not UTF-8, with UTF-8 content
    oids = [
        commit_files(repo, {"src/lib.rs": LIB_V1, "src/gone.rs": "pub fn bye() -> &'static str {\n    \"goodbye, cruel world\"\n}\n",
                            latin1_name: "pub fn latin() -> u8 {\n    let café = 1;\n    café\n}\n"}, "first"),
        commit_files(repo, {"src/lib.rs": LIB_V2, latin1_name: "pub fn latin() -> u8 {\n    let café = 2;\n    café\n}\n",
                            "src/bytes.rs": LATIN1_CONTENT}, "second"),
        commit_files(repo, {"src/gone.rs": None}, "third"),
    ]
    backfill(str(repo), progress=False, workers=1)
    return repo, oids


def _examples(repo: Path) -> list[dict]:
    with Store(open_repo(repo, Config()).paths.store, readonly=True) as store:
        return [example for _, example in store.iter_examples()]


def test_spans_round_trip_to_both_blobs_and_blob_ids_match_git(history):
    repo, oids = history
    examples = _examples(repo)
    assert {e["change_kind"] for e in examples} == {"added", "modified", "deleted"}
    for example in examples:
        assert set(CONTEXT_FIELDS) <= set(example)
        raw_path = bytes.fromhex(example["path_hex"]) if "path_hex" in example else example["path"].encode()
        commit = example["commit"]
        new_blob = _rev(repo, f"{commit}:".encode() + raw_path)
        old_blob = _rev(repo, f"{commit}^:".encode() + raw_path) if example["parent"] else None
        assert example["new_blob"] == new_blob, example["qualified_name"]
        assert example["old_blob"] == old_blob, example["qualified_name"]
        if example["change_kind"] in ("added", "modified"):
            _check_span(_blob(repo, example["new_blob"]), example["new_span"], example["after"])
        else:
            assert example["new_span"] is None
        if example["change_kind"] in ("modified", "deleted"):
            _check_span(_blob(repo, example["old_blob"]), example["old_span"], example["before"])
        else:
            assert example["old_span"] is None


def test_methods_in_impls_and_nested_modules_keep_their_indentation(history):
    repo, oids = history
    by_name = {(e["commit"], e["qualified_name"]): e for e in _examples(repo)}
    connect = by_name[(oids[1], "net::Peer::connect")]
    assert connect["change_kind"] == "modified"
    for side, blob_field, text_field in (("new_span", "new_blob", "after"), ("old_span", "old_blob", "before")):
        span = connect[side]
        blob = _blob(repo, connect[blob_field])
        # The text starts at its doc comment; what precedes it on its line is the method's indentation.
        assert span["start_col"] == 8
        assert blob[span["start_byte"] - 8:span["start_byte"]] == b" " * 8
        assert connect[text_field].startswith("/// Opens a connection.\n")
    deep = by_name[(oids[1], "net::inner::deep")]
    assert deep["new_span"]["start_col"] == deep["old_span"]["start_col"] == 8
    close = by_name[(oids[1], "net::Peer::close")]
    assert close["change_kind"] == "added" and close["old_span"] is None and close["old_blob"] == connect["old_blob"]


def test_multibyte_text_is_measured_in_bytes(history):
    repo, oids = history
    by_name = {(e["commit"], e["qualified_name"]): e for e in _examples(repo)}
    greet = by_name[(oids[1], "greet")]
    blob = _blob(repo, greet["new_blob"])
    text = blob.decode("utf-8")
    assert len(text.encode()) != len(text)  # the file holds multi-byte characters before and inside the item
    assert greet["new_span"]["start_byte"] == len(text[:text.index("/// Crabs")].encode())
    assert greet["new_span"]["end_byte"] - greet["new_span"]["start_byte"] == len(greet["after"].encode())
    # Items after the multi-byte text: byte offsets, not character offsets.
    deep = by_name[(oids[1], "net::inner::deep")]
    assert deep["new_span"]["start_byte"] > text.index("pub fn deep")


def test_non_utf8_names_and_contents(history):
    repo, oids = history
    examples = _examples(repo)
    latin = [e for e in examples if e.get("path_hex") == b"src/caf\xe9.rs".hex()]
    assert [e["change_kind"] for e in latin] == ["added", "modified"]  # spans checked above through path_hex
    assert all(e["new_blob"] for e in latin)
    # A file whose content is not UTF-8 yields no example (its skip is recorded), so no span can be wrong.
    assert not [e for e in examples if e["path"] == "src/bytes.rs"]
    with Store(open_repo(repo, Config()).paths.store, readonly=True) as store:
        record = store.get_commit(bytes.fromhex(oids[1]))
    assert [s["reason"] for s in record["skipped_files"] if s["path"] == "src/bytes.rs"] == [
        f"non-utf8: byte {LATIN1_CONTENT.index(bytes([0xe9]))}"]


def test_identifiers_of_a_known_item(history):
    repo, oids = history
    by_name = {(e["commit"], e["qualified_name"]): e for e in _examples(repo)}
    connect = by_name[(oids[1], "net::Peer::connect")]
    assert connect["identifiers"] == ["Peer", "Frame::new", "crate::wire::checksum", "MAX_FRAME",
                                      "crate::wire::encode"]
    close = by_name[(oids[1], "net::Peer::close")]
    assert close["identifiers"] == ["Result", "fmt::Error", "helpers::flush", "Ok"]
    deleted = by_name[(oids[1], "doomed")]  # a deleted item's names are those of its old text
    assert deleted["change_kind"] == "deleted" and deleted["identifiers"] == ["Frame::SIZE", "helpers::one"]


def test_identifiers_are_deduplicated_in_order_of_use_and_bounded():
    text = "fn f(a: Alpha) -> Beta { let x = Alpha::new(); g(x); g(a); h::<u8>(); m!(CONST); Beta }"
    assert referenced_identifiers(text) == ["Alpha", "Beta", "Alpha::new", "g", "h", "m", "CONST"]
    many = "fn many() {" + "".join(f" call{n}();" for n in range(200)) + " }"
    assert referenced_identifiers(many) == [f"call{n}" for n in range(64)]
    assert referenced_identifiers(many, limit=3) == ["call0", "call1", "call2"]
    # Its own name is not a reference; a recursive call is one of its names only through a path.
    assert referenced_identifiers("struct Own { next: Option<Box<Own>> }") == ["Option", "Box", "Own"]


# Rust that exercises what the reference query and the item spans meet: attributes and doc comments before an
# item, generics and where clauses, paths with spaces, non-ASCII capitals, nested modules, trait signatures, a
# trailing comment on an item's last line, a broken item beside clean ones, and a last item ending at EOF.
TRICKY = """//! Crate docs mention Ignored::Path.
use std::{collections::HashMap, fmt};

/// Docs with `Ignored` and braces { }.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub struct Wrapper<T: fmt::Debug + Send>(pub HashMap<String, T>);

impl<T> fmt::Display for Wrapper<T> where T: fmt::Debug + Send {
    #[inline(always)]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Ñandú = Self::EMPTY; // a capital that is not ASCII
        write!(f, "{:?}", crate :: net :: Peer :: connect(Ñandú))?;
        Ok(())
    } // trailing comment on the last line
}

pub trait Store { type Key: Ord; const LIMIT: usize; fn get(&self, k: &Self::Key) -> Option<Vec<u8>>; }

pub mod outer {
    pub mod inner {
        pub fn deep<const N: usize>(xs: [u8; N]) -> super::super::Wrapper<u8> {
            let f = |x: u8| -> Option<u8> { Some(x) };
            xs.iter().copied().filter_map(f).map(Into::into).collect::<Vec<_>>();
            todo!()
        }
    }
    unsafe impl Send for crate::Wrapper<Box<dyn Fn() + 'static>> {}
}

macro_rules! table { ($($k:ident => $v:expr),*) => { HashMap::from([$((stringify!($k), $v)),*]) }; }
pub fn broken( -> u8 { 1 }
pub static MAP: std::sync::OnceLock<HashMap<&str, u8>> = std::sync::OnceLock::new();
pub fn last() -> Wrapper<u8> { Wrapper(HashMap::new()) }"""


REAL_FILES = {"tricky": TRICKY, "records-v1": LIB_V1, "records-v2": LIB_V2,
              **{f"demo-{n.lower()}": getattr(demo_repo, n) for n in ("LIB_V1", "LIB_V2", "LIB_V3", "UTIL", "RENDER",
                                                                      "NET", "BROKEN")}}


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_identifiers_from_the_files_tree_are_those_of_the_items_text(name):
    """Ingest reads an item's identifiers from its file's syntax tree (no parse per item): the same names, in the
    same order, as parsing the item's text alone, for every item of the file."""
    source = REAL_FILES[name].encode("utf-8")
    tree = parse(source)
    items = list(extract_items(source, tree).items.values())
    assert items
    for item in items:
        from_text = referenced_identifiers(item.text)
        assert item_identifiers(tree, source, item.span) == from_text, item.name
        assert item_identifiers(tree, source, item.span, limit=2) == from_text[:2], item.name
    if name == "tricky":  # the comparisons above are of real lists of names
        fmt = next(item for item in items if item.name == "<Wrapper as fmt::Display>::fmt")
        assert item_identifiers(tree, source, fmt.span) == ["fmt::Formatter", "fmt::Result", "Ñandú", "Self::EMPTY",
                                                            "write", "Peer", "Ok"]


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_identifiers_do_not_depend_on_the_query_window(name, monkeypatch):
    """The reference query runs over windows of an item (rust_items._FIRST_WINDOW_BYTES, doubling): windows of a
    few bytes, with captures and paths across every boundary, give the names one window over the item gives."""
    from gitlora.daemon import rust_items
    source = (_large_impl() + "\n" + REAL_FILES[name]).encode("utf-8")
    tree = parse(source)
    items = list(extract_items(source, tree).items.values())
    assert max(item.span.end_byte - item.span.start_byte for item in items) > 3 * rust_items._FIRST_WINDOW_BYTES
    results = []
    for window in (1 << 40, rust_items._FIRST_WINDOW_BYTES, 5):
        monkeypatch.setattr(rust_items, "_FIRST_WINDOW_BYTES", window)
        results.append([(item_identifiers(tree, source, item.span), item_identifiers(tree, source, item.span, 3),
                         referenced_identifiers(item.text, limit=500)) for item in items])
    assert results[0] == results[1] == results[2]
    assert max(len(names) for _, _, names in results[0]) > 64  # a container's names beyond the first window


def _large_impl() -> str:
    """An impl of some 20 KB whose names are spread through it (each method uses a few of its own)."""
    methods = "".join(f"    pub fn step_{n}(&mut self, input: crate::io::Input{n}) -> Result<Out{n}, Error{n % 7}> {{\n"
                      f"        let value = self.inner.compute(input, {n});\n"
                      f"        tracing::debug!(\"{{}}\", value);\n"
                      f"        Ok(Out{n}::from(value.checked_mul(KIND_{n % 5}).unwrap_or_default()))\n    }}\n"
                      for n in range(90))
    return f"pub struct Engine {{ inner: Inner }}\n\nimpl Engine {{\n{methods}}}\n"


def test_examples_are_the_same_with_or_without_syntax_trees_at_hand(history):
    """A blob whose items are cached but whose tree was evicted (or never fitted the tree cache) gets its items'
    identifiers by parsing them: the same examples as from the tree. The history has deleted items (read from
    the old blob, parsed a commit earlier) and modified ones."""
    repo, oids = history
    config = Config().ingest
    outputs = []
    for cache_bytes, tree_bytes in ((192 << 20, 256 << 20), (192 << 20, 0), (0, 0)):
        processor = CommitProcessor(GitRepo(repo), config, source="test", cache_bytes=cache_bytes,
                                    tree_bytes=tree_bytes)
        outputs.append([example for pending in processor.process(oids) for example in pending.examples])
    assert outputs[0] == outputs[1] == outputs[2]
    assert b'"change_kind":"deleted"' in b"".join(outputs[0]) and b'"identifiers":["Frame::SIZE"' in b"".join(outputs[0])


def test_new_context_is_the_new_file_around_the_item(history):
    """above + item + below is a contiguous slice of the new blob, ending right before / starting right after the
    item (its indentation is the end of `above`); deleted items have none."""
    repo, _ = history
    examples = _examples(repo)
    for example in examples:
        context = example["new_context"]
        if example["change_kind"] == "deleted":
            assert context is None
            continue
        blob = _blob(repo, example["new_blob"])
        span = example["new_span"]
        above, below = context["above"].encode(), context["below"].encode()
        assert blob[span["start_byte"] - len(above):span["end_byte"] + len(below)] == above + example[
            "after"].encode() + below
        # Small files: the whole file is kept (the budgets are larger than these files).
        assert span["start_byte"] == len(above) and span["end_byte"] + len(below) == len(blob)
        assert blob[span["start_byte"] - span["start_col"]:span["start_byte"]] == above[len(above) - span[
            "start_col"]:]


def test_new_context_is_bounded_and_cut_at_lines():
    from gitlora.daemon.examples import MIN_CONTEXT_BYTES, around
    from gitlora.daemon.rust_items import extract_items

    filler = "".join(f"// line {n} é 🦀\n" for n in range(300))
    source = (filler + "impl Foo {\n    pub fn bar(&self) -> u32 {\n        1\n    }\n}\n" + filler).encode()
    bar = next(i for k, i in extract_items(source).items.items() if k[1] == "Foo::bar")
    for budget in (MIN_CONTEXT_BYTES, 333, 1000):
        context = around(source, bar.span, budget, budget)
        above, below = context["above"].encode(), context["below"].encode()
        assert MIN_CONTEXT_BYTES <= len(above) <= budget + 3 and MIN_CONTEXT_BYTES <= len(below) <= budget + 3
        assert source[bar.span.start_byte - len(above):bar.span.start_byte] == above
        assert source[bar.span.end_byte:bar.span.end_byte + len(below)] == below
        assert above.endswith(b"impl Foo {\n    ") and below.startswith(b"\n}\n")
        if budget > 300:  # room to cut at a line boundary: whole lines only
            assert source[bar.span.start_byte - len(above) - 1] == ord("\n") and below.endswith(b"\n")
    # A single long line (no newline within the budget) is cut after a whole character, never inside one.
    long_line = ("// " + "🦀" * 400 + "\n").encode()
    source = long_line + b"fn f() {}\n" + long_line
    f = next(iter(extract_items(source).items.values()))
    context = around(source, f.span, 301, 301)
    assert 301 <= len(context["above"].encode()) <= 304 and "\ufffd" not in context["above"] + context["below"]
    assert around(source, None, 100, 100) is None


def test_a_version_whose_predecessor_was_parsed_elsewhere_reparses_from_the_paths_latest_tree(tmp_path, monkeypatch):
    """A pool worker that skipped commits (another worker took them) holds an older tree of the file: both the
    commit's old blob and its new one are parsed incrementally from it, and the examples are those of a
    processor that parsed everything in full."""
    repo = init_repo(tmp_path / "r")
    versions = [_large_impl().replace("step_", f"v{n}_step_", n + 1) for n in range(3)]
    oids = [commit_files(repo, {"src/engine.rs": text}, f"version {n}") for n, text in enumerate(versions)]
    parses: list[bool] = []
    real_parse_blob = ingest.parse_blob

    def recording(data, previous=None, hunks=None, memo=None):
        parses.append(previous is not None and hunks is not None)
        return real_parse_blob(data, previous, hunks, memo)

    config = Config().ingest
    full = CommitProcessor(GitRepo(repo), config, source="test").process(oids[2:])[0].examples
    monkeypatch.setattr(ingest, "parse_blob", recording)
    worker = CommitProcessor(GitRepo(repo), config, source="test")
    worker.process(oids[:1])
    parses.clear()
    assert worker.process(oids[2:])[0].examples == full
    assert parses == [True, True]  # the old blob from version 0's tree, the new one from the old blob's
