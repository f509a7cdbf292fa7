"""Learning benchmark: does the live loop make the model better at the user's *future* code?

    python bench/bench_learning.py --repo PATH --corpus DIR... [--json] [--seed N]
    python bench/bench_learning.py --repo PATH --base-model DIR --device cuda [--json]   (a real model, a GPU)

1. Base. Without `--base-model`, a tiny StarCoder2 is pretrained (all parameters, StarCoder2's repository-level
   format with FIM) on `--corpus` (public Rust repositories that are NOT the target) for a fixed CPU budget,
   cached by a hash of the corpus and the settings (bench/pretrain_tiny.py). A random base would make any
   adapter look good.
2. The live path. A fresh clone of `--repo`; its first-parent history is cut by time into an oldest part
   (backfilled, as `gitlora install` does), a middle part and the newest part (`--test-share`, default 10 %). A
   real daemon runs under a throw-away HOME with scaled-down thresholds (a round as soon as one new shard
   exists, no cool-down, short flush and check intervals, a per-round step cap); gitlora's hooks are installed
   and the branch is moved forward through the middle part one first-parent commit at a time
   (`git merge --ff-only`, a pull as a developer makes it), `--pace-s` apart, each waited for in the store. The
   daemon's scheduler runs real rounds through its real gate. The newest part is never ingested.
3. The snapshot recipe (what repository fine-tuning recipes do): a LoRA with the same settings and the same
   number of optimizer steps as the final adapter's lineage, trained by gitlora's trainer on fill-in-the-middle
   examples cut from whole .rs files of the repository as of the end of the middle part.
4. Evaluation on the test commits (non-merge commits of the newest part; examples extracted with the daemon's
   own CommitProcessor), paired on the same examples: base, base again (A/A: the noise floor of evaluation),
   the final `current` adapter, the snapshot recipe (per seed), and copying the old version. Metrics:
   target-token loss, changed-token loss (target tokens not copied from the `before` version, found by aligning
   token ids) in the edit rendering and in the FIM one (the same items' real-file fill-in-the-middle tasks,
   the middle the target: what an editor asks; evaluate.prepare_fim_losses), and fill-in-the-middle completion
   (greedy, up to 64 tokens) scored by exact match and normalised edit similarity; 95 % intervals by bootstrap
   over commits. Forgetting: the final adapter against
   the first promoted one on an older slice (commits of the backfilled part).

Everything runs under a temporary directory; the user's own gitlora state is never touched. Prints a table;
with --json, one JSON object last on stdout. CPU time (this process and all its children, daemon and trainers
included) is reported beside wall time, since a shared machine inflates the latter.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_daemon  # noqa: E402  (its isolated environment)
import pretrain_tiny  # noqa: E402


PY = sys.executable
# The product's learning rate (trainer/spec.py) is set for billion-parameter models; a LoRA of the same rank on
# the few-million-parameter base pretrained here learns far more slowly at it. Chosen by measurement on
# the-block (bench/README.md, "Learning rate of the tiny base").
TINY_LEARNING_RATE = 3e-3


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ environment
def isolated_env(root: Path, threads: int) -> dict[str, str]:
    """bench_daemon's throw-away HOME / XDG dirs, with the trainer's thread count pinned."""
    env = bench_daemon.isolated_env(root)
    env.update({"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"})
    return env


def git(repo: Path, *args: str, env=None, check: bool = True) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=check, capture_output=True, text=True,
                          env=env).stdout.strip()


def daemon_config(args, base_model: str) -> tuple[str, list[str]]:
    """config.toml with the scaled-down thresholds; keys the installed schema lacks are left out (the schema
    moves with issue 11: the window settings replace eval_fraction), and listed in the report."""
    from gitlora.daemon import config as cfg

    wanted = {
        "shards": {"quiet_flush_s": args.quiet_flush_s, "eval_fraction": args.eval_fraction},
        "train": {"base_model": base_model, "min_new_examples": args.min_new_examples, "cooldown_s": 0,
                  "check_interval_s": 5, "max_steps": args.round_steps, "max_round_s": args.max_round_s,
                  "learning_rate": args.learning_rate, "context_length": args.context,
                  "device": args.device, "max_retry_backoff_s": 30,
                  # the held-out window and older slice, scaled to a live part of tens of commits
                  "window_commits": args.window_commits, "window_examples": args.window_examples,
                  "older_slice_commits": args.older_slice_commits, "eval_max_examples": args.round_eval_max,
                  "fim_samples": args.round_fim_samples},
    }
    for item in args.train_set or []:
        key, _, value = item.partition("=")
        wanted["train"][key] = json.loads(value)
    lines, dropped = [], []
    for section, values in wanted.items():
        fields = getattr(cfg.Config.model_fields[section].annotation, "model_fields", {})
        lines.append(f"[{section}]")
        for key, value in values.items():
            if key not in fields:
                dropped.append(f"{section}.{key}")
                continue
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n", dropped


class Daemon:
    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.out = open(root / "daemon.out", "wb")
        self.proc = subprocess.Popen([PY, "-m", "gitlora.daemon", "daemon"], stdout=self.out, stderr=self.out,
                                     stdin=subprocess.DEVNULL, cwd=env["HOME"], env=env, start_new_session=True)
        t0 = time.monotonic()
        while self.cli("status", "--json", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() - t0 > 120:
                raise SystemExit(f"daemon did not come up:\n{(root / 'daemon.out').read_text()[-3000:]}")
            time.sleep(0.2)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "gitlora.daemon", *args], capture_output=True, text=True, check=check,
                              cwd=self.env["HOME"], env=self.env)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(180)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.out.close()


# ------------------------------------------------------------------------------------------------ the live path
def repo_state(clone: Path, env: dict[str, str]):
    """The daemon's per-repository paths for the clone (read under the isolated XDG_STATE_HOME)."""
    old = dict(os.environ)
    os.environ.update({k: env[k] for k in ("HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME")})
    try:
        from gitlora.daemon import paths
        from gitlora.daemon.gitrepo import GitRepo

        return paths.RepoPaths.for_git_dir(GitRepo(clone).common_dir)
    finally:
        os.environ.clear()
        os.environ.update(old)


