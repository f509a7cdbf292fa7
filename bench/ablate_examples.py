"""Examples ablation at equal training budget (issue 12, item 6): which of the new training examples help?

    python bench/ablate_examples.py --repo PATH --corpus DIR... [--steps 200] [--json]
    python bench/ablate_examples.py --repo PATH --base-model DIR [--variant half=edit_share=0.5] [--json]
    python bench/ablate_examples.py --repo PATH --corpus DIR... --reuse WORKDIR [--json]   # score a kept run again

1. Base: bench_learning's (a tiny StarCoder2 pretrained on `--corpus`, cached by bench/pretrain_tiny.py), or
   `--base-model DIR`.
2. The cut: a bare clone of `--repo`; its first-parent history is cut by time, the newest `--test-share` (10 %)
   being the test part, never trained on. Everything before the cut is ingested by the product's own ingest
   (`Ingestor.run`, what `gitlora backfill` runs) twice: into a store without screening (`[ingest] dedup =
   false`) and into one with the product's screening (exact and near-duplicates, repeated messages); each is
   flushed to shards by the product's `ShardWriter`. Then the test commits are ingested into the unscreened
   store and flushed as a group of their own: the test examples as the product records them (the file around
   each item, cross-file blocks when ingest makes them). Hygiene (generated/vendored files, small items, test
   weights, template messages) is the product's in every variant: it is not what this ablation measures.
3. Variants, cumulative (issue 12's list), each trained from the base by gitlora's trainer (`python -m
   gitlora.trainer --spec`) with the same settings (`--steps` optimizer steps, learning rate, seed, LoRA,
   context, no replay); what differs is the data and its rendering:
   - today: the rendering before issue 12: "message + before -> after" edits with every target token weighted
     1, and fill-in-the-middle (the old default share, fim_share 0.2) under the synthetic header, i.e. the
     records without `new_context` and `cross_file` (trainer/data.py renders such records that way; the FIM
     header is StarCoder2's, `<fim_prefix>` before the path, which the old one put after it); no screening.
   - fim: fill-in-the-middle in the real file as the main kind (edit_share and copied_token_weight: the
     product's defaults); no screening.
   - cross_file: + the cross-file blocks ingest attaches (`cross_file` on the records, the `[train]
     cross_file_context` setting); skipped, with a line saying so, while the records carry none.
   - dedup: + the store's screening.
   - context: + the file text around each FIM gap as a weak target (`context_token_weight`, the product's
     default; the variants before it set 0): the product's defaults.
   `--variant NAME=key=json,...` adds a run: the settings of `base=VARIANT` (default: the last of the list)
   with the given `[train]` keys changed, e.g. `--variant edit50=edit_share=0.5`.
4. Equal budget, the same commits: every variant trains on the examples of the same newest K commits of the
   trained part (by commit time; commits the unscreened store marks as wholly duplicate are left out, as the
   round planner leaves them out), K being the most whose examples fit every variant's step cap (the trainer's
   own token count, `round.read_tokens_of`, against `plan.new_tokens_within` of max_steps x micro-batch x
   gradient accumulation x context), so no round's budget selection defers any of them (checked in each
   adapter's metrics.json). A variant whose examples are fewer (screened) runs more epochs over them.
5. Evaluation on the test commits that are not merges (at most `--eval-per-commit` examples each, `--eval-max`
   in all), paired on the same items with the product's evaluation (trainer/evaluate.py, trainer/metrics.py):
   changed-token loss in two renderings, the edit one (the before version shown, the whole item asked for) and
   the FIM one (the item's real-file fill-in-the-middle task, its middle the target: what an editor asks;
   evaluate.prepare_fim_losses), and the real-file FIM completion (greedy, exact match and edit similarity) of
   `--fim-samples` items; a variant trained with cross-file blocks is scored on prompts that
   hold them (and the base on the same prompts), the others on prompts without. Each variant against the
   base and against the previous variant, with 95 % intervals by bootstrap over commits; copying the old
   version as a FIM baseline.
6. The context budget: for each variant's training examples (as the trainer renders and cuts them), the mean
   tokens of each part (header, cross-file blocks, file prefix, suffix, FIM middle, edit prompt, edit target)
   and its mean share of the context length.

Everything runs under a temporary directory (`--keep` keeps it). `--reuse WORKDIR` scores a kept run's adapters
again (new metrics, other evaluation sizes) without ingesting, training only the variants it does not hold
(`--variant` runs added later, on the same selection): its stores, shards and variants are read as they are,
the cut is taken again from `--repo` (which must not have moved). Prints a table; with --json,
one JSON object last on stdout. Wall and CPU seconds (this process and its children) per phase.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_learning as bl  # noqa: E402

PY = sys.executable
# fim_share before issue 12 (trainer/spec.py at adf13d8): the share of examples rendered as fill-in-the-middle.
OLD_FIM_SHARE = 0.2
PARTS = ("header", "cross_file", "prefix", "suffix", "middle", "edit_prompt", "target")
log = bl.log


# ------------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One training-data recipe: which store's shards, which record fields are removed before training, and the
    `[train]` settings that differ from the product's defaults."""

    name: str
    store: str  # "plain" (no screening) | "screened"
    strip: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)
    needs: str | None = None  # a record field without which the variant has nothing to add
    base: str | None = None  # the variant it is compared with besides the base model (None: the previous one)

    @property
    def cross_file(self) -> bool:
        """Trained (and evaluated) with the records' cross-file blocks."""
        return "cross_file" not in self.strip and self.settings.get("cross_file_context", True) is not False


