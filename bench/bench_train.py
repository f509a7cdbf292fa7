"""Round throughput: gitlora's packed loop vs a plain Hugging Face `Trainer`, same model, data, LoRA, epochs.

    python bench/bench_train.py [--examples 240] [--epochs 1] [--context 1024] [--model DIR] [--device cpu]

Metric: target tokens per second of training (the tokens that carry loss), measured around the training loop
only (model loading excluded on both sides). The Trainer gets the same rendered, masked examples unpacked,
padded per batch to the longest member (the usual DataCollatorForSeq2Seq-style set-up), with a batch size
whose padded batch is about one of our packed blocks. Prints padding waste for both. Target: ratio >= 1.0x.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """Daemon-like example records over generated Rust: modified/added items of mixed sizes."""
    from gitlora.trainer import tiny

    rng = random.Random(seed)
    corpus = tiny.rust_corpus(600, seed=seed + 11)[5:]
    out = []
    for i in range(n):
        after = "".join(rng.choice(corpus) for _ in range(rng.choice([1, 1, 1, 2, 2, 4])))
        added = rng.random() < 0.25
        out.append(dict(repo="bench", commit=f"{i:040x}", parent=None, author_time=i, commit_time=i,
                        message=f"Refactor item {i}", path=f"src/m{i % 9}.rs", old_path=None, kind="fn",
                        qualified_name=f"m{i % 9}::item_{i}", change_kind="added" if added else "modified",
                        before="" if added else rng.choice(corpus), after=after,
                        imports=["use std::fmt;", "use crate::error::Error;"]))
    return out


def run_gitlora(model_dir: Path, shard: Path, work: Path, args, max_steps: int = 0) -> dict:
    from gitlora.trainer import round as R

    spec = dict(base_model=str(model_dir), adapters_dir=str(work / "adapters"), train_shards=[str(shard)],
                replay_shards=[], eval_shards=[], progress_file=str(work / "progress.jsonl"),
                train=dict(epochs=args.epochs, context_length=args.context, micro_batch=args.micro_batch, grad_accum=1,
                           learning_rate=2e-4, warmup_steps=2, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                           fim_share=0.0, replay_share=0.0, device=args.device, seed=0,
                           quantization=args.quantization, compute_dtype=args.dtype, max_steps=max_steps))
    res = R.run_round(spec, R.Progress(spec["progress_file"]))
    return dict(target_tokens=res["target_tokens"], seconds=res["train_time_s"], waste=res["padding_waste"],
                steps=res["steps"], loss_first=res["train_loss_first"], loss_last=res["train_loss_last"])


def run_hf_trainer(model_dir: Path, shard: Path, work: Path, args, block_tokens: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from gitlora.trainer import data

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = []
    for rec in data.read_shards([shard]):
        rendered = data.render(rec, fim_share=0.0)
        if rendered:
            t, _ = data.tokenize(tok, *rendered, args.context)
            examples.append({"input_ids": t.input_ids, "labels": t.labels})
    mean_len = sum(len(e["input_ids"]) for e in examples) / len(examples)
    batch_size = max(1, round(block_tokens / mean_len))
    stats = {"real": 0, "padded": 0}

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        pad = tok.pad_token_id
        ids = [b["input_ids"] + [pad] * (width - len(b["input_ids"])) for b in batch]
        labels = [b["labels"] + [-100] * (width - len(b["labels"])) for b in batch]
        mask = [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
        stats["real"] += sum(len(b["input_ids"]) for b in batch)
        stats["padded"] += width * len(batch)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    half = {"float16": dict(fp16=True), "bfloat16": dict(bf16=True)}.get(args.dtype, {})
    if args.device == "cuda" and not half:  # what our plan picks on this GPU
        half = dict(bf16=True) if torch.cuda.is_bf16_supported() else dict(fp16=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "c_fc",
                                                             "c_proj"]))
    targs = TrainingArguments(output_dir=str(work / "hf"), per_device_train_batch_size=batch_size,
                              num_train_epochs=args.epochs, learning_rate=2e-4, warmup_steps=2,
                              lr_scheduler_type="cosine", logging_steps=10_000, save_strategy="no", report_to=[],
                              use_cpu=args.device == "cpu", dataloader_num_workers=0, disable_tqdm=True,
                              remove_unused_columns=False, seed=0, **half)
    warm = Trainer(model=model, args=targs, train_dataset=examples[: batch_size * 3], data_collator=collate)
    warm.train()  # warm-up (CUDA kernels, allocator), as our side gets; then a fresh LoRA for the timed run
    stats.update(real=0, padded=0)
    torch.manual_seed(0)
    model = get_peft_model(model.unload(), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "c_fc", "c_proj"]))
    trainer = Trainer(model=model, args=targs, train_dataset=examples, data_collator=collate)
    t0 = time.time()
    out = trainer.train()
    seconds = time.time() - t0
    target_tokens = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples) * args.epochs
    return dict(target_tokens=target_tokens, seconds=seconds, waste=1 - stats["real"] / max(1, stats["padded"]),
                steps=out.global_step, batch_size=batch_size, runtime=out.metrics.get("train_runtime"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=240)
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--model", type=Path, default=None, help="model dir (default: build the tiny StarCoder2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--micro-batch", type=int, default=1, help="packed blocks per step (Trainer: same tokens)")
    ap.add_argument("--quantization", default="auto", help="gitlora side only: auto | nf4 | none")
    ap.add_argument("--dtype", default="auto", help="auto | float16 | bfloat16 | float32 (both sides)")
    ap.add_argument("--hidden", type=int, default=0, help="build a bigger random StarCoder2: hidden size")
    ap.add_argument("--layers", type=int, default=0, help="... and number of layers")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from gitlora.trainer import tiny

    with tempfile.TemporaryDirectory(prefix="gitlora-bench-") as tmp:
        work = Path(tmp)
        size = {}
        if args.hidden:
            size = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                        num_attention_heads=max(4, args.hidden // 128), num_key_value_heads=2,
                        max_position_embeddings=4096)
        if args.layers:
            size["num_hidden_layers"] = args.layers
        model_dir = args.model or tiny.build_tiny_model(work / "tiny", **size)
        shard = work / "000001.jsonl"
        shard.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(args.examples)))
        run_gitlora(model_dir, shard, work / "warmup", args, max_steps=3)  # CUDA kernels, allocator, caches
        ours = run_gitlora(model_dir, shard, work / "ours", args)
        theirs = run_hf_trainer(model_dir, shard, work / "theirs", args, block_tokens=args.context * args.micro_batch)
    ours["tokens_per_s"] = ours["target_tokens"] / ours["seconds"]
    theirs["tokens_per_s"] = theirs["target_tokens"] / theirs["seconds"]
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    if args.json:
        print(json.dumps({"gitlora": ours, "hf_trainer": theirs, "ratio": ratio}, indent=2))
    else:
        print(f"model {model_dir} | {args.examples} examples, {args.epochs} epoch(s), context {args.context}, "
              f"device {args.device}")
        print(f"gitlora loop : {ours['tokens_per_s']:8.0f} target tok/s  ({ours['target_tokens']} tokens in "
              f"{ours['seconds']:.1f} s, {ours['steps']} steps, packed, padding waste {ours['waste']:.1%})")
        print(f"HF Trainer   : {theirs['tokens_per_s']:8.0f} target tok/s  ({theirs['target_tokens']} tokens in "
              f"{theirs['seconds']:.1f} s, {theirs['steps']} steps of {theirs['batch_size']}, padded per batch, "
              f"padding waste {theirs['waste']:.1%})")
        print(f"ratio        : {ratio:.2f}x (target >= 1.0x)")
    return 0 if ratio >= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
