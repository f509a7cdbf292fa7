"""The daemon's main: one per user (a lock), serving every registered repository.

Threads: one ingest writer per repo (repo_worker), the watchdog observer, the APScheduler background
scheduler (periodic rescan; training rounds), the control socket server; the main thread only waits,
pings the systemd watchdog and handles SIGTERM. Never imports torch: training runs in a subprocess.
"""
from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from watchdog.observers import Observer

from . import config as config_mod
from . import log, paths, repos, sdnotify
from .control import ControlServer
from .gitrepo import GitRepo, GitRepoError, limit_object_cache
from .repo_worker import RepoWorker, configure_malloc
from .watcher import RepoWatcher

_log = log.get("gitlora.daemon")


class AlreadyRunningError(Exception):
    pass


class DaemonLock:
    """flock on a file in the runtime dir: released by the kernel when the process dies, even by SIGKILL."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunningError(f"another gitlora daemon is running (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Daemon:
    def __init__(self, config: config_mod.Config) -> None:
        self.config = config
        self.stop_event = threading.Event()
        self.workers: dict[str, RepoWorker] = {}  # common git dir -> worker
        self.watchers: dict[str, RepoWatcher] = {}
        self.started_at = time.time()
        self.observer = Observer()
        self.scheduler = BackgroundScheduler(daemon=True)
        self.server = ControlServer(paths.control_socket_path(), self.handle,
                                    timeout_s=config.daemon.socket_timeout_s)
        self._lock = threading.Lock()
        self.trainer: Any = None  # the training coordinator, attached by training_jobs when available

    # -- repositories ----------------------------------------------------------------------------
    def add_repo(self, path: str) -> RepoWorker:
        opened = repos.open_repo(path, self.config)
        key = str(opened.git.common_dir)
        with self._lock:
            if key in self.workers:
                return self.workers[key]
            worker = RepoWorker(opened, self.config)
            self.workers[key] = worker
        watcher = RepoWatcher(self.observer, opened.git.common_dir, opened.paths.root, opened.paths.spool,
                              worker.nudge)
        worker.watcher_state = watcher.state
        self.watchers[key] = watcher
        worker.start()
        _log.info("repo_added", repo=worker.name, git_dir=key)
        return worker

    def find(self, selector: str | None) -> list[RepoWorker]:
        """Workers matching a path, git dir or name (all when None)."""
        with self._lock:
            workers = list(self.workers.values())
        if not selector:
            return workers
        try:
            key = str(GitRepo(selector).common_dir)
        except GitRepoError:
            key = None
        return [w for w in workers if str(w.git.common_dir) == key or w.name == selector]

    # -- control socket --------------------------------------------------------------------------
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request["cmd"]
        if cmd == "status":
            return self.status()
        if cmd in ("ingest", "pause", "resume"):
            targets = self.find(request.get("repo"))
            if not targets:
                return {"ok": False, "error": f"no registered repository matches {request.get('repo')!r}"}
            for worker in targets:
                if cmd == "ingest":
                    worker.nudge("request")
                else:
                    worker.paused = cmd == "pause"
                    if cmd == "resume":
                        worker.nudge("resume")
            return {"repos": [w.name for w in targets]}
        if cmd == "register":
            path = request.get("path")
            if not isinstance(path, str):
                return {"ok": False, "error": "register needs a string 'path'"}
            try:
                worker = self.add_repo(path)
            except GitRepoError as exc:
                return {"ok": False, "error": str(exc)}
            repos.register(worker.git.common_dir)
            return {"repo": worker.name, "git_dir": str(worker.git.common_dir)}
        if cmd == "unregister":
            targets = self.find(request.get("repo"))
            for worker in targets:
                self._remove(worker)
            return {"repos": [w.name for w in targets]}
        if cmd == "stop":
            threading.Timer(0.05, self.stop_event.set).start()
            return {"stopping": True}
        if cmd == "train" and self.trainer is not None:
            return self.trainer.handle(request)
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _remove(self, worker: RepoWorker) -> None:
        key = str(worker.git.common_dir)
        with self._lock:
            self.workers.pop(key, None)
        watcher = self.watchers.pop(key, None)
        if watcher:
            watcher.close()
        worker.stop()  # its thread ends and its store closes, so the repo can be registered again
        repos.unregister(worker.git.common_dir)

    def status(self) -> dict[str, Any]:
        with self._lock:
            workers = list(self.workers.values())
        repos_view = []
        for worker in workers:
            view = worker.status()
            if self.trainer is not None:
                view["training"] = self.trainer.status_for(worker)
            repos_view.append(view)
        reply: dict[str, Any] = {
            "pid": os.getpid(), "started_at": self.started_at, "uptime_s": round(time.time() - self.started_at, 1),
            "repos": repos_view,
        }
        job = self.scheduler.get_job("rescan") if self.scheduler.running else None
        reply["next_rescan"] = job.next_run_time.timestamp() if job and job.next_run_time else None
        if self.trainer is not None:
            reply["training"] = self.trainer.status()
        return reply

    # -- lifecycle -------------------------------------------------------------------------------
    def rescan(self) -> None:
        for worker in self.find(None):
            worker.nudge("rescan")

    def run(self) -> int:
        lock = DaemonLock(paths.daemon_lock_path())
        lock.acquire()
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        try:
            self.observer.start()
            for git_dir in repos.registered():
                try:
                    self.add_repo(git_dir)
                except Exception as exc:  # one broken repo must not keep the others from being served
                    _log.error("repo_unavailable", git_dir=git_dir, error=str(exc))
            self.scheduler.add_job(self.rescan, "interval", id="rescan", seconds=self.config.daemon.rescan_interval_s,
                                   max_instances=1, coalesce=True)
            from . import training_jobs  # torch-free: plans rounds, starts the trainer subprocess

            self.trainer = training_jobs.attach(self)
            self.scheduler.start()
            self.server.start()
            sdnotify.ready(f"serving {len(self.workers)} repositories")
            _log.info("daemon_ready", pid=os.getpid(), repos=len(self.workers))
            interval = sdnotify.watchdog_interval_s()
            tick = min(interval / 2, 10.0) if interval else 10.0
            while not self.stop_event.wait(tick):
                sdnotify.watchdog_ping()
                sdnotify.status(self._status_line())
            return 0
        finally:
            sdnotify.stopping()
            _log.info("daemon_stopping")
            self.stop_event.set()
            self.server.close()
            if self.scheduler.running:
                self.scheduler.shutdown(wait=False)
            if self.trainer is not None:
                self.trainer.shutdown()
            self.observer.stop()
            for worker in list(self.workers.values()):
                if not worker.stop(timeout=60):  # finishes the transaction in flight
                    _log.error("worker_did_not_stop", repo=worker.name)
            self.observer.join(timeout=5)
            lock.release()
            _log.info("daemon_stopped")

    def _status_line(self) -> str:
        workers = self.find(None)
        stored = sum(w.store.counters().get("commits_ingested", 0) for w in workers)
        busy = sum(1 for w in workers if w.status()["ingesting"])
        return f"{len(workers)} repos, {stored} commits stored" + (f", {busy} ingesting" if busy else "")


def main(config: config_mod.Config | None = None) -> int:
    configure_malloc()
    # No libgit2 object cache: the daemon reads each new commit's trees once, and an 8 MB cap (its
    # accounting counts raw object bytes, not the parsed trees) still let RSS creep ~55 KB per live commit.
    limit_object_cache(0)
    config = config or config_mod.load()
    log.configure(paths.state_home() / "daemon.log")
    try:
        return Daemon(config).run()
    except AlreadyRunningError as exc:
        print(f"gitlora: {exc}")
        return 1
