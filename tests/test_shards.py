"""Shards from a real store: atomic, reproducible byte for byte, temporally split."""
from __future__ import annotations

import hashlib
import json

from gitlora.daemon.shards import ShardWriter, plan_group
from gitlora.daemon.store import PendingCommit, Store


def fill(store: Store, commits: list[tuple[int, int, int]]) -> None:
    """(commit number, commit_time, examples)"""
    store.write([PendingCommit(n.to_bytes(20, "big"), {"status": "ingested"},
                               [{"commit": f"{n:040x}", "commit_time": t, "i": i} for i in range(k)])
                 for n, t, k in commits])


def test_plan_group_is_temporal_and_keeps_commits_whole():
    # seq order differs from time order (topological ingest of branches)
    examples = [(0, "a", 100), (1, "a", 100), (2, "c", 300), (3, "b", 200), (4, "b", 200), (5, "d", 50)]
    plans = plan_group(examples, shard_size=2, eval_fraction=0.25)
    assert [p.split for p in plans] == ["train", "train", "eval"]
    assert plans[-1].seqs == (2,)  # the newest commit, c
    assert plans[0].seqs == (0, 1, 5) and plans[1].seqs == (3, 4)  # d then a fill shard 1; b shard 2
    assert plan_group([(0, "a", 1), (1, "a", 1)], 8, 0.5)[0].split == "train"  # one commit: nothing held out


def test_flush_writes_atomic_shards_and_manifest(tmp_path):
    with Store(tmp_path / "store") as store:
        fill(store, [(n, 1000 + n, 3) for n in range(10)])
        writer = ShardWriter(tmp_path / "shards", tmp_path / "manifest.json", store)
        entries = writer.flush(shard_size=6, eval_fraction=0.2)
        assert [e["split"] for e in entries] == ["train"] * 4 + ["eval"]
        assert not list((tmp_path / "shards").glob(".*"))  # no temp files left
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        assert manifest["shards"] == entries
        raw = dict(store.iter_raw_examples())
        for entry in entries:
            body = (tmp_path / "shards" / entry["file"]).read_bytes()
            assert hashlib.sha256(body).hexdigest() == entry["sha256"]
            lines = body.splitlines()
            assert len(lines) == entry["count"]
            assert all(line in raw.values() for line in lines)  # exactly the stored JSON
        train_times = [t for e in entries if e["split"] == "train" for t in (e["first_commit_time"], e["last_commit_time"])]
        eval_entry = entries[-1]
        assert eval_entry["first_commit_time"] >= max(train_times)
        assert writer.flush(6, 0.2) == []  # nothing new: nothing written
        fill(store, [(20, 5000, 2)])
        more = writer.flush(6, 0.2)
        assert [e["id"] for e in more] == [6] and more[0]["first_seq"] == 30


def test_deleted_shards_reproduce_byte_for_byte(tmp_path):
    with Store(tmp_path / "store") as store:
        fill(store, [(n, 1000 - n, 2) for n in range(12)])
        writer = ShardWriter(tmp_path / "shards", tmp_path / "manifest.json", store)
        writer.flush(5, 0.1)
        fill(store, [(40, 9000, 4)])
        writer.flush(5, 0.1)
        before = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()}
        for path in (tmp_path / "shards").iterdir():
            path.unlink()
        result = writer.verify()
        assert sorted(result.rebuilt) == list(range(1, len(before) + 1)) and result.ok
        after = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()}
        assert after == before
        again = writer.verify()
        assert again.rebuilt == [] and again.ok and again.checked == len(before)


def test_a_corrupt_shard_is_detected_and_rebuilt_byte_for_byte(tmp_path):
    with Store(tmp_path / "store") as store:
        fill(store, [(n, 1000 + n, 3) for n in range(10)])
        writer = ShardWriter(tmp_path / "shards", tmp_path / "manifest.json", store)
        writer.flush(6, 0.2)
        fill(store, [(30 + n, 3000 + n, 2) for n in range(4)])
        writer.flush(6, 0.2)
        shards = tmp_path / "shards"
        original = {p.name: p.read_bytes() for p in shards.iterdir()}
        damaged = shards / "000002.jsonl"
        body = bytearray(damaged.read_bytes())
        body[10] ^= 0x01  # one flipped bit: same size, different bytes
        damaged.write_bytes(bytes(body))
        (shards / "000007.jsonl").write_bytes(b"")  # one emptied, in the second group

        report = writer.verify(rebuild=False)  # detection alone leaves the files as they are
        assert set(report.failed) == {2, 7} and "sha256" in report.failed[2] and report.rebuilt == []
        assert damaged.read_bytes() != original["000002.jsonl"]

        report = writer.verify()
        assert report.ok and sorted(report.rebuilt) == [2, 7] and report.checked == len(original)
        assert {p.name: p.read_bytes() for p in shards.iterdir()} == original
        assert "2 rebuilt" in report.summary()


