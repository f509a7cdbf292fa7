"""Run every benchmark under bench/ and print one table of measured values against their targets.

    python bench/run_all.py [--quick] [--only NAME ...] [--skip NAME ...] [--check]

(`make bench` runs this; `make bench ARGS=--quick` the short version.) Each benchmark is its own script, run
as a subprocess with --json; every ratio is against a baseline measured in that same run. --quick shrinks
them (synthetic repository for backfill, fewer commits/examples, 10 s idle) to a few minutes in all.
--check exits 1 when a target is missed. Names: backfill, store, daemon, hooks, train.

The learning benchmark (bench_learning.py: pretraining, a live daemon over a real history, evaluation; about
half an hour on 2 cores) is not in the default set: `--learning --learning-repo PATH --learning-corpus DIR...`
adds it (`--only learning` runs it alone).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, full args, quick args)
BENCHES = {
    "backfill": ("bench_backfill.py", [], ["--reps", "1", "--synthetic"]),
    "store": ("bench_store.py", [], ["--examples", "5000", "--reps", "2"]),
    "daemon": ("bench_daemon.py", [], ["--commits", "40", "--idle-seconds", "10"]),
    "hooks": ("bench_hooks.py", [], ["--commits", "30", "--rounds", "1"]),
    "train": ("bench_train.py", [], ["--examples", "60"]),
}
# opt-in only (long): name -> (script, full args, quick args); --learning-repo / --learning-corpus are added
OPT_IN = {
    "learning": ("bench_learning.py", [], ["--pretrain-cpu-s", "120", "--middle-commits", "6", "--round-steps", "8",
                                           "--eval-max", "120", "--fim-samples", "12", "--snapshot-seeds", "1"]),
}


def rows_for(name: str, r: dict) -> list[tuple[str, str, str, bool]]:
    """(metric, measured, target, ok) rows from a benchmark's --json report."""
    if name == "backfill":
        return [
            ("backfill / git log -p", f"{r['ratio']:.1f}x ({r['backfill_median_s']:.1f} s / {r['git_log_median_s']:.2f} s)",
             "<= 15x", r["ratio"] <= 15),
            ("backfill throughput", f"{r['commits_per_s']:.0f} commits/s, {r['patch_mb_per_s']:.2f} MB/s patch, "
             f"{r['examples']} examples", "-", True),
        ]
    if name == "store":
        m = r["modes"]
        out = []
        for mode in ("store-bytes-1000", "store-dicts-1000", "store-bytes-16c"):
            out.append((f"Store.write {mode[6:]}", f"{m[mode]['examples_per_s']:.0f} ex/s "
                        f"({m[mode]['ratio_to_raw']:.2f}x raw lmdb)", ">= 20000 ex/s",
                        m[mode]["examples_per_s"] >= 20000))
        return out
    if name == "daemon":
        c, lat, idle = r["commit"], r["latency"], r["idle"]
        return [
            ("git commit, hooks+daemon / empty sh hook", f"{c['vs_empty_hook_paired_median']:.3f}x "
             f"(95% CI {c['vs_empty_hook_ci95'][0]:.3f}-{c['vs_empty_hook_ci95'][1]:.3f}; "
             f"{c['hooked_median_ms']:.1f} / {c['empty_hook_median_ms']:.1f} ms)", "<= 1.03x",
             c["vs_empty_hook_paired_median"] <= 1.03),
            ("git commit, hooks+daemon / none", f"{c['ratio_median']:.3f}x", "(info)", True),
            ("git commit, empty sh hook / none", f"{c['empty_hook_ratio']:.3f}x", "(floor)", True),
            ("commit -> stored p50", f"{lat['p50_ms']:.0f} ms (p95 {lat['p95_ms']:.0f} ms)", "<= 250 ms",
             lat["p50_ms"] <= 250),
            ("idle daemon RSS", f"{idle['rss_mb']:.1f} MB", "<= 80 MB", idle["rss_mb"] <= 80),
            ("daemon RSS creep", f"{r['rss_creep']['kb_per_commit']:+.1f} KB/commit"
             + ("" if r["rss_creep"]["judged"] else " (not judged: < 120 iterations)"), "<= 10 KB/commit",
             not r["rss_creep"]["judged"] or r["rss_creep"]["kb_per_commit"] <= 10),
            ("idle daemon CPU", f"{idle['cpu_s']:.2f} s in {idle['seconds']:.0f} s", "~0", idle["cpu_share"] <= 0.005),
            ("torch in daemon", "none" if not idle["heavy_mappings"] else f"{len(idle['heavy_mappings'])} mappings",
             "none", not idle["heavy_mappings"]),
        ]
    if name == "hooks":
        # A one-file repo, so the commit is as cheap as git gets and any hook is a large share of it: the
        # commit target is judged in the daemon row (the user's repo size and median commit). Here: what
        # gitlora's hook costs over the floor of running any hook at all.
        v = r["variants"]["gitlora-hooks"]
        empty = r["variants"].get("empty-hook")
        rows = [("git commit, gitlora hooks / none", f"{v['ratio_median']:.3f}x ({v['median_ms']:.1f} ms, tiny repo)",
                 "(info)", True)]
        if empty:
            over = v["median_ms"] - empty["median_ms"]
            rows.append(("git commit, empty sh hook / none", f"{empty['ratio_median']:.3f}x", "(floor)", True))
            rows.append(("gitlora hooks over empty sh hook", f"{over:+.2f} ms", "<= 0.5 ms", over <= 0.5))
        return rows
    if name == "train":
        return [("train loop / HF Trainer tok/s", f"{r['ratio']:.2f}x", ">= 1.0x", r["ratio"] >= 1.0)]
    if name == "learning":
        avb, rows = r.get("adapter_vs_base"), []
        if avb:
            rows.append(("adapter vs base, changed-token loss", f"{avb['changed_loss_rel']:+.1%} (95% CI "
                         f"{avb['ci95_low']:+.1%} .. {avb['ci95_high']:+.1%})", "<= -10%, CI < 0",
                         avb["changed_loss_rel"] <= -0.10 and avb["ci95_high"] < 0))
            e = r["adapter_vs_base_edit_sim"]
            rows.append(("adapter vs base, FIM edit similarity", f"{e['diff']:+.3f}", "> 0", e["diff"] > 0))
            for k, v in (r.get("adapter_vs_snapshot") or {}).items():
                rows.append((f"adapter vs {k}, changed-token loss", f"{v['changed_loss_rel']:+.1%}", "<= 0",
                             v["changed_loss_rel"] <= 0))
        else:
            rows.append(("adapter vs base", "no adapter was promoted", "an adapter", False))
        rows.append(("forgetting on the older slice", f"{r['forgetting_rel']:+.1%}", "<= 2%",
                     r["forgetting_rel"] <= 0.02))
        rows.append(("rounds in the live part", f"{r['rounds_live']} ({r['promoted_live']} promoted)", ">= 1",
                     r["rounds_live"] >= 1))
        return rows
    return []


