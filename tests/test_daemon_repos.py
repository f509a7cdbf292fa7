"""Repositories that come and go, stores that break, configs that change, with a real daemon process.

Each test drives the daemon through its socket and the CLI and waits for what it observes (status,
stores on disk); none sleeps a fixed time.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from gitlora.daemon import paths, repos
from gitlora.daemon.control import request

from daemonutil import DaemonProcess, gitlora, store_commits, wait_stored
from gitutil import commit_files, git, init_repo, synthetic_history


def make_repo(path: Path, marker: str) -> Path:
    repo = init_repo(path)
    commit_files(repo, {"src/lib.rs": f"pub fn {marker}() -> u8 {{ 0 }}\n"}, f"base {marker}")
    commit_files(repo, {"src/more.rs": f"pub fn {marker}_more() -> u8 {{ 1 }}\n"}, f"more {marker}")
    return repo


def all_commits(repo: Path) -> set[str]:
    return set(git(repo, "rev-list", "--all").split())


def installed_and_stored(*repos: Path) -> dict[str, dict]:
    """One life of a daemon: install each repository, wait until all its history is stored, stop."""
    process = DaemonProcess().start()
    try:
        stored: dict[str, dict] = {}
        for repo in repos:
            gitlora("install", str(repo))
        for repo in repos:
            stored.update(wait_stored(repo, all_commits(repo)))
        return stored
    finally:
        process.stop()


def git_dir_of(repo: Path) -> str:
    return str((repo / ".git").resolve())


def state_dirs() -> list[Path]:
    base = paths.state_home() / "repos"
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def wait_for(predicate, what: str, timeout: float = 120.0):
    """Poll `predicate` (returns a truthy value when done) until it holds; the value, or fail saying what."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def repo_view(status: dict, git_dir: str) -> dict | None:
    return next((r for r in status["repos"] if r["git_dir"] == git_dir), None)


def view_when(daemon: DaemonProcess, git_dir: str, condition, what: str, timeout: float = 120.0) -> dict:
    def check():
        view = repo_view(daemon.status(), git_dir)
        return view if view is not None and condition(view) else None

    return wait_for(check, what, timeout)


def test_a_damaged_store_is_listed_with_its_next_step_and_the_others_are_served(tmp_path):
    good = make_repo(tmp_path / "good", "good")
    bad = make_repo(tmp_path / "bad", "bad")
    installed_and_stored(good, bad)
    data = paths.RepoPaths.for_git_dir(git_dir_of(bad)).store / "data.mdb"
    with open(data, "r+b") as handle:  # both meta pages garbage: not an LMDB file any more
        handle.write(b"\xab" * 8192)

    process = DaemonProcess().start()
    try:
        fresh = commit_files(good, {"src/new.rs": "pub fn fresh() {}\n"}, "after the damage")
        wait_stored(good, [fresh])  # the daemon is up and serves the healthy repository
        view = view_when(process, git_dir_of(bad), lambda v: v["state"] == "damaged", "the damaged state")
        assert "gitlora repair" in view["next_step"] and git_dir_of(bad) in view["next_step"]
        assert view["reason"]
        assert repo_view(process.status(), git_dir_of(good))["state"] == "ok"
        text = gitlora("status").stdout
        assert "[damaged]" in text and "gitlora repair" in text
        # what needs the store is refused with a clear error, and the daemon stays up
        reply = request({"cmd": "train", "repo": git_dir_of(bad), "now": True}, timeout=30)
        assert reply["ok"] and "damaged" in reply["result"]
        assert process.proc.poll() is None
    finally:
        process.stop()


