"""A store written by schema 1 (no blob ids, spans or identifiers), as an older gitlora left it with its shards:
reported and never mixed, and `gitlora upgrade` brings it to exactly what a fresh backfill gives, also when
killed at any moment and rerun, and with the daemon running beside it."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from gitlora.daemon import compact_json, repos
from gitlora.daemon.commands.backfill import backfill
from gitlora.daemon.config import Config
from gitlora.daemon.examples import CONTEXT_FIELDS, SCHEMA_FIELDS
from gitlora.daemon.repos import OpenedRepo, open_repo
from gitlora.daemon.shards import ShardWriter
from gitlora.daemon.store import SCHEMA_VERSION, Store, StoreError, StoreOutdated
from gitlora.daemon.upgrade import upgrade_store

from daemonutil import DaemonProcess, gitlora, wait_stored
from gitutil import commit_files, git, init_repo, rust_module, synthetic_history

SHARD_SIZE = 40


def flush(opened: OpenedRepo) -> list[dict]:
    with Store(opened.paths.store) as store:
        return ShardWriter(opened.paths.shards, opened.paths.manifest, store).flush(SHARD_SIZE)


def snapshot(opened: OpenedRepo) -> dict:
    """What the upgrade must give back: examples by sequence (bytes), commit records, meta, shards."""
    with Store(opened.paths.store, readonly=True) as store:
        return {
            "schema": store.schema_version,
            "examples": dict(store.iter_raw_examples()),
            "commits": {oid.hex(): record for oid, record in store.iter_commits()},
            "counters": store.counters(),
            "next_seq": store.next_seq(),
            "upgrade_meta": store.get_meta("upgrade"),
            "shards": {p.name: p.read_bytes() for p in sorted(opened.paths.shards.glob("*.jsonl"))},
            "manifest": json.loads(opened.paths.manifest.read_text()),
        }


def _older(raw: bytes, version: int = 1) -> bytes:
    """An example record as schema `version` wrote it: without the fields later schemas added."""
    newer = {f for v, fields in SCHEMA_FIELDS.items() if v > version for f in fields}
    return compact_json.encode({k: v for k, v in json.loads(raw).items() if k not in newer})


def downgrade(opened: OpenedRepo, version: int = 1) -> None:
    """Make the state dir what gitlora with schema `version` wrote: the same examples without the later schemas'
    fields (in the store and in the shards), `schema_version` so, manifest groups without a schema version
    (schema 1) or with this one."""
    env = lmdb.open(str(opened.paths.store), max_dbs=6, map_size=1 << 30)
    examples, meta = env.open_db(b"examples"), env.open_db(b"meta")
    with env.begin(write=True) as txn:
        for key, value in list(txn.cursor(db=examples)):
            txn.put(key, _older(value, version), db=examples)
        txn.put(b"schema_version", str(version).encode(), db=meta)
    env.close()
    manifest = json.loads(opened.paths.manifest.read_text())
    for entry in manifest["shards"]:
        path = opened.paths.shards / entry["file"]
        body = b"".join(_older(line, version) + b"\n" for line in path.read_bytes().splitlines())
        path.write_bytes(body)
        entry["sha256"] = hashlib.sha256(body).hexdigest()
    for group in manifest["groups"]:
        group.pop("schema_version", None)
        if version > 1:
            group["schema_version"] = version
    opened.paths.manifest.write_text(json.dumps(manifest, indent=1) + "\n")


def build(repo: Path, commits: int = 60, version: int = 1) -> tuple[OpenedRepo, dict]:
    """Two shard groups and an unflushed tail, backfilled with the current schema (the expected result), then
    made schema `version`."""
    synthetic_history(repo, commits)
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
    expected = snapshot(opened)
    assert expected["schema"] == SCHEMA_VERSION == 4
    assert all(g["schema_version"] == 4 for g in expected["manifest"]["groups"])
    downgrade(opened, version)
    return opened, expected


def assert_upgraded(opened: OpenedRepo, expected: dict) -> None:
    got = snapshot(opened)
    assert got["schema"] == SCHEMA_VERSION and got["upgrade_meta"] is None
    assert got["next_seq"] == expected["next_seq"] and got["counters"] == expected["counters"]
    assert got["examples"] == expected["examples"]  # byte for byte, at the same sequence numbers
    assert got["commits"] == expected["commits"]
    assert got["shards"] == expected["shards"]
    assert got["manifest"] == expected["manifest"]
    with Store(opened.paths.store) as store:
        assert ShardWriter(opened.paths.shards, opened.paths.manifest, store).verify(rebuild=False).ok


@pytest.fixture
def world(tmp_path) -> tuple[Path, OpenedRepo, dict]:
    repo = tmp_path / "crate"
    opened, expected = build(repo)
    return repo, opened, expected


def test_an_old_store_is_reported_and_never_written_to(world):
    repo, opened, _ = world
    before = snapshot(opened)
    assert before["schema"] == 1 and all(set(CONTEXT_FIELDS).isdisjoint(json.loads(raw))
                                         for raw in before["examples"].values())
    with pytest.raises(StoreOutdated, match="schema 1, this gitlora writes schema 4"):
        Store(opened.paths.store)
    new = commit_files(repo, {"src/mod1.rs": rust_module(1, 500)}, "while outdated")
    done = gitlora("backfill", "--no-progress", str(repo), check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"gitlora: error: store at {opened.paths.store} needs an upgrade: its records have schema 1, this gitlora "
        f"writes schema 4; re-derive it from git: gitlora upgrade {repo}")
    assert snapshot(opened) == before and new not in before["commits"]
    repos.register(opened.git.common_dir)
    status = gitlora("status", "--json", check=False)
    view = next(r for r in json.loads(status.stdout)["repos"] if r["git_dir"] == str(opened.git.common_dir))
    assert view["state"] == "upgrade needed" and f"gitlora upgrade {opened.git.common_dir}" in view["next_step"]
    assert view["examples"] == before["counters"]["examples"]  # reading an old store is fine


def test_upgrade_gives_exactly_what_a_fresh_backfill_gives(world):
    repo, opened, expected = world
    done = gitlora("upgrade", "--no-progress", str(repo))
    assert done.stdout.strip() == (
        f"crate: store upgraded from schema 1 to 4: {len(expected['examples']) and _commits_with_examples(expected)} "
        f"commits re-derived from git, {expected['counters']['examples']} examples; "
        f"{len(expected['shards'])} shards, {len(expected['shards'])} rewritten")
    assert_upgraded(opened, expected)
    again = gitlora("upgrade", "--no-progress", str(repo))
    assert again.stdout.strip() == "crate: store already has schema 4; nothing to upgrade"
    assert_upgraded(opened, expected)
    new = commit_files(repo, {"src/mod2.rs": rust_module(2, 700)}, "after the upgrade")
    backfill(str(repo), progress=False, workers=1)  # the store takes new commits again
    with Store(opened.paths.store, readonly=True) as store:
        assert store.get_commit(bytes.fromhex(new))["examples"] > 0


def test_a_schema_2_store_upgrades_to_carry_the_file_context(tmp_path):
    """Schema 2 records (blob ids and spans, no `new_context`) gain the new file's text around each item."""
    repo = tmp_path / "crate"
    opened, expected = build(repo, commits=20, version=2)
    before = snapshot(opened)
    assert before["schema"] == 2 and all("new_context" not in json.loads(raw) and "new_span" in json.loads(raw)
                                         for raw in before["examples"].values())
    report = upgrade_store(opened, Config())
    assert report.action == "upgraded" and report.from_version == 2 and not report.differed
    assert_upgraded(opened, expected)
    contexts = [json.loads(raw)["new_context"] for raw in snapshot(opened)["examples"].values()]
    assert any(c and c["above"] for c in contexts)


