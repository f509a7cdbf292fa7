"""One training round, top to bottom (the shape of nanoGPT's train.py): spec -> plan -> model -> adapter -> data
-> loop -> eval -> save -> gate -> promote.

    python -m gitlora.trainer --spec SPEC.json

SPEC.json is trainer/spec.py's RoundSpec (shard lists, the commit lists that pick examples out of them, and
`train`: the round's settings, any missing one from spec.DEFAULTS; 0 / 'auto' = from the plan).

It talks back through `progress_file` (JSON lines: start, progress, eval, done | error) and its exit status
(spec.EXIT_*: 0 = round finished, promoted or not; 1 = failure (a non-finite loss: reason "nonfinite"); 2 = bad spec / no data / another round holds the
adapters lock; 3 = out of memory; 143 = SIGTERM, after an "error" event with reason "terminated").

Evaluation and the gate: the examples of `eval_shards` whose commit is in `window_commits` are the held-out
window, those in `older_commits` the older slice (without `window_commits`, all of eval_shards is the window and
there is no older slice). Each is sampled (`eval_max_examples`, `fim_samples`, seeded) and scored for the base
model (the same weights with the adapter disabled), the current adapter as resumed (none on round 1) and the
candidate; trainer/gate.py decides promotion from the paired per-example changed-token losses. All numbers go
to metrics.json under `evaluation` and `gate`.

Choices worth knowing: the loss is computed on target tokens only (lm_head applied to those positions alone);
packed blocks attend only within each example (packed_attention.py); `train_loss_last` is the mean of the last
three optimizer steps; without window examples the candidate is promoted on training alone (the gate needs
data); a loss that is not a finite number (fp16 overflow, NaN) fails the round, it never just keeps current.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

from gitlora.trainer import data, evaluate, gate, metrics, plan as planlib, registry, score_cache
from gitlora.trainer.evaluate import target_loss_sum  # noqa: F401 - the loss path, shared with training
from gitlora.trainer.spec import (DEFAULTS, EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OOM, EXIT_SPEC, EXIT_TERMINATED,
                                  REASON_NONFINITE, keep_commits, schedule)
# peft 0.21 still asks transformers 5 for the deprecated attribute on every get_peft_model: noise, not news.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class SpecError(Exception):
    """Bad spec or nothing to train on: exit 2."""


class NonFiniteLoss(Exception):
    """A loss that is not a finite number (fp16 overflow, NaN weights): a failed round, exit 1."""


class Terminated(Exception):
    """SIGTERM (the daemon cancelling a round): report it, exit 143; written versions stay consistent."""


def _on_sigterm(signum, frame):
    raise Terminated("terminated by SIGTERM")


def lock_adapters(adapters_dir: Path):
    """One round per adapters dir: an flock held for the round (the kernel releases it if the process dies)."""
    import fcntl

    fd = os.open(adapters_dir / ".round.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpecError(f"another training round holds {adapters_dir / '.round.lock'}") from None
    return fd


class Progress:
    """Append-only JSON-lines channel to the daemon; every line flushed, so a killed round leaves a readable log."""

    def __init__(self, path: str | None):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8") if path else None

    def __call__(self, event: str, **fields) -> None:
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields})
        if self.f:
            self.f.write(line + "\n")
            self.f.flush()
        else:
            print(line, flush=True)


# -------------------------------------------------------------------------------------------------- model side
def load_base(base_model: str, plan, torch):
    """Base model as the plan says: nf4 + fp16/bf16 compute (bitsandbytes) on CUDA, else plain dtype."""
    from transformers import AutoModelForCausalLM

    from gitlora.trainer import packed_attention

    dtype = getattr(torch, plan.compute_dtype)
    kw = dict(attn_implementation=plan.attention, dtype=dtype)
    if plan.device == "cuda" and plan.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kw["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(base_model, **kw)
    if plan.device == "cuda" and plan.quantization != "nf4":
        model.to("cuda")
    model.config.use_cache = False
    packed_attention.enable(model)  # per-example causal SDPA inside packed blocks (see packed_attention.py)
    # Not peft's prepare_model_for_kbit_training: it upcasts every non-quantised weight (embeddings too) to fp32,
    # ~0.6 GB more for StarCoder2-3B, for frozen weights that autocast handles fine in fp16.
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def attach_adapter(model, adapters_dir: Path, cfg: dict):
    """Resume `adapters/current` (trainable) or create a fresh LoRA; never touches the vocabulary."""
    from peft import LoraConfig, PeftModel, get_peft_model

    parent = registry.current_version(adapters_dir)
    if parent is not None:
        return PeftModel.from_pretrained(model, str(adapters_dir / parent), is_trainable=True), parent
    lora = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                      target_modules=list(planlib.STARCODER2_TARGETS), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), None


def eval_records(spec: dict) -> dict[str, list[dict]]:
    """The window and the older slice: eval_shards' examples filtered by the spec's commit lists."""
    records = data.read_shards(spec.get("eval_shards") or [])
    if spec.get("window_commits") is None:  # a spec from before the rolling window: all of it is the window
        return {"window": records, "older": []}
    window, older = set(spec.get("window_commits") or []), set(spec.get("older_commits") or [])
    return {"window": [r for r in records if r.get("commit") in window],
            "older": [r for r in records if r.get("commit") in older]}


def score_all(model, tokenizer, evalsets: dict, micro_batch: int, torch, device, autocast, label: str,
              cache: score_cache.ScoreCache | None = None) -> dict:
    """`model` on every eval set (what `cache`, this model's, holds is not computed again); a non-finite loss on
    any example fails the round."""
    scores = {}
    for name, evalset in evalsets.items():
        scores[name] = evaluate.evaluate(model, tokenizer, evalset, micro_batch, torch, device, autocast, cache)
        bad = metrics.nonfinite(scores[name].losses)
        if bad:
            raise NonFiniteLoss(f"{label}: {bad} of {len(evalset.records)} {name} examples have a non-finite loss")
    return scores


def lr_at(step: int, total: int, cfg: dict) -> float:
    """Linear warm-up (re-warmed every round: the optimizer state is new), then cosine to min_lr_ratio x lr.
    `cfg` holds learning_rate, warmup_steps and min_lr_ratio: a round's `spec.schedule`."""
    lr, warm = cfg["learning_rate"], min(cfg["warmup_steps"], max(0, total - 1))
    if step < warm:
        return lr * (step + 1) / (warm + 1)
    progress = (step - warm) / max(1, total - warm)
    floor = cfg["min_lr_ratio"]
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ------------------------------------------------------------------------------------------------------ round
def run_round(spec: dict, progress: Progress) -> dict:
    t_start = time.time()
    cfg = {**DEFAULTS, **(spec.get("train") or {})}
    for key in ("base_model", "adapters_dir"):
        if not spec.get(key):
            raise SpecError(f"spec lacks {key!r}")
    base_model, adapters_dir = str(spec["base_model"]), Path(spec["adapters_dir"])
    adapters_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_adapters(adapters_dir)
    try:
        registry.clean_partial(adapters_dir)
        return _round(spec, progress, cfg, base_model, adapters_dir, t_start)
    finally:
        os.close(lock)


def round_plan(base_model: str, cfg: dict):
    """The hardware plan for this model and these settings (the spec's 'auto' left to the plan, overrides
    applied); `gitlora eval` uses it too, so its numbers compare with the rounds' own."""
    try:
        shape = planlib.model_shape(base_model)
    except ValueError:
        from transformers import AutoConfig

        shape = planlib.shape_from_config(AutoConfig.from_pretrained(base_model).to_dict(), name=base_model)
    plan = planlib.auto_plan(shape, device=cfg["device"], context_length=int(cfg["context_length"]),
                             lora_r=int(cfg["lora_r"]), lora_alpha=int(cfg["lora_alpha"]))
    overrides = {}
    if cfg["quantization"] != "auto":
        overrides["quantization"] = None if cfg["quantization"] in ("none", None) else cfg["quantization"]
    if cfg["compute_dtype"] != "auto":
        overrides["compute_dtype"] = cfg["compute_dtype"]
    if overrides:
        plan = dataclasses.replace(plan, **overrides)
    if plan.quantization and plan.device != "cuda":
        raise SpecError("4-bit quantisation needs CUDA (bitsandbytes)")
    return plan


def _round(spec: dict, progress: Progress, cfg: dict, base_model: str, adapters_dir: Path, t_start: float) -> dict:
    """The round proper, with the adapters lock held."""
    # ---- plan
    plan = round_plan(base_model, cfg)
    micro_batch = int(cfg["micro_batch"]) or plan.micro_batch
    grad_accum = int(cfg["grad_accum"]) or plan.grad_accum

    import torch
    from transformers import AutoTokenizer

    random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    device = torch.device(plan.device)
    half = plan.compute_dtype in ("float16", "bfloat16")
    dtype = getattr(torch, plan.compute_dtype)

    def autocast():
        return torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and half else contextlib.nullcontext()

    # ---- data: render, mask, pack; replay older shards; eval on the held-out window and the older slice
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    ctx = plan.context_length
    new = keep_commits(data.read_shards(spec.get("train_shards") or []), spec.get("new_commits"))

    # ---- model + adapter
    model = load_base(base_model, plan, torch)
    model, parent = attach_adapter(model, adapters_dir, cfg)

    # ---- budget: a backlog bigger than the round's time/token budget trains its newest commits first, at the
    # rate an earlier round measured on this machine, else at one measured now (the plan's FLOP-count prior can
    # be off by an order of magnitude: too low and the round uses a fraction of its budget)
    rate, rate_source = planlib.measured_rate(adapters_dir, plan), "measured"
    if not rate and (spec.get("budget") or {}).get("max_seconds"):
        rate, rate_source = calibrated_rate(model, plan, micro_batch, torch, device, autocast), "calibrated"
    if not rate:
        gpu = planlib.detect_gpu() if plan.device == "cuda" else None
        rate, rate_source = planlib.prior_tokens_per_s(
            plan, cores=os.cpu_count(), compute_capability=gpu.compute_capability if gpu else None), "prior"
    step_tokens = int(cfg["max_steps"]) * micro_batch * grad_accum * ctx  # what a max_steps round reads (0: none)
    options = data.RenderOptions.from_settings(cfg)
    made = data.Tokenizations(tokenizer, ctx, options, int(cfg["seed"]))  # counted here, packed by build
    old = keep_commits(data.read_shards(spec.get("replay_shards") or []), spec.get("replay_commits"))
    # Nothing to replay (a first round): the new examples get the whole budget, not what replay leaves them.
    replay_share = float(cfg["replay_share"]) if old else 0.0
    new, budget_report = planlib.select_by_budget(
        new, made.tokens, spec.get("budget"), rate, replay_share, float(cfg["epochs"]), step_tokens=step_tokens)
    mixed, replayed = data.mix_replay(new, old, float(cfg["replay_share"]), int(cfg["seed"]),
                                      newest_first=spec.get("replay_commits"),
                                      halflife_commits=float(cfg["replay_halflife_commits"]))
    train = data.build(mixed, tokenizer, ctx, options=options, seed=int(cfg["seed"]), made=made)
    del made  # the tokens of deferred records: not needed by the loop
    # Completions are scored on the window alone: the older slice is there for forgetting, which its losses
    # measure, and greedy decoding (token by token, three models) is most of a round's evaluation time.
    eval_seed = int(cfg["seed"] if spec.get("eval_seed") is None else spec["eval_seed"])
    evalsets = {name: evaluate.prepare(records, tokenizer, ctx, max_examples=int(cfg["eval_max_examples"]),
                                       fim_samples=int(cfg["fim_samples"]) if name == "window" else 0,
                                       seed=eval_seed, cross_file=bool(cfg.get("cross_file_context", True)))
                for name, records in eval_records(spec).items()}
    if not train.packed.input_ids:
        raise SpecError("no trainable examples in train_shards")
    micro_steps = math.ceil(len(train.packed.input_ids) / micro_batch)
    total = int(cfg["max_steps"]) or max(1, math.ceil(micro_steps * float(cfg["epochs"]) / grad_accum))
    budget_report["rate_source"] = rate_source

    sched = schedule(cfg, resumed=parent is not None)
    version_dir = registry.next_version_dir(adapters_dir)
    progress("start", pid=os.getpid(), version=version_dir.name, parent=parent, device=plan.device,
             quantization=plan.quantization, dtype=plan.compute_dtype, context_length=ctx, micro_batch=micro_batch,
             grad_accum=grad_accum, total=total, learning_rate=sched["learning_rate"],
             warmup_steps=sched["warmup_steps"], examples=train.examples, replayed=replayed,
             skipped=train.skipped, truncated=train.truncated, left_out_by_weight=train.left_out_by_weight,
             blocks=len(train.packed.input_ids),
             padding_waste=round(train.packed.waste, 4),
             eval_examples=len(evalsets["window"].records), older_examples=len(evalsets["older"].records))

    # ---- eval before: the base model (adapter disabled) and the current adapter as resumed (none on round 1);
    # what earlier rounds scored of them is reused (the window moves by a few commits per round)
    base_key = score_cache.base_key(base_model, plan.to_dict())
    caches = {"base": score_cache.ScoreCache.for_model(adapters_dir, "base", base_key)}
    if parent:
        caches["current"] = score_cache.ScoreCache.for_model(
            adapters_dir, parent, score_cache.adapter_key(base_key, adapters_dir / parent))
    with model.disable_adapter():
        base_scores = score_all(model, tokenizer, evalsets, micro_batch, torch, device, autocast, "base model",
                                caches["base"])
    current_scores = (score_all(model, tokenizer, evalsets, micro_batch, torch, device, autocast, f"current {parent}",
                                caches["current"]) if parent else None)
    for cache in caches.values():
        cache.save()
    eval_before = (current_scores or base_scores)["window"].summary()["target_loss"]
    progress("eval", which="before", loss=eval_before,
             base={k: v.summary() for k, v in base_scores.items()},
             current={k: v.summary() for k, v in current_scores.items()} if current_scores else None,
             cached={who: cache.stats() for who, cache in caches.items()})

    # ---- the loop: AdamW over LoRA params, grad accumulation weighted by target tokens, GradScaler for fp16
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=sched["learning_rate"], weight_decay=0.0,
                                  fused=device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and plan.compute_dtype == "float16")
    model.train()
    order = list(range(micro_steps))
    rng = random.Random(cfg["seed"])
    stream, losses, target_tokens, micro_read = [], [], 0, set()
    read_tokens, tokens_per_micro_batch, budget_stop, steps_done = 0, train.packed.real_tokens / micro_steps, None, 0
    t_loop = time.time()
    for step in range(total):
        while len(stream) < grad_accum:  # next micro-batches, a fresh shuffle per epoch
            rng.shuffle(order)
            stream += order
        group, stream = stream[:grad_accum], stream[grad_accum:]
        micro_read.update(group)
        mbs = [tuple(torch.tensor(getattr(train.packed, k)[i * micro_batch:(i + 1) * micro_batch],
                                  dtype=torch.float32 if k == "weights" else torch.long, device=device)
                     for k in ("input_ids", "position_ids", "labels", "weights")) for i in group]
        group_tokens = sum(int((lab[:, 1:] != data.IGNORE).sum()) for _, _, lab, _ in mbs)
        group_weight = max(1e-9, sum(float(w[:, 1:].sum()) for *_, w in mbs))  # the loss: a weighted token mean
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total, sched)
        loss_sum = 0.0
        for ids, pos, labels, weights in mbs:
            with autocast():
                s, _ = target_loss_sum(model, ids, pos, labels, torch, chunked_ckpt=plan.gradient_checkpointing,
                                       weights=weights)
            scaler.scale(s / group_weight).backward()
            loss_sum += float(s.detach())
        if not math.isfinite(loss_sum):  # fp16 overflow or NaN weights: a failure, not a step the scaler skips
            raise NonFiniteLoss(f"training loss is {loss_sum} at step {step + 1} of {total}")
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        target_tokens += group_tokens
        losses.append(loss_sum / group_weight)
        elapsed = time.time() - t_loop
        progress("progress", step=step + 1, total=total, loss=round(losses[-1], 5), tokens=target_tokens,
                 lr=g["lr"], eta_s=round(elapsed / (step + 1) * (total - step - 1), 1))
        steps_done = step + 1
        read_tokens += round(len(group) * tokens_per_micro_batch)  # real (non-padding) tokens, on average
        budget_stop = planlib.budget_reached(read_tokens, elapsed, spec.get("budget"))
        if budget_stop and steps_done < total:
            progress("budget", reached=budget_stop, step=steps_done, total=total, tokens=read_tokens)
            break
        budget_stop = None
    train_time = time.time() - t_loop
    # A selected commit is trained when the loop read every one of its examples: a loop stopped by the budget
    # (or by max_steps) before the end of its selection leaves the rest to later rounds, newest first.
    blocks_read = [train.packed.members[b] for i in micro_read
                   for b in range(i * micro_batch, min((i + 1) * micro_batch, len(train.packed.members)))]
    covered, unread = planlib.coverage(budget_report["covered_commits"], train.example_commits, blocks_read)
    budget_report.update(covered_commits=covered, deferred_commits=unread + budget_report["deferred_commits"])
    budget_report.update(stopped_by=budget_stop, read_tokens=read_tokens,
                         read_tokens_per_s=round(read_tokens / max(train_time, 1e-9), 3))

    # ---- eval after, gate, save the candidate (temp dir + rename), promote
    candidate_cache = score_cache.ScoreCache.for_model(adapters_dir, version_dir.name, "")  # keyed once saved
    candidate_scores = score_all(model, tokenizer, evalsets, micro_batch, torch, device, autocast, "candidate",
                                 candidate_cache)
    eval_after = candidate_scores["window"].summary()["target_loss"]
    progress("eval", which="after", loss=eval_after,
             candidate={k: v.summary() for k, v in candidate_scores.items()})
    scores = {"base": base_scores, "current": current_scores, "candidate": candidate_scores}
    window_losses = {who: s["window"].losses if s else None for who, s in scores.items()}
    older_losses = {who: s["older"].losses if s else None for who, s in scores.items()}
    decision = gate.decide(window_losses, older_losses, promote_margin=float(cfg["promote_margin"]),
                           max_forgetting=float(cfg["max_forgetting"]), seed=int(cfg["seed"]))
    passed = decision.passed
    evaluation = {who: {name: sc.summary() for name, sc in s.items()} if s else None for who, s in scores.items()}
    commit_times = [r.get("commit_time") for r in new if r.get("commit_time") is not None]
    tail = losses[-min(3, len(losses)):]
    result = dict(
        version=version_dir.name, parent=parent, base_model=base_model, gate_passed=passed,
        gate=decision.to_dict(), evaluation=evaluation,
        eval_loss_before=eval_before, eval_loss_after=eval_after, train_loss_first=losses[0],
        train_loss_last=sum(tail) / len(tail), losses=[round(x, 5) for x in losses], steps=steps_done,
        budget=budget_report,
        target_tokens=target_tokens, tokens_per_s=round(target_tokens / max(train_time, 1e-9), 1),
        padding_waste=round(train.packed.waste, 4), train_time_s=round(train_time, 2),
        eval_cache={who: cache.stats() for who, cache in caches.items()},
        time_s=round(time.time() - t_start, 2), examples=train.examples, replayed=replayed,
        skipped=train.skipped, truncated=train.truncated, left_out_by_weight=train.left_out_by_weight,
        eval_examples=len(evalsets["window"].records),
        data={"train_shards": [str(p) for p in spec.get("train_shards") or []],
              "replay_shards": [str(p) for p in spec.get("replay_shards") or []],
              "eval_shards": [str(p) for p in spec.get("eval_shards") or []],
              "window_commits": len(spec.get("window_commits") or []),
              "older_commits": len(spec.get("older_commits") or []),
              "commits": len({r.get("commit") for r in new}),
              "first_commit_time": min(commit_times, default=None),
              "last_commit_time": max(commit_times, default=None)},
        config=cfg, plan=plan.to_dict())
    tmp = registry.temp_dir_for(version_dir)
    model.save_pretrained(tmp)
    (tmp / registry.METRICS).write_text(json.dumps(result, indent=2))
    registry.commit_version(tmp, version_dir)
    if passed:
        # The candidate's scores are the next round's "current" scores: keyed by its weights as saved.
        candidate_cache.model_key = score_cache.adapter_key(base_key, version_dir)
        candidate_cache.save()
        registry.promote(adapters_dir, version_dir.name)
        score_cache.prune(adapters_dir, keep=("base", version_dir.name))
    done = {k: result[k] for k in ("version", "parent", "eval_loss_before", "eval_loss_after", "train_loss_first",
                                   "train_loss_last", "target_tokens", "tokens_per_s", "padding_waste", "gate",
                                   "budget", "evaluation")}
    progress("done", promoted=passed, current=registry.current_version(adapters_dir), **done)
    return {"promoted": passed, **result}