def test_a_shard_the_store_cannot_reproduce_is_reported_not_accepted(tmp_path):
    with Store(tmp_path / "store") as store:
        fill(store, [(n, 1000 + n, 3) for n in range(6)])
        writer = ShardWriter(tmp_path / "shards", tmp_path / "manifest.json", store)
        writer.flush(6, 0.2)
    # The same commits stored again with other example bytes (a store rebuilt under another config).
    with Store(tmp_path / "other") as other:
        other.write([PendingCommit(n.to_bytes(20, "big"), {"status": "ingested"},
                                   [{"commit": f"{n:040x}", "commit_time": 1000 + n, "i": i, "x": 1} for i in range(3)])
                     for n in range(6)])
        (tmp_path / "shards" / "000001.jsonl").unlink()
        report = ShardWriter(tmp_path / "shards", tmp_path / "manifest.json", other).verify()
        assert not report.ok and report.failed.keys() == {1}
        assert "missing" in report.failed[1] and "differ" in report.failed[1]
        assert not (tmp_path / "shards" / "000001.jsonl").exists()  # nothing wrong written in its place
    with Store(tmp_path / "empty") as empty:  # a store that lacks the examples altogether
        report = ShardWriter(tmp_path / "shards", tmp_path / "manifest.json", empty).verify()
        assert report.failed.keys() == {1} and "holds 0 of the 18 examples" in report.failed[1]
        assert "not rebuildable (shard 1" in report.summary()


def test_shard_metadata_is_read_from_the_real_keys_only():
    from gitlora.daemon.shards import example_meta

    tricky = {"repo": "r", "before": 'let s = "\\"commit\\":\\"' + "f" * 40 + '\\"";', "commit": "a" * 40,
              "after": '"commit_time":1', "commit_time": 1234}
    assert example_meta(json.dumps(tricky, separators=(",", ":")).encode()) == ("a" * 40, 1234)
    spaced = json.dumps({"commit_time": 7, "commit": "b" * 40}).encode()  # not our compact encoding
    assert example_meta(spaced) == ("b" * 40, 7)


def test_concurrent_flushes_write_each_group_once(tmp_path):
    import threading

    with Store(tmp_path / "store") as store:
        fill(store, [(n, 1000 + n, 3) for n in range(40)])
        writer = ShardWriter(tmp_path / "shards", tmp_path / "manifest.json", store)
        results: list = []
        threads = [threading.Thread(target=lambda: results.append(writer.flush(4, 0.1))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(len(r) for r in results)[:-1] == [0, 0, 0]  # one flush took the group, the others nothing
        manifest = writer.manifest()
        assert len(manifest["groups"]) == 1
        for entry in manifest["shards"]:
            body = (tmp_path / "shards" / entry["file"]).read_bytes()
            assert hashlib.sha256(body).hexdigest() == entry["sha256"]


def item(n: int, name: str, after: str) -> dict:
    return {"commit": f"{n:040x}", "commit_time": 1000 + n, "path": "src/lib.rs", "qualified_name": name,
            "change_kind": "modified", "after": after}


def test_manifest_entries_list_their_commits_and_an_old_manifest_gets_them_once(tmp_path):
    with Store(tmp_path / "store") as store:
        store.write([PendingCommit((1).to_bytes(20, "big"), {}, [item(1, "f", "fn f() {}"), item(1, "g", "fn g() {}")]),
                     PendingCommit((2).to_bytes(20, "big"), {}, [item(2, "h", "fn h() {}")]),
                     # replays commit 1's changes (a merge of its branch): a duplicate
                     PendingCommit((3).to_bytes(20, "big"), {}, [item(3, "f", "fn f() {}"), item(3, "g", "fn g() {}")]),
                     # one of its two changes is new: not a duplicate
                     PendingCommit((4).to_bytes(20, "big"), {},
                                   [item(4, "f", "fn f() {}"), item(4, "k", "fn k() {}")])])
        writer = ShardWriter(tmp_path / "shards", tmp_path / "manifest.json", store)
        entries = writer.flush(shard_size=3)
        assert [e["split"] for e in entries] == ["train", "train"]  # no eval shard: the window is the planner's
        facts = [f for e in entries for f in e["commits"]]
        assert [(int(f["commit"], 16), f["examples"], f["time"], f["duplicate"]) for f in facts] == [
            (1, 2, 1001, False), (2, 1, 1002, False), (3, 2, 1003, True), (4, 2, 1004, False)]
        # a manifest written before commit facts existed: derived from the shard files on the first read
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        for entry in manifest["shards"]:
            del entry["commits"]
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        assert writer.manifest()["shards"] == entries
        assert json.loads((tmp_path / "manifest.json").read_text())["shards"] == entries  # persisted
