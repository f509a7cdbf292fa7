"""Hardware plan: how to fine-tune a given model on the GPU (or CPU) at hand, with an honest memory estimate.

Pure arithmetic, no torch import: the CLI (`gitlora plan`) and the daemon can show the plan without paying for
torch. The numbers are estimates written out term by term (see `format_plan`) so a user can check them:

  weights      4-bit nf4 with double-quantised absmax = 4 + 8/64 + 32/(64*256) bits per linear weight;
               embeddings, biases and norms stay in the compute dtype (bitsandbytes quantises nn.Linear only)
  lora         trainable params x 16 B (fp32 param 4 + grad 4 + Adam m 4 + v 4)
  checkpoints  with gradient checkpointing, one hidden-state tensor per layer: L x b x s x h x 2 B
  layer        the one layer being recomputed in backward: b x s x (12 h + 4 i) x 2 B (norm outputs, q/k/v/o,
               residuals, LoRA dropout copies, MLP c_fc + GELU outputs, and their gradients)
  dequant      bitsandbytes dequantises one linear weight at a time to fp16: the largest one, i x h x 2 B
  logits       the loss runs on target positions in chunks of 1024: chunk x vocab x 12 B (fp16 logits, fp32
               upcast, fp32 grad, fp16 grad)
  cuda         CUDA context + cuBLAS workspace + kernels (~0.5 GiB) and 10 % allocator fragmentation
"""
from __future__ import annotations

import json
import math
from typing import Any
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gitlora.daemon.gpu import GpuInfo, detect_gpu  # torch-free; the plan's names for them

GIB = 1024 ** 3
STARCODER2_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # 0.516 B per quantised weight (QLoRA double quantisation)
LOSS_CHUNK = 1024  # target positions per lm_head/cross-entropy chunk (round.py uses the same number)
TOKENS_PER_STEP = 16384  # tokens per optimizer step the plan aims for (micro-batch x context x accumulation)
MAX_MICROBATCH_TOKENS = 4096  # beyond this a bigger micro-batch buys little speed and costs headroom
CUDA_FIXED_GIB = 0.5
FRAGMENTATION = 0.10


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder-only model the memory estimate needs."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = True
    max_positions: int = 16384

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_params(self) -> int:
        """Weights of the quantisable nn.Linear layers of all decoder blocks (StarCoder2: non-gated MLP)."""
        kv = self.kv_heads * self.head_dim
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 2 * self.hidden * self.intermediate
        return per_layer * self.layers

    def other_params(self) -> int:
        """Embeddings (+ untied lm_head), biases and layer norms: kept in the compute dtype."""
        kv = self.kv_heads * self.head_dim
        biases = 3 * self.hidden + 2 * kv + self.intermediate
        norms = 4 * self.hidden
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return emb + self.layers * (biases + norms) + 2 * self.hidden

    def params(self) -> int:
        return self.linear_params() + self.other_params()

    def lora_params(self, r: int, targets=STARCODER2_TARGETS) -> int:
        kv = self.kv_heads * self.head_dim
        dims = {"q_proj": (self.hidden, self.hidden), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (self.hidden, self.hidden), "c_fc": (self.hidden, self.intermediate),
                "c_proj": (self.intermediate, self.hidden)}
        return self.layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets if t in dims)


# bigcode/starcoder2-*: config.json values (3b: 3.03B params; 7b: 7.17B; 15b: 15.96B, untied lm_head).
KNOWN_MODELS = {
    "starcoder2-3b": ModelShape("starcoder2-3b", 3072, 30, 24, 2, 12288, 49152, tied=True),
    "starcoder2-7b": ModelShape("starcoder2-7b", 4608, 32, 36, 4, 18432, 49152, tied=True),
    "starcoder2-15b": ModelShape("starcoder2-15b", 6144, 40, 48, 4, 24576, 49152, tied=False),
}


def shape_from_config(config: dict, name: str = "model") -> ModelShape:
    """A ModelShape from a config.json dict (StarCoder2 / GPT-style key names)."""
    hidden = config.get("hidden_size") or config.get("n_embd")
    heads = config.get("num_attention_heads") or config.get("n_head")
    return ModelShape(
        name=config.get("_name_or_path") or name, hidden=hidden,
        layers=config.get("num_hidden_layers") or config.get("n_layer"), heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        intermediate=config.get("intermediate_size") or config.get("n_inner") or 4 * hidden,
        vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", True)),
        max_positions=config.get("max_position_embeddings") or config.get("n_positions") or 2048)


