"""Backfill of real git histories into a real LMDB store: every outcome the foundation promises."""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gitlora.daemon.commands.backfill import backfill
from gitlora.daemon.config import Config
from gitlora.daemon.demo_repo import EXPECTED, EXPECTED_ITEM_SKIPS, EXPECTED_SKIPS, build_demo_repo
from gitlora.daemon.gitrepo import GitRepo, GitRepoError
from gitlora.daemon.repos import open_repo
from gitlora.daemon.store import Store, StoreError

from gitutil import commit_files, git, init_repo, synthetic_history


def stored(repo: Path) -> tuple[dict[str, dict], list[dict]]:
    opened = open_repo(repo, Config())
    with Store(opened.paths.store, readonly=True) as store:
        commits = {oid.hex(): record for oid, record in store.iter_commits()}
        examples = [example for _, example in store.iter_examples()]
    return commits, examples


def subjects(repo: Path) -> dict[str, str]:
    out = git(repo, "log", "--all", "--format=%H %s")
    return {line[:40]: line[41:] for line in out.splitlines()}


@pytest.fixture
def demo(tmp_path) -> Path:
    return build_demo_repo(tmp_path / "demo")


def test_demo_history_yields_exactly_the_expected_items_per_commit(demo):
    summary = backfill(str(demo), progress=False, workers=1)
    commits, examples = stored(demo)
    by_subject = subjects(demo)
    assert summary.commits == len(by_subject) == len(commits) == 12
    found: dict[str, set] = {s: set() for s in by_subject.values()}
    for example in examples:
        found[by_subject[example["commit"]]].add(
            (example["change_kind"], example["kind"], example["qualified_name"]))
    assert found == {s: set(items) for s, items in EXPECTED.items()}
    item_skips = {by_subject[oid]: record["skipped_items"] for oid, record in commits.items()
                  if record.get("skipped_items")}
    assert item_skips == EXPECTED_ITEM_SKIPS
    # exactly one example per changed item: no duplicates
    keys = [(e["commit"], e["path"], e["kind"], e["qualified_name"]) for e in examples]
    assert len(keys) == len(set(keys))


def test_demo_history_records_skips_renames_merges_and_root(demo):
    backfill(str(demo), progress=False, workers=1)
    commits, examples = stored(demo)
    by_subject = {subject: commits[oid] for oid, subject in subjects(demo).items()}
    for subject, (path, reason) in EXPECTED_SKIPS.items():
        assert {"path": path, "reason": reason} in [
            {"path": s["path"], "reason": s["reason"].split(":")[0]} for s in by_subject[subject]["skipped_files"]]
    broken = by_subject["Work in progress: half-written function"]
    assert broken["syntax_errors"] == [{"path": "src/broken.rs", "broken_items": 0}]
    assert by_subject["Initial crate: config parsing and helpers"]["parent"] is None  # root: vs the empty tree
    merge_oid = git(demo, "rev-parse", "HEAD~5")
    assert subjects(demo)[merge_oid] == "Merge branch 'feature/net'"
    assert commits[merge_oid]["parent"] == git(demo, "rev-parse", "HEAD~5^1")
    assert by_subject["Rename util to helpers"]["rust_files"] == 1  # one rename, not an add plus a delete
    renamed = [e for e in examples if e["qualified_name"] == "math::is_even"]
    assert [(e["path"], e["old_path"]) for e in renamed] == [("src/math.rs", "src/helpers.rs")]
    assert all(c["status"] == "ingested" for c in commits.values())


def test_example_records_carry_the_contract_fields(demo):
    backfill(str(demo), progress=False, workers=1)
    _, examples = stored(demo)
    parse = next(e for e in examples if e["qualified_name"] == "parse" and e["change_kind"] == "modified")
    assert set(parse) == {"repo", "commit", "parent", "author_time", "commit_time", "message", "path", "old_path",
                          "kind", "qualified_name", "change_kind", "before", "after", "imports", "old_blob",
                          "new_blob", "old_span", "new_span", "identifiers", "new_context", "cross_file"}
    assert parse["repo"] == "demo"
    assert parse["message"].startswith("Skip comment lines")
    assert "starts_with('#')" in parse["after"] and "starts_with('#')" not in parse["before"]
    assert parse["imports"] == ["use std::collections::HashMap;", "use std::fmt;"]
    deleted = next(e for e in examples if e["change_kind"] == "deleted")
    assert deleted["after"] == "" and deleted["before"] and deleted["path"] == "src/render.rs"
    assert deleted["new_context"] is None and parse["new_context"]["above"].startswith("use std::")
    assert deleted["cross_file"] == [] and isinstance(parse["cross_file"], list)