def test_a_schema_3_store_upgrades_to_carry_cross_file_context(tmp_path):
    """Schema 3 records gain `cross_file`: the definitions of other files they use, resolved by the symbol index
    ingest keeps (here moved by tree diffs between the commits that have examples), as a backfill gives them."""
    repo = init_repo(tmp_path / "crate")
    commit_files(repo, {"src/ledger.rs": "pub struct Ledger {\n    pub balance: u64,\n}\n"}, "ledger")
    spend = "pub fn spend_{n}(ledger: &mut Ledger, amount: u64) -> u64 {{\n    ledger.balance -= amount + {n};\n}}\n"
    for n in range(3):
        commit_files(repo, {f"src/use{n}.rs": spend.format(n=n)}, f"user {n}")
    commit_files(repo, {"README.md": "no rust"}, "no examples")
    commit_files(repo, {"src/ledger.rs": "pub struct Ledger {\n    pub balance: u64,\n    pub owner: String,\n}\n",
                        "src/use1.rs": spend.format(n=1).replace("amount + 1", "amount * 2")}, "owner")
    backfill(str(repo), progress=False, workers=1)
    opened = open_repo(repo, Config())
    assert flush(opened)
    expected = snapshot(opened)
    downgrade(opened, 3)
    assert all("cross_file" not in json.loads(raw) for raw in snapshot(opened)["examples"].values())
    report = upgrade_store(opened, Config())
    assert report.action == "upgraded" and report.from_version == 3 and not report.differed
    assert_upgraded(opened, expected)
    blocks = {json.loads(raw)["qualified_name"]: json.loads(raw)["cross_file"]
              for raw in snapshot(opened)["examples"].values()}
    assert [b["path"] for b in blocks["use1::spend_1"]] == ["src/ledger.rs"]
    assert "pub owner: String" in blocks["use1::spend_1"][0]["text"]  # Ledger as it was at that commit


