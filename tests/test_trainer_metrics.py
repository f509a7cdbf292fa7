"""Evaluation metrics and the promotion gate on hand-made numbers (pure, no torch): the changed-token mask,
FIM scoring, bootstrap intervals over commits (not examples), paired differences, and the gate's rules."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest

from gitlora.trainer import gate, metrics
from gitlora.trainer.metrics import ExampleLoss


# ------------------------------------------------------------------------------------------ changed tokens
def test_changed_mask_marks_only_tokens_not_copied_from_before():
    before = [10, 11, 12, 13, 14, 15, 0]
    target = [10, 11, 12, 99, 98, 13, 14, 15, 0]  # 99 98 inserted
    assert metrics.changed_mask(target, before) == [False] * 3 + [True] * 2 + [False] * 4
    assert metrics.changed_mask(before, before) == [False] * len(before)  # a pure copy changes nothing
    assert metrics.changed_mask([5, 6, 7], []) == [True, True, True]  # an added item: all of it is new
    assert metrics.changed_mask([], [1, 2]) == []
    # appended and prepended tokens are changed; the common run in the middle is copied
    assert metrics.changed_mask([7, 1, 2, 3, 8], [1, 2, 3]) == [True, False, False, False, True]


def test_lone_common_tokens_in_rewritten_code_are_not_copies():
    """Rewritten code shares scattered common tokens with the old version (say 40 = ' =', 41 = '.'); the
    alignment pairs them up, but only runs of COPY_MIN_RUN tokens count as copied."""
    before = [1, 2, 3, 4, 40, 50, 41, 51, 9]
    target = [1, 2, 3, 4, 40, 60, 61, 41, 62, 9]
    assert metrics.changed_mask(target, before) == [False] * 5 + [True] * 5
    assert metrics.changed_mask(target, before, min_run=1) == [False] * 5 + [True, True, False, True, False]


def test_changed_mask_copying_does_not_dominate():
    """A long item with a one-token edit: nearly all target tokens are copies, one is changed."""
    before = list(range(100, 300))
    target = before[:150] + [5] + before[151:]
    mask = metrics.changed_mask(target, before)
    assert sum(mask) == 1 and mask[150]


def test_torch_free_import():
    code = ("import sys; import gitlora.trainer.metrics, gitlora.trainer.gate; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------- FIM scoring
def test_fim_score_exact_and_edit_similarity():
    s = metrics.fim_score("c", "let x = 1;\n", "let x = 1;")
    assert s.exact and s.edit_sim == 1.0  # trailing whitespace aside
    s = metrics.fim_score("c", "abd", "abc")
    assert not s.exact and s.edit_sim == pytest.approx(2 / 3)
    s = metrics.fim_score("c", "", "let y = 2;")
    assert not s.exact and s.edit_sim == 0.0
    assert metrics.fim_score("c", "", "").exact


def test_summarize_is_token_weighted():
    losses = [ExampleLoss("a", 10.0, 5, 4.0, 1), ExampleLoss("a", 2.0, 5, 0.0, 0), ExampleLoss("b", 6.0, 2, 6.0, 2)]
    fim = [metrics.FimScore("a", True, 1.0), metrics.FimScore("b", False, 0.5)]
    s = metrics.summarize(losses, fim)
    assert s == dict(examples=3, commits=2, target_loss=pytest.approx(18 / 12), changed_loss=pytest.approx(10 / 3),
                     fim_exact=0.5, fim_edit_sim=0.75, fim_n=2)
    empty = metrics.summarize([], [])
    assert empty["target_loss"] is None and empty["fim_exact"] is None and empty["fim_n"] == 0


# ------------------------------------------------------------------------------------------------ bootstrap
def correlated(n_commits: int, per_commit: int, seed: int = 0):
    """Examples whose loss is mostly a per-commit effect (one refactor touches many items the same way)."""
    rng = random.Random(seed)
    commits, values = [], []
    for c in range(n_commits):
        level = rng.uniform(1.0, 5.0)
        for _ in range(per_commit):
            commits.append(f"c{c}")
            values.append(level + rng.gauss(0, 0.05))
    return commits, values


def test_bootstrap_resamples_commits_not_examples():
    commits, values = correlated(10, 20)
    by_commit = metrics.bootstrap_ratio(commits, values, [1.0] * len(values))
    as_if_independent = metrics.bootstrap_ratio([f"e{i}" for i in range(len(values))], values, [1.0] * len(values))
    assert by_commit.value == pytest.approx(sum(values) / len(values))
    assert by_commit.low < by_commit.value < by_commit.high and by_commit.commits == 10
    # 10 clusters of 20 near-identical items carry about 10 items' worth of information, not 200
    assert (by_commit.high - by_commit.low) > 3 * (as_if_independent.high - as_if_independent.low)


def test_bootstrap_is_seeded_and_degenerate_cases_have_no_interval():
    commits, values = correlated(8, 3)
    a = metrics.bootstrap_ratio(commits, values, [1.0] * len(values), seed=3)
    assert a == metrics.bootstrap_ratio(commits, values, [1.0] * len(values), seed=3)
    one = metrics.bootstrap_ratio(["c"] * 5, [1, 2, 3, 4, 5], [1] * 5)
    assert one.value == 3 and one.low is None and one.high is None and one.commits == 1
    same = metrics.bootstrap_ratio(["a", "b", "c"], [2, 2, 2], [1, 1, 1])
    assert same.low == same.high == same.value == 2
    assert metrics.bootstrap_ratio([], [], []).value is None


def test_paired_difference_cancels_what_both_models_share():
    """Two models on the same examples: commit-level difficulty varies 5x, b is 10 % better everywhere (with a
    little noise). Unpaired intervals overlap; the paired one is narrow and excludes zero."""
    commits, a = correlated(12, 5)
    rng = random.Random(1)
    b = [x * 0.9 * (1 + rng.gauss(0, 0.01)) for x in a]
    ones = [1.0] * len(a)
    ea, eb = metrics.bootstrap_ratio(commits, a, ones), metrics.bootstrap_ratio(commits, b, ones)
    assert ea.low < eb.high  # unpaired: the intervals overlap
    rel = metrics.bootstrap_paired(commits, a, b, ones)
    assert rel.value == pytest.approx(sum(b) / sum(a) - 1) and -0.11 < rel.low <= rel.value <= rel.high < -0.09
    exact = metrics.bootstrap_paired(commits, a, [x * 0.9 for x in a], ones)
    assert exact.value == pytest.approx(-0.1) and exact.low == pytest.approx(-0.1) == exact.high
    diff = metrics.bootstrap_paired(["a", "b"], [1.0, 3.0], [2.0, 2.0], [1.0, 1.0], relative=False)
    assert diff.value == 0.0


def test_paired_loss_refuses_different_target_tokens_and_common_tokens_keeps_the_shared_ones():
    # the same items, the second rendering cut one target shorter: a ratio of sums would call that a 25 % gain
    a = [ExampleLoss("x", 8.0, 4, 8.0, 4), ExampleLoss("y", 4.0, 2, 4.0, 2)]
    b = [ExampleLoss("x", 6.0, 3, 6.0, 3), ExampleLoss("y", 4.0, 2, 4.0, 2)]
    with pytest.raises(ValueError, match="same target tokens"):
        metrics.paired_loss(a, b)
    ka, kb = metrics.common_tokens(a, b)
    assert ka == [a[1]] and kb == [b[1]]
    assert metrics.paired_loss(ka, kb).value == pytest.approx(0.0)
    assert metrics.common_tokens(a, a) == (a, a)


def test_paired_loss_needs_the_same_examples():
    a = [ExampleLoss("x", 1, 1, 1, 1), ExampleLoss("y", 1, 1, 1, 1)]
    with pytest.raises(ValueError, match="same examples"):
        metrics.paired_loss(a, list(reversed(a)))
    target = metrics.paired_loss(a, [ExampleLoss("x", 2, 1, 1, 1), ExampleLoss("y", 2, 1, 1, 1)], changed=False)
    assert target.value == pytest.approx(1.0)
    fa, fb = [metrics.FimScore("x", False, 0.2), metrics.FimScore("y", True, 1.0)], \
        [metrics.FimScore("x", True, 1.0), metrics.FimScore("y", True, 1.0)]
    assert metrics.paired_fim(fa, fb).value == pytest.approx(0.4)
    assert metrics.paired_fim(fa, fb, metric="exact").value == pytest.approx(0.5)
    assert metrics.fim_estimate(fb).value == 1.0


def test_nonfinite_counts_nan_and_inf():
    ok = ExampleLoss("a", 1.0, 2, 0.5, 1)
    assert metrics.nonfinite([ok]) == 0
    assert metrics.nonfinite([ok, ExampleLoss("a", float("nan"), 2, 0.0, 0), ExampleLoss("b", 1.0, 2, float("inf"), 1)]) == 2


# ------------------------------------------------------------------------------------------------- the gate
def model_losses(commits, per_token, changed_n=4):
    return [ExampleLoss(c, v * 10, 10, v * changed_n, changed_n) for c, v in zip(commits, per_token)]


@pytest.fixture(scope="module")
def window():
    commits, values = correlated(20, 6, seed=5)
    return commits, values


def decide(commits, base, current, candidate, older=None, **kw):
    o = older or {}
    return gate.decide({"base": model_losses(commits, base), "current": current and model_losses(commits, current),
                        "candidate": model_losses(commits, candidate)},
                       {k: v and model_losses(o["commits"], v) for k, v in o.items() if k != "commits"}, **kw)


def test_gate_promotes_a_clearly_better_candidate(window):
    commits, base = window
    rng = random.Random(2)
    current = [x * 0.95 for x in base]
    candidate = [x * 0.85 * (1 + rng.gauss(0, 0.02)) for x in current]
    d = decide(commits, base, current, candidate)
    assert d.passed, d.reason
    assert d.vs_current.high < 0 and d.vs_base.value < d.vs_current.value < 0
    out = d.to_dict()
    assert set(out) == {"passed", "reason", "vs_current", "vs_base", "older_rel"}
    assert set(out["vs_current"]) >= {"changed_loss_rel", "ci95_low", "ci95_high"}
    assert "\n" not in d.reason and "vs current" in d.reason


def test_gate_rejects_a_copy_of_current_and_noise(window):
    commits, base = window
    current = [x * 0.9 for x in base]
    same = decide(commits, base, current, list(current))  # A/A: the candidate is the current adapter
    assert not same.passed and same.vs_current.value == 0 and "not better" in same.reason
    for seed in range(5):  # no real change, only per-commit noise (either direction)
        rng = random.Random(seed)
        factor = {c: 1 + rng.gauss(0, 0.03) for c in set(commits)}
        noisy = [x * factor[c] for c, x in zip(commits, current)]
        d = decide(commits, base, current, noisy)
        if d.vs_current.value < 0:  # even a lucky draw that looks better is within the noise
            assert d.vs_current.high >= 0
        assert not d.passed, (seed, d.reason)


def test_gate_rejects_a_candidate_worse_than_base_and_a_margin_not_reached(window):
    commits, base = window
    current = [x * 1.3 for x in base]  # a bad current adapter
    candidate = [x * 1.1 for x in base]  # better than it, still worse than the base model
    d = decide(commits, base, current, candidate)
    assert not d.passed and "worse than the base" in d.reason
    better = [x * 0.95 for x in base]
    assert decide(commits, base, list(base), better).passed
    d = decide(commits, base, list(base), better, promote_margin=0.1)
    assert not d.passed and "margin 10.0 %" in d.reason


def test_gate_bounds_forgetting_on_the_older_slice(window):
    commits, base = window
    candidate = [x * 0.8 for x in base]
    old_commits, old = correlated(10, 3, seed=9)
    older = dict(commits=old_commits, base=old, current=None)
    d = decide(commits, base, None, candidate, {**older, "candidate": [x * 1.05 for x in old]})
    assert not d.passed and d.older_rel == pytest.approx(0.05) and "forgets" in d.reason
    d = decide(commits, base, None, candidate, {**older, "candidate": [x * 1.01 for x in old]})
    assert d.passed and d.older_rel == pytest.approx(0.01), d.reason
    d = decide(commits, base, None, candidate, {**older, "candidate": [x * 1.05 for x in old]}, max_forgetting=0.1)
    assert d.passed


def test_gate_round_one_compares_with_base_and_needs_data():
    commits, base = correlated(6, 2)
    better = [x * 0.7 for x in base]
    d = decide(commits, base, None, better)
    assert d.passed and "vs base (round 1)" in d.reason and d.vs_current == d.vs_base
    one = decide(["c"] * 4, [1.0] * 4, None, [0.5] * 4)
    assert not one.passed and "too few commits" in one.reason
    empty = gate.decide({"base": [], "current": None, "candidate": []}, {})
    assert empty.passed and "no held-out window" in empty.reason
    unchanged = gate.decide({"base": [ExampleLoss("a", 1, 1, 0, 0), ExampleLoss("b", 1, 1, 0, 0)], "current": None,
                             "candidate": [ExampleLoss("a", 1, 1, 0, 0), ExampleLoss("b", 1, 1, 0, 0)]}, {})
    assert not unchanged.passed and "no changed target tokens" in unchanged.reason


def test_compare_pairs_every_metric():
    ref = [ExampleLoss("a", 10.0, 10, 4.0, 2), ExampleLoss("b", 20.0, 10, 6.0, 3)]
    new = [ExampleLoss("a", 9.0, 10, 2.0, 2), ExampleLoss("b", 18.0, 10, 3.0, 3)]
    ref_fim = [metrics.FimScore("a", False, 0.5), metrics.FimScore("b", True, 1.0)]
    new_fim = [metrics.FimScore("a", True, 1.0), metrics.FimScore("b", True, 1.0)]
    out = metrics.compare(ref, ref_fim, new, new_fim)
    assert out["changed_loss_rel"]["value"] == pytest.approx(-0.5)
    assert out["target_loss_rel"]["value"] == pytest.approx(-0.1)
    assert out["fim_exact_diff"]["value"] == pytest.approx(0.5)
    assert out["fim_edit_sim_diff"]["value"] == pytest.approx(0.25)
    assert set(out["changed_loss_rel"]) == {"value", "low", "high", "commits"}
    assert metrics.compare(ref, [], new, [])["fim_exact_diff"] is None
