"""Before a round starts: can it start at all, and how long will it take (torch-free, no network, cheap).

A round that cannot run must say why, once, in `status`, with the next step, instead of starting a subprocess
that fails after minutes of download retries; and a round on slow hardware must show its estimated duration
and run within the configured budget instead of starting blind. The trainer runs with HF_HUB_OFFLINE=1
(never a download), so the base model must be found locally first:

  - a local directory: it must hold config.json and the weights;
  - a Hugging Face hub id: its snapshot must be in the local hub cache (huggingface_hub's
    `try_to_load_from_cache`, a pure file-system lookup; the cache directory is resolved from the environment
    at each call, as huggingface_hub itself would at start-up).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gitlora.trainer import data as datalib  # torch-free: rendering is plain text
from gitlora.trainer import plan as planlib

from .gpu import detect_gpu

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Rendered bytes (trainer.data.read_bytes) per token the round reads: 2.4-2.8 measured with the tiny model's
# 4k-entry tokenizer on the trainer tests' records, edit and FIM alike; StarCoder2's 49k-entry vocabulary packs
# more bytes per token, so this errs long.
RENDERED_BYTES_PER_TOKEN = 2.5


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use in this environment (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME)."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _next_step(name: str) -> str:
    return (f"download it once with `huggingface-cli download {name}`, or set train.base_model to a local "
            "directory (`gitlora model tiny` builds a small one)")


def locate_base_model(name: str) -> tuple[Path | None, str | None]:
    """(directory holding the model's config.json and weights, None) or (None, one-line reason + next step)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return None, f"base model directory {path} has no config.json: set train.base_model to a model directory"
        if not any((path / w).is_file() for w in WEIGHT_FILES):
            return None, (f"base model directory {path} has no weights ({WEIGHT_FILES[0]}): set train.base_model "
                          "to a complete model directory")
        return path, None
    if name.startswith(("/", "~", ".")) or path.exists():
        return None, (f"base model {name} does not exist: set train.base_model to a model directory "
                      "(`gitlora model tiny` builds a small one)")
    from huggingface_hub import try_to_load_from_cache  # light, torch-free; imported only when a hub id is used
    from huggingface_hub.errors import HFValidationError

    missing = f"base model {name} is not available locally: {_next_step(name)}"
    try:
        config = try_to_load_from_cache(repo_id=name, filename="config.json", cache_dir=hub_cache_dir())
    except HFValidationError:
        return None, (f"base model {name!r} is neither a directory nor a hub id: set train.base_model to a model "
                      "directory (`gitlora model tiny` builds a small one)")
    if not isinstance(config, str):  # None (never fetched) or the "known not to exist" marker
        return None, missing
    snapshot = Path(config).parent
    if not any((snapshot / w).is_file() for w in WEIGHT_FILES):
        return None, f"base model {name} is only partly downloaded (no weights in {snapshot}): {_next_step(name)}"
    return snapshot, None


def host_ram_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / planlib.GIB
    except (ValueError, OSError):
        return None


def new_example_tokens(train_files: list[Path], commits: set[str] | None, options: datalib.RenderOptions,
                       context_length: int) -> int:
    """Tokens the round's new examples are expected to read (only `commits`' examples when given): the bytes
    their renderings read (`read_bytes`: the parts each rendering uses, each example at most a context, by its
    sample weight) at RENDERED_BYTES_PER_TOKEN."""
    total = 0.0
    max_bytes = context_length * RENDERED_BYTES_PER_TOKEN
    for path in train_files:
        try:
            with open(path, "rb") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        if commits is None or record.get("commit") in commits:
                            total += datalib.read_bytes(record, options, max_bytes)
                    except (ValueError, TypeError, AttributeError):
                        continue  # the trainer reports bad lines and records; an estimate only skips them
        except OSError:
            continue  # verified just before; a file gone since is the trainer's to report
    return int(total / RENDERED_BYTES_PER_TOKEN)


@dataclass(frozen=True)
class Readiness:
    """What the daemon needs to start a round, or why it must not."""

    ok: bool
    line: str  # one line for `status`: the reason and next step, or the estimate
    budget: dict[str, Any] = field(default_factory=dict)  # the spec's budget
    eta_s: float | None = None  # estimated training time (bounded by the budget)


def before_round(config: Any, train_files: list[Path], adapters_dir: Path, commits: set[str] | None = None
                 ) -> Readiness:
    """Check that a round can start and estimate it. `config` is the [train] section (base_model, device,
    context_length, lora_r, lora_alpha, replay_share, epochs, max_round_s, max_round_tokens)."""
    where, problem = locate_base_model(config.base_model)
    if problem:
        return Readiness(False, problem)
    try:
        shape = planlib.shape_from_config(json.loads((where / "config.json").read_text()), name=config.base_model)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Readiness(False, f"base model {config.base_model}: unreadable config.json ({exc}): set "
                                "train.base_model to a complete model directory")
    gpu = None if config.device == "cpu" else detect_gpu()
    ram = host_ram_gb()
    kw = dict(context_length=config.context_length, lora_r=config.lora_r, lora_alpha=config.lora_alpha)
    if gpu is None:
        plan = planlib.make_plan(shape, None, ram_gb=ram, **kw)
    else:
        plan = planlib.make_plan(shape, gpu.total_gb, gpu.compute_capability, used_gb=gpu.used_gb, **kw)
    if not plan.fits:
        where_txt = f"{ram:.0f} GiB of RAM" if gpu is None and ram else "the GPU"
        return Readiness(False, f"base model {config.base_model} needs ~{plan.estimated_peak_gb:.0f} GiB on "
                                f"{plan.device}, more than {where_txt} allows: set train.base_model to a smaller "
                                "model (`gitlora model tiny` builds one)")
    measured = planlib.measured_rate(adapters_dir, plan)
    rate = measured or planlib.prior_tokens_per_s(plan, cores=os.cpu_count(),
                                                  compute_capability=gpu.compute_capability if gpu else None)
    budget = {"max_tokens": int(config.max_round_tokens), "max_seconds": float(config.max_round_s)}
    options = datalib.RenderOptions.from_settings(config.model_dump())
    new_tokens = new_example_tokens(train_files, commits, options, plan.context_length)
    tokens = planlib.round_tokens(new_tokens, config.replay_share, config.epochs)
    if config.max_steps:  # a step-capped round reads max_steps steps' tokens, however much is new
        tokens = min(tokens, config.max_steps * (config.micro_batch or plan.micro_batch)
                     * (config.grad_accum or plan.grad_accum) * plan.context_length)
    eta = tokens / rate
    cap = planlib.budget_cap(budget, rate)
    how = (f"~{tokens:,} tokens at ~{rate:,.0f} tokens/s ({'measured' if measured else 'estimated'}) for "
           f"{shape.name} on {plan.device}")
    if cap and tokens > cap:
        bounded = cap / rate
        line = (f"round estimated {planlib.format_duration(eta)} ({how}): bounded to "
                f"{planlib.format_duration(bounded)} by train.max_round_s/max_round_tokens, newest commits "
                "first; the rest train in later rounds")
        return Readiness(True, line, budget, bounded)
    return Readiness(True, f"round estimated {planlib.format_duration(eta)} ({how})", budget, eta)