def standard_variants(defaults: dict) -> list[Variant]:
    """Issue 12's ablation, cumulative: today's rendering, + real-file FIM, + cross-file context, + screening,
    + the file around a FIM gap as a weak target (the last: the product's defaults)."""
    new = {"edit_share": defaults["edit_share"], "copied_token_weight": defaults["copied_token_weight"],
           "context_token_weight": 0.0}
    return [
        Variant("today", "plain", ("new_context", "cross_file"),
                {"edit_share": round(1.0 - OLD_FIM_SHARE, 6), "copied_token_weight": 1.0,
                 "cross_file_context": False, "context_token_weight": 0.0}),
        Variant("fim", "plain", ("cross_file",), {**new, "cross_file_context": False}),
        Variant("cross_file", "plain", (), {**new, "cross_file_context": True}, needs="cross_file"),
        Variant("dedup", "screened", (), {**new, "cross_file_context": True}),
        Variant("context", "screened", (), {**new, "cross_file_context": True,
                                            "context_token_weight": defaults["context_token_weight"]}),
    ]


_NEXT_KEY = re.compile(r",(?=[A-Za-z_][A-Za-z0-9_]*=)")


def parse_variant(text: str, known: Sequence[Variant]) -> Variant:
    """`NAME=key=json,key=json,...` -> a variant: `base=VARIANT` (default: the last known one) and its settings
    with these `[train]` keys changed (values are JSON: `edit_share=0.5`, `cross_file_context=false`)."""
    name, sep, rest = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"--variant {text!r}: expected NAME=key=value,...")
    if any(v.name == name for v in known):
        raise ValueError(f"--variant {text!r}: a variant named {name!r} exists already")
    if not known:
        raise ValueError(f"--variant {text!r}: no variant to start from")
    pairs = {}
    for item in _NEXT_KEY.split(rest) if rest else []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--variant {text!r}: {item!r} is not key=value")
        try:
            pairs[key] = value if key == "base" else json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--variant {text!r}: the value of {key} is not JSON: {value!r}") from None
    base_name = pairs.pop("base", known[-1].name)
    base = next((v for v in known if v.name == base_name), None)
    if base is None:
        raise ValueError(f"--variant {text!r}: no variant named {base_name!r} "
                         f"(known: {', '.join(v.name for v in known)})")
    return replace(base, name=name, settings={**base.settings, **pairs}, base=base.name)


def known_settings(settings: dict, fields: Sequence[str]) -> tuple[dict, list[str]]:
    """The settings this trainer knows, and the names of those it does not (left out, and reported)."""
    return ({k: v for k, v in settings.items() if k in fields}, sorted(k for k in settings if k not in fields))


def stripped(record: dict, keys: Sequence[str]) -> dict:
    return {k: v for k, v in record.items() if k not in keys} if any(k in record for k in keys) else record


# ----------------------------------------------------------------------------------------- equal budget
def common_commits(order: Sequence[str], variants: Sequence[str], tokens: Callable[[str, str], int],
                   cap: int) -> int:
    """How many of the newest commits (`order`, newest first) every variant's step cap reaches: the largest K
    whose examples' tokens stay within `cap` for each variant (at least 1: a round always takes its newest
    commit). `tokens(variant, commit)` is called only as far as needed."""
    k = len(order)
    for variant in variants:
        used = 0
        for i, commit in enumerate(order[:k]):
            used += tokens(variant, commit)
            if used > cap:
                k = max(1, i)
                break
    return k


# ------------------------------------------------------------------------------------------- context budget
@dataclass(frozen=True)
class Markers:
    fim_prefix: int
    fim_suffix: int
    fim_middle: int
    file_sep: int


def part_tokens(input_ids: Sequence[int], prompt_len: int, markers: Markers, path_tokens: int) -> dict[str, int]:
    """One training example's tokens by part, found from the markers in its final (cut) token ids:

        FIM:  <repo_name>r [<file_sep>p_a\\nskel_a ...] <file_sep><fim_prefix>path\\n PREFIX <fim_suffix> SUFFIX
              <fim_middle> MIDDLE
        edit: <repo_name>r [<file_sep>p_a\\nskel_a ...] <file_sep>path\\n EDIT PROMPT -> TARGET

    Cross-file blocks: from the first `<file_sep>` before the file's own to that one; the file's path line
    (`path_tokens`) counts as header."""
    prompt = list(input_ids[:prompt_len])
    out = dict.fromkeys(PARTS, 0)
    target = len(input_ids) - prompt_len
    p = prompt.index(markers.fim_prefix) if markers.fim_prefix in prompt else -1
    if p >= 0 and markers.fim_suffix in prompt[p:] and markers.fim_middle in prompt[p:]:
        s = prompt.index(markers.fim_suffix, p)
        m = prompt.index(markers.fim_middle, s)
        seps = [i for i in range(p) if prompt[i] == markers.file_sep]
        out["cross_file"] = seps[-1] - seps[0] if len(seps) >= 2 else 0
        path = min(path_tokens, s - p - 1)
        out["prefix"] = s - p - 1 - path
        out["suffix"] = m - s - 1
        out["header"] = prompt_len - out["cross_file"] - out["prefix"] - out["suffix"]
        out["middle"] = target
        return out
    seps = [i for i, t in enumerate(prompt) if t == markers.file_sep]
    out["cross_file"] = seps[-1] - seps[0] if len(seps) >= 2 else 0
    head = min(prompt_len, seps[-1] + 1 + path_tokens) if seps else 0
    out["header"] = max(0, head - out["cross_file"])
    out["edit_prompt"] = prompt_len - out["header"] - out["cross_file"]
    out["target"] = target
    return out


