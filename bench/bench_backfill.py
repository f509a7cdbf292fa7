"""Full backfill of a repository vs `git log -p --all -- '*.rs'` on the same repository, in the same run.

    python bench/bench_backfill.py [--repo PATH] [--workers N] [--reps 2] [--json] [--max-ratio 15]

Each rep runs `python -m gitlora.daemon backfill --no-progress REPO` as a subprocess against a fresh state dir
(GITLORA_STATE_HOME and XDG_CONFIG_HOME point into a temp dir, so neither the user's stores nor their config
are touched), and times it wall-clock, start-up included. The baseline, `git log -p --all -- '*.rs'` with its
output sent to /dev/null, runs right before and after each backfill (interleaved, so machine noise hits both);
the ratio is median(backfill) / median(git log). Target: <= 15x. Each backfill's CPU seconds (user + system, its
worker processes included) are reported too: on a machine that is not quiet they say more than wall time does.

MB/s is MB of *patch text* (the size of that `git log -p` output, measured once, untimed) per second of
backfill: the same amount of history for both sides. (gitlora itself parses whole old and new blobs, which is
more text than the patch; the patch is the measure both sides share.)

The repository: `--repo PATH`, else $GITLORA_BENCH_REPO, else a synthetic repository of ~600 commits over ~300
.rs files built with `git fast-import` (the one the other benches use), so the script runs anywhere. (With a
partial clone, e.g. the user's repository, a few missing blobs show up as recorded skips.)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gitlora.daemon.gitenv import git_env

REPO_ENV = "GITLORA_BENCH_REPO"
PY = sys.executable


def clean_env(**extra: str) -> dict[str, str]:
    """No GIT_* at all (a benchmark brings its own git setup) and no GITLORA_* of the caller's."""
    env = {k: v for k, v in git_env(keep=()).items() if not k.startswith("GITLORA_")}
    env.update(extra)
    return env


# -- synthetic Rust history ------------------------------------------------------------------------------
_TYPES = ("u32", "u64", "i64", "usize", "bool", "String", "Vec<u8>", "Option<u32>")
_WORDS = ("block", "state", "ledger", "peer", "chunk", "index", "height", "proof", "hash", "epoch", "fee",
          "account", "root", "tx", "vote", "shard", "cache", "queue", "reward", "nonce")


def _ident(rng: random.Random) -> str:
    return "_".join(rng.sample(_WORDS, 2))


def rust_fn(rng: random.Random, name: str, lines: int | None = None) -> str:
    """A plausible Rust function of ~`lines` body lines."""
    lines = lines or rng.randint(4, 30)
    arg, ty = _ident(rng), rng.choice(_TYPES)
    body = []
    for i in range(lines):
        v = f"{_ident(rng)}_{i}"
        body.append(rng.choice((
            f"    let {v} = {arg}.clone();",
            f"    let {v}: u64 = {rng.randint(0, 1 << 20)} * {i + 1};",
            f"    if {v}_ok() {{ return Default::default(); }}",
            f"    tracing::debug!(\"{v} = {{}}\", {rng.randint(0, 999)});",
            f"    for _ in 0..{rng.randint(1, 64)} {{ self.{_ident(rng)}.push({i}); }}",
        )))
    return (f"/// Computes the {name.replace('_', ' ')}.\npub fn {name}({arg}: {ty}) -> Result<{ty}, Error> {{\n"
            + "\n".join(body) + f"\n    Ok({arg})\n}}\n")


class RustFile:
    def __init__(self, rng: random.Random, path: str, n_items: int) -> None:
        self.path = path
        self.items: dict[str, str] = {}
        self.header = "use std::collections::HashMap;\nuse crate::error::Error;\n\n"
        for _ in range(n_items):
            self.add(rng)

    def add(self, rng: random.Random) -> None:
        name = f"{_ident(rng)}_{len(self.items)}"
        if rng.random() < 0.2:
            fields = "\n".join(f"    pub {_ident(rng)}_{i}: {rng.choice(_TYPES)}," for i in range(rng.randint(2, 8)))
            self.items[name] = f"#[derive(Debug, Clone)]\npub struct {name.title().replace('_', '')} {{\n{fields}\n}}\n"
        else:
            self.items[name] = rust_fn(rng, name)

    def modify(self, rng: random.Random, n: int = 2) -> None:
        for name in rng.sample(sorted(self.items), min(n, len(self.items))):
            self.items[name] = rust_fn(rng, name)

    def text(self) -> str:
        return self.header + "\n".join(self.items.values())


