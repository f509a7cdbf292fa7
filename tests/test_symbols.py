"""Cross-file context: definitions per blob, the symbol index ingest keeps commit by commit (real git histories,
a real store, a real daemon), resolution through `use` paths, and the blocks the trainer renders before a file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gitlora.daemon.commands.backfill import backfill
from gitlora.daemon.commands.stats import collect
from gitlora.daemon.config import Config
from gitlora.daemon.ingest import Ingestor
from gitlora.daemon.repos import open_repo
from gitlora.daemon.rust_items import parse
from gitlora.daemon.store import Store
from gitlora.daemon.symbols import MAX_DEF_BYTES, LookupMemo, NameIndex, definitions, resolve
from gitlora.trainer import data

from daemonutil import DaemonProcess, gitlora, store_commits, store_examples, wait_stored
from gitutil import commit_files, git, init_repo


def defs_of(text: str):
    source = text.encode()
    return definitions(source, parse(source))


# ----------------------------------------------------------------------------------------------- skeletons
SOURCE = """\
use std::fmt;

/// A peer we talk to.
#[derive(Debug, Clone)]
pub struct Peer<T: Clone> {
    pub addr: String,
    port: u16,
    extra: T,
}

pub enum State { Idle, Busy(u32) }

impl<T: Clone> Peer<T> {
    /// Makes one.
    pub fn new(addr: String, port: u16, extra: T) -> Self {
        Peer { addr, port, extra }
    }

    fn secret(&self) -> u16 { self.port }
}

impl fmt::Display for Peer<u8> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result { write!(f, "{}", self.addr) }
}

pub trait Transport: Send {
    type Error;
    fn send(&mut self, bytes: &[u8]) -> Result<usize, Self::Error>;
    fn flush(&mut self) { }
}

#[inline]
pub fn connect(addr: &str) -> Option<Peer<u8>> where Peer<u8>: Clone {
    None
}

macro_rules! log_peer { ($p:expr) => { println!("{}", $p.addr) }; }

pub const MAX_PEERS: usize = 64;

