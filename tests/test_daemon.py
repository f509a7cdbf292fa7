"""The live daemon, for real: hooks + watcher + rescans, a real process, a real socket, real git."""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pygit2
import pytest

from gitlora.daemon import paths
from gitlora.daemon.control import request
from gitlora.daemon.gitrepo import GitRepo
from gitlora.daemon.store import Store, StoreError

from daemonutil import DaemonProcess, gitlora, store_commits, store_examples, wait_stored
from gitutil import commit_files, git, init_repo


@pytest.fixture
def repo(tmp_path, isolated_home) -> Path:
    config = isolated_home / ".config/gitlora/config.toml"  # these histories are one-line functions: keep them
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[ingest]\nmin_item_bytes = 0\n")
    repo = init_repo(tmp_path / "work")
    commit_files(repo, {"src/lib.rs": "pub fn base() -> u8 { 0 }\n"}, "base")
    return repo


def all_commits(repo: Path) -> set[str]:
    return set(git(repo, "rev-list", "--all").split())


def test_every_way_a_commit_arrives_is_stored_exactly_once(repo, daemon, tmp_path):
    gitlora("install", str(repo))
    wait_stored(repo, all_commits(repo))
    expected: set[str] = set(all_commits(repo))

    def stored_now(*oids: str) -> None:
        expected.update(oids)
        wait_stored(repo, oids)

    # plain commit
    stored_now(commit_files(repo, {"src/a.rs": "fn a() {}\n"}, "plain"))
    # amend: the amended-away commit was stored before, the new one now
    before = commit_files(repo, {"src/b.rs": "fn b() {}\n"}, "to amend")
    stored_now(before)
    (repo / "src/b.rs").write_text("fn b() { 1; }\n")
    git(repo, "commit", "-q", "-a", "--amend", "-m", "amended")
    stored_now(git(repo, "rev-parse", "HEAD"))
    # fast-forward pull from a second clone
    other = tmp_path / "other"
    git(tmp_path, "clone", "-q", str(repo), str(other))
    pushed = commit_files(other, {"src/c.rs": "fn c() {}\n"}, "from the other clone")
    git(repo, "pull", "-q", "--ff-only", str(other), "main")
    stored_now(pushed)
    # a real merge
    git(repo, "checkout", "-q", "-b", "topic")
    topic = commit_files(repo, {"src/t.rs": "fn t() {}\n"}, "topic work")
    git(repo, "checkout", "-q", "main")
    commit_files(repo, {"src/m.rs": "fn m() {}\n"}, "main work")
    git(repo, "merge", "-q", "--no-ff", "-m", "merge topic", "topic")
    stored_now(topic, git(repo, "rev-parse", "HEAD"), git(repo, "rev-parse", "HEAD^1"))
    # rebase
    git(repo, "checkout", "-q", "-b", "feature", "HEAD~1")
    commit_files(repo, {"src/f1.rs": "fn f1() {}\n"}, "feature 1")
    commit_files(repo, {"src/f2.rs": "fn f2() {}\n"}, "feature 2")
    git(repo, "rebase", "-q", "main")
    stored_now(git(repo, "rev-parse", "HEAD"), git(repo, "rev-parse", "HEAD~1"))
    # cherry-pick
    git(repo, "checkout", "-q", "main")
    git(repo, "cherry-pick", "feature~1")
    stored_now(git(repo, "rev-parse", "HEAD"))
    # git am
    git(repo, "checkout", "-q", "-b", "patchsrc")
    commit_files(repo, {"src/p.rs": "fn p() {}\n"}, "patch me")
    patch = git(repo, "format-patch", "-1", "--stdout")
    git(repo, "checkout", "-q", "main")
    git(repo, "am", "-q", input=patch + "\n")
    stored_now(git(repo, "rev-parse", "HEAD"), git(repo, "rev-parse", "patchsrc"))
    # a linked worktree
    git(repo, "worktree", "add", "-q", "-b", "wt", str(tmp_path / "wt"))
    stored_now(commit_files(tmp_path / "wt", {"src/w.rs": "fn w() {}\n"}, "in the worktree"))
    # detached HEAD
    git(repo, "checkout", "-q", "--detach")
    stored_now(commit_files(repo, {"src/d.rs": "fn d() {}\n"}, "detached"))
    git(repo, "checkout", "-q", "main")
    # a commit written with pygit2: no hook fires, the ref watcher sees it
    lib = pygit2.Repository(str(repo))
    blob = lib.create_blob(b"pub fn from_libgit2() {}\n")
    builder = lib.TreeBuilder(lib.head.peel(pygit2.Commit).tree)
    src = lib.TreeBuilder(lib[builder.get("src").id])
    src.insert("lg.rs", blob, pygit2.enums.FileMode.BLOB)
    builder.insert("src", src.write(), pygit2.enums.FileMode.TREE)
    sig = pygit2.Signature("Lib", "lib@example.com")
    written = lib.create_commit("refs/heads/main", sig, sig, "written by libgit2", builder.write(),
                                [lib.head.target])
    stored_now(str(written))
    # a branch deleted before the daemon looked (paused): only the hook's spool line remembers the commit
    gitlora("pause")
    git(repo, "checkout", "-q", "-b", "ephemeral")
    gone = commit_files(repo, {"src/e.rs": "fn e() {}\n"}, "ephemeral work")
    git(repo, "checkout", "-q", "main")
    git(repo, "branch", "-q", "-D", "ephemeral")
    assert gone not in store_commits(repo)
    gitlora("resume")
    stored_now(gone)

    commits = store_commits(repo)
    assert expected <= set(commits)
    examples = store_examples(repo)
    keys = [(e["commit"], e["path"], e["kind"], e["qualified_name"]) for e in examples]
    assert len(keys) == len(set(keys)), "an example was stored twice"
    assert [e["qualified_name"] for e in examples if e["commit"] == str(written)] == ["lg::from_libgit2"]
    status = daemon.status()["repos"][0]
    assert status["watcher"] == "watching" and status["errors"] == []
    assert status["commits_ingested"] == len(commits)


