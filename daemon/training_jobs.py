"""The daemon's side of training: an APScheduler job that starts one LoRA round at a time, across all repos,
as a low-priority subprocess (`python -m gitlora.trainer --spec ...`), and follows it through its progress
file and exit status. Torch-free: GPU presence and memory come from `nvidia-smi`, never from torch.

A round that crashes, is killed or runs out of memory is recorded as failed with its reason and retried with
exponential backoff; `adapters/current` only ever moves inside the trainer, atomically, after the gate. What a
round trains on is round_planning's business (commits, not shards); the spec and the exit codes are
gitlora.trainer.spec's. The coordinator knows the daemon only through `TrainingHost`, so neither module imports
the other's at import time.
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
from typing import TYPE_CHECKING, Any, Protocol

from gitlora.trainer import spec as round_spec

from . import gpu, log, round_checks, status_view
from .fsutil import atomic_write_text
from .round_planning import RoundPlan, RoundState, backoff_s, decide, record_outcome, without_shards

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler

    from .config import Config
    from .repo_worker import RepoWorker

_log = log.get("gitlora.training")


class TrainingHost(Protocol):
    """What the coordinator needs of the daemon (service.Daemon is one)."""

    config: Config
    scheduler: BaseScheduler

    def all_workers(self) -> list[RepoWorker]: ...

    def select(self, request: dict[str, Any], allow_all: bool = ...) -> list[RepoWorker] | str: ...


class ActiveRound:
    def __init__(self, worker: RepoWorker, number: int, directory: Path, proc: subprocess.Popen,
                 new_commits: list[str]):
        self.worker, self.number, self.dir, self.proc, self.new_commits = worker, number, directory, proc, new_commits
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
    def __init__(self, daemon: TrainingHost) -> None:
        self.daemon = daemon
        self.config = daemon.config.train
        self.min_new_examples = daemon.config.min_new_examples()
        self.active: ActiveRound | None = None
        self._lock = threading.Lock()
        self._why: dict[str, str] = {}
        self._next: dict[str, dict[str, int]] = {}  # repo -> what its next round would use
        self.flush_timeout_s = 120.0  # a forced round waits this long for the worker to finish what it is doing

    def reconfigure(self, config) -> None:
        """A reloaded config: train settings apply to the next round, the check interval at once."""
        old, self.config = self.config, config.train
        self.min_new_examples = config.min_new_examples()
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
        atomic_write_text(self._state_path(worker), json.dumps(state.to_dict(), indent=1) + "\n")

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
            manifest = dict(worker.manifest())
            plan, why = decide(manifest, state, self.config, now=time.time(), min_new_examples=self.min_new_examples,
                               cooldown_s=self.config.cooldown_s, force=force_repo is not None)
            self._why[worker.name] = why or f"starting: {len(plan.new_commits)} new commits"
            self._next[worker.name] = plan.summary()
            if why is not None:
                continue
            gpu_note = self._gpu_gate()
            if gpu_note:
                self._why[worker.name] = gpu_note
                return gpu_note
            # Before verifying (hashing) every shard: a missing base model must not cost that every minute.
            ready = round_checks.before_round(self.config, [Path(p) for p in self._paths(worker, plan.train_shards)],
                                              worker.paths.adapters, commits=set(plan.new_commits))
            self._why[worker.name] = ready.line  # why it cannot start, or its estimated duration
            if not ready.ok:
                return ready.line
            plan = self._verified(worker, plan, manifest)
            if plan is None:
                continue
            with self._lock:
                if self.active is not None:
                    return f"a round is already running for {self.active.worker.name}"
                self._start(worker, state, plan, ready.budget)
                return f"started round {self.active.number} for {worker.name}: {ready.line}"
        return "; ".join(f"{k}: {v}" for k, v in self._why.items()) or "no repositories"

    def _verified(self, worker: RepoWorker, plan: RoundPlan, manifest: dict[str, Any]) -> RoundPlan | None:
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
        kept = without_shards(plan, manifest, set(verification.failed))
        if not kept.new_commits:
            self._why[worker.name] = f"not started: {verification.summary()}"
            return None
        return kept

    def _gpu_gate(self) -> str | None:
        if self.config.device == "cpu":
            return None
        free = gpu.free_mb()
        if free is None:
            return "cuda requested but nvidia-smi finds no GPU" if self.config.device == "cuda" else None
        need = self.config.require_free_gpu_mb or 6000
        return None if free >= need else f"GPU busy: {free} MiB free, {need} MiB needed"

    def _start(self, worker: RepoWorker, state: RoundState, plan: RoundPlan,
               budget: dict[str, Any]) -> None:
        number = state.rounds + 1
        directory = worker.paths.rounds / f"{number:04d}"
        directory.mkdir(parents=True, exist_ok=True)
        settings = self.config.round_settings()
        spec = round_spec.RoundSpec(
            base_model=self.config.base_model, adapters_dir=str(worker.paths.adapters),
            progress_file=str(directory / "progress.jsonl"),
            train_shards=self._paths(worker, plan.train_shards), replay_shards=self._paths(worker, plan.replay_shards),
            eval_shards=self._paths(worker, plan.eval_shards), new_commits=plan.new_commits,
            replay_commits=plan.replay_commits, window_commits=plan.window_commits, older_commits=plan.older_commits,
            budget=round_spec.Budget(**budget),
            train=settings.model_copy(update={"seed": settings.seed + number}), eval_seed=settings.seed,
        ).model_dump()
        atomic_write_text(directory / "spec.json", json.dumps(spec, indent=1) + "\n")
        command = [sys.executable, "-m", "gitlora.trainer", "--spec", str(directory / "spec.json")]
        if shutil.which("ionice"):
            command = ["ionice", "-c", "3", *command]  # idle IO class; the trainer lowers its CPU nice itself
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_"))}
        env["HF_HUB_OFFLINE"] = "1"  # round_checks found the model locally; never retry downloads for minutes
        # Persist the round before it exists, so a daemon killed at any instant finds it on restart; the older
        # slice is fixed from the first round that uses it.
        state.rounds = number
        state.older_slice = list(plan.older_commits)
        state.active = {"round": number, "pid": None, "new_commits": plan.new_commits, "started_at": time.time()}
        self.save_state(worker, state)
        with open(directory / "trainer.log", "ab") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env, cwd=str(directory))
        state.active["pid"] = proc.pid
        self.save_state(worker, state)
        self.active = ActiveRound(worker, number, directory, proc, plan.new_commits)
        _log.info("round_started", repo=worker.name, round=number, pid=proc.pid, **plan.summary())

    @staticmethod
    def _paths(worker: RepoWorker, entries: list[dict[str, Any]]) -> list[str]:
        return [str(worker.paths.shards / e["file"]) for e in entries]

    def _reap(self) -> None:
        """Record the outcome of a finished round (called with the lock held)."""
        active = self.active
        if active is None or active.proc.poll() is None:
            return
        self.active = None
        self._record(active.worker, self.load_state(active.worker), active.number, active.new_commits,
                     active.events(), active.proc.returncode, active.started_at)

    def _record(self, worker: RepoWorker, state: RoundState, number: int, new_commits: list[str],
                events: list[dict[str, Any]], code: int | None, started_at: float) -> RoundState:
        """A finished round in the state: promoted -> its new commits are trained (only those the trainer
        reports in `budget.covered_commits` when its budget bounded it); rejected ("kept current", with the
        gate's one-line reason) -> they stay new, one try more; failed -> nothing changes but the backoff."""
        done = next((e for e in reversed(events) if e.get("event") == "done"), None)
        error = next((e for e in reversed(events) if e.get("event") == "error"), None)
        outcome: dict[str, Any] = {"round": number, "exit_code": code, "finished_at": time.time(),
                                   "seconds": round(time.time() - started_at, 1)}
        state.adopt_legacy(dict(worker.manifest()))
        if done is not None and code in (round_spec.EXIT_OK, None):
            promoted = bool(done.get("promoted"))
            gate = done.get("gate")
            budget = done.get("budget")
            covered = budget.get("covered_commits") if isinstance(budget, dict) else None
            taken = [c for c in new_commits if c in set(covered)] if isinstance(covered, list) else new_commits
            outcome.update(outcome="promoted" if promoted else "kept current",
                           version=done.get("version"), eval_loss_before=done.get("eval_loss_before"),
                           eval_loss_after=done.get("eval_loss_after"), tokens_per_s=done.get("tokens_per_s"),
                           new_commits=len(taken))
            if not promoted:
                outcome["reason"] = (gate.get("reason") if isinstance(gate, dict) else gate) or "gate not passed"
            retired = record_outcome(state, taken, number=number, promoted=promoted,
                                     max_tries=self.config.max_tries)
            if retired:
                outcome["retired_commits"] = len(retired)  # rejected max_tries times: replay pool, untried
            state.failures, state.next_retry_at = 0, 0.0
        else:
            reason = (error or {}).get("reason") or round_spec.exit_reason(code)
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
            directory = worker.paths.rounds / f"{info['round']:04d}"
            stopped = bool(pid) and _is_trainer(pid, directory / "spec.json")
            if stopped:
                _stop_process_group(pid, directory / "spec.json")
            events = ActiveRound.read_events(directory / "progress.jsonl")
            finished = any(e.get("event") == "done" for e in events)
            if (stopped and not finished) or not any(e.get("event") in ("done", "error") for e in events):
                events.append({"event": "error", "reason": round_spec.REASON_DAEMON_RESTARTED,
                               "message": "the daemon stopped while this round ran"})
            return self._record(worker, state, info["round"], self._active_commits(worker, info), events, None,
                                info.get("started_at", time.time()))

    @staticmethod
    def _active_commits(worker: RepoWorker, info: dict[str, Any]) -> list[str]:
        """The new commits of a round persisted as active (by an older daemon: its shards' commits)."""
        if "new_commits" in info:
            return list(info["new_commits"])
        shards = set(info.get("shards", []))
        return [f["commit"] for e in worker.manifest().get("shards", []) if e["id"] in shards
                for f in e.get("commits", [])]

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
        current = registry.current_version(worker.paths.adapters)
        return {
            "current_adapter": current,
            "vs_base": status_view.adapter_vs_base(_read_json(worker.paths.adapters / current / registry.METRICS))
            if current else None,
            "round": active.view() if active else None,
            "last_round": state.last,
            "rounds": state.rounds,
            "next_trigger": self._why.get(worker.name),
            "next_round": self._next.get(worker.name),
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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_trainer(pid: int, spec: Path) -> bool:
    """Is `pid` still the trainer of the round whose spec is `spec` (not a reused pid, not `gitlora eval`)?"""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"gitlora.trainer" in args and str(spec).encode() in args


def _stop_process_group(pid: int, spec: Path, grace_s: float = 20.0) -> None:
    """SIGTERM a trainer we are not the parent of, then SIGKILL if it lingers (we cannot wait() on it)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _is_trainer(pid, spec):
        time.sleep(0.1)
    if _is_trainer(pid, spec):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def attach(daemon: TrainingHost) -> TrainingCoordinator:
    coordinator = TrainingCoordinator(daemon)
    daemon.scheduler.add_job(coordinator.check, "interval", id="train-check",
                             seconds=daemon.config.train.check_interval_s, max_instances=1, coalesce=True)
    return coordinator
