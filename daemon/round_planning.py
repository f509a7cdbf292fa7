"""Whether and on what to train next (pure: manifest commit facts + round state + settings -> a round, or why not).

The unit is the commit (each manifest shard entry lists the commits it holds: examples, time, duplicate).
Commits are ordered by (commit time, manifest order); duplicates (every example already stored from an
earlier commit: a merge replaying its branch, a cherry-pick) are not evidence and take no part: they are never
trained, replayed or held out (their examples are their originals').

- The **window**: the newest commits covering at least `window_commits` commits and `window_examples`
  examples, but at most half of all commits (so a young repository trains at all). The gate's data: never
  trained or replayed while in it. Its boundary only moves forward: as newer commits arrive, the oldest leave
  it and become new training data. (A commit already trained is never counted in it.)
- The **older slice**: up to `older_slice_commits` commits that had left the window untrained, a deterministic
  sample (by a hash of the commit id), at most a quarter of those that have left, fixed once chosen (the
  state persists it): never trained or replayed; the forgetting measure.
- **New**: commits that left the window, not yet trained, not in the older slice, newest first. A rejected
  round leaves them new (their tries are counted); after `max_tries` rejections they join the trained
  commits untried, so they stay in the replay pool instead of being lost or tried forever.
- **Replay**: trained commits outside the window and the older slice.

A round is due when the never-tried new examples reach the threshold (retried ones ride along: retrying the
same data alone would only repeat the rejection) and the cooldown has passed.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol


class WindowSettings(Protocol):
    window_commits: int
    window_examples: int
    older_slice_commits: int


@dataclass(frozen=True)
class CommitFact:
    commit: str
    examples: int
    time: int
    duplicate: bool
    shards: tuple[int, ...]


def commit_facts(manifest: dict[str, Any]) -> list[CommitFact]:
    """Every commit the manifest's shards hold, oldest first (commit time, then manifest order). Entries
    without commit facts (an old manifest the shard writer could not read yet) are skipped."""
    found: dict[str, dict[str, Any]] = {}
    for entry in manifest.get("shards", []):
        for fact in entry.get("commits") or []:
            seen = found.setdefault(fact["commit"], {"examples": 0, "time": fact["time"], "duplicate": False,
                                                     "shards": [], "order": len(found)})
            seen["examples"] += fact["examples"]
            seen["duplicate"] = seen["duplicate"] or bool(fact.get("duplicate"))
            if entry["id"] not in seen["shards"]:
                seen["shards"].append(entry["id"])
    ordered = sorted(found.items(), key=lambda item: (item[1]["time"], item[1]["order"]))
    return [CommitFact(c, f["examples"], f["time"], f["duplicate"], tuple(f["shards"])) for c, f in ordered]


@dataclass
class RoundState:
    """Persisted per repo in rounds/state.json."""

    trained: dict[str, int] = field(default_factory=dict)  # commit -> the round that took it in
    tries: dict[str, int] = field(default_factory=dict)  # commit -> rejected rounds it was new data in
    older_slice: list[str] = field(default_factory=list)
    rounds: int = 0
    last_round_at: float = 0.0
    failures: int = 0
    next_retry_at: float = 0.0
    last: dict[str, Any] | None = None
    active: dict[str, Any] | None = None  # the round in flight: {round, pid, new_commits, started_at}
    trained_shards: list[int] = field(default_factory=list)  # before commits were the unit: read, never written

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoundState":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def adopt_legacy(self, manifest: dict[str, Any]) -> None:
        """A state from before commits were the unit: the commits of its trained shards are trained."""
        if not self.trained_shards:
            return
        shards = set(self.trained_shards)
        for entry in manifest.get("shards", []):
            if entry["id"] in shards and "commits" in entry:
                for fact in entry["commits"]:
                    self.trained.setdefault(fact["commit"], 0)
        if all("commits" in e for e in manifest.get("shards", []) if e["id"] in shards):
            self.trained_shards = []


@dataclass(frozen=True)
class RoundPlan:
    """One round's data. Commit lists newest first; shard lists are manifest entries in manifest order."""

    new_commits: list[str]
    replay_commits: list[str]
    window_commits: list[str]
    older_commits: list[str]
    train_shards: list[dict[str, Any]]
    replay_shards: list[dict[str, Any]]
    eval_shards: list[dict[str, Any]]
    new_examples: int  # all of the new commits' examples
    fresh_examples: int  # those of new commits never tried in a rejected round
    retried_commits: int
    window_examples: int

    def summary(self) -> dict[str, int]:
        """What `status` shows of the next round."""
        return {"new_commits": len(self.new_commits), "new_examples": self.new_examples,
                "fresh_examples": self.fresh_examples, "retried_commits": self.retried_commits,
                "replay_commits": len(self.replay_commits), "window_commits": len(self.window_commits),
                "window_examples": self.window_examples, "older_commits": len(self.older_commits)}


def _sample_key(commit: str) -> bytes:
    return hashlib.blake2b(commit.encode(), digest_size=8).digest()