def stored(store_dir: Path, oid: str) -> bool:
    from gitlora.daemon.store import Store, StoreError

    if not (store_dir / "data.mdb").exists():
        return False
    try:
        with Store(store_dir, readonly=True) as store:
            return store.has_commit(bytes.fromhex(oid))
    except StoreError:
        return False


def commits_with_examples(store_dir: Path, oids) -> set[str]:
    """Which of these stored commits hold examples (a commit without Rust changes has none, and no round will
    ever train it: the drain must not wait for it)."""
    from gitlora.daemon.store import Store

    with Store(store_dir, readonly=True) as store:
        return {oid for oid in oids if ((store.get_commit(bytes.fromhex(oid)) or {}).get("examples") or 0) > 0}


def wait_for(pred, timeout: float, what: str, poll: float = 0.25) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - t0


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def shard_commits(paths) -> set[str]:
    out = set()
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                out.update(json.loads(line)["commit"] for line in f if line.strip())
        except (OSError, ValueError, KeyError):
            pass
    return out


def rounds_report(rp, live: set[str]) -> list[dict]:
    """Every round the daemon ran: outcome, steps, data (how many of its new and held-out commits are live
    ones, i.e. from the middle part), from rounds/NNNN and adapters/vNNNN."""
    out = []
    for d in sorted(p for p in rp.rounds.iterdir() if p.is_dir()) if rp.rounds.is_dir() else []:
        events = []
        for line in (d / "progress.jsonl").read_text().splitlines() if (d / "progress.jsonl").exists() else []:
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        start = next((e for e in events if e.get("event") == "start"), {})
        done = next((e for e in events if e.get("event") == "done"), None)
        error = next((e for e in events if e.get("event") == "error"), None)
        spec = read_json(d / "spec.json", {}) or {}
        trained, held = shard_commits(spec.get("train_shards") or []), shard_commits(spec.get("eval_shards") or [])
        metrics = read_json(rp.adapters / done["version"] / "metrics.json", {}) if done else {}
        gate = metrics.get("gate")
        out.append({
            "round": int(d.name), "phase": "middle" if trained & live else "backfill",
            "new_commits": len(trained), "new_live_commits": len(trained & live),
            "eval_commits": len(held), "eval_live_commits": len(held & live),
            "outcome": ("promoted" if done.get("promoted") else "kept current") if done else
                       ("failed: " + (error or {}).get("reason", "unknown") if error else "running/unknown"),
            "version": (done or {}).get("version"), "parent": (done or {}).get("parent"),
            "steps": metrics.get("steps"), "examples": start.get("examples"), "replayed": start.get("replayed"),
            "eval_examples": start.get("eval_examples"), "eval_before": (done or {}).get("eval_loss_before"),
            "eval_after": (done or {}).get("eval_loss_after"),
            "gate": gate if isinstance(gate, str) else (gate or {}).get("reason") if isinstance(gate, dict) else gate,
            "time_s": metrics.get("time_s"), "commits": (metrics.get("data") or {}).get("commits"),
        })
    return out


def lineage(adapters: Path) -> list[str]:
    """Versions from the first ancestor to `current` (each one's parent recorded in its metrics.json)."""
    cur = os.readlink(adapters / "current") if (adapters / "current").is_symlink() else None
    chain = []
    while cur:
        chain.append(cur)
        cur = (read_json(adapters / cur / "metrics.json", {}) or {}).get("parent")
    return chain[::-1]


# -------------------------------------------------------------------------------------------------- examples
def commit_examples(clone: Path, oids: list[str]) -> dict[str, list[dict]]:
    """The daemon's own extraction (CommitProcessor) for these commits, outside any store."""
    from gitlora.daemon.config import IngestConfig
    from gitlora.daemon.gitrepo import GitRepo
    from gitlora.daemon.ingest import CommitProcessor

    cfg = IngestConfig()
    proc = CommitProcessor(GitRepo(clone, exclude=cfg.exclude), cfg, source="bench")
    out = {}
    for pending in proc.process(oids):
        exs = [json.loads(e) if isinstance(e, (bytes, str)) else e for e in pending.examples]
        exs = [e for e in exs if e.get("change_kind") != "deleted" and (e.get("after") or "").strip()]
        if exs:
            out[pending.oid.hex()] = exs
    return out


