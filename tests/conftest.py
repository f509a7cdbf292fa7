"""Shared fixtures: an isolated HOME/XDG world per test, and a guard that fails any test writing under the
real $HOME (the pattern pre-commit's test suite uses)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_HOME = Path(os.path.expanduser("~")).resolve()
_SKIP_IN_HOME = {".cache"}  # pip and friends may legitimately touch their caches outside our control


def _snapshot(root: Path, depth: int = 3) -> dict[str, tuple[int, int]]:
    seen: dict[str, tuple[int, int]] = {}

    def walk(directory: Path, level: int) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            if level == 0 and entry.name in _SKIP_IN_HOME:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            seen[entry.path] = (st.st_mtime_ns, st.st_size)
            if level + 1 < depth and entry.is_dir(follow_symlinks=False):
                walk(Path(entry.path), level + 1)

    walk(root, 0)
    return seen


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Point HOME and every XDG dir at a temp dir, then assert the real HOME was not written to."""
    before = _snapshot(REAL_HOME)
    home = tmp_path_factory.mktemp("home")
    runtime = Path("/tmp") / f"gl-rt-{os.getpid()}-{home.name}"  # short: AF_UNIX paths are limited to 108 bytes
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local/state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local/share"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    for var in ("GITLORA_STATE_HOME", "GITLORA_CONFIG", "NOTIFY_SOCKET", "GIT_DIR", "GIT_WORK_TREE",
                "GIT_INDEX_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Test Author")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "author@example.com")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "Test Committer")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "committer@example.com")
    (home / ".gitconfig").write_text(
        "[init]\n\tdefaultBranch = main\n[user]\n\tname = Test\n\temail = test@example.com\n"
        "[protocol \"file\"]\n\tallow = always\n[advice]\n\tdetachedHead = false\n"
    )
    yield home
    after = _snapshot(REAL_HOME)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    import shutil

    shutil.rmtree(runtime, ignore_errors=True)
    if changed:
        pytest.fail(f"test wrote under the real HOME ({REAL_HOME}): {changed[:5]}")


@pytest.fixture
def daemon(isolated_home):
    """A real daemon in the test's isolated home, stopped (or killed) afterwards."""
    from daemonutil import DaemonProcess

    process = DaemonProcess().start()
    yield process
    process.stop()
    process.kill()
