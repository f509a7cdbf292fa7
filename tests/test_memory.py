"""What the repository worker does after a burst (daemon/memory.py), on a real LMDB store in this process."""
from __future__ import annotations

from pathlib import Path

import pytest

from gitlora.daemon import memory
from gitlora.daemon.store import PendingCommit, Store

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from Linux /proc")


def proc_status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def test_after_a_burst_the_store_is_reopened_and_its_pages_leave_rss(tmp_path):
    with Store(tmp_path / "s") as store:
        big = [PendingCommit(n.to_bytes(20, "big"), {"status": "ingested"}, [{"t": "w" * 1500, "i": i} for i in range(200)])
               for n in range(60)]
        store.write(big)  # ~18 MB written: dirty pages LMDB keeps until it is reopened
        assert sum(len(e["t"]) for _, e in store.iter_examples()) == 60 * 200 * 1500  # every map page resident
        anon, mapped = proc_status_kb("RssAnon"), proc_status_kb("RssFile")
        memory.after_burst(store)
        assert not store.release_write_buffers()  # reopened just now: nothing written since
        assert proc_status_kb("RssFile") < mapped - 10_000  # the map's pages were dropped
        assert proc_status_kb("RssAnon") < anon - 5_000  # LMDB's dirty pages went back to the OS
        # and the store works as before
        assert store.counters() == {"commits_ingested": 60, "examples": 12_000}
        store.write([PendingCommit((99).to_bytes(20, "big"), {"status": "ingested"}, [{"t": "after"}])])
        assert store.get_commit((99).to_bytes(20, "big"))["first_seq"] == 12_000


def test_dropping_pages_of_a_file_not_mapped_releases_nothing(tmp_path):
    other = tmp_path / "not-mapped"
    other.write_bytes(b"x" * 4096)
    assert memory.drop_mapped_pages(other) == 0