def window_size(facts: list[CommitFact], settings: WindowSettings) -> int:
    """How many of the newest commits (of `facts`, oldest first) the window spans."""
    count = examples = 0
    for fact in reversed(facts):
        if count >= settings.window_commits and examples >= settings.window_examples:
            break
        count, examples = count + 1, examples + fact.examples
    return min(count, len(facts) // 2)


def select_data(manifest: dict[str, Any], state: RoundState, settings: WindowSettings) -> RoundPlan:
    facts = [f for f in commit_facts(manifest) if not f.duplicate]
    trained = dict(state.trained)
    if state.trained_shards:
        legacy = RoundState(trained_shards=list(state.trained_shards))
        legacy.adopt_legacy(manifest)
        trained = {**legacy.trained, **trained}
    span = window_size(facts, settings)
    inside, left = facts[len(facts) - span:], facts[:len(facts) - span]
    window = [f for f in inside if f.commit not in trained and f.commit not in state.older_slice]

    present = {f.commit for f in facts}
    older = [c for c in state.older_slice if c in present]
    room = min(settings.older_slice_commits, len(left) // 4) - len(older)
    if room > 0:
        chosen = set(older)
        pool = sorted((f.commit for f in left if f.commit not in trained and f.commit not in chosen), key=_sample_key)
        older += pool[:room]
    older_set = set(older)

    new = [f for f in left if f.commit not in trained and f.commit not in older_set]
    replay = [f for f in left if f.commit in trained and f.commit not in older_set]
    by_commit = {f.commit: f for f in facts}
    held_out = [by_commit[c] for c in older] + window

    def shards_of(chosen: list[CommitFact]) -> list[dict[str, Any]]:
        ids = {s for f in chosen for s in f.shards}
        return [e for e in manifest.get("shards", []) if e["id"] in ids]

    def newest_first(chosen: list[CommitFact]) -> list[str]:
        return [f.commit for f in reversed(chosen)]

    position = {f.commit: i for i, f in enumerate(facts)}
    older_facts = sorted((by_commit[c] for c in older), key=lambda f: position[f.commit])
    return RoundPlan(
        new_commits=newest_first(new), replay_commits=newest_first(replay), window_commits=newest_first(window),
        older_commits=newest_first(older_facts), train_shards=shards_of(new), replay_shards=shards_of(replay),
        eval_shards=shards_of(held_out), new_examples=sum(f.examples for f in new),
        fresh_examples=sum(f.examples for f in new if not state.tries.get(f.commit)),
        retried_commits=sum(1 for f in new if state.tries.get(f.commit)),
        window_examples=sum(f.examples for f in window))


def decide(manifest: dict[str, Any], state: RoundState, settings: WindowSettings, *, now: float,
           min_new_examples: int, cooldown_s: float, force: bool = False) -> tuple[RoundPlan, str | None]:
    """(plan, why not): `why not` is None when a round should start now, else what it waits for."""
    plan = select_data(manifest, state, settings)
    held = f"{len(plan.window_commits)} commits held out"
    if not plan.new_commits:
        return plan, f"waiting for new commits ({held})"
    if force:
        return plan, None
    if now < state.next_retry_at:
        return plan, f"retrying after failure in {state.next_retry_at - now:.0f}s"
    if plan.fresh_examples < min_new_examples:
        retried = f", {plan.retried_commits} commits to retry" if plan.retried_commits else ""
        return plan, f"{plan.fresh_examples}/{min_new_examples} new examples{retried} ({held})"
    if state.last_round_at and now - state.last_round_at < cooldown_s:
        return plan, f"cooldown: {cooldown_s - (now - state.last_round_at):.0f}s left"
    return plan, None


def without_shards(plan: RoundPlan, manifest: dict[str, Any], failed: set[int]) -> RoundPlan:
    """The plan less shards that failed verification, and less the commits that only those shards held."""
    lost = {f.commit for f in commit_facts(manifest) if f.shards and set(f.shards) <= failed}

    def keep(commits: list[str]) -> list[str]:
        return [c for c in commits if c not in lost]

    def sound(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in entries if e["id"] not in failed]

    examples = {f.commit: f.examples for f in commit_facts(manifest)}
    new = keep(plan.new_commits)
    return replace(plan, new_commits=new, replay_commits=keep(plan.replay_commits),
                   window_commits=keep(plan.window_commits), older_commits=keep(plan.older_commits),
                   train_shards=sound(plan.train_shards), replay_shards=sound(plan.replay_shards),
                   eval_shards=sound(plan.eval_shards), new_examples=sum(examples[c] for c in new),
                   window_examples=sum(examples[c] for c in keep(plan.window_commits)))


def record_outcome(state: RoundState, new_commits: list[str], *, number: int, promoted: bool,
                   max_tries: int) -> list[str]:
    """A finished round's new commits in the state (pure but for `state`): promoted -> trained; rejected ->
    one more try each, and those at `max_tries` join the trained commits (the replay pool) untried. Returns
    the commits retired that way."""
    retired = []
    for commit in new_commits:
        if promoted:
            state.trained[commit] = number
            state.tries.pop(commit, None)
            continue
        state.tries[commit] = state.tries.get(commit, 0) + 1
        if state.tries[commit] >= max_tries:
            state.trained[commit] = number
            state.tries.pop(commit)
            retired.append(commit)
    return retired


def backoff_s(failures: int, cap: float) -> float:
    return min(cap, 60.0 * 2 ** max(0, failures - 1))