def test_repair_through_the_daemon_restores_a_damaged_store_exactly_once(tmp_path, daemon):
    repo = make_repo(tmp_path / "work", "rep")
    gitlora("install", str(repo))
    before = wait_stored(repo, all_commits(repo))
    daemon.stop()
    data = paths.RepoPaths.for_git_dir(git_dir_of(repo)).store / "data.mdb"
    with open(data, "r+b") as handle:
        handle.write(b"\xab" * 8192)
    daemon.start()
    view_when(daemon, git_dir_of(repo), lambda v: v["state"] == "damaged", "the damaged state")
    reply = request({"cmd": "repair", "repo": str(repo)}, timeout=300)
    assert reply["ok"], reply
    assert isinstance(reply["summary"], str) and reply["summary"]
    view = view_when(daemon, git_dir_of(repo), lambda v: v["state"] == "ok", "the repaired state")
    assert view["commits_ingested"] == len(before)
    assert set(store_commits(repo)) == set(before)
    later = commit_files(repo, {"src/later.rs": "pub fn later() {}\n"}, "after the repair")
    wait_stored(repo, [later])
    assert view_when(daemon, git_dir_of(repo), lambda v: v["commits_ingested"] == len(before) + 1,
                     "one more commit, stored once")
    # the CLI through the daemon: a sound store is only checked, unless --force asks for a rebuild
    assert "rebuilt" not in gitlora("repair", str(repo)).stdout
    forced = gitlora("repair", "--force", str(repo)).stdout
    assert "rebuilt" in forced, forced
    assert set(store_commits(repo)) == set(before) | {later}


def test_train_now_and_repair_refuse_a_name_that_matches_several_repositories(tmp_path, daemon):
    first, second = make_repo(tmp_path / "a" / "twin", "one"), make_repo(tmp_path / "b" / "twin", "two")
    for repo in (first, second):
        gitlora("install", str(repo))
    for payload in ({"cmd": "train", "repo": "twin", "now": True}, {"cmd": "repair", "repo": "twin"}):
        reply = request(payload, timeout=30)
        assert not reply["ok"] and "names 2 repositories" in reply["error"], (payload, reply)


def test_repair_and_unregister_need_a_repository(tmp_path, daemon):
    repo = make_repo(tmp_path / "work", "sel")
    gitlora("install", str(repo))
    for payload in ({"cmd": "unregister"}, {"cmd": "unregister", "all": True}, {"cmd": "repair"},
                    {"cmd": "repair", "all": True}, {"cmd": "train", "now": True}, {"cmd": "pause"}):
        reply = request(payload, timeout=10)
        assert not reply["ok"] and "repo" in reply["error"], (payload, reply)
    assert repo_view(daemon.status(), git_dir_of(repo)) is not None  # still registered and served
    assert repos.registered() == [git_dir_of(repo)]
    assert request({"cmd": "pause", "all": True}, timeout=10)["ok"]
    assert view_when(daemon, git_dir_of(repo), lambda v: v["state"] == "paused", "paused")["paused"]


def test_a_deleted_repository_is_listed_after_a_restart_and_uninstall_forgets_it(tmp_path):
    kept = make_repo(tmp_path / "kept", "kept")
    doomed = make_repo(tmp_path / "doomed", "doomed")
    installed_and_stored(kept, doomed)
    doomed_git_dir = git_dir_of(doomed)
    shutil.rmtree(doomed)

    process = DaemonProcess().start()
    try:
        view = view_when(process, doomed_git_dir, lambda v: v["state"] == "missing", "the missing state")
        assert "gitlora install NEWPATH" in view["next_step"]
        assert f"gitlora uninstall --forget {doomed_git_dir}" in view["next_step"]
        assert view["errors"] and view["errors"][0]["time"] > 0 and view["errors"][0]["at"]
        assert repo_view(process.status(), git_dir_of(kept))["state"] == "ok"

        done = gitlora("uninstall", str(doomed), check=False)
        assert done.returncode == 0, done.stderr
        assert "state stays in" in done.stdout
        assert repo_view(process.status(), doomed_git_dir) is None
        assert repos.registered() == [git_dir_of(kept)]
        assert paths.RepoPaths.for_git_dir(doomed_git_dir).store.exists()  # state kept (adoptable, removable)
    finally:
        process.stop()


def test_uninstall_forget_of_a_repository_that_exists_restores_its_hooks_too(tmp_path):
    repo = make_repo(tmp_path / "here", "here")
    gitlora("install", "--no-backfill", str(repo))
    hook = Path(git(repo, "rev-parse", "--path-format=absolute", "--git-path", "hooks").strip()) / "post-commit"
    assert hook.exists()
    gitlora("uninstall", "--forget", str(repo))
    assert not hook.exists() and repos.registered() == []  # no hook left writing spool lines for nobody


