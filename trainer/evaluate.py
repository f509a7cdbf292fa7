"""A model on example sets: per-example target and changed-token losses, and greedy fill-in-the-middle completions.

Used by the round (base, current and candidate on the window and the older slice) and by `gitlora eval`.
torch is passed in, as in round.py, so importing this module costs nothing.

    sets = {name: prepare(records, tokenizer, context_length, max_examples=200, fim_samples=24, seed=0)}
    fim_losses = prepare_fim_losses(records, tokenizer, context_length, max_examples=200, seed=0)
    scores = evaluate(model, tokenizer, sets["window"], micro_batch, torch, device, autocast)
    metrics.summarize(scores.losses, scores.fim)          # the numbers metrics.json records
    metrics.paired_loss(current.losses, candidate.losses)  # relative change with its interval over commits

Losses reuse the training path (target_loss_sum: the transformer body once, lm_head on target positions only,
packed blocks with per-example attention), with per-token losses split back into examples at the position
boundaries. The same records, settings and seed always give the same examples and FIM spans, so two models (or
two adapter versions evaluated on different days) are compared on the same items.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

from gitlora.trainer import data, metrics, plan as planlib, score_cache

FIM_MAX_NEW_TOKENS = 64


# ------------------------------------------------------------------------------------------- the loss path
def target_loss_sum(model, input_ids, position_ids, labels, torch, chunked_ckpt: bool = False,
                    per_token: bool = False, weights=None):
    """Sum of cross-entropy over target positions only, and their count (per_token: the losses themselves, in
    row-major position order, instead of their sum). `weights` (same shape as labels, float): each target
    token's loss weight in the sum (data.Packed.weights: an edit's copied tokens weigh less).

    Runs the transformer body, keeps the hidden states of positions whose *next* token is a target, and applies
    lm_head + CE to those alone in chunks (optionally checkpointed): the full (tokens x vocab) logits tensor,
    the largest activation of a code model, is never built.
    """
    from gitlora.trainer import packed_attention

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft or plain
    hidden = causal_lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                             **packed_attention.attention_kwargs(position_ids)).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != data.IGNORE
    h = hidden[:, :-1][keep]
    y = targets[keep]
    w = weights[:, 1:][keep].float() if weights is not None else None
    reduction = "none" if per_token else "sum"

    def chunk_loss(hc, yc, wc=None):
        logits = causal_lm.lm_head(hc).float()
        if wc is None:
            return torch.nn.functional.cross_entropy(logits, yc, reduction=reduction)
        weighted = torch.nn.functional.cross_entropy(logits, yc, reduction="none") * wc
        return weighted if per_token else weighted.sum()

    parts = []
    for s in range(0, y.numel(), planlib.LOSS_CHUNK):
        hc, yc = h[s:s + planlib.LOSS_CHUNK], y[s:s + planlib.LOSS_CHUNK]
        extra = (w[s:s + planlib.LOSS_CHUNK],) if w is not None else ()
        if chunked_ckpt and torch.is_grad_enabled():
            parts.append(torch.utils.checkpoint.checkpoint(chunk_loss, hc, yc, *extra, use_reentrant=False))
        else:
            parts.append(chunk_loss(hc, yc, *extra))
    if per_token:
        return (torch.cat(parts) if parts else h.new_zeros((0,), dtype=torch.float32)), int(y.numel())
    total = h.new_zeros((), dtype=torch.float32)
    for part in parts:
        total = total + part
    return total, int(y.numel())


# ---------------------------------------------------------------------------------------------- example sets
@dataclass
class FimItem:
    commit: str
    prompt_ids: list[int]
    reference: str  # the middle span, cut to FIM_MAX_NEW_TOKENS tokens


@dataclass
class EvalSet:
    records: list[dict]  # the sampled, renderable records, in evaluation order
    packed: data.Packed  # their change renderings, packed; packed.members maps blocks back to records
    changed: list[list[bool]]  # per record, per target token: not copied from the before version
    fim: list[FimItem] = field(default_factory=list)
    skipped: int = 0  # records with nothing to learn (deleted, empty after)
    truncated: int = 0
    tokens: list[data.Tokenized] = field(default_factory=list)  # per record, unpacked (to score a subset)
    context_length: int = 0
    pad_id: int = 0
    seed: int = 0

    @property
    def commits(self) -> list[str]:
        return [str(r.get("commit")) for r in self.records]

    def loss_keys(self) -> list[str]:
        """Per record: what decides its losses (score_cache keys)."""
        return [score_cache.digest(t.input_ids, t.labels, c) for t, c in zip(self.tokens, self.changed)]

    def fim_keys(self) -> list[str]:
        """Per FIM item: what decides its completion and score."""
        return [score_cache.digest(f.prompt_ids, f.reference, FIM_MAX_NEW_TOKENS) for f in self.fim]

    def subset(self, records: list[int], fim: list[int]) -> "EvalSet":
        """The records and FIM items at these indices, repacked (a record's losses do not depend on its
        block's other members)."""
        tokens = [self.tokens[i] for i in records]
        packed = data.pack(tokens, self.context_length, self.pad_id, seed=self.seed)
        return EvalSet([self.records[i] for i in records], packed, [self.changed[i] for i in records],
                       [self.fim[i] for i in fim], tokens=tokens, context_length=self.context_length,
                       pad_id=self.pad_id, seed=self.seed)


def sample(records: list[dict], max_examples: int, seed: int) -> tuple[list[dict], int]:
    """The renderable records in a seeded order that depends only on each item's identity (so a record keeps
    its place when others join or leave), cut to `max_examples` (0 = all). Returns (sample, skipped)."""
    usable = [r for r in records if data.renderable(r)]
    usable.sort(key=lambda r: data.item_digest(r, seed))
    return (usable[:max_examples] if max_examples > 0 else usable), len(records) - len(usable)


def prepare(records: list[dict], tokenizer, context_length: int, *, max_examples: int = 200,
            fim_samples: int = 24, seed: int = 0, cross_file: bool = True) -> EvalSet:
    """Sample, render (the edit rendering, on which the changed-token loss is defined), tokenise, build each
    target's changed-token mask, pack; and the FIM completion tasks of the first `fim_samples` sampled items: the
    real-file fill-in-the-middle training uses, with the same span (seeded by the item's identity), the prompt
    cut by the same marker-keeping truncation. `cross_file`: with the records' cross-file context, as training
    renders them (`RenderOptions.cross_file`)."""
    chosen, skipped = sample(records, max_examples, seed)
    toks, changed, truncated = [], [], 0
    for ex in chosen:
        tok, cut = data.tokenize_edit(tokenizer, *data.render_edit(ex, cross_file),
                                      data.cross_file_blocks(ex, cross_file), context_length)
        truncated += cut
        target = [t for t in tok.labels if t != data.IGNORE]
        before = data.before_text(ex)
        before_ids = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
        toks.append(tok)
        changed.append(metrics.changed_mask(target, before_ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packed = data.pack(toks, context_length, pad_id, seed=seed)
    fim = []
    for ex in chosen:
        if len(fim) >= fim_samples:
            break
        parts = data.fim_parts(ex, seed, cross_file)
        if parts is None:
            continue
        ref_ids = tokenizer(parts.middle, add_special_tokens=False)["input_ids"][:FIM_MAX_NEW_TOKENS]
        prompt_ids = data.tokenize_fim(tokenizer, parts, max(1, context_length - FIM_MAX_NEW_TOKENS),
                                       with_target=False)[0].input_ids
        fim.append(FimItem(str(ex.get("commit")), prompt_ids, tokenizer.decode(ref_ids)))
    return EvalSet(chosen, packed, changed, fim, skipped, truncated, tokens=toks, context_length=context_length,
                   pad_id=pad_id, seed=seed)


def prepare_fim_losses(records: list[dict], tokenizer, context_length: int, *, max_examples: int = 200,
                       seed: int = 0, cross_file: bool = True) -> EvalSet:
    """The changed-token loss as a completion model is asked for it: the items `prepare` samples, each as its
    real-file fill-in-the-middle task (the span `prepare`'s completions use, the prompt cut by the same
    marker-keeping truncation) with the middle and EOS as the target. `changed` marks the middle's tokens not
    copied from the before version (metrics.changed_mask), as the edit rendering's mask does; the model never
    sees that version here, but a copied line is still the easy part of a span. Scored by `score_losses`
    like any set. Records without a FIM task are left out (counted in `skipped`).

    Why a second rendering: the edit rendering shows the before version and asks for the whole item, which
    favours a model trained on edits; this one is what an editor asks, which favours one trained on FIM. A
    recipe is judged on both."""
    chosen, skipped = sample(records, max_examples, seed)
    kept, toks, changed, truncated = [], [], [], 0
    for ex in chosen:
        parts = data.fim_parts(ex, seed, cross_file)
        if parts is None:
            skipped += 1
            continue
        tok, cut = data.tokenize_fim(tokenizer, parts, context_length)
        truncated += cut
        target = [t for t in tok.labels if t != data.IGNORE]
        before = data.before_text(ex)
        before_ids = tokenizer(before, add_special_tokens=False)["input_ids"] if before else []
        kept.append(ex)
        toks.append(tok)
        changed.append(metrics.changed_mask(target, before_ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packed = data.pack(toks, context_length, pad_id, seed=seed)
    return EvalSet(kept, packed, changed, [], skipped, truncated, tokens=toks, context_length=context_length,
                   pad_id=pad_id, seed=seed)


# ------------------------------------------------------------------------------------------------- scoring
@dataclass
class Scores:
    losses: list[metrics.ExampleLoss]  # one per EvalSet record, same order
    fim: list[metrics.FimScore]  # one per EvalSet FIM item, same order

    def summary(self) -> dict:
        return metrics.summarize(self.losses, self.fim)


def split_by_example(losses: list[float], position_ids: list[int], labels: list[int]) -> list[list[float]]:
    """A block's per-target-token losses (position order) -> one list per packed example: examples start where
    the position id restarts at 0, and each owns the targets inside its span. Trailing padding is a segment
    with no targets."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] or [0]
    out, k = [], 0
    for s, e in zip(starts, starts[1:] + [len(position_ids)]):
        n = sum(1 for t in range(max(s, 1), e) if labels[t] != data.IGNORE)
        out.append(losses[k:k + n])
        k += n
    if k != len(losses):
        raise ValueError(f"block has {len(losses)} target losses but its segments hold {k}")
    return out


def score_losses(model, evalset: EvalSet, micro_batch: int, torch, device, autocast=contextlib.nullcontext
                 ) -> list[metrics.ExampleLoss]:
    """Per-example target and changed-token loss sums for every record of the set."""
    packed = evalset.packed
    per_example: list[list[float] | None] = [None] * len(evalset.records)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(packed.input_ids), micro_batch):
                rows = range(s, min(s + micro_batch, len(packed.input_ids)))
                ids, pos, labels = (torch.tensor([getattr(packed, k)[r] for r in rows], dtype=torch.long,
                                                 device=device) for k in ("input_ids", "position_ids", "labels"))
                with autocast():
                    token_losses, _ = target_loss_sum(model, ids, pos, labels, torch, per_token=True)
                flat = token_losses.float().cpu().tolist()
                k = 0
                for r in rows:
                    n = sum(1 for t in packed.labels[r][1:] if t != data.IGNORE)
                    segments = split_by_example(flat[k:k + n], packed.position_ids[r], packed.labels[r])
                    k += n
                    for member, seg in zip(packed.members[r], segments):
                        per_example[member] = seg
    finally:
        model.train(was_training)
    out = []
    for rec, mask, losses in zip(evalset.records, evalset.changed, per_example):
        if losses is None or len(losses) != len(mask):
            raise ValueError("packed evaluation lost track of an example")
        changed = [x for x, c in zip(losses, mask) if c]
        out.append(metrics.ExampleLoss(str(rec.get("commit")), sum(losses), len(losses), sum(changed),
                                       len(changed)))
    return out


@contextlib.contextmanager
def _cached_attention(model):
    """Greedy decoding runs one new token against a KV cache: plain SDPA handles that; the packed-block
    attention (which slices keys by the query's span) does not. Switch for the duration. Yields the name of
    the forward's cache argument (transformers 5 renamed `past_key_values` to `cache`)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = inner.config._attn_implementation
    inner.set_attn_implementation("sdpa")
    try:
        yield "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    finally:
        inner.set_attn_implementation(previous)


def greedy(model, prompt_ids: list[int], stop: set[int], max_new_tokens: int, torch, device,
           cache_arg: str | None) -> list[int]:
    """Greedy continuation of `prompt_ids` (without the stop token). cache_arg None: no KV cache, the whole
    sequence is run again for every token (the slow reference the cached path is tested against)."""
    generated: list[int] = []
    seq = list(prompt_ids)
    step = model(input_ids=torch.tensor([seq], dtype=torch.long, device=device), use_cache=cache_arg is not None,
                 logits_to_keep=1)
    while True:
        token = int(step.logits[0, -1].argmax())
        if token in stop or len(generated) >= max_new_tokens:
            return generated
        generated.append(token)
        if cache_arg is None:
            seq.append(token)
            step = model(input_ids=torch.tensor([seq], dtype=torch.long, device=device), use_cache=False,
                         logits_to_keep=1)
        else:
            cache = step["cache"] if "cache" in step else step["past_key_values"]
            step = model(input_ids=torch.tensor([[token]], dtype=torch.long, device=device), use_cache=True,
                         logits_to_keep=1, **{cache_arg: cache})


def score_fim(model, tokenizer, evalset: EvalSet, torch, device, autocast=contextlib.nullcontext,
              max_new_tokens: int = FIM_MAX_NEW_TOKENS) -> list[metrics.FimScore]:
    """Greedy completion of each FIM item's middle (stops at EOS or `max_new_tokens`), scored against it."""
    if not evalset.fim:
        return []
    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<file_sep>")}
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _cached_attention(model) as cache_arg, autocast():
            for item in evalset.fim:
                generated = greedy(model, item.prompt_ids, stop, max_new_tokens, torch, device, cache_arg)
                out.append(metrics.fim_score(item.commit, tokenizer.decode(generated), item.reference))
    finally:
        model.train(was_training)
    return out


def evaluate(model, tokenizer, evalset: EvalSet, micro_batch: int, torch, device,
             autocast=contextlib.nullcontext, cache: score_cache.ScoreCache | None = None) -> Scores:
    """Losses and FIM completions of `model` (as it is: wrap the call in peft's disable_adapter() for the base).
    With a `cache` (this model's), only what it lacks is computed, and what was computed is added to it."""
    if cache is None:
        return Scores(score_losses(model, evalset, micro_batch, torch, device, autocast),
                      score_fim(model, tokenizer, evalset, torch, device, autocast))
    loss_keys, fim_keys = evalset.loss_keys(), evalset.fim_keys()
    known_losses = [cache.get("losses", k) for k in loss_keys]
    known_fim = [cache.get("fim", k) for k in fim_keys]
    todo = evalset.subset([i for i, v in enumerate(known_losses) if v is None],
                          [i for i, v in enumerate(known_fim) if v is None])
    fresh_losses = iter(score_losses(model, todo, micro_batch, torch, device, autocast) if todo.records else [])
    fresh_fim = iter(score_fim(model, tokenizer, todo, torch, device, autocast))
    losses, fim = [], []
    for rec, key, known in zip(evalset.records, loss_keys, known_losses):
        if known is None:
            e = next(fresh_losses)
            known = [e.target_sum, e.target_n, e.changed_sum, e.changed_n]
            cache.put("losses", key, known)
        losses.append(metrics.ExampleLoss(str(rec.get("commit")), *known))
    for item, key, known in zip(evalset.fim, fim_keys, known_fim):
        if known is None:
            f = next(fresh_fim)
            known = [bool(f.exact), f.edit_sim]
            cache.put("fim", key, known)
        fim.append(metrics.FimScore(item.commit, *known))
    return Scores(losses, fim)