def test_rerun_stores_nothing_twice(demo):
    first = backfill(str(demo), progress=False, workers=1)
    second = backfill(str(demo), progress=False, workers=1)
    assert first.commits == 12 and second.commits == 0
    commits, examples = stored(demo)
    assert len(commits) == 12 and len(examples) == first.examples


def test_parallel_parsing_gives_the_same_examples_as_serial(tmp_path, monkeypatch):
    repo = synthetic_history(tmp_path / "syn", commits=40)
    monkeypatch.setenv("GITLORA_STATE_HOME", str(tmp_path / "serial"))
    backfill(str(repo), progress=False, workers=1)
    serial = stored(repo)[1]
    monkeypatch.setenv("GITLORA_STATE_HOME", str(tmp_path / "parallel"))
    backfill(str(repo), progress=False, workers=2)
    parallel = stored(repo)[1]
    assert serial == parallel and len(serial) > 40


def test_new_commits_on_every_kind_of_ref_are_found(demo, tmp_path):
    backfill(str(demo), progress=False, workers=1)
    # a tag-only commit, a detached HEAD, and a linked worktree's detached HEAD
    git(demo, "checkout", "-q", "--detach")
    detached = commit_files(demo, {"src/d.rs": "fn detached() {}\n"}, "detached work")
    git(demo, "tag", "-a", "-m", "annotated", "keep", detached)
    git(demo, "checkout", "-q", "main")
    git(demo, "tag", "-d", "keep")
    git(demo, "worktree", "add", "-q", "--detach", str(tmp_path / "wt"))
    in_worktree = commit_files(tmp_path / "wt", {"src/w.rs": "fn wt() {}\n"}, "worktree work")
    git(demo, "checkout", "-q", "--detach", "main")
    head_only = commit_files(demo, {"src/h.rs": "fn head() {}\n"}, "head-only work")
    repo = GitRepo(demo)
    tips = repo.tips()
    assert tips["HEAD"] == head_only
    assert any(name.startswith("worktrees/") and oid == in_worktree for name, oid in tips.items())
    backfill(str(demo), progress=False, workers=1)
    commits, _ = stored(demo)
    assert head_only in commits and in_worktree in commits
    assert detached not in commits  # reachable from no ref any more: not history the user kept


def test_empty_repository(tmp_path):
    repo = init_repo(tmp_path / "empty")
    summary = backfill(str(repo), progress=False)
    assert summary.commits == 0
    assert stored(repo) == ({}, [])


def test_shallow_clone(demo, tmp_path):
    shallow = tmp_path / "shallow"
    git(tmp_path, "clone", "-q", "--depth", "3", f"file://{demo}", str(shallow))
    summary = backfill(str(shallow), progress=False, workers=1)
    commits, examples = stored(shallow)
    assert summary.commits == len(commits) == 3
    assert GitRepo(shallow).is_shallow
    oldest = git(shallow, "rev-list", "--max-parents=0", "HEAD")  # the shallow boundary
    assert commits[oldest]["status"] == "skipped"
    assert commits[oldest]["reason"].startswith("shallow-boundary")
    assert [c["status"] for oid, c in commits.items() if oid != oldest] == ["ingested", "ingested"]
    assert {e["commit"] for e in examples} <= set(commits) - {oldest}
    # unshallowed later: the older history is ingested, the boundary commit stays stored once, as skipped
    git(shallow, "fetch", "-q", "--unshallow")
    assert not GitRepo(shallow).is_shallow
    again = backfill(str(shallow), progress=False, workers=1)
    commits, _ = stored(shallow)
    assert again.commits == 9 and len(commits) == 12
    assert commits[oldest]["status"] == "skipped"
    assert sum(c["status"] == "ingested" for c in commits.values()) == 11


def keep_small_items(home: Path) -> None:
    """These histories are made of one-line items: keep them (hygiene's size floor is tested on its own)."""
    config = home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[ingest]\nmin_item_bytes = 0\n")


def test_missing_blob_is_a_recorded_skip(tmp_path, isolated_home):
    keep_small_items(isolated_home)
    repo = init_repo(tmp_path / "partial")
    commit_files(repo, {"src/lib.rs": "pub fn a() {}\n"}, "first")
    commit_files(repo, {"src/lib.rs": "pub fn a() { 1; }\n", "src/ok.rs": "pub fn ok() {}\n"}, "second")
    blob = git(repo, "rev-parse", "HEAD:src/lib.rs")
    (repo / ".git/objects" / blob[:2] / blob[2:]).unlink()  # what a partial clone looks like to libgit2
    summary = backfill(str(repo), progress=False, workers=1)
    commits, examples = stored(repo)
    head = commits[git(repo, "rev-parse", "HEAD")]
    assert summary.commits == 2 and head["status"] == "ingested"
    assert [s["reason"].split(":")[0] for s in head["skipped_files"]] == ["missing-object"]
    assert {(e["commit"][:7], e["qualified_name"]) for e in examples} == {
        (git(repo, "rev-parse", "--short=7", "HEAD~1"), "a"), (git(repo, "rev-parse", "--short=7", "HEAD"), "ok::ok")}


