"""The current adapter where the user's editor looks: after every promotion and rollback, `[export] dir` gets
`<repo>-current.gguf` (a llama.cpp LoRA adapter, for `llama-server --lora`) and `<repo>.Modelfile` (for Ollama),
and optionally `ollama create` runs so a named Ollama model carries the newest adapter.

A round promotes inside the trainer subprocess and `gitlora adapters rollback` moves `current` from the CLI, so
rather than being told, the keeper follows `adapters/current` itself: an APScheduler job (`export-check`,
every `export.check_interval_s`) reads each repository's `current` link (one readlink) and exports when it
names another version than the last export, or the export settings changed, or the file is gone. The export
runs as a subprocess (`python -m gitlora.trainer.gguf_export`: numpy + gguf never enter the daemon) that writes
the GGUF atomically, so llama.cpp or Ollama reading it sees the old adapter or the new one.

The keeper owns `export.json` in each state dir (the last export and its result, shown by `status`) and the
files it names in the export dir; it only reads `adapters/`. A failed export is recorded with its one-line
reason and is not retried until `current` or the settings change (or the daemon restarts): it never touches
training or `current`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import log
from .fsutil import atomic_write_text

if TYPE_CHECKING:
    from .config import Config, ExportConfig
    from .repo_worker import RepoWorker
    from .training_jobs import TrainingHost

RECORD = "export.json"
TIMEOUT_S = 1800.0  # the GGUF takes seconds; `ollama create` FROM a base GGUF copies the base once

_log = log.get("gitlora.export")


def file_stem(worker: RepoWorker, workers: list[RepoWorker]) -> str:
    """`<repo>` in `<repo>-current.gguf`: the repository's readable name, or its state-dir key when another
    served repository has the same name (each file has one owner)."""
    def readable(w: RepoWorker) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in w.name) or "repo"

    mine = readable(worker)
    if any(readable(w) == mine for w in workers if w is not worker):
        return worker.paths.root.name
    return mine


def targets(cfg: ExportConfig, stem: str) -> dict[str, str | None]:
    """The files an export writes, and the Ollama settings it uses (also the settings an export is keyed on)."""
    root = Path(cfg.dir).expanduser()
    with_modelfile = bool(cfg.ollama_from)
    return {"file": str(root / f"{stem}-current.gguf"),
            "modelfile": str(root / f"{stem}.Modelfile") if with_modelfile else None,
            "ollama_from": cfg.ollama_from or None,
            "ollama_model": cfg.ollama_model.replace("{repo}", stem) or None}


def read_record(worker: RepoWorker) -> dict[str, Any] | None:
    try:
        record = json.loads((worker.paths.root / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class ExportKeeper:
    def __init__(self, daemon: TrainingHost) -> None:
        self.daemon = daemon
        self._lock = threading.Lock()  # guards the three below (the job thread and status handlers)
        self._running: dict[str, dict[str, Any]] = {}  # state dir -> the export in flight
        self._failed: dict[str, tuple[str, dict]] = {}  # state dir -> (version, settings) that failed in this process
        self._proc: subprocess.Popen | None = None
        self._stopping = False

    # -- the scheduled job ---------------------------------------------------------------------------------
    def check(self) -> None:
        """Export each repository whose `current` is not what its export dir holds (one at a time)."""
        cfg = self.daemon.config.export
        if not cfg.dir:
            return
        workers = self.daemon.all_workers()
        for worker in workers:
            if self._stopping:
                return
            try:
                due = self._due(worker, cfg, workers)
                if due is not None:
                    self._export(worker, *due)
            except Exception as exc:  # noqa: BLE001 - one repository's trouble must not stop the others' exports
                _log.error("export_error", repo=worker.name, error=f"{type(exc).__name__}: {exc}")

    def _due(self, worker: RepoWorker, cfg: ExportConfig, workers: list[RepoWorker]):
        from gitlora.trainer import registry  # torch-free by design

        version = registry.current_version(worker.paths.adapters)
        if version is None:
            return None  # no adapter yet: the base model alone serves
        settings = {**targets(cfg, file_stem(worker, workers)), "base_model": self.daemon.config.train.base_model}
        record = read_record(worker) or {}
        if (record.get("ok") and record.get("version") == version and record.get("settings") == settings
                and Path(settings["file"]).is_file()):
            return None
        key = str(worker.paths.root)
        with self._lock:
            if self._failed.get(key) == (version, settings):
                return None
        return version, settings

    def _export(self, worker: RepoWorker, version: str, settings: dict[str, Any]) -> dict[str, Any]:
        out = Path(settings["file"])
        try:
            for stale in out.parent.glob(f".{out.name}.*.tmp"):  # a killed export's temp file (we own this name)
                stale.unlink(missing_ok=True)
        except OSError:
            pass  # the export itself reports an unusable directory
        command = [sys.executable, "-m", "gitlora.trainer.gguf_export", str(worker.paths.adapters / version),
                   "--base-model", settings["base_model"], "--out", settings["file"], "--version", version]
        if settings["modelfile"]:
            command += ["--modelfile", settings["modelfile"], "--ollama-from", settings["ollama_from"]]
            if settings["ollama_model"]:
                command += ["--ollama-model", settings["ollama_model"]]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_"))}
        env["HF_HUB_OFFLINE"] = "1"
        started = time.time()
        key = str(worker.paths.root)
        with self._lock:
            if self._stopping:
                return {}
            try:
                proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, start_new_session=True, env=env, text=True)
            except OSError as exc:
                proc = None
                result = {"ok": False, "reason": f"could not start the export: {exc}"}
            else:
                self._proc = proc
                self._running[key] = {"version": version, "pid": proc.pid, "started_at": started}
        if proc is not None:
            _log.info("export_started", repo=worker.name, version=version, file=settings["file"], pid=proc.pid)
            try:
                stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
                result = _result(stdout, stderr, proc.returncode)
            except subprocess.TimeoutExpired:
                _kill(proc)
                result = {"ok": False, "reason": f"the export ran past {TIMEOUT_S:.0f}s and was stopped"}
            finally:
                with self._lock:
                    self._running.pop(key, None)
                    self._proc = None
        if self._stopping and not result.get("ok"):
            return result  # stopped with the daemon: not a failure of this version
        finished = time.time()
        record = {**result, "version": version, "settings": settings, "started_at": started,
                  "finished_at": finished, "seconds": round(finished - started, 2)}
        atomic_write_text(worker.paths.root / RECORD, json.dumps(record, indent=1) + "\n")
        with self._lock:
            if record["ok"]:
                self._failed.pop(key, None)
            else:
                self._failed[key] = (version, settings)
        if record["ok"]:
            _log.info("export_done", repo=worker.name, version=version, file=settings["file"],
                      ollama=record.get("ollama"), seconds=record["seconds"])
        else:
            _log.warning("export_failed", repo=worker.name, version=version, reason=record.get("reason"))
        return record

    # -- status and lifecycle ------------------------------------------------------------------------------
    def status_for(self, worker: RepoWorker) -> dict[str, Any] | None:
        """The last export and the one in flight; None when exports are off and none was ever made."""
        with self._lock:
            running = dict(self._running.get(str(worker.paths.root)) or {}) or None
        record = read_record(worker)
        cfg = self.daemon.config.export
        if not cfg.dir and record is None:
            return None
        return {"dir": cfg.dir or None, "running": running, "last": record}

    def reconfigure(self, config: Config) -> None:
        scheduler = self.daemon.scheduler
        if scheduler.running and scheduler.get_job("export-check") is not None:
            scheduler.reschedule_job("export-check", trigger="interval", seconds=config.export.check_interval_s)

    def shutdown(self) -> None:
        """Stop an export in flight with the daemon (its temp file is removed by the next export)."""
        with self._lock:
            self._stopping = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            _kill(proc)


def _result(stdout: str, stderr: str, code: int) -> dict[str, Any]:
    """The exporter's one JSON line, or a one-line reason from what it left behind."""
    for line in reversed((stdout or "").strip().splitlines()):
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict) and "ok" in result:
            return result
    last = ((stderr or "").strip().splitlines() or [f"exit status {code}"])[-1]
    return {"ok": False, "reason": f"the export process failed (exit {code}): {last[:300]}"}


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()


def attach(daemon: TrainingHost) -> ExportKeeper:
    keeper = ExportKeeper(daemon)
    daemon.scheduler.add_job(keeper.check, "interval", id="export-check",
                             seconds=daemon.config.export.check_interval_s, max_instances=1, coalesce=True)
    return keeper
