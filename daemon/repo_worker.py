"""One registered repository inside the daemon: the store's only writer thread.

Every trigger (hook spool line, ref change, periodic rescan, `gitlora ingest`) is a nudge; the thread
debounces nudges, then reconciles: read the spool, walk back from every ref tip and spooled commit to what
the store already holds, ingest the rest, flush shards. A failure is logged and shown in `status`, and the
thread goes on.
"""
from __future__ import annotations

import ctypes
import gc
import threading
import time
import traceback
from collections import deque
from typing import Any

from . import log
from .config import Config
from .ingest import Ingestor
from .repos import OpenedRepo
from .shards import ShardWriter
from .spool_reader import SpoolReader
from .store import Store

_log = log.get("gitlora.worker")


def configure_malloc(arenas: int = 2, mmap_threshold: int = 256 << 10) -> None:
    """Tune glibc malloc for a long-lived daemon of mostly idle threads (call before starting threads;
    mallopt is the runtime form of MALLOC_ARENA_MAX / MALLOC_MMAP_THRESHOLD_, there is no library for it):
    - few arenas: glibc gives each thread that allocates its own heap arena otherwise;
    - a fixed mmap threshold: glibc raises it after each large free (up to 32 MB), so big buffers (a pool
      worker's pickled results, several MB) end up inside the heap and leave it fragmented for good. Kept
      at 256 KB they are mapped and unmapped on their own: after ingesting the-block's 606 commits the heap
      kept 28 MB more without this, 1 MB with it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD (setting it also turns off the dynamic raise)
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators behave differently anyway
        pass


def release_memory() -> None:
    """Give freed heap back to the OS after a burst, so an idle daemon stays small. CPython's allocator and
    glibc keep freed arenas otherwise; there is no library for this, it is one libc call."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass


class RepoWorker:
    def __init__(self, opened: OpenedRepo, config: Config) -> None:
        self.git = opened.git
        self.paths = opened.paths
        self.config = config
        self.name = opened.git.name
        self.store = Store(opened.paths.store)
        self.spool = SpoolReader(opened.paths.spool, self.store)
        self.shards = ShardWriter(opened.paths.shards, opened.paths.manifest, self.store)
        self.ingestor = Ingestor.for_daemon(opened.git, self.store, config.ingest)
        self.watcher_state = "not watched"
        self.paused = False
        self._stop = threading.Event()  # this worker's own: a repo can be unregistered while the daemon runs
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._first_nudge: float | None = None
        self._queue_depth = 0
        self._busy = False
        self._last: dict[str, Any] | None = None
        self._last_ingest = 0.0
        self._errors: deque[str] = deque(maxlen=10)
        self._thread = threading.Thread(target=self._loop, name=f"ingest-{self.name}", daemon=True)

    # -- control ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self.shards.unflushed() > 0:  # left by a CLI backfill or before a restart: flush after a quiet period
            self._last_ingest = time.time()
        self.nudge("start")  # drain the spool and reconcile tips: commits made while we were down
        self._thread.start()

    def nudge(self, reason: str = "nudge") -> None:
        with self._lock:
            if self._first_nudge is None:
                self._first_nudge = time.time()
        self._wake.set()

    def stop(self, timeout: float | None = 60) -> bool:
        """Finish the transaction in flight, end the thread, close the store; False if it did not end."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            return False  # never close the store under a live writer
        self.store.close()
        return True

    # -- the thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        debounce = self.config.daemon.debounce_ms / 1000
        quiet = self.config.shards.quiet_flush_s
        while not self._stop.is_set():
            woke = self._wake.wait(timeout=min(30.0, max(1.0, quiet)))
            if self._stop.is_set():
                break
            if not woke:
                self._maybe_quiet_flush()
                continue
            if self.paused:
                self._wake.clear()
                continue
            time.sleep(debounce)  # let a burst (rebase, pull) settle into one reconcile
            self._wake.clear()
            with self._lock:
                noticed, self._first_nudge = self._first_nudge, None
            try:
                self.reconcile(noticed or time.time())
            except Exception as exc:
                message = f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}"
                self._errors.append(message)
                _log.error("reconcile_failed", repo=self.name, error=message, traceback=traceback.format_exc())
                self._stop.wait(1.0)  # no hot loop on a persistent failure; the next nudge retries

    def reconcile(self, noticed: float) -> None:
        entries, position = self.spool.read_new()
        spooled = [entry.new for entry in entries]
        tips = list(self.git.tips().values()) + spooled
        pending = self.ingestor.pending(tips)
        if pending:
            self._busy = True
            self._queue_depth = len(pending)
            try:
                summary = self.ingestor.run(
                    pending, should_stop=self._stop.is_set, extra={"noticed_at": noticed},
                    on_batch=lambda commits, _examples: self._consumed(commits))
            finally:
                self._busy = False
                self._queue_depth = 0
            if summary.last_commit:
                record = self.store.get_commit(bytes.fromhex(summary.last_commit)) or {}
                latency = record.get("stored_at", time.time()) - noticed
                self._last = {"commit": summary.last_commit, "examples": record.get("examples", 0),
                              "status": record.get("status"), "stored_at": record.get("stored_at"),
                              "batch": summary.commits,
                              # commit->stored only means something for live commits, not for a backfill
                              "latency_ms": round(latency * 1000, 1) if summary.commits <= 16 else None}
                self._last_ingest = time.time()
            _log.info("ingested", repo=self.name, commits=summary.commits, examples=summary.examples,
                      skipped=summary.skipped, seconds=round(summary.seconds, 3))
            if self._stop.is_set():
                return  # SIGTERM: the current transaction is done; leave the spool position for next start
        self.spool.commit(position)
        if self.shards.unflushed() >= self.config.shards.shard_size:
            self._flush("size")
        if pending:
            self._shed_memory()

    def _consumed(self, commits: int) -> None:
        self._queue_depth = max(0, self._queue_depth - commits)

    def _maybe_quiet_flush(self) -> None:
        quiet = self.config.shards.quiet_flush_s
        if self.paused:
            return
        if self._last_ingest and time.time() - self._last_ingest >= quiet and self.shards.unflushed() > 0:
            try:
                self._flush("quiet")
            except Exception as exc:
                self._errors.append(f"shard flush: {type(exc).__name__}: {exc}")

    def _flush(self, why: str) -> None:
        entries = self.shards.flush(self.config.shards.shard_size, self.config.shards.eval_fraction)
        _log.info("shards_flushed", repo=self.name, why=why, shards=len(entries))
        self._shed_memory()

    def _shed_memory(self) -> None:
        """After a burst, so an idle daemon stays small: LMDB's write buffers, then the heap, then map pages."""
        self.store.release_write_buffers()
        release_memory()
        self.store.release_mapped_pages()

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        counters = self.store.counters()
        manifest = self.shards.manifest()
        return {
            "name": self.name,
            "git_dir": str(self.git.common_dir),
            "state_dir": str(self.paths.root),
            "commits_ingested": counters.get("commits_ingested", 0),
            "commits_skipped": counters.get("commits_skipped", 0),
            "examples": counters.get("examples", 0),
            "last_commit": self._last,
            "queue_depth": self._queue_depth,
            "ingesting": self._busy,
            "paused": self.paused,
            "watcher": self.watcher_state,
            "shards": len(manifest.get("shards", [])),
            "unflushed_examples": self.shards.unflushed(),
            "errors": list(self._errors),
        }
