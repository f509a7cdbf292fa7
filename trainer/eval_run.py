"""`gitlora eval`'s model side: evaluate the base model and chosen adapter versions on example sets.

    python -m gitlora.trainer.eval_run --spec EVAL_SPEC.json

EVAL_SPEC.json = {"base_model", "adapters_dir", "versions": ["v0003", ...],
                  "eval_shards": [paths],
                  "sets": {"window": [commit hex, ...] | null, "older": [commit hex, ...]},
                  "train": {round settings; missing keys = trainer/spec.py's defaults},
                  "result_file": path}

A set given as null holds every example of `eval_shards`. The base model is loaded once; every version is
loaded onto it as a named peft adapter and switched in turn; the base's numbers come from the same weights with
the adapters disabled, exactly as a round measures them. The examples, their tokenisation and the FIM sample are
the same for every model, so every comparison is paired (trainer/evaluate.py, trainer/metrics.py).

The result (written atomically to `result_file`; the CLI reads it):

    {"base_model", "versions": ["v0003", ...],
     "sets": {"window": {"examples", "commits"}, "older": {...}},
     "models": {"base": {"window": SUMMARY, "older": SUMMARY},
                "v0003": {"window": SUMMARY, "older": SUMMARY,
                          "vs_base": {"window": {METRIC: {"kind": "rel"|"abs", "value", "ci95_low",
                                                           "ci95_high"}}, "older": {...}},
                          "created_at", "current", "parent", "promoted"}}}

SUMMARY is the round's evaluation record (ISSUE11.md): {examples, commits, target_loss, changed_loss,
fim_exact, fim_edit_sim, fim_n}. Differences are relative for losses (lower is better) and absolute for the
completion scores (shares in [0, 1], where a base of 0 would make a relative number meaningless).

Exit status as the trainer's: 0 done, 1 failure, 2 bad spec / nothing to evaluate, 3 out of memory. Errors are
also written to `result_file` as {"error": reason, "message": one line}, so the CLI can say why.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

from gitlora.daemon.fsutil import atomic_write_text
from gitlora.trainer import data, registry
from gitlora.trainer.round import SpecError, load_base, round_plan  # SpecError: exit 2 with its one line
from gitlora.trainer.spec import DEFAULTS, EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OOM, EXIT_SPEC, keep_commits

# How each metric compares against the base: relative for losses, absolute (points of a share) for scores.
METRIC_KINDS = {"changed_loss": "rel", "target_loss": "rel", "fim_exact": "abs", "fim_edit_sim": "abs"}


def _settings(spec: dict) -> dict:
    return {**DEFAULTS, **(spec.get("train") or {})}


def select_sets(records: list[dict], sets: dict[str, list[str] | None]) -> dict[str, list[dict]]:
    """Each named set's examples: those whose commit is listed (None: all records)."""
    return {name: keep_commits(records, commits) for name, commits in sets.items()}


def version_info(adapters_dir: Path, version: str) -> dict:
    """When a version was made, whether it is current, its parent and whether its round promoted it."""
    vdir = adapters_dir / version
    try:
        metrics = json.loads((vdir / registry.METRICS).read_text())
    except (OSError, ValueError):
        metrics = {}
    gate = metrics.get("gate")
    promoted = gate.get("passed") if isinstance(gate, dict) else metrics.get("gate_passed")
    return {"created_at": vdir.stat().st_mtime, "current": registry.current_version(adapters_dir) == version,
            "parent": metrics.get("parent"), "promoted": promoted}


