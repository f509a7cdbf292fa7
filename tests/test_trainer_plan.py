"""The hardware plan: QLoRA on an 8 GB Turing card for StarCoder2-3B, fp32 on CPU, honest arithmetic."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from gitlora.trainer import plan as P

STARCODER2_3B_CONFIG = {  # bigcode/starcoder2-3b config.json (the fields that matter)
    "architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2", "hidden_size": 3072,
    "intermediate_size": 12288, "num_hidden_layers": 30, "num_attention_heads": 24, "num_key_value_heads": 2,
    "vocab_size": 49152, "max_position_embeddings": 16384, "tie_word_embeddings": True, "use_bias": True,
}


def test_plan_module_does_not_import_torch():
    code = "import sys, gitlora.trainer.plan, gitlora.trainer.registry, gitlora.trainer.data; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_known_sizes_match_published_param_counts():
    assert P.KNOWN_MODELS["starcoder2-3b"].params() == pytest.approx(3.03e9, rel=0.01)
    assert P.KNOWN_MODELS["starcoder2-7b"].params() == pytest.approx(7.17e9, rel=0.01)
    assert P.KNOWN_MODELS["starcoder2-15b"].params() == pytest.approx(15.96e9, rel=0.01)


def test_starcoder2_3b_on_8gb_turing_is_qlora_fp16_and_fits():
    plan = P.make_plan("bigcode/starcoder2-3b", vram_gb=8, compute_capability=7.5)
    assert plan.device == "cuda"
    assert plan.quantization == "nf4"
    assert plan.compute_dtype == "float16"  # Turing has no bf16
    assert plan.gradient_checkpointing
    assert plan.attention == "sdpa"
    assert plan.fits and plan.estimated_peak_gb <= 7.5
    assert plan.context_length >= 1024
    assert set(plan.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"}
    terms = {name: gb for name, gb, _ in plan.breakdown}
    assert sum(terms.values()) == pytest.approx(plan.estimated_peak_gb, abs=0.01)
    # weights: 2.88B quantised linear weights at 4.127 bits + 0.15B embeddings/biases in fp16
    assert 1.5 < terms["weights"] < 1.8
    assert terms["cuda"] >= 0.5
    text = P.format_plan(plan)
    for needle in ("nf4", "float16", "checkpointing on", "weights", "lora", "total", "fits"):
        assert needle in text


def test_ampere_uses_bf16_and_cpu_falls_back_to_fp32():
    assert P.make_plan("starcoder2-3b", vram_gb=8, compute_capability=8.6).compute_dtype == "bfloat16"
    cpu = P.make_plan("starcoder2-3b")
    assert (cpu.device, cpu.quantization, cpu.compute_dtype) == ("cpu", None, "float32")
    assert "cpu" in P.format_plan(cpu)


def test_big_gpu_skips_quantisation_and_tiny_gpu_says_it_does_not_fit():
    assert P.make_plan("starcoder2-3b", vram_gb=80, compute_capability=9.0).quantization is None
    small = P.make_plan("starcoder2-15b", vram_gb=4, compute_capability=7.5)
    assert not small.fits and "DOES NOT FIT" in P.format_plan(small)


def test_shape_from_local_config_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(STARCODER2_3B_CONFIG))
    shape = P.model_shape(tmp_path)
    assert shape.params() == P.KNOWN_MODELS["starcoder2-3b"].params()
    assert P.make_plan(tmp_path, 8, 7.5).estimated_peak_gb == \
        P.make_plan("starcoder2-3b", 8, 7.5).estimated_peak_gb


def test_detect_gpu_absent_and_parsed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert P.detect_gpu() is None
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA GeForce RTX 2070 SUPER, 8192, 512, 7.5'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    gpu = P.detect_gpu()
    assert gpu == P.GpuInfo("NVIDIA GeForce RTX 2070 SUPER", 8.0, 0.5, 7.5)
    plan = P.auto_plan("starcoder2-3b")
    assert plan.quantization == "nf4" and plan.estimated_peak_gb <= 7.5 and plan.budget_gb < 7.5
    assert P.auto_plan("starcoder2-3b", device="cpu").device == "cpu"
    assert os.environ["PATH"] == str(tmp_path)
