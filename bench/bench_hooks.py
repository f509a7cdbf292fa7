"""What do gitlora's hooks cost a `git commit`?

Times N `git commit`s (one small change each, interleaved across variants) in a fresh temp repo per variant and prints per-commit ms and the
ratio against the no-hooks baseline (target: <= 1.10x). Also times the post-commit hook script run on its own,
against an empty `sh` script, to show the hook's own cost.

    python bench/bench_hooks.py [--commits 100] [--rounds 3] [--variant NAME ...] [--json] [--max-ratio 1.10]

Variants: no-hooks (the baseline), empty-hook (the floor: a post-commit hook doing nothing), gitlora-hooks.

Variants are context managers keyed by name in VARIANTS: `setup(repo)` prepares the repo (install hooks, start
something) and cleans up on exit. Add one (e.g. a running daemon) with `register_variant`, or from another
script: `import bench_hooks; bench_hooks.register_variant("daemon", my_cm); bench_hooks.main()`.
Everything runs under a throw-away HOME / XDG_STATE_HOME, never the user's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from gitlora.daemon.gitenv import git_env

Variant = Callable[[Path], contextlib.AbstractContextManager[None]]
VARIANTS: dict[str, Variant] = {}


def register_variant(name: str, setup: Variant) -> None:
    VARIANTS[name] = setup


@contextlib.contextmanager
def _no_hooks(repo: Path) -> Iterator[None]:
    yield


@contextlib.contextmanager
def _gitlora_hooks(repo: Path) -> Iterator[None]:
    from gitlora.hooks.install import install, uninstall

    install(repo)
    try:
        yield
    finally:
        uninstall(repo)


@contextlib.contextmanager
def _empty_hook(repo: Path) -> Iterator[None]:
    """The floor: a post-commit hook that does nothing (what spawning any hook at all costs)."""
    hook = Path(subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-path", "hooks/post-commit"],
                               cwd=repo, check=True, capture_output=True, text=True).stdout.strip())
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    yield


register_variant("no-hooks", _no_hooks)
register_variant("empty-hook", _empty_hook)
register_variant("gitlora-hooks", _gitlora_hooks)


def _isolated_env(root: Path) -> None:
    home = root / "home"
    home.mkdir()
    for var in {*os.environ} - {*git_env(keep=())} | {"GITLORA_STATE_HOME"}:  # every GIT_*: git set up below
        os.environ.pop(var, None)
    os.environ.update({
        "HOME": str(home),
        "XDG_STATE_HOME": str(home / ".local/state"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
        "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "bench@example.com",
    })
    (home / ".gitconfig").write_text("[init]\n\tdefaultBranch = main\n[gc]\n\tauto = 0\n")


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, stdout=subprocess.DEVNULL)


def _commit_once(repo: Path, i: int) -> float:
    """One small change, staged untimed; returns the seconds the `git commit` itself took."""
    (repo / "src.rs").write_text(f"pub fn f() -> u32 {{ {i} }}\n")
    _git(repo, "add", "src.rs")
    t0 = time.perf_counter()
    _git(repo, "commit", "-q", "-m", f"change {i}")
    return time.perf_counter() - t0


def _new_repo(root: Path, name: str) -> Path:
    repo = root / f"repo-{name}-{time.monotonic_ns()}"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "README.md").write_text("bench\n")
    _git(repo, "add", "README.md")
    _git(repo, "commit", "-q", "-m", "init")
    return repo


def bench_round(root: Path, names: list[str], n: int) -> dict[str, list[float]]:
    """One fresh repo per variant; commits interleaved across variants so machine noise hits all alike."""
    with contextlib.ExitStack() as stack:
        repos = {}
        for name in names:
            repos[name] = _new_repo(root, name)
            stack.enter_context(VARIANTS[name](repos[name]))
        for i in range(3):  # warm-up
            for repo in repos.values():
                _commit_once(repo, -1 - i)
        out: dict[str, list[float]] = {name: [] for name in names}
        for i in range(n):
            for name in names:
                out[name].append(_commit_once(repos[name], i))
        return out


def time_hook_alone(root: Path, n: int) -> dict[str, float]:
    """Run the installed post-commit hook directly vs an empty sh script (ms per run, median)."""
    from gitlora.hooks.install import install

    repo = root / "repo-hook-alone"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    _git(repo, "commit", "-q", "--allow-empty", "-m", "init")
    result = install(repo)
    empty = root / "empty-hook"
    empty.write_text("#!/bin/sh\nexit 0\n")
    empty.chmod(0o755)

    def median_ms(cmd: list[str]) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=repo, check=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    return {
        "post_commit_hook_ms": median_ms([str(result.hooks_dir / "post-commit")]),
        "empty_sh_ms": median_ms([str(empty)]),
        "spool_lines": float(len(result.spool.read_text().splitlines())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="alternate the variants this many times")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS),
                        help="variants to run (default: all); the first is the baseline")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--max-ratio", type=float, default=None,
                        help="exit 1 if a variant's median ratio to the baseline exceeds this (e.g. 1.10)")
    args = parser.parse_args(argv)
    names = args.variant or list(VARIANTS)

    with tempfile.TemporaryDirectory(prefix="gitlora-bench-") as tmp:
        root = Path(tmp)
        _isolated_env(root)
        per: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name, times in bench_round(root, names, args.commits).items():
                per[name] += times
        alone = time_hook_alone(root, max(50, args.commits))

    base = names[0]
    report = {"commits_per_round": args.commits, "rounds": args.rounds, "baseline": base, "variants": {},
              "hook_alone": alone}
    for name in names:
        times = per[name]
        report["variants"][name] = {
            "mean_ms": statistics.fmean(times) * 1e3,
            "median_ms": statistics.median(times) * 1e3,
            "ratio_mean": statistics.fmean(times) / statistics.fmean(per[base]),
            "ratio_median": statistics.median(times) / statistics.median(per[base]),
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.commits} commits x {args.rounds} rounds, baseline {base!r}")
        for name, r in report["variants"].items():
            print(f"  {name:16s} mean {r['mean_ms']:7.2f} ms  median {r['median_ms']:7.2f} ms  "
                  f"ratio {r['ratio_mean']:.3f}x (median {r['ratio_median']:.3f}x)")
        print(f"  post-commit hook run alone: {alone['post_commit_hook_ms']:.2f} ms "
              f"(empty sh script: {alone['empty_sh_ms']:.2f} ms)")
    worst = max(r["ratio_median"] for r in report["variants"].values())
    return 1 if args.max_ratio is not None and worst > args.max_ratio else 0


if __name__ == "__main__":
    sys.exit(main())
