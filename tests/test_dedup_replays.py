"""File changes met before are not built again (daemon/ingest.py, `store.FileOutcome`): a merge replaying its branch
yields exactly the items its branch commit yielded, so ingest leaves its file changes out and the store counts
them as the first occurrence's duplicates. On real git histories through the real ingest path: what is stored is
what building everything stores, in a pool or one commit at a time (the daemon's path); a replay whose first
occurrence was never stored built is built after all; `[ingest] dedup = false` builds everything."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from gitlora.daemon.config import Config
from gitlora.daemon.gitrepo import GitRepo
from gitlora.daemon.ingest import CommitProcessor, Ingestor, ReplayPlanner, file_change_key
from gitlora.daemon.repos import open_repo
from gitlora.daemon.store import FileOutcome, PendingCommit, ReplayUnconfirmed, Store

from daemonutil import gitlora
from gitutil import commit_files, git, init_repo
from test_dedup import distinct as function  # a function unlike every other one


def module(name: str, version: int) -> str:
    """A module whose function `{name}_main` changes with `version`, with an item too small to teach (hygiene
    skips it) and a test."""
    return (f"const K: u8 = {version};\n\n" + function(f"{name}_main", version) + function(f"{name}_side", 1)
            + f"\n#[test]\nfn {name}_works() {{\n    assert_eq!({name}_main(3), {name}_main(3) + 0 * {version});\n}}\n")


def replaying_history(path: Path, merges: int, filler: int = 2) -> tuple[Path, list[str], list[str]]:
    """main moves on other files while each branch changes one module in one commit; each `--no-ff` merge then
    changes that module from the same old blob to the same new blob as its branch commit did."""
    repo = init_repo(path)
    commit_files(repo, {f"src/m{n}.rs": module(f"m{n}", 0) for n in range(3)}, "base")
    branches, merged = [], []
    for m in range(merges):
        git(repo, "checkout", "-q", "-b", f"feature{m}")
        branches.append(commit_files(repo, {f"src/m{m % 3}.rs": module(f"m{m % 3}", m + 1)}, f"feature {m}"))
        git(repo, "checkout", "-q", "main")
        for n in range(filler):
            commit_files(repo, {f"src/main{n}.rs": function(f"main_{n}", 100 + m * filler + n)}, f"main {m}.{n}")
        git(repo, "merge", "-q", "--no-ff", "-m", f"Merge feature {m}", f"feature{m}")
        merged.append(git(repo, "rev-parse", "HEAD"))
    return repo, branches, merged


def contents(store_dir: Path) -> dict:
    """What a store holds, less what differs between any two runs (times, the ingesting source)."""
    with Store(store_dir, readonly=True) as store:
        drop = ("stored_at", "timings_ms", "source", "noticed_at", "symbol_index")
        return {"examples": dict(store.iter_raw_examples()),
                "commits": {oid.hex(): {k: v for k, v in r.items() if k not in drop} for oid, r in store.iter_commits()},
                "counters": store.counters(), "next_seq": store.next_seq()}


def ingest(repo: Path, store_dir: Path, *, workers: int = 1, leave_out: bool = True, config: Config | None = None,
           oids: list[str] | None = None) -> tuple[int, int]:
    """One backfill run into `store_dir`: (file changes stored as replays, examples stored)."""
    config = config or Config()
    with Store(store_dir) as store:
        ingestor = Ingestor(GitRepo(repo), store, config.ingest, workers=workers)
        ingestor.leave_out_replays = leave_out
        summary = ingestor.run(ingestor.pending() if oids is None else oids)
        return summary.replayed_files, summary.examples


def test_a_merge_replaying_its_branch_is_not_built_again(tmp_path):
    repo, branches, merges = replaying_history(tmp_path / "repo", merges=2)
    opened = open_repo(repo, Config())
    with Store(opened.paths.store) as store:
        ingestor = Ingestor(opened.git, store, Config().ingest, workers=1)
        oids = ingestor.pending()
        # What the workers are told, and what they then build for a merge: nothing.
        plan = ReplayPlanner(opened.git, store, ingestor.processor.fingerprint).replays(oids)
        keys = {merge: file_change_key(opened.git.changed_rust_files(merge, hunks=False).files[0],
                                       ingestor.processor.fingerprint) for merge in merges}
        assert plan == {merge: frozenset({key}) for merge, key in keys.items()}
        left_out = ingestor.processor.process([merges[0]], plan)[0]
        assert left_out.examples == [] and left_out.files == [FileOutcome(keys[merges[0]], built=False)]
        summary = ingestor.run(oids)
    assert summary.replayed_files == len(merges) and summary.commits == len(oids)

    with Store(opened.paths.store, readonly=True) as store:
        commits = {oid.hex(): record for oid, record in store.iter_commits()}
        made_by = {e["commit"] for _, e in store.iter_examples()}
    for branch, merge in zip(branches, merges):
        assert commits[branch]["examples"] == 2 and commits[branch]["skipped_items"] == {"too-small": 1}
        # Counted as if built: its two examples duplicates of the branch's, its small item left out again.
        assert commits[merge]["examples"] == 0 and commits[merge]["duplicate_of"] == [branch]
        assert commits[merge]["skipped_items"] == {"too-small": 1, "duplicate": 2}
        assert merge not in made_by and branch in made_by
    stats = json.loads(gitlora("stats", "--json", str(repo)).stdout)
    assert stats["item_skip_reasons"] == {"too-small": 3 + 2 * len(merges), "duplicate": 2 * len(merges)}
    assert stats["commits"] == {"ingested": len(oids)}


@pytest.mark.parametrize("workers", [1, 2])
def test_leaving_replays_out_stores_what_building_them_stores(tmp_path, workers):
    """Across chunks and workers (6 merges over more than one chunk of commits): byte for byte the same examples
    and records as building every file change, and each commit exactly once on a second run."""
    repo, _, merges = replaying_history(tmp_path / "repo", merges=6)
    examples = 9 + 6 * 2 + 6 * 2  # the base's three modules, each branch's change, main's own commits
    assert ingest(repo, tmp_path / "reference", leave_out=False) == (len(merges), examples)
    assert ingest(repo, tmp_path / "left-out", workers=workers) == (len(merges), examples)
    assert contents(tmp_path / "left-out") == contents(tmp_path / "reference")
    every = git(repo, "rev-list", "--all").split()
    assert ingest(repo, tmp_path / "left-out", oids=every[::-1]) == (0, 0)
    assert len(contents(tmp_path / "left-out")["commits"]) == len(every)


def test_the_daemons_commit_at_a_time_path_agrees(tmp_path):
    """The daemon ingests a branch commit when it is made and its merge later, each run on its own: the merge's
    first occurrence is found in the store, and the store ends as one backfill leaves it."""
    repo, _, merges = replaying_history(tmp_path / "repo", merges=3)
    ingest(repo, tmp_path / "backfill", leave_out=False)
    order = git(repo, "rev-list", "--reverse", "--topo-order", "main").split()
    replayed = 0
    with Store(tmp_path / "live") as store:
        for oid in order:
            ingestor = Ingestor.for_daemon(GitRepo(repo), store, Config().ingest)
            summary = ingestor.run([oid])
            replayed += summary.replayed_files
            assert summary.replayed_files == (oid in merges)
    assert replayed == len(merges)
    live, backfilled = contents(tmp_path / "live"), contents(tmp_path / "backfill")
    placed = ("first_seq", "last_seq")  # the two walks may order the branches' commits differently
    assert ({oid: {k: v for k, v in r.items() if k not in placed} for oid, r in live["commits"].items()} ==
            {oid: {k: v for k, v in r.items() if k not in placed} for oid, r in backfilled["commits"].items()})
    assert live["counters"] == backfilled["counters"]
    assert sorted(live["examples"].values()) == sorted(backfilled["examples"].values())


def test_a_replay_whose_first_occurrence_was_skipped_keeps_its_examples(tmp_path):
    """The branch commit was stored as skipped (its parser died, say): the merge that replays it is then the first
    to store those items, so it is built in full although the run met the branch commit first."""
    repo, branches, merges = replaying_history(tmp_path / "repo", merges=1)
    store_dir = tmp_path / "store"
    with Store(store_dir) as store:
        died = CommitProcessor._skipped(branches[0], {"source": "test"}, "parser-died: the process died")
        store.write([died])
    order = git(repo, "rev-list", "--reverse", "--topo-order", "main").split()
    assert ingest(repo, store_dir, workers=1, oids=order) == (0, 9 + 2 + 2)
    stored = contents(store_dir)["commits"]
    assert stored[branches[0]]["status"] == "skipped"
    assert stored[merges[0]]["examples"] == 2 and "duplicate_of" not in stored[merges[0]]
    assert stored[merges[0]]["skipped_items"] == {"too-small": 1}


def test_screening_off_builds_every_file_change(tmp_path):
    repo, branches, merges = replaying_history(tmp_path / "repo", merges=2)
    config = Config.model_validate({"ingest": {"dedup": False}})
    assert ingest(repo, tmp_path / "store", config=config) == (0, 9 + 2 * 2 + 2 * 2 + 2 * 2)
    commits = contents(tmp_path / "store")["commits"]
    for branch, merge in zip(branches, merges):
        assert commits[merge]["examples"] == 2 and commits[merge]["duplicates"] == 2
        assert commits[merge]["duplicate_of"] == [branch]


def test_a_left_out_file_change_the_store_has_not_seen_writes_nothing(tmp_path):
    """The store is the authority: a batch holding a commit whose left-out file change it has not indexed is
    refused whole (one transaction), so nothing is stored that would lose examples."""
    repo, branches, merges = replaying_history(tmp_path / "repo", merges=1)
    processor = CommitProcessor(GitRepo(repo), Config().ingest, source="test")
    first, merge = processor.process([branches[0], merges[0]])
    # As a worker told to leave the merge's file change out makes it: no examples, no item skips of its own.
    left_out = replace(merge, examples=[], files=[FileOutcome(f.key, built=False) for f in merge.files],
                       screen=replace(merge.screen, sketches=(), keys=()),
                       record={k: v for k, v in merge.record.items() if k != "skipped_items"})
    with Store(tmp_path / "store") as store:
        with pytest.raises(ReplayUnconfirmed) as raised:
            store.write([PendingCommit(bytes(20), {"status": "skipped", "reason": "test"}), left_out])
        assert raised.value.oid == merge.oid
        assert store.known_commits([bytes(20), merge.oid]) == set()
        store.write([first])
        result = store.write([left_out])
        assert (result.stored, result.examples, result.replayed_files) == (1, 0, 1)
        assert store.get_commit(merge.oid)["skipped_items"] == {"too-small": 1, "duplicate": 2}
