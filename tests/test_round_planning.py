"""Deciding when and on what to train (pure: manifest commit facts + round state -> the spec's commit lists)."""
from __future__ import annotations

from gitlora.daemon.round_planning import (RoundState, backoff_s, commit_facts, decide, record_outcome, select_data,
                                           window_size, without_shards)
from gitlora.trainer.spec import RoundSettings

SETTINGS = RoundSettings(window_commits=10, window_examples=50, older_slice_commits=4)


def cid(n: int) -> str:
    return f"{n:040x}"


def manifest(commits: list[tuple[int, int]], *, per_shard: int = 1, duplicates: frozenset[int] = frozenset()) -> dict:
    """Commits (number, examples), commit time = number, `per_shard` commits per shard entry (1 = each
    commit flushed on its own, as when commits land minutes apart)."""
    shards = []
    for start in range(0, len(commits), per_shard):
        chunk = commits[start:start + per_shard]
        shards.append({"id": len(shards) + 1, "file": f"{len(shards) + 1:06d}.jsonl", "split": "train",
                       "group": len(shards) + 1,
                       "commits": [{"commit": cid(n), "examples": k, "time": 1000 + n, "duplicate": n in duplicates}
                                   for n, k in chunk]})
    return {"shards": shards}


def numbers(commits: list[str]) -> list[int]:
    return [int(c, 16) for c in commits]


def test_window_is_the_newest_commits_covering_both_minimums_and_everything_older_is_new():
    plan = select_data(manifest([(n, 10) for n in range(40)]), RoundState(), SETTINGS)
    assert numbers(plan.window_commits) == list(range(39, 29, -1))  # 10 commits, 100 >= 50 examples
    assert plan.window_examples == 100
    assert len(plan.older_commits) == 4 and set(numbers(plan.older_commits)) < set(range(30))
    assert numbers(plan.new_commits) == [n for n in range(29, -1, -1) if n not in numbers(plan.older_commits)]
    assert plan.replay_commits == [] and plan.new_examples == 260 and plan.fresh_examples == 260
    # small commits: the example minimum decides; a young repository holds out at most half
    assert numbers(select_data(manifest([(n, 1) for n in range(100)]), RoundState(), SETTINGS).window_commits) \
        == list(range(99, 49, -1))
    assert window_size([f for f in commit_facts(manifest([(n, 10) for n in range(6)]))], SETTINGS) == 3


def test_commits_graduate_from_the_window_as_newer_ones_arrive_and_trained_ones_never_return():
    first = manifest([(n, 10) for n in range(40)])
    plan = select_data(first, RoundState(), SETTINGS)
    state = RoundState(older_slice=plan.older_commits)
    record_outcome(state, plan.new_commits, number=1, promoted=True, max_tries=3)
    later = manifest([(n, 10) for n in range(45)])
    plan2 = select_data(later, state, SETTINGS)
    assert numbers(plan2.window_commits) == list(range(44, 34, -1))
    assert numbers(plan2.new_commits) == [34, 33, 32, 31, 30]  # left the window: now training data
    assert set(plan2.replay_commits) == set(plan.new_commits)
    assert not set(plan2.window_commits) & set(state.trained)
    # a commit whose time puts it among the newest after it was trained (clock skew) is still not held out
    state.trained[cid(44)] = 1
    assert cid(44) not in select_data(later, state, SETTINGS).window_commits


def test_duplicates_take_no_part_and_do_not_count_towards_the_window():
    dup = frozenset({39, 38})
    plan = select_data(manifest([(n, 10) for n in range(40)], duplicates=dup), RoundState(), SETTINGS)
    every = plan.new_commits + plan.window_commits + plan.replay_commits + plan.older_commits
    assert not {cid(n) for n in dup} & set(every)
    assert numbers(plan.window_commits) == list(range(37, 27, -1))


def test_single_commit_flushes_train_like_any_others():
    # one commit per shard (commits minutes apart): each graduates into a round of its own shards
    m = manifest([(n, 30) for n in range(30)], per_shard=1)
    settings = RoundSettings(window_commits=5, window_examples=1, older_slice_commits=0)
    plan, why = decide(m, RoundState(), settings, now=0, min_new_examples=100, cooldown_s=0)
    assert why is None and len(plan.new_commits) == 25 and plan.new_examples == 750
    assert [e["id"] for e in plan.train_shards] == list(range(1, 26))
    assert [e["id"] for e in plan.eval_shards] == list(range(26, 31))