def calibrated_rate(model, plan, micro_batch: int, torch, device, autocast) -> float:
    """Tokens read per second of training, measured on this machine: micro-steps on a full block of random
    tokens, the fastest of five timed after one untimed (allocation and warm-up); their gradients are dropped
    and no optimizer step is taken, so the adapter is unchanged. For the first round with a model and device,
    before any round has measured its rate. The fastest, because other work on a shared machine only ever slows
    a step down; a selection the loop then does not finish is not lost (see `planlib.coverage`)."""
    ctx = plan.context_length
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(model.config.vocab_size), (micro_batch, ctx), generator=generator).to(device)
    positions = torch.arange(ctx).repeat(micro_batch, 1).to(device)
    model.train()
    timings = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws stay the round's
        for _ in range(6):
            started = time.perf_counter()
            with autocast():
                loss, _ = target_loss_sum(model, ids, positions, ids, torch,
                                          chunked_ckpt=plan.gradient_checkpointing)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return micro_batch * ctx / min(timings[1:])


def read_tokens_of(record: dict, tokenizer, context_length: int, cfg: dict) -> int:
    """Tokens the loop reads for one record, rendered and cut exactly as data.build does (0 if skipped)."""
    return data.example_tokens(record, tokenizer, context_length, data.RenderOptions.from_settings(cfg),
                               int(cfg["seed"]))


