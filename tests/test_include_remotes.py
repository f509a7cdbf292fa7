"""`ingest.include_remotes`: a commit reachable only from refs/remotes is ingested iff the option is set, by
backfill and by the daemon alike."""
from __future__ import annotations

from pathlib import Path

import pytest

from gitlora.daemon.config import Config
from gitlora.daemon.gitrepo import GitRepo

from daemonutil import DaemonProcess, gitlora, store_commits, wait_stored
from gitutil import commit_files, git, init_repo


def clone_with_remote_only_commit(tmp_path: Path) -> tuple[Path, str, str]:
    """A clone whose `origin/feature` holds a commit no local ref, tag or HEAD reaches."""
    upstream = init_repo(tmp_path / "upstream")
    base = commit_files(upstream, {"src/lib.rs": "pub fn base() -> u32 { 1 }\n"}, "base")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(upstream), str(clone))
    git(upstream, "checkout", "-q", "-b", "feature")
    remote_only = commit_files(upstream, {"src/feature.rs": "pub fn feature() -> u32 { 2 }\n"}, "feature work")
    git(clone, "fetch", "-q", "origin")
    assert git(clone, "rev-parse", "refs/remotes/origin/feature") == remote_only
    assert git(clone, "branch", "--contains", remote_only) == ""  # no local branch has it
    return clone, base, remote_only


def write_config(home: Path, include_remotes: bool) -> None:
    config = home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f"[ingest]\ninclude_remotes = {'true' if include_remotes else 'false'}\n"
                      "min_item_bytes = 0\n")  # its commits hold one-line functions


def test_the_option_defaults_to_off():
    assert Config().ingest.include_remotes is False


@pytest.mark.parametrize("include", [False, True], ids=["remotes-off", "remotes-on"])
def test_tips_follow_remote_refs_only_when_asked(tmp_path, include):
    clone, base, remote_only = clone_with_remote_only_commit(tmp_path)
    tips = GitRepo(clone, include_remotes=include).tips()
    assert ("refs/remotes/origin/feature" in tips) is include
    assert tips["refs/heads/main"] == base
    assert (remote_only in tips.values()) is include


@pytest.mark.parametrize("include", [False, True], ids=["remotes-off", "remotes-on"])
def test_backfill_ingests_a_remote_only_commit_iff_the_option_is_set(tmp_path, isolated_home, include):
    clone, base, remote_only = clone_with_remote_only_commit(tmp_path)
    write_config(isolated_home, include)
    gitlora("backfill", "--no-progress", str(clone))
    stored = store_commits(clone)
    assert base in stored
    assert (remote_only in stored) is include
    if include:
        assert stored[remote_only]["status"] == "ingested" and stored[remote_only]["examples"] == 1


@pytest.mark.parametrize("include", [False, True], ids=["remotes-off", "remotes-on"])
def test_the_daemon_ingests_a_fetched_commit_iff_the_option_is_set(tmp_path, isolated_home, include):
    clone, base, _ = clone_with_remote_only_commit(tmp_path)
    write_config(isolated_home, include)
    upstream = tmp_path / "upstream"
    daemon = DaemonProcess().start()
    try:
        gitlora("install", str(clone))
        wait_stored(clone, [base])
        # `git fetch` fires no hook: only the watcher sees refs/remotes change. A later local commit is the
        # barrier: once it is stored, the reconcile after the fetch has run.
        fetched = commit_files(upstream, {"src/more.rs": "pub fn more() -> u32 { 3 }\n"}, "more feature work")
        git(clone, "fetch", "-q", "origin")
        local = commit_files(clone, {"src/local.rs": "pub fn local() -> u32 { 4 }\n"}, "local work")
        stored = wait_stored(clone, [local])
        assert (fetched in stored) is include
    finally:
        daemon.stop()

