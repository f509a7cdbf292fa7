"""The LMDB store on a real environment: exactly-once, append-only, growing, schema-guarded."""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import lmdb
import pytest

from gitlora.daemon.memory import drop_mapped_pages, release_memory
from gitlora.daemon.store import SCHEMA_VERSION, PendingCommit, Store, StoreDamaged, StoreError, check_data_file


def oid(n: int) -> bytes:
    return n.to_bytes(20, "big")


def proc_status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def pending(n: int, examples: int) -> PendingCommit:
    return PendingCommit(oid(n), {"status": "ingested"}, [{"commit": n, "i": i} for i in range(examples)])


def test_commit_and_examples_are_stored_once_with_sequential_keys(tmp_path):
    with Store(tmp_path / "s") as store:
        first = store.write([pending(1, 3), pending(2, 0), pending(1, 5)])
        again = store.write([pending(2, 4), pending(3, 2)])
        assert (first.stored, first.already_present, first.examples) == (2, 1, 3)
        assert (again.stored, again.already_present, again.examples) == (1, 1, 2)
        assert [(seq, e["commit"]) for seq, e in store.iter_examples()] == [(0, 1), (1, 1), (2, 1), (3, 3), (4, 3)]
        assert store.get_commit(oid(1))["first_seq"] == 0 and store.get_commit(oid(1))["last_seq"] == 2
        assert store.get_commit(oid(2))["examples"] == 0
        assert store.known_commits([oid(1), oid(4)]) == {oid(1)}
        assert store.counters() == {"commits_ingested": 3, "examples": 5}
        assert [seq for seq, _ in store.iter_examples(3)] == [3, 4]


def test_map_full_grows_and_retries_the_whole_transaction(tmp_path):
    with Store(tmp_path / "s", map_size=1 << 20) as store:
        store.env.set_mapsize(1 << 20)
        big = [PendingCommit(oid(n), {"status": "ingested"}, [{"text": "x" * 50_000}] * 10) for n in range(10)]
        result = store.write(big)
        assert result.stored == 10 and result.examples == 100
        assert store.env.info()["map_size"] > 1 << 20
        assert sum(1 for _ in store.iter_examples()) == 100


def test_a_failed_transaction_leaves_nothing_behind(tmp_path):
    with Store(tmp_path / "s") as store:
        bad = PendingCommit(b"short", {"status": "ingested"}, [])
        with pytest.raises(StoreError):
            store.write([pending(1, 2), bad])
        assert store.known_commits([oid(1)]) == set()
        assert list(store.iter_examples()) == []


def test_out_of_order_append_is_detected_not_ignored(tmp_path):
    with Store(tmp_path / "s") as store:
        store.write([pending(1, 2)])
        with store.env.begin(write=True) as txn:  # corrupt the counter behind the store's back
            txn.put(b"next_seq", b"0", db=store._meta)
        with pytest.raises(StoreError, match="out of order"):
            store.write([pending(2, 1)])
        assert store.known_commits([oid(2)]) == set()


def test_newer_schema_is_a_clear_error(tmp_path):
    with Store(tmp_path / "s") as store:
        with store.env.begin(write=True) as txn:
            txn.put(b"schema_version", str(SCHEMA_VERSION + 1).encode(), db=store._meta)
    with pytest.raises(StoreError, match="newer than this gitlora"):
        Store(tmp_path / "s")


def test_readonly_store(tmp_path):
    with pytest.raises(StoreError, match="no store"):
        Store(tmp_path / "missing", readonly=True)
    with Store(tmp_path / "s") as store:
        store.write([pending(1, 1)])
    with Store(tmp_path / "s", readonly=True) as reader:
        assert reader.counters()["examples"] == 1
        with pytest.raises(StoreError):
            reader.write([pending(2, 1)])
    assert isinstance(lmdb.version(), tuple)