pub mod wire {
    pub type Frame = Vec<u8>;
    pub fn encode(frame: &Frame) -> Vec<u8> { frame.clone() }
}
"""


def test_skeletons_are_signatures_and_definitions_without_bodies_or_docs():
    found = [(d.name, d.kind, d.scope, d.text) for d in defs_of(SOURCE)]
    assert found == [
        ("Peer", "struct", "", "pub struct Peer<T: Clone> {\n    pub addr: String,\n    port: u16,\n    extra: T,\n}"),
        ("State", "enum", "", "pub enum State { Idle, Busy(u32) }"),
        # an inherent impl: its header and method signatures, indexed under the type's name
        ("Peer", "impl", "", "impl<T: Clone> Peer<T> {\n    pub fn new(addr: String, port: u16, extra: T) -> Self;\n"
                             "    fn secret(&self) -> u16;\n}"),
        # a trait's impl says only that it exists (its signatures are the trait's)
        ("Peer", "impl", "", "impl fmt::Display for Peer<u8> { ... }"),
        ("Transport", "trait", "", "pub trait Transport: Send {\n    type Error;\n"
                                   "    fn send(&mut self, bytes: &[u8]) -> Result<usize, Self::Error>;\n"
                                   "    fn flush(&mut self);\n}"),
        ("connect", "fn", "", "pub fn connect(addr: &str) -> Option<Peer<u8>> where Peer<u8>: Clone;"),
        ("log_peer", "macro", "", "macro_rules! log_peer { ... }"),
        ("MAX_PEERS", "const", "", "pub const MAX_PEERS: usize = 64;"),
        ("Frame", "type", "wire", "pub type Frame = Vec<u8>;"),
        ("encode", "fn", "wire", "pub fn encode(frame: &Frame) -> Vec<u8>;"),
    ]


def test_a_long_definition_is_cut_at_a_field_boundary():
    fields = "".join(f"    pub field_number_{n}: u64,\n" for n in range(60))
    (struct,) = defs_of(f"pub struct Wide {{\n{fields}}}\n")
    assert len(struct.text.encode()) <= MAX_DEF_BYTES
    assert struct.text.endswith(", ...}")
    kept = struct.text.removesuffix(", ...}")
    assert kept.endswith("u64") and f"pub struct Wide {{\n{fields}".startswith(kept)


# ----------------------------------------------------------------------------------------------- resolution
def index_of(files: dict[str, str]) -> NameIndex:
    index = NameIndex()
    for n, (path, text) in enumerate(files.items()):
        index.put(path, f"{n:040x}", defs_of(text))
    return index


FILES = {
    "node/src/config.rs": "pub struct Config { pub node_port: u16 }\n",
    "wallet/src/config.rs": "pub struct Config { pub wallet_key: String }\n",
    "node/src/util.rs": "pub fn helper(x: u32) -> u32 { x }\n",
    "wallet/src/util.rs": "pub fn helper(y: u64) -> u64 { y }\n",
    **{f"c{n}/src/common.rs": f"pub struct Common{{ v{n}: u8 }}\n" for n in range(4)},
    "node/src/net.rs": "pub struct Conn { pub open: bool }\nimpl Config { pub fn local() -> Self { todo!() } }\n",
}


def paths_of(resolution) -> list[str]:
    return [block["path"] for block in resolution.blocks]


def test_use_paths_decide_then_the_crate_and_ambiguous_names_are_skipped():
    index = index_of(FILES)
    found = resolve(index, "node/src/main.rs", ["Config", "helper", "Common"], ["use wallet::config::Config;"])
    # Config through its `use` path (another crate's), helper from the item's own crate, Common (four crates
    # define it, none of them this one) skipped rather than guessed.
    assert paths_of(found) == ["wallet/src/config.rs", "node/src/util.rs"]
    assert "wallet_key" in found.blocks[0]["text"] and "x: u32" in found.blocks[1]["text"]
    assert found.referencing
    plain = resolve(index, "node/src/main.rs", ["Config"], [])
    # Without the import, the same crate's Config, and the impl another file of the crate holds for it.
    assert paths_of(plain) == ["node/src/config.rs", "node/src/net.rs"]
    assert plain.blocks[1]["text"].startswith("impl Config {")
    aliased = resolve(index, "node/src/main.rs", ["Wc::default"], ["use wallet::config::{self, Config as Wc};"])
    assert paths_of(aliased) == ["wallet/src/config.rs"]
    assert not resolve(index, "node/src/main.rs", ["HashMap", "String::new"], ["use std::collections::HashMap;"]
                       ).referencing


def test_lookups_kept_across_commits_follow_the_names_that_changed():
    """The symbol index keeps what identifiers name from commit to commit and forgets the lookups that read a
    name whose definitions changed: every resolution equals a fresh one."""
    index = index_of(FILES)
    memo = LookupMemo()
    item, imports = "node/src/main.rs", ["use wallet::config::Config;"]
    names = ["Config", "helper", "Conn", "Common"]
    assert resolve(index, item, names, imports, memo=memo) == resolve(index, item, names, imports)
    assert len(memo) == 4
    index.take_changed()
    # Conn now also defined in the item's own file (local: no block); helper moved to another file; the rest kept.
    index.put(item, "b-main", defs_of("pub struct Conn { x: u8 }\n"))
    index.remove("node/src/util.rs")
    index.put("node/src/helpers.rs", "b-helpers", defs_of("pub fn helper(y: u64) -> u64 { y }\n"))
    stale = resolve(index, item, names, imports, memo=memo)
    memo.forget(index.take_changed())
    assert len(memo) == 2  # Config's and Common's lookups read no changed name
    fresh = resolve(index, item, names, imports)
    assert resolve(index, item, names, imports, memo=memo) == fresh != stale
    assert paths_of(fresh) == ["wallet/src/config.rs", "node/src/helpers.rs"]


def test_a_definition_of_the_items_own_file_is_not_a_cross_file_block():
    index = index_of(FILES)
    found = resolve(index, "node/src/config.rs", ["Config"], [])
    assert found.blocks == [] and not found.referencing
    # A file holding only an impl of a type defined elsewhere still gets the type's definition.
    found = resolve(index, "node/src/net.rs", ["Config"], [])
    assert paths_of(found) == ["node/src/config.rs"]


def test_the_byte_budget_holds_and_zero_turns_it_off():
    files = {f"node/src/m{n}.rs": f"pub struct Item{n} {{ pub value_{n}: [u8; 32], pub label_{n}: String }}\n"
             for n in range(12)}
    index = index_of(files)
    names = [f"Item{n}" for n in range(12)]
    for budget in (100, 250, 700):
        found = resolve(index, "node/src/main.rs", names, [], budget)
        used = sum(len(f"<file_sep>{b['path']}\n".encode()) + len(b["text"].encode()) for b in found.blocks)
        assert 0 < used <= budget and found.referencing
        assert paths_of(found) == [f"node/src/m{n}.rs" for n in range(len(found.blocks))]  # order of first use
    assert resolve(index, "node/src/main.rs", names, [], 0).blocks == []


# ------------------------------------------------------------------------------- the index, commit by commit
def run_fn(version: int, use: str = "crate::net::Peer", call: str = "Peer") -> str:
    return (f"use {use};\n\npub fn run_the_node_loop(addr: String) -> usize {{\n"
            f"    let peer = {call}::new(addr);\n    peer.addr.len() + {version}\n}}\n")


def peer_file(fields: str) -> str:
    return (f"pub struct Peer {{\n    pub addr: String,{fields}\n}}\n\nimpl Peer {{\n"
            "    pub fn new(addr: String) -> Self {\n        Peer { addr, ..Default::default() }\n    }\n}\n")


def history(repo: Path) -> dict[str, str]:
    """main: add a definition, modify it, rename its file, delete it; side (from the first commit): use it as it
    was there, then add a definition in a new file."""
    init_repo(repo)
    oids = {"add": commit_files(repo, {"src/lib.rs": "pub mod net;\npub mod app;\n", "src/net.rs": peer_file(""),
                                       "src/app.rs": run_fn(1)}, "add Peer and its user")}
    oids["modify"] = commit_files(repo, {"src/net.rs": peer_file("\n    pub port: u16,"), "src/app.rs": run_fn(2)},
                                  "Peer gains a port")
    oids["rename"] = commit_files(repo, {"src/net.rs": None, "src/peer.rs": peer_file("\n    pub port: u16,"),
                                         "src/lib.rs": "pub mod peer;\npub mod app;\n",
                                         "src/app.rs": run_fn(3, "crate::peer::Peer")}, "net.rs becomes peer.rs")
    oids["delete"] = commit_files(repo, {"src/peer.rs": "pub fn unrelated_helper() -> u8 {\n    7\n}\n",
                                         "src/app.rs": run_fn(4, "crate::peer::Peer")}, "Peer is gone")
    git(repo, "checkout", "-q", "-b", "side", oids["add"])
    oids["side"] = commit_files(repo, {"src/app.rs": run_fn(5)}, "side: use Peer as it was")
    oids["side_add"] = commit_files(repo, {"src/extra.rs": "pub fn checksum_of(data: &[u8]) -> u32 {\n    0\n}\n",
                                           "src/app.rs": run_fn(6, "crate::extra::checksum_of", "Peer")
                                           .replace("peer.addr.len()", "checksum_of(b\"x\") as usize")},
                                    "side: a new definition in a new file")
    git(repo, "checkout", "-q", "main")
    return oids


def run_examples(repo: Path) -> dict[str, dict]:
    """The stored example of `run_the_node_loop`, by commit."""
    return {e["commit"]: e for e in store_examples(repo) if e["qualified_name"].endswith("run_the_node_loop")}


def test_the_index_follows_added_modified_renamed_deleted_definitions_and_a_branch_switch(tmp_path):
    repo = tmp_path / "crate"
    oids = history(repo)
    backfill(str(repo), progress=False, workers=1)
    runs = run_examples(repo)
    blocks = {name: runs[oid]["cross_file"] for name, oid in oids.items()}
    assert [b["path"] for b in blocks["add"]] == ["src/net.rs"]
    assert "pub addr: String" in blocks["add"][0]["text"] and "port" not in blocks["add"][0]["text"]
    assert "pub fn new(addr: String) -> Self;" in blocks["add"][0]["text"]
    assert [b["path"] for b in blocks["modify"]] == ["src/net.rs"] and "pub port: u16" in blocks["modify"][0]["text"]
    assert [b["path"] for b in blocks["rename"]] == ["src/peer.rs"]
    assert blocks["delete"] == []  # Peer is defined nowhere any more
    # The side branch's parent is the first commit, whatever the index held before it: Peer as it was there.
    assert blocks["side"] == blocks["add"]
    # The imported name first, then the others in order of use (Peer, still called, is not imported there).
    assert [b["path"] for b in blocks["side_add"]] == ["src/extra.rs", "src/net.rs"]
    assert blocks["side_add"][0]["text"] == "pub fn checksum_of(data: &[u8]) -> u32;\n"
    commits = store_commits(repo)
    # One of the branches was ingested after the other: the index moved by a tree diff, parsing nothing.
    moves = [commits[oid]["symbol_index"] for oid in oids.values() if "symbol_index" in commits[oid]]
    assert moves and all(m["parsed"] == 0 and m["moved_files"] > 0 for m in moves)
    assert commits[oids["delete"]]["cross_file_referencing"] == 0
    assert commits[oids["modify"]]["cross_file_resolved"] == commits[oids["modify"]]["cross_file_referencing"] >= 1
    opened = open_repo(repo, Config())
    with Store(opened.paths.store, readonly=True) as store:
        stats = collect(store)["cross_file"]
    assert stats["referencing"] >= 5 and stats["rate"] == 1.0 and stats["bytes_per_resolved"] > 0


def test_a_referenced_definition_from_another_file_appears_in_the_rendered_prompt(tmp_path):
    repo = tmp_path / "crate"
    oids = history(repo)
    backfill(str(repo), progress=False, workers=1)
    example = run_examples(repo)[oids["modify"]]
    prompt, target = data.render(example, edit_share=0.0)
    skeleton = example["cross_file"][0]["text"]
    assert prompt.startswith(f"<repo_name>crate<file_sep>src/net.rs\n{skeleton}<file_sep><fim_prefix>src/app.rs\n")
    assert "pub port: u16" in prompt and "Peer { addr, ..Default::default() }" not in prompt  # no bodies
    edit, _ = data.render(example, edit_share=1.0)
    assert edit.startswith(f"<repo_name>crate<file_sep>src/net.rs\n{skeleton}<file_sep>src/app.rs\n")
    # The ablation's switch: the same record without its context renders as one without the field.
    bare = {k: v for k, v in example.items() if k != "cross_file"}
    off = data.RenderOptions(edit_share=0.0, cross_file=False)
    assert data.rendering(example, off).prompt == data.rendering(bare, data.RenderOptions(edit_share=0.0)).prompt
    assert "src/net.rs" not in data.rendering(example, off).prompt


def ingest(repo: Path, config: Config) -> Ingestor:
    opened = open_repo(repo, config)
    with Store(opened.paths.store) as store:
        ingestor = Ingestor(opened.git, store, config.ingest, workers=1)
        ingestor.run(ingestor.pending())
    return ingestor


def test_a_restart_rebuilds_the_index_from_the_store_without_parsing(tmp_path):
    repo = init_repo(tmp_path / "crate")
    files = {f"src/m{n}.rs": f"pub struct Thing{n} {{ pub value: u{8 << (n % 3)} }}\n" for n in range(6)}
    commit_files(repo, {**files, "src/app.rs": "pub fn unrelated_start() -> u32 {\n    1 + 2 + 3 + 4 + 5\n}\n"},
                 "things")
    off = Config.model_validate({"ingest": {"cross_file_bytes": 0}})
    ingest(repo, off)  # no definitions stored
    user = commit_files(repo, {"src/app.rs": "pub fn use_two_things() -> u32 {\n    Thing1::default();\n"
                                             "    Thing4::default();\n    0\n}\n"}, "uses")
    first = ingest(repo, Config())
    record = store_commits(repo)[user]
    # The first commit with context on: a fresh index, the parent's tree never parsed for definitions. The six
    # unchanged files are parsed here; app.rs's old version was parsed by the worker, which returned it.
    assert record["symbol_index"] == {"moved_files": 7, "parsed": 6} and first.symbols.parsed == 6
    later = commit_files(repo, {"src/app.rs": "pub fn use_two_things() -> u32 {\n    Thing2::default();\n"
                                              "    Thing5::default();\n    1\n}\n"}, "uses others")
    again = ingest(repo, Config())  # a new process: its index starts empty, and is rebuilt from the store
    assert store_commits(repo)[later]["symbol_index"] == {"moved_files": 7, "parsed": 0} and again.symbols.parsed == 0
    (example,) = [e for e in store_examples(repo) if e["commit"] == later]
    assert [b["path"] for b in example["cross_file"]] == ["src/m2.rs", "src/m5.rs"]


def test_the_daemon_after_a_restart_resolves_from_the_stored_index(tmp_path, isolated_home):
    repo = init_repo(tmp_path / "work")
    commit_files(repo, {"src/lib.rs": "pub mod net;\npub mod app;\n", "src/net.rs": peer_file("")}, "base")
    gitlora("install", "--no-backfill", str(repo))
    process = DaemonProcess().start()
    try:
        first = commit_files(repo, {"src/app.rs": run_fn(1)}, "user")
        wait_stored(repo, [first])
    finally:
        process.stop()
    process = DaemonProcess().start()
    try:
        second = commit_files(repo, {"src/app.rs": run_fn(2)}, "user again")
        record = wait_stored(repo, [second])[second]
    finally:
        process.stop()
    assert record["symbol_index"] == {"moved_files": 3, "parsed": 0}  # rebuilt from the store, nothing parsed
    assert record["cross_file_resolved"] == 1
    assert [b["path"] for b in run_examples(repo)[second]["cross_file"]] == ["src/net.rs"]
    assert json.loads(gitlora("stats", "--json", str(repo)).stdout)["cross_file"]["rate"] == 1.0


def test_a_shallow_clone_parses_the_boundary_tree_once_for_its_definitions(tmp_path):
    """The boundary commit is stored as skipped (its parents are cut off), so its files were never parsed: the
    next commit's index is built from that tree, parsing its blobs once (in a spawned process)."""
    origin = tmp_path / "origin"
    oids = history(origin)
    shallow = tmp_path / "shallow"
    git(tmp_path, "clone", "-q", "--depth", "2", f"file://{origin}", str(shallow))
    backfill(str(shallow), progress=False, workers=1)
    commits = store_commits(shallow)
    assert commits[oids["rename"]]["status"] == "skipped" and commits[oids["delete"]]["status"] == "ingested"
    assert not any("symbol_index_error" in record for record in commits.values())
    # The three files of the boundary tree: lib.rs parsed here, the two the commit changes by its worker.
    assert commits[oids["delete"]]["symbol_index"] == {"moved_files": 3, "parsed": 1}
    with Store(open_repo(shallow, Config()).paths.store, readonly=True) as store:
        blob = git(shallow, "rev-parse", f"{oids['rename']}:src/lib.rs")
        assert store.get_definitions([blob]) == {blob: b"[]"}  # stored: never parsed again (no items: none)