def model_shape(model) -> ModelShape:
    """Accepts a ModelShape, a config.json dict, a local model dir, or a name like 'bigcode/starcoder2-3b'."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, dict):
        return shape_from_config(model)
    path = Path(str(model)).expanduser()
    if (path / "config.json").is_file():
        return shape_from_config(json.loads((path / "config.json").read_text()), name=path.name)
    key = str(model).lower().rsplit("/", 1)[-1]
    key = key if key.startswith("starcoder2-") else f"starcoder2-{key}"
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key]
    raise ValueError(f"unknown model {model!r}: give a local dir with config.json or one of {sorted(KNOWN_MODELS)}")


@dataclass(frozen=True)
class Plan:
    model: str
    params: int
    device: str  # "cuda" | "cpu"
    quantization: str | None  # "nf4" | None
    compute_dtype: str  # "float16" | "bfloat16" | "float32"
    gradient_checkpointing: bool
    attention: str
    context_length: int
    micro_batch: int
    grad_accum: int
    lora_r: int
    lora_alpha: int
    lora_targets: tuple[str, ...]
    lora_params: int
    estimated_peak_gb: float
    breakdown: tuple[tuple[str, float, str], ...]  # (term, GiB, arithmetic)
    memory_gb: float | None  # the device's total memory (GiB) the plan was made for; None = host RAM
    budget_gb: float | None
    fits: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


def _estimate(m: ModelShape, *, quant: str | None, dtype_bytes: int, ckpt: bool, ctx: int, batch: int, r: int,
              cuda: bool) -> list[tuple[str, float, str]]:
    """Peak memory terms in GiB, each with its arithmetic (see module docstring)."""
    lin, other = m.linear_params(), m.other_params()
    if quant == "nf4":
        weights = lin * NF4_BYTES + other * dtype_bytes
        w_txt = f"{lin/1e9:.3f}B linear x {NF4_BYTES:.3f} B (nf4+dq) + {other/1e9:.3f}B other x {dtype_bytes} B"
    else:
        weights = (lin + other) * dtype_bytes
        w_txt = f"{(lin + other)/1e9:.3f}B x {dtype_bytes} B"
    lora = m.lora_params(r)
    tokens = batch * ctx
    terms = [("weights", weights, w_txt),
             ("lora", lora * 16, f"{lora/1e6:.1f}M x 16 B (fp32 param+grad+Adam m,v)")]
    layer = tokens * (12 * m.hidden + 4 * m.intermediate) * dtype_bytes
    if ckpt:
        terms.append(("checkpoints", m.layers * tokens * m.hidden * dtype_bytes,
                      f"{m.layers} layers x {tokens} tok x {m.hidden} x {dtype_bytes} B"))
        terms.append(("layer", layer, f"{tokens} tok x (12x{m.hidden} + 4x{m.intermediate}) x {dtype_bytes} B"))
    else:
        terms.append(("activations", m.layers * layer,
                      f"{m.layers} layers x {tokens} tok x (12x{m.hidden} + 4x{m.intermediate}) x {dtype_bytes} B"))
    if quant == "nf4":
        terms.append(("dequant", m.intermediate * m.hidden * 2, f"{m.intermediate} x {m.hidden} x 2 B"))
    chunk = min(tokens, LOSS_CHUNK)
    logit_bytes = 12 if dtype_bytes == 2 else 8
    terms.append(("logits", chunk * m.vocab * logit_bytes, f"{chunk} tok x {m.vocab} x {logit_bytes} B"))
    out = [(name, b / GIB, txt) for name, b, txt in terms]
    if cuda:
        sub = sum(t[1] for t in out)
        out.append(("cuda", CUDA_FIXED_GIB + FRAGMENTATION * sub,
                    f"{CUDA_FIXED_GIB} GiB context/workspace + {FRAGMENTATION:.0%} x {sub:.2f} fragmentation"))
    return out


def make_plan(model, vram_gb: float | None = None, compute_capability: float | None = None, *,
              used_gb: float = 0.0, context_length: int = 0, lora_r: int = 16, lora_alpha: int | None = None,
              max_context: int = 2048, ram_gb: float | None = None) -> Plan:
    """Choose precision, quantisation, checkpointing, context and batch so the estimate fits the GPU.

    `vram_gb=None` means no usable GPU: an fp32 CPU plan. On CUDA the budget is 92 % of (total - used); the
    search prefers unquantised half-precision LoRA (faster, exact weights), then nf4 QLoRA, always with the
    longest context (up to `max_context`: item-level examples are short and packing fills blocks anyway)
    before a larger micro-batch. `context_length` > 0 pins the context.
    """
    m = model_shape(model)
    alpha = lora_alpha if lora_alpha is not None else 2 * lora_r
    notes: list[str] = []
    cap_ctx = min(max_context, m.max_positions)
    contexts = [context_length] if context_length else [c for c in (4096, 2048, 1024, 512, 256) if c <= cap_ctx]
    contexts = contexts or [cap_ctx]
    common = dict(model=m.name, params=m.params(), attention="sdpa", lora_r=lora_r, lora_alpha=alpha,
                  lora_targets=STARCODER2_TARGETS, lora_params=m.lora_params(lora_r))

    if vram_gb is None:
        ctx = contexts[0] if context_length else min(1024, contexts[0])
        terms = _estimate(m, quant=None, dtype_bytes=4, ckpt=False, ctx=ctx, batch=1, r=lora_r, cuda=False)
        peak = sum(t[1] for t in terms)
        notes.append("no CUDA GPU: fp32 on CPU, no quantisation (bitsandbytes 4-bit needs CUDA); slow for >1B")
        fits = ram_gb is None or peak <= 0.8 * ram_gb
        if not fits:
            notes.append(f"estimate {peak:.1f} GiB exceeds 80% of {ram_gb:.1f} GiB RAM")
        return Plan(device="cpu", quantization=None, compute_dtype="float32", gradient_checkpointing=False,
                    context_length=ctx, micro_batch=1, grad_accum=max(1, TOKENS_PER_STEP // (8 * ctx)),
                    estimated_peak_gb=round(peak, 3), breakdown=tuple(terms), memory_gb=ram_gb,
                    budget_gb=None if ram_gb is None else 0.8 * ram_gb, fits=fits, notes=tuple(notes), **common)

    cc = compute_capability if compute_capability is not None else 7.5
    dtype = "bfloat16" if cc >= 8.0 else "float16"
    if cc < 8.0:
        notes.append(f"compute capability {cc}: no bf16, no FlashAttention 2 -> fp16 compute with SDPA")
    budget = 0.92 * max(vram_gb - used_gb, 0.0)
    def first_fit(quant, ckpt):
        for ctx in contexts:  # longest context first, then the largest micro-batch that fits
            for batch in (b for b in (4, 2, 1) if b * ctx <= MAX_MICROBATCH_TOKENS or b == 1):
                terms = _estimate(m, quant=quant, dtype_bytes=2, ckpt=ckpt, ctx=ctx, batch=batch, r=lora_r,
                                  cuda=True)
                peak = sum(t[1] for t in terms)
                if peak <= budget:
                    return quant, ckpt, ctx, batch, terms, peak
        return None

    best = None
    for quant, ckpt in ((None, False), (None, True), ("nf4", True)):
        found = first_fit(quant, ckpt)
        # Unquantised wins only while it keeps a useful context; otherwise QLoRA with a long context.
        if found and (quant == "nf4" or found[2] >= min(1024, contexts[0])):
            best = found
            break
    fits = best is not None
    if not fits:  # nothing fits: report the smallest configuration anyway, marked as not fitting
        ctx = contexts[-1]
        terms = _estimate(m, quant="nf4", dtype_bytes=2, ckpt=True, ctx=ctx, batch=1, r=lora_r, cuda=True)
        best = ("nf4", True, ctx, 1, terms, sum(t[1] for t in terms))
        notes.append(f"does not fit: needs ~{best[5]:.1f} GiB, budget {budget:.1f} GiB; use a smaller model")
    quant, ckpt, ctx, batch, terms, peak = best
    return Plan(device="cuda", quantization=quant, compute_dtype=dtype, gradient_checkpointing=ckpt,
                context_length=ctx, micro_batch=batch, grad_accum=max(1, math.ceil(TOKENS_PER_STEP / (ctx * batch))),
                estimated_peak_gb=round(peak, 3), breakdown=tuple(terms), memory_gb=vram_gb,
                budget_gb=round(budget, 3), fits=fits, notes=tuple(notes), **common)


def auto_plan(model, device: str = "auto", **kw) -> Plan:
    """make_plan for this machine: detect the GPU unless device == 'cpu'."""
    gpu = None if device == "cpu" else detect_gpu()
    if device == "cuda" and gpu is None:
        raise RuntimeError("device 'cuda' requested but nvidia-smi reports no GPU")
    if gpu is None:
        return make_plan(model, None, **kw)
    return make_plan(model, gpu.total_gb, gpu.compute_capability, used_gb=gpu.used_gb, **kw)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_plan(plan: Plan, gpu: GpuInfo | None = None) -> str:
    """The plan as a few readable lines with the memory arithmetic spelled out."""
    where = plan.device
    if gpu is not None:
        where += f" ({gpu.name}, {gpu.total_gb:.1f} GiB, {gpu.used_gb:.1f} used, compute {gpu.compute_capability})"
    elif plan.memory_gb is not None:
        where += f" ({plan.memory_gb:.1f} GiB)"
    weights = f"{plan.quantization} 4-bit (QLoRA)" if plan.quantization else "unquantised"
    lines = [
        f"model      {plan.model}: {_count(plan.params)} params",
        f"device     {where}",
        f"weights    {weights}, {plan.compute_dtype} compute, {plan.attention} attention, gradient checkpointing "
        f"{'on' if plan.gradient_checkpointing else 'off'}",
        f"batch      context {plan.context_length} x micro-batch {plan.micro_batch} x grad-accum {plan.grad_accum}"
        f" = {plan.context_length * plan.micro_batch * plan.grad_accum} tokens/step",
        f"LoRA       r={plan.lora_r} alpha={plan.lora_alpha} on {','.join(plan.lora_targets)}: "
        f"{_count(plan.lora_params)} trainable params",
        "memory estimate (GiB):",
    ]
    lines += [f"  {name:<12}{gb:6.2f}  {txt}" for name, gb, txt in plan.breakdown]
    budget = f" (budget {plan.budget_gb:.2f} GiB)" if plan.budget_gb is not None else ""
    lines.append(f"  {'total':<12}{plan.estimated_peak_gb:6.2f}{budget}  {'fits' if plan.fits else 'DOES NOT FIT'}")
    lines += [f"note       {n}" for n in plan.notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ duration and budget
# How long a round takes: tokens to read / tokens per second. "Tokens" here are the tokens the training loop
# reads (prompt + target of every packed example, replay included, once per epoch; padding excluded).
#
# Compute per token of LoRA training ~ (4 + 2 x checkpointing) x params FLOPs: forward 2N, backward through
# the frozen weights 2N (activation gradients only: frozen weights get no weight gradients, LoRA's own are
# negligible), and with gradient checkpointing the forward again, 2N. Attention scores add ~4 x layers x
# hidden x example length per token, a few percent for item-level examples: left out.
#
# Effective FLOP/s of a whole training step (kernels + framework overhead), per device:
#   CPU   per core, fp32. Measured on a 2-core x86-64 development VM with LoRA steps (context 1024, sdpa,
#         the trainer's own loss): a 13.7M-parameter random StarCoder2 read ~255 tokens/s = ~14 GFLOP/s on two
#         cores; the tiny model (0.96M params, framework overhead dominates) ~2400 tokens/s, which this prior
#         puts at ~3600. Bigger models use the cores better, so for a 3B model this is on the slow side:
#         a conservative prior, replaced by the first round's measurement.
#   CUDA  ESTIMATES, not measured here (no GPU on the development machine): ~35-40 % of the tensor-core peak of
#         a typical card of each compute capability in half precision, x NF4_SLOWDOWN when 4-bit quantised
#         (bitsandbytes dequantises every weight on every forward and backward).
# After a round has run, its measured tokens/s replaces these priors (`measured_tokens_per_s`).
CPU_FLOPS_PER_CORE = 7e9
CPU_MAX_CORES = 32  # beyond this, memory bandwidth rather than cores bounds an fp32 training step
GPU_FLOPS_BY_CAPABILITY = (  # (minimum compute capability, effective FLOP/s), highest first
    (9.0, 300e12),  # H100 / H200
    (8.9, 60e12),   # RTX 40xx, L4, L40
    (8.6, 30e12),   # RTX 30xx, A10
    (8.0, 110e12),  # A100
    (7.5, 12e12),   # Turing: RTX 20xx, T4 (fp16)
    (7.0, 30e12),   # V100
    (0.0, 4e12),    # older cards: no tensor cores worth counting
)
NF4_SLOWDOWN = 0.6


def flops_per_token(plan: Plan) -> float:
    """Training FLOPs per token read (see the block comment above)."""
    return (6 if plan.gradient_checkpointing else 4) * plan.params


def prior_tokens_per_s(plan: Plan, cores: int | None = None, compute_capability: float | None = None) -> float:
    """Tokens read per second of training, from the plan alone (before any round has been measured)."""
    if plan.device == "cpu":
        n = max(1, min(cores or 1, CPU_MAX_CORES))
        flops = n * CPU_FLOPS_PER_CORE
    else:
        cc = compute_capability if compute_capability is not None else 7.5
        flops = next(f for low, f in GPU_FLOPS_BY_CAPABILITY if cc >= low)
        if plan.quantization == "nf4":
            flops *= NF4_SLOWDOWN
    return flops / flops_per_token(plan)


def measured_tokens_per_s(metrics: dict | None, plan: Plan) -> float | None:
    """The tokens/s a finished round measured (its metrics.json), when it ran the same model on the same kind
    of device with the same precision: the best estimate for the next round on this machine."""
    if not metrics:
        return None
    ran = metrics.get("plan") or {}
    rate = (metrics.get("budget") or {}).get("read_tokens_per_s")
    same = (ran.get("params"), ran.get("device"), ran.get("quantization"), ran.get("compute_dtype")) == (
        plan.params, plan.device, plan.quantization, plan.compute_dtype)
    return float(rate) if same and isinstance(rate, (int, float)) and rate > 0 else None


def measured_rate(adapters_dir, plan: Plan) -> float | None:
    """Tokens/s the newest round in `adapters_dir` measured with this plan's model, device and precision."""
    from gitlora.trainer import registry  # torch-free

    for version in reversed(registry.list_versions(adapters_dir)):
        rate = measured_tokens_per_s(version["metrics"], plan)
        if rate:
            return rate
    return None