def sample_examples(by_commit: dict[str, list[dict]], per_commit: int, total: int, seed: int) -> list[dict]:
    """At most `per_commit` examples of each commit (a huge refactor must not be the whole set), then at most
    `total`, whole commits kept together; deterministic."""
    rng = random.Random(seed)
    commits = sorted(by_commit)
    rng.shuffle(commits)
    out = []
    for c in commits:
        exs = list(by_commit[c])
        rng.shuffle(exs)
        take = exs[:per_commit]
        if out and len(out) + len(take) > total:
            break
        out += take
    return out


def snapshot_records(clone: Path, rev: str, repo_name: str, chunk_lines: int) -> list[dict]:
    """Whole .rs files at `rev`, cut into chunks, as example records the trainer renders (with fim_share 1.0)."""
    from gitlora.daemon.config import IngestConfig

    exclude = IngestConfig().exclude
    tree = git(clone, "ls-tree", "-r", "-z", "--name-only", rev).split("\0")
    paths = [p for p in tree if p.endswith(".rs") and not any(fnmatch.fnmatch(p, g) for g in exclude)]
    out = []
    for path in paths:
        r = subprocess.run(["git", "cat-file", "blob", f"{rev}:{path}"], cwd=clone, capture_output=True)
        if r.returncode != 0 or len(r.stdout) > pretrain_tiny.MAX_FILE_BYTES:
            continue
        try:
            lines = r.stdout.decode("utf-8").splitlines(keepends=True)
        except UnicodeDecodeError:
            continue
        for k in range(0, len(lines), chunk_lines):
            chunk = "".join(lines[k:k + chunk_lines])
            if chunk.strip():
                out.append({"repo": repo_name, "commit": rev, "commit_time": 0, "message": "", "path": path,
                            "kind": "file", "qualified_name": f"{path}:{k + 1}", "change_kind": "added",
                            "before": None, "after": chunk, "imports": []})
    return out


# ------------------------------------------------------------------------------------------------ evaluation
def copy_prediction(before: str, after: str, middle: str) -> str:
    """What copying the old version gives for a FIM middle: the `before` text between the nearest characters
    around the middle that the old and new versions share (rapidfuzz's Indel alignment)."""
    from rapidfuzz.distance import Indel

    start = after.find(middle)
    if not before or start < 0:
        return ""
    end = start + len(middle)
    left, right = -1, len(before)  # positions in `before` of the shared characters around [start, end)
    for op in Indel.opcodes(before, after):
        if op.tag != "equal":
            continue
        for k in range(op.dest_end - op.dest_start):
            d, src = op.dest_start + k, op.src_start + k
            if d < start:
                left = src
            elif d >= end:
                right = min(right, src)
                break
    return before[left + 1:right] if right > left else ""


def copy_baseline(evalset, seed: int) -> list:
    """FIM scores of copying the old version, item by item with the eval set's FIM items (the records that
    render a FIM task, in evaluation order, as evaluate.prepare takes them)."""
    from gitlora.trainer import data, metrics

    tasks = [(ex, t) for ex in evalset.records if (t := data.render_fim(ex, seed)) is not None][:len(evalset.fim)]
    return [metrics.fim_score(item.commit, copy_prediction(ex.get("before") or "", ex.get("after") or "",
                                                           item.reference), item.reference)
            for item, (ex, _) in zip(evalset.fim, tasks)]


class Models:
    """The base loaded once, as a round loads it (trainer.round.load_base with the round's plan), and each
    adapter put on it in turn as a named peft adapter; the base's numbers come from the same weights with the
    adapter disabled. Scored with the product's own evaluation (trainer/evaluate.py)."""

    def __init__(self, base_dir: str, device: str, context: int):
        import torch

        from gitlora.trainer import round as rnd
        from gitlora.trainer.spec import DEFAULTS

        self.torch = torch
        self.plan = rnd.round_plan(base_dir, {**DEFAULTS, "device": device, "context_length": context})
        self.device = torch.device(self.plan.device)
        self.model = rnd.load_base(base_dir, self.plan, torch)
        self.model.eval()
        self.names: dict[str, str] = {}

    def scores(self, adapter: str | None, evalset, tokenizer):
        from gitlora.trainer import evaluate

        if adapter is None:
            if not self.names:
                return evaluate.evaluate(self.model, tokenizer, evalset, 8, self.torch, self.device)
            with self.model.disable_adapter():
                return evaluate.evaluate(self.model, tokenizer, evalset, 8, self.torch, self.device)
        key = str(Path(adapter).resolve())
        if key not in self.names:
            name = f"a{len(self.names)}"
            if not self.names:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.model, key, adapter_name=name)
            else:
                self.model.load_adapter(key, adapter_name=name)
            self.names[key] = name
            self.model.eval()
        self.model.set_adapter(self.names[key])
        return evaluate.evaluate(self.model, tokenizer, evalset, 8, self.torch, self.device)


def rel(est) -> dict:
    """A metrics.Estimate of a relative loss change as the report writes it."""
    return {"changed_loss_rel": est.value, "ci95_low": est.low, "ci95_high": est.high, "commits": est.commits}