_NESTED = b"""pub fn top() {}
mod a { pub struct A1; mod deep { pub fn a_deep() {} mod deeper { pub const X: u8 = 1; } } pub fn a2() {} }
pub struct Middle { x: u32 }
mod b { pub enum B1 { V } mod inner { pub trait BInner { fn f(&self); } } }
impl Middle { pub fn new() -> Self { Middle { x: 0 } } }
"""


def _queue_order(source: bytes) -> list:
    """The order `definitions` promises, as a plain queue walk: breadth first through inline modules."""
    from gitlora.daemon.symbols import _definition, _name

    found, pending = [], [(parse(source).root_node.named_children, "")]
    while pending:
        children, scope = pending.pop(0)
        for node in children:
            definition = _definition(node, source, scope)
            if definition is not None:
                found.append(definition)
            elif node.type == "mod_item" and node.child_by_field_name("body") is not None:
                name = _name(node, source)
                pending.append((node.child_by_field_name("body").named_children, f"{scope}::{name}" if scope else name))
    return found


@pytest.mark.parametrize("limit", [256, 5])
def test_definitions_from_the_memo_keep_the_breadth_first_order_and_the_cap(limit, monkeypatch):
    """Top-level nodes met before come from the memo level by level; the file's definitions are the
    same, in the same order (all top-level ones, then one module deep, ...), and capped alike."""
    from gitlora.daemon import symbols
    from gitlora.daemon.memo import ByteLRU

    memo = ByteLRU(16 << 20)
    monkeypatch.setattr(symbols, "MAX_DEFS_PER_BLOB", limit)
    moved = b"pub fn added_first() {}\n" + _NESTED.replace(b"pub fn a2() {}", b"pub fn a2() -> u8 { 2 }")
    for source in (_NESTED, moved, moved):
        expected = _queue_order(source)[:limit]
        assert symbols.definitions(source, parse(source), memo) == expected
        assert symbols.definitions(source, parse(source)) == expected  # without a memo
    assert [d.name for d in _queue_order(_NESTED)][:4] == ["top", "Middle", "Middle", "A1"]
    assert len(memo) == 5 + 2  # the five nodes of the first version, two of the second
