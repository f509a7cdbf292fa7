"""Continuation settings chosen by measurement: the live rounds of one `bench_learning.py` run, trained again from
its first adapter with each candidate setting, scored on the same never-ingested test commits.

    python bench/bench_learning.py ... --keep --json > run.json   # stderr ends with "work directory kept: DIR"
    python bench/sweep_continuation.py --work DIR --report run.json \\
        --variant ratio0.5=continuation_lr_ratio=0.5 --variant replay0.5=replay_share=0.5,replay_halflife_commits=10

Why a replay of the run rather than a whole benchmark per setting: which commits a live round trains, holds out
and replays depends on timing (how many commits landed while the previous round ran), so two live runs differ
in their data as well as their settings. Here every variant trains on exactly the rounds the daemon planned
(each round's spec.json: new, replay, window and older commits, budget, seed), in the same order, through the
real trainer and its gate; only the [train] settings given differ. The round that trained the lineage's first
version (a fresh adapter) is not repeated: that adapter is every variant's starting point, and the rounds after
it are replayed.

Each variant's final `current` is scored against the base on the test commits, paired, with the product's own
evaluation (trainer/evaluate.py, trainer/metrics.py: changed-token loss, 95 % interval over commits), and
against the first adapter on the older slice (forgetting), as bench_learning.py scores its adapter. The run's
own final adapter is scored as "as-run" (the same settings as the variant "default" when timing did not
change the rounds' data), and each variant's last candidate ("NAME (last)", when its gate rejected it): the gate
on a scaled-down window is noisy, and a setting's effect shows in what it trained. One JSON object last on
stdout with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_learning as bl  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    """"name=key=value,key=value" -> (name, {key: value}); values are JSON ("name=" alone: no change)."""
    name, _, rest = text.partition("=")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        settings[key.strip()] = json.loads(value)
    return name, settings


def round_version(rdir: Path) -> str | None:
    """The adapter version a round trained (its progress file's start event)."""
    progress = rdir / "progress.jsonl"
    for line in (progress.read_text().splitlines() if progress.exists() else []):
        event = json.loads(line) if line.strip() else {}
        if event.get("event") == "start":
            return event.get("version")
    return None


def rounds_after(rounds_dir: Path, first: str) -> list[Path]:
    """The run's rounds after the one that trained `first` (earlier rounds, e.g. a first round the gate
    rejected, are not continuations of it)."""
    rounds = sorted(p for p in rounds_dir.iterdir() if p.is_dir() and (p / "spec.json").exists())
    versions = [round_version(r) for r in rounds]
    if first not in versions:
        raise SystemExit(f"no round of {rounds_dir} trained {first}")
    return rounds[versions.index(first) + 1:]


def replay_rounds(rp, work: Path, name: str, settings: dict, env: dict, first: str, limit: int = 0) -> dict:
    """The run's rounds after the first, again, from the first adapter, with `settings` merged into [train]."""
    vdir = work / "sweep" / name
    shutil.rmtree(vdir, ignore_errors=True)
    adapters = vdir / "adapters"
    adapters.mkdir(parents=True)
    shutil.copytree(rp.adapters / first, adapters / first)
    os.symlink(first, adapters / "current")
    outcomes, t0 = [], time.time()
    rounds = rounds_after(rp.rounds, first)
    for rdir in rounds[:limit] if limit else rounds:
        spec = json.loads((rdir / "spec.json").read_text())
        spec["adapters_dir"], spec["progress_file"] = str(adapters), str(vdir / f"{rdir.name}.progress.jsonl")
        spec["train"] = {**(spec.get("train") or {}), **settings}
        path = vdir / f"{rdir.name}.spec.json"
        path.write_text(json.dumps(spec, indent=1))
        with open(vdir / f"{rdir.name}.log", "wb") as out:
            code = subprocess.run([bl.PY, "-m", "gitlora.trainer", "--spec", str(path)], stdout=out,
                                  stderr=subprocess.STDOUT, env=env, cwd=vdir).returncode
        events = [json.loads(line) for line in Path(spec["progress_file"]).read_text().splitlines() if line.strip()]
        done = next((e for e in events if e.get("event") == "done"), None)
        start = next((e for e in events if e.get("event") == "start"), {})
        outcomes.append({"round": rdir.name, "exit": code, "promoted": bool(done and done.get("promoted")),
                         "learning_rate": start.get("learning_rate"), "replayed": start.get("replayed"),
                         "examples": start.get("examples")})
        bl.log(f"{name}: round {rdir.name} exit {code}, {'promoted' if outcomes[-1]['promoted'] else 'kept'}")
    versions = sorted(d.name for d in adapters.iterdir() if d.is_dir() and d.name.startswith("v"))
    return {"rounds": outcomes, "current": str(adapters / "current"), "last": str(adapters / versions[-1]),
            "time_s": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="a bench_learning.py work directory (--keep)")
    ap.add_argument("--report", type=Path, required=True, help="that run's --json output (its last line is used)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=JSON[,KEY=JSON]")
    ap.add_argument("--rounds", type=int, default=0, help="replay only the first N rounds after the first (0: all)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="a [train] setting for every variant (e.g. max_steps=100 to bound each round alike)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-per-commit", type=int, default=8)
    ap.add_argument("--eval-max", type=int, default=160)
    ap.add_argument("--reuse", type=Path, default=None, help="a previous sweep's --json output: score its variants "
                    "again without training them again (and train only the --variant's given, added to them)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from gitlora.trainer import evaluate, metrics

    torch.set_num_threads(args.threads)
    report = json.loads(args.report.read_text().strip().splitlines()[-1])
    cut, base_dir = report["cut"], report["base_model"]
    context = int(next(line.split("=")[1] for line in report["config"].splitlines()
                       if line.startswith("context_length")))
    env = bl.isolated_env(args.work, args.threads)
    clone = next(p.parent for p in args.work.glob("*/.git"))
    rp = bl.repo_state(clone, env)
    chain = bl.lineage(rp.adapters)
    if not chain:
        raise SystemExit("the run promoted no adapter: nothing to continue from")
    first = chain[0]

    common = parse_variant("common=" + ",".join(args.set))[1]
    results = {}
    if args.reuse:
        previous = json.loads(args.reuse.read_text().strip().splitlines()[-1])
        results, common, args.rounds = previous["variants"], previous["common"], previous["rounds_replayed"]
    for text in args.variant or ([] if args.reuse else ["default="]):  # with --reuse: variants added to its ones
        name, settings = parse_variant(text)
        results[name] = {"settings": settings, **replay_rounds(rp, args.work, name, {**common, **settings}, env,
                                                               first, args.rounds)}

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    test_commits = bl.git(clone, "rev-list", "--no-merges", f"{cut['middle_end']}..{cut['head']}").split()
    test = bl.commit_examples(clone, test_commits)
    test_set = evaluate.prepare(bl.sample_examples(test, args.eval_per_commit, args.eval_max, args.seed), tokenizer,
                                context, max_examples=0, fim_samples=0, seed=args.seed)
    older_oids = bl.git(clone, "rev-list", "--no-merges", cut["backfill_end"]).split()
    random.Random(args.seed).shuffle(older_oids)
    older_set = evaluate.prepare(bl.sample_examples(bl.commit_examples(clone, older_oids[:30]), 6, 90, args.seed),
                                 tokenizer, context, max_examples=0, fim_samples=0, seed=args.seed)
    models = bl.Models(base_dir, "cpu", context)
    base = models.scores(None, test_set, tokenizer).losses
    older_first = models.scores(str(rp.adapters / first), older_set, tokenizer).losses
    # A variant's `current` is what its gate promoted; its last candidate is what its settings trained last,
    # promoted or not (with a small window the gate's noise can hide a setting's effect on the current).
    candidates = {"first adapter": str(rp.adapters / first), "as-run": str(rp.adapters / chain[-1]),
                  **{name: r["current"] for name, r in results.items()},
                  **{f"{name} (last)": r["last"] for name, r in results.items()
                     if Path(r["last"]).resolve() != Path(r["current"]).resolve()}}
    # Variants differ by less than each one's interval against the base: only a paired comparison with the
    # reference variant (the first one given; its last candidate) on the same items says which setting is better.
    reference = next(iter(results), None)
    reference_path = results[reference]["last"] if reference else None
    reference_losses = models.scores(reference_path, test_set, tokenizer).losses if reference_path else None
    table = {}
    for name, path in candidates.items():
        losses = models.scores(path, test_set, tokenizer).losses
        table[name] = {"vs_base": bl.rel(metrics.paired_loss(base, losses)),
                       "vs_reference": (bl.rel(metrics.paired_loss(reference_losses, losses))
                                        if reference_losses is not None and path != reference_path else None),
                       "forgetting": bl.rel(metrics.paired_loss(older_first,
                                                                models.scores(path, older_set, tokenizer).losses)),
                       "changed_loss": metrics.summarize(losses, [])["changed_loss"],
                       "promoted": (sum(r["promoted"] for r in results[name]["rounds"]) if name in results else None),
                       "settings": results.get(name, {}).get("settings")}
    print(f"{'variant':<22}{'changed loss':>13}{'vs base':>9}{'95% CI':>20}{'forgetting':>11}{'promoted':>9}"
          f"{'vs ' + str(reference) + ' (last), 95% CI':>36}")
    for name, row in table.items():
        v, f, r = row["vs_base"], row["forgetting"], row["vs_reference"]
        ci = f"{v['ci95_low']:+.1%} .. {v['ci95_high']:+.1%}"
        promoted = "" if row["promoted"] is None else str(row["promoted"])
        paired = (f"{r['changed_loss_rel']:+.2%} ({r['ci95_low']:+.2%} .. {r['ci95_high']:+.2%})" if r else "")
        print(f"{name:<22}{row['changed_loss']:>13.4f}{v['changed_loss_rel']:>+9.1%}{ci:>20}"
              f"{f['changed_loss_rel']:>+11.1%}{promoted:>9}{paired:>36}")
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d"), "work": str(args.work), "first": first,
                          "common": common, "rounds_replayed": args.rounds,
                          "test_items": len(test_set.records), "older_items": len(older_set.records),
                          "variants": results, "table": table}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
