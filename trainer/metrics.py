"""Evaluation metrics, pure: the changed-token mask, per-set aggregates, FIM scoring, bootstrap over commits.

No torch here (the model side is trainer/evaluate.py), so every rule is unit-testable in milliseconds.

Changed tokens. Most of a modified item's target tokens are copied from its `before` version, which the prompt
shows; a model that copies well looks good on target-token loss without having learnt anything about the change.
The changed-token loss counts only the target tokens that the alignment of the target's token ids with the
before-version's token ids (rapidfuzz's Indel opcodes: longest common subsequence) leaves unmatched. For an
added item every target token is changed.

Intervals. Items of one commit are correlated (one refactor touches many items the same way), so bootstrap
intervals resample commits, not examples. Every statistic here is a ratio of sums over examples (loss sum /
token count, exact matches / FIM items), which stays well defined under resampling, and a paired comparison of
two models uses the same resampled commits for both.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from rapidfuzz.distance import Indel, Levenshtein

BOOTSTRAP_RESAMPLES = 2000
LEVEL = 0.95


# ---------------------------------------------------------------------------------------- changed-token mask
COPY_MIN_RUN = 3


def changed_mask(target_ids: Sequence[int], before_ids: Sequence[int], min_run: int = COPY_MIN_RUN) -> list[bool]:
    """True for each target token that is not copied from the before version (all True when there is none).

    A copy is a run of at least `min_run` target tokens aligned with the before version: inside rewritten code
    the longest common subsequence also pairs up lone common tokens (` =`, `.`, `(`, a newline and indent),
    which are coincidences, not copies.
    """
    changed = [True] * len(target_ids)
    if not before_ids:
        return changed
    for op in Indel.opcodes(list(before_ids), list(target_ids)):
        if op.tag == "equal" and op.dest_end - op.dest_start >= min_run:
            changed[op.dest_start:op.dest_end] = [False] * (op.dest_end - op.dest_start)
    return changed


# --------------------------------------------------------------------------------------------- per example
@dataclass(frozen=True)
class ExampleLoss:
    """One example's summed cross-entropy over its target tokens, and over the changed ones alone."""
    commit: str
    target_sum: float
    target_n: int
    changed_sum: float
    changed_n: int


@dataclass(frozen=True)
class FimScore:
    commit: str
    exact: bool
    edit_sim: float


def fim_score(commit: str, generated: str, reference: str) -> FimScore:
    """Exact match (trailing whitespace aside) and normalised Levenshtein similarity (1 = identical)."""
    g, r = generated.rstrip(), reference.rstrip()
    return FimScore(commit, g == r, Levenshtein.normalized_similarity(g, r))


def nonfinite(losses: Sequence[ExampleLoss]) -> int:
    """How many examples have a loss that is not a finite number (fp16 overflow, NaN weights)."""
    return sum(1 for e in losses if not (math.isfinite(e.target_sum) and math.isfinite(e.changed_sum)))


# ------------------------------------------------------------------------------------------------ summaries
def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def summarize(losses: Sequence[ExampleLoss], fim: Sequence[FimScore]) -> dict:
    """One model on one example set: the numbers metrics.json records (token-weighted mean losses)."""
    return dict(examples=len(losses), commits=len({e.commit for e in losses}),
                target_loss=_ratio(sum(e.target_sum for e in losses), sum(e.target_n for e in losses)),
                changed_loss=_ratio(sum(e.changed_sum for e in losses), sum(e.changed_n for e in losses)),
                fim_exact=_ratio(sum(f.exact for f in fim), len(fim)),
                fim_edit_sim=_ratio(sum(f.edit_sim for f in fim), len(fim)), fim_n=len(fim))


# ------------------------------------------------------------------------------------------------ bootstrap
@dataclass(frozen=True)
class Estimate:
    """A point value and its bootstrap interval (low/high None when fewer than two commits: no interval)."""
    value: float | None
    low: float | None
    high: float | None
    commits: int

    def to_dict(self) -> dict:
        return asdict(self)


def _clusters(commits: Sequence[str], *columns: Sequence[float]) -> list[tuple[float, ...]]:
    """Per-commit column sums, in first-seen order."""
    sums: dict[str, list[float]] = {}
    for k, commit in enumerate(commits):
        row = sums.setdefault(commit, [0.0] * len(columns))
        for c, col in enumerate(columns):
            row[c] += col[k]
    return [tuple(v) for v in sums.values()]


def _bootstrap(clusters: list[tuple[float, ...]], stat, n_boot: int, seed: int, level: float) -> Estimate:
    value = stat(clusters)
    if len(clusters) < 2 or value is None:
        return Estimate(value, None, None, len(clusters))
    rng = random.Random(seed)
    n = len(clusters)
    draws = sorted(v for v in (stat([clusters[rng.randrange(n)] for _ in range(n)]) for _ in range(n_boot))
                   if v is not None)
    if not draws:
        return Estimate(value, None, None, n)
    tail = (1 - level) / 2
    lo = draws[min(len(draws) - 1, int(math.floor(tail * len(draws))))]
    hi = draws[min(len(draws) - 1, int(math.ceil((1 - tail) * len(draws))) - 1)]
    return Estimate(value, lo, hi, n)