def budget_shares(rows: Sequence[dict[str, int]], context_length: int) -> dict:
    """Mean tokens of each part over the examples, and that mean as a share of the context length."""
    n = max(1, len(rows))
    mean = {part: sum(r.get(part, 0) for r in rows) / n for part in PARTS}
    return {"examples": len(rows), "mean_tokens": {k: round(v, 1) for k, v in mean.items()},
            "context_share": {k: round(v / context_length, 4) for k, v in mean.items()},
            "filled": round(sum(mean.values()) / context_length, 4)}


def context_budget(records: list[dict], tokenizer, context_length: int, cfg: dict, limit: int, seed: int) -> dict:
    """budget_shares of (a seeded sample of `limit` of) a variant's training examples, rendered and cut as
    the trainer does, with the share rendered as fill-in-the-middle."""
    from gitlora.trainer import data

    sample = list(records)
    if limit and len(sample) > limit:
        sample = random.Random(seed).sample(sample, limit)
    ids = tokenizer.convert_tokens_to_ids
    markers = Markers(ids(data.FIM_PREFIX), ids(data.FIM_SUFFIX), ids(data.FIM_MIDDLE), ids("<file_sep>"))
    options = data.RenderOptions.from_settings(cfg)
    rows, fim = [], 0
    for ex in sample:
        r = data.rendering(ex, options, int(cfg["seed"]))
        if r is None:
            continue
        tok, _ = data.tokenize_rendering(tokenizer, r, context_length, options.copied_weight)
        prompt_len = sum(1 for x in tok.labels if x == data.IGNORE)
        path = len(tokenizer(f"{ex.get('path', '')}\n", add_special_tokens=False)["input_ids"])
        rows.append(part_tokens(tok.input_ids, prompt_len, markers, path))
        fim += r.kind == data.FIM
    return {**budget_shares(rows, context_length), "fim_examples": round(fim / max(1, len(rows)), 4)}


# ------------------------------------------------------------------------------------------------ the stores
class Shards:
    """A store's shards as the manifest lists them, read lazily by commit."""

    def __init__(self, directory: Path, entries: list[dict]):
        self.dir = directory
        self.files_of: dict[str, list[str]] = {}
        self.facts: list[dict] = []  # commit facts in shard order
        for entry in entries:
            for fact in entry.get("commits") or []:
                self.files_of.setdefault(fact["commit"], []).append(entry["file"])
                self.facts.append(fact)
        self._loaded: dict[str, dict[str, list[dict]]] = {}

    def records(self, commit: str) -> list[dict]:
        from gitlora.trainer import data

        out = []
        for name in dict.fromkeys(self.files_of.get(commit, [])):
            if name not in self._loaded:
                by_commit: dict[str, list[dict]] = {}
                for rec in data.read_shards([self.dir / name]):
                    by_commit.setdefault(rec["commit"], []).append(rec)
                self._loaded[name] = by_commit
            out += self._loaded[name].get(commit, [])
        return out

    def newest_first(self) -> list[str]:
        """Commits with examples, newest first by commit time (ties in shard order), less those whose examples
        were all stored before (the round planner never trains them)."""
        seen, facts = set(), []
        for fact in self.facts:
            if fact["commit"] not in seen:
                seen.add(fact["commit"])
                facts.append(fact)
        dup = {f["commit"] for f in self.facts if f.get("duplicate")}
        return [f["commit"] for f in sorted(facts, key=lambda f: -int(f.get("time") or 0)) if f["commit"] not in dup]


def ingest(clone: Path, store_dir: Path, shards_dir: Path, manifest: Path, config, oids: list[str],
           workers: int) -> tuple[list[dict], dict]:
    """`oids` (parents first) through the product's ingest into the store, then one flush; returns the flush's
    shard entries and the ingest summary."""
    from gitlora.daemon.gitrepo import GitRepo
    from gitlora.daemon.ingest import Ingestor
    from gitlora.daemon.shards import ShardWriter
    from gitlora.daemon.store import Store

    git = GitRepo(clone, exclude=config.exclude, include_remotes=config.include_remotes,
                  skip_vendored=config.skip_vendored_crates)
    with Store(store_dir) as store:
        summary = Ingestor(git, store, config, workers=workers).run(oids)
        entries = ShardWriter(shards_dir, manifest, store).flush(shard_size=256)
        counters = store.counters()
    return entries, {"commits": summary.commits, "ingested": summary.ingested, "skipped": summary.skipped,
                     "examples": summary.examples, "seconds": round(summary.seconds, 1), "counters": counters}


