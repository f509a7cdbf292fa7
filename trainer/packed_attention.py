"""Block-diagonal causal attention for packed sequences: SDPA run per packed example, not over the whole block.

Why: a packed block of L tokens holding examples of lengths l_i needs only sum(l_i^2) attention work, but
transformers' SDPA path builds an L x L mask and pays L^2 (and the masked SDPA kernel is the slow one). FlashAttention
2's varlen kernel would solve this on Ampere+, but StarCoder2's users run Turing GPUs (no FA2) and CPUs. So:
one `scaled_dot_product_attention(is_causal=True)` call per example segment, registered as the attention
implementation "gitlora_packed". transformers builds no mask for an implementation without a registered mask
function, and forwards extra model kwargs down to the attention call, which is how the segments
(`gitlora_segments`: per batch row, a list of (start, end)) arrive. Without segments it is plain causal SDPA.
Used only inside a training round; saved adapters and merged exports know nothing about it.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "gitlora_packed"


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def packed_sdpa(module, query, key, value, attention_mask=None, dropout: float = 0.0, scaling=None,
                gitlora_segments=None, gitlora_mask=None, **kwargs):
    """query (b, heads, s, d), key/value (b, kv_heads, s, d) -> ((b, s, heads, d), None)."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    if gitlora_mask is not None:  # one kernel over the block with a block-diagonal causal mask
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=gitlora_mask, dropout_p=dropout,
                                             scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    segments = gitlora_segments or [[(0, query.shape[2])]] * query.shape[0]
    rows = []
    for b, segs in enumerate(segments):
        parts = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                                dropout_p=dropout, scale=scaling, is_causal=True)
                 for s, e in segs]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def segments_from_positions(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Example boundaries of each row: a segment starts wherever the position id restarts at 0."""
    out = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] or [0]
        out.append([(s, e) for s, e in zip(starts, starts[1:] + [len(row)])])
    return out


def block_diagonal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(b, 1, L, L) bool: causal within each packed example, nothing across examples."""
    seg = (position_ids == 0).cumsum(-1)
    n = position_ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def attention_kwargs(position_ids: torch.Tensor) -> dict:
    """What the model call needs: per-segment calls on CPU (compute-bound: sum l_i^2 beats L^2), one masked
    kernel on CUDA (launch-bound for these sizes). GITLORA_PACKED_ATTENTION=segments|mask overrides."""
    mode = os.environ.get("GITLORA_PACKED_ATTENTION", "auto")
    if mode == "mask" or (mode == "auto" and position_ids.is_cuda):
        return {"gitlora_mask": block_diagonal_mask(position_ids)}
    return {"gitlora_segments": segments_from_positions(position_ids)}


def enable(model) -> None:
    """Register the implementation (idempotent) and switch `model` (and its submodules) to it."""
    AttentionInterface.register(NAME, packed_sdpa)
    model.set_attn_implementation(NAME)
