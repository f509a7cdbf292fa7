"""The daemon's side of training: an APScheduler job that starts one LoRA round at a time, across all repos,
as a low-priority subprocess (`python -m gitlora.trainer --spec ...`), and follows it through its progress
file and exit status. Torch-free: GPU presence and memory come from `nvidia-smi`, never from torch.

A round that crashes, is killed or runs out of memory is recorded as failed with its reason and retried with
exponential backoff; `adapters/current` only ever moves inside the trainer, atomically, after the gate.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import gpu, log, round_checks
from .fsutil import atomic_write_text
from .round_planning import RoundPlan, RoundState, backoff_s, decide

if TYPE_CHECKING:
    from .repo_worker import RepoWorker
    from .service import Daemon

_log = log.get("gitlora.training")
_EXIT_REASONS = {1: "exception", 2: "spec", 3: "oom", -9: "killed", -15: "terminated"}


class ActiveRound:
    def __init__(self, worker: RepoWorker, number: int, directory: Path, proc: subprocess.Popen, shards: list[int]):
        self.worker, self.number, self.dir, self.proc, self.shards = worker, number, directory, proc, shards
        self.started_at = time.time()
        self.progress_file = directory / "progress.jsonl"

    def events(self) -> list[dict[str, Any]]:
        return self.read_events(self.progress_file)

    @staticmethod
    def read_events(progress_file: Path) -> list[dict[str, Any]]:
        try:
            lines = progress_file.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a torn last line while the trainer writes
        return events

    def view(self) -> dict[str, Any]:
        view: dict[str, Any] = {"round": self.number, "pid": self.proc.pid, "state": "starting",
                                "elapsed_s": round(time.time() - self.started_at, 1)}
        for event in self.events():
            if event.get("event") == "progress":
                view.update(state="training", step=event.get("step"), total=event.get("total"),
                            loss=event.get("loss"), eta_s=event.get("eta_s"))
            elif event.get("event") == "eval":
                view["state"] = f"evaluating ({event.get('which')})"
        return view


class TrainingCoordinator:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.config = daemon.config.train
        self.active: ActiveRound | None = None
        self._lock = threading.Lock()
        self._why: dict[str, str] = {}
        self.flush_timeout_s = 120.0  # a forced round waits this long for the worker to finish what it is doing

    def reconfigure(self, config) -> None:
        """A reloaded config: train settings apply to the next round, the check interval at once."""
        old, self.config = self.config, config.train
        if old.check_interval_s != self.config.check_interval_s and self.daemon.scheduler.running:
            self.daemon.scheduler.reschedule_job("train-check", trigger="interval",
                                                 seconds=self.config.check_interval_s)

    def is_training(self, worker: RepoWorker) -> bool:
        with self._lock:
            self._reap()
            return self.active is not None and self.active.worker is worker

    # -- persisted per-repo state ------------------------------------------------------------------
    @staticmethod
    def _state_path(worker: RepoWorker) -> Path:
        return worker.paths.rounds / "state.json"

    def load_state(self, worker: RepoWorker) -> RoundState:
        try:
            return RoundState.from_dict(json.loads(self._state_path(worker).read_text()))
        except (OSError, ValueError):
            return RoundState()

    def save_state(self, worker: RepoWorker, state: RoundState) -> None:
        atomic_write_text(self._state_path(worker), json.dumps(state.__dict__, indent=1) + "\n")

    # -- the scheduled check -------------------------------------------------------------------------
    def check(self, force_repo: RepoWorker | None = None) -> str:
        """Start a round if one is due (one at a time across all repos). Returns what happened.

        The lock is held only to look at and set the active round: flushing shards and asking nvidia-smi can
        take seconds, and `gitlora status` needs the lock too."""
        with self._lock:
            self._reap()
            if self.active is not None:
                return f"a round is already running for {self.active.worker.name}"
        workers = [force_repo] if force_repo else self.daemon.all_workers()
        for worker in workers:
            state = self._recover(worker, self.load_state(worker))
            if worker.state != "ok":
                self._why[worker.name] = worker.state  # paused, damaged, missing, repairing
                continue
            if force_repo is not None:
                try:  # the worker owns the store: it flushes, between two of its transactions
                    worker.call("flush", timeout=self.flush_timeout_s)
                except Exception as exc:  # noqa: BLE001 - WorkerBusy, or the flush's own error
                    self._why[worker.name] = f"could not flush shards: {exc}"
                    return self._why[worker.name]
            plan, why = decide(dict(worker.manifest()), state, now=time.time(),
                               min_new_shards=self.config.min_new_shards, cooldown_s=self.config.cooldown_s,
                               force=force_repo is not None)
            self._why[worker.name] = why
            if plan is None:
                continue
            gpu_note = self._gpu_gate()
            if gpu_note:
                self._why[worker.name] = gpu_note
                return gpu_note
            # Before verifying (hashing) every shard: a missing base model must not cost that every minute.
            ready = round_checks.before_round(self.config, [worker.paths.shards / s["file"] for s in plan.train],
                                              worker.paths.adapters)
            self._why[worker.name] = ready.line  # why it cannot start, or its estimated duration
            if not ready.ok:
                return ready.line
            plan = self._verified(worker, plan)
            if plan is None:
                continue
            with self._lock:
                if self.active is not None:
                    return f"a round is already running for {self.active.worker.name}"
                self._start(worker, state, plan, ready.budget)
                return f"started round {self.active.number} for {worker.name}: {ready.line}"
        return "; ".join(f"{k}: {v}" for k, v in self._why.items()) or "no repositories"

    def _verified(self, worker: RepoWorker, plan: RoundPlan) -> RoundPlan | None:
        """The plan without shards whose files no longer match their sha256 and that the store cannot rebuild
        (the worker, which owns the shards, checks them and rewrites bad ones from the store first): a
        corrupt shard must cost its examples, not fail and retry every round forever."""
        try:
            verification = worker.call("verify_shards", timeout=self.flush_timeout_s)
        except Exception as exc:  # noqa: BLE001 - WorkerBusy, a damaged store
            self._why[worker.name] = f"could not verify shards: {exc}"
            return None
        if verification.rebuilt or verification.failed:
            _log.warning("shards_verified", repo=worker.name, summary=verification.summary())
        if not verification.failed:
            return plan
        keep = [[s for s in part if s["id"] not in verification.failed] for part in (plan.train, plan.replay,
                                                                                     plan.eval)]
        if not keep[0] or not keep[2]:
            self._why[worker.name] = f"not started: {verification.summary()}"
            return None
        return RoundPlan(*keep)

    def _gpu_gate(self) -> str | None:
        if self.config.device == "cpu":
            return None
        free = gpu.free_mb()
        if free is None:
            return "cuda requested but nvidia-smi finds no GPU" if self.config.device == "cuda" else None
        need = self.config.require_free_gpu_mb or 6000
        return None if free >= need else f"GPU busy: {free} MiB free, {need} MiB needed"

    def _start(self, worker: RepoWorker, state: RoundState, plan, budget: dict[str, Any]) -> None:
        number = state.rounds + 1
        directory = worker.paths.rounds / f"{number:04d}"
        directory.mkdir(parents=True, exist_ok=True)
        shards_dir = worker.paths.shards
        spec = {
            "base_model": self.config.base_model,
            "adapters_dir": str(worker.paths.adapters),
            "train_shards": [str(shards_dir / s["file"]) for s in plan.train],
            "replay_shards": [str(shards_dir / s["file"]) for s in plan.replay],
            "eval_shards": [str(shards_dir / s["file"]) for s in plan.eval],
            "progress_file": str(directory / "progress.jsonl"),
            "budget": budget,
            "train": {k: getattr(self.config, k) for k in (
                "learning_rate", "warmup_steps", "epochs", "max_steps", "lora_r", "lora_alpha", "lora_dropout",
                "replay_share", "fim_share", "context_length", "promote_margin", "device")} | {"seed": number},
        }
        atomic_write_text(directory / "spec.json", json.dumps(spec, indent=1) + "\n")
        command = [sys.executable, "-m", "gitlora.trainer", "--spec", str(directory / "spec.json")]
        if shutil.which("ionice"):
            command = ["ionice", "-c", "3", *command]  # idle IO class; the trainer lowers its CPU nice itself
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_"))}
        env["HF_HUB_OFFLINE"] = "1"  # round_checks found the model locally; never retry downloads for minutes
        shards = [s["id"] for s in plan.train]
        # Persist the round before it exists, so a daemon killed at any instant finds it on restart.
        state.rounds = number
        state.active = {"round": number, "pid": None, "shards": shards, "started_at": time.time()}
        self.save_state(worker, state)
        with open(directory / "trainer.log", "ab") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env, cwd=str(directory))
        state.active["pid"] = proc.pid
        self.save_state(worker, state)
        self.active = ActiveRound(worker, number, directory, proc, shards)
        _log.info("round_started", repo=worker.name, round=number, pid=proc.pid, train=len(plan.train),
                  replay=len(plan.replay), eval=len(plan.eval))

    def _reap(self) -> None:
        """Record the outcome of a finished round (called with the lock held)."""
        active = self.active
        if active is None or active.proc.poll() is None:
            return
        self.active = None
        self._record(active.worker, self.load_state(active.worker), active.number, active.shards,
                     active.events(), active.proc.returncode, active.started_at)

    def _record(self, worker: RepoWorker, state: RoundState, number: int, shards: list[int],
                events: list[dict[str, Any]], code: int | None, started_at: float) -> RoundState:
        done = next((e for e in reversed(events) if e.get("event") == "done"), None)
        error = next((e for e in reversed(events) if e.get("event") == "error"), None)
        outcome: dict[str, Any] = {"round": number, "exit_code": code, "finished_at": time.time(),
                                   "seconds": round(time.time() - started_at, 1)}
        if done is not None and code in (0, None):
            outcome.update(outcome="promoted" if done.get("promoted") else "kept current",
                           version=done.get("version"), eval_loss_before=done.get("eval_loss_before"),
                           eval_loss_after=done.get("eval_loss_after"), tokens_per_s=done.get("tokens_per_s"))
            state.trained_shards = sorted(set(state.trained_shards) | set(shards))
            state.failures, state.next_retry_at = 0, 0.0
        else:
            reason = (error or {}).get("reason") or _EXIT_REASONS.get(code, f"exit {code}")
            outcome.update(outcome="failed", reason=reason, message=((error or {}).get("message") or "")[:500])
            state.failures += 1
            state.next_retry_at = time.time() + backoff_s(state.failures, self.config.max_retry_backoff_s)
        state.last_round_at = time.time()
        state.last = outcome
        state.active = None
        self.save_state(worker, state)
        _log.info("round_finished", repo=worker.name, **outcome)
        return state

    def _recover(self, worker: RepoWorker, state: RoundState) -> RoundState:
        """A round persisted as active that this process is not running: an earlier daemon died under it.
        Stop its trainer if it still runs (it holds the adapters lock), then record what it got to."""
        with self._lock:
            if state.active is None or (self.active is not None and self.active.worker is worker):
                return state
            info = state.active
            pid = info.get("pid")
            stopped = bool(pid) and _is_trainer(pid)
            if stopped:
                _stop_process_group(pid)
            directory = worker.paths.rounds / f"{info['round']:04d}"
            events = ActiveRound.read_events(directory / "progress.jsonl")
            finished = any(e.get("event") == "done" for e in events)
            if (stopped and not finished) or not any(e.get("event") in ("done", "error") for e in events):
                events.append({"event": "error", "reason": "daemon restarted",
                               "message": "the daemon stopped while this round ran"})
            return self._record(worker, state, info["round"], info.get("shards", []), events, None,
                                info.get("started_at", time.time()))

    # -- socket commands and status --------------------------------------------------------------------
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        targets = self.daemon.select(request, allow_all=False)
        if isinstance(targets, str):
            return {"ok": False, "error": targets}
        if request.get("now"):
            if len(targets) != 1:
                return {"ok": False, "error": f"{request.get('repo')!r} names {len(targets)} repositories; name one"}
            return {"result": self.check(force_repo=targets[0])}
        return {"result": self.check()}

    def status_for(self, worker: RepoWorker) -> dict[str, Any]:
        from gitlora.trainer import registry  # torch-free by design

        with self._lock:
            self._reap()
            active = self.active if self.active and self.active.worker is worker else None
        state = self.load_state(worker)
        return {
            "current_adapter": registry.current_version(worker.paths.adapters),
            "round": active.view() if active else None,
            "last_round": state.last,
            "rounds": state.rounds,
            "next_trigger": self._why.get(worker.name),
        }

    def status(self) -> dict[str, Any]:
        with self._lock:
            self._reap()
            active = self.active
        return {"active_round": {"repo": active.worker.name, **active.view()} if active else None,
                "base_model": self.config.base_model}

    def shutdown(self) -> None:
        """Stop a running round with the daemon; its half-written version never becomes current."""
        with self._lock:
            active = self.active
        if active is not None and active.proc.poll() is None:
            try:
                os.killpg(active.proc.pid, signal.SIGTERM)
                active.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(active.proc.pid, signal.SIGKILL)
                active.proc.wait()
            with self._lock:
                self._reap()


def _is_trainer(pid: int) -> bool:
    try:
        return b"gitlora.trainer" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _stop_process_group(pid: int, grace_s: float = 20.0) -> None:
    """SIGTERM a trainer we are not the parent of, then SIGKILL if it lingers (we cannot wait() on it)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _is_trainer(pid):
        time.sleep(0.1)
    if _is_trainer(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def attach(daemon: Daemon) -> TrainingCoordinator:
    coordinator = TrainingCoordinator(daemon)
    daemon.scheduler.add_job(coordinator.check, "interval", id="train-check",
                             seconds=daemon.config.train.check_interval_s, max_instances=1, coalesce=True)
    return coordinator
