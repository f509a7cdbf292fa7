"""Packed blocks must behave exactly like separate sequences: no attention across packed examples."""
from __future__ import annotations

import pytest

from gitlora.trainer import tiny


def test_packed_attention_equals_separate_sequences(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from gitlora.trainer import packed_attention as PA

    model_dir = tiny.build_tiny_model(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    PA.enable(model)
    torch.manual_seed(0)
    lengths = [300, 500, 224]
    ids = torch.randint(40, 4000, (2, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).repeat(2, 1)
    segs = PA.segments_from_positions(pos)
    assert segs[0] == [(0, 300), (300, 800), (800, 1024)]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, gitlora_segments=segs, use_cache=False).logits
        start = 0
        for n in lengths:
            alone = model(input_ids=ids[:, start:start + n], use_cache=False).logits
            torch.testing.assert_close(packed[:, start:start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
    with torch.no_grad():  # the one-kernel block-diagonal mask (the CUDA default) gives the same result
        masked = model(input_ids=ids, position_ids=pos, gitlora_mask=PA.block_diagonal_mask(pos),
                       use_cache=False).logits
    torch.testing.assert_close(masked, packed, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == PA.NAME
    with pytest.raises(AssertionError):  # and it matters: plain causal attention over the block differs
        with torch.no_grad():
            plain = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(plain[:, 300:800], packed[:, 300:800], atol=1e-5, rtol=1e-5)