def test_uninstall_of_a_repository_never_installed_creates_no_state(tmp_path):
    stranger = make_repo(tmp_path / "stranger", "stranger")
    out = gitlora("uninstall", str(stranger)).stdout
    assert "was not registered" in out and state_dirs() == []


def test_uninstall_forget_without_a_daemon(tmp_path):
    repo = make_repo(tmp_path / "gone", "gone")
    gitlora("install", "--no-backfill", str(repo))
    git_dir = git_dir_of(repo)
    shutil.rmtree(repo)
    missing = gitlora("uninstall", "--forget", str(tmp_path / "nothing-here"), check=False)
    assert missing.returncode == 2 and "no registered repository" in missing.stderr
    done = gitlora("uninstall", "--forget", git_dir, check=False)
    assert done.returncode == 0, done.stderr
    assert repos.registered() == []


def test_a_repository_deleted_while_the_daemon_runs_turns_missing(tmp_path, daemon):
    repo = make_repo(tmp_path / "work", "live")
    gitlora("install", str(repo))
    wait_stored(repo, all_commits(repo))
    git_dir = git_dir_of(repo)
    shutil.rmtree(repo)
    gitlora("ingest", git_dir)
    view = view_when(daemon, git_dir, lambda v: v["state"] == "missing", "the missing state")
    assert "--forget" in view["next_step"]


def test_a_moved_repository_keeps_its_state_across_a_restart_and_install_adopts_it(tmp_path):
    old = make_repo(tmp_path / "old", "moved")
    stored = installed_and_stored(old)
    old_git_dir = git_dir_of(old)
    new = tmp_path / "new"
    os.rename(old, new)

    process = DaemonProcess().start()
    try:
        view_when(process, old_git_dir, lambda v: v["state"] == "missing", "the moved repository listed as missing")
        done = gitlora("install", str(new))
        assert f"moved from {old_git_dir}" in done.stdout
        new_git_dir = git_dir_of(new)
        view = view_when(process, new_git_dir, lambda v: v["state"] == "ok" and v["commits_ingested"] == len(stored),
                         "the adopted repository")
        assert repo_view(process.status(), old_git_dir) is None
        assert state_dirs() == [paths.RepoPaths.for_git_dir(new_git_dir).root]  # no second state dir
        assert repos.registered() == [new_git_dir]
        assert store_commits(new) == stored  # the same records: nothing was ingested again
        later = commit_files(new, {"src/after.rs": "pub fn after_move() {}\n"}, "after the move")
        wait_stored(new, [later])
        assert view["state_dir"] == str(paths.RepoPaths.for_git_dir(new_git_dir).root)
    finally:
        process.stop()


def test_install_of_a_moved_repository_without_a_daemon_adopts_its_state(tmp_path):
    old = make_repo(tmp_path / "old", "offline")
    stored = installed_and_stored(old)
    new = tmp_path / "elsewhere"
    os.rename(old, new)
    other = make_repo(tmp_path / "unrelated", "unrelated")  # other roots: never adopts anything
    done = gitlora("install", "--no-backfill", str(other))
    assert "moved from" not in done.stdout
    done = gitlora("install", "--no-backfill", str(new))
    assert "moved from" in done.stdout
    assert store_commits(new) == stored
    assert sorted(repos.registered()) == sorted([git_dir_of(new), git_dir_of(other)])
    assert len(state_dirs()) == 2


def test_errors_carry_their_time_and_clear_on_recovery(tmp_path, daemon):
    repo = make_repo(tmp_path / "work", "err")
    gitlora("install", str(repo))
    wait_stored(repo, all_commits(repo))
    git_dir = git_dir_of(repo)
    spool = paths.RepoPaths.for_git_dir(git_dir).spool
    spool.unlink(missing_ok=True)
    spool.mkdir()  # the spool cannot be read: every reconcile fails until it can
    gitlora("ingest", str(repo))
    view = view_when(daemon, git_dir, lambda v: v["errors"], "a reconcile error")
    error = view["errors"][-1]
    assert error["kind"] == "reconcile" and "IsADirectoryError" in error["error"]
    assert abs(error["time"] - time.time()) < 120 and error["at"][:4].isdigit()
    assert error["at"] in gitlora("status").stdout
    spool.rmdir()
    gitlora("ingest", str(repo))
    view_when(daemon, git_dir, lambda v: not v["errors"], "the error to clear after a good reconcile")


