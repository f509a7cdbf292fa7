"""A training round's contract between the daemon and the trainer, defined once: its settings (with their
defaults and bounds), the spec the daemon writes, and the outcomes (exit codes, failure reasons).

Torch-free and cheap to import: the daemon imports it (its `[train]` config section is these settings plus
the daemon's own scheduling keys), and so does the trainer (its DEFAULTS are `RoundSettings()`).

Every number is bounded and finite and values are taken as typed (strict: `true` is not 1, `"5"` is not a
number), so a setting that validates also works.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

HOUR = 3600


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class RoundSettings(_Strict):
    """Every setting of one round. The daemon copies them all into the spec's `train`; the trainer fills any
    missing key from these defaults. 0 / "auto" = chosen by the hardware plan."""

    # -- optimisation
    learning_rate: float = Field(2e-4, gt=0, le=1)
    warmup_steps: int = Field(10, ge=0, le=10_000_000)
    epochs: float = Field(1.0, gt=0, le=1_000)
    max_steps: int = Field(0, ge=0, le=10_000_000, description="0 = derived from epochs")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine schedule ends at this share of learning_rate")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="a round's seed is this plus its round number")
    # A round that resumes the current adapter continues training it rather than starting one: it gets its own
    # learning rate (a share of learning_rate) and warm-up, chosen by the learning benchmark (bench/README.md).
    continuation_lr_ratio: float = Field(1.0, gt=0, le=10,
                                         description="learning rate of a round that resumes an adapter, as a "
                                                     "share of learning_rate")
    continuation_warmup_steps: int = Field(10, ge=0, le=10_000_000,
                                           description="warm-up steps of a round that resumes an adapter")
    # -- the adapter
    lora_r: int = Field(16, ge=1, le=4_096)
    lora_alpha: int = Field(32, ge=1, le=65_536)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    # -- data
    replay_share: float = Field(0.3, ge=0, lt=1,
                                description="share of a round's examples replayed from trained commits")
    replay_halflife_commits: float = Field(0.0, ge=0, le=1e9,
                                           description="replay favours recent commits: a commit this many commits "
                                                       "older than the newest trained one is drawn half as often "
                                                       "(0 = uniform)")
    # Most examples fill in the middle of the real new file (what an editor asks); a minority stay
    # "message + before -> after" edits, the rendering the gate's changed-token loss is measured on
    # (trainer/data.py).
    edit_share: float = Field(0.2, ge=0, le=1, description="share of examples rendered as 'message + before -> "
                              "after' edits; the rest fill in the middle of the real new file")
    copied_token_weight: float = Field(0.1, ge=0, le=1, description="loss weight of an edit target's tokens "
                                       "copied from its before version (changed tokens weigh 1)")
    fim_share: float | None = Field(None, ge=0, le=1, description="deprecated: edit_share = 1 - fim_share")
    # The file text around a FIM gap as a weak target: more of the repository's code learned per step than the
    # middle alone; 0.1 chosen by the examples ablation (bench/README.md), a higher weight trades completions
    # for loss.
    context_token_weight: float = Field(0.1, ge=0, le=1, description="loss weight of the file's text around a "
                                        "fill-in-the-middle gap (its prefix and suffix), learned beside the "
                                        "middle (0 = the middle alone)")
    cross_file_context: bool = Field(True, description="render each example's cross-file context (definitions of "
                                     "other files it references) before its file; off: one store trains without it")
    context_length: int = Field(0, ge=0, le=1_048_576, description="0 = from the hardware plan")
    # -- hardware plan overrides
    device: Literal["auto", "cpu", "cuda"] = "auto"
    micro_batch: int = Field(0, ge=0, le=65_536, description="0 = from the hardware plan")
    grad_accum: int = Field(0, ge=0, le=65_536, description="0 = from the hardware plan")
    quantization: Literal["auto", "nf4", "none"] = "auto"
    compute_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    # -- the gate and evaluation
    promote_margin: float = Field(0.0, ge=0, lt=1, description="relative changed-token-loss improvement over the "
                                  "current adapter a candidate must show, beyond its 95 % interval excluding zero")
    max_forgetting: float = Field(0.02, ge=0, lt=1, description="largest relative loss increase on the older slice")
    eval_max_examples: int = Field(200, ge=1, le=1_000_000,
                                   description="window/older examples evaluated (a fixed sample)")
    fim_samples: int = Field(24, ge=0, le=100_000, description="held-out items scored by fill-in-the-middle completion")
    # -- the held-out window and the older slice (the daemon's planner)
    window_commits: int = Field(30, ge=1, le=1_000_000,
                                description="the window holds at least this many newest commits")
    window_examples: int = Field(300, ge=1, le=10_000_000, description="... and at least this many examples")
    older_slice_commits: int = Field(20, ge=0, le=1_000_000,
                                     description="commits that left the window, held out to measure forgetting")
    # -- the budget of one round (0 = none)
    max_round_s: float = Field(4.0 * HOUR, ge=0, le=7 * 24 * HOUR,
                               description="training time one round may take (0 = none): a bigger backlog trains "
                                           "newest first, the rest in later rounds")
    max_round_tokens: int = Field(0, ge=0, le=10**12, description="tokens one round may read (0 = none)")


DEFAULTS: dict[str, Any] = RoundSettings().model_dump()


def schedule(cfg: dict[str, Any], resumed: bool) -> dict[str, float]:
    """The learning-rate schedule of one round: a fresh adapter's, or a resumed one's (continuation)."""
    if resumed:
        return {"learning_rate": cfg["learning_rate"] * cfg["continuation_lr_ratio"],
                "warmup_steps": cfg["continuation_warmup_steps"], "min_lr_ratio": cfg["min_lr_ratio"]}
    return {"learning_rate": cfg["learning_rate"], "warmup_steps": cfg["warmup_steps"],
            "min_lr_ratio": cfg["min_lr_ratio"]}


class Budget(_Strict):
    max_tokens: int = Field(0, ge=0, description="0 = none")
    max_seconds: float = Field(0.0, ge=0, description="0 = none")


class RoundSpec(_Strict):
    """spec.json: what the daemon asks of one round. Shard lists are absolute paths; a shard may appear in
    several lists. The trainer keeps a shard's examples by their "commit" field: train_shards -> new_commits,
    replay_shards -> replay_commits, eval_shards -> window_commits (the gate's data) and older_commits
    (forgetting). Commit lists are ordered newest first."""

    base_model: str = Field(min_length=1)
    adapters_dir: str = Field(min_length=1)
    progress_file: str | None = None
    train_shards: list[str] = []
    replay_shards: list[str] = []
    eval_shards: list[str] = []
    new_commits: list[str] = []
    replay_commits: list[str] = []
    window_commits: list[str] = []
    older_commits: list[str] = []
    budget: Budget = Budget()
    train: RoundSettings = RoundSettings()
    # The held-out samples and their completion spans are drawn with the settings' own seed, not the round's:
    # every round (and `gitlora eval`) scores the same items, so the older slice measures the same examples
    # each round and scores already computed for a model are reused. None: the round's seed (an older spec).
    eval_seed: int | None = Field(None, ge=0, le=2**31 - 1)


def keep_commits(records: list[dict[str, Any]], commits: list[str] | None) -> list[dict[str, Any]]:
    """The records whose "commit" is in `commits`; all of them when `commits` is None (a spec written before
    the commit lists existed: its shards held exactly the round's examples)."""
    if commits is None:
        return records
    wanted = set(commits)
    return [r for r in records if r.get("commit") in wanted]


# -- outcomes: the trainer's exit status, and the reasons the daemon records for a round that did not finish
EXIT_OK = 0  # the round finished: promoted or not (the "done" event says which)
EXIT_FAIL = 1  # a failure: an exception, or a non-finite loss (progress error reason "nonfinite")
EXIT_SPEC = 2  # a bad spec, no data, or another round holds the adapters lock
EXIT_OOM = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # SIGTERM: the daemon cancelled the round

REASON_EXCEPTION, REASON_SPEC, REASON_OOM = "exception", "spec", "oom"
REASON_NONFINITE = "nonfinite"
REASON_TERMINATED, REASON_INTERRUPTED, REASON_KILLED = "terminated", "interrupted", "killed"
REASON_DAEMON_RESTARTED = "daemon restarted"

_EXIT_REASONS = {EXIT_FAIL: REASON_EXCEPTION, EXIT_SPEC: REASON_SPEC, EXIT_OOM: REASON_OOM,
                 EXIT_INTERRUPTED: REASON_INTERRUPTED, EXIT_TERMINATED: REASON_TERMINATED,
                 -9: REASON_KILLED, -15: REASON_TERMINATED}


def exit_reason(code: int | None) -> str:
    """The failure reason an exit status means when the trainer wrote no error event (Popen reports death
    by signal N as -N)."""
    return _EXIT_REASONS.get(code, f"exit {code}") if code is not None else "unknown"
