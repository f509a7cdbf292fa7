"""The trainer's learning-rate schedule: linear warm-up to the peak, then cosine decay towards min_lr_ratio x lr,
at exact steps (pure: no model, no torch)."""
from __future__ import annotations

import math

import pytest

from gitlora.trainer.round import DEFAULTS, lr_at

CFG = {**DEFAULTS, "learning_rate": 1e-3, "warmup_steps": 4, "min_lr_ratio": 0.1}


@pytest.mark.parametrize("step, expected", [
    (0, 1e-3 * 1 / 5),  # warm-up: (step + 1) / (warmup + 1) of the peak, never 0 (step 0 trains too)
    (1, 1e-3 * 2 / 5),
    (3, 1e-3 * 4 / 5),
    (4, 1e-3),  # the peak, right after warm-up
    (9, 1e-3 * 0.55),  # half-way through the decay: floor + (1 - floor) / 2
    (13, 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))),  # the last step, just above the floor
])
def test_values_at_given_steps(step, expected):
    assert lr_at(step, 14, CFG) == pytest.approx(expected, rel=1e-12)


def test_warm_up_rises_then_decay_falls_and_stays_above_the_floor():
    total = 50
    lrs = [lr_at(s, total, CFG) for s in range(total)]
    warm = CFG["warmup_steps"]
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm + 1]))  # strictly rising to the peak
    assert max(lrs) == lrs[warm] == CFG["learning_rate"]
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # never rising again
    assert all(lr > CFG["learning_rate"] * CFG["min_lr_ratio"] for lr in lrs)
    # and past the planned end (a caller running over) it holds at the floor instead of rising on the cosine
    assert lr_at(total + 10, total, CFG) == pytest.approx(CFG["learning_rate"] * CFG["min_lr_ratio"])


@pytest.mark.parametrize("total", [1, 2, 3])
def test_warm_up_is_shortened_so_a_short_round_still_reaches_the_peak(total):
    """A round of fewer steps than warmup_steps warms up over total - 1 steps: its last step is at the peak."""
    lrs = [lr_at(s, total, CFG) for s in range(total)]
    assert lrs[-1] == pytest.approx(CFG["learning_rate"])
    assert all(0 < lr <= CFG["learning_rate"] for lr in lrs)


def test_no_warm_up():
    cfg = {**CFG, "warmup_steps": 0}
    assert lr_at(0, 10, cfg) == cfg["learning_rate"]
    assert lr_at(5, 10, cfg) == pytest.approx(cfg["learning_rate"] * 0.55)


def test_a_resumed_adapter_continues_at_its_own_rate_and_warm_up():
    from gitlora.trainer.spec import schedule

    cfg = {**CFG, "continuation_lr_ratio": 0.25, "continuation_warmup_steps": 0}
    fresh, resumed = schedule(cfg, resumed=False), schedule(cfg, resumed=True)
    assert fresh == {"learning_rate": 1e-3, "warmup_steps": 4, "min_lr_ratio": 0.1}
    assert resumed == {"learning_rate": 2.5e-4, "warmup_steps": 0, "min_lr_ratio": 0.1}
    assert lr_at(0, 10, resumed) == pytest.approx(2.5e-4)  # no warm-up: the first step is at the peak
    assert lr_at(0, 10, fresh) == pytest.approx(1e-3 / 5)