def _last_json(stdout: str) -> dict | None:
    """The --json report: the last top-level object in stdout (libraries may print dict-like lines before it)."""
    starts = [0] + [i + 1 for i, c in enumerate(stdout) if c == "\n"]
    for start in reversed(starts):
        if stdout.startswith("{", start):
            try:
                return json.loads(stdout[start:])
            except ValueError:
                continue
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", action="append", choices=sorted({**BENCHES, **OPT_IN}))
    ap.add_argument("--skip", action="append", choices=sorted({**BENCHES, **OPT_IN}), default=[])
    ap.add_argument("--check", action="store_true", help="exit 1 if any target is missed")
    ap.add_argument("--learning", action="store_true", help="also run the (long) learning benchmark")
    ap.add_argument("--learning-repo", default=None, help="target repository of the learning benchmark")
    ap.add_argument("--learning-corpus", nargs="+", default=[], help="its pretraining corpus (other Rust repos)")
    args = ap.parse_args(argv)
    names = [n for n in (args.only or [*BENCHES, *(["learning"] if args.learning else [])]) if n not in args.skip]
    if "learning" in names and not (args.learning_repo and args.learning_corpus):
        ap.error("the learning benchmark needs --learning-repo PATH and --learning-corpus DIR...")

    table: list[tuple[str, str, str, str, bool]] = []
    failed = []
    for name in names:
        script, full, quick = {**BENCHES, **OPT_IN}[name]
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full), "--json"]
        if name == "learning":
            cmd[-1:-1] = ["--repo", args.learning_repo, "--corpus", *args.learning_corpus]
        print(f"== {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        took = time.perf_counter() - t0
        report = _last_json(proc.stdout)
        if report is None:
            failed.append(name)
            print(f"   {name} failed (exit {proc.returncode}) after {took:.0f} s:\n{proc.stdout[-2000:]}"
                  f"{proc.stderr[-3000:]}", file=sys.stderr)
            table.append((name, "(did not run)", f"exit {proc.returncode}", "-", False))
            continue
        print(f"   done in {took:.0f} s", file=sys.stderr)
        for metric, value, target, ok in rows_for(name, report):
            table.append((name, metric, value, target, ok))

    widths = [max(len(row[i]) for row in table + [("bench", "metric", "measured", "target", True)]) for i in range(4)]
    header = ("bench", "metric", "measured", "target")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  ok")
    print("  ".join("-" * w for w in widths) + "  --")
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + ("  ok" if row[4] else "  MISSED"))
    missed = [row for row in table if not row[4]]
    print(f"\n{len(table) - len(missed)}/{len(table)} targets met" + (" (quick settings)" if args.quick else ""))
    return 1 if args.check and (missed or failed) else 0


if __name__ == "__main__":
    sys.exit(main())
