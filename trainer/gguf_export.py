"""A gitlora adapter as a llama.cpp LoRA adapter (GGUF): what `llama-server --lora FILE` and an Ollama Modelfile's
`ADAPTER FILE` load on top of the unchanged base model. Nothing is merged; the base model is only read for its
config.json (architecture, layer count, tied embeddings).

It writes what llama.cpp's own `convert_lora_to_gguf.py` writes for the same adapter (its default f32 output),
with the `gguf` package llama.cpp maintains: the architecture's tensor-name map turns peft's
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` into `blk.N.attn_q.weight.lora_a`; lora_A
(r x in) and lora_B (out x r) keep peft's layout (GGUF lists dimensions reversed, so llama.cpp sees
ne = [in, r] and [r, out], the shapes it checks at load); metadata `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha`, `general.architecture`. llama.cpp scales each pair by
alpha / r, peft by lora_alpha / r (rsLoRA: lora_alpha / sqrt(r), written as alpha = lora_alpha * sqrt(r)).

Only architectures whose llama.cpp conversion renames the adapted linear weights without reshaping them
(no q/k permutation, no fused qkv) are mapped; anything else (another architecture, DoRA, per-module
rank/alpha patterns, embedding or tied-lm_head LoRA, extra saved modules) is refused with one line, never
written wrong. Torch-free (numpy + gguf), so the export is cheap; the daemon runs it only as a subprocess
(`python -m gitlora.trainer.gguf_export`, see `main`), never in its own process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# Hugging Face architecture -> gguf.MODEL_ARCH member name. Each one was checked against llama.cpp's converter
# (conversion/starcoder.py, conversion/qwen.py): their modify_tensors only renames attention and MLP weights.
ARCHITECTURES = {"Starcoder2ForCausalLM": "STARCODER2", "Qwen2ForCausalLM": "QWEN2"}
# Provenance keys of ours (llama.cpp ignores keys it does not know).
KEY_VERSION = "gitlora.adapter.version"
KEY_BASE = "gitlora.base_model"

_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class ExportError(Exception):
    """The adapter cannot be exported as a llama.cpp LoRA; the message is one line saying why."""


# -- reading ----------------------------------------------------------------------------------------------
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as float32 numpy arrays.

    Read from the file's documented layout (8-byte little-endian header length, JSON header, raw data)
    rather than safetensors.numpy, which cannot represent bfloat16 (an adapter saved from a bf16 model)."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        (length,) = np.frombuffer(data[:8], dtype="<u8")
        header = json.loads(data[8:8 + int(length)])
    except (ValueError, TypeError) as exc:
        raise ExportError(f"{path}: not a safetensors file ({exc})") from None
    base = 8 + int(length)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ExportError(f"{path}: tensor {name} has dtype {info.get('dtype')}, not a float type")
        start, end = info["data_offsets"]
        raw = np.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize, offset=base + start)
        if info["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = raw.astype(np.float32).reshape(info["shape"])
    return out


def base_config(base_model: str) -> dict[str, Any]:
    """The base model's config.json (a local directory, or a hub id already in the local cache)."""
    from gitlora.daemon.round_checks import locate_base_model  # torch-free file-system lookup

    where, why = locate_base_model(base_model)
    if where is None:
        raise ExportError(why or f"base model {base_model} not found")
    try:
        return json.loads((where / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"base model {base_model}: unreadable config.json ({exc})") from None


# -- the mapping (pure) ---------------------------------------------------------------------------------------
def architecture(config: dict[str, Any]):
    """(gguf.MODEL_ARCH, block count) for a base model's config.json, or ExportError when it has no mapping."""
    import gguf

    names = config.get("architectures") or []
    known = [n for n in names if n in ARCHITECTURES]
    if not known:
        raise ExportError(f"base architecture {', '.join(names) or config.get('model_type') or 'unknown'} has no "
                          f"llama.cpp LoRA mapping in gitlora (supported: {', '.join(sorted(ARCHITECTURES))})")
    blocks = config.get("num_hidden_layers")
    if not isinstance(blocks, int) or blocks < 1:
        raise ExportError("base config.json has no num_hidden_layers")
    return gguf.MODEL_ARCH[ARCHITECTURES[known[0]]], blocks


def gguf_alpha(adapter_config: dict[str, Any]) -> float:
    """The `adapter.lora.alpha` that makes llama.cpp's alpha / r equal peft's scaling, after refusing the
    adapter settings llama.cpp cannot express."""
    if str(adapter_config.get("peft_type", "LORA")).upper() != "LORA":
        raise ExportError(f"adapter is {adapter_config.get('peft_type')}, not LoRA")
    if adapter_config.get("use_dora"):
        raise ExportError("DoRA adapters (use_dora) have no llama.cpp LoRA equivalent")
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ExportError("per-module rank_pattern/alpha_pattern: llama.cpp takes one alpha per adapter")
    if adapter_config.get("fan_in_fan_out"):
        raise ExportError("fan_in_fan_out adapters (Conv1D layout) are not supported")
    if adapter_config.get("modules_to_save"):
        raise ExportError(f"modules_to_save {adapter_config['modules_to_save']}: llama.cpp adapters hold LoRA "
                          "pairs only")
    alpha, rank = adapter_config.get("lora_alpha"), adapter_config.get("r")
    if not isinstance(alpha, (int, float)) or not isinstance(rank, int) or rank < 1:
        raise ExportError("adapter_config.json lacks lora_alpha or r")
    return float(alpha) * math.sqrt(rank) if adapter_config.get("use_rslora") else float(alpha)


def lora_tensors(tensors: dict[str, np.ndarray], arch, blocks: int,
                 tied_embeddings: bool) -> list[tuple[str, np.ndarray]]:
    """peft's LoRA tensors under llama.cpp's names, `<gguf weight>.lora_a` / `.lora_b`, sorted by name."""
    import gguf

    name_map = gguf.get_tensor_name_map(arch, blocks)
    embedding = sorted(k for k in tensors if ".lora_embedding_" in k)
    if embedding:
        raise ExportError(f"adapter tensor {embedding[0]}: embedding LoRA is not supported (gitlora adapts linear "
                          "layers only)")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ExportError(f"adapter tensor {key}: not a LoRA A/B weight (a fully saved module?); llama.cpp "
                              "adapters hold LoRA pairs only")
        mapped = name_map.get_type_and_name(m["module"] + ".weight", try_suffixes=(".weight",))
        if mapped is None or mapped[0] not in gguf.MODEL_TENSORS[arch]:
            raise ExportError(f"target module {m['module']} has no llama.cpp tensor in {gguf.MODEL_ARCH_NAMES[arch]}")
        kind, gguf_name = mapped
        if kind == gguf.MODEL_TENSOR.TOKEN_EMBD:
            raise ExportError(f"target module {m['module']}: LoRA on the embeddings is not supported")
        if kind == gguf.MODEL_TENSOR.OUTPUT and tied_embeddings:
            raise ExportError(f"target module {m['module']}: the base ties lm_head to the embeddings, so llama.cpp "
                              "has no output tensor to adapt")
        if value.ndim != 2:
            raise ExportError(f"adapter tensor {key} has shape {list(value.shape)}, not a matrix")
        pairs.setdefault(gguf_name, {})[m["part"]] = value
    out = []
    for gguf_name, pair in sorted(pairs.items()):
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None:
            raise ExportError(f"{gguf_name}: the adapter has lora_{'A' if a is None else 'B'} missing")
        if a.shape[0] != b.shape[1]:
            raise ExportError(f"{gguf_name}: lora_A {list(a.shape)} and lora_B {list(b.shape)} disagree on the rank")
        out += [(gguf_name + ".lora_a", np.ascontiguousarray(a, dtype=np.float32)),
                (gguf_name + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))]
    if not out:
        raise ExportError("the adapter holds no LoRA tensors")
    return out


