"""One registered repository inside the daemon: the only thread that uses its store and its shard writer.

Every trigger (hook spool line, ref change, periodic rescan, `gitlora ingest`) is a nudge; the thread
debounces nudges, then reconciles: read the spool, walk back from every ref tip and spooled commit to what
the store already holds, ingest the rest, flush shards. Anything else that needs the store (a flush before a
training round, pause/resume, repair, a new config) is a message the thread answers through a future. Other
threads read only `snapshot()`: an immutable mapping the thread replaces after each change. A failure is
recorded with its time, shown in `status`, cleared by the next success, and the thread goes on.
"""
from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, SimpleQueue
from types import MappingProxyType
from typing import Any

from . import log, memory
from .config import Config
from .ingest import Ingestor
from .repos import OpenedRepo, open_repo
from .shards import ShardWriter
from .spool_reader import SpoolReader
from .status_view import damaged_next_step, error_entry, missing_next_step, outdated_next_step
from .store import Store, StoreDamaged, StoreError, StoreOutdated

_log = log.get("gitlora.worker")

#: How much nicer than the daemon the ingest thread (and the parser processes it spawns) runs: a commit's
#: own `git` and the user's editor come first.
INGEST_NICENESS = 10


def lower_thread_priority(niceness: int = INGEST_NICENESS) -> None:
    """Make the calling thread (Linux: a task with its own nice value) and the processes it starts nicer."""
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + niceness))
    except (OSError, AttributeError):  # not Linux, or not allowed: ingest just competes as before
        pass


@dataclass
class Message:
    """A request for the worker thread; `reply` is resolved with its answer (or its exception)."""

    kind: str  # "flush" | "verify_shards" | "pause" | "resume" | "repair" | "reconfigure"
    args: dict[str, Any] = field(default_factory=dict)
    reply: Future = field(default_factory=Future)


class WorkerBusy(Exception):
    """The worker did not answer a message in time (it is inside a long ingest or repair)."""


