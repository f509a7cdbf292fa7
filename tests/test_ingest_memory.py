"""Memory bounded by bytes: a real daemon ingesting commits of large (generated, bindgen-sized) Rust files stays
responsive while it works and returns to a small footprint when idle."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from gitlora.daemon.control import ControlError, request

from daemonutil import DaemonProcess, gitlora, wait_stored
from gitutil import commit_files, init_repo

_IDLE_RSS_LIMIT = 80 << 20
_STATUS_LIMIT_S = 1.0


def generated_bindings(seed: int, version: int, target_bytes: int = 1_900_000) -> str:
    """A bindgen-style file just under the default max_file_bytes; `version` edits every 40th struct."""
    parts = ["#![allow(non_camel_case_types)]\nuse std::os::raw::{c_int, c_void};\n"]
    size = index = 0
    while size < target_bytes:
        fields = "".join(f"    pub field_{n}: u{8 << (n % 4)},\n" for n in range(24))
        bump = version if index % 40 == 0 else 0
        chunk = (f"#[repr(C)]\n#[derive(Debug, Copy, Clone)]\npub struct bind_{seed}_{index} {{\n{fields}"
                 f"    pub tail: [u8; {index % 64 + bump}],\n}}\n"
                 f"extern \"C\" {{\n    pub fn bind_{seed}_{index}_new(x: c_int, ctx: *mut c_void) -> c_int;\n}}\n")
        parts.append(chunk)
        size += len(chunk)
        index += 1
    return "".join(parts)


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class StatusProbe(threading.Thread):
    """Asks the daemon for `status` back to back and keeps the slowest round trip."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.slowest = 0.0
        self.answered = 0
        self.failures: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            started = time.monotonic()
            try:
                ok = request({"cmd": "status"}, timeout=30).get("ok")
            except ControlError as exc:
                self.failures.append(str(exc))
                ok = False
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.answered += bool(ok)
            self._done.wait(0.02)

    def stop(self) -> None:
        self._done.set()
        self.join(60)


def ingest_watching_status(daemon: DaemonProcess, repo: Path, commits: list[tuple[str, str]]) -> None:
    """Commit each (path, text) and wait until it is stored, while `status` is asked back to back; then wait,
    bounded, for the idle daemon's memory to come down (the worker sheds it after each run)."""
    probe = StatusProbe()
    probe.start()
    try:
        for path, text in commits:
            oid = commit_files(repo, {path: text}, f"regenerate {path}")
            record = wait_stored(repo, [oid], timeout=240)[oid]
            assert record["status"] == "ingested" and record["examples"] > 0, record
            assert "skipped_files" not in record, record["skipped_files"]
    finally:
        probe.stop()
    assert probe.failures == [] and probe.answered > 10, (probe.failures[:3], probe.answered)
    assert probe.slowest < _STATUS_LIMIT_S, f"status took {probe.slowest:.2f}s during ingest"
    deadline = time.monotonic() + 60
    rss = vm_rss(daemon.proc.pid)
    while rss >= _IDLE_RSS_LIMIT and time.monotonic() < deadline:
        time.sleep(0.5)
        rss = vm_rss(daemon.proc.pid)
    assert rss < _IDLE_RSS_LIMIT, f"idle daemon holds {rss / 2**20:.0f} MB"


def installed_repo(tmp_path: Path) -> Path:
    repo = init_repo(tmp_path / "bindings")
    commit_files(repo, {"src/lib.rs": "pub mod ffi;\n"}, "base")
    gitlora("install", str(repo))
    wait_stored(repo, [commit_files(repo, {"src/util.rs": "pub fn u() {}\n"}, "small")], timeout=60)
    return repo


def test_seven_commits_of_2mb_files_leave_a_small_idle_daemon_that_answered_status_throughout(tmp_path):
    daemon = DaemonProcess().start()
    try:
        repo = installed_repo(tmp_path)
        versions = [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (2, 0), (2, 1)]  # adds and edits of three files
        ingest_watching_status(daemon, repo, [(f"src/ffi_{seed}.rs", generated_bindings(seed, version))
                                              for seed, version in versions])
    finally:
        daemon.stop()
        daemon.kill()


def test_a_file_far_above_the_default_limit_does_not_stall_status(tmp_path, isolated_home):
    config = isolated_home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("[ingest]\nmax_file_bytes = 16000000\n")
    daemon = DaemonProcess().start()
    try:
        repo = installed_repo(tmp_path)
        ingest_watching_status(daemon, repo, [("src/ffi.rs", generated_bindings(0, 0, target_bytes=12_000_000))])
    finally:
        daemon.stop()
        daemon.kill()
