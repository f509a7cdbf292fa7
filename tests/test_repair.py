"""A damaged store rebuilt from real git histories: exact commits and examples back, shards still verifiable,
nothing doubled; and every CLI command that meets a damaged store says so in one line."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from gitlora.daemon import repos
from gitlora.daemon.commands.backfill import backfill
from gitlora.daemon.config import Config
from gitlora.daemon.ingest import Ingestor
from gitlora.daemon.repair import RepairError, repair_store
from gitlora.daemon.repos import OpenedRepo, open_repo
from gitlora.daemon.shards import ShardWriter
from gitlora.daemon.store import SCHEMA_VERSION, Store, StoreDamaged

from gitutil import commit_files, git, rust_module, synthetic_history

SHARD_SIZE, EVAL_FRACTION = 40, 0.2
# What a rebuild cannot reproduce: when and by whom a commit was stored, and how long it took.
_STORING_FIELDS = ("stored_at", "timings_ms", "source", "noticed_at", "symbol_index")


def damage(store_dir: Path, how: str) -> None:
    """Damage data.mdb as a crash, a full disk or a bad block would."""
    data = store_dir / "data.mdb"
    size = data.stat().st_size
    if how == "truncated":
        os.truncate(data, size // 2)
    elif how == "empty":
        os.truncate(data, 0)
    elif how == "garbage":  # every page after the two meta pages overwritten, deterministically
        rnd = random.Random(7)
        with open(data, "r+b") as handle:
            handle.seek(2 * 4096)
            handle.write(bytes(rnd.randrange(256) for _ in range(size - 2 * 4096)))
    else:
        raise ValueError(how)


def flush(opened: OpenedRepo) -> list[dict]:
    with Store(opened.paths.store) as store:
        return ShardWriter(opened.paths.shards, opened.paths.manifest, store).flush(SHARD_SIZE, EVAL_FRACTION)


def snapshot(opened: OpenedRepo) -> dict:
    """Everything a rebuild must give back: examples by sequence (bytes), commit records, counters, shards."""
    with Store(opened.paths.store, readonly=True) as store:
        return {
            "examples": dict(store.iter_raw_examples()),
            "commits": {oid.hex(): {k: v for k, v in record.items() if k not in _STORING_FIELDS}
                        for oid, record in store.iter_commits()},
            "counters": store.counters(),
            "next_seq": store.next_seq(),
            "shards": {p.name: p.read_bytes() for p in sorted(opened.paths.shards.glob("*.jsonl"))},
            "manifest": opened.paths.manifest.read_bytes(),
        }


@pytest.fixture
def history(tmp_path) -> tuple[Path, OpenedRepo]:
    """Two shard groups and an unflushed tail, as a daemon leaves them after a while."""
    repo = synthetic_history(tmp_path / "crate", 30)
    backfill(str(repo), progress=False, workers=1)
    opened = open_repo(repo, Config())
    assert flush(opened)
    for n in range(4):
        commit_files(repo, {f"src/mod{n}.rs": rust_module(n, 100 + n)}, f"more {n}")
    backfill(str(repo), progress=False, workers=1)
    assert flush(opened)
    commit_files(repo, {"src/mod5.rs": rust_module(5, 300)}, "unflushed")
    commit_files(repo, {"README.md": "no rust here"}, "no examples")
    backfill(str(repo), progress=False, workers=1)
    return repo, opened


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_repair_restores_the_exact_commits_examples_and_shards(history, how):
    repo, opened = history
    before = snapshot(opened)
    damage(opened.paths.store, how)
    with pytest.raises(StoreDamaged):
        with Store(opened.paths.store, readonly=True) as store:
            list(store.iter_examples())
    seen: list[tuple[int, int]] = []

    report = repair_store(opened, Config(), progress=lambda done, total: seen.append((done, total)))

    assert report.action == "rebuilt" and report.ok, report.summary()
    assert report.kept_at is not None and (report.kept_at / "data.mdb").exists()  # the damaged store is kept
    assert report.not_rederived == [] and report.differed == [] and report.lost_shards == []
    assert report.shards.checked == len(before["shards"]) and report.shards.rebuilt == []
    assert seen and seen[-1][0] == seen[-1][1] == len(before["commits"])
    after = snapshot(opened)
    assert after == before  # every example under its own sequence number, every record, every shard byte
    assert report.commits == len(before["commits"]) and report.examples == len(before["examples"])
    assert "\n" not in report.summary() and "rebuilt" in report.summary()
    with Store(opened.paths.store) as store:  # the daemon's next reconcile and flush find nothing to do
        assert Ingestor(opened.git, store).pending() == []
        writer = ShardWriter(opened.paths.shards, opened.paths.manifest, store)
        flushed, tail = writer.flushed_upto(), writer.unflushed()
        assert 0 < tail < len(before["examples"])  # only the examples no shard holds yet
        entries = writer.flush(SHARD_SIZE, EVAL_FRACTION)
    assert min(e["first_seq"] for e in entries) == flushed and sum(e["count"] for e in entries) == tail


def test_repair_twice_and_forced_rebuilds_never_double_a_commit(history):
    repo, opened = history
    before = snapshot(opened)
    damage(opened.paths.store, "truncated")
    first = repair_store(opened, Config())
    second = repair_store(opened, Config())  # a sound store is checked, not rebuilt
    assert (first.action, second.action) == ("rebuilt", "checked")
    assert second.kept_at is None and second.ok and "sound" in second.summary()
    forced = repair_store(opened, Config(), force=True)
    assert forced.action == "rebuilt" and forced.ok and ".replaced-" in forced.kept_at.name
    assert snapshot(opened) == before
    backfill(str(repo), progress=False, workers=1)  # and an ingest afterwards adds nothing
    assert snapshot(opened) == before
    assert not list(opened.paths.root.glob("store.rebuilding*"))


def test_repair_of_a_deleted_store_and_of_one_that_lacks_flushed_examples(history):
    repo, opened = history
    before = snapshot(opened)
    import shutil

    shutil.rmtree(opened.paths.store)
    report = repair_store(opened, Config())
    assert report.action == "rebuilt" and report.damage == "there is no store" and report.kept_at is None
    assert snapshot(opened) == before
    # A store that opens but holds fewer examples than the shards were made of (replaced by an empty one).
    shutil.rmtree(opened.paths.store)
    Store(opened.paths.store).close()
    report = repair_store(opened, Config())
    assert report.action == "rebuilt" and "shards were made of" in report.damage
    assert snapshot(opened) == before


def test_commits_no_longer_in_git_keep_their_examples_from_the_shards(tmp_path):
    repo = synthetic_history(tmp_path / "crate", 12)
    git(repo, "checkout", "-q", "-b", "side")
    side = [commit_files(repo, {f"src/mod{n}.rs": rust_module(n, 50 + n)}, f"side {n}") for n in range(2)]
    git(repo, "checkout", "-q", "main")
    backfill(str(repo), progress=False, workers=1)
    opened = open_repo(repo, Config())
    flush(opened)
    # History rewritten: the side branch is deleted and its commits pruned from git.
    git(repo, "branch", "-q", "-D", "side")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    git(repo, "gc", "-q", "--prune=now")
    assert git(repo, "cat-file", "-t", side[0], check=False) != "commit"
    before = snapshot(opened)
    damage(opened.paths.store, "truncated")

    report = repair_store(opened, Config())

    assert sorted(report.not_rederived) == sorted(side) and report.ok
    assert "2 commits no longer in git" in report.summary()
    after = snapshot(opened)
    assert after["examples"] == before["examples"] and after["shards"] == before["shards"]
    assert set(after["commits"]) == set(before["commits"])
    assert after["commits"][side[0]]["recovered_from"] == "shards"


def test_commits_out_of_time_order_still_give_byte_identical_shards(tmp_path, monkeypatch):
    """Seq order and commit-time order differ (clock skew, rebases): the shards' plans must still hold."""
    repo = synthetic_history(tmp_path / "crate", 6)
    for n in range(12):  # each commit older than the one before, several at the same second
        monkeypatch.setenv("GIT_COMMITTER_DATE", f"{1_800_000_000 - (n // 3) * 100} +0000")
        commit_files(repo, {f"src/mod{n % 8}.rs": rust_module(n % 8, 200 + n)}, f"skewed {n}")
    backfill(str(repo), progress=False, workers=1)
    opened = open_repo(repo, Config())
    flush(opened)
    before = snapshot(opened)
    damage(opened.paths.store, "garbage")

    report = repair_store(opened, Config())

    assert report.ok and report.shards.rebuilt == [] and report.from_shards > 0
    after = snapshot(opened)
    assert after["shards"] == before["shards"] and after["manifest"] == before["manifest"]
    assert sorted(after["examples"].values()) == sorted(before["examples"].values())
    # inside a group the commits may take other sequence numbers; what they hold is the same
    assert without_seqs(after["commits"]) == without_seqs(before["commits"])
    (opened.paths.shards / "000001.jsonl").unlink()  # and every shard can still be rebuilt from the new store
    with Store(opened.paths.store) as store:
        assert ShardWriter(opened.paths.shards, opened.paths.manifest, store).verify().rebuilt == [1]
    assert snapshot(opened)["shards"] == before["shards"]