def test_reader_of_a_half_created_store_gets_a_clear_error(tmp_path):
    env = lmdb.open(str(tmp_path / "s"), max_dbs=4)  # the file exists, the named databases do not yet
    env.close()
    with pytest.raises(StoreError, match="not initialised"):
        Store(tmp_path / "s", readonly=True)
    with Store(tmp_path / "s") as store:  # a writer completes it
        assert store.counters() == {"examples": 0}


def test_a_map_grown_by_another_process_is_adopted(tmp_path):
    """A backfill next to the daemon grows the map; the daemon's next transactions must adopt the new size."""

    with Store(tmp_path / "s", map_size=1 << 20) as store:
        store.env.set_mapsize(1 << 20)
        store.write([pending(1, 1)])
        grow = (
            "import sys; sys.path[:0] = %r\n"
            "from gitlora.daemon.store import Store, PendingCommit\n"
            "with Store(%r) as s:\n"
            "    s.write([PendingCommit(n.to_bytes(20, 'big'), {'status': 'ingested'}, [{'t': 'x' * 40000}] * 20)"
            " for n in range(100, 140)])\n"
        ) % (sys.path, str(tmp_path / "s"))
        subprocess.run([sys.executable, "-c", grow], check=True)
        assert store.counters()["examples"] == 1 + 40 * 20  # reads see the other process's data
        store.write([pending(2, 3)])  # and writes go on
        assert store.known_commits([oid(2), oid(100)]) == {oid(2), oid(100)}
        assert sum(1 for _ in store.iter_examples()) == 1 + 800 + 3


def test_released_map_pages_leave_rss_and_data_intact(tmp_path):
    with Store(tmp_path / "s") as store:
        store.write([PendingCommit(oid(n), {"status": "ingested"}, [{"t": "y" * 4000}] * 50) for n in range(100)])
        assert sum(len(e["t"]) for _, e in store.iter_examples()) == 5000 * 4000  # touches every page
        before = proc_status_kb("RssFile")
        assert drop_mapped_pages(store.path / "data.mdb") > 0
        assert proc_status_kb("RssFile") < before - 10_000  # ~20 MB of map no longer resident
        assert store.counters()["examples"] == 5000 and next(store.iter_examples())[1]["t"] == "y" * 4000


def test_reopening_after_a_big_write_frees_lmdb_dirty_pages_and_keeps_working(tmp_path):
    """LMDB keeps each page a write transaction dirtied on a free list until the environment closes: one
    big commit (~13k examples under 2 KB, so single pages) would pin ~20 MB of a daemon's heap for good."""
    with Store(tmp_path / "s") as store:
        store.write([pending(1, 2)])
        assert not store.release_write_buffers()  # a few hundred bytes: nothing worth a reopen
        store.write([PendingCommit(oid(2), {"status": "ingested"}, [{"t": "z" * 1500, "i": i} for i in range(15_000)])])
        release_memory()  # what the daemon does after a burst: the pages stay, LMDB still holds them
        before = proc_status_kb("RssAnon")
        assert store.release_write_buffers()
        assert store.counters()["examples"] == 15_002 and store.known_commits([oid(1), oid(2)]) == {oid(1), oid(2)}
        release_memory()  # LMDB free()d them; glibc hands free heap pages back on trim
        assert proc_status_kb("RssAnon") < before - 10_000  # ~15k dirtied pages (~22 MB) handed back
        assert not store.release_write_buffers()  # counted from the reopen
        store.write([pending(3, 4)])
        assert store.counters() == {"commits_ingested": 3, "examples": 15_006}
        assert [seq for seq, _ in store.iter_examples(15_000)] == list(range(15_000, 15_006))


# -- damaged files: a clear StoreDamaged before anything is mapped, never a SIGBUS --------------------------

def _filled_store(path) -> int:
    with Store(path) as store:
        for batch in range(10):
            store.write([PendingCommit(oid(batch * 100 + n), {"status": "ingested"},
                                       [{"i": i, "t": "x" * 300} for i in range(20)]) for n in range(10)])
    return (path / "data.mdb").stat().st_size