def bootstrap_ratio(commits: Sequence[str], num: Sequence[float], den: Sequence[float], *,
                    n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0, level: float = LEVEL) -> Estimate:
    """sum(num) / sum(den) over examples, with its interval from resampling commits."""
    def stat(cs):
        d = sum(c[1] for c in cs)
        return sum(c[0] for c in cs) / d if d else None

    return _bootstrap(_clusters(commits, num, den), stat, n_boot, seed, level)


def bootstrap_paired(commits: Sequence[str], num_a: Sequence[float], num_b: Sequence[float],
                     den: Sequence[float], *, relative: bool = True, n_boot: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0, level: float = LEVEL) -> Estimate:
    """Model b against model a on the same examples: sum(b)/sum(a) - 1 (relative), or (sum(b) - sum(a)) /
    sum(den) (absolute, per token / per item); negative = b lower. Both models see the same resampled commits."""
    def stat(cs):
        a, b, d = (sum(c[i] for c in cs) for i in range(3))
        if relative:
            return b / a - 1 if a else None
        return (b - a) / d if d else None

    return _bootstrap(_clusters(commits, num_a, num_b, den), stat, n_boot, seed, level)


def paired_loss(a: Sequence[ExampleLoss], b: Sequence[ExampleLoss], *, changed: bool = True,
                seed: int = 0) -> Estimate:
    """Relative difference of b's token-weighted loss against a's (changed tokens, or all target tokens)."""
    if [e.commit for e in a] != [e.commit for e in b]:
        raise ValueError("paired comparison needs the same examples in the same order")
    pick = (lambda e: (e.changed_sum, e.changed_n)) if changed else (lambda e: (e.target_sum, e.target_n))
    if any(pick(x)[1] != pick(y)[1] for x, y in zip(a, b)):
        raise ValueError("paired comparison needs the same target tokens (two renderings cut them differently: "
                         "compare their common_tokens)")
    return bootstrap_paired([e.commit for e in a], [pick(e)[0] for e in a], [pick(e)[0] for e in b],
                            [pick(e)[1] for e in a], seed=seed)


def common_tokens(a: Sequence[ExampleLoss], b: Sequence[ExampleLoss]
                  ) -> tuple[list[ExampleLoss], list[ExampleLoss]]:
    """The examples of two scorings of the same items whose target and changed-token counts agree. Two
    renderings of an item (with cross-file blocks and without) may be truncated differently, and a ratio of loss
    sums over different tokens says more about the cut than the model: a shorter target alone lowers the sum."""
    keep = [k for k, (x, y) in enumerate(zip(a, b))
            if x.commit == y.commit and (x.target_n, x.changed_n) == (y.target_n, y.changed_n)]
    return [a[k] for k in keep], [b[k] for k in keep]


def loss_estimate(losses: Sequence[ExampleLoss], *, changed: bool = True, seed: int = 0) -> Estimate:
    """A model's token-weighted mean loss on a set, with its interval over commits."""
    pick = (lambda e: (e.changed_sum, e.changed_n)) if changed else (lambda e: (e.target_sum, e.target_n))
    return bootstrap_ratio([e.commit for e in losses], [pick(e)[0] for e in losses], [pick(e)[1] for e in losses],
                           seed=seed)


def paired_fim(a: Sequence[FimScore], b: Sequence[FimScore], *, metric: str = "edit_sim",
               seed: int = 0) -> Estimate:
    """b's mean exact match / edit similarity minus a's (absolute; positive = b better), paired by item."""
    if [f.commit for f in a] != [f.commit for f in b]:
        raise ValueError("paired comparison needs the same items in the same order")
    return bootstrap_paired([f.commit for f in a], [float(getattr(f, metric)) for f in a],
                            [float(getattr(f, metric)) for f in b], [1.0] * len(a), relative=False, seed=seed)


def fim_estimate(scores: Sequence[FimScore], *, metric: str = "edit_sim", seed: int = 0) -> Estimate:
    return bootstrap_ratio([f.commit for f in scores], [float(getattr(f, metric)) for f in scores],
                           [1.0] * len(scores), seed=seed)


def compare(ref_losses: Sequence[ExampleLoss], ref_fim: Sequence[FimScore], losses: Sequence[ExampleLoss],
            fim: Sequence[FimScore], *, seed: int = 0) -> dict:
    """A model against a reference on the same examples, every metric paired, with intervals over commits:
    losses as relative changes (negative = better), FIM as absolute differences (positive = better).
    Each entry: {value, low, high, commits}; None where a set has no such items."""
    def est(fn, *args, **kw):
        return fn(*args, seed=seed, **kw).to_dict() if args[0] else None

    return dict(changed_loss_rel=est(paired_loss, ref_losses, losses),
                target_loss_rel=est(paired_loss, ref_losses, losses, changed=False),
                fim_exact_diff=est(paired_fim, ref_fim, fim, metric="exact"),
                fim_edit_sim_diff=est(paired_fim, ref_fim, fim, metric="edit_sim"))
