"""The ref watcher: which filesystem changes are nudges (the pure filter), and a real observer on a real
repository nudging for ref updates but not for object writes."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from watchdog.observers import Observer

from gitlora.daemon.watcher import RepoWatcher, is_relevant

from gitutil import commit_files, git, init_repo

GIT_DIR = Path("/home/u/project/.git")
SPOOL = Path("/home/u/.local/state/gitlora/repos/project-0123abcd/spool")


@pytest.mark.parametrize("path", [
    "refs/heads/main",
    "refs/heads/feature/deep/name",
    "refs/tags/v1.0",
    "refs/remotes/origin/main",
    "refs/heads",  # a directory moved or created under refs/
    "packed-refs",
    "HEAD",
    "ORIG_HEAD",
    "FETCH_HEAD",
    "worktrees/wt1/HEAD",
])
def test_ref_changes_are_relevant(path):
    assert is_relevant(GIT_DIR, SPOOL, str(GIT_DIR / path))


@pytest.mark.parametrize("path", [
    "refs/heads/main.lock",  # git's lock file, renamed into place later (that rename is the event)
    "packed-refs.lock",
    "HEAD.lock",
    "worktrees/wt1/HEAD.lock",
    "objects/ab/cdef0123456789",
    "objects/pack/pack-1234.pack",
    "objects/info/packs",
    "index",
    "index.lock",
    "config",
    "logs/HEAD",
    "logs/refs/heads/main",
    "COMMIT_EDITMSG",
    "worktrees/wt1/index",
    "worktrees/wt1/logs/HEAD",
    "worktrees/HEAD",  # not a worktree's HEAD: one level too shallow
    "worktrees/wt1/sub/HEAD",  # one level too deep
    "hooks/post-commit",
    "",
])
def test_other_changes_in_the_git_dir_are_not(path):
    assert not is_relevant(GIT_DIR, SPOOL, str(GIT_DIR / path) if path else "")


def test_the_spool_is_relevant_and_its_neighbours_are_not():
    assert is_relevant(GIT_DIR, SPOOL, str(SPOOL))
    assert not is_relevant(GIT_DIR, SPOOL, str(SPOOL) + ".old")
    assert not is_relevant(GIT_DIR, SPOOL, str(SPOOL.parent / "gitlora.log"))
    assert not is_relevant(GIT_DIR, SPOOL, str(SPOOL.parent / "store/data.mdb"))


def test_paths_outside_the_git_dir_are_not_relevant():
    assert not is_relevant(GIT_DIR, SPOOL, "/home/u/project/src/refs/heads/main")
    assert not is_relevant(GIT_DIR, SPOOL, "/home/u/project/HEAD")
    assert not is_relevant(GIT_DIR, SPOOL, "/home/u/other/.git/refs/heads/main")
    assert not is_relevant(GIT_DIR, SPOOL, str(GIT_DIR))  # the git dir itself


class Nudges:
    """Collects nudge reasons from the watcher's observer thread; `wait_for` blocks until one matches."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, reason: str) -> None:
        with self._cond:
            self.reasons.append(reason)
            self._cond.notify_all()

    def wait_for(self, reason: str, timeout: float = 60) -> list[str]:
        with self._cond:
            if not self._cond.wait_for(lambda: reason in self.reasons, timeout):
                raise AssertionError(f"no {reason!r} nudge within {timeout}s; got {self.reasons}")
            return list(self.reasons)

    def clear(self) -> None:
        with self._cond:
            self.reasons.clear()


def test_a_real_observer_nudges_for_refs_and_spool_not_for_objects(tmp_path):
    repo = init_repo(tmp_path / "repo")
    commit_files(repo, {"src/lib.rs": "pub fn a() {}\n"}, "first")
    git(repo, "worktree", "add", "-q", "--detach", str(tmp_path / "wt"))
    git_dir = (repo / ".git").resolve()
    state = tmp_path / "state"
    spool = state / "spool"
    nudges = Nudges()
    observer = Observer()
    observer.start()
    watcher = RepoWatcher(observer, git_dir, state, spool, nudges)
    try:
        assert watcher.state == "watching"
        # inotify delivers events in order, so a relevant change made after an irrelevant one is a barrier:
        # once its nudge arrived, a nudge for the irrelevant one would have arrived before it.
        git(repo, "hash-object", "-w", "--stdin", input="loose object\n")
        git(repo, "update-ref", "refs/heads/topic", "HEAD")
        assert nudges.wait_for("fs:topic") == ["fs:topic"]
        nudges.clear()
        with open(spool, "ab") as handle:  # a hook's `>> spool`: created, written, closed
            handle.write(b"post-commit\t" + b"0" * 40 + b"\t\t\t\n")
        nudges.wait_for("fs:spool")
        nudges.clear()
        git(repo, "pack-refs", "--all")
        nudges.wait_for("fs:packed-refs")
        nudges.clear()
        commit_files(tmp_path / "wt", {"src/w.rs": "pub fn w() {}\n"}, "in the worktree")  # detached HEAD there
        reasons = nudges.wait_for("fs:HEAD")
        assert set(reasons) == {"fs:HEAD"}, reasons  # the commit's objects and index writes nudged nothing
        watcher.close()
        assert watcher.state == "stopped"
        nudges.clear()
        git(repo, "update-ref", "refs/heads/after-close", "HEAD")
        # After close: a second watcher on the same observer sees the next change; the closed one adds nothing.
        again = Nudges()
        second = RepoWatcher(observer, git_dir, state, spool, again)
        git(repo, "update-ref", "refs/heads/second", "HEAD")
        again.wait_for("fs:second")
        second.close()
        assert nudges.reasons == []
    finally:
        watcher.close()
        observer.stop()
        observer.join(timeout=10)