# -- writing ---------------------------------------------------------------------------------------------------
def export_gguf(adapter_dir: str | os.PathLike[str], base_model: str, out: str | os.PathLike[str], *,
                version: str | None = None, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `adapter_dir` (a peft LoRA directory) as a llama.cpp LoRA GGUF at `out`, atomically: a reader sees
    the previous file or the new one. `config` is the base's config.json (read from `base_model` if None).
    Returns what was written; ExportError (one line) when the adapter or the base cannot be mapped."""
    import gguf

    from gitlora.daemon.fsutil import atomic_path

    adapter_dir, out = Path(adapter_dir), Path(out)
    try:
        adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{adapter_dir}: no readable adapter_config.json ({exc})") from None
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{adapter_dir}: no adapter_model.safetensors")
    alpha = gguf_alpha(adapter_config)
    config = base_config(base_model) if config is None else config
    arch, blocks = architecture(config)
    tensors = lora_tensors(read_safetensors(weights), arch, blocks, bool(config.get("tie_word_embeddings")))

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"gitlora adapter {version or adapter_dir.name}")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_string(KEY_VERSION, version or adapter_dir.name)
        writer.add_string(KEY_BASE, str(base_model))
        for name, array in tensors:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"file": str(out), "version": version or adapter_dir.name, "architecture": gguf.MODEL_ARCH_NAMES[arch],
            "alpha": alpha, "rank": int(tensors[0][1].shape[0]), "lora_pairs": len(tensors) // 2,
            "bytes": out.stat().st_size}


def modelfile_text(from_: str, adapter: str | os.PathLike[str]) -> str:
    """An Ollama Modelfile: the base model (an Ollama model name or a base GGUF path) plus this adapter."""
    return f"FROM {from_}\nADAPTER {Path(adapter).resolve()}\n"


def publish(adapter_dir: str, base_model: str, out: str, *, version: str | None = None, modelfile: str | None = None,
            ollama_from: str | None = None, ollama_model: str | None = None,
            ollama_timeout_s: float = 900.0) -> dict[str, Any]:
    """What the daemon's export does after a promotion or rollback: the GGUF, the Modelfile beside it, and
    `ollama create` when a model name is configured and `ollama` is on PATH. Returns the result record:
    {"ok", "reason" (one line, when not ok), "file", "version", "modelfile", "ollama", ...}."""
    from gitlora.daemon.fsutil import atomic_write_text

    started = time.time()
    try:
        result: dict[str, Any] = {"ok": True, **export_gguf(adapter_dir, base_model, out, version=version)}
    except ExportError as exc:
        return {"ok": False, "reason": str(exc), "version": version, "seconds": round(time.time() - started, 2)}
    result["modelfile"] = None
    result["ollama"] = None
    if modelfile and ollama_from:
        atomic_write_text(modelfile, modelfile_text(ollama_from, out))
        result["modelfile"] = str(modelfile)
        if ollama_model:
            result["ollama"] = _ollama_create(ollama_model, modelfile, ollama_timeout_s)
            if not result["ollama"].startswith(("created", "skipped")):
                result.update(ok=False, reason=result["ollama"])
    result["seconds"] = round(time.time() - started, 2)
    return result


def _ollama_create(model: str, modelfile: str, timeout_s: float) -> str:
    """`ollama create MODEL -f MODELFILE`: "created MODEL", "skipped: …" or a one-line failure."""
    ollama = shutil.which("ollama")
    if ollama is None:
        return "skipped: ollama is not on PATH"
    try:
        done = subprocess.run([ollama, "create", model, "-f", str(modelfile)], capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"ollama create {model} timed out after {timeout_s:.0f}s"
    except OSError as exc:
        return f"ollama create {model} could not run: {exc}"
    if done.returncode != 0:
        last = ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1]
        return f"ollama create {model} failed (exit {done.returncode}): {last[:300]}"
    return f"created {model}"


def main(argv: list[str] | None = None) -> int:
    """`python -m gitlora.trainer.gguf_export ADAPTER_DIR --base-model B --out FILE [...]`: prints the result
    record as one JSON line; exit 0 when ok, 1 when the export (or ollama create) failed."""
    p = argparse.ArgumentParser(prog="python -m gitlora.trainer.gguf_export")
    p.add_argument("adapter_dir")
    p.add_argument("--base-model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--version", default=None)
    p.add_argument("--modelfile", default=None)
    p.add_argument("--ollama-from", default=None)
    p.add_argument("--ollama-model", default=None)
    args = p.parse_args(argv)
    try:
        os.nice(10)  # the daemon's export must not compete with the user's editor
    except OSError:
        pass
    try:
        result = publish(args.adapter_dir, args.base_model, args.out, version=args.version, modelfile=args.modelfile,
                         ollama_from=args.ollama_from, ollama_model=args.ollama_model)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure is still one line for the record
        result = {"ok": False, "reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:500], "version": args.version}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
