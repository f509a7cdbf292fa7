"""The locally built tiny StarCoder2 loads exactly like a downloaded one."""
from __future__ import annotations

import hashlib

from gitlora.daemon import paths
from gitlora.trainer import tiny


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_model_builds_at_default_location_and_loads_via_from_pretrained(isolated_home, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built = tiny.build_tiny_model()
    assert built == paths.models_dir() / "tiny-starcoder2"
    assert str(built).startswith(str(isolated_home))
    assert tiny.build_tiny_model() == built  # reused, not rebuilt

    tok = AutoTokenizer.from_pretrained(built)
    model = AutoModelForCausalLM.from_pretrained(built)
    assert model.config.model_type == "starcoder2"
    assert 500_000 < sum(p.numel() for p in model.parameters()) < 5_000_000
    # vocabulary: tokenizer, config and embedding agree; nothing was resized
    assert len(tok) == model.config.vocab_size == model.get_input_embeddings().weight.shape[0] == tiny.VOCAB_SIZE
    for i, special in enumerate(["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",
                                 "<repo_name>", "<file_sep>"]):
        assert tok.convert_tokens_to_ids(special) == i  # StarCoder2's ids
        assert tok(special, add_special_tokens=False)["input_ids"] == [i]
    assert tok.eos_token == "<|endoftext|>"
    text = "<repo_name>r<file_sep>src/lib.rs\npub fn get(&self) -> u64 {\n    self.height\n}<|endoftext|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text) / 2.0  # a real code BPE, not bytes
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), tiny.VOCAB_SIZE)

    again = tiny.build_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(again / name) == _digest(built / name)  # deterministic
