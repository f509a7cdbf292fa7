"""The learning check on a GPU with a better base: does an adapter help when the base can complete code at all?

The CPU learning benchmark (bench_learning.py) pretrains its base for minutes on two cores: its greedy
fill-in-the-middle completions are mostly loops, so a higher edit similarity says little (bench/README.md,
"What the tiny base's completions are"). This script redoes its comparison on one CUDA GPU with a base of the same
family pretrained for minutes there, on the same public corpus, and keeps the completions themselves.

Two modes:

    python bench/gpu_learning.py prepare --work WORK --report REPORT --corpus DIR... --out DIR
        (here, on the CPU: what the GPU machine needs, since it has no git repositories and no pygit2)
    python bench/gpu_learning.py run --data DIR --out DIR [--pretrain-s 200] [--round-s 60] [--steps N] [--smoke]
        (on the GPU machine; --smoke: a seconds-long version on the CPU, to try it end to end)

`prepare` reads a finished bench_learning work directory (`--keep`) and its `--json` report: the corpus (as
pretrain_tiny reads it), the tiny base's tokenizer, the newest trainable commits of the store's shards (before
the test cut by construction: the test commits are never ingested), the test set exactly as bench_learning
samples it, and the snapshot recipe's records. Everything it writes is gzipped JSONL plus meta.json.

`run`, in one process (no `python -m gitlora.trainer` subprocess, so a checkout that is not installed works):
1. pretrain a StarCoder2-architecture base on the corpus (pretrain_tiny.pretrain with GPU_SIZE, bf16 autocast,
   a wall-clock budget, the best held-out checkpoint);
2. gitlora's own round (trainer.round.run_round) on the train records with a time budget, so the trainer's
   first-round rate calibration runs on this device, with the test commits as the gate's window;
3. base and adapter on the test set with the product's evaluation (bench_learning's Models), paired, with
   bootstrap intervals over commits; the FIM completions of each model are written to completions.jsonl, and
   degenerate loops are counted;
4. the snapshot recipe through the same trainer at the adapter's number of steps (fim_share 1.0), then evaluated
   the same way (last: a run cut short by its time limit still has the base and the adapter).
gpu_learning.json is rewritten after every phase, so a run cut short still reports what it did.

On a GPU machine without network that has torch, transformers and peft but not rapidfuzz or pydantic, with
prepare's output (wheels included, `--wheels`) in the repository's .gpul/:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpul/whl/*.whl && export PYTHONPATH=/tmp/site && python3 bench/gpu_learning.py run --data .gpul --out $OUT
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import random
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def ensure_gitlora() -> None:
    """`gitlora.daemon` / `gitlora.trainer` live in daemon/ and trainer/ at the repository root (pyproject's
    package-dir); a checkout that is not pip-installed (the GPU machine) gets the same mapping: `gitlora` as a
    namespace package whose path is the repository root."""
    try:
        import gitlora.trainer  # noqa: F401
    except ModuleNotFoundError:
        pkg = types.ModuleType("gitlora")
        pkg.__path__ = [str(REPO)]
        sys.modules["gitlora"] = pkg


ensure_gitlora()
import pretrain_tiny  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SMOKE_SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_jsonl_gz(path: Path, rows) -> int:
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path.stat().st_size


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------------- prepare
def newest_train_records(state_root: Path, cap_bytes: int, exclude: set[str]) -> tuple[list[dict], list[str]]:
    """The trainable records (as the trainer keeps them: data.renderable) of the store's newest commits, in the
    order the product uses (round_planning.commit_facts: commit time, then manifest order; duplicates left out),
    whole commits, until `cap_bytes` of JSON. Returns (records, their commits newest first)."""
    from gitlora.daemon import round_planning
    from gitlora.trainer import data

    manifest = json.loads((state_root / "manifest.json").read_text())
    files = {e["id"]: state_root / "shards" / e["file"] for e in manifest["shards"]}
    facts = [f for f in round_planning.commit_facts(manifest) if not f.duplicate and f.commit not in exclude]
    loaded: dict[int, dict[str, list[dict]]] = {}

    def records_of(fact) -> list[dict]:
        out = []
        for shard in fact.shards:
            if shard not in loaded:
                by_commit = collections.defaultdict(list)
                for r in data.read_shards([files[shard]]):
                    by_commit[r["commit"]].append(r)
                loaded[shard] = by_commit
            out += loaded[shard].get(fact.commit, [])
        return out

    records, commits, size = [], [], 0
    for fact in reversed(facts):
        rows = [r for r in records_of(fact) if data.renderable(r)]
        n = sum(len(json.dumps(r)) + 1 for r in rows)
        if not rows:
            continue
        if records and size + n > cap_bytes:
            break
        records += rows
        commits.append(fact.commit)
        size += n
    return records, commits


def prepare(args) -> int:
    import bench_learning as bl

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = json.loads(Path(args.report).read_text().strip().splitlines()[-1])
    cut, base_dir = report["cut"], Path(report["base_model"])
    clone = args.work / pretrain_tiny.repo_label(Path(report["repo"])).split("/")[-1]
    meta: dict = {"source": {"work": str(args.work), "report": str(args.report), "cut": cut,
                             "base_model": str(base_dir), "base_meta": report.get("base_meta")}, "files": {}}

    # the tokenizer of the CPU benchmark's base (trained on this corpus): the same tokenisation on both devices
    (out / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (base_dir / name).exists():
            shutil.copy(base_dir / name, out / "tokenizer" / name)

    corpus = pretrain_tiny.load_corpus(args.corpus)
    meta["files"]["corpus.jsonl.gz"] = write_jsonl_gz(out / "corpus.jsonl.gz", (
        {"repo": r, "path": p, "text": t} for r, p, t in corpus))
    meta["corpus"] = {"files": len(corpus), "repos": sorted({r for r, _, _ in corpus}),
                      "chars": sum(len(t) for _, _, t in corpus)}
    log(f"corpus: {len(corpus)} files, {meta['files']['corpus.jsonl.gz'] / 1e6:.1f} MB gzipped")

    # the test commits and their sample, exactly as bench_learning takes them
    test_commits = bl.git(clone, "rev-list", "--no-merges", f"{cut['middle_end']}..{cut['head']}").split()
    test = bl.commit_examples(clone, test_commits)
    sample = bl.sample_examples(test, args.eval_per_commit, args.eval_max, args.seed)
    meta["files"]["test.jsonl.gz"] = write_jsonl_gz(out / "test.jsonl.gz", sample)
    window = [c for c in test_commits if c in {r["commit"] for r in sample}]  # newest first (rev-list order)
    meta["test"] = {"commits_non_merge": len(test_commits), "commits_with_examples": len(test),
                    "sampled_records": len(sample), "window_commits": window, "eval_per_commit": args.eval_per_commit,
                    "eval_max": args.eval_max, "seed": args.seed}
    log(f"test: {len(test)} commits with examples, {len(sample)} sampled records")

    # the newest trainable commits of the store (all before the test cut); the oldest few are the older slice
    state_root = next((args.work / "h" / "state" / "gitlora" / "repos").glob(f"{clone.name}-*"))
    records, commits = newest_train_records(state_root, int(args.train_mb * 1e6), set(test_commits))
    older = commits[-args.older_commits:] if len(commits) > 2 * args.older_commits else []
    meta["files"]["train.jsonl.gz"] = write_jsonl_gz(out / "train.jsonl.gz", records)
    meta["train"] = {"records": len(records), "commits": len(commits), "older_commits": older,
                     "new_commits": commits[:len(commits) - len(older)], "cap_mb": args.train_mb}
    log(f"train: {len(records)} records of the {len(commits)} newest commits "
        f"({meta['files']['train.jsonl.gz'] / 1e6:.1f} MB gzipped); older slice {len(older)} commits")

    # the snapshot recipe's records (whole files at the end of the live part, cut into chunks), a seeded sample
    snap_path = args.work / "snapshot-s0" / "000001.jsonl"
    snap = [json.loads(line) for line in snap_path.read_text().splitlines() if line.strip()]
    random.Random(args.seed).shuffle(snap)
    kept, size = [], 0
    for r in snap:
        size += len(json.dumps(r)) + 1
        if size > args.snapshot_mb * 1e6:
            break
        kept.append(r)
    meta["files"]["snapshot.jsonl.gz"] = write_jsonl_gz(out / "snapshot.jsonl.gz", kept)
    meta["snapshot"] = {"records": len(kept), "of": len(snap)}
    if args.wheels:  # what the GPU machine lacks, in a folder of their own (installed by the device command)
        (out / "whl").mkdir(exist_ok=True)
        for w in args.wheels:
            shutil.copy(w, out / "whl" / w.name)
    meta["total_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) + 2000
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    log(f"prepared {out}: {meta['total_bytes'] / 1e6:.1f} MB in all")
    print(json.dumps({k: v for k, v in meta.items() if k not in ("train", "test")} | {
        "train_records": len(records), "test_records": len(sample)}))
    return 0


# ------------------------------------------------------------------------------------------------------ run
def degenerate(completion: str, min_tokens: int = 4) -> bool:
    """A degenerate loop, as bench/README.md defines it: one whitespace-separated token makes more than half of
    the completion's tokens (`let mut mut mut ...`, `///` 25 times). Fewer than `min_tokens` tokens never count:
    a repeat needs room to repeat."""
    tokens = completion.split()
    return len(tokens) >= min_tokens and max(collections.Counter(tokens).values()) > len(tokens) / 2


class RecordingTokenizer:
    """The tokenizer as the product's evaluation uses it, keeping what it decodes: score_fim decodes exactly one
    text per FIM item, the greedy completion, in item order. So the completions come from the same decoding that
    is scored, not from a second pass."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.decoded: list[str] = []

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def decode(self, *a, **kw):
        text = self._tokenizer.decode(*a, **kw)
        self.decoded.append(text)
        return text