def test_commits_made_while_the_daemon_is_down_are_ingested_at_start(repo):
    gitlora("install", "--no-backfill", str(repo))
    made = [commit_files(repo, {f"src/m{i}.rs": f"pub fn m{i}() {{}}\n"}, f"offline {i}") for i in range(20)]
    assert not set(made) & set(store_commits(repo))
    process = DaemonProcess().start()
    try:
        wait_stored(repo, made)
        assert process.status()["repos"][0]["commits_ingested"] == len(all_commits(repo))
    finally:
        process.stop()


def stored_count(repo: Path) -> int:
    store_dir = paths.RepoPaths.for_git_dir(GitRepo(repo).common_dir).store
    try:
        with Store(store_dir, readonly=True) as store:
            return store.counters().get("commits_ingested", 0)
    except StoreError:  # not created yet, or created but not initialised
        return 0


def test_sigkill_during_a_burst_loses_and_doubles_nothing(repo, tmp_path, monkeypatch):
    gitlora("install", "--no-backfill", str(repo))
    stop = threading.Event()
    made: list[str] = []

    def burst() -> None:
        n = 0
        while not stop.is_set():
            made.append(commit_files(repo, {f"src/b{n % 7}.rs": f"pub fn b{n}() -> u32 {{ {n} }}\n"}, f"burst {n}"))
            n += 1

    committer = threading.Thread(target=burst)
    committer.start()
    rng = random.Random(7)
    mid_ingest = 0  # kills that landed while this life of the daemon was storing the burst, not before it began
    try:
        for _ in range(50):
            before = stored_count(repo)
            process = DaemonProcess().start(wait=False)
            deadline = time.monotonic() + 60  # generous for a loaded box: a hang, not a slow start
            while stored_count(repo) == before and time.monotonic() < deadline and process.proc.poll() is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.03))  # somewhere inside the next transactions
            mid_ingest += stored_count(repo) > before
            process.kill()
    finally:
        stop.set()
        committer.join()
    assert mid_ingest >= 45
    process = DaemonProcess().start()
    try:
        commits = wait_stored(repo, made, timeout=60)
    finally:
        process.stop()
    assert len(made) > 50
    examples = store_examples(repo)
    per_commit = [e["commit"] for e in examples]
    for oid in made:
        assert commits[oid]["status"] == "ingested"
        assert per_commit.count(oid) == commits[oid]["examples"] >= 1
    # the same items as one clean backfill of the same history, none missing, none twice
    items = sorted((e["commit"], e["path"], e["kind"], e["qualified_name"], e["change_kind"]) for e in examples)
    monkeypatch.setenv("GITLORA_STATE_HOME", str(tmp_path / "clean"))
    gitlora("backfill", "--no-progress", str(repo))
    clean = sorted((e["commit"], e["path"], e["kind"], e["qualified_name"], e["change_kind"])
                   for e in store_examples(repo))
    assert items == clean