def kept_entries(manifest: Path, test_commits: set[str]) -> tuple[list[dict], list[dict]]:
    """A kept store's shard entries, split into the trained part's and the test commits' (each was its own
    flush, so no shard holds both)."""
    entries = bl.read_json(manifest, {}).get("shards") or []
    test = [e for e in entries if any(f["commit"] in test_commits for f in e.get("commits") or [])]
    return [e for e in entries if e not in test], test


def cross_file_rate(store_dir: Path, commits: set[str]) -> dict | None:
    """The store's cross-file resolution counts over these commits (records' `cross_file_referencing` and
    `cross_file_resolved`, where ingest records them): issue 12's target is >= 50 %."""
    from gitlora.daemon.store import Store

    referencing = resolved = 0
    with Store(store_dir, readonly=True) as store:
        for oid, record in store.iter_commits():
            if oid.hex() in commits:
                referencing += int(record.get("cross_file_referencing") or 0)
                resolved += int(record.get("cross_file_resolved") or 0)
    if not referencing:
        return None
    return {"referencing": referencing, "resolved": resolved, "rate": round(resolved / referencing, 4)}


# --------------------------------------------------------------------------------------------------- training
def train_variant(root: Path, env: dict, base_dir: str, name: str, records: list[dict], commits: list[str],
                  train: dict) -> tuple[Path, dict]:
    """One fresh LoRA through gitlora's trainer on these records (the round keeps those of `commits`)."""
    work = root / "variants" / name
    work.mkdir(parents=True)
    shard = work / "000001.jsonl"
    with open(shard, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    spec = {"base_model": base_dir, "adapters_dir": str(work / "adapters"), "train_shards": [str(shard)],
            "replay_shards": [], "eval_shards": [], "new_commits": commits,
            "progress_file": str(work / "progress.jsonl"), "train": train}
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    with open(work / "trainer.log", "wb") as out:
        code = subprocess.run([PY, "-m", "gitlora.trainer", "--spec", str(work / "spec.json")], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=work).returncode
    if code != 0:
        raise SystemExit(f"training {name} failed (exit {code}): {(work / 'trainer.log').read_text()[-2000:]}")
    return trained_facts(work / "adapters" / "current")


def trained_facts(current: Path) -> tuple[Path, dict]:
    """A trained variant's adapter and what its round reports."""
    metrics = bl.read_json(current / "metrics.json", {}) or {}
    budget = metrics.get("budget") or {}
    return current, {"steps": metrics.get("steps"), "examples": metrics.get("examples"),
                     "skipped": metrics.get("skipped"), "truncated": metrics.get("truncated"),
                     "target_tokens": metrics.get("target_tokens"), "padding_waste": metrics.get("padding_waste"),
                     "commits": (metrics.get("data") or {}).get("commits"),
                     "covered_commits": len(budget.get("covered_commits") or []),
                     "deferred_commits": len(budget.get("deferred_commits") or []),
                     "train_loss_first": metrics.get("train_loss_first"),
                     "train_loss_last": metrics.get("train_loss_last"), "train_time_s": metrics.get("train_time_s")}


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    from gitlora.trainer.spec import DEFAULTS, RoundSettings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, required=True, help="the target repository (a git dir or checkout)")
    ap.add_argument("--corpus", type=Path, nargs="+", default=[], help="Rust repositories to pretrain on")
    ap.add_argument("--base-model", default=None, help="a base model dir (skips pretraining)")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--pretrain-cpu-s", type=float, default=600.0, help="pretraining budget in CPU seconds "
                    "(bench_learning.py's default: the same cached base)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="training seed, evaluation sampling")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--test-share", type=float, default=0.10, help="newest share of first-parent commits: test")
    ap.add_argument("--limit-commits", type=int, default=0, help="ingest only the newest N commits before the "
                    "cut (0: all; a small run for checking the script, not a measurement)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of every variant")
    ap.add_argument("--learning-rate", type=float, default=None, help="default: "
                    f"{bl.TINY_LEARNING_RATE} for the pretrained tiny base, the product's for --base-model")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-set", action="append", metavar="KEY=JSON", help="a [train] setting for every "
                    "variant (repeatable)")
    ap.add_argument("--variants", default=None, help="comma-separated standard variants to run (default: all of "
                    "today,fim,cross_file,dedup,context)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=key=json,...",
                    help="an extra variant: base=VARIANT (default the last) with these [train] keys changed")
    ap.add_argument("--eval-per-commit", type=int, default=8)
    ap.add_argument("--eval-max", type=int, default=240)
    ap.add_argument("--fim-samples", type=int, default=32)
    ap.add_argument("--budget-sample", type=int, default=1000, help="training examples per variant measured for "
                    "the context budget's shares (0: all)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--reuse", type=Path, default=None, metavar="WORKDIR",
                    help="a work directory kept by an earlier run: score its trained variants again (and "
                    "train the variants it does not hold, on the same selection)")
    args = ap.parse_args(argv)
    if not args.base_model and not args.corpus:
        ap.error("give --corpus DIR... to pretrain a base, or --base-model DIR")
    if args.learning_rate is None:
        args.learning_rate = DEFAULTS["learning_rate"] if args.base_model else bl.TINY_LEARNING_RATE
    variants = standard_variants(DEFAULTS)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = sorted(set(wanted) - {v.name for v in variants})
        if unknown:
            ap.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(v.name for v in variants)})")
        variants = [v for v in variants if v.name in wanted]
    try:
        for text in args.variant:
            variants.append(parse_variant(text, variants))
    except ValueError as e:
        ap.error(str(e))
    if not variants:
        ap.error("no variant to run")
    common = {}
    for item in args.train_set or []:
        key, _, value = item.partition("=")
        common[key] = json.loads(value)

    t_wall, t_cpu = time.time(), bl.cpu_seconds()
    phases: dict[str, dict] = {}
    phase = bl.phase_timer(phases)

    import torch

    torch.set_num_threads(args.threads)
    mark = (t_wall, t_cpu)
    base_dir, base_meta = bl.base_model_dir(args)
    mark = phase("pretrain", mark)

    if args.reuse and not (args.reuse / "plain" / "manifest.json").is_file():
        ap.error(f"--reuse {args.reuse}: not a kept work directory (no plain/manifest.json)")
    root = args.reuse or Path(tempfile.mkdtemp(prefix="glA-", dir="/tmp"))
    env = bl.isolated_env(root, args.threads)
    try:
        from gitlora.daemon import log as daemon_log
        from gitlora.daemon.config import IngestConfig

        daemon_log.configure(root / "ingest.log", console=False, journal=False)  # not onto stdout
        # ---- the clone and its cut
        clone = root / "repo.git"
        if args.reuse:  # the kept clone's HEAD was moved to the cut; the repository's is the head
            head = bl.git(args.repo, "rev-parse", "HEAD")
        else:
            subprocess.run(["git", "clone", "-q", "--bare", "--no-tags", "--single-branch", str(args.repo),
                            str(clone)], check=True, capture_output=True, env=env)
            head = bl.git(clone, "rev-parse", "HEAD")
        fp = bl.git(clone, "rev-list", "--first-parent", "--reverse", head).split()
        n = len(fp)
        n_test = max(1, round(args.test_share * n))
        if n - n_test < 1:
            raise SystemExit(f"{args.repo}: {n} first-parent commits, too few to cut")
        train_end = fp[n - n_test - 1]
        test_commits = bl.git(clone, "rev-list", "--no-merges", f"{train_end}..{head}").split()
        test_oids = bl.git(clone, "rev-list", "--reverse", "--topo-order", f"{train_end}..{head}").split()
        if not args.reuse:
            bl.git(clone, "update-ref", "HEAD", train_end, env=env)  # only the trained part is reachable
        cut = {"first_parent": n, "test_first_parent": n_test, "test_commits_non_merge": len(test_commits),
               "train_end": train_end, "head": head,
               "dates": {k: bl.git(clone, "log", "-1", "--format=%cI", v) for k, v in
                         (("train_end", train_end), ("head", head))}}
        log(f"history: {n} first-parent commits, the newest {n_test} the test part ({len(test_commits)} non-merge "
            f"commits, from {cut['dates']['train_end']})")
        mark = phase("clone", mark)

        # ---- the stores: without screening and with it; the test commits into the first, a group of their own
        from gitlora.daemon.gitrepo import GitRepo

        configs = {"plain": IngestConfig(dedup=False, near_duplicate_cap=0, repeated_message_limit=0),
                   "screened": IngestConfig()}
        oids = GitRepo(clone).new_commits(lambda _: set(), [train_end])  # the trained part, parents first
        if args.limit_commits:
            oids = oids[-args.limit_commits:]
        stores, ingest_facts = {}, {}
        for key in ("plain", "screened") if any(v.store == "screened" for v in variants) else ("plain",):
            d = root / key
            if args.reuse:
                entries, _ = kept_entries(d / "manifest.json", set(test_oids))
                ingest_facts[key] = {"reused": str(d)}
            else:
                entries, ingest_facts[key] = ingest(clone, d / "store", d / "shards", d / "manifest.json",
                                                    configs[key], oids, args.threads)
                log(f"{key} store: {ingest_facts[key]['ingested']} commits, {ingest_facts[key]['examples']} "
                    f"examples ({ingest_facts[key]['seconds']} s)")
            stores[key] = Shards(d / "shards", entries)
            mark = phase(f"ingest_{key}", mark)
        d = root / "plain"
        if args.reuse:
            test_entries = kept_entries(d / "manifest.json", set(test_oids))[1]
            ingest_facts["test"] = {"reused": str(d)}
        else:
            test_entries, ingest_facts["test"] = ingest(clone, d / "store", d / "shards", d / "manifest.json",
                                                        configs["plain"], test_oids, args.threads)
        test_shards = Shards(d / "shards", test_entries)
        mark = phase("ingest_test", mark)

        # ---- variants that can run; the common commits
        from transformers import AutoTokenizer

        from gitlora.trainer import plan as planlib, round as rnd

        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        fields = list(RoundSettings.model_fields)
        order = stores["plain"].newest_first()
        if not order:
            raise SystemExit(f"{args.repo}: no trainable examples before the cut")
        probe_records = [r for c in order[:50] for r in stores["plain"].records(c)]
        skipped, runs, left_out = {}, [], {}
        for v in variants:
            if v.needs and not any(v.needs in r for r in probe_records):
                skipped[v.name] = f"the records carry no {v.needs!r} (not made by this ingest)"
                log(f"variant {v.name}: skipped, {skipped[v.name]}")
                continue
            runs.append(v)
        if not runs:
            raise SystemExit("no variant can run")
        train_cfg = {}
        for v in runs:
            settings, left_out[v.name] = known_settings({**v.settings, **common}, fields)
            train_cfg[v.name] = {"max_steps": args.steps, "context_length": args.context, "device": args.device,
                                 "replay_share": 0.0, "seed": args.seed, "learning_rate": args.learning_rate,
                                 "eval_max_examples": 1, "fim_samples": 0, **settings}
        cfg0 = {**DEFAULTS, **train_cfg[runs[0].name]}
        plan = rnd.round_plan(base_dir, cfg0)
        step_tokens = args.steps * (int(cfg0["micro_batch"]) or plan.micro_batch) * \
            (int(cfg0["grad_accum"]) or plan.grad_accum) * plan.context_length
        cap = planlib.new_tokens_within(step_tokens, 0.0, 1.0)
        by_name = {v.name: v for v in runs}
        counted: dict[tuple[str, str], int] = {}

        def variant_records(v: Variant, commit: str) -> list[dict]:
            return [stripped(r, v.strip) for r in stores[v.store].records(commit)]

        def tokens(name: str, commit: str) -> int:
            if (name, commit) not in counted:
                cfg = {**DEFAULTS, **train_cfg[name]}
                counted[name, commit] = sum(rnd.read_tokens_of(r, tokenizer, plan.context_length, cfg)
                                            for r in variant_records(by_name[name], commit))
            return counted[name, commit]

        k = common_commits(order, [v.name for v in runs], tokens, cap)
        chosen = order[:k]
        log(f"equal budget: {args.steps} steps = {step_tokens} tokens; the newest {k} of {len(order)} commits fit "
            f"every variant")
        mark = phase("select", mark)

        # ---- training
        adapters, trained, budgets = {}, {}, {}
        for v in runs:
            records = [r for c in chosen for r in variant_records(v, c)]
            cfg = {**DEFAULTS, **train_cfg[v.name]}
            budgets[v.name] = context_budget(records, tokenizer, plan.context_length, cfg, args.budget_sample,
                                             args.seed)
            budgets[v.name]["train_tokens"] = sum(tokens(v.name, c) for c in chosen)
            current = root / "variants" / v.name / "adapters" / "current"
            if args.reuse and (current / "metrics.json").is_file():
                adapters[v.name], trained[v.name] = trained_facts(current)
                if trained[v.name]["commits"] != k or trained[v.name]["steps"] != args.steps:
                    raise SystemExit(f"--reuse: variant {v.name} trained {trained[v.name]['steps']} steps on "
                                     f"{trained[v.name]['commits']} commits, this run's selection is {args.steps} "
                                     f"steps on {k}: not the same run")
                log(f"variant {v.name}: reused {adapters[v.name]}")
            else:
                log(f"variant {v.name}: {len(records)} examples of {k} commits, training {args.steps} steps")
                adapters[v.name], trained[v.name] = train_variant(root, env, base_dir, v.name, records, chosen,
                                                                 train_cfg[v.name])
            if trained[v.name]["deferred_commits"]:
                log(f"variant {v.name}: the round deferred {trained[v.name]['deferred_commits']} of the commits "
                    f"(its token count differs from this script's): the budget is not equal")
            mark = phase(f"train_{v.name}", mark)

        # ---- evaluation: the same test items for every variant
        from gitlora.trainer import evaluate, metrics

        by_commit: dict[str, list[dict]] = {}
        wanted = set(test_commits)
        for c in dict.fromkeys(f["commit"] for f in test_shards.facts):
            if c in wanted:
                exs = [r for r in test_shards.records(c)
                       if r.get("change_kind") != "deleted" and (r.get("after") or "").strip()]
                if exs:
                    by_commit[c] = exs
        sample = bl.sample_examples(by_commit, args.eval_per_commit, args.eval_max, args.seed)
        with_xf = any(v.cross_file for v in runs) and any(r.get("cross_file") for r in sample)
        sets = {"plain": evaluate.prepare([stripped(r, ("cross_file",)) for r in sample], tokenizer, args.context,
                                          max_examples=0, fim_samples=args.fim_samples, seed=args.seed)}
        if with_xf:
            sets["cross_file"] = evaluate.prepare(sample, tokenizer, args.context, max_examples=0,
                                                  fim_samples=args.fim_samples, seed=args.seed)
        fim_sets = {key: evaluate.prepare_fim_losses(s.records, tokenizer, args.context, max_examples=0,
                                                     seed=args.seed, cross_file=key == "cross_file")
                    for key, s in sets.items()}
        set_of = {v.name: "cross_file" if with_xf and v.cross_file else "plain" for v in runs}
        log(f"test set: {len(by_commit)} commits with examples, {len(sets['plain'].records)} loss items, "
            f"{len(sets['plain'].fim)} FIM items" + (" (also with cross-file blocks)" if with_xf else ""))
        models = bl.Models(base_dir, args.device, args.context)
        base_scores = {key: models.scores(None, s, tokenizer) for key, s in sets.items()}
        scores = {v.name: models.scores(str(adapters[v.name]), sets[set_of[v.name]], tokenizer) for v in runs}
        base_fim = {key: models.scores(None, s, tokenizer) for key, s in fim_sets.items()}
        fim_scores = {v.name: models.scores(str(adapters[v.name]), fim_sets[set_of[v.name]], tokenizer)
                      for v in runs}
        copy = bl.copy_baseline(sets["plain"], args.seed)
        mark = phase("evaluate", mark)

        # ---- report
        def summary(s) -> dict:
            return {k: v for k, v in s.summary().items() if k in ("changed_loss", "target_loss", "fim_exact",
                                                                 "fim_edit_sim", "fim_n", "examples", "commits")}

        def compare(a, b) -> dict:
            """Paired on the items whose target tokens both renderings kept alike (with cross-file blocks a
            prompt is longer and truncation may cut a target shorter: a loss over fewer tokens is no gain)."""
            la, lb = metrics.common_tokens(a.losses, b.losses)
            try:
                out = metrics.compare(la, a.fim, lb, b.fim, seed=args.seed)
            except ValueError as e:  # the two sets' items differ: nothing to pair
                return {"error": str(e)}
            return {**out, "loss_items": len(la), "loss_items_cut_differently": len(a.losses) - len(la)}

        results = []
        for i, v in enumerate(runs):
            ref = v.base if v.base in scores else (runs[i - 1].name if i else None)
            results.append({
                "name": v.name, "store": v.store, "stripped": list(v.strip), "settings": train_cfg[v.name],
                "settings_left_out": left_out[v.name], "eval_set": set_of[v.name],
                "scores": summary(scores[v.name]), "vs_base": compare(base_scores[set_of[v.name]], scores[v.name]),
                "previous": ref, "vs_previous": compare(scores[ref], scores[v.name]) if ref else None,
                "fim_format": {"scores": summary(fim_scores[v.name]),
                               "vs_base": compare(base_fim[set_of[v.name]], fim_scores[v.name]),
                               "vs_previous": compare(fim_scores[ref], fim_scores[v.name]) if ref else None},
                "training": trained[v.name], "context_budget": budgets[v.name]})
        standard = [v.name for v in standard_variants(DEFAULTS) if v.name in scores]
        for result in results:  # every variant against today's rendering (the first standard one that ran)
            if standard and result["name"] != standard[0]:
                result["vs_first"] = {"against": standard[0],
                                      "edit_format": compare(scores[standard[0]], scores[result["name"]]),
                                      "fim_format": compare(fim_scores[standard[0]], fim_scores[result["name"]])}
        # Issue 12's question itself: the product's examples (the last of the standard list that ran) against
        # today's (the first), paired, in both renderings.
        overall = None
        if len(standard) > 1:
            last = next(r for r in results if r["name"] == standard[-1])["vs_first"]
            overall = {"variant": standard[-1], **last}
        test_xf = sum(1 for r in sample if r.get("cross_file"))
        report = {
            "date": time.strftime("%Y-%m-%d"), "repo": str(args.repo), "base_model": base_dir, "base_meta": base_meta,
            "cut": cut, "limit_commits": args.limit_commits, "steps": args.steps, "step_tokens": step_tokens,
            "learning_rate": args.learning_rate, "context": args.context, "seed": args.seed,
            "commits_trained": k, "commits_available": len(order), "chosen_commits": chosen,
            "ingest": ingest_facts, "skipped_variants": skipped,
            "base": {key: summary(s) for key, s in base_scores.items()},
            "base_fim_format": {key: summary(s) for key, s in base_fim.items()},
            "copy_old": {k: v for k, v in metrics.summarize([], copy).items() if k in ("fim_exact", "fim_edit_sim")},
            "variants": results, "product_vs_today": overall,
            "cross_file": {"train_rate": cross_file_rate(root / "plain" / "store", set(order)),
                           "test_items_with_blocks": test_xf, "test_items": len(sample)},
            "eval_sizes": {"test_commits": len(by_commit), "loss_items": len(sets["plain"].records),
                           "changed_tokens": sum(x.changed_n for x in base_scores["plain"].losses),
                           "fim_loss_items": len(fim_sets["plain"].records),
                           "fim_changed_tokens": sum(x.changed_n for x in base_fim["plain"].losses),
                           "fim_items": len(sets["plain"].fim)},
            "phases": phases, "wall_s": round(time.time() - t_wall, 1), "cpu_s": round(bl.cpu_seconds() - t_cpu, 1),
            "load_avg": os.getloadavg(), "cores": os.cpu_count(),
        }
        print_table(report)
        if args.json:
            print(json.dumps(report, default=str))
        return 0
    finally:
        if args.keep or args.reuse:
            log(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- table
def _num(x, fmt="{:.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def _est(e: dict | None, pct: bool) -> str:
    if not e or e.get("value") is None:
        return "-"
    f = "{:+.1%}" if pct else "{:+.4f}"
    if e.get("low") is None:
        return f.format(e["value"])
    return f"{f.format(e['value'])} ({f.format(e['low'])} .. {f.format(e['high'])})"


def print_table(r: dict) -> None:
    base = r["base"]["plain"]
    print(f"{'model':<14}{'changed loss':>14}{'target loss':>13}{'FIM exact':>11}{'FIM edit sim':>14}")
    rows = [("base", base)] + ([("base (xf)", r["base"]["cross_file"])] if "cross_file" in r["base"] else [])
    rows += [(v["name"], v["scores"]) for v in r["variants"]]
    for name, s in rows:
        print(f"{name:<14}{_num(s.get('changed_loss')):>14}{_num(s.get('target_loss')):>13}"
              f"{_num(s.get('fim_exact'), '{:.3f}'):>11}{_num(s.get('fim_edit_sim'), '{:.3f}'):>14}")
    c = r["copy_old"]
    print(f"{'copy old':<14}{'-':>14}{'-':>13}{_num(c.get('fim_exact'), '{:.3f}'):>11}"
          f"{_num(c.get('fim_edit_sim'), '{:.3f}'):>14}")
    if r.get("base_fim_format"):
        print("\nchanged-token loss in the FIM rendering (the middle of each item's real-file task)")
        rows = [(f"base ({key})" if key != "plain" else "base", s) for key, s in r["base_fim_format"].items()]
        rows += [(v["name"], v["fim_format"]["scores"]) for v in r["variants"]]
        for name, s in rows:
            print(f"{name:<14}{_num(s.get('changed_loss')):>14}{_num(s.get('target_loss')):>13}")
    print("\npaired, 95 % intervals over commits (loss: relative, negative = better; edit similarity: difference,"
          " positive = better)")
    for v in r["variants"]:
        fim = v.get("fim_format") or {}
        for ref, cmp, fcmp in (("base", v["vs_base"], fim.get("vs_base")),
                               (v["previous"], v["vs_previous"], fim.get("vs_previous"))):
            if cmp is None:
                continue
            fim_text = ("" if not fcmp or "error" in fcmp else
                        f"; FIM-format changed loss {_est(fcmp['changed_loss_rel'], True)}"
                        + (f" on {fcmp['loss_items']} items" if fcmp.get("loss_items_cut_differently") else ""))
            if cmp.get("loss_items_cut_differently"):
                fim_text = f" on {cmp['loss_items']} items cut alike" + fim_text
            print(f"{v['name']} vs {ref}: " + (f"not paired: {cmp['error']}" if "error" in cmp else
                  f"changed loss {_est(cmp['changed_loss_rel'], True)}{fim_text}; edit sim "
                  f"{_est(cmp['fim_edit_sim_diff'], False)}; exact {_est(cmp['fim_exact_diff'], False)}"))
    product = (r.get("product_vs_today") or {}).get("variant")
    for v in r["variants"]:  # against today's rendering, where the lines above did not already say it
        f = v.get("vs_first")
        if (not f or "error" in f["edit_format"] or "error" in f["fim_format"]
                or (v["previous"] == f["against"] and v["name"] != product)):
            continue
        print(f"{v['name']} vs {f['against']}" + (" (the product's examples vs today's)" if v["name"] == product
                                                  else "") +
              f": changed loss {_est(f['edit_format']['changed_loss_rel'], True)}; FIM-format changed loss "
              f"{_est(f['fim_format']['changed_loss_rel'], True)}; edit sim "
              f"{_est(f['edit_format']['fim_edit_sim_diff'], False)} (losses on {f['edit_format']['loss_items']} "
              f"and {f['fim_format']['loss_items']} items cut alike)")
    print("\nshare of the context length per part of the training examples (mean tokens)")
    print(f"{'variant':<14}" + "".join(f"{p:>12}" for p in PARTS) + f"{'filled':>9}{'FIM':>7}")
    for v in r["variants"]:
        b = v["context_budget"]
        print(f"{v['name']:<14}" + "".join(f"{b['context_share'][p]:>7.1%} {b['mean_tokens'][p]:>4.0f}"
                                           for p in PARTS) + f"{b['filled']:>9.1%}{b['fim_examples']:>7.0%}")
    for name, why in r["skipped_variants"].items():
        print(f"variant {name} skipped: {why}")
    for v in r["variants"]:
        if v["training"]["deferred_commits"]:
            print(f"variant {v['name']}: its round deferred {v['training']['deferred_commits']} of the commits: "
                  f"not an equal budget")
    xf = r["cross_file"]
    if xf["test_items_with_blocks"]:
        print(f"test items with cross-file blocks: {xf['test_items_with_blocks']} of {xf['test_items']}")
    if xf["train_rate"]:
        print(f"cross-file resolution (trained part): {xf['train_rate']['resolved']} of "
              f"{xf['train_rate']['referencing']} referencing examples ({xf['train_rate']['rate']:.0%})")
    print(f"{r['commits_trained']} commits trained by every variant ({r['commits_available']} available), "
          f"{r['steps']} steps each; test: {r['eval_sizes']['test_commits']} commits, {r['eval_sizes']['loss_items']} "
          f"loss items ({r['eval_sizes'].get('fim_loss_items', '-')} in the FIM rendering), "
          f"{r['eval_sizes']['fim_items']} FIM items")
    print("wall / CPU s: " + ", ".join(f"{k} {v['wall_s']:.0f}/{v['cpu_s']:.0f}" for k, v in r["phases"].items())
          + f"; total {r['wall_s']:.0f}/{r['cpu_s']:.0f}, load avg "
          f"{', '.join(f'{x:.1f}' for x in r['load_avg'])} on {r['cores']} cores")


if __name__ == "__main__":
    sys.exit(main())
