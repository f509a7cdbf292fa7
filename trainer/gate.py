"""The promotion gate, pure: from per-example losses of base, current and candidate on the same examples.

A candidate is promoted only when, on the held-out window,
  1. its changed-token loss against the current adapter (the base on round 1) is lower with the whole 95 %
     bootstrap interval (over commits) below -promote_margin: with the default margin 0 the interval excludes
     zero, so an A/A pair or a lucky draw of one noisy commit does not pass;
  2. it is not worse than the base model (point estimate);
and on the older slice its changed-token loss regresses by at most `max_forgetting` (relative, point estimate)
against the current adapter. Changed-token loss decides (copying the before version is most of a modified
item's tokens and would otherwise dominate); all metrics are recorded by the round, this decides on one.

Without any window examples there is nothing to judge on and the candidate is promoted on training alone, as
before the window existed (the reason says so). With fewer than two window commits there is no interval:
not promoted.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gitlora.trainer import metrics
from gitlora.trainer.metrics import Estimate, ExampleLoss


@dataclass(frozen=True)
class Decision:
    passed: bool
    reason: str  # one line
    vs_current: Estimate | None
    vs_base: Estimate | None
    older_rel: float | None

    def to_dict(self) -> dict:
        def est(e: Estimate | None):
            if e is None:
                return None
            return {"changed_loss_rel": e.value, "ci95_low": e.low, "ci95_high": e.high, "commits": e.commits}

        return dict(passed=self.passed, reason=self.reason, vs_current=est(self.vs_current),
                    vs_base=est(self.vs_base), older_rel=self.older_rel)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.1f} %"


def _ci(e: Estimate) -> str:
    return f"{_pct(e.value)} (95 % CI {_pct(e.low)} to {_pct(e.high)}, {e.commits} commits)"


def decide(window: dict[str, Sequence[ExampleLoss] | None], older: dict[str, Sequence[ExampleLoss] | None], *,
           promote_margin: float = 0.0, max_forgetting: float = 0.02, seed: int = 0) -> Decision:
    """`window` / `older`: {"base": [...], "current": [...] or None (round 1), "candidate": [...]}, each list the
    per-example losses of that model on the same examples in the same order."""
    base, candidate = window.get("base") or [], window.get("candidate") or []
    current = window.get("current") or base  # round 1: the current model is the base
    if not candidate:
        return Decision(True, "no held-out window examples: promoted on training alone", None, None, None)
    name = "changed-token loss"
    vs_current = metrics.paired_loss(current, candidate, seed=seed)
    vs_base = metrics.paired_loss(base, candidate, seed=seed)
    older_rel = None
    o_cand = older.get("candidate") or []
    if o_cand:
        o_cur = older.get("current") or older.get("base") or []
        older_rel = metrics.paired_loss(o_cur, o_cand, seed=seed).value

    def decision(passed: bool, reason: str) -> Decision:
        return Decision(passed, reason, vs_current, vs_base, older_rel)

    against = "current" if window.get("current") else "base (round 1)"
    if vs_current.value is None:
        return decision(False, "no changed target tokens in the window: nothing to judge on, not promoted")
    if vs_current.high is None:
        return decision(False, f"{name} {_pct(vs_current.value)} vs {against} on {vs_current.commits} window "
                               f"commit(s): too few commits for an interval, not promoted")
    if not vs_current.high < -promote_margin:
        margin = f"beyond the margin {promote_margin * 100:.1f} %" if promote_margin else "with the interval below 0"
        return decision(False, f"{name} {_ci(vs_current)} vs {against}: not better {margin}")
    if vs_base.value is not None and vs_base.value > 0:
        return decision(False, f"{name} {_pct(vs_base.value)} vs base on the window: worse than the base model")
    if older_rel is not None and older_rel > max_forgetting:
        return decision(False, f"older slice {name} {_pct(older_rel)} vs {against}: forgets more than "
                               f"{max_forgetting * 100:.1f} %")
    older_text = f", older slice {_pct(older_rel)}" if older_rel is not None else ", no older slice"
    return decision(True, f"{name} {_ci(vs_current)} vs {against}, {_pct(vs_base.value)} vs base{older_text}")
