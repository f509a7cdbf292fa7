"""The daemon's main: one per user (a lock), serving every registered repository.

Threads: one ingest writer per repo (repo_worker), the watchdog observer, the APScheduler background
scheduler (periodic rescan; training rounds), the control socket server; the main thread only waits,
pings the systemd watchdog and handles SIGTERM and SIGHUP (reload the config). Never imports torch: training
runs in a subprocess. Each repository's store is used by its worker thread only; everyone else reads the
snapshot the worker publishes or sends it a message.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from watchdog.observers import Observer

from . import config as config_mod
from . import adapter_export, log, paths, repos, sdnotify, training_jobs
from .control import ControlServer, raise_open_file_limit
from .gitrepo import GitRepo, GitRepoError, limit_object_cache
from .memory import configure_malloc
from .repo_worker import RepoWorker, WorkerBusy
from .status_view import error_entry, missing_next_step
from .watcher import RepoWatcher

_log = log.get("gitlora.daemon")


# How long a `repair` request may wait for its rebuild (the CLI asks for its own, up to this).
_MAX_REPAIR_S = 6 * 3600.0


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


def _config_view(config: config_mod.Config) -> dict[str, Any]:
    """What `status` shows of the effective config: a hash of all of it, and the values people tune."""
    dumped = config.model_dump_json()
    return {"hash": hashlib.sha256(dumped.encode()).hexdigest()[:16],
            "rescan_interval_s": config.daemon.rescan_interval_s, "debounce_ms": config.daemon.debounce_ms,
            "socket_timeout_s": config.daemon.socket_timeout_s, "quiet_flush_s": config.shards.quiet_flush_s,
            "min_new_shards": config.train.min_new_shards, "min_new_examples": config.min_new_examples(),
            "check_interval_s": config.train.check_interval_s,
            "base_model": config.train.base_model}


class Daemon:
    def __init__(self, config: config_mod.Config) -> None:
        self.config = config
        self.stop_event = threading.Event()
        self.workers: dict[str, RepoWorker] = {}  # common git dir -> worker
        self.unavailable: dict[str, dict[str, Any]] = {}  # registered git dir that cannot be served -> its view
        self.watchers: dict[str, RepoWatcher] = {}
        self.started_at = time.time()
        self.observer = Observer()
        self.scheduler = BackgroundScheduler(daemon=True)
        self.server = ControlServer(paths.control_socket_path(), self.handle,
                                    timeout_s=config.daemon.socket_timeout_s)
        self._lock = threading.Lock()  # guards the two dicts above (control, scheduler and main threads)
        self._wake_main = threading.Event()  # a signal arrived: the main thread looks at what it asks for
        self._reload_requested = threading.Event()
        self._config_loaded_at = time.time()
        self._config_error: dict[str, Any] | None = None
        self.trainer: training_jobs.TrainingCoordinator | None = None  # attached when the daemon runs
        self.exporter: adapter_export.ExportKeeper | None = None  # likewise

    # -- repositories ----------------------------------------------------------------------------
    def add_repo(self, path: str) -> RepoWorker:
        opened = repos.open_repo(path, self.config)
        key = str(opened.git.common_dir)
        with self._lock:
            if key in self.workers:
                return self.workers[key]
            worker = RepoWorker(opened, self.config)
            self.workers[key] = worker
            self.unavailable.pop(key, None)
        # The watcher names the path that changed (its tests observe that); the worker needs only the nudge.
        watcher = RepoWatcher(self.observer, opened.git.common_dir, opened.paths.root, opened.paths.spool,
                              lambda _path: worker.nudge())
        worker.watcher_state = watcher.state
        self.watchers[key] = watcher
        worker.start()
        _log.info("repo_added", repo=worker.name, git_dir=key)
        return worker

    def _add_registered(self, git_dir: str) -> None:
        """Serve a registered repository, or list it with why it cannot be served and what to do."""
        try:
            self.add_repo(git_dir)
            return
        except GitRepoError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - one broken repo must not keep the others from being served
            error = f"{type(exc).__name__}: {exc}"
        _log.error("repo_unavailable", git_dir=git_dir, error=error)
        gone = not Path(git_dir).exists()
        view = {"name": paths.repo_name(git_dir), "git_dir": git_dir,
                "state_dir": str(paths.RepoPaths.for_git_dir(git_dir).root),
                "state": "missing" if gone else "unreadable", "reason": error,
                "next_step": missing_next_step(git_dir) if gone else
                f"fix the repository, or `gitlora uninstall --forget {git_dir}` to stop serving it",
                "errors": [error_entry("open", error)]}
        with self._lock:
            self.unavailable[git_dir] = view

    def all_workers(self) -> list[RepoWorker]:
        with self._lock:
            return list(self.workers.values())

    def find(self, selector: str) -> list[RepoWorker]:
        """Workers matching a path, git dir or name."""
        workers = self.all_workers()
        try:
            key = str(GitRepo(selector).common_dir)
        except GitRepoError:
            key = None
        return [w for w in workers if w.git_dir in (key, selector) or w.name == selector]

    def _find_unavailable(self, selector: str) -> list[str]:
        path = os.path.abspath(selector)
        with self._lock:
            return [git_dir for git_dir, view in self.unavailable.items()
                    if selector in (git_dir, view["name"]) or path in (git_dir, str(Path(git_dir).parent))]

    def select(self, request: dict[str, Any], *, allow_all: bool) -> list[RepoWorker] | str:
        """The workers a request names, or an error. A missing selector is never "all": that is `"all": true`."""
        cmd = request["cmd"]
        if request.get("all") is True:
            if not allow_all:
                return f"{cmd} does not take \"all\"; name one repository with \"repo\""
            return self.all_workers()
        selector = request.get("repo")
        if not isinstance(selector, str) or not selector:
            return f"{cmd} needs \"repo\" (a path, git dir or name)" + (' or "all": true' if allow_all else "")
        targets = self.find(selector)
        if not targets:
            return f"no registered repository matches {selector!r}"
        return targets

    # -- control socket --------------------------------------------------------------------------
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request["cmd"]
        if cmd == "status":
            return self.status()
        if cmd in ("ingest", "pause", "resume"):
            targets = self.select(request, allow_all=True)
            if isinstance(targets, str):
                return {"ok": False, "error": targets}
            if cmd == "ingest":
                for worker in targets:
                    worker.nudge()
                return {"repos": [w.name for w in targets]}
            replies = [(worker, worker.send(cmd)) for worker in targets]
            waiting = [w.name for w, reply in replies if not _settled(reply, timeout=2.0)]
            return {"repos": [w.name for w in targets], "pending": waiting}
        if cmd == "register":
            return self._register(request)
        if cmd == "unregister":
            return self._unregister(request)
        if cmd == "repair":
            return self._repair(request)
        if cmd == "stop":
            threading.Timer(0.05, self.stop_event.set).start()
            return {"stopping": True}
        if cmd == "train" and self.trainer is not None:
            return self.trainer.handle(request)
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _register(self, request: dict[str, Any]) -> dict[str, Any]:
        path = request.get("path")
        if not isinstance(path, str):
            return {"ok": False, "error": "register needs a string 'path'"}
        try:
            git = GitRepo(path)
            key = str(git.common_dir)
            adopted = None
            if not paths.RepoPaths.for_git_dir(key).store.exists():
                adopted = self._adopt_moved(git)
            worker = self.add_repo(path)
        except GitRepoError as exc:
            return {"ok": False, "error": str(exc)}
        repos.register(worker.git.common_dir)
        return {"repo": worker.name, "git_dir": worker.git_dir, "adopted_from": adopted}

    def _adopt_moved(self, git: GitRepo) -> str | None:
        """A repository registered before under a path that is gone now: stop serving the old path and move
        its state to the new one, so its history is not ingested a second time."""
        candidates = repos.moved_candidates(git)
        for old in candidates:
            with self._lock:
                worker = self.workers.get(old)
            if worker is not None:  # its git dir is gone: nothing to lose by stopping it to read its store
                self._drop(worker)
            if not repos.holds_history_of(old, git):
                if worker is not None:
                    self._add_registered(old)
                continue
            with self._lock:
                self.unavailable.pop(old, None)
            repos.adopt(old, git)
            _log.info("repo_adopted", old_git_dir=old, git_dir=str(git.common_dir))
            return old
        return None

    def _unregister(self, request: dict[str, Any]) -> dict[str, Any]:
        selector = request.get("repo")
        if request.get("all") is not None or not isinstance(selector, str) or not selector:
            return {"ok": False, "error": 'unregister needs "repo" (a path, git dir or name); it never means all'}
        workers = self.find(selector)
        gone = self._find_unavailable(selector)
        if not workers and not gone:
            return {"ok": False, "error": f"no registered repository matches {selector!r}"}
        names = []
        for worker in workers:
            self._drop(worker)
            repos.unregister(Path(worker.git_dir))
            names.append(worker.name)
        for git_dir in gone:
            with self._lock:
                view = self.unavailable.pop(git_dir, None)
            repos.unregister(Path(git_dir))
            names.append(view["name"] if view else git_dir)
        return {"repos": names}

    def _repair(self, request: dict[str, Any]) -> dict[str, Any]:
        targets = self.select(request, allow_all=False)
        if isinstance(targets, str):
            return {"ok": False, "error": targets}
        if len(targets) != 1:
            return {"ok": False, "error": f"{request['repo']!r} names {len(targets)} repositories; name one"}
        worker = targets[0]
        if self.trainer is not None and self.trainer.is_training(worker):
            return {"ok": False, "error": f"a training round is running for {worker.name}; repair after it"}
        timeout = request.get("timeout_s")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= _MAX_REPAIR_S:
            timeout = 3600.0
        try:
            report = worker.call("repair", timeout=float(timeout), force=request.get("force") is True)
        except WorkerBusy as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the repair's own failure, said in one line
            return {"ok": False, "error": f"repair of {worker.name} failed: {type(exc).__name__}: {exc}",
                    "state": worker.state}
        return {"repo": worker.name, "summary": report.summary(), "report": report.as_dict(), "state": worker.state}

    def _drop(self, worker: RepoWorker) -> None:
        """Stop serving a worker (its thread ends and its store closes, so the repo can be added again)."""
        with self._lock:
            self.workers.pop(worker.git_dir, None)
        watcher = self.watchers.pop(worker.git_dir, None)
        if watcher:
            watcher.close()
        worker.stop()

    def status(self) -> dict[str, Any]:
        repos_view = []
        for worker in self.all_workers():
            view = dict(worker.snapshot())
            view["errors"] = list(view.get("errors", ()))
            if self.trainer is not None:
                view["training"] = self.trainer.status_for(worker)
            if self.exporter is not None:
                view["export"] = self.exporter.status_for(worker)
            repos_view.append(view)
        with self._lock:
            repos_view.extend(dict(view) for view in self.unavailable.values())
        reply: dict[str, Any] = {
            "pid": os.getpid(), "started_at": self.started_at, "uptime_s": round(time.time() - self.started_at, 1),
            "repos": repos_view,
            "config": {**_config_view(self.config), "loaded_at": self._config_loaded_at,
                       "path": str(paths.config_path()), "reload_error": self._config_error},
        }
        job = self.scheduler.get_job("rescan") if self.scheduler.running else None
        reply["next_rescan"] = job.next_run_time.timestamp() if job and job.next_run_time else None
        if self.trainer is not None:
            reply["training"] = self.trainer.status()
        return reply

    # -- config ------------------------------------------------------------------------------------
    def reload_config(self) -> bool:
        """SIGHUP: load the config again; a bad one is refused (logged, shown in status) and the old kept."""
        try:
            new = config_mod.load()
        except config_mod.ConfigError as exc:
            now = time.time()
            self._config_error = {"error": str(exc), "time": now,
                                  "at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))}
            _log.error("config_reload_refused", reason=str(exc).splitlines()[0] if str(exc) else "invalid")
            return False
        old, self.config = self.config, new
        self._config_error = None
        self._config_loaded_at = time.time()
        self.server.timeout_s = new.daemon.socket_timeout_s
        if self.scheduler.running and new.daemon.rescan_interval_s != old.daemon.rescan_interval_s:
            self.scheduler.reschedule_job("rescan", trigger="interval", seconds=new.daemon.rescan_interval_s)
        if self.trainer is not None:
            self.trainer.reconfigure(new)
        if self.exporter is not None:
            self.exporter.reconfigure(new)
        for worker in self.all_workers():
            worker.send("reconfigure", config=new)
        _log.info("config_reloaded", **_config_view(new))
        return True

    # -- lifecycle -------------------------------------------------------------------------------
    def rescan(self) -> None:
        for worker in self.all_workers():
            worker.nudge()
        with self._lock:
            back = [git_dir for git_dir, view in self.unavailable.items() if Path(git_dir).exists()]
        for git_dir in back:  # a repository moved back, or repaired by hand: serve it again
            self._add_registered(git_dir)

    def _signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested.set()
        else:
            self.stop_event.set()
        self._wake_main.set()

    def run(self) -> int:
        lock = DaemonLock(paths.daemon_lock_path())
        lock.acquire()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._signal)
        try:
            self.observer.start()
            for git_dir in repos.registered():
                self._add_registered(git_dir)
            self.scheduler.add_job(self.rescan, "interval", id="rescan", seconds=self.config.daemon.rescan_interval_s,
                                   max_instances=1, coalesce=True)
            self.trainer = training_jobs.attach(self)  # torch-free: plans rounds, starts the trainer subprocess
            self.exporter = adapter_export.attach(self)  # follows adapters/current into [export] dir (subprocess)
            self.scheduler.start()
            self.server.start()
            sdnotify.ready(f"serving {len(self.workers)} repositories")
            _log.info("daemon_ready", pid=os.getpid(), repos=len(self.workers))
            interval = sdnotify.watchdog_interval_s()
            tick = min(interval / 2, 10.0) if interval else 10.0
            while not self.stop_event.is_set():
                self._wake_main.wait(tick)
                self._wake_main.clear()
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    self.reload_config()
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
            if self.exporter is not None:
                self.exporter.shutdown()
            self.observer.stop()
            for worker in self.all_workers():
                if not worker.stop(timeout=60):  # finishes the transaction in flight
                    _log.error("worker_did_not_stop", repo=worker.name)
            self.observer.join(timeout=5)
            lock.release()
            _log.info("daemon_stopped")

    def _status_line(self) -> str:
        views = [w.snapshot() for w in self.all_workers()]
        stored = sum(v.get("commits_ingested", 0) for v in views)
        busy = sum(1 for v in views if v.get("ingesting"))
        bad = sum(1 for v in views if v.get("state") in ("damaged", "missing")) + len(self.unavailable)
        return (f"{len(views)} repos, {stored} commits stored" + (f", {busy} ingesting" if busy else "")
                + (f", {bad} need attention" if bad else ""))


def _settled(future: Any, timeout: float) -> bool:
    try:
        future.result(timeout)
    except Exception:  # noqa: BLE001 - a timeout (still pending) or the worker's own error
        return future.done()
    return True


def main(config: config_mod.Config | None = None) -> int:
    configure_malloc()
    # No libgit2 object cache: the daemon reads each new commit's trees once, and an 8 MB cap (its
    # accounting counts raw object bytes, not the parsed trees) still let RSS creep ~55 KB per live commit.
    limit_object_cache(0)
    raise_open_file_limit()  # before the control server sizes its connection cap from it
    config = config or config_mod.load()
    log.configure(paths.state_home() / "daemon.log")
    try:
        return Daemon(config).run()
    except AlreadyRunningError as exc:
        print(f"gitlora: {exc}")
        return 1
