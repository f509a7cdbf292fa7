"""The held-out window on a real git history: a merge that replays its branch stores no examples (each is a
duplicate of its branch's), so it never enters the window (its examples would be both trained and held out)."""
from __future__ import annotations


from gitlora.daemon.commands.backfill import backfill
from gitlora.daemon.config import Config
from gitlora.daemon.repos import open_repo
from gitlora.daemon.round_planning import RoundState, select_data
from gitlora.daemon.shards import ShardWriter
from gitlora.daemon.store import Store
from gitlora.trainer.spec import RoundSettings

from gitutil import commit_files, git, init_repo, rust_module


def test_a_merge_replaying_its_branch_is_marked_duplicate_and_never_held_out(tmp_path, isolated_home):
    repo = init_repo(tmp_path / "repo")
    for n in range(6):
        commit_files(repo, {f"src/m{i}.rs": rust_module(i, n) for i in range(3)}, f"main {n}")
    git(repo, "checkout", "-q", "-b", "feature")
    branch = [commit_files(repo, {"src/feature.rs": rust_module(9, n)}, f"feature {n}") for n in range(3)]
    git(repo, "checkout", "-q", "main")
    other = commit_files(repo, {"src/m0.rs": rust_module(0, 7)}, "main moves on")
    git(repo, "merge", "-q", "--no-ff", "-m", "merge feature", "feature")
    merge = git(repo, "rev-parse", "HEAD")
    tail = commit_files(repo, {"src/m1.rs": rust_module(1, 8)}, "after the merge")

    backfill(str(repo), progress=False, workers=1)
    opened = open_repo(repo, Config())
    with Store(opened.paths.store) as store:
        record = store.get_commit(bytes.fromhex(merge))
        assert record["examples"] == 0 and record["skipped_items"]["duplicate"] > 0
        assert set(record["duplicate_of"]) <= set(branch)
        tail_record = store.get_commit(bytes.fromhex(tail))  # one function reverts to a text stored before
        assert tail_record["skipped_items"] == {"duplicate": 1} and tail_record["examples"] > 0
        manifest = ShardWriter(opened.paths.shards, opened.paths.manifest, store)
        manifest.flush(shard_size=4)
        facts = {f["commit"]: f for e in manifest.manifest()["shards"] for f in e["commits"]}
    assert merge not in facts and not facts[other]["duplicate"]

    # a window of the newest 5 commits: the merge is among the newest by time, yet not in it
    plan = select_data(manifest.manifest(), RoundState(),
                       RoundSettings(window_commits=5, window_examples=1, older_slice_commits=0))
    assert merge not in plan.window_commits + plan.new_commits + plan.replay_commits
    assert plan.window_commits[0] == tail and len(plan.window_commits) == 5
    assert set(branch) <= set(plan.window_commits + plan.new_commits)
