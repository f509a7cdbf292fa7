"""The hooks' spool across rotation, on the never-lose-a-commit path: the reader (daemon/spool_reader.py) over a
real LMDB store with a lowered rotation size, and the real daemon with the real size.

Every line a hook appends must reach the daemon exactly once (once per clean run: after a crash between a read
and its commit the same lines come again, and the store's exactly-once check absorbs them): whether it was
appended before a rotation, between a read and the commit that rotates, into the rotated file through a
descriptor a hook opened before the rename, or into the fresh spool a hook recreates; and across restarts.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from gitlora.daemon import paths, spool_reader
from gitlora.daemon.gitrepo import GitRepo
from gitlora.daemon.spool_reader import SpoolReader
from gitlora.daemon.store import Store
from gitlora.hooks.spool import SpoolEntry

from daemonutil import DaemonProcess, gitlora, store_commits, wait_stored
from gitutil import commit_files, git, init_repo

ROTATE = 1024  # bytes; the reader's real threshold is MBs


def line(n: int) -> bytes:
    """A distinct, valid post-commit line (the oid encodes n)."""
    return SpoolEntry("post-commit", f"{n:040x}", None).to_line().encode()


def numbers(entries) -> list[int]:
    return [int(e.new, 16) for e in entries]


def append(path: Path, data: bytes) -> None:
    """What a hook's `printf ... >> spool` does: open for append (creating it), one write, close."""
    with open(path, "ab") as handle:
        handle.write(data)


class World:
    """A spool path and a reader over a real store; `restart()` is a new daemon process's view of both."""

    def __init__(self, root: Path) -> None:
        self.spool = root / "spool"
        self.store_dir = root / "store"
        self.store = Store(self.store_dir)
        self.reader = SpoolReader(self.spool, self.store)

    def restart(self) -> None:
        self.store.close()
        self.store = Store(self.store_dir)
        self.reader = SpoolReader(self.spool, self.store)

    def consume(self) -> list[int]:
        """One reconcile: read what is new, then (the commits being stored) commit the position."""
        entries, position = self.reader.read_new()
        self.reader.commit(position)
        return numbers(entries)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_reader, "_ROTATE_BYTES", ROTATE)
    w = World(tmp_path)
    yield w
    w.close()


def fill_past_rotation(world: World, first: int) -> list[int]:
    """Append enough lines that the next commit rotates; returns their numbers."""
    count = ROTATE // len(line(0)) + 2
    append(world.spool, b"".join(line(n) for n in range(first, first + count)))
    return list(range(first, first + count))


def test_lines_around_a_rotation_arrive_once_each(world):
    before = fill_past_rotation(world, 0)
    entries, position = world.reader.read_new()
    assert numbers(entries) == before
    append(world.spool, line(1000))  # a hook runs while the daemon ingests: after the read, before the commit
    world.reader.commit(position)
    assert world.reader.rotated.exists() and not world.spool.exists(), "the commit past the size rotates"
    append(world.spool, line(1001))  # the next hook recreates the spool
    assert world.consume() == [1000, 1001]
    assert not world.reader.rotated.exists(), "the rotated file is dropped once read to its end"
    assert world.consume() == []
    append(world.spool, line(1002))
    assert world.consume() == [1002]


def test_a_rotation_between_two_reads_then_a_restart_loses_and_doubles_nothing(world):
    seen = fill_past_rotation(world, 0)
    assert world.consume() == seen  # rotates: everything read so far is in spool.old, consumed
    assert world.reader.rotated.exists()
    append(world.spool, line(500))
    world.restart()  # a new daemon: positions come from the store only
    assert world.consume() == [500]
    assert world.consume() == []
    world.restart()
    append(world.spool, line(501))
    assert world.consume() == [501]


def test_lines_pending_in_the_rotated_file_survive_a_restart(world):
    fill_past_rotation(world, 0)
    entries, position = world.reader.read_new()
    append(world.spool, line(700))  # lands in the file about to become spool.old, unread
    world.reader.commit(position)
    assert world.reader.rotated.exists()
    append(world.spool, line(701))
    world.restart()
    assert world.consume() == [700, 701]
    world.restart()
    assert world.consume() == []


def test_a_crash_between_read_and_commit_rereads_instead_of_losing(world):
    fill_past_rotation(world, 0)
    world.consume()  # rotated
    append(world.spool, line(800))
    entries, _ = world.reader.read_new()
    assert numbers(entries) == [800]
    world.restart()  # died before commit(): the store still holds the old position
    assert world.consume() == [800]  # again (the store's exactly-once check absorbs it), not lost
    assert world.consume() == []