def _damage(data, how: str, size: int) -> None:
    if how == "truncated":  # a crash or a full disk after the file was cut short
        os.truncate(data, size // 2)
    elif how == "empty":
        os.truncate(data, 0)
    elif how == "garbage pages":  # every page after the two meta pages overwritten
        with open(data, "r+b") as handle:
            handle.seek(2 * 4096)
            handle.write(bytes(random.Random(3).randrange(256) for _ in range(size - 2 * 4096)))
    elif how == "garbage meta":
        with open(data, "r+b") as handle:
            handle.write(bytes(random.Random(4).randrange(256) for _ in range(2 * 4096)))
    elif how == "one garbage page":  # the tree's pages are fine up to one leaf: found on the first read of it
        with open(data, "r+b") as handle:
            handle.seek(10 * 4096)
            handle.write(b"\xa5" * 4096)


_OPEN_AND_READ = (
    "import sys; sys.path[:0] = %r\n"
    "from gitlora.daemon.store import Store, StoreDamaged\n"
    "try:\n"
    "    with Store(%r, readonly=%r) as store:\n"
    "        store.counters(); list(store.iter_commits()); list(store.iter_examples())\n"
    "except StoreDamaged as exc:\n"
    "    print(exc)\n"
    "    sys.exit(1)\n"
)


@pytest.mark.parametrize("how, reason", [
    ("truncated", r"data.mdb is truncated: \d+ bytes, but its pages reach \d+"),
    ("empty", "data.mdb is empty"),
    ("garbage pages", r"LMDB cannot read its pages \(.*MDB_CORRUPTED"),
    ("garbage meta", "meta page 0 of data.mdb is not an LMDB meta page"),
    ("one garbage page", r"LMDB cannot read its pages \(.*MDB_"),
])
@pytest.mark.parametrize("readonly", [True, False])
def test_a_damaged_data_file_is_a_one_line_error_not_a_crash(tmp_path, how, reason, readonly):
    """In a child process: a SIGBUS would kill it (exit -7), which no exception handler can catch."""
    size = _filled_store(tmp_path / "s")
    _damage(tmp_path / "s" / "data.mdb", how, size)
    done = subprocess.run([sys.executable, "-c", _OPEN_AND_READ % (sys.path, str(tmp_path / "s"), readonly)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert done.stderr == ""
    line = done.stdout.rstrip("\n")
    assert "\n" not in line
    assert re.fullmatch(f"store at {re.escape(str(tmp_path / 's'))} is damaged: .*{reason}.*", line)


def test_a_sound_store_passes_the_check_and_a_growing_one_too(tmp_path):
    size = _filled_store(tmp_path / "s")
    check_data_file(tmp_path / "s")
    with Store(tmp_path / "s") as store:  # grown after the check: the file only ever gets longer
        store.write([pending(5000, 2000)])
        check_data_file(tmp_path / "s")
    assert (tmp_path / "s" / "data.mdb").stat().st_size > size
    os.truncate(tmp_path / "s" / "data.mdb", (tmp_path / "s" / "data.mdb").stat().st_size - 4096)
    with pytest.raises(StoreDamaged, match="truncated") as caught:
        check_data_file(tmp_path / "s")
    assert caught.value.path == tmp_path / "s" and "truncated" in caught.value.reason
    assert isinstance(caught.value, StoreError)  # callers that handle StoreError handle damage too


def test_a_record_that_does_not_parse_is_damage(tmp_path):
    with Store(tmp_path / "s") as store:
        store.write([pending(1, 2)])
        with store.env.begin(write=True) as txn:  # a bit flipped inside a value: the pages are fine
            txn.put(oid(1), b'{"status": "ingest', db=store._commits)
        with pytest.raises(StoreDamaged, match="does not parse"):
            store.get_commit(oid(1))
        with pytest.raises(StoreDamaged, match="does not parse"):
            list(store.iter_commits())