def make_synthetic_repo(path: Path, commits: int = 600, files: int = 300, seed: int = 7) -> Path:
    """A non-bare repo whose history is `commits` commits over up to `files` .rs files, via git fast-import."""
    rng = random.Random(seed)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True, env=clean_env())
    tree: dict[str, RustFile] = {}
    out = bytearray()
    t = 1_600_000_000

    def data(text: str) -> None:
        raw = text.encode()
        out.extend(b"data %d\n" % len(raw) + raw + b"\n")

    for c in range(commits):
        changed: list[RustFile] = []
        if c == 0:
            for i in range(files // 6):
                tree[f"src/m{i:03d}.rs"] = RustFile(rng, f"src/m{i:03d}.rs", rng.randint(3, 12))
            changed = list(tree.values())
        else:
            if len(tree) < files and rng.random() < 0.6:
                p = f"crates/c{len(tree) % 17}/src/m{len(tree):03d}.rs"
                tree[p] = RustFile(rng, p, rng.randint(3, 12))
                changed.append(tree[p])
            for f in rng.sample(list(tree.values()), rng.randint(1, 4)):
                f.modify(rng, rng.randint(1, 3))
                if rng.random() < 0.3:
                    f.add(rng)
                changed.append(f)
        t += rng.randint(60, 7200)
        out.extend(b"commit refs/heads/main\n")
        out.extend(b"committer Bench <bench@example.com> %d +0000\n" % t)
        data(f"change {c}: touch {len(changed)} files")
        for f in changed:
            out.extend(f"M 100644 inline {f.path}\n".encode())
            data(f.text())
        out.extend(b"\n")
    subprocess.run(["git", "fast-import", "--quiet"], cwd=path, input=bytes(out), check=True, env=clean_env())
    subprocess.run(["git", "reset", "-q", "--hard", "main"], cwd=path, check=True, env=clean_env())
    return path


# -- timing ---------------------------------------------------------------------------------------------
def time_git_log(repo: Path) -> float:
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        subprocess.run(["git", "-C", str(repo), "log", "-p", "--all", "--", "*.rs"], stdout=null, check=True,
                       env=clean_env())
    return time.perf_counter() - t0


def patch_bytes(repo: Path) -> int:
    proc = subprocess.Popen(["git", "-C", str(repo), "log", "-p", "--all", "--", "*.rs"], stdout=subprocess.PIPE,
                            env=clean_env())
    total = 0
    assert proc.stdout is not None
    while chunk := proc.stdout.read(1 << 20):
        total += len(chunk)
    proc.wait()
    return total


def state_env(state: Path) -> dict[str, str]:
    return clean_env(GITLORA_STATE_HOME=str(state / "state"), XDG_CONFIG_HOME=str(state / "config"),
                     XDG_STATE_HOME=str(state / "xdg-state"), XDG_RUNTIME_DIR=str(state / "run"))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_backfill(repo: Path, state: Path, workers: int | None) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the backfill and its workers, what it printed)."""
    cmd = [PY, "-m", "gitlora.daemon", "backfill", "--no-progress", str(repo)]
    if workers:
        cmd += ["--workers", str(workers)]
    t0, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, env=state_env(state), capture_output=True, text=True, cwd=state)
    seconds = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0
    if proc.returncode != 0:
        raise SystemExit(f"backfill failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds, cpu, proc.stdout.strip()


def stats(repo: Path, state: Path) -> dict:
    proc = subprocess.run([PY, "-m", "gitlora.daemon", "stats", "--json", str(repo)], env=state_env(state),
                          capture_output=True, text=True, check=True, cwd=state)
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=None, help=f"repository (default: ${REPO_ENV}, else synthetic)")
    ap.add_argument("--synthetic", action="store_true", help=f"use the synthetic repository even if ${REPO_ENV} is set")
    ap.add_argument("--synthetic-commits", type=int, default=600)
    ap.add_argument("--synthetic-files", type=int, default=300)
    ap.add_argument("--workers", type=int, default=None, help="backfill --workers (default: gitlora's own)")
    ap.add_argument("--reps", type=int, default=2, help="backfills (each between two git-log baselines)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--max-ratio", type=float, default=None, help="exit 1 if the ratio exceeds this (e.g. 15)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="gitlora-bench-backfill-") as tmp:
        root = Path(tmp)
        from_env = os.environ.get(REPO_ENV)
        if args.repo:
            repo, kind = args.repo.resolve(), "given"
        elif from_env and not args.synthetic:
            repo, kind = Path(from_env).resolve(), f"${REPO_ENV}"
        else:
            t0 = time.perf_counter()
            repo = make_synthetic_repo(root / "synthetic", args.synthetic_commits, args.synthetic_files)
            kind = f"synthetic ({args.synthetic_commits} commits, built in {time.perf_counter() - t0:.1f} s)"
        commits = int(subprocess.run(["git", "-C", str(repo), "rev-list", "--all", "--count"], capture_output=True,
                                     text=True, check=True, env=clean_env()).stdout)
        patch = patch_bytes(repo)
        time_git_log(repo)  # warm the page cache for both sides
        git_times: list[float] = []
        fill_times: list[float] = []
        fill_cpu: list[float] = []
        last_state = None
        summary_line = ""
        for rep in range(args.reps):
            git_times.append(time_git_log(repo))
            state = root / f"state{rep}"
            state.mkdir()
            seconds, cpu, summary_line = time_backfill(repo, state, args.workers)
            fill_times.append(seconds)
            fill_cpu.append(cpu)
            git_times.append(time_git_log(repo))
            if last_state is not None:
                shutil.rmtree(last_state, ignore_errors=True)
            last_state = state
        assert last_state is not None
        st = stats(repo, last_state)

    git_med, fill_med = statistics.median(git_times), statistics.median(fill_times)
    report = {
        "repo": str(repo), "repo_kind": kind, "commits_reachable": commits, "workers": args.workers,
        "git_log_s": git_times, "backfill_s": fill_times, "backfill_cpu_s": fill_cpu,
        "load_average": os.getloadavg(), "git_log_median_s": git_med, "backfill_median_s": fill_med,
        "ratio": fill_med / git_med, "target_ratio": 15.0,
        "commits_per_s": commits / fill_med, "patch_mb": patch / 1e6, "patch_mb_per_s": patch / 1e6 / fill_med,
        "git_log_patch_mb_per_s": patch / 1e6 / git_med,
        "examples": st["examples"], "commits_by_status": st["commits"], "store_mb": st["store_bytes"] / 1e6,
        "commit_skip_reasons": st["commit_skip_reasons"], "file_skip_reasons": st["file_skip_reasons"],
        "backfill_said": summary_line,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        spread = lambda xs: f"{min(xs):.2f}-{max(xs):.2f} s" if len(xs) > 1 else ""
        print(f"repo {repo} [{kind}]: {commits} commits reachable, {patch / 1e6:.1f} MB of *.rs patch text")
        print(f"  git log -p --all -- '*.rs' : median {git_med:6.2f} s  ({spread(git_times)}, n={len(git_times)})")
        print(f"  gitlora backfill           : median {fill_med:6.2f} s  ({spread(fill_times)}, n={len(fill_times)}, "
              f"workers={args.workers or 'default'})")
        print(f"  backfill CPU (with workers): median {statistics.median(fill_cpu):6.2f} s  ({spread(fill_cpu)})")
        print(f"  ratio                      : {report['ratio']:.1f}x  (target <= 15x)")
        print(f"  load average after         : {' '.join(f'{x:.2f}' for x in report['load_average'])}")
        print(f"  throughput                 : {report['commits_per_s']:.1f} commits/s, "
              f"{report['patch_mb_per_s']:.2f} MB/s of patch text (git log: {report['git_log_patch_mb_per_s']:.1f} MB/s)")
        print(f"  examples {st['examples']}, commits {st['commits']}, store {report['store_mb']:.1f} MB")
        print(f"  skipped commits by reason: {st['commit_skip_reasons'] or 'none'}")
        top = dict(list(st["file_skip_reasons"].items())[:5])
        print(f"  skipped files, top reasons: {top or 'none'}")
        print(f"  backfill said: {summary_line}")
    return 1 if args.max_ratio is not None and report["ratio"] > args.max_ratio else 0


if __name__ == "__main__":
    sys.exit(main())