def test_submodule_and_symlink_are_recorded(tmp_path):
    sub = init_repo(tmp_path / "sub")
    commit_files(sub, {"lib.rs": "fn s() {}\n"}, "sub")
    repo = init_repo(tmp_path / "super")
    commit_files(repo, {"src/lib.rs": "fn a() {}\n"}, "first")
    git(repo, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(sub), "vendored.rs")
    os.symlink("lib.rs", repo / "src/link.rs")
    commit_files(repo, {}, "add submodule and link")
    backfill(str(repo), progress=False, workers=1)
    commits, _ = stored(repo)
    reasons = {s["path"]: s["reason"] for s in commits[git(repo, "rev-parse", "HEAD")]["skipped_files"]}
    assert reasons == {"vendored.rs": "submodule", "src/link.rs": "symlink"}


def test_excluded_paths_are_recorded_not_ingested(tmp_path, isolated_home):
    keep_small_items(isolated_home)
    repo = init_repo(tmp_path / "vend")
    commit_files(repo, {"src/lib.rs": "fn a() {}\n", "vendor/syn/src/lib.rs": "fn v() {}\n"}, "vendor a crate")
    backfill(str(repo), progress=False, workers=1)
    commits, examples = stored(repo)
    assert [e["qualified_name"] for e in examples] == ["a"]
    assert list(commits.values())[0]["skipped_files"] == [{"path": "vendor/syn/src/lib.rs", "reason": "excluded"}]


def test_not_a_repository_and_reftable_are_clear_errors(tmp_path):
    with pytest.raises(GitRepoError, match="not a git repository"):
        GitRepo(tmp_path)
    repo = init_repo(tmp_path / "rt")
    with open(repo / ".git/config", "a") as config:
        config.write("[extensions]\n\trefStorage = reftable\n")
    with pytest.raises(GitRepoError, match="reftable"):
        GitRepo(repo)
    done = subprocess.run([sys.executable, "-m", "gitlora.daemon", "backfill", str(tmp_path / "nowhere")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("gitlora: error:") and "Traceback" not in done.stderr


def _item_set(repo: Path) -> list[tuple[str, str, str, str]]:
    return sorted((e["commit"], e["path"], e["kind"], e["qualified_name"]) for e in stored(repo)[1])


def test_sigkill_at_random_moments_loses_and_doubles_nothing(tmp_path, isolated_home, monkeypatch):
    repo = synthetic_history(tmp_path / "syn", commits=400, files=10, functions=80)
    config = isolated_home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[ingest]\nbatch_commits = 2\nworkers = 1\n")  # steady progress: many kill points
    cmd = [sys.executable, "-m", "gitlora.daemon", "backfill", "--no-progress", str(repo)]
    monkeypatch.setenv("GITLORA_STATE_HOME", str(tmp_path / "clean"))
    subprocess.run(cmd, check=True, capture_output=True)
    expected = _item_set(repo)
    clean_commits = len(stored(repo)[0])
    monkeypatch.setenv("GITLORA_STATE_HOME", str(tmp_path / "killed"))
    rng = random.Random(1234)

    def stored_count() -> int:
        found = list(tmp_path.glob("killed/repos/*/store/data.mdb"))
        if not found:
            return 0
        try:
            with Store(found[0].parent, readonly=True) as store:
                return sum(v for k, v in store.counters().items() if k.startswith("commits_"))
        except StoreError:  # killed between creating the file and its databases
            return 0

    kills = mid_ingest_kills = 0
    for attempt in range(60):
        before = stored_count()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if attempt % 4 == 3:  # now and then early: during start-up or the first transactions
            time.sleep(rng.uniform(0.05, 0.6))
        else:  # mostly inside the write phase: once a transaction has landed, a random moment later
            deadline = time.monotonic() + 120  # a bound for a loaded box, not an expected duration
            while proc.poll() is None and stored_count() == before and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.12))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the backfill and its parser processes, at once
            kills += 1
        proc.wait()
        after = stored_count()
        mid_ingest_kills += proc.returncode == -signal.SIGKILL and before < after < 400
        if kills == 20 or after == 400:
            break
    subprocess.run(cmd, check=True, capture_output=True)
    got = _item_set(repo)
    assert kills >= 10 and mid_ingest_kills >= 5, (kills, mid_ingest_kills)
    assert len(got) == len(set(got)), "an item was stored twice"
    assert got == expected
    assert len(stored(repo)[0]) == clean_commits == 400


