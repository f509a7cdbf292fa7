"""File names git allows but UTF-8 does not: stored losslessly, shown readably, never stopping a repository;
and the same history gives the same store through backfill's pool and the daemon's in-process ingest."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from gitlora.daemon.commands.backfill import backfill
from gitlora.daemon.config import Config
from gitlora.daemon.ingest import write_isolating
from gitlora.daemon.repos import open_repo
from gitlora.daemon.store import PendingCommit, Store

from daemonutil import DaemonProcess, gitlora, wait_stored
from gitutil import commit_files, git, init_repo

_TIMING = {"source", "timings_ms", "stored_at", "noticed_at", "symbol_index"}  # where and when, not what


def name(raw: bytes) -> str:
    """A path as the file system takes it (undecodable bytes ride along as surrogate escapes)."""
    return os.fsdecode(raw)


def latin(version: int) -> str:
    keep = "".join(f"pub fn keep{n}(x: u32) -> u32 {{\n    x.wrapping_mul({n})\n}}\n" for n in range(8))
    return f"{keep}pub fn latin() -> u8 {{\n    {version}\n}}\n"


def latin1_history(repo: Path) -> list[str]:
    """Nine commits around Latin-1 named .rs files (binary and parseable, renamed, deleted), with good files."""
    init_repo(repo)
    return [
        commit_files(repo, {"src/lib.rs": "pub fn base() -> u8 { 0 }\n"}, "base"),
        commit_files(repo, {name(b"src/b\xe9.rs"): b"x\0", "src/good.rs": "pub fn good() {}\n"}, "binary latin-1"),
        commit_files(repo, {name(b"src/c\xe9.rs"): latin(1),
                            "src/lib.rs": "pub fn base() -> u8 { 1 }\n"}, "parseable latin-1"),
        commit_files(repo, {name(b"src/c\xe9.rs"): latin(2)}, "edit latin-1"),
        _rename(repo, b"src/c\xe9.rs", b"src/d\xe9.rs", latin(3)),
        commit_files(repo, {name(b"cr\xe9ate/src/lib.rs"): "pub fn nested() {}\n"}, "latin-1 directory"),
        commit_files(repo, {name(b"src/d\xe9.rs"): None}, "delete latin-1"),
        commit_files(repo, {"src/café.rs": "pub fn utf8() {}\n", "src/lib.rs": "pub fn base() -> u8 { 2 }\n"},
                     "utf-8 name"),
        commit_files(repo, {"src/after.rs": "pub fn after() {}\n"}, "after"),
    ]


def _rename(repo: Path, old: bytes, new: bytes, text: str) -> str:
    git(repo, "mv", name(old), name(new))
    return commit_files(repo, {name(new): text}, "rename latin-1")


def read_store(repo: Path) -> tuple[dict[str, dict], list[bytes]]:
    with Store(open_repo(repo, Config()).paths.store, readonly=True) as store:
        return ({oid.hex(): record for oid, record in store.iter_commits()},
                [raw for _, raw in store.iter_raw_examples()])


def without_timing(commits: dict[str, dict]) -> dict[str, dict]:
    return {oid: {k: v for k, v in record.items() if k not in _TIMING} for oid, record in commits.items()}


@pytest.fixture
def pooled_config(isolated_home):
    """Small transactions, so nine commits make several chunks and backfill uses its process pool."""
    config = isolated_home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[ingest]\nbatch_commits = 2\nworkers = 2\nmin_item_bytes = 0\n")  # one-line items


def test_latin1_names_through_backfill_are_stored_losslessly_and_readably(tmp_path, pooled_config):
    import json

    repo = tmp_path / "latin"
    oids = latin1_history(repo)
    summary = backfill(str(repo), progress=False, workers=2)
    commits, raw_examples = read_store(repo)
    examples = [json.loads(raw) for raw in raw_examples]
    assert summary.commits == 9 and set(commits) == set(oids)
    assert [commits[o]["status"] for o in oids] == ["ingested"] * 9, [commits[o].get("reason") for o in oids]
    assert commits[oids[1]]["skipped_files"] == [
        {"path": "src/b\\xe9.rs", "path_hex": b"src/b\xe9.rs".hex(), "reason": "binary"}]
    by_commit: dict[str, list[dict]] = {}
    for example in examples:
        by_commit.setdefault(example["commit"], []).append(example)
    assert [e["qualified_name"] for e in by_commit[oids[1]]] == ["good::good"]  # the good file is kept
    latin_items = {e["qualified_name"]: e for e in by_commit[oids[2]]}
    assert set(latin_items) == {"c\\xe9::latin", "base"} | {f"c\\xe9::keep{n}" for n in range(8)}
    assert latin_items["c\\xe9::latin"]["path"] == "src/c\\xe9.rs"
    assert bytes.fromhex(latin_items["c\\xe9::latin"]["path_hex"]) == b"src/c\xe9.rs"
    assert "path_hex" not in latin_items["base"] and "old_path_hex" not in latin_items["base"]
    [renamed] = by_commit[oids[4]]
    assert (renamed["path"], renamed["old_path"]) == ("src/d\\xe9.rs", "src/c\\xe9.rs")
    assert bytes.fromhex(renamed["path_hex"]) == b"src/d\xe9.rs"
    assert bytes.fromhex(renamed["old_path_hex"]) == b"src/c\xe9.rs"
    [nested] = by_commit[oids[5]]
    assert bytes.fromhex(nested["path_hex"]) == b"cr\xe9ate/src/lib.rs"
    assert nested["qualified_name"] == "cr\\xe9ate::nested"
    deleted = by_commit[oids[6]]
    assert len(deleted) == 9 and {e["change_kind"] for e in deleted} == {"deleted"}
    assert {bytes.fromhex(e["path_hex"]) for e in deleted} == {b"src/d\xe9.rs"}
    utf8 = next(e for e in by_commit[oids[7]] if e["qualified_name"] == "café::utf8")
    assert utf8["path"] == "src/café.rs" and "path_hex" not in utf8  # valid UTF-8 names need no bytes
    assert [e["qualified_name"] for e in by_commit[oids[8]]] == ["after::after"]
    for raw in raw_examples:
        raw.decode("utf-8")  # every stored byte is UTF-8 text


def test_daemon_and_backfill_store_the_same_latin1_history_and_later_commits(tmp_path, pooled_config,
                                                                               monkeypatch):
    repo = tmp_path / "latin"
    oids = latin1_history(repo)
    monkeypatch.setenv("GITLORA_STATE_HOME", str(tmp_path / "backfill-state"))
    backfill(str(repo), progress=False, workers=2)  # the pool: several chunks, two workers
    pooled_commits, pooled_examples = read_store(repo)
    monkeypatch.delenv("GITLORA_STATE_HOME")
    daemon = DaemonProcess().start()
    try:
        gitlora("install", str(repo))  # the daemon ingests the nine commits in-process: one small run
        wait_stored(repo, oids, timeout=60)
        commits, examples = read_store(repo)
        assert without_timing(commits) == without_timing(pooled_commits)
        assert examples == pooled_examples  # byte for byte
        assert {r["source"] for r in commits.values()} == {"daemon"}
        # and the repository keeps going: another poison name, then ordinary commits
        later = [commit_files(repo, {name(b"src/z\xfc.rs"): b"\0\1", "src/more.rs": "pub fn more() {}\n"},
                              "another latin-1 binary"),
                 commit_files(repo, {"src/last.rs": "pub fn last() {}\n"}, "last")]
        stored = wait_stored(repo, later, timeout=60)
        assert stored[later[0]]["skipped_files"] == [
            {"path": "src/z\\xfc.rs", "path_hex": b"src/z\xfc.rs".hex(), "reason": "binary"}]
        assert all(stored[o]["status"] == "ingested" for o in later)
        assert daemon.status()["repos"][0]["errors"] == []
    finally:
        daemon.stop()
        daemon.kill()


def test_a_record_the_store_cannot_encode_costs_only_its_commit(tmp_path):
    """The writer's last line of defence: one commit's unwritable record is stored as that commit's skip, with
    the reason; the commits around it are stored as they are."""
    good = [PendingCommit(bytes([n]) * 20, {"status": "ingested", "commit_time": n}, [b'{"n":%d}' % n])
            for n in (1, 3)]
    poison = PendingCommit(bytes([2]) * 20, {"status": "ingested", "commit_time": 2,
                                             "skipped_files": [{"path": "src/b\udce9.rs", "reason": "binary"}]},
                           [b'{"n":2}'])
    with Store(tmp_path / "store") as store:
        result, written = write_isolating(store, [good[0], poison, good[1]])
        assert result.stored == 3 and result.examples == 2
        assert [p.record["status"] for p in written] == ["ingested", "skipped", "ingested"]
        records = {oid.hex(): record for oid, record in store.iter_commits()}
        assert records[poison.oid.hex()]["status"] == "skipped"
        assert records[poison.oid.hex()]["reason"].startswith("unstorable record: UnicodeEncodeError")
        assert records[poison.oid.hex()]["commit_time"] == 2
        assert [raw for _, raw in store.iter_raw_examples()] == [b'{"n":1}', b'{"n":3}']
        # written again (a restart): nothing twice, nothing retried
        again, _ = write_isolating(store, [good[0], poison, good[1]])
        assert again.stored == 0 and again.already_present == 3
