"""A tiny StarCoder2 base pretrained on public Rust code, for bench_learning.py (cached by corpus + settings).

An adapter on a randomly initialised model would look good at anything; an honest learning benchmark needs a
base that already knows Rust, and none can be downloaded here. So: read the newest tree of each corpus
repository (NOT the target), train a byte-level BPE on it with StarCoder2's special tokens at StarCoder2's ids
(as trainer/tiny.py does for the test model), and pretrain a small StarCoder2 (all parameters) on the
repository-level format StarCoder2 was trained on, the one trainer/data.py renders:

    <repo_name>{repo}<file_sep>{path}\\n{file chunk}<|endoftext|>
    <repo_name>{repo}<file_sep>{path}\\n<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>{middle}<|endoftext|>

for a fixed budget of CPU seconds (process CPU time, so a loaded machine trains as far, only slower). The
result lands in `<cache>/base-<hash of corpus contents and settings>/` (temp dir + rename), so reruns skip it.

    python bench/pretrain_tiny.py --corpus DIR... [--cpu-budget-s 1200] [--cache-dir DIR]

On a GPU (bench/gpu_learning.py) the same function trains a bigger base (`size=GPU_SIZE`) under a wall-clock
budget with bf16 autocast, optionally with a given tokenizer and dropout, keeping the checkpoint with the best
held-out loss (many epochs of a small corpus overfit). Those options enter the cache key only when used, so the
CPU benchmark's base and its key are unchanged.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gitlora.trainer import tiny

MAX_FILE_BYTES = 200_000
CHUNK_LINES = 80  # files are cut into chunks this long, so FIM prefix, middle and suffix sit in one window


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gitlora-bench"


def repo_label(directory: Path) -> str:
    """owner/name for a mirror laid out as .../owner+name/repo, else the directory's name."""
    d = directory.resolve()
    if d.name in ("repo", ".git") and d.parent.name:
        return d.parent.name.replace("+", "/")
    return d.name


def rust_files(directory: Path) -> list[tuple[str, str]]:
    """(path, text) of the .rs files of the newest tree (HEAD) of a git repository (bare or not), else of the
    directory's files. Unreadable, non-UTF-8 and over-large files are left out."""
    directory = Path(directory)
    ls = subprocess.run(["git", "-C", str(directory), "ls-tree", "-r", "-z", "HEAD"], capture_output=True)
    out: list[tuple[str, str]] = []
    if ls.returncode == 0:
        entries = []
        for rec in ls.stdout.split(b"\0"):
            if not rec:
                continue
            meta, _, path = rec.partition(b"\t")
            mode, kind, oid = meta.split()
            if kind == b"blob" and path.endswith(b".rs"):
                entries.append((oid.decode(), path.decode("utf-8", "replace")))
        batch = subprocess.run(["git", "-C", str(directory), "cat-file", "--batch"],
                               input="".join(f"{oid}\n" for oid, _ in entries).encode(), capture_output=True)
        data, pos = batch.stdout, 0
        for oid, path in entries:
            header_end = data.index(b"\n", pos)
            header = data[pos:header_end].split()
            if len(header) < 3 or header[1] != b"blob":  # "<oid> missing" in a partial clone
                pos = header_end + 1
                continue
            size = int(header[2])
            blob = data[header_end + 1:header_end + 1 + size]
            pos = header_end + 1 + size + 1
            if size <= MAX_FILE_BYTES:
                try:
                    out.append((path, blob.decode("utf-8")))
                except UnicodeDecodeError:
                    pass
        return sorted(out)
    for p in sorted(directory.rglob("*.rs")):
        if p.is_file() and p.stat().st_size <= MAX_FILE_BYTES:
            try:
                out.append((str(p.relative_to(directory)), p.read_text(encoding="utf-8")))
            except (UnicodeDecodeError, OSError):
                pass
    return out


def load_corpus(dirs: list[Path]) -> list[tuple[str, str, str]]:
    """(repo label, path, text) for every corpus file, in a stable order."""
    return [(repo_label(Path(d)), path, text) for d in dirs for path, text in rust_files(Path(d))]


