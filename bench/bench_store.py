"""Store.write throughput vs raw LMDB appends of the same bytes, in the same run.

    python bench/bench_store.py [--examples 20000] [--reps 3] [--json] [--min-rate 20000]

Synthetic example records shaped like the daemon's (DESIGN.md's *Example record*, ~2 KB of JSON each) are
written to a fresh store per run, in these modes (interleaved per rep, so machine noise hits all alike):

- `raw-lmdb` (the baseline): a plain `lmdb` env with the same flags as the store, the pre-encoded bytes put
  with `append=True` under 8-byte big-endian keys, one transaction per 1000 examples.
- `store-bytes-1000`: `Store.write` of one PendingCommit of 1000 pre-encoded examples per transaction.
- `store-dicts-1000`: the same with dict examples (Store.write JSON-encodes them: what a library caller pays).
- `store-bytes-16c` / `store-bytes-64c`: 16 / 64 commits per transaction with ~155 examples each
  (the-block's mean), pre-encoded, as backfill writes them (backfill's transactions are runs of
  `min(batch_commits=64, 16)` commits today).

Prints examples/s, MB/s (of example JSON) and the ratio of each mode's time to the baseline's. Target:
>= 20,000 examples/s for Store.write.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import lmdb

from gitlora.daemon.compact_json import encode
from gitlora.daemon.store import PendingCommit, Store

TARGET = 20_000.0


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = "\n".join(f"    let v{j} = self.field_{j}.checked_add({rng.randint(0, 1 << 30)})?;"
                         for j in range(rng.randint(8, 16)))
        before = f"pub fn item_{i}(&mut self) -> Result<u64, Error> {{\n{body}\n    Ok(0)\n}}\n"
        after = before.replace("checked_add", "saturating_add", rng.randint(1, 4))
        out.append({
            "repo": "the-block", "commit": f"{rng.getrandbits(160):040x}", "parent": f"{rng.getrandbits(160):040x}",
            "author_time": 1_700_000_000 + i, "commit_time": 1_700_000_000 + i,
            "message": "node: tighten overflow handling in ledger accounting",
            "path": f"node/src/ledger/m{i % 37}.rs", "old_path": None, "kind": "fn",
            "qualified_name": f"ledger::m{i % 37}::Ledger::item_{i}", "change_kind": "modified",
            "before": before, "after": after,
            "imports": ["use std::collections::HashMap;", "use crate::error::Error;", "use crate::ledger::Account;"],
        })
    return out


def run_raw(path: Path, raw: list[bytes], per_txn: int = 1000) -> float:
    env = lmdb.open(str(path), max_dbs=4, map_size=1 << 30, subdir=True, lock=True, readahead=False, meminit=False)
    db = env.open_db(b"examples")
    key = struct.Struct(">Q").pack
    t0 = time.perf_counter()
    for start in range(0, len(raw), per_txn):
        with env.begin(write=True, db=db) as txn:
            for seq in range(start, min(start + per_txn, len(raw))):
                if not txn.put(key(seq), raw[seq], append=True):
                    raise RuntimeError("append refused")
    seconds = time.perf_counter() - t0
    env.close()
    return seconds


def _oid(i: int) -> bytes:
    return i.to_bytes(20, "big")


def run_store(path: Path, items: list, commits_per_txn: int, per_commit: int) -> float:
    # map_size as big as the baseline's so neither side pays for growing the map.
    store = Store(path, map_size=1 << 30)
    batches = []
    c = 0
    for start in range(0, len(items), commits_per_txn * per_commit):
        chunk = items[start:start + commits_per_txn * per_commit]
        batch = []
        for j in range(0, len(chunk), per_commit):
            batch.append(PendingCommit(_oid(c), {"source": "bench", "status": "ingested", "commit_time": c},
                                       chunk[j:j + per_commit]))
            c += 1
        batches.append(batch)
    t0 = time.perf_counter()
    for batch in batches:
        store.write(batch)
    seconds = time.perf_counter() - t0
    assert store.next_seq() == len(items)
    store.close()
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--min-rate", type=float, default=None, help="exit 1 if Store.write (bytes, 1000/txn) is slower")
    args = ap.parse_args(argv)

    examples = synthetic_examples(args.examples)
    raw = [encode(e) for e in examples]
    mb = sum(map(len, raw)) / 1e6
    modes = {
        "raw-lmdb": lambda p: run_raw(p, raw),
        "store-bytes-1000": lambda p: run_store(p, raw, 1, 1000),
        "store-dicts-1000": lambda p: run_store(p, examples, 1, 1000),
        "store-bytes-16c": lambda p: run_store(p, raw, 16, 155),
        "store-bytes-64c": lambda p: run_store(p, raw, 64, 155),
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="gitlora-bench-store-", dir=os.environ.get("BENCH_TMPDIR")) as tmp:
        for rep in range(args.reps + 1):  # rep 0 warms up (page cache, imports) and is discarded
            order = list(modes) if rep % 2 == 0 else list(reversed(modes))
            for name in order:
                path = Path(tmp) / f"{name}-{rep}"
                seconds = modes[name](path)
                if rep:
                    times[name].append(seconds)
                sizes[name] = (path / "data.mdb").stat().st_size
                for f in path.iterdir():
                    f.unlink()
                path.rmdir()

    base = statistics.median(times["raw-lmdb"])
    report = {"examples": args.examples, "mean_example_bytes": round(mb * 1e6 / args.examples), "mb": mb,
              "reps": args.reps, "target_examples_per_s": TARGET, "modes": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        report["modes"][name] = {"median_s": med, "min_s": min(ts), "max_s": max(ts),
                                 "examples_per_s": args.examples / med, "mb_per_s": mb / med,
                                 "ratio_to_raw": med / base, "file_mb": sizes[name] / 1e6}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.examples} examples, {report['mean_example_bytes']} B of JSON each ({mb:.1f} MB), "
              f"{args.reps} reps (+1 warm-up), medians; spread is min-max over reps")
        for name, r in report["modes"].items():
            print(f"  {name:17s} {r['examples_per_s']:9.0f} ex/s  {r['mb_per_s']:6.1f} MB/s  "
                  f"{r['ratio_to_raw']:5.2f}x raw  ({r['min_s']:.3f}-{r['max_s']:.3f} s, file {r['file_mb']:.1f} MB)")
        print(f"  target: Store.write >= {TARGET:.0f} examples/s")
    rate = report["modes"]["store-bytes-1000"]["examples_per_s"]
    return 1 if args.min_rate is not None and rate < args.min_rate else 0


if __name__ == "__main__":
    sys.exit(main())
