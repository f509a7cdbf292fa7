"""Whether and on what to train next (pure: manifest + round state + config -> a round, or why not).

Eval is the newest eval shard. Train shards not yet trained on, up to that eval shard's group, are the new
data; everything older (trained shards and earlier groups' eval shards, whose commits are no longer the
newest) is the replay pool. Train shards of groups newer than the eval shard wait for a group of their own,
so no eval commit is ever older than the commits trained against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundState:
    """Persisted per repo in rounds/state.json."""

    trained_shards: list[int] = field(default_factory=list)
    rounds: int = 0
    last_round_at: float = 0.0
    failures: int = 0
    next_retry_at: float = 0.0
    last: dict[str, Any] | None = None
    active: dict[str, Any] | None = None  # the round in flight: {round, pid, shards, started_at}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoundState":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass(frozen=True)
class RoundPlan:
    train: list[dict[str, Any]]
    replay: list[dict[str, Any]]
    eval: list[dict[str, Any]]


def select_data(manifest: dict[str, Any], state: RoundState) -> RoundPlan:
    shards = manifest.get("shards", [])
    evals = [s for s in shards if s["split"] == "eval"]
    newest_eval = evals[-1] if evals else None
    limit_group = newest_eval["group"] if newest_eval else None
    trained = set(state.trained_shards)
    train, replay = [], []
    for shard in shards:
        if shard is newest_eval:
            continue
        if shard["split"] == "eval" or shard["id"] in trained:
            replay.append(shard)
        elif limit_group is not None and shard["group"] <= limit_group:
            train.append(shard)
        elif limit_group is None:
            train.append(shard)  # no eval data at all yet: train, and the round promotes on training alone
    return RoundPlan(train=train, replay=replay, eval=[newest_eval] if newest_eval else [])


def decide(manifest: dict[str, Any], state: RoundState, *, now: float, min_new_shards: int, cooldown_s: float,
           force: bool = False) -> tuple[RoundPlan | None, str]:
    """(plan, why) — plan is None when no round should start now; `why` says what it waits for."""
    plan = select_data(manifest, state)
    if not plan.train:
        return None, "waiting for new train shards"
    if force:
        return plan, "requested"
    if now < state.next_retry_at:
        return None, f"retrying after failure in {state.next_retry_at - now:.0f}s"
    if len(plan.train) < min_new_shards:
        return None, f"{len(plan.train)}/{min_new_shards} new shards"
    if state.last_round_at and now - state.last_round_at < cooldown_s:
        return None, f"cooldown: {cooldown_s - (now - state.last_round_at):.0f}s left"
    return plan, f"{len(plan.train)} new shards"


def backoff_s(failures: int, cap: float) -> float:
    return min(cap, 60.0 * 2 ** max(0, failures - 1))