def _commits_with_examples(snap: dict) -> int:
    return sum(1 for record in snap["commits"].values() if record.get("examples"))


def test_commits_no_longer_in_git_keep_their_examples_and_are_reported(tmp_path):
    repo = tmp_path / "crate"
    synthetic_history(repo, 12)
    git(repo, "checkout", "-q", "-b", "doomed")
    lost = commit_files(repo, {"src/mod3.rs": rust_module(3, 999)}, "on a branch about to vanish")
    git(repo, "checkout", "-q", "main")
    backfill(str(repo), progress=False, workers=1)
    opened = open_repo(repo, Config())
    assert flush(opened)
    expected = snapshot(opened)
    downgrade(opened)
    git(repo, "branch", "-q", "-D", "doomed")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    git(repo, "gc", "-q", "--prune=now")
    report = upgrade_store(opened, Config())
    assert report.action == "upgraded" and report.not_rederived == [lost] and not report.differed
    assert f"1 commits no longer in git (first {lost[:12]}) keep their examples" in report.summary()
    got = snapshot(opened)
    assert got["commits"][lost]["upgrade"] == "not-in-git"
    first, last = got["commits"][lost]["first_seq"], got["commits"][lost]["last_seq"]
    for seq, raw in got["examples"].items():
        want = json.loads(expected["examples"][seq])
        if first <= seq <= last:  # kept: its old fields, spans and blob ids unknown, identifiers from its text
            kept = json.loads(raw)
            assert {k: v for k, v in kept.items() if k not in CONTEXT_FIELDS} == {
                k: v for k, v in want.items() if k not in CONTEXT_FIELDS}
            assert kept["old_span"] is kept["new_span"] is kept["old_blob"] is kept["new_blob"] is None
            assert kept["new_context"] is None
            assert kept["identifiers"] == want["identifiers"]
        else:
            assert raw == expected["examples"][seq]
    assert report.shards.ok and len(report.shards.rebuilt) == len(expected["shards"])
    with Store(opened.paths.store) as store:  # the shards hold the kept records, and verify
        assert ShardWriter(opened.paths.shards, opened.paths.manifest, store).verify(rebuild=False).ok


def _progress(store_dir: Path) -> tuple[int, int]:
    """(the upgrade's progress in sequence numbers, the schema version) as another process sees it."""
    try:
        with Store(store_dir, readonly=True) as store:
            return (store.get_meta("upgrade") or {}).get("upto", 0), store.schema_version
    except StoreError:
        return 0, 0


def test_upgrade_killed_at_any_moment_then_rerun_is_exactly_once(tmp_path, isolated_home):
    repo = tmp_path / "crate"
    opened, expected = build(repo, commits=240)
    config = isolated_home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[ingest]\nworkers = 1\n")  # steady progress in one process: many kill points
    cmd = [sys.executable, "-m", "gitlora.daemon", "upgrade", "--no-progress", str(repo)]
    rng = random.Random(99)
    total = expected["next_seq"]
    kills = mid_rewrite = 0
    seen: list[int] = []
    for attempt in range(40):
        before, schema = _progress(opened.paths.store)
        if schema == SCHEMA_VERSION:
            break
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if attempt == 0:  # before the first transaction can land: as soon as the process exists
            pass
        else:  # once a transaction has landed, a random moment later
            deadline = time.monotonic() + 120  # a bound for a loaded box, not an expected duration
            while proc.poll() is None and _progress(opened.paths.store)[0] == before and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        after, _ = _progress(opened.paths.store)
        seen.append(after)
        mid_rewrite += proc.returncode == -signal.SIGKILL and 0 < after < total
        if kills >= 8:
            break
    print("kills", kills, "mid-rewrite", mid_rewrite, "progress seen", seen, "of", total)
    assert kills >= 5 and mid_rewrite >= 3, (kills, mid_rewrite, seen)
    assert seen == sorted(seen)  # progress never goes back
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_upgraded(opened, expected)