def _write_config(text: str) -> None:
    path = paths.config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_sighup_reloads_a_good_config_and_keeps_the_old_one_when_it_is_bad(tmp_path):
    _write_config("[daemon]\nrescan_interval_s = 300\n")
    process = DaemonProcess().start()
    try:
        first = process.status()
        assert first["config"]["rescan_interval_s"] == 300 and first["config"]["reload_error"] is None
        _write_config("[daemon]\nrescan_interval_s = 40\ndebounce_ms = 20\n[train]\nmin_new_shards = 9\n")
        process.proc.send_signal(signal.SIGHUP)
        reloaded = wait_for(lambda: (s := process.status())["config"]["rescan_interval_s"] == 40 and s,
                            "the new config in status")
        assert reloaded["config"]["debounce_ms"] == 20 and reloaded["config"]["min_new_shards"] == 9
        assert reloaded["config"]["hash"] != first["config"]["hash"]
        assert reloaded["next_rescan"] - time.time() <= 41  # the rescan job was rescheduled

        _write_config("[daemon]\nrescan_interval_s = \"soon\"\n")
        process.proc.send_signal(signal.SIGHUP)
        refused = wait_for(lambda: (s := process.status())["config"]["reload_error"] and s, "the refusal in status")
        assert "rescan_interval_s" in refused["config"]["reload_error"]["error"]
        assert refused["config"]["rescan_interval_s"] == 40 and refused["config"]["hash"] == reloaded["config"]["hash"]
        assert "config reload refused" in gitlora("status").stdout
        assert process.proc.poll() is None

        _write_config("[daemon]\nrescan_interval_s = 60\n")
        process.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: (s := process.status())["config"]["rescan_interval_s"] == 60
                 and s["config"]["reload_error"] is None, "recovery from the refused config")
    finally:
        process.stop()
    log_lines = (paths.state_home() / "daemon.log").read_text().splitlines()
    assert any("config_reload_refused" in line and "rescan_interval_s" in line for line in log_lines)


def _task_nice_values(pid: int) -> list[int]:
    values = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        values.append(int(fields[16]))  # field 19 of stat(5); fields[0] is field 3
    return values


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice values are read from Linux /proc")
def test_status_is_served_while_the_worker_ingests_and_ingest_runs_niced(tmp_path, daemon):
    repo = synthetic_history(tmp_path / "big", 400, files=12, functions=8)
    gitlora("install", str(repo))
    git_dir = git_dir_of(repo)
    slowest = 0.0
    saw_busy = False
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        started = time.monotonic()
        view = repo_view(daemon.status(), git_dir)
        slowest = max(slowest, time.monotonic() - started)
        if view and view.get("ingesting") and view.get("queue_depth", 0) > 0:
            saw_busy = True
            nice = _task_nice_values(daemon.proc.pid)
            assert max(nice) >= 10 and min(nice) == 0, nice  # the ingest thread, and only it, runs nicer
        if view and view.get("commits_ingested") == 400:
            break
    else:
        raise AssertionError("the history was not ingested in time")
    assert saw_busy, "never saw the worker busy: status was not answered during the ingest"
    assert slowest < 1.0, f"a status took {slowest:.2f}s during the ingest"


def test_a_bare_repository_has_one_name_online_and_offline(tmp_path, daemon):
    source = make_repo(tmp_path / "source", "bare")
    bare = tmp_path / "foo.git"
    git(tmp_path, "clone", "-q", "--bare", str(source), str(bare))
    gitlora("install", str(bare))
    git_dir = str(bare.resolve())
    online = view_when(daemon, git_dir, lambda v: v.get("commits_ingested") == 2, "the bare repository's history")
    daemon.stop()
    offline = repo_view(json.loads(gitlora("status", "--json", check=False).stdout), git_dir)
    assert offline is not None and offline["commits_ingested"] == 2
    assert online["name"] == offline["name"] == "foo"