def finite(summary: dict) -> dict:
    """JSON has no NaN: a number that is not finite is reported as unknown (None)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}


def versus(base, other) -> dict:
    """Every metric of `other` against the base on the same examples (metrics.compare: paired, bootstrap over
    commits), keyed by metric with how it compares."""
    from gitlora.trainer import metrics

    compared = metrics.compare(base.losses, base.fim, other.losses, other.fim)
    out = {}
    for metric, kind in METRIC_KINDS.items():
        estimate = compared.get(f"{metric}_{'rel' if kind == 'rel' else 'diff'}") or {}
        out[metric] = finite({"kind": kind, "value": estimate.get("value"), "ci95_low": estimate.get("low"),
                              "ci95_high": estimate.get("high"), "commits": estimate.get("commits", 0)})
    return out


def run_eval(spec: dict) -> dict:
    for key in ("base_model", "adapters_dir", "sets"):
        if not spec.get(key):
            raise SpecError(f"spec lacks {key!r}")
    cfg = _settings(spec)
    base_model, adapters_dir = str(spec["base_model"]), Path(spec["adapters_dir"])
    versions = list(spec.get("versions") or [])
    for version in versions:
        if not (adapters_dir / version).is_dir():
            raise SpecError(f"no adapter version {version!r} in {adapters_dir}")
    records = data.read_shards(spec.get("eval_shards") or [])
    chosen = select_sets(records, spec["sets"])
    if not any(chosen.values()):
        raise SpecError("no held-out examples to evaluate on: the window is empty (commit more, or wait for "
                        "the daemon to flush its shards)")

    # ---- plan: the round's, so that numbers compare with the rounds' own
    plan = dataclasses.replace(round_plan(base_model, cfg), gradient_checkpointing=False)
    micro_batch = int(cfg["micro_batch"]) or plan.micro_batch

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from gitlora.trainer import evaluate, metrics, score_cache

    torch.manual_seed(int(cfg["seed"]))
    device = torch.device(plan.device)
    dtype = getattr(torch, plan.compute_dtype)
    half = plan.compute_dtype in ("float16", "bfloat16")

    def autocast():
        return torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and half else contextlib.nullcontext()

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    prepared = {name: evaluate.prepare(recs, tokenizer, plan.context_length,
                                       max_examples=int(cfg["eval_max_examples"]),
                                       fim_samples=int(cfg["fim_samples"]), seed=int(cfg["seed"]))
                for name, recs in chosen.items()}
    model = load_base(base_model, plan, torch)
    model.eval()

    # Scores the rounds (or an earlier eval) computed for the same model on the same examples are reused.
    base_key = score_cache.base_key(base_model, plan.to_dict())

    def measure(name: str, model_key: str) -> dict:
        cache = score_cache.ScoreCache.for_model(adapters_dir, name, model_key)
        out = {set_name: evaluate.evaluate(model, tokenizer, evalset, micro_batch, torch, device, autocast, cache)
               for set_name, evalset in prepared.items()}
        cache.save()
        cached[name] = cache.stats()
        return out

    scores: dict[str, dict] = {}
    cached: dict[str, dict] = {}
    if versions:
        model = PeftModel.from_pretrained(model, str(adapters_dir / versions[0]), adapter_name=versions[0])
        for version in versions[1:]:
            model.load_adapter(str(adapters_dir / version), adapter_name=version)
        with model.disable_adapter():
            scores["base"] = measure("base", base_key)
        for version in versions:
            model.set_adapter(version)
            scores[version] = measure(version, score_cache.adapter_key(base_key, adapters_dir / version))
    else:
        scores["base"] = measure("base", base_key)

    result = {"base_model": base_model, "versions": versions, "plan": plan.to_dict(), "cached": cached,
              "sets": {name: {"examples": len(evalset.records), "commits": len(set(evalset.commits)),
                              "skipped": evalset.skipped, "truncated": evalset.truncated,
                              "selected": len(chosen[name])}
                       for name, evalset in prepared.items()},
              "models": {}}
    for name, sets in scores.items():
        entry: dict = {set_name: finite(s.summary()) for set_name, s in sets.items()}
        for set_name, s in sets.items():
            bad = metrics.nonfinite(s.losses)
            if bad:  # fp16 overflow or broken weights: the mean is unknown, and the table says why
                entry[set_name]["nonfinite"] = bad
        if name != "base":
            entry["vs_base"] = {set_name: versus(scores["base"][set_name], s) for set_name, s in sets.items()}
            entry.update(version_info(adapters_dir, name))
        result["models"][name] = entry
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gitlora.trainer.eval_run",
                                 description="Evaluate the base model and adapter versions on held-out examples.")
    ap.add_argument("--spec", required=True, help="path of the eval run's spec (JSON)")
    args = ap.parse_args(argv)
    try:
        spec = json.loads(Path(args.spec).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        print(f"eval_run: unreadable spec: {exc}", file=sys.stderr)
        return EXIT_SPEC
    out = spec.get("result_file")

    def report(result: dict) -> None:
        text = json.dumps(result, indent=1, allow_nan=False)
        if out:
            atomic_write_text(Path(out), text + "\n")
        else:
            print(text)

    from gitlora.trainer.round import _is_oom  # the trainer's one test for out-of-memory errors

    started = time.time()
    try:
        result = run_eval(spec)
        result["seconds"] = round(time.time() - started, 2)
        report(result)
        return 0
    except SpecError as exc:
        report({"error": "spec", "message": str(exc)})
        return EXIT_SPEC
    except BaseException as exc:  # noqa: BLE001 - the CLI must always learn why
        if _is_oom(exc):
            report({"error": "oom", "message": str(exc)[:500]})
            return EXIT_OOM
        if isinstance(exc, KeyboardInterrupt):
            report({"error": "interrupted", "message": "interrupted"})
            return EXIT_INTERRUPTED
        traceback.print_exc()
        report({"error": "exception", "message": f"{type(exc).__name__}: {exc}"[:500]})
        return EXIT_FAIL


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
