"""A real `gitlora daemon` process for tests, and ways to wait on what it stored.

Every wait is for an event (a reply, a stored commit, an exit) and bounded, with bounds sized for a loaded
2-core machine: they are how long to wait before calling it a hang, not how long things should take."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gitlora.daemon import paths
from gitlora.daemon.control import ControlError, request
from gitlora.daemon.gitrepo import GitRepo
from gitlora.daemon.store import Store, StoreError


class DaemonProcess:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "DaemonProcess":
        self.proc = subprocess.Popen([sys.executable, "-m", "gitlora.daemon", "daemon"], env=self.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.proc.stdout.read().decode()}")
            try:
                if request({"cmd": "status"}, timeout=2).get("ok"):
                    return
            except ControlError:
                time.sleep(0.05)
        raise AssertionError("daemon did not answer in time")

    def status(self) -> dict:
        return request({"cmd": "status"}, timeout=30)

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM and wait for the exit status; the daemon itself gives a worker 60 s to finish its
        transaction, so a shorter wait would turn a clean, slow stop into a kill."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def store_commits(repo: Path) -> dict[str, dict]:
    store_dir = paths.RepoPaths.for_git_dir(GitRepo(repo).common_dir).store
    if not (store_dir / "data.mdb").exists():
        return {}
    with Store(store_dir, readonly=True) as store:
        return {oid.hex(): record for oid, record in store.iter_commits()}


def store_examples(repo: Path) -> list[dict]:
    store_dir = paths.RepoPaths.for_git_dir(GitRepo(repo).common_dir).store
    with Store(store_dir, readonly=True) as store:
        return [example for _, example in store.iter_examples()]


def wait_stored(repo: Path, oids, timeout: float = 120) -> dict[str, dict]:
    wanted = set(oids)
    deadline = time.monotonic() + timeout
    while True:
        try:
            commits = store_commits(repo)
        except StoreError:  # the daemon has created the file but not yet its databases
            commits = {}
        if wanted <= set(commits):
            return commits
        if time.monotonic() > deadline:
            missing = sorted(wanted - set(commits))
            raise AssertionError(f"{len(missing)} commits not stored in {timeout}s: {missing[:5]}")
        time.sleep(0.05)


def gitlora(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "gitlora.daemon", *args], capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"gitlora {' '.join(args)} exited {done.returncode}: {done.stdout}{done.stderr}")
    return done


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