def test_a_half_written_shard_rewrite_is_finished_by_the_rerun(world):
    """Killed after some shard files got their new bytes but before the manifest named them: the rerun writes
    the same files again and the manifest."""
    repo, opened, expected = world
    first = sorted(expected["shards"])[0]
    (opened.paths.shards / first).write_bytes(expected["shards"][first])
    # The old manifest now disagrees with that file, as a kill would leave it.
    report = upgrade_store(opened, Config())
    assert report.ok and report.action == "upgraded"
    assert_upgraded(opened, expected)


def test_upgrade_with_the_daemon_running(world, isolated_home):
    repo, opened, expected = world
    repos.register(opened.git.common_dir)
    daemon = DaemonProcess().start()
    try:
        view = _wait_state(daemon, opened, "upgrade needed")
        assert view["next_step"].endswith(f"`gitlora upgrade {opened.git.common_dir}` re-derives it")
        held = commit_files(repo, {"src/mod4.rs": rust_module(4, 800)}, "while the store is outdated")
        gitlora("ingest", str(repo))  # a nudge: the worker tries the store again, and still holds
        done = gitlora("upgrade", "--no-progress", str(repo))
        assert "store upgraded from schema 1 to 4" in done.stdout
        commits = wait_stored(repo, [held])  # the nudge at the end: the worker reopens and ingests what waited
        assert commits[held]["examples"] > 0 and commits[held]["source"] == "daemon"
        _wait_state(daemon, opened, "ok")
    finally:
        daemon.stop()
        daemon.kill()
    got = snapshot(opened)
    for seq, raw in expected["examples"].items():
        assert got["examples"][seq] == raw
    held_examples = [json.loads(raw) for raw in got["examples"].values() if json.loads(raw)["commit"] == held]
    assert held_examples and all(set(CONTEXT_FIELDS) <= set(e) for e in held_examples)


def test_upgrade_refuses_while_an_older_daemon_serves_the_store(tmp_path, isolated_home):
    """A daemon that has the store open as current (it started before the store was made outdated: an older
    gitlora) would go on writing the old shape: the upgrade refuses until it is restarted."""
    repo = tmp_path / "crate"
    synthetic_history(repo, 6)
    backfill(str(repo), progress=False, workers=1)
    opened = open_repo(repo, Config())
    repos.register(opened.git.common_dir)
    daemon = DaemonProcess().start()
    try:
        _wait_state(daemon, opened, "ok")
        flush(opened)
        downgrade(opened)
        done = gitlora("upgrade", "--no-progress", str(repo), check=False)
        assert done.returncode == 1 and "runs an older gitlora" in done.stderr
        with Store(opened.paths.store, readonly=True) as store:
            assert store.schema_version == 1
    finally:
        daemon.stop()
        daemon.kill()


def _view(daemon: DaemonProcess, opened: OpenedRepo) -> dict:
    return next(r for r in daemon.status()["repos"] if r["git_dir"] == str(opened.git.common_dir))


def test_a_store_repaired_from_old_shards_says_so_and_upgrades(world):
    """Repair rebuilds a damaged store from the shards' bytes: from schema 1 shards that is a schema 1 store
    (never one that claims 2 while holding the old shape), which `upgrade` then brings to what backfill gives."""
    from gitlora.daemon.repair import repair_store

    repo, opened, expected = world
    data = opened.paths.store / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    report = repair_store(opened, Config())
    assert report.action == "rebuilt" and report.ok
    with Store(opened.paths.store, readonly=True) as store:
        assert store.schema_version == 1
    with pytest.raises(StoreOutdated):
        Store(opened.paths.store)
    assert upgrade_store(opened, Config()).action == "upgraded"
    got = snapshot(opened)
    assert got["schema"] == SCHEMA_VERSION
    assert got["examples"] == expected["examples"]
    assert got["shards"] == expected["shards"] and got["manifest"] == expected["manifest"]


def _wait_state(daemon: DaemonProcess, opened: OpenedRepo, state: str, timeout: float = 120) -> dict:
    """The repository's view once it is in `state` (a worker starts in `starting`)."""
    deadline = time.monotonic() + timeout  # a bound for a loaded box, not an expected duration
    view = _view(daemon, opened)
    while view["state"] != state and time.monotonic() < deadline:
        time.sleep(0.05)
        view = _view(daemon, opened)
    assert view["state"] == state, view
    return view