def split_half(losses: list, seed: int = 0) -> float:
    """Unpaired: base changed-token loss on a random half of the test commits vs the other half, i.e. how
    much *which* commits land in a test set moves an unpaired number."""
    from gitlora.trainer import metrics

    commits = sorted({x.commit for x in losses})
    random.Random(seed).shuffle(commits)
    half = set(commits[: len(commits) // 2])
    a = metrics.summarize([x for x in losses if x.commit in half], [])["changed_loss"]
    b = metrics.summarize([x for x in losses if x.commit not in half], [])["changed_loss"]
    return a / b - 1


# ------------------------------------------------------------------------------------------------------ main
def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def phase_timer(phases: dict):
    """`phase(name, since) -> now`: records and logs the wall and CPU seconds of a phase that began at `since`
    (a (wall, cpu) pair) into `phases`."""
    def phase(name: str, since: tuple[float, float]) -> tuple[float, float]:
        now = (time.time(), cpu_seconds())
        phases[name] = {"wall_s": round(now[0] - since[0], 1), "cpu_s": round(now[1] - since[1], 1)}
        log(f"{name}: {phases[name]['wall_s']} s wall, {phases[name]['cpu_s']} CPU-s")
        return now
    return phase


def base_model_dir(args) -> tuple[str, dict | None]:
    """The base: `--base-model DIR`, else the tiny one pretrained on `--corpus` (cached). (dir, its metadata)."""
    if args.base_model:
        return args.base_model, None
    path, meta = pretrain_tiny.pretrain(args.corpus, cache_dir=args.cache_dir, cpu_budget_s=args.pretrain_cpu_s,
                                        threads=args.threads, log=log)
    return str(path), meta


def train_snapshot(root: Path, env, base_dir: str, records: list[dict], steps: int, seed: int, args) -> Path:
    """The snapshot recipe through gitlora's own trainer: same LoRA settings, `steps` optimizer steps."""
    work = root / f"snapshot-s{seed}"
    work.mkdir()
    shard = work / "000001.jsonl"
    shard.write_text("".join(json.dumps(r) + "\n" for r in records))
    train = {"max_steps": steps, "context_length": args.context, "device": args.device, "fim_share": 1.0,
             "replay_share": 0.0, "seed": seed, "learning_rate": args.learning_rate}
    for item in args.train_set or []:
        key, _, value = item.partition("=")
        train[key] = json.loads(value)
    spec = {"base_model": base_dir, "adapters_dir": str(work / "adapters"), "train_shards": [str(shard)],
            "replay_shards": [], "eval_shards": [], "progress_file": str(work / "progress.jsonl"), "train": train}
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    with open(work / "trainer.log", "wb") as out:
        code = subprocess.run([PY, "-m", "gitlora.trainer", "--spec", str(work / "spec.json")], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=work).returncode
    if code != 0:
        raise SystemExit(f"snapshot training failed (exit {code}): {(work / 'trainer.log').read_text()[-2000:]}")
    return work / "adapters" / "current"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True, help="the target repository (a git dir or checkout)")
    ap.add_argument("--corpus", type=Path, nargs="+", default=[], help="Rust repositories to pretrain on")
    ap.add_argument("--base-model", default=None, help="a real base model dir (skips pretraining)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="evaluation sampling and the first snapshot seed")
    ap.add_argument("--snapshot-seeds", type=int, default=1, help="training seeds of the snapshot recipe (each costs "
                    "as many steps as the lineage; 2 shows the recipe's own seed noise)")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--pretrain-cpu-s", type=float, default=600.0, help="pretraining budget in CPU seconds (the "
                    "base bench/README.md's runs use; cached by corpus and settings)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--test-share", type=float, default=0.10, help="newest share of first-parent commits: test")
    ap.add_argument("--middle-share", type=float, default=0.10, help="share committed one by one, live")
    ap.add_argument("--middle-commits", type=int, default=0, help="cap on live first-parent steps (0: none)")
    ap.add_argument("--pace-s", type=float, default=8.0, help="seconds between live commits (> quiet flush)")
    ap.add_argument("--burst", type=int, default=1, help="live commits per burst (0.5 s apart, so they flush "
                    "together); bursts are --pace-s apart")
    ap.add_argument("--quiet-flush-s", type=int, default=3)
    ap.add_argument("--eval-fraction", type=float, default=0.002, help="[shards] eval_fraction, where it exists")
    ap.add_argument("--round-steps", type=int, default=0, help="[train] max_steps per round (0: one epoch of the "
                    "round's data, bounded by --max-round-s)")
    ap.add_argument("--max-round-s", type=float, default=210.0, help="[train] max_round_s: a round's time budget; "
                    "a bigger backlog trains newest first over several rounds")
    ap.add_argument("--learning-rate", type=float, default=None, help="[train] learning_rate (default: "
                    f"{TINY_LEARNING_RATE} for the pretrained tiny base, the product's default for --base-model)")
    ap.add_argument("--min-new-examples", type=int, default=100, help="[train] min_new_examples: a round is due")
    ap.add_argument("--window-commits", type=int, default=8, help="[train] window_commits (held out)")
    ap.add_argument("--window-examples", type=int, default=60, help="[train] window_examples (held out)")
    ap.add_argument("--older-slice-commits", type=int, default=8, help="[train] older_slice_commits")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-set", action="append", metavar="KEY=JSON", help="extra [train] setting (repeatable)")
    ap.add_argument("--drain-timeout-s", type=float, default=900.0, help="wait this long for rounds after the "
                    "last live commit")
    ap.add_argument("--eval-per-commit", type=int, default=8)
    ap.add_argument("--eval-max", type=int, default=160)
    ap.add_argument("--fim-samples", type=int, default=24)
    ap.add_argument("--round-eval-max", type=int, default=128, help="[train] eval_max_examples: the rounds' own "
                    "window and older-slice samples (their gate); --eval-max is the test set's")
    ap.add_argument("--round-fim-samples", type=int, default=8, help="[train] fim_samples of the rounds")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    if args.learning_rate is None:
        from gitlora.trainer.spec import DEFAULTS

        args.learning_rate = DEFAULTS["learning_rate"] if args.base_model else TINY_LEARNING_RATE
    if not args.base_model and not args.corpus:
        ap.error("give --corpus DIR... to pretrain a base, or --base-model DIR")

    t_wall, t_cpu = time.time(), cpu_seconds()
    phases: dict[str, dict] = {}
    phase = phase_timer(phases)

    import torch

    torch.set_num_threads(args.threads)
    mark = (t_wall, t_cpu)
    base_dir, base_meta = base_model_dir(args)
    mark = phase("pretrain", mark)

    root = Path(tempfile.mkdtemp(prefix="glL-", dir="/tmp"))  # short: the socket path must fit AF_UNIX
    env = isolated_env(root, args.threads)
    daemon = None
    try:
        # ---- the clone, its history cut by time (first-parent order)
        name = pretrain_tiny.repo_label(args.repo).split("/")[-1]
        clone = root / name
        subprocess.run(["git", "clone", "-q", "--no-tags", "--single-branch", "--no-checkout", str(args.repo),
                        str(clone)], check=True, env=env, capture_output=True)
        head = git(clone, "rev-parse", "HEAD")
        fp = git(clone, "rev-list", "--first-parent", "--reverse", head).split()
        n = len(fp)
        n_test = max(1, round(args.test_share * n))
        n_mid = max(1, round(args.middle_share * n))
        if args.middle_commits:
            n_mid = min(n_mid, args.middle_commits)
        start_mid = n - n_test - n_mid
        backfill_end, middle, middle_end = fp[start_mid - 1], fp[start_mid:n - n_test], fp[n - n_test - 1]
        # Only `main` may point into history: a stray ref (the clone's own branch, origin/*) would hand the
        # daemon the future. A sparse checkout of nothing: merges update refs and index, no files (a partial
        # clone lacks a few blobs, and the daemon reads objects, not the work tree).
        git(clone, "config", "core.sparseCheckout", "true", env=env)
        (clone / ".git" / "info").mkdir(exist_ok=True)
        (clone / ".git" / "info" / "sparse-checkout").write_text("/.gitlora-bench-nothing\n")
        git(clone, "checkout", "-q", "-B", "main", backfill_end, env=env)
        for ref in git(clone, "for-each-ref", "--format=%(refname)").split():
            if ref != "refs/heads/main":
                git(clone, "update-ref", "-d", ref, env=env)
        git(clone, "remote", "remove", "origin", env=env, check=False)
        test_commits = git(clone, "rev-list", "--no-merges", f"{middle_end}..{head}").split()
        cut = {"first_parent": n, "backfill": start_mid, "middle": len(middle), "test": n_test,
               "test_commits_non_merge": len(test_commits),
               "backfill_end": backfill_end, "middle_end": middle_end, "head": head,
               "dates": {k: git(clone, "log", "-1", "--format=%cI", v) for k, v in
                         (("backfill_end", backfill_end), ("middle_end", middle_end), ("head", head))}}
        log(f"history: {n} first-parent commits -> backfill {start_mid}, live {len(middle)}, test {n_test} "
            f"({len(test_commits)} non-merge commits)")

        # ---- daemon, install, backfill
        config_text, dropped = daemon_config(args, base_dir)
        (root / "h" / "config" / "gitlora" / "config.toml").write_text(config_text)
        if dropped:
            log(f"settings this schema lacks (left out): {', '.join(dropped)}")
        daemon = Daemon(root, env)
        daemon.cli("install", "--no-backfill", str(clone))
        rp = repo_state(clone, env)
        bf = daemon.cli("backfill", "--no-progress", str(clone), check=False)
        log(f"backfill: {(bf.stdout + bf.stderr).strip().splitlines()[-1] if (bf.stdout + bf.stderr).strip() else bf.returncode}")
        wait_for(lambda: stored(rp.store, backfill_end), 300, "the backfill")
        mark = phase("clone+backfill", mark)

        # ---- the live middle part: one first-parent step at a time, through hooks and the daemon
        for k, oid in enumerate(middle):
            git(clone, "merge", "--ff-only", "-q", oid, env=env)
            wait_for(lambda: stored(rp.store, oid), 300, f"commit {oid[:10]} in the store")
            state = read_json(rp.rounds / "state.json", {}) or {}
            if k % 5 == 0 or k == len(middle) - 1:
                log(f"live {k + 1}/{len(middle)}: {oid[:10]} stored; rounds so far {state.get('rounds', 0)}"
                    f"{' (one running)' if state.get('active') else ''}")
            time.sleep(args.pace_s if (k + 1) % args.burst == 0 else 0.5)
        mark = phase("live", mark)

        # ---- drain: let the scheduler train the middle part (bounded). Done when every live commit is trained,
        # held out in the window or a duplicate, and no round with live commits is running; or when the scheduler
        # has gone idle (what is left is below min_new_examples). Older backlog (history deferred by the rounds'
        # step cap, newest first) may still be training then: it is not what this benchmark waits for.
        live = set(git(clone, "rev-list", f"{backfill_end}..{middle_end}").split())  # commits of the middle part
        live_trainable = commits_with_examples(rp.store, live)  # every live commit is stored by now

        def latest_spec() -> dict:
            specs = sorted(rp.rounds.glob("[0-9]*/spec.json")) if rp.rounds.is_dir() else []
            return (read_json(specs[-1], {}) or {}) if specs else {}

        def quiet() -> bool:
            s = read_json(rp.rounds / "state.json", {}) or {}
            return not s.get("active") or not (live & set(latest_spec().get("new_commits") or []))

        def live_left() -> set[str]:
            s = read_json(rp.rounds / "state.json", {}) or {}
            facts = [c for sh in (read_json(rp.root / "manifest.json", {}) or {}).get("shards", [])
                     for c in sh.get("commits") or []]
            done = set(s.get("trained") or {}) | set(latest_spec().get("window_commits") or [])
            return live_trainable - done - {c["commit"] for c in facts if c.get("duplicate")}

        stable_since, last_rounds, t0 = None, None, time.monotonic()
        while time.monotonic() - t0 < args.drain_timeout_s:
            s = read_json(rp.rounds / "state.json", {}) or {}
            if quiet() and not live_left():
                break
            if not s.get("active") and s.get("rounds") == last_rounds:
                stable_since = stable_since or time.monotonic()
                if time.monotonic() - stable_since > 3 * 5 + args.quiet_flush_s:
                    break
            else:
                stable_since, last_rounds = None, s.get("rounds")
            time.sleep(1)
        drained = quiet()
        status = daemon.cli("status", "--json", check=False).stdout
        manifest = read_json(rp.root / "manifest.json", {}) or {}
        state = read_json(rp.rounds / "state.json", {}) or {}
        trained = set(state.get("trained") or {})  # commit -> round (the commit-level round state)
        facts = [c for s in manifest.get("shards", []) for c in s.get("commits") or []]
        duplicates = {c["commit"] for c in facts if c.get("duplicate")}
        repo_view = next(iter((json.loads(status or "{}").get("repos") or [{}])), {})
        shard_facts = {"train": len(manifest.get("shards", [])),
                       "live_commits": len(live),
                       "live_commits_without_examples": len(live - live_trainable),
                       "live_commits_trained": len(live & trained),
                       "live_commits_never_trained": len(live_trainable - trained - duplicates),
                       "live_duplicates": len(live & duplicates),
                       "window_commits": ((repo_view.get("training") or {}).get("next_round") or {}).get(
                           "window_commits"),
                       "examples_never_trained": sum(c.get("examples", 0) for c in facts
                                                     if c["commit"] not in trained and c["commit"] not in duplicates),
                       "groups": len({s["group"] for s in manifest.get("shards", [])})}
        daemon.stop()
        daemon = None
        rounds = rounds_report(rp, live)
        mark = phase("drain", mark)
        chain = lineage(rp.adapters)
        current = str(rp.adapters / chain[-1]) if chain else None
        first = next((str(rp.adapters / v) for v in chain), None)
        lineage_steps = sum((read_json(rp.adapters / v / "metrics.json", {}) or {}).get("steps") or 0 for v in chain)
        log(f"rounds: {len(rounds)} ({sum(r['phase'] == 'middle' for r in rounds)} in the live part), "
            f"promoted {sum(r['outcome'] == 'promoted' for r in rounds)}; current {chain[-1] if chain else None}, "
            f"lineage {chain} = {lineage_steps} steps")

        # ---- the snapshot recipe at the same budget
        snaps = []
        if lineage_steps:
            from gitlora.daemon.gitrepo import GitRepo

            records = snapshot_records(clone, middle_end, GitRepo(clone).name, chunk_lines=40)
            for s in range(args.snapshot_seeds):
                snaps.append(str(train_snapshot(root, env, base_dir, records, lineage_steps, args.seed + s, args)))
            mark = phase("snapshot", mark)

        # ---- evaluation, paired on the same examples, with the product's own evaluation and metrics
        from transformers import AutoTokenizer

        from gitlora.trainer import evaluate, metrics

        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        test = commit_examples(clone, test_commits)
        test_set = evaluate.prepare(sample_examples(test, args.eval_per_commit, args.eval_max, args.seed), tokenizer,
                                    args.context, max_examples=0, fim_samples=args.fim_samples, seed=args.seed)
        older_oids = git(clone, "rev-list", "--no-merges", backfill_end).split()
        random.Random(args.seed).shuffle(older_oids)
        older = commit_examples(clone, older_oids[:30])
        older_set = evaluate.prepare(sample_examples(older, 6, 90, args.seed), tokenizer, args.context,
                                     max_examples=0, fim_samples=0, seed=args.seed)
        fim_set = evaluate.prepare_fim_losses(test_set.records, tokenizer, args.context, max_examples=0,
                                              seed=args.seed)
        log(f"test set: {len(test)} commits with examples, {len(test_set.records)} loss items "
            f"({len(fim_set.records)} in the FIM rendering), {len(test_set.fim)} FIM items; older slice "
            f"{len(older_set.records)} items")
        models = Models(base_dir, args.device, args.context)
        ev = {"base": models.scores(None, test_set, tokenizer), "base_again": models.scores(None, test_set, tokenizer)}
        if current:
            ev["adapter"] = models.scores(current, test_set, tokenizer)
        for k, s in enumerate(snaps):
            ev[f"snapshot_s{args.seed + k}"] = models.scores(s, test_set, tokenizer)
        # The same items in the rendering an editor asks for (the middle of the real-file FIM task): the edit
        # rendering above favours edit-trained models, this one FIM-trained ones (the snapshot recipe's kind).
        fim_ev = {"base": models.scores(None, fim_set, tokenizer)}
        if current:
            fim_ev["adapter"] = models.scores(current, fim_set, tokenizer)
        for k, s in enumerate(snaps):
            fim_ev[f"snapshot_s{args.seed + k}"] = models.scores(s, fim_set, tokenizer)
        copy = copy_baseline(test_set, args.seed)
        forgetting = old_base = None
        if current:
            old_final = models.scores(current, older_set, tokenizer).losses
            old_base = rel(metrics.paired_loss(models.scores(None, older_set, tokenizer).losses, old_final))
            if first and first != current:
                forgetting = rel(metrics.paired_loss(models.scores(first, older_set, tokenizer).losses, old_final))
        mark = phase("evaluate", mark)

        # ---- report
        def summary(scores) -> dict:
            return {k: v for k, v in scores.summary().items() if k in ("changed_loss", "target_loss", "fim_exact",
                                                                       "fim_edit_sim")}

        summ = {k: summary(v) for k, v in ev.items()}
        snap_keys = [k for k in ev if k.startswith("snapshot_s")]

        def mean_of(keys):
            if not keys:
                return None
            return {m: (sum(summ[k][m] for k in keys) / len(keys)) for m in summ[keys[0]]}

        def edit_sim_diff(a, b) -> dict:
            e = metrics.paired_fim(a.fim, b.fim)
            return {"diff": e.value, "ci95_low": e.low, "ci95_high": e.high}

        base = ev["base"]
        copy_summary = metrics.summarize([], copy)
        report = {
            "date": time.strftime("%Y-%m-%d"), "repo": str(args.repo), "base_model": base_dir,
            "base_meta": base_meta, "cut": cut, "config": config_text, "settings_left_out": dropped,
            "base": summ["base"], "base_again": summ["base_again"],
            "adapter": summ.get("adapter"), "snapshot": mean_of(snap_keys),
            "snapshot_seeds": {k: summ[k] for k in snap_keys},
            "copy_old": {"changed_loss": None, "target_loss": None, "fim_exact": copy_summary["fim_exact"],
                         "fim_edit_sim": copy_summary["fim_edit_sim"]},
            "aa": {**rel(metrics.paired_loss(base.losses, ev["base_again"].losses)),
                   "fim_edit_sim_diff": edit_sim_diff(base, ev["base_again"])["diff"],
                   "split_half_unpaired_rel": split_half(base.losses, args.seed)},
            "adapter_vs_base": rel(metrics.paired_loss(base.losses, ev["adapter"].losses)) if current else None,
            "adapter_vs_base_target": ({**rel(metrics.paired_loss(base.losses, ev["adapter"].losses, changed=False))}
                                       if current else None),
            "adapter_vs_base_edit_sim": edit_sim_diff(base, ev["adapter"]) if current else None,
            "snapshot_vs_base": {k: rel(metrics.paired_loss(base.losses, ev[k].losses)) for k in snap_keys},
            "adapter_vs_snapshot": ({k: rel(metrics.paired_loss(ev[k].losses, ev["adapter"].losses))
                                     for k in snap_keys} if current else {}),
            "fim_format": {
                **{k: {m: v.summary()[m] for m in ("changed_loss", "target_loss")} for k, v in fim_ev.items()},
                "adapter_vs_base": (rel(metrics.paired_loss(fim_ev["base"].losses, fim_ev["adapter"].losses))
                                    if current else None),
                "snapshot_vs_base": {k: rel(metrics.paired_loss(fim_ev["base"].losses, fim_ev[k].losses))
                                     for k in snap_keys},
                "adapter_vs_snapshot": ({k: rel(metrics.paired_loss(fim_ev[k].losses, fim_ev["adapter"].losses))
                                         for k in snap_keys} if current else {})},
            "forgetting_rel": forgetting["changed_loss_rel"] if forgetting else 0.0,
            "forgetting": forgetting, "older_adapter_vs_base": old_base,
            "rounds": len(rounds), "rounds_live": sum(r["phase"] == "middle" for r in rounds),
            "promoted": sum(r["outcome"] == "promoted" for r in rounds),
            "promoted_live": sum(r["phase"] == "middle" and r["outcome"] == "promoted" for r in rounds),
            "round_details": rounds, "shards": shard_facts, "lineage": chain, "lineage_steps": lineage_steps,
            "drained": drained,
            "eval_sizes": {"test_commits": len(test), "loss_items": len(test_set.records),
                           "changed_tokens": sum(x.changed_n for x in base.losses), "fim_items": len(test_set.fim),
                           "older_items": len(older_set.records), "fim_loss_items": len(fim_set.records),
                           "fim_changed_tokens": sum(x.changed_n for x in fim_ev["base"].losses)},
            "phases": phases, "wall_s": round(time.time() - t_wall, 1), "cpu_s": round(cpu_seconds() - t_cpu, 1),
            "load_avg": os.getloadavg(), "cores": os.cpu_count(),
            "daemon_status": (json.loads(status) if status.strip().startswith("{") else status[-2000:]),
        }
        print_table(report)
        if args.json:
            print(json.dumps(report, default=str))
        return 0
    finally:
        if daemon is not None:
            daemon.stop()
        if args.keep:
            log(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _fmt(x, pct=False):
    if x is None:
        return "-"
    return f"{x:+.1%}" if pct else f"{x:.4f}"


def print_table(r: dict) -> None:
    cols = [("base", r["base"]), ("base (A/A)", r["base_again"]), ("adapter", r["adapter"]),
            ("snapshot", r["snapshot"]), ("copy old", r["copy_old"])]
    print(f"{'metric':<16}" + "".join(f"{c:>12}" for c, _ in cols))
    for m in ("changed_loss", "target_loss", "fim_exact", "fim_edit_sim"):
        print(f"{m:<16}" + "".join(f"{_fmt((v or {}).get(m)):>12}" for _, v in cols))
    avb = r["adapter_vs_base"]
    if avb:
        print(f"adapter vs base, changed-token loss: {_fmt(avb['changed_loss_rel'], True)} "
              f"(95% CI {_fmt(avb['ci95_low'], True)} .. {_fmt(avb['ci95_high'], True)}, {avb['commits']} commits)")
        e = r["adapter_vs_base_edit_sim"]
        print(f"adapter vs base, FIM edit similarity: {e['diff']:+.4f} (95% CI {e['ci95_low']:+.4f} .. "
              f"{e['ci95_high']:+.4f})")
    for k, v in r["snapshot_vs_base"].items():
        print(f"{k} vs base, changed-token loss: {_fmt(v['changed_loss_rel'], True)} "
              f"(95% CI {_fmt(v['ci95_low'], True)} .. {_fmt(v['ci95_high'], True)})")
    for k, v in r["adapter_vs_snapshot"].items():
        print(f"adapter vs {k}, changed-token loss: {_fmt(v['changed_loss_rel'], True)} "
              f"(95% CI {_fmt(v['ci95_low'], True)} .. {_fmt(v['ci95_high'], True)})")
    ff = r.get("fim_format") or {}
    for name, est in ([("adapter vs base", ff["adapter_vs_base"])] if ff.get("adapter_vs_base") else []) + \
            [(f"{k} vs base", v) for k, v in ff.get("snapshot_vs_base", {}).items()] + \
            [(f"adapter vs {k}", v) for k, v in ff.get("adapter_vs_snapshot", {}).items()]:
        print(f"{name}, changed-token loss in the FIM rendering: {_fmt(est['changed_loss_rel'], True)} "
              f"(95% CI {_fmt(est['ci95_low'], True)} .. {_fmt(est['ci95_high'], True)})")
    aa = r["aa"]
    print(f"A/A (base twice): {_fmt(aa['changed_loss_rel'], True)}; unpaired split-half of the test commits: "
          f"{_fmt(aa['split_half_unpaired_rel'], True)}")
    print(f"forgetting (final vs first adapter, older slice): {_fmt(r['forgetting_rel'], True)}"
          + ("" if r["forgetting"] else " (a single adapter version: nothing to compare)"))
    print(f"rounds: {r['rounds']} ({r['rounds_live']} trained live commits), promoted {r['promoted']} "
          f"({r['promoted_live']} of those); lineage {r['lineage']} = {r['lineage_steps']} steps")
    sh = r["shards"]
    print(f"live commits: {sh['live_commits']}, trained: {sh['live_commits_trained']}, not trained: "
          f"{sh['live_commits_never_trained']} (the window holds out {sh['window_commits']} commits; "
          f"{sh['live_duplicates']} duplicates are never trained; {sh.get('live_commits_without_examples', 0)} "
          f"hold no examples; {sh['examples_never_trained']} examples "
          f"not trained in all; {sh['groups']} flush groups)")
    print(f"wall {r['wall_s']:.0f} s, CPU {r['cpu_s']:.0f} s (this process and its children), load avg "
          f"{', '.join(f'{x:.1f}' for x in r['load_avg'])} on {r['cores']} cores")


if __name__ == "__main__":
    sys.exit(main())