def documents(corpus: list[tuple[str, str, str]], fim_rate: float, seed: int) -> list[str]:
    """Corpus files cut into chunks of CHUNK_LINES lines, each rendered as a StarCoder2 repository-level
    document; `fim_rate` of them in PSM fill-in-the-middle order with a line-aligned middle of 1-12 lines."""
    rng = random.Random(seed)
    docs = []
    for repo, path, text in corpus:
        lines = text.splitlines(keepends=True)
        for start in range(0, max(1, len(lines)), CHUNK_LINES):
            chunk = lines[start:start + CHUNK_LINES]
            if not "".join(chunk).strip():
                continue
            head = f"<repo_name>{repo}<file_sep>{path}\n"
            if len(chunk) >= 3 and rng.random() < fim_rate:
                i = rng.randrange(1, len(chunk) - 1)
                j = min(len(chunk), i + rng.randint(1, 12))
                docs.append(f"{head}<fim_prefix>{''.join(chunk[:i])}<fim_suffix>{''.join(chunk[j:])}"
                            f"<fim_middle>{''.join(chunk[i:j])}{tiny.SPECIAL_TOKENS[0]}")
            else:
                docs.append(f"{head}{''.join(chunk)}{tiny.SPECIAL_TOKENS[0]}")
    return docs


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE on the corpus, StarCoder2's special tokens first (ids 0..37), as trainer/tiny.py builds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=tiny.SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    specials = tiny.SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials[0], eos_token=specials[0], unk_token=specials[0],
        pad_token=specials[0], additional_special_tokens=specials[1:], model_max_length=16384,
        clean_up_tokenization_spaces=False)


def settings_key(corpus: list[tuple[str, str, str]], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for repo, path, text in corpus:
        h.update(f"{repo}\0{path}\0".encode())
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:16]