class RepoWorker:
    def __init__(self, opened: OpenedRepo, config: Config) -> None:
        self.opened = opened
        self.git = opened.git
        self.paths = opened.paths
        self.config = config
        self.name = opened.git.name
        self.git_dir = str(opened.git.common_dir)
        self.watcher_state = "not watched"
        # Owned by the thread (None until it has opened the store, or while the store is damaged):
        self._store: Store | None = None
        self._spool: SpoolReader | None = None
        self._shards: ShardWriter | None = None
        self._ingestor: Ingestor | None = None
        self._paused = False
        self._damage: str | None = None
        self._outdated: str | None = None  # why the store needs `gitlora upgrade`: nothing is ingested until then
        self._missing = False
        self._errors: list[dict[str, Any]] = []  # {"kind", "error", "at", "time"}, newest last; never mutated
        self._last: dict[str, Any] | None = None
        self._last_ingest = 0.0
        # Shared with other threads:
        self._stop = threading.Event()  # this worker's own: a repo can be unregistered while the daemon runs
        self._wake = threading.Event()
        self._inbox: SimpleQueue[Message] = SimpleQueue()
        self._nudge_lock = threading.Lock()
        self._first_nudge: float | None = None
        self._snapshot: Mapping[str, Any] = MappingProxyType(self._base_view() | {"state": "starting"})
        self._manifest: Mapping[str, Any] = MappingProxyType({"shards": [], "groups": []})
        self._thread = threading.Thread(target=self._loop, name=f"ingest-{self.name}", daemon=True)

    # -- what other threads may call -------------------------------------------------------------
    def start(self) -> None:
        self.nudge()  # drain the spool and reconcile tips: commits made while we were down
        self._thread.start()

    def nudge(self) -> None:
        with self._nudge_lock:
            if self._first_nudge is None:
                self._first_nudge = time.time()
        self._wake.set()

    def send(self, kind: str, **args: Any) -> Future:
        """Queue a message for the thread; the future resolves with its answer."""
        message = Message(kind, args)
        if self._stop.is_set() or (self._thread.ident is not None and not self._thread.is_alive()):
            message.reply.set_exception(WorkerBusy(f"{self.name}: the worker has stopped"))
            return message.reply
        self._inbox.put(message)
        self._wake.set()
        return message.reply

    def call(self, kind: str, timeout: float, **args: Any) -> Any:
        """`send` and wait for the answer; WorkerBusy when the thread is busy past `timeout`."""
        future = self.send(kind, **args)
        try:
            return future.result(timeout)
        except TimeoutError:
            raise WorkerBusy(f"{self.name}: busy (ingesting or repairing); try again shortly") from None

    def snapshot(self) -> Mapping[str, Any]:
        """The latest published view (immutable; replaced, never changed, by the worker thread)."""
        return self._snapshot

    def manifest(self) -> Mapping[str, Any]:
        """The shard manifest as the worker last wrote or read it."""
        return self._manifest

    @property
    def paused(self) -> bool:
        return bool(self._snapshot.get("paused"))

    @property
    def state(self) -> str:
        return str(self._snapshot.get("state"))

    def stop(self, timeout: float | None = 60) -> bool:
        """Finish the transaction in flight, end the thread (it closes the store); False if it did not end."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        if self._thread.ident is None:  # never started
            self._close_store()
        return True

    # -- the thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        lower_thread_priority()
        self._open_store()
        try:
            while not self._stop.is_set():
                quiet = self.config.shards.quiet_flush_s
                woke = self._wake.wait(timeout=min(30.0, max(1.0, quiet)))
                self._wake.clear()
                self._serve_messages()
                if self._stop.is_set():
                    break
                if self._store is None and self._outdated is not None:
                    self._reopen_upgraded()
                if self._store is None or self._paused:
                    continue
                with self._nudge_lock:
                    nudged = self._first_nudge is not None
                if not nudged:
                    if not woke:
                        self._maybe_quiet_flush()
                    continue
                # Let a burst (rebase, pull) settle into one reconcile; nudges meanwhile are absorbed.
                if self._stop.wait(self.config.daemon.debounce_ms / 1000):
                    break
                with self._nudge_lock:
                    noticed, self._first_nudge = self._first_nudge, None
                self._reconcile_safely(noticed or time.time())
        finally:
            self._close_store()
            while True:  # whoever still waits gets an answer, not a timeout
                try:
                    self._inbox.get_nowait().reply.set_exception(WorkerBusy(f"{self.name}: the worker stopped"))
                except Empty:
                    break

    def _open_store(self) -> None:
        """Open the store and what uses it; a store that cannot be opened or read marks the repository
        damaged (the daemon goes on serving the others; `repair` rebuilds it)."""
        try:
            self._store = Store(self.paths.store)
            self._spool = SpoolReader(self.paths.spool, self._store)
            self._shards = ShardWriter(self.paths.shards, self.paths.manifest, self._store)
            self._ingestor = self._make_ingestor()
            self._damage = None
            if self._shards.unflushed() > 0:  # left by a backfill or before a restart: flush after a quiet period
                self._last_ingest = time.time()
            self._outdated = None
            self._publish(refresh=True)
        except StoreOutdated as exc:
            # Held, not mixed: commits wait in git and the spool (the spool position is not moved) until
            # `gitlora upgrade` has rewritten the store; its nudge (or the periodic rescan) reopens it.
            self._close_store()
            if self._outdated is None:
                _log.warning("store_outdated", repo=self.name, reason=exc.reason)
            self._outdated = exc.reason
            self._publish(ingesting=False, queue_depth=0)
        except Exception as exc:  # noqa: BLE001 - StoreError (StoreDamaged), or what LMDB says of a broken file
            self._mark_damaged(str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}")

    def _reopen_upgraded(self) -> None:
        """On a nudge, try the outdated store again (`gitlora upgrade` nudges when it is done). The nudge is kept
        when it opens (what waited is ingested now) and dropped when it does not (no retry until the next)."""
        with self._nudge_lock:
            if self._first_nudge is None:
                return
        self._open_store()
        if self._store is None:
            with self._nudge_lock:
                self._first_nudge = None

    def _mark_damaged(self, reason: str) -> None:
        """Stop using the store until `repair`: the repository shows as damaged with that next step."""
        self._damage = reason
        _log.error("store_damaged", repo=self.name, reason=reason)
        try:
            self._close_store()
        except Exception:  # noqa: BLE001 - already broken; what matters is that nothing uses it
            self._store = self._spool = self._shards = self._ingestor = None
        self._publish(ingesting=False, queue_depth=0)

    def _make_ingestor(self) -> Ingestor:
        assert self._store is not None
        return Ingestor.for_daemon(self.git, self._store, self.config.ingest)

    def _close_store(self) -> None:
        if self._store is not None:
            self._store.close()
        self._store = self._spool = self._shards = self._ingestor = None

    def _serve_messages(self, light_only: bool = False) -> None:
        """Answer queued messages. Inside an ingest (`light_only`) a repair or a new config waits for its end."""
        deferred = []
        while True:
            try:
                message = self._inbox.get_nowait()
            except Empty:
                break
            if light_only and message.kind in ("repair", "reconfigure"):
                deferred.append(message)
                continue
            try:
                message.reply.set_result(self._answer(message))
            except Exception as exc:  # noqa: BLE001 - the asker gets the error; the worker goes on
                message.reply.set_exception(exc)
        for message in deferred:
            self._inbox.put(message)
        if deferred:
            self._wake.set()  # answered as soon as the ingest ends, not at the next idle wake-up

    def _answer(self, message: Message) -> Any:
        if message.kind == "pause":
            self._paused = True
            self._publish()
            return True
        if message.kind == "resume":
            self._paused = False
            self._publish()
            self.nudge()
            return True
        if message.kind == "flush":
            if self._shards is None:
                raise StoreError(self._damage or self._outdated or "store not open")
            entries = self._flush("request")
            return len(entries)
        if message.kind == "verify_shards":
            if self._shards is None:
                raise StoreError(self._damage or self._outdated or "store not open")
            return self._shards.verify(rebuild=True)
        if message.kind == "repair":
            return self._repair(force=bool(message.args.get("force")))
        if message.kind == "reconfigure":
            self._reconfigure(message.args["config"])
            return True
        raise ValueError(f"unknown worker message {message.kind!r}")

    def _reconfigure(self, config: Config) -> None:
        """A reloaded config: debounce, quiet flush and shard settings apply at once; ingest settings (the
        exclude globs, remotes) to commits not yet ingested."""
        ingest_changed = config.ingest != self.config.ingest
        self.config = config
        if ingest_changed and self._store is not None:
            self.opened = open_repo(self.git_dir, config)
            self.git = self.opened.git
            self._ingestor = self._make_ingestor()

    def _repair(self, force: bool = False) -> Any:
        """Rebuild the store from git (`gitlora repair`); the store is closed meanwhile, then reopened."""
        from .repair import repair_store

        self._close_store()
        self._publish(state="repairing")
        try:
            report = repair_store(self.opened, self.config, progress=None, should_stop=self._stop.is_set,
                                  force=force)
        finally:
            self._open_store()
        if self._store is not None:
            self.nudge()  # commits that arrived meanwhile
        return report

    def _reconcile_safely(self, noticed: float) -> None:
        if not Path(self.git_dir).is_dir():  # moved or deleted under us: libgit2 may not even notice
            if not self._missing:
                self._missing = True
                _log.error("repo_missing", repo=self.name, git_dir=self.git_dir)
                self._publish(ingesting=False, queue_depth=0)
            return
        if self._missing:
            self._missing = False
            self._publish()
        try:
            self.reconcile(noticed)
        except StoreDamaged as exc:  # a bad page met mid-ingest: the same state as a store that will not open
            self._mark_damaged(str(exc))
        except Exception as exc:  # noqa: BLE001 - one failure must not end the thread
            self._record_error("reconcile", f"{type(exc).__name__}: {exc}")
            _log.error("reconcile_failed", repo=self.name, error=str(exc), traceback=traceback.format_exc())
            self._publish(ingesting=False, queue_depth=0)
            self._stop.wait(1.0)  # no hot loop on a persistent failure; the next nudge retries
        else:
            self._clear_errors("reconcile")

    def reconcile(self, noticed: float) -> None:
        assert self._spool is not None and self._ingestor is not None and self._store is not None
        entries, position = self._spool.read_new()
        spooled = [entry.new for entry in entries]
        tips = list(self.git.tips().values()) + spooled
        pending = self._ingestor.pending(tips)
        if pending:
            queue = len(pending)
            self._publish(ingesting=True, queue_depth=queue)

            def consumed(commits: int, _examples: int) -> None:
                nonlocal queue
                queue = max(0, queue - commits)
                self._publish(refresh=True, ingesting=True, queue_depth=queue)
                self._serve_messages(light_only=True)  # between transactions: a flush or pause is safe here

            summary = self._ingestor.run(pending, should_stop=lambda: self._stop.is_set() or self._paused,
                                         extra={"noticed_at": noticed}, on_batch=consumed)
            if summary.last_commit:
                record = self._store.get_commit(bytes.fromhex(summary.last_commit)) or {}
                latency = record.get("stored_at", time.time()) - noticed
                self._last = {"commit": summary.last_commit, "examples": record.get("examples", 0),
                              "status": record.get("status"), "stored_at": record.get("stored_at"),
                              "batch": summary.commits,
                              # commit->stored only means something for live commits, not for a backfill
                              "latency_ms": round(latency * 1000, 1) if summary.commits <= 16 else None}
                self._last_ingest = time.time()
            _log.info("ingested", repo=self.name, commits=summary.commits, examples=summary.examples,
                      skipped=summary.skipped, seconds=round(summary.seconds, 3))
            if self._stop.is_set() or self._paused:
                # The current transaction is done; leave the spool position for the next pass.
                self._publish(refresh=True, ingesting=False, queue_depth=0)
                return
        self._spool.commit(position)
        assert self._shards is not None
        if self._shards.unflushed() >= self.config.shards.shard_size:
            self._flush("size")
        elif pending:
            memory.after_burst(self._store)
        self._publish(refresh=True, ingesting=False, queue_depth=0)

    def _maybe_quiet_flush(self) -> None:
        if self._shards is None or not self._last_ingest:
            return
        if time.time() - self._last_ingest < self.config.shards.quiet_flush_s or self._shards.unflushed() <= 0:
            return
        try:
            self._flush("quiet")
        except Exception as exc:  # noqa: BLE001 - recorded; the next quiet period retries
            self._record_error("flush", f"shard flush: {type(exc).__name__}: {exc}")
            self._publish()

    def _flush(self, why: str) -> list[dict[str, Any]]:
        assert self._shards is not None and self._store is not None
        entries = self._shards.flush(self.config.shards.shard_size)
        _log.info("shards_flushed", repo=self.name, why=why, shards=len(entries))
        self._clear_errors("flush")
        memory.after_burst(self._store)
        self._publish(refresh=True)
        return entries

    # -- errors and the published view -----------------------------------------------------------
    def _record_error(self, kind: str, message: str) -> None:
        self._errors = [*self._errors[-9:], error_entry(kind, message)]

    def _clear_errors(self, kind: str) -> None:
        if any(e["kind"] == kind for e in self._errors):
            self._errors = [e for e in self._errors if e["kind"] != kind]
            self._publish()

    def _base_view(self) -> dict[str, Any]:
        return {"name": self.name, "git_dir": self.git_dir, "state_dir": str(self.paths.root)}

    def _publish(self, *, refresh: bool = False, **changes: Any) -> None:
        """Replace the snapshot: the previous one with `changes`, re-reading the store when `refresh`."""
        view = dict(self._snapshot)
        view.update(self._base_view())
        if refresh and self._store is not None and self._shards is not None:
            counters = self._store.counters()
            manifest = self._shards.manifest()
            self._manifest = MappingProxyType(manifest)
            view.update(commits_ingested=counters.get("commits_ingested", 0),
                        commits_skipped=counters.get("commits_skipped", 0), examples=counters.get("examples", 0),
                        shards=len(manifest.get("shards", [])), unflushed_examples=self._shards.unflushed())
        for key, default in (("commits_ingested", 0), ("commits_skipped", 0), ("examples", 0), ("shards", 0),
                             ("unflushed_examples", 0), ("queue_depth", 0), ("ingesting", False)):
            view.setdefault(key, default)
        view.update(changes)
        if changes.get("state") == "repairing":
            state, reason, step = "repairing", self._damage, None
        elif self._missing:
            state, reason, step = "missing", "repository not found", missing_next_step(self.git_dir)
        elif self._damage is not None:
            state, reason, step = "damaged", self._damage, damaged_next_step(self._damage, self.git_dir)
        elif self._outdated is not None:
            state, reason, step = "upgrade needed", self._outdated, outdated_next_step(self.git_dir)
        elif self._paused:
            state, reason, step = "paused", None, f"`gitlora resume {self.git_dir}` to ingest again"
        else:
            state, reason, step = "ok", None, None
        view.update(state=state, reason=reason, next_step=step, paused=self._paused, last_commit=self._last,
                    watcher=self.watcher_state, errors=tuple(self._errors))
        self._snapshot = MappingProxyType(view)
