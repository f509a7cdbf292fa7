"""Deciding when and on what to train (pure)."""
from __future__ import annotations

from gitlora.daemon.round_planning import RoundState, backoff_s, decide, select_data


def shard(i: int, split: str, group: int) -> dict:
    return {"id": i, "file": f"{i:06d}.jsonl", "split": split, "group": group}


MANIFEST = {"shards": [shard(1, "train", 1), shard(2, "train", 1), shard(3, "eval", 1),
                       shard(4, "train", 2), shard(5, "eval", 2), shard(6, "train", 3)]}


def test_newest_eval_new_train_up_to_its_group_and_older_data_as_replay():
    plan = select_data(MANIFEST, RoundState(trained_shards=[1, 2]))
    assert [s["id"] for s in plan.eval] == [5]
    assert [s["id"] for s in plan.train] == [4]  # shard 6 (group 3) waits for its own eval shard
    assert [s["id"] for s in plan.replay] == [1, 2, 3]


def test_thresholds_cooldown_backoff_and_force():
    state = RoundState()
    plan, why = decide(MANIFEST, state, now=1000, min_new_shards=5, cooldown_s=0)
    assert plan is None and why == "3/5 new shards"
    plan, _ = decide(MANIFEST, state, now=1000, min_new_shards=3, cooldown_s=0)
    assert [s["id"] for s in plan.train] == [1, 2, 4]
    cooling = RoundState(last_round_at=900)
    assert decide(MANIFEST, cooling, now=1000, min_new_shards=1, cooldown_s=3600)[0] is None
    failing = RoundState(next_retry_at=1100)
    assert "retrying" in decide(MANIFEST, failing, now=1000, min_new_shards=1, cooldown_s=0)[1]
    assert decide(MANIFEST, failing, now=1000, min_new_shards=9, cooldown_s=0, force=True)[0] is not None
    done = RoundState(trained_shards=[1, 2, 4])
    assert decide(MANIFEST, done, now=1000, min_new_shards=1, cooldown_s=0, force=True) == (None, "waiting for new train shards")
    assert [backoff_s(n, 3600) for n in (1, 2, 3, 10)] == [60, 120, 240, 3600]
