"""The real-model path on a CUDA GPU: StarCoder2-3B's architecture through gitlora's own rounds and `gitlora eval`,
with the user's 8 GB Turing plan forced (nf4 QLoRA, fp16 compute, gradient checkpointing).

    python bench/gpu_check.py --tokenizer DIR --records FILE.jsonl --out DIR [--steps 8] [--native]

No machine here reaches a model hub, so the weights are random (the architecture, sizes and memory are the real
ones; the losses mean nothing). The tokenizer is any StarCoder2-style tokenizer directory (the learning
benchmark's tiny base has one with StarCoder2's special tokens at StarCoder2's ids). `--records` is a JSONL of
example records (e.g. a shard of a real repository); they are split by commit into train / window / older.

Runs, in one process so the CUDA peak is read from torch: round 1 (a fresh adapter), round 2 (a continuation:
resumes it, its own learning rate; `--rounds 1` skips it), both with the gate's evaluation of base / current / candidate including
greedy FIM completion; then `gitlora eval`'s run over all versions. The plan is forced by reporting an 8 GiB
compute-capability-7.5 GPU to the planner (the GPU underneath may be larger; the memory figures are what the
round allocated). `--native` adds a round with the plan for the real GPU. Writes gpu_check.json to --out.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def make_base(out: Path, tokenizer_dir: Path, torch, smoke: bool = False) -> None:
    """A random-initialised model with StarCoder2-3B's config.json values, saved in fp16, plus the tokenizer
    (smoke: a 2-layer model of the same family on the CPU, to try this script without a GPU)."""
    from transformers import AutoModelForCausalLM, Starcoder2Config

    from gitlora.trainer import plan as planlib

    s = planlib.model_shape("starcoder2-3b")
    if smoke:
        s = planlib.ModelShape("smoke", 64, 2, 4, 2, 128, s.vocab)
    cfg = Starcoder2Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                           num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                           max_position_embeddings=16384, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    with torch.device("cpu" if smoke else "cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if smoke else torch.float16)
    model.save_pretrained(out)
    del model
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)


def split_records(records: list[dict]) -> tuple[list[str], list[str], list[str]]:
    """Commits in file order -> (train, window, older): the last quarter is the window, the first eighth older."""
    commits = list(dict.fromkeys(r["commit"] for r in records))
    n = len(commits)
    return commits[n // 8: n - n // 4], commits[n - n // 4:][::-1], commits[: n // 8][::-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--records", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gitlora-gpu-check"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--native", action="store_true", help="also a round with the real GPU's own plan")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer model on the CPU: try the script here")
    ap.add_argument("--rounds", type=int, choices=(1, 2), default=2, help="1: the fresh round alone")
    ap.add_argument("--no-eval-all", action="store_true", help="skip gitlora eval's run")
    ap.add_argument("--eval-max", type=int, default=64)
    ap.add_argument("--fim-samples", type=int, default=8)
    args = ap.parse_args(argv)

    import torch

    from gitlora.daemon import gpu as gpulib
    from gitlora.trainer import eval_run, plan as planlib, round as rnd

    real_gpu = gpulib.detect_gpu()
    report: dict = {"date": time.strftime("%Y-%m-%d"), "gpu": real_gpu.__dict__ if real_gpu else None,
                    "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    base, adapters = args.work / "base", args.work / "adapters"
    t0 = time.time()
    make_base(base, args.tokenizer, torch, smoke=args.smoke)
    report["make_base_s"] = round(time.time() - t0, 1)

    records = [json.loads(line) for line in args.records.read_text().splitlines() if line.strip()]
    train, window, older = split_records(records)
    report["data"] = {"records": len(records), "train_commits": len(train), "window_commits": len(window),
                      "older_commits": len(older)}
    turing = gpulib.GpuInfo("forced: 8 GiB, compute capability 7.5", 8.0, 0.0, 7.5)
    device = "cpu" if args.smoke else "cuda"
    cuda = torch.cuda if device == "cuda" else None

    def one_round(name: str, forced: bool, replay: bool) -> dict:
        planlib.detect_gpu = (lambda: turing) if forced and cuda else gpulib.detect_gpu
        progress_file = args.work / f"{name}.progress.jsonl"
        spec = {"base_model": str(base), "adapters_dir": str(adapters), "progress_file": str(progress_file),
                "train_shards": [str(args.records)], "replay_shards": [str(args.records)] if replay else [],
                "eval_shards": [str(args.records)], "new_commits": train[len(train) // 2:][::-1] if replay else
                train[::-1], "replay_commits": train[: len(train) // 2][::-1] if replay else [],
                "window_commits": window, "older_commits": older,
                "train": {"max_steps": args.steps, "device": device, "eval_max_examples": args.eval_max,
                          "fim_samples": args.fim_samples,
                          "seed": len(name)}}
        if cuda:
            cuda.empty_cache()
            cuda.reset_peak_memory_stats()
        t = time.time()
        error = None
        try:
            rnd.run_round(spec, rnd.Progress(str(progress_file)))
        except Exception as e:  # recorded, and the next check still runs
            error = f"{type(e).__name__}: {e}"
        events = [json.loads(x) for x in progress_file.read_text().splitlines()] if progress_file.exists() else []
        start = next((e for e in events if e["event"] == "start"), {})
        done = next((e for e in events if e["event"] == "done"), {})
        steps = [e for e in events if e["event"] == "progress" and "step" in e]
        return {"error": error, "wall_s": round(time.time() - t, 1),
                "peak_allocated_gib": round(cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                "peak_reserved_gib": round(cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                "plan": {k: start.get(k) for k in ("device", "quantization", "dtype", "context_length",
                                                   "micro_batch", "grad_accum", "learning_rate", "warmup_steps")},
                "examples": start.get("examples"), "replayed": start.get("replayed"),
                "steps": len(steps), "last_step": steps[-1] if steps else None,
                "promoted": done.get("promoted"), "version": done.get("version"), "parent": done.get("parent"),
                "gate": done.get("gate"), "eval": next((e for e in events if e["event"] == "eval"), None)}

    def save() -> None:  # after every stage: a check cut short by its time limit still reports what it did
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))

    report["estimate_turing"] = planlib.make_plan("starcoder2-3b", 8.0, 7.5).to_dict()
    save()
    report["round1_turing"] = one_round("round1", forced=True, replay=False)
    save()
    if args.rounds > 1:
        report["round2_turing_continuation"] = one_round("round2", forced=True, replay=True)
        save()
    if args.no_eval_all:
        print(json.dumps(report, indent=1, default=str))
        return 0
    planlib.detect_gpu = (lambda: turing) if cuda else gpulib.detect_gpu
    if cuda:
        cuda.reset_peak_memory_stats()
    t = time.time()
    try:
        versions = sorted(p.name for p in adapters.iterdir() if p.name.startswith("v") and p.is_dir())
        report["eval_all"] = eval_run.run_eval({"base_model": str(base), "adapters_dir": str(adapters),
                                                "versions": versions, "eval_shards": [str(args.records)],
                                                "sets": {"window": window, "older": older},
                                                "train": {"device": device, "eval_max_examples": args.eval_max,
                                                          "fim_samples": args.fim_samples}})
    except Exception as e:
        report["eval_all"] = {"error": f"{type(e).__name__}: {e}"}
    report["eval_all_s"] = round(time.time() - t, 1)
    report["eval_peak_allocated_gib"] = round(cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    save()
    if args.native:
        report["round3_native"] = one_round("round3", forced=False, replay=True)
        save()
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