def test_a_large_commit_is_parsed_in_a_spawned_process_with_the_same_result(tmp_path, monkeypatch):
    from gitlora.daemon.config import IngestConfig
    from gitlora.daemon.ingest import Ingestor

    repo = synthetic_history(tmp_path / "syn", commits=1, files=12)
    results = []
    for name, files, size in (("inproc", None, None), ("by-files", 5, None), ("by-bytes", None, 4096)):
        monkeypatch.setenv("GITLORA_STATE_HOME", str(tmp_path / name))
        opened = open_repo(repo, Config())
        children: list[int] = []
        with Store(opened.paths.store) as store:
            # 12 files of the same functions but for their names: no near-duplicate cap, every item counts
            ingestor = Ingestor(opened.git, store, IngestConfig(near_duplicate_cap=0, min_item_bytes=0), workers=1, isolate_files=files,
                                isolate_bytes=size)
            # on_batch runs while the pool that parsed the batch is still up: its worker is our live child
            summary = ingestor.run(ingestor.pending(), on_batch=lambda *_: children.extend(
                p.pid for p in multiprocessing.active_children()))
            assert summary.commits == 1 and summary.examples == 12 * 7
            results.append([raw for _, raw in store.iter_raw_examples()])
        isolated = files is not None or size is not None
        assert bool(children) == isolated, (name, children)
        assert (ingestor.processor._cache.size > 0) == (not isolated)  # and the parent parsed nothing itself
    assert results[0] == results[1] == results[2]


def test_parse_caches_are_bounded_by_estimated_bytes():
    from gitlora.daemon.ingest import estimated_items_bytes
    from gitlora.daemon.memo import ByteLRU
    from gitlora.daemon.rust_items import extract_items

    from gitutil import rust_module

    small, large = (extract_items(rust_module(0, 0, n).encode()) for n in (4, 400))
    assert estimated_items_bytes(large) > 50 * estimated_items_bytes(small) > 0
    assert estimated_items_bytes(large) > len(rust_module(0, 0, 400))  # an item map costs more than its source
    cache = ByteLRU(3 * estimated_items_bytes(small))
    cache.put("huge", large, estimated_items_bytes(large))
    assert cache.get("huge") is None and cache.size == 0  # larger than the whole budget: never kept
    for key in "abcd":
        cache.put(key, small, estimated_items_bytes(small))
    cache.get("b")  # recently used: outlives "c"
    cache.put("e", small, estimated_items_bytes(small))
    assert [k for k in "abcde" if cache.get(k) is not None] == ["b", "d", "e"]
    assert cache.size <= cache.max_bytes


def test_line_hunks_of_two_blobs_are_the_commits_own(tmp_path):
    """Ingest asks for a modified file's hunks only when a reparse can use them (`GitRepo.line_hunks`): they must
    be the hunks the commit's diff gives, a renamed and edited file's too."""
    repo = init_repo(tmp_path / "repo")
    lines = [f"pub fn f{n}(x: u64) -> u64 {{ x + {n} }}\n" for n in range(40)]
    commit_files(repo, {"src/a.rs": "".join(lines), "src/b.rs": "".join(lines[:30])}, "base")
    edited = lines[:3] + ["// new\n"] + lines[5:20] + [lines[20].replace("x +", "x -")] + lines[21:38]
    commit_files(repo, {"src/a.rs": "".join(edited)}, "edit")
    git(repo, "mv", "src/b.rs", "src/c.rs")
    commit_files(repo, {"src/c.rs": "".join(lines[:29]) + "pub fn g() {}\n"}, "rename and edit")
    git_repo = GitRepo(repo)
    assert [c.status for c in git_repo.changed_rust_files(git(repo, "rev-parse", "HEAD")).files] == ["renamed"]
    for oid in git(repo, "rev-list", "HEAD~2..HEAD").split():
        changes = git_repo.changed_rust_files(oid).files
        assert changes and all(c.hunks for c in changes)
        assert [git_repo.line_hunks(c.old_oid, c.new_oid) for c in changes] == [c.hunks for c in changes]
        assert [c.hunks for c in git_repo.changed_rust_files(oid, hunks=False).files] == [None] * len(changes)
