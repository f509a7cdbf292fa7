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