def test_a_hook_that_opened_the_spool_before_the_rename_writes_into_the_rotated_file(world):
    fill_past_rotation(world, 0)
    entries, position = world.reader.read_new()
    with open(world.spool, "ab") as hook:  # `>> spool` opened before the rename ...
        world.reader.commit(position)  # rotates: the hook's descriptor now points at spool.old
        assert world.reader.rotated.exists() and not world.spool.exists()
        hook.write(line(900))  # ... and written after it, before the daemon's next read
    append(world.spool, line(901))
    assert world.consume() == [900, 901]
    assert world.consume() == []


# The reader drops spool.old in commit() without checking that nothing was written into it after read_new():
# a hook that opened the spool before the rename and writes (or finishes a line) after the next read loses
# that line. Fix: remember how much of spool.old was read and drop it only if it has not grown since.
@pytest.mark.parametrize("torn", [False, True], ids=["late-line", "torn-line"])
def test_a_line_written_into_the_rotated_file_after_its_last_read_is_not_lost(world, torn):
    fill_past_rotation(world, 0)
    entries, position = world.reader.read_new()
    whole = line(950)
    with open(world.spool, "ab") as hook:  # opened before the rename, written later (a descheduled hook)
        if torn:
            hook.write(whole[:20])
            hook.flush()
        world.reader.commit(position)  # rotation
        entries, position = world.reader.read_new()  # reads spool.old to its end (a torn tail stays unread)
        hook.write(whole[20:] if torn else whole)
    world.reader.commit(position)
    assert world.consume() == [950]


def test_a_truncated_spool_is_read_from_its_start(world):
    append(world.spool, line(1) + line(2))
    assert world.consume() == [1, 2]
    os.truncate(world.spool, 0)  # by hand
    append(world.spool, line(3))
    assert world.consume() == [3]


# -- the real daemon, the real rotation size ------------------------------------------------------------------

def dangling_commit(repo: Path, n: int) -> str:
    """A commit no ref reaches: only a spool line can tell the daemon about it."""
    return git(repo, "commit-tree", "HEAD^{tree}", "-p", "HEAD", "-m", f"spooled only {n}")


def spool_line(oid: str) -> bytes:
    return SpoolEntry("post-commit", oid, None).to_line().encode()


def wait_for_path(path: Path, exists: bool, daemon: DaemonProcess, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while path.exists() != exists:
        assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon died"
        assert time.monotonic() < deadline, f"{path} {'never appeared' if exists else 'was never removed'}"
        time.sleep(0.05)


def test_the_daemon_ingests_commits_named_only_in_the_spool_across_rotation_and_restart(tmp_path):
    repo = init_repo(tmp_path / "repo")
    head = commit_files(repo, {"src/lib.rs": "pub fn a() {}\n"}, "first")
    spool = paths.RepoPaths.for_git_dir(GitRepo(repo).common_dir).spool
    rotated = spool.with_name(spool.name + ".old")
    daemon = DaemonProcess().start()
    try:
        gitlora("install", str(repo))
        wait_stored(repo, [head])
        # Past the real rotation size in one append (filler lines name a stored commit), then a new commit.
        filler = spool_line(head) * (spool_reader._ROTATE_BYTES // len(spool_line(head)) + 1)
        first = dangling_commit(repo, 1)
        append(spool, filler + spool_line(first))
        wait_stored(repo, [first])
        wait_for_path(rotated, True, daemon)
        second = dangling_commit(repo, 2)
        append(spool, spool_line(second))  # the fresh spool
        wait_stored(repo, [second])
        wait_for_path(rotated, False, daemon)
        assert daemon.stop() == 0
        # While it is down: one line into a fresh spool, and a second rotation's worth with a line after it.
        third = dangling_commit(repo, 3)
        append(spool, spool_line(third))
        daemon = DaemonProcess().start()
        wait_stored(repo, [third])
        fourth = dangling_commit(repo, 4)
        append(spool, filler + spool_line(fourth))
        wait_stored(repo, [fourth])
        wait_for_path(rotated, True, daemon)
        assert daemon.stop() == 0
        fifth = dangling_commit(repo, 5)  # a hook that had the spool open across the rename, daemon down
        append(rotated, spool_line(fifth))
        sixth = dangling_commit(repo, 6)
        append(spool, spool_line(sixth))
        daemon = DaemonProcess().start()
        wait_stored(repo, [fifth, sixth])
        wait_for_path(rotated, False, daemon)
        stored = store_commits(repo)
        assert {head, first, second, third, fourth, fifth, sixth} <= set(stored)
        assert all(stored[oid]["status"] == "ingested" for oid in (first, second, third, fourth, fifth, sixth))
    finally:
        daemon.stop()
