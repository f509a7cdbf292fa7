"""The live path: what hooks + a running daemon cost a `git commit`, commit->stored latency, the idle daemon.

    python bench/bench_daemon.py [--commits 200] [--idle-seconds 60] [--json]

Everything runs under a throw-away HOME / XDG_STATE_HOME / XDG_CONFIG_HOME / XDG_DATA_HOME and a short
XDG_RUNTIME_DIR under /tmp (AF_UNIX path limit): the user's daemon, stores and config are never touched.
Training is switched off in that config (train.min_new_shards is huge) so no trainer subprocess competes.

Set-up: two repositories with the same Rust tree (--files, default 1,200 like the user's the-block); `python -m gitlora.daemon daemon` is started;
`install --no-backfill` puts the hooks into one ("hooked") and registers it with the daemon; the other
("plain") has no hooks. Each iteration makes the same "median" change in both (2 Rust files, 1-3 items
modified each, sometimes one added; staged untimed), then:

(a) times each `git commit` (the order of the two alternates per iteration). After the hooked commit the
    bench waits until the daemon has stored it before the next timed commit, so the daemon's ingest never
    overlaps a timed commit of either repo: the ratio is the hooks' cost, as a user committing normally sees
    it. Target: median(hooked) / median(plain) <= 1.10.
(b) that wait is the latency: from `git commit` returning to the commit being in the store, polled every
    2 ms through `Store(readonly=True).has_commit`. Target: p50 <= 250 ms. (The daemon debounces nudges by
    daemon.debounce_ms = 75 ms by default, which is part of this.)
(c) then the daemon sits idle for --idle-seconds: RSS (VmRSS, and VmHWM) from /proc/PID/status, CPU time
    from /proc/PID/stat utime+stime, and /proc/PID/maps must map nothing from torch (libtorch*, */torch/*) or
    transformers. Targets: RSS <= 80 MB, CPU ~ 0.
The daemon is stopped with SIGTERM at the end (and its exit status reported).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_backfill import RustFile  # noqa: E402  (the synthetic Rust generator)

PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


def isolated_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "GITLORA_", "XDG_", "NOTIFY_SOCKET"))}
    home = root / "h"
    env.update({
        "HOME": str(home), "XDG_STATE_HOME": str(home / "state"), "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_DATA_HOME": str(home / "data"), "XDG_RUNTIME_DIR": str(root / "r"), "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
        "GIT_COMMITTER_NAME": "Bench", "GIT_COMMITTER_EMAIL": "bench@example.com",
    })
    (home / "config" / "gitlora").mkdir(parents=True)
    (root / "r").mkdir(mode=0o700)
    (home / ".gitconfig").write_text("[init]\n\tdefaultBranch = main\n[gc]\n\tauto = 0\n")
    (home / "config" / "gitlora" / "config.toml").write_text("[train]\nmin_new_shards = 1000000\n")
    return env


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "gitlora.daemon", *args], capture_output=True, text=True, check=check,
                          cwd=os.environ["HOME"])


class Tree:
    """The same Rust tree and the same sequence of changes, written into any number of work trees."""

    def __init__(self, seed: int, files: int = 40) -> None:
        self.rng = random.Random(seed)
        self.files = [RustFile(self.rng, f"crates/c{i % 95:02d}/src/m{i:04d}.rs", self.rng.randint(6, 16))
                      for i in range(files)]

    def change(self) -> list[RustFile]:
        changed = self.rng.sample(self.files, 2)
        for f in changed:
            f.modify(self.rng, self.rng.randint(1, 3))
            if self.rng.random() < 0.3:
                f.add(self.rng)
        return changed

    @staticmethod
    def write(repo: Path, files: list[RustFile]) -> None:
        for f in files:
            path = repo / f.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f.text())


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15 of the full line)


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def heavy_mappings(pid: int) -> list[str]:
    hits = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(None, 5)
        path = parts[5] if len(parts) == 6 else ""
        if "libtorch" in path or "/torch/" in path or "/transformers/" in path or "/peft/" in path:
            hits.add(path)
    return sorted(hits)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def wait_stored(store_path: Path, oid: bytes, timeout: float = 10.0) -> float | None:
    """Seconds until `oid` is in the store (polled every 2 ms, read-only), or None on timeout."""
    from gitlora.daemon.store import Store, StoreError

    t0 = time.perf_counter()
    store = None
    try:
        while time.perf_counter() - t0 < timeout:
            try:
                if store is None:
                    store = Store(store_path, readonly=True)
                if store.has_commit(oid):
                    return time.perf_counter() - t0
            except Exception as exc:  # map resized by the writer, store not created yet: reopen
                if not isinstance(exc, (StoreError,)) and "lmdb" not in type(exc).__module__:
                    raise
                if store is not None:
                    store.close()
                    store = None
            time.sleep(0.002)
        return None
    finally:
        if store is not None:
            store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commits", type=int, default=200, help="iterations (one commit per repo each)")
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--files", type=int, default=1200,
                    help="Rust files in the work tree (default: the size of the user's repo, ~1,200)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="glb-", dir="/tmp"))  # short: the socket path must fit AF_UNIX
    daemon = None
    report: dict = {"commits": args.commits, "idle_seconds": args.idle_seconds}
    try:
        os.environ.clear()
        os.environ.update(isolated_env(root))
        from gitlora.daemon import paths
        from gitlora.daemon.gitrepo import GitRepo

        tree = Tree(seed=3, files=args.files)
        repos = {name: root / name for name in ("plain", "hooked")}
        for repo in repos.values():
            subprocess.run(["git", "init", "-q", str(repo)], check=True)
            Tree.write(repo, tree.files)
            git(repo, "add", "-A")
            git(repo, "commit", "-q", "-m", "initial tree")

        log = open(root / "daemon.out", "wb")
        daemon = subprocess.Popen([PY, "-m", "gitlora.daemon", "daemon"], stdout=log, stderr=log,
                                  stdin=subprocess.DEVNULL, cwd=os.environ["HOME"], start_new_session=True)
        t0 = time.perf_counter()
        while cli("status", "--json", check=False).returncode != 0:
            if daemon.poll() is not None or time.perf_counter() - t0 > 60:
                raise SystemExit(f"daemon did not come up:\n{(root / 'daemon.out').read_text()}")
            time.sleep(0.1)
        report["daemon_startup_s"] = time.perf_counter() - t0
        cli("install", "--no-backfill", str(repos["hooked"]))
        store_path = paths.RepoPaths.for_git_dir(GitRepo(repos["hooked"]).common_dir).store
        head = bytes.fromhex(git(repos["hooked"], "rev-parse", "HEAD"))
        if wait_stored(store_path, head, timeout=60) is None:
            raise SystemExit(f"the daemon never stored the initial commit:\n{(root / 'daemon.out').read_text()}")

        commit_s: dict[str, list[float]] = {"plain": [], "hooked": []}
        latency: list[float] = []
        timeouts = 0

        for i in range(-3, args.commits):  # 3 warm-up iterations, not recorded
            changed = tree.change()
            for repo in repos.values():
                Tree.write(repo, changed)
                git(repo, "add", "-A")
            order = ["plain", "hooked"] if i % 2 == 0 else ["hooked", "plain"]
            for name in order:
                repo = repos[name]
                t = time.perf_counter()
                subprocess.run(["git", "commit", "-q", "-m", f"change {i}"], cwd=repo, check=True)
                t_return = time.perf_counter()
                if i >= 0:
                    commit_s[name].append(t_return - t)
                if name == "hooked":
                    oid = bytes.fromhex(git(repo, "rev-parse", "HEAD"))
                    waited = wait_stored(store_path, oid)
                    if waited is None:
                        timeouts += 1
                    elif i >= 0:
                        latency.append(time.perf_counter() - t_return)

        status = json.loads(cli("status", "--json").stdout)
        repo_view = status["repos"][0]
        report["daemon_status"] = {k: repo_view.get(k) for k in ("commits_ingested", "commits_skipped", "examples",
                                                                "last_commit", "errors")}

        # (c) idle
        time.sleep(1.0)
        pid = daemon.pid
        cpu0, t0 = proc_cpu_s(pid), time.perf_counter()
        time.sleep(args.idle_seconds)
        cpu1, wall = proc_cpu_s(pid), time.perf_counter() - t0
        report["idle"] = {"seconds": wall, "cpu_s": cpu1 - cpu0, "cpu_share": (cpu1 - cpu0) / wall,
                          "rss_mb": proc_status_kb(pid, "VmRSS") / 1024, "hwm_mb": proc_status_kb(pid, "VmHWM") / 1024,
                          "rss_anon_mb": proc_status_kb(pid, "RssAnon") / 1024,
                          "rss_file_mb": proc_status_kb(pid, "RssFile") / 1024,
                          "threads": proc_status_kb(pid, "Threads"), "heavy_mappings": heavy_mappings(pid)}

        # reference: a bare interpreter that only imports the daemon's modules
        floor = subprocess.run([PY, "-c", "import gitlora.daemon.service, gitlora.daemon.ingest, "
                                "gitlora.daemon.training_jobs, gitlora.daemon.shards; "
                                "print(open('/proc/self/status').read())"], capture_output=True, text=True, check=True)
        report["idle"]["import_floor_rss_mb"] = next(int(l.split()[1]) for l in floor.stdout.splitlines()
                                           if l.startswith("VmRSS:")) / 1024

        daemon.send_signal(signal.SIGTERM)
        t0 = time.perf_counter()
        rc = daemon.wait(timeout=70)
        report["sigterm"] = {"exit_status": rc, "seconds": time.perf_counter() - t0}
        daemon = None
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(root, ignore_errors=True)

    plain, hooked = statistics.median(commit_s["plain"]), statistics.median(commit_s["hooked"])
    report["commit"] = {"plain_median_ms": plain * 1e3, "hooked_median_ms": hooked * 1e3,
                        "plain_mean_ms": statistics.fmean(commit_s["plain"]) * 1e3,
                        "hooked_mean_ms": statistics.fmean(commit_s["hooked"]) * 1e3,
                        "ratio_median": hooked / plain,
                        "ratio_mean": statistics.fmean(commit_s["hooked"]) / statistics.fmean(commit_s["plain"]),
                        "target_ratio": 1.10}
    report["latency"] = {"n": len(latency), "timeouts": timeouts, "p50_ms": pct(latency, 0.5) * 1e3,
                         "p95_ms": pct(latency, 0.95) * 1e3, "max_ms": max(latency) * 1e3, "min_ms": min(latency) * 1e3,
                         "target_p50_ms": 250.0}
    idle = report["idle"]
    ok = {"commit_ratio": report["commit"]["ratio_median"] <= 1.10, "latency_p50": report["latency"]["p50_ms"] <= 250,
          "idle_rss": idle["rss_mb"] <= 80, "idle_cpu": idle["cpu_share"] <= 0.005,
          "no_torch": not idle["heavy_mappings"], "sigterm_exit_0": report["sigterm"]["exit_status"] == 0}
    report["ok"] = ok
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        c, lat = report["commit"], report["latency"]
        print(f"daemon up in {report['daemon_startup_s']:.2f} s; {args.commits} commits per repo, interleaved")
        print(f"(a) git commit: plain median {c['plain_median_ms']:.1f} ms (mean {c['plain_mean_ms']:.1f}), "
              f"hooks+daemon median {c['hooked_median_ms']:.1f} ms (mean {c['hooked_mean_ms']:.1f}) -> "
              f"{c['ratio_median']:.3f}x median, {c['ratio_mean']:.3f}x mean (target <= 1.10x)")
        print(f"(b) commit -> stored: p50 {lat['p50_ms']:.0f} ms, p95 {lat['p95_ms']:.0f} ms "
              f"(min {lat['min_ms']:.0f}, max {lat['max_ms']:.0f}, n={lat['n']}, timeouts {lat['timeouts']}; "
              f"target p50 <= 250 ms)")
        print(f"(c) idle {idle['seconds']:.0f} s: RSS {idle['rss_mb']:.1f} MB (anon {idle['rss_anon_mb']:.1f}, file {idle['rss_file_mb']:.1f}, "
              f"peak {idle['hwm_mb']:.1f}; just importing the daemon's modules: "
              f"{idle['import_floor_rss_mb']:.1f}; target <= 80), "
              f"CPU {idle['cpu_s']:.2f} s ({idle['cpu_share']:.2%}), {idle['threads']} threads, "
              f"torch/transformers mapped: {idle['heavy_mappings'] or 'none'}")
        print(f"    SIGTERM -> exit {report['sigterm']['exit_status']} in {report['sigterm']['seconds']:.2f} s; "
              f"daemon says: {report['daemon_status']['commits_ingested']} commits, "
              f"{report['daemon_status']['examples']} examples, errors {report['daemon_status']['errors'] or 'none'}")
        print("targets: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in ok.items()))
    return 1 if args.check and not all(ok.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
