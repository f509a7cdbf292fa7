"""Crash-safe writes (gitlora.daemon.fsutil) and the adapter registry built on them: a failed write leaves the
old file whole and no temp behind, modes are exact where asked, and `current` always points at a complete
version."""
from __future__ import annotations

import os
import stat
import threading

import pytest

from gitlora.daemon.fsutil import atomic_write_bytes, atomic_write_text, publish_dir
from gitlora.trainer import registry


def test_atomic_write_creates_parents_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "file.json"
    atomic_write_text(target, "one\n")
    atomic_write_text(target, "two\n")
    assert target.read_text() == "two\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]


def test_a_write_that_fails_keeps_the_old_file_and_removes_its_temp(tmp_path):
    target = tmp_path / "file"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]  # fails after the temp file exists
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_mode_is_exact_whatever_the_umask_and_default_follows_it(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_bytes(tmp_path / "hook", b"#!/bin/sh\n", mode=0o755)
        atomic_write_bytes(tmp_path / "plain", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hook").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o600


def test_concurrent_writers_of_one_target_each_leave_a_whole_file(tmp_path):
    target = tmp_path / "shared"
    bodies = [bytes([65 + n]) * 200_000 for n in range(8)]
    threads = [threading.Thread(target=atomic_write_bytes, args=(target, body)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert target.read_bytes() in bodies
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]


def test_publish_dir_refuses_or_replaces_an_existing_target(tmp_path):
    def built(name: str, content: str):
        path = tmp_path / name
        path.mkdir()
        (path / "weights").write_text(content)
        return path

    dest = publish_dir(built(".tmp-1", "first"), tmp_path / "model")
    assert (dest / "weights").read_text() == "first"
    with pytest.raises(OSError):
        publish_dir(built(".tmp-2", "second"), dest)
    assert (dest / "weights").read_text() == "first"
    publish_dir(tmp_path / ".tmp-2", dest, replace=True)
    assert (dest / "weights").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_registry_versions_and_current_move_atomically(tmp_path):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    for expected in ("v0001", "v0002"):
        version_dir = registry.next_version_dir(adapters)
        assert version_dir.name == expected
        tmp = registry.temp_dir_for(version_dir)
        tmp.mkdir()
        (tmp / registry.METRICS).write_text('{"parent": "v0001"}' if expected == "v0002" else "{}")
        registry.commit_version(tmp, version_dir)
        registry.promote(adapters, expected)
        assert registry.current_version(adapters) == expected
    assert registry.rollback(adapters) == "v0001"
    assert os.readlink(adapters / registry.CURRENT) == "v0001"
    (adapters / ".current.tmp-999").symlink_to("v0002")  # what a round killed mid-promote leaves
    assert registry.clean_partial(adapters) == [".current.tmp-999"]
    assert sorted(p.name for p in adapters.iterdir()) == [registry.CURRENT, registry.HISTORY, "v0001", "v0002"]