def round_tokens(new_tokens: int, replay_share: float, epochs: float) -> int:
    """Tokens a round reads: its new examples' tokens, plus replay (a `replay_share` of the mix, assumed the same
    size on average), every epoch."""
    return round(new_tokens / max(1e-9, 1.0 - replay_share) * epochs)


def new_tokens_within(cap_tokens: int, replay_share: float, epochs: float) -> int:
    """The inverse of `round_tokens`: how many new-example tokens fit in a round of `cap_tokens`."""
    return int(cap_tokens * (1.0 - replay_share) / max(1e-9, epochs))


def budget_cap(budget: dict | None, tokens_per_s: float) -> int:
    """The round's budget as tokens to read (0 = unbounded): the smaller of max_tokens and max_seconds x rate."""
    budget = budget or {}
    caps = []
    if budget.get("max_tokens"):
        caps.append(int(budget["max_tokens"]))
    if budget.get("max_seconds"):
        caps.append(max(1, int(float(budget["max_seconds"]) * tokens_per_s)))
    return min(caps, default=0)


FIT_MAX_SKIPPED = 16  # commits a selection passes over for being too big before it stops looking


def newest_within(commits: list[tuple[str, float, Any]], max_tokens: int,
                  max_skipped: int = FIT_MAX_SKIPPED) -> tuple[list[str], list[str]]:
    """Split (commit, commit_time, tokens) into the newest commits whose tokens fit in `max_tokens` and the rest.

    Newest first, whole commits only; the newest commit is always taken (a round must make progress even when
    one commit exceeds the budget: the trainer's stop at the budget bounds that round). A commit too big for
    what is left is passed over and older ones that fit are taken (first fit), so one large commit does not
    leave most of a round's budget unused; the search stops after `max_skipped` such commits or when the
    budget is full, since each look means tokenising a commit. What is passed over stays newest among the
    deferred, first in line for the next round. `max_tokens` 0 = all. `tokens` may be a callable, called only
    for the commits the split reaches with the tokens left in the budget (it may stop counting past them: the
    commit is then passed over, or taken as the round's first, and either way its exact size is not needed).
    Returns (taken, deferred), each newest first.
    """
    ordered = sorted(commits, key=lambda c: -c[1])
    if not max_tokens:
        return [c for c, _, _ in ordered], []
    taken, deferred, used, skipped = [], [], 0, 0
    for i, (commit, _, tokens) in enumerate(ordered):
        if used >= max_tokens or skipped >= max_skipped:
            return taken, deferred + [c for c, _, _ in ordered[i:]]
        n = tokens(max_tokens - used) if callable(tokens) else tokens
        if taken and used + n > max_tokens:
            deferred.append(commit)
            skipped += 1
            continue
        taken.append(commit)
        used += n
    return taken, deferred