def without_seqs(commits: dict[str, dict]) -> dict[str, dict]:
    return {oid: {k: v for k, v in record.items() if k not in ("first_seq", "last_seq")}
            for oid, record in commits.items()}


def test_a_shard_lost_with_the_store_is_reported_and_its_commits_are_still_stored(history):
    repo, opened = history
    before = snapshot(opened)
    (opened.paths.shards / "000002.jsonl").unlink()
    damage(opened.paths.store, "truncated")

    report = repair_store(opened, Config())

    assert report.lost_shards == [2] and not report.ok and report.shards.failed.keys() == {2}
    assert "not rebuildable (shard 2" in report.summary()
    after = snapshot(opened)
    assert set(after["commits"]) == set(before["commits"])  # its commits re-derived from git all the same
    assert sorted(after["examples"].values()) == sorted(before["examples"].values())
    assert after["shards"] == {k: v for k, v in before["shards"].items() if k != "000002.jsonl"}


# -- the CLI ---------------------------------------------------------------------------------------------


def gitlora(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gitlora.daemon", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_every_cli_command_says_a_damaged_store_in_one_line(history, how):
    repo, opened = history
    repos.register(opened.git.common_dir)
    damage(opened.paths.store, how)
    for command in (["stats", str(repo)], ["examples", str(repo)], ["backfill", "--no-progress", str(repo)]):
        done = gitlora(*command)
        assert done.returncode == 2, (command, done.returncode, done.stderr)  # not 135 (SIGBUS), not a traceback
        assert "Traceback" not in done.stderr and done.stdout == ""
        line = done.stderr.strip()
        assert "\n" not in line and "is damaged" in line, (command, line)
        assert f"gitlora repair {repo}" in line
    status = gitlora("status")  # no daemon: the offline view names the damage and the next step
    assert status.returncode == 1 and "Traceback" not in status.stderr + status.stdout
    assert "is damaged" in status.stdout and f"gitlora repair {repo}" in status.stdout

    repaired = gitlora("repair", "--no-progress", str(repo))
    assert repaired.returncode == 0, repaired.stderr
    assert repaired.stdout.count("\n") == 1 and "store rebuilt from git" in repaired.stdout
    stats = gitlora("stats", str(repo))
    assert stats.returncode == 0 and "examples:" in stats.stdout


def test_cli_repair_of_a_sound_store_and_a_failure_are_one_line(history):
    repo, opened = history
    done = gitlora("repair", "--no-progress", str(repo))
    assert done.returncode == 0 and done.stdout.count("\n") == 1 and "store is sound" in done.stdout
    with Store(opened.paths.store) as store:  # written by a newer gitlora: not ours to rebuild
        with store.env.begin(write=True) as txn:
            txn.put(b"schema_version", str(SCHEMA_VERSION + 1).encode(), db=store._meta)
    failed = gitlora("repair", "--no-progress", str(repo))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().count("\n") == 0 and "newer than this gitlora" in failed.stderr
    with pytest.raises(RepairError, match="newer"):
        repair_store(opened, Config())


def test_a_repair_asked_to_stop_leaves_the_damaged_store_and_one_at_a_time(history):
    repo, opened = history
    damage(opened.paths.store, "truncated")
    damaged_bytes = (opened.paths.store / "data.mdb").read_bytes()
    polls: list[int] = []

    def stop_after_first_batch() -> bool:
        polls.append(1)
        return len(polls) > 1

    report = repair_store(opened, Config(), should_stop=stop_after_first_batch)
    assert report.action == "stopped" and not report.ok and "left as it was" in report.summary()
    assert (opened.paths.store / "data.mdb").read_bytes() == damaged_bytes
    assert sorted(p.name for p in opened.paths.root.glob("store*")) == ["store"]  # nothing half-built left
    import fcntl

    with open(opened.paths.root / "repair.lock", "a+b") as held:  # another repair (process) holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RepairError, match="another repair"):
            repair_store(opened, Config())
    assert repair_store(opened, Config()).action == "rebuilt"