SIZE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)
# GPT-2-small-like depth and width (~85M parameters with the 8k vocabulary): for a GPU with minutes to train
GPU_SIZE = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=4, max_position_embeddings=4096)
DROPOUT_KEYS = ("attention_dropout", "residual_dropout", "embedding_dropout")


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def pretrain(corpus_dirs: list[Path], *, cache_dir: Path | None = None, cpu_budget_s: float = 1200.0,
             seq_len: int = 512, batch: int = 8, lr: float = 1.5e-3, vocab_size: int = 8192, fim_rate: float = 0.5,
             seed: int = 0, threads: int = 2, log=print, corpus: list[tuple[str, str, str]] | None = None,
             device: str = "cpu", wall_budget_s: float | None = None, size: dict | None = None,
             tokenizer_dir: Path | None = None, dropout: float = 0.0, warmup_steps: int = 30,
             val_checks: int = 0) -> tuple[Path, dict]:
    """The cached base model directory for this corpus and these settings (built when absent) and its meta.

    `corpus`: (repo, path, text) already loaded (instead of reading `corpus_dirs`). GPU options: `device`,
    `wall_budget_s` (wall seconds of training instead of CPU seconds; bf16 autocast on CUDA), `size` (config
    overrides, e.g. GPU_SIZE), `tokenizer_dir` (use this tokenizer instead of training one), `dropout` (while
    pretraining; the saved config has none), `val_checks` (held-out loss this many times over the budget; the
    best checkpoint is kept)."""
    corpus = load_corpus(corpus_dirs) if corpus is None else corpus
    if not corpus:
        raise SystemExit("the corpus holds no readable .rs files")
    settings = dict(cpu_budget_s=cpu_budget_s, seq_len=seq_len, batch=batch, lr=lr, vocab_size=vocab_size,
                    fim_rate=fim_rate, seed=seed, size=size or SIZE, version=1)
    extra = dict(device=device if device != "cpu" else None, wall_budget_s=wall_budget_s,
                 tokenizer=file_digest(Path(tokenizer_dir) / "tokenizer.json") if tokenizer_dir else None,
                 dropout=dropout or None, warmup_steps=warmup_steps if warmup_steps != 30 else None,
                 val_checks=val_checks or None)
    settings.update({k: v for k, v in extra.items() if v is not None})  # absent when unused: the CPU key stays
    cache_dir = Path(cache_dir or default_cache_dir())
    dest = cache_dir / f"base-{settings_key(corpus, settings)}"
    if (dest / "bench-base.json").exists():
        meta = json.loads((dest / "bench-base.json").read_text())
        log(f"pretrained base: cached {dest} ({meta['params'] / 1e6:.1f}M params, {meta['tokens_seen'] / 1e6:.1f}M "
            f"tokens, final loss {meta['final_loss']:.3f})")
        return dest, {**meta, "cached": True}

    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    t_wall, t_cpu = time.time(), time.process_time()
    docs = documents(corpus, fim_rate, seed)
    if tokenizer_dir:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer([text for _, _, text in corpus], vocab_size)
    ids: list[int] = []
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    encoded = tokenizer([docs[k] for k in order], add_special_tokens=False)["input_ids"]
    for e in encoded:
        ids.extend(e)
    # 2 % of the blocks held out: the base's own loss on unseen corpus code, to show it learned something
    blocks = [ids[s:s + seq_len] for s in range(0, len(ids) - seq_len + 1, seq_len)]
    random.Random(seed + 1).shuffle(blocks)
    n_val = max(4, len(blocks) // 50)
    val, train = blocks[:n_val], blocks[n_val:]
    prep_cpu = time.process_time() - t_cpu
    # the budget: process CPU seconds (a loaded machine trains as far, only slower), or wall seconds on a GPU
    clock, budget = (time.time, wall_budget_s) if wall_budget_s else (time.process_time, cpu_budget_s)
    log(f"pretraining: {len(corpus)} files, {len(ids) / 1e6:.2f}M tokens, {len(train)} blocks of {seq_len}; "
        f"budget {budget:.0f} {'wall ' if wall_budget_s else 'CPU-'}s on {device} "
        f"(tokenizer + encoding took {prep_cpu:.0f} CPU-s)")

    torch.manual_seed(seed)
    dropouts = {k: dropout for k in DROPOUT_KEYS} if dropout else {}
    config = tiny.tiny_config(len(tokenizer), **(size or SIZE), **dropouts)
    model = AutoModelForCausalLM.from_config(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    cuda = torch.device(device).type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=True if cuda else None)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def val_loss_now() -> float:
        model.eval()
        with torch.no_grad(), autocast():
            if not cuda:  # the CPU benchmark's measure, block by block
                v = sum(float(model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss) for b in val)
            else:
                v = sum(float(model(input_ids=val_t[k:k + batch], labels=val_t[k:k + batch]).loss) *
                        len(val_t[k:k + batch]) for k in range(0, len(val_t), batch))
        model.train()
        return v / len(val)

    train_t = torch.tensor(train, device=device)
    val_t = torch.tensor(val, device=device)
    rng = random.Random(seed)
    step, seen, losses, warm = 0, 0, [], warmup_steps
    val_curve, best, next_check = [], None, 1
    train_clock0 = clock()
    model.train()
    while True:
        used = (clock() - train_clock0) / budget
        if val_checks and used >= next_check / val_checks:
            v = val_loss_now()
            val_curve.append({"step": step, "tokens": seen, "used": round(used, 3), "val_loss": round(v, 4)})
            log(f"  step {step}: held-out loss {v:.3f}")
            if best is None or v < best[0]:
                best = (v, step, {k: t.detach().clone() for k, t in model.state_dict().items()})
            next_check += 1
        if used >= 1.0:
            break
        # warm-up, then cosine over the budget (the number of steps it buys is not known in advance)
        f = (step + 1) / warm if step < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, used)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        x = train_t[torch.tensor([rng.randrange(len(train)) for _ in range(batch)], device=device)]
        with autocast():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        seen += x.numel()
        if step % 100 == 0:
            log(f"  step {step}: loss {sum(losses[-100:]) / 100:.3f}, {seen / 1e6:.2f}M tokens, "
                f"{used:.0%} of the budget")
    train_s = clock() - train_clock0
    best_step = None
    if best is not None:
        model.load_state_dict(best[2])
        best_step = best[1]
    for k in dropouts:  # dropout was for pretraining: the base as saved has none
        setattr(model.config, k, 0.0)
    model.eval()
    val_loss = val_loss_now()
    meta = dict(params=params, tokens_seen=seen, corpus_tokens=len(ids), steps=step, files=len(corpus),
                repos=sorted({r for r, _, _ in corpus}), final_loss=sum(losses[-50:]) / max(1, len(losses[-50:])),
                val_loss=val_loss, cpu_s=round(time.process_time() - t_cpu, 1), wall_s=round(time.time() - t_wall, 1),
                settings=settings)
    if val_checks:
        meta.update(val_curve=val_curve, best_step=best_step, epochs=round(seen / max(1, len(train) * seq_len), 2),
                    train_s=round(train_s, 1), tokens_per_s=round(seen / max(train_s, 1e-9)))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "bench-base.json").write_text(json.dumps(meta, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"pretrained base: {dest} ({params / 1e6:.1f}M params, {seen / 1e6:.1f}M tokens in {step} steps, "
        f"loss {meta['final_loss']:.3f}, held-out corpus loss {val_loss:.3f}, {meta['cpu_s']:.0f} CPU-s, "
        f"{meta['wall_s']:.0f} s wall)")
    return dest, {**meta, "cached": False}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="+", type=Path, required=True)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--cpu-budget-s", type=float, default=1200.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    path, meta = pretrain(args.corpus, cache_dir=args.cache_dir, cpu_budget_s=args.cpu_budget_s,
                          threads=args.threads, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({"model": str(path), **meta}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