def test_a_rejected_round_keeps_its_data_counts_tries_and_retires_it_after_max_tries():
    m = manifest([(n, 10) for n in range(40)])
    settings = RoundSettings(window_commits=10, window_examples=50, older_slice_commits=0)
    state = RoundState()
    plan, why = decide(m, state, settings, now=0, min_new_examples=100, cooldown_s=0)
    assert why is None and len(plan.new_commits) == 30
    assert record_outcome(state, plan.new_commits, number=1, promoted=False, max_tries=2) == []
    again, why = decide(m, state, settings, now=0, min_new_examples=100, cooldown_s=0)
    assert again.new_commits == plan.new_commits and again.retried_commits == 30 and again.fresh_examples == 0
    assert why == "0/100 new examples, 30 commits to retry (10 commits held out)"  # waits for fresh evidence
    fresh = manifest([(n, 10) for n in range(52)])
    plan3, why = decide(fresh, state, settings, now=0, min_new_examples=100, cooldown_s=0)
    assert why is None and plan3.fresh_examples == 120 and plan3.retried_commits == 30
    retired = record_outcome(state, plan3.new_commits, number=2, promoted=False, max_tries=2)
    assert set(retired) == set(plan.new_commits) and all(state.tries[c] == 1 for c in plan3.new_commits[:12])
    after = select_data(fresh, state, settings)
    assert set(plan.new_commits) <= set(after.replay_commits) and len(after.new_commits) == 12


def test_the_older_slice_is_fixed_once_chosen_and_never_replayed():
    state = RoundState()
    plan = select_data(manifest([(n, 10) for n in range(40)]), state, SETTINGS)
    state.older_slice = list(plan.older_commits)  # the coordinator persists it when the round starts
    record_outcome(state, plan.new_commits, number=1, promoted=True, max_tries=3)
    for total in (60, 200):
        later = select_data(manifest([(n, 10) for n in range(total)]), state, SETTINGS)
        assert later.older_commits == plan.older_commits
        assert not set(later.older_commits) & set(later.replay_commits + later.new_commits + later.window_commits)
        assert {e["id"] for e in later.eval_shards} >= {int(c, 16) + 1 for c in later.older_commits}
    # a young repository's slice grows (up to a quarter of what left the window); members stay
    young = select_data(manifest([(n, 10) for n in range(10)]), RoundState(), SETTINGS)
    assert len(young.older_commits) == 1
    grown = select_data(manifest([(n, 10) for n in range(40)]), RoundState(older_slice=young.older_commits), SETTINGS)
    assert len(grown.older_commits) == 4 and set(young.older_commits) < set(grown.older_commits)


def test_thresholds_cooldown_backoff_and_force():
    m = manifest([(n, 10) for n in range(40)])
    state = RoundState()
    plan, why = decide(m, state, SETTINGS, now=1000, min_new_examples=500, cooldown_s=0)
    assert why == "260/500 new examples (10 commits held out)" and len(plan.new_commits) == 26
    assert decide(m, state, SETTINGS, now=1000, min_new_examples=260, cooldown_s=0)[1] is None
    cooling = RoundState(last_round_at=900)
    assert decide(m, cooling, SETTINGS, now=1000, min_new_examples=1, cooldown_s=3600)[1] == "cooldown: 3500s left"
    failing = RoundState(next_retry_at=1100)
    assert "retrying" in decide(m, failing, SETTINGS, now=1000, min_new_examples=1, cooldown_s=0)[1]
    assert decide(m, failing, SETTINGS, now=1000, min_new_examples=9999, cooldown_s=0, force=True)[1] is None
    done = RoundState(trained={c: 1 for c in plan.new_commits}, older_slice=plan.older_commits)
    assert decide(m, done, SETTINGS, now=1000, min_new_examples=1, cooldown_s=0, force=True)[1] \
        == "waiting for new commits (10 commits held out)"
    assert [backoff_s(n, 3600) for n in (1, 2, 3, 10)] == [60, 120, 240, 3600]


def test_a_state_from_before_commits_were_the_unit_keeps_its_trained_shards():
    m = manifest([(n, 10) for n in range(40)], per_shard=10)  # shards 1-4
    state = RoundState.from_dict({"trained_shards": [1, 2], "rounds": 2})
    plan = select_data(m, state, RoundSettings(window_commits=10, window_examples=1, older_slice_commits=0))
    assert numbers(plan.replay_commits) == list(range(19, -1, -1))
    assert numbers(plan.new_commits) == list(range(29, 19, -1))
    state.adopt_legacy(m)
    assert state.trained_shards == [] and len(state.trained) == 20


def test_commits_only_held_by_a_shard_that_failed_verification_are_left_out():
    m = manifest([(n, 10) for n in range(40)], per_shard=5)
    settings = RoundSettings(window_commits=10, window_examples=1, older_slice_commits=0)
    plan = without_shards(select_data(m, RoundState(), settings), m, {1, 8})
    assert numbers(plan.new_commits) == list(range(29, 4, -1)) and plan.new_examples == 250
    assert numbers(plan.window_commits) == list(range(34, 29, -1))
    assert 1 not in [e["id"] for e in plan.train_shards] and 8 not in [e["id"] for e in plan.eval_shards]