def budget_reached(read_tokens: int, elapsed_s: float, budget: dict | None) -> str | None:
    """Which budget a running loop has reached ("max_tokens" | "max_seconds"), or None."""
    budget = budget or {}
    if budget.get("max_tokens") and read_tokens >= int(budget["max_tokens"]):
        return "max_tokens"
    if budget.get("max_seconds") and elapsed_s >= float(budget["max_seconds"]):
        return "max_seconds"
    return None


def format_duration(seconds: float) -> str:
    """A duration for people: 45 s, 12 min, 3.5 h, 6.2 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# A time budget is planned at this share of the measured rate. The rate moves between rounds on a shared machine
# (the daemon ingesting beside the round), and the two ways to be wrong cost differently: a selection the loop
# finishes early only ends the round early, while a loop stopped by its time budget has read most of its
# shuffled blocks but rarely every example of a commit, so most selected commits train again next round.
TIME_BUDGET_FILL = 0.9


def select_by_budget(records: list[dict], count_tokens, budget: dict | None, tokens_per_s: float,
                     replay_share: float, epochs: float, step_tokens: int = 0) -> tuple[list[dict], dict]:
    """The new example records a round can train within its budget: whole commits, newest first.

    Two bounds: the time/token budget (its tokens cover replay and every epoch), and `step_tokens`, what a
    round capped at max_steps reads in all (replay included; with a step cap epochs do not apply). A commit the
    loop would never reach is deferred to a later round, not counted as trained. `count_tokens(record)` is the
    tokens the loop reads for one record (0 for one training leaves out: data.example_tokens counts a record its
    sample weight leaves out as 0, so the budget holds only what trains); it is called only for the commits the
    selection reaches. Returns
    (kept records in their order, report: what the bounds allowed, the commits kept and deferred, newest first);
    a round without either bound keeps everything.
    """
    cap = budget_cap(budget, tokens_per_s * TIME_BUDGET_FILL)
    new_caps = [max(1, new_tokens_within(cap, replay_share, epochs))] if cap else []  # 0 would mean "no limit"
    if step_tokens:
        new_caps.append(max(1, new_tokens_within(step_tokens, replay_share, 1.0)))
    new_cap = min(new_caps, default=0)
    per_commit: dict[str, list] = {}
    for r in records:
        per_commit.setdefault(r.get("commit"), [r.get("commit_time") or 0, []])[1].append(r)
    counted: dict[str, int] = {}

    def tokens_of(commit: str):
        def count(room: int) -> int:  # stops past `room`: a big commit passed over is not tokenised whole
            n = 0
            for r in per_commit[commit][1]:
                n += count_tokens(r)
                if n > room:
                    break
            counted[commit] = n
            return n
        return count

    taken, deferred = newest_within([(c, t, tokens_of(c)) for c, (t, _) in per_commit.items()], new_cap)
    keep = set(taken)
    report = {"max_tokens": int((budget or {}).get("max_tokens") or 0),
              "max_seconds": float((budget or {}).get("max_seconds") or 0), "tokens_per_s": round(tokens_per_s, 3),
              "cap_tokens": cap, "step_tokens": step_tokens,
              "planned_tokens": ((step_tokens or round_tokens(sum(counted.get(c, 0) for c in taken), replay_share,
                                                              epochs)) if new_cap else None),
              "covered_commits": taken, "deferred_commits": deferred}
    return [r for r in records if r.get("commit") in keep], report


def coverage(selected: list[str], example_commits: list, blocks_read: list[list[int]]) -> tuple[list[str], list[str]]:
    """Which selected commits (newest first) a training loop covered: those every one of whose trained examples
    (`example_commits[k]` is example k's commit) lies in a block it read (`blocks_read`: each block's example
    indices). A commit with no trained example (all skipped or weighted out) has nothing left to train.
    Returns (covered, not covered), each in `selected`'s order."""
    read = {k for members in blocks_read for k in members}
    unread = {commit for k, commit in enumerate(example_commits) if k not in read}
    return [c for c in selected if c not in unread], [c for c in selected if c in unread]
