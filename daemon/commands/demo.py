"""`gitlora demo [--dir DIR]`: the README's main job — the whole product on a freshly built demo repository.

Everything lives under DIR (state, config, socket, tiny model), so the demo never touches a real set-up:
build a Rust repo with a realistic history, start the daemon, `gitlora install` (hooks + backfill), make new
commits and watch them land, run a real LoRA round on the tiny local model, show the promoted adapter, stop.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..demo_repo import build_demo_repo
from ..gitenv import git_env

DEMO_CONFIG = """# written by `gitlora demo`: small numbers so that everything happens within a few minutes
[train]
base_model = "{model}"
min_new_shards = 1
cooldown_s = 0
check_interval_s = 3600
max_steps = {steps}
warmup_steps = 2
learning_rate = 0.001
device = "cpu"

[shards]
shard_size = 8
quiet_flush_s = 2
"""

NEW_COMMITS = [
    ("src/lib.rs", "\npub fn greet(config: &Config) -> String {\n    format!(\"hello, {}\", config.name)\n}\n",
     "Add a greeting for a configured node"),
    ("src/math.rs", "\npub fn mean(values: &[i64]) -> Option<i64> {\n    if values.is_empty() {\n        return None;\n"
     "    }\n    Some(values.iter().sum::<i64>() / values.len() as i64)\n}\n", "Add mean() to math"),
    ("src/net.rs", "\npub fn disconnect(config: &Config) {\n    log_peer!(config.name);\n}\n",
     "Log peers on disconnect"),
]


# Two more commits before the second round: the newest commits move the held-out window on, so the oldest of
# its commits become new training data.
FOLLOW_UPS = [
    ("src/lib.rs", "\npub fn farewell(config: &Config) -> String {\n    format!(\"bye, {}\", config.name)\n}\n",
     "Add a farewell next to the greeting"),
    ("src/math.rs", "\npub fn span(values: &[i64]) -> i64 {\n    values.iter().max().unwrap_or(&0) - "
     "values.iter().min().unwrap_or(&0)\n}\n", "Add span() to math"),
]


def _train_round(repo: Path, number: int) -> dict:
    """`gitlora train --now`, then follow the round in `gitlora status` until it ends."""
    started = _gitlora("train", "--now", str(repo)).stdout
    if "started round" not in started:
        raise SystemExit(f"demo: the daemon did not start round {number}: {started.strip()}")
    last_line = ""

    def round_done():
        nonlocal last_line
        training = ((_status_json().get("repos") or [{}])[0]).get("training") or {}
        active = training.get("round")
        if active and active.get("step"):
            line = f"  round {active['round']}: step {active['step']}/{active['total']}, loss {active['loss']:.4f}"
            if line != last_line:
                print(line, flush=True)
                last_line = line
        last = training.get("last_round")
        return last if not active and last and last.get("round") == number else None

    outcome = _wait(round_done, 900, f"training round {number}", poll=1.0)
    print(f"round {number}: {outcome['outcome']}"
          + (f" ({outcome.get('reason')}: {outcome.get('message')})" if outcome.get("reason") else ""))
    if outcome["outcome"] == "failed":
        raise SystemExit(f"demo: round {number} failed; see its trainer.log under the state dir")
    return outcome


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole product on a demo repository (daemon, hooks, a LoRA round)")
    p.add_argument("--dir", type=Path, default=None, help="where to build everything (kept for you to look at)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of the demo's training round")
    p.set_defaults(run=run)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _gitlora(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    print(f"$ gitlora {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "gitlora.daemon", *args], text=True, capture_output=True)
    sys.stdout.write(done.stdout)
    sys.stdout.write(done.stderr)
    sys.stdout.flush()
    if check and done.returncode != 0:
        raise SystemExit(f"demo: `gitlora {' '.join(args)}` failed with exit code {done.returncode}")
    return done


def _git(repo: Path, *args: str) -> str:
    env = git_env(GIT_AUTHOR_NAME="Demo Dev", GIT_AUTHOR_EMAIL="dev@example.com", GIT_COMMITTER_NAME="Demo Dev",
                  GIT_COMMITTER_EMAIL="dev@example.com")
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


def _status_json() -> dict:
    done = subprocess.run([sys.executable, "-m", "gitlora.daemon", "status", "--json"], text=True,
                          capture_output=True)
    return json.loads(done.stdout) if done.stdout.strip() else {}


def _wait(predicate, timeout: float, what: str, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise SystemExit(f"demo: timed out after {timeout:.0f}s waiting for {what}")


def run(args: argparse.Namespace) -> int:
    base = (args.dir or Path(tempfile.mkdtemp(prefix="gitlora-demo-"))).resolve()
    repo = base / "demo-crate"
    if repo.exists():
        print(f"{repo} already exists: pass an empty --dir")
        return 2
    base.mkdir(parents=True, exist_ok=True)
    # Isolate the demo completely: its own state, config, socket and model.
    os.environ.update(GITLORA_STATE_HOME=str(base / "state"), GITLORA_CONFIG=str(base / "config.toml"),
                      XDG_RUNTIME_DIR=str(base / "run"), XDG_DATA_HOME=str(base / "data"))
    (base / "run").mkdir(mode=0o700, exist_ok=True)

    _banner("1. the tiny local StarCoder2 model the demo trains (built once, loaded via from_pretrained)")
    model_dir = _gitlora("model", "tiny").stdout.splitlines()[0]
    (base / "config.toml").write_text(DEMO_CONFIG.format(model=model_dir, steps=args.steps))

    _banner(f"2. a demo Rust repository with a realistic history in {repo}")
    build_demo_repo(repo)
    print(_git(repo, "log", "--oneline", "--graph", "--all"))

    _banner("3. the daemon (normally a systemd user service: `gitlora service install`)")
    log_file = open(base / "daemon.out", "ab")
    daemon = subprocess.Popen([sys.executable, "-m", "gitlora.daemon", "daemon"], stdout=log_file,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: _status_json().get("ok"), 60, "the daemon to answer")
        print(f"daemon pid {daemon.pid}, log in {base / 'state' / 'daemon.log'}")

        _banner("4. gitlora install: hooks in, history backfilled by the daemon")
        _gitlora("install", str(repo))
        _wait(lambda: (r := _status_json().get("repos")) and r[0]["commits_ingested"] >= 12, 120, "the backfill")
        _gitlora("stats", str(repo))

        _banner("5. new commits: each one is stored within moments of `git commit`")
        for path, addition, message in NEW_COMMITS:
            with open(repo / path, "a", encoding="utf-8") as handle:
                handle.write(addition)
            _git(repo, "commit", "-q", "-am", message)
            oid = _git(repo, "rev-parse", "HEAD")
            print(f"$ git commit -m {message!r}   -> {oid[:10]}")
            _wait(lambda: (r := _status_json().get("repos")) and (r[0].get("last_commit") or {}).get("commit") == oid,
                  60, f"commit {oid[:10]} to be stored", poll=0.05)
        _gitlora("status")
        _gitlora("examples", "--commit", "HEAD", str(repo))

        _banner("6. continual LoRA rounds on the tiny model (a subprocess; the daemon never imports torch)")
        _train_round(repo, 1)
        _gitlora("adapters", "list", "--repo", str(repo))
        for path, addition, message in FOLLOW_UPS:
            with open(repo / path, "a", encoding="utf-8") as handle:
                handle.write(addition)
            _git(repo, "commit", "-q", "-am", message)
            print(f"$ git commit -m {message!r}")
            oid = _git(repo, "rev-parse", "HEAD")
            _wait(lambda: (r := _status_json().get("repos")) and (r[0].get("last_commit") or {}).get("commit") == oid,
                  60, f"commit {oid[:10]} to be stored", poll=0.05)
        _train_round(repo, 2)
        listed = json.loads(subprocess.run([sys.executable, "-m", "gitlora.daemon", "adapters", "list", "--json",
                                            "--repo", str(repo)], capture_output=True, text=True, check=True).stdout)
        if len(listed) >= 2:
            second = listed[-1]["metrics"]
            print(f"round 2 resumed {second.get('parent') or 'a fresh adapter'}, trained on "
                  f"{second.get('examples')} examples of which {second.get('replayed')} replayed from older shards")
        _gitlora("adapters", "list", "--repo", str(repo))
        _gitlora("status")
    finally:
        _banner("7. stopping the daemon (SIGTERM: it finishes its transaction and exits cleanly)")
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log_file.close()
        print(f"daemon exited with {daemon.returncode}")
    print(f"\nEverything stays in {base}: the repo, its store, shards, adapters and logs.")
    return 0