def round_summary(result: dict | None, error: str | None, wall_s: float) -> dict:
    if result is None:
        return {"error": error, "wall_s": round(wall_s, 1)}
    keep = ("version", "promoted", "steps", "target_tokens", "tokens_per_s", "train_time_s", "time_s", "examples",
            "eval_examples", "train_loss_first", "train_loss_last", "eval_loss_before", "eval_loss_after",
            "budget", "gate", "evaluation", "plan", "padding_waste", "truncated", "skipped")
    return {**{k: result.get(k) for k in keep}, "wall_s": round(wall_s, 1), "error": error}


def run(args) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from gitlora.trainer import evaluate, metrics, round as rnd

    hf_logging.disable_progress_bar()  # "Loading weights" bars would fill the device's output tail

    import bench_learning as bl

    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: `run --smoke` tries the script on a CPU")
    data_dir, out = args.data, args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpul-"))
    shutil.rmtree(work / "adapters", ignore_errors=True)
    shutil.rmtree(work / "snapshot-adapters", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    meta = json.loads((data_dir / "meta.json").read_text())
    t0 = time.time()
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": smoke, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                    "args": {k: str(v) for k, v in vars(args).items()}, "phases": {}, "data": {
                        k: meta.get(k) for k in ("corpus", "snapshot")} | {"source": meta.get("source")}}
    completions_path = out / "completions.jsonl"

    def save() -> None:
        report["wall_s"] = round(time.time() - t0, 1)
        tmp = out / ".gpu_learning.json.tmp"
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, out / "gpu_learning.json")

    def phase(name: str, since: float) -> float:
        now = time.time()
        report["phases"][name] = round(now - since, 1)
        if device == "cuda":  # each phase's own CUDA peak
            peak = torch.cuda.max_memory_allocated() / 2**30
            report.setdefault("cuda_peak_allocated_gib", {})[name] = round(peak, 2)
            torch.cuda.reset_peak_memory_stats()
        log(f"{name}: {now - since:.1f} s")
        save()
        return now

    # ---- data: the trainer reads plain JSONL shards
    mark = time.time()
    corpus = [(r["repo"], r["path"], r["text"]) for r in read_jsonl_gz(data_dir / "corpus.jsonl.gz")]
    train = read_jsonl_gz(data_dir / "train.jsonl.gz")
    test = read_jsonl_gz(data_dir / "test.jsonl.gz")
    snapshot = read_jsonl_gz(data_dir / "snapshot.jsonl.gz")
    new_commits, older_commits = meta["train"]["new_commits"], meta["train"]["older_commits"]
    window_commits = meta["test"]["window_commits"]
    if smoke:  # seconds on a CPU: a few files, the newest commits, a few test commits
        corpus, new_commits = corpus[:30], new_commits[:6]
        window_commits = window_commits[:4]
        test = [r for r in test if r["commit"] in set(window_commits)]
        snapshot = snapshot[:40]
    keep = set(new_commits) | set(older_commits)
    train = [r for r in train if r["commit"] in keep]
    shards = {}
    for name, rows in (("train", train), ("test", test), ("snapshot", snapshot)):
        shards[name] = work / f"{name}.jsonl"
        shards[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    report["data"].update(train_records=len(train), new_commits=len(new_commits), older_commits=len(older_commits),
                          test_records=len(test), window_commits=len(window_commits), snapshot_records=len(snapshot))
    mark = phase("data", mark)

    # ---- 1. the base
    threads = os.cpu_count() or 1
    base_dir, base_meta = pretrain_tiny.pretrain(
        [], corpus=corpus, cache_dir=work / "cache", device=device,
        wall_budget_s=args.pretrain_s if not smoke else 4.0, size=SMOKE_SIZE if smoke else pretrain_tiny.GPU_SIZE,
        tokenizer_dir=data_dir / "tokenizer", seq_len=128 if smoke else args.seq_len,
        batch=4 if smoke else args.batch, lr=args.pretrain_lr, dropout=args.dropout,
        warmup_steps=2 if smoke else 100, val_checks=2 if smoke else 8, threads=threads, log=log)
    report["pretrain"] = {k: v for k, v in base_meta.items() if k != "repos"}
    mark = phase("pretrain", mark)

    # ---- 2. the adapter: gitlora's round, bounded by time, its rate calibrated on this device
    context = 256 if smoke else args.context
    train_cfg = {"device": device, "context_length": context, "learning_rate": args.learning_rate, "seed": 0,
                 "quantization": "none", "eval_max_examples": 16 if smoke else args.round_eval_max,
                 "fim_samples": 2 if smoke else args.round_fim_samples, "max_steps": 2 if smoke else args.steps}

    def one_round(name: str, spec: dict) -> dict | None:
        progress = work / f"{name}.progress.jsonl"
        progress.unlink(missing_ok=True)
        spec = {**spec, "progress_file": str(progress)}
        t, result, error = time.time(), None, None
        try:
            result = rnd.run_round(spec, rnd.Progress(str(progress)))
        except Exception as e:  # recorded; what can still run, runs
            error = f"{type(e).__name__}: {e}"
            log(f"{name} failed: {error}")
        report[name] = round_summary(result, error, time.time() - t)
        return result

    adapters = work / "adapters"
    adapter = one_round("adapter_round", {
        "base_model": str(base_dir), "adapters_dir": str(adapters),
        "train_shards": [str(shards["train"])], "new_commits": new_commits,
        "eval_shards": [str(shards["test"]), str(shards["train"])], "window_commits": window_commits,
        "older_commits": older_commits, "budget": {"max_seconds": 8.0 if smoke else args.round_s},
        "train": train_cfg})
    mark = phase("adapter_round", mark)

    # ---- 3. base and adapter on the test set, paired, with the product's evaluation (bench_learning's Models);
    # before the snapshot recipe, so a run cut short by its time limit still has the completions
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    test_set = evaluate.prepare(test, tokenizer, context, max_examples=0,
                                fim_samples=3 if smoke else args.fim_samples, seed=0)
    models = bl.Models(str(base_dir), device, context)
    copy = bl.copy_baseline(test_set, 0)
    ev, texts = {}, {}

    def summary(scores) -> dict:
        return {k: v for k, v in scores.summary().items() if k in ("changed_loss", "target_loss", "fim_exact",
                                                                   "fim_edit_sim")}

    def versus(a, b) -> dict:
        def est(e):
            return {"value": e.value, "ci95_low": e.low, "ci95_high": e.high, "commits": e.commits}
        return {"changed_loss_rel": est(metrics.paired_loss(a.losses, b.losses)),
                "target_loss_rel": est(metrics.paired_loss(a.losses, b.losses, changed=False)),
                "fim_edit_sim_diff": est(metrics.paired_fim(a.fim, b.fim)),
                "fim_exact_diff": est(metrics.paired_fim(a.fim, b.fim, metric="exact"))}

    def evaluate_model(who: str, adapter_dir: str | None) -> None:
        t = time.time()
        recorder = RecordingTokenizer(tokenizer)
        ev[who] = models.scores(adapter_dir, test_set, recorder)
        texts[who] = recorder.decoded
        report.setdefault("eval_wall_s", {})[who] = round(time.time() - t, 1)
        log(f"evaluated {who}: {summary(ev[who])}")
        with open(completions_path, "w") as f:  # rewritten whole: every model evaluated so far
            for k, item in enumerate(test_set.fim):
                row = {"item": k, "commit": item.commit, "reference": item.reference}
                for name in ev:
                    row[name] = {"completion": texts[name][k], "edit_sim": ev[name].fim[k].edit_sim,
                                 "exact": ev[name].fim[k].exact, "degenerate": degenerate(texts[name][k])}
                f.write(json.dumps(row) + "\n")
        report["evaluation"] = {
            "sizes": {"loss_items": len(test_set.records), "fim_items": len(test_set.fim),
                      "test_commits": len(set(test_set.commits)),
                      "changed_tokens": sum(x.changed_n for x in ev["base"].losses)},
            "models": {name: summary(s) for name, s in ev.items()},
            "copy_old": {k: v for k, v in metrics.summarize([], copy).items() if k in ("fim_exact", "fim_edit_sim")},
            "degenerate": {name: sum(degenerate(x) for x in texts[name]) for name in ev},
            "empty_completions": {name: sum(not x.strip() for x in texts[name]) for name in ev},
            "vs_base": {name: versus(ev["base"], ev[name]) for name in ev if name != "base"},
            "adapter_vs_snapshot": (versus(ev["snapshot"], ev["adapter"]) if "adapter" in ev and "snapshot" in ev
                                    else None),
        }
        save()

    evaluate_model("base", None)
    if adapter:
        evaluate_model("adapter", str(adapters / adapter["version"]))
    mark = phase("evaluate", mark)

    # ---- 4. the snapshot recipe at the adapter's number of steps (bench_learning's train_snapshot, in process)
    steps = (adapter or {}).get("steps") or 0
    if steps:
        snap = one_round("snapshot_round", {
            "base_model": str(base_dir), "adapters_dir": str(work / "snapshot-adapters"),
            "train_shards": [str(shards["snapshot"])], "eval_shards": [],
            "train": {**train_cfg, "max_steps": steps, "fim_share": 1.0, "replay_share": 0.0, "fim_samples": 0}})
        mark = phase("snapshot_round", mark)
        if snap:
            evaluate_model("snapshot", str(work / "snapshot-adapters" / snap["version"]))
            mark = phase("evaluate_snapshot", mark)
    print(json.dumps(report["evaluation"], indent=1, default=str))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("prepare", help="on the CPU: the data the GPU machine needs")
    p.add_argument("--work", type=Path, required=True, help="a kept bench_learning work directory")
    p.add_argument("--report", type=Path, required=True, help="its --json output (the last line is read)")
    p.add_argument("--corpus", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-mb", type=float, default=80.0, help="JSON megabytes of train records (before gzip)")
    p.add_argument("--snapshot-mb", type=float, default=20.0)
    p.add_argument("--older-commits", type=int, default=8, help="oldest selected commits held out (forgetting)")
    p.add_argument("--eval-per-commit", type=int, default=8, help="bench_learning's --eval-per-commit")
    p.add_argument("--eval-max", type=int, default=160, help="bench_learning's --eval-max (runs 8-11: 160)")
    p.add_argument("--seed", type=int, default=0, help="bench_learning's --seed")
    p.add_argument("--wheels", type=Path, nargs="*", default=[], help="wheels the GPU machine lacks (copied to "
                   "OUT/whl): rapidfuzz, pydantic and its dependencies")
    r = sub.add_parser("run", help="on the GPU: pretrain, the adapter round, the snapshot recipe, evaluation")
    r.add_argument("--data", type=Path, required=True, help="what prepare wrote")
    r.add_argument("--out", type=Path, required=True, help="gpu_learning.json and completions.jsonl go here")
    r.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    r.add_argument("--pretrain-s", type=float, default=200.0, help="wall seconds of pretraining")
    r.add_argument("--pretrain-lr", type=float, default=1e-3)
    r.add_argument("--dropout", type=float, default=0.1, help="while pretraining (many epochs of a small corpus)")
    r.add_argument("--seq-len", type=int, default=1024)
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--round-s", type=float, default=60.0, help="the adapter round's budget.max_seconds")
    r.add_argument("--steps", type=int, default=0, help="the adapter round's max_steps (0: its budget decides)")
    r.add_argument("--learning-rate", type=float, default=1e-3, help="LoRA learning rate (adapter and snapshot)")
    r.add_argument("--context", type=int, default=1024)
    r.add_argument("--round-eval-max", type=int, default=240, help="the round's eval_max_examples")
    r.add_argument("--round-fim-samples", type=int, default=32, help="the round's fim_samples on the window")
    r.add_argument("--fim-samples", type=int, default=64, help="FIM items of the final evaluation")
    r.add_argument("--smoke", action="store_true", help="a tiny model on the CPU for seconds")
    args = ap.parse_args(argv)
    return prepare(args) if args.mode == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