def test_notify_datagrams_and_graceful_sigterm(repo, tmp_path):
    gitlora("install", "--no-backfill", str(repo))
    address = str(tmp_path / "notify.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(address)
    sink.settimeout(20)
    process = DaemonProcess({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}).start()
    received: list[str] = []
    try:
        while "WATCHDOG=1" not in received:
            received.extend(sink.recv(4096).decode().splitlines())
        assert "READY=1" in received and any(line.startswith("STATUS=") for line in received)
    finally:
        assert process.stop() == 0
    while "STOPPING=1" not in received:
        received.extend(sink.recv(4096).decode().splitlines())
    sink.close()
    assert received.index("READY=1") < received.index("STOPPING=1")
    assert not paths.control_socket_path().exists()


def test_one_daemon_per_user(daemon):
    second = subprocess.run([sys.executable, "-m", "gitlora.daemon", "daemon"], capture_output=True, text=True,
                            timeout=30)
    assert second.returncode == 1 and "another gitlora daemon is running" in second.stdout
    assert daemon.status()["ok"]


def test_status_without_daemon_says_so_and_shows_the_stores(repo):
    gitlora("install", "--no-backfill", str(repo))
    gitlora("backfill", "--no-progress", str(repo))
    done = gitlora("status", check=False)
    assert done.returncode == 1
    assert "not running" in done.stderr and "1 ingested" in done.stdout
    as_json = json.loads(gitlora("status", "--json", check=False).stdout)
    assert as_json["ok"] is False and as_json["repos"][0]["commits_ingested"] == 1


def test_socket_protocol_errors_leave_the_daemon_alive(daemon, repo):
    path = str(paths.control_socket_path())

    def raw(payload: bytes) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(10)
            conn.connect(path)
            conn.sendall(payload)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)

    assert raw(b"{not json\n")["ok"] is False
    assert raw(b'["a list"]\n')["ok"] is False
    assert "too large" in raw(b'{"cmd": "status", "pad": "' + b"x" * 70_000 + b'"}\n')["error"]
    assert "unknown command" in raw(b'{"cmd": "self-destruct"}\n')["error"]
    assert raw(b'{"cmd": "ingest", "repo": "/nowhere"}\n')["ok"] is False
    assert request({"cmd": "status"})["ok"]
    assert oct(paths.runtime_dir().stat().st_mode & 0o777) == "0o700"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to act as another uid")
def test_a_peer_with_another_uid_is_refused(daemon):
    runtime = paths.runtime_dir()
    runtime.chmod(0o711)  # let uid 65534 reach the socket, so that SO_PEERCRED is what refuses it
    runtime.parent.chmod(0o711)
    paths.control_socket_path().chmod(0o666)
    client = (f"import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect({str(paths.control_socket_path())!r});"
              "s.sendall(b'{\"cmd\": \"status\"}\\n'); sys.stdout.write(s.recv(4096).decode())")
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", client],
                          capture_output=True, text=True, timeout=30)
    runtime.chmod(0o700)
    assert done.stdout, done.stderr
    reply = json.loads(done.stdout)
    assert reply["ok"] is False and "permission denied" in reply["error"]
    assert daemon.status()["ok"]


def test_uninstall_then_install_again_with_the_daemon_running(repo, daemon):
    gitlora("install", str(repo))
    wait_stored(repo, all_commits(repo))
    gitlora("uninstall", str(repo))
    assert daemon.status()["repos"] == []
    offline = commit_files(repo, {"src/u.rs": "fn u() {}\n"}, "while uninstalled")
    gitlora("install", str(repo))  # the same store opens again in the same daemon
    wait_stored(repo, [offline, commit_files(repo, {"src/v.rs": "fn v() {}\n"}, "after reinstall")])
    assert [r["name"] for r in daemon.status()["repos"]] == ["work"]
    assert daemon.status()["repos"][0]["errors"] == []