def _is_oom(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gitlora.trainer", description="Run one LoRA training round.")
    ap.add_argument("--spec", required=True, help="path of the round's SPEC.json")
    args = ap.parse_args(argv)
    try:
        os.nice(10)  # a background job: the user's editor and compiler come first
    except OSError:
        pass
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        spec = json.loads(Path(args.spec).read_text())
    except (OSError, json.JSONDecodeError) as e:
        Progress(None)("error", reason="spec", message=str(e))
        return EXIT_SPEC
    progress = Progress(spec.get("progress_file"))
    try:
        run_round(spec, progress)
        return 0
    except SpecError as e:
        progress("error", reason="spec", message=str(e))
        return EXIT_SPEC
    except Terminated as e:
        progress("error", reason="terminated", message=str(e))
        return EXIT_TERMINATED
    except NonFiniteLoss as e:
        progress("error", reason=REASON_NONFINITE, message=str(e))
        return EXIT_FAIL
    except BaseException as e:  # noqa: BLE001 - the daemon must always get an error event
        if _is_oom(e):
            progress("error", reason="oom", message=str(e)[:2000])
            return EXIT_OOM
        if isinstance(e, KeyboardInterrupt):
            progress("error", reason="interrupted", message="interrupted")
            return EXIT_INTERRUPTED
        progress("error", reason="exception", message=f"{type(e).__name__}: {e}",
                 traceback=traceback.format_exc()[-4000:])
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
