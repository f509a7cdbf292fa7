"""`gitlora eval [REPO] [--versions current|all|vNNNN,...] [--json] [--plot FILE.png]`: how much the adapters
help, measured now on the repository's held-out window and older slice against the base model.

The model runs in a subprocess (`python -m gitlora.trainer.eval_run`), as rounds do: this process never imports
torch. Which commits are held out is decided by the same pure planner the daemon uses, applied to the same
manifest and round state on disk, so the answer does not depend on whether a daemon is running.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gitlora.trainer import spec as round_spec  # torch-free: the exit codes eval_run shares with the trainer

from .. import config as config_mod
from .. import eval_view, round_checks
from ..gitrepo import GitRepo
from ..paths import RepoPaths
from ..round_planning import RoundState, select_data
from ..shards import read_manifest
from . import CommandFailed

EXIT_REASONS = {round_spec.EXIT_FAIL: "the evaluation failed", round_spec.EXIT_SPEC: "nothing to evaluate",
                round_spec.EXIT_OOM: "out of memory", round_spec.EXIT_INTERRUPTED: "interrupted"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="measure the base model and adapter versions on the held-out commits")
    p.add_argument("repo", nargs="?", default=".")
    p.add_argument("--versions", default=None,
                   help="current (default), all, or a comma-separated list such as v0003,v0005 (or 3,5); "
                        "with --plot the default is all")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="also draw each metric by version over time to this PNG")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (default: none)")
    p.set_defaults(run=run)


def choose_versions(selector: str, available: list[str], current: str | None) -> list[str]:
    """The versions a --versions value names, oldest first (pure). ValueError with a one-line reason."""
    if selector == "current":
        return [current] if current else []
    if selector == "all":
        return list(available)
    chosen = []
    for item in (s.strip() for s in selector.split(",")):
        if not item:
            continue
        name = f"v{int(item):04d}" if item.isdigit() else item
        if name not in available:
            listed = ", ".join(available) if available else "none yet"
            raise ValueError(f"no adapter version {item!r} (versions: {listed})")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ValueError("--versions names no version")
    return sorted(chosen, key=available.index)


def held_out(manifest: dict[str, Any], state: RoundState, settings, shards_dir: Path) -> dict[str, Any]:
    """What the next round would be judged on: the rolling window and the older slice, with the shards holding
    them. The daemon's own planner call on the same manifest and round state, so the sets are the daemon's."""
    plan = select_data(manifest, state, settings)
    window, older = plan.window_commits, plan.older_commits
    return {"eval_shards": [str(shards_dir / s["file"]) for s in plan.eval_shards],
            "sets": {"window": window, "older": older},
            "source": f"the daemon's planner: the newest {len(window)} commits with Rust changes "
                      f"({plan.window_examples} examples), never trained on; the older slice: {len(older)} "
                      f"commit{'' if len(older) == 1 else 's'} that left the window"}


def _load_state(rounds_dir: Path) -> RoundState:
    try:
        return RoundState.from_dict(json.loads((rounds_dir / "state.json").read_text()))
    except (OSError, ValueError):
        return RoundState()


def run(args: argparse.Namespace) -> int:
    from gitlora.trainer import registry  # torch-free

    config = config_mod.load()
    git = GitRepo(args.repo, exclude=config.ingest.exclude, include_remotes=config.ingest.include_remotes)
    repo_paths = RepoPaths.for_git_dir(git.common_dir)
    if not repo_paths.root.is_dir():  # read-only from here on: no state dir is created for a stranger
        print(f"gitlora: {git.name} has no gitlora state: install it first (`gitlora install {args.repo}`)",
              file=sys.stderr)
        return 1
    available = [v["version"] for v in registry.list_versions(repo_paths.adapters)]
    current = registry.current_version(repo_paths.adapters)
    selector = args.versions or ("all" if args.plot else "current")
    try:
        versions = choose_versions(selector, available, current)
    except ValueError as exc:
        print(f"gitlora: {exc}", file=sys.stderr)
        return 2
    data = held_out(read_manifest(repo_paths.manifest), _load_state(repo_paths.rounds), config.train,
                    repo_paths.shards)
    if not data["sets"]["window"]:
        print(f"gitlora: nothing held out yet to evaluate on in {git.name}: the window is empty (it needs "
              "two stored commits with Rust changes, flushed to shards: commit more, or wait for the daemon's "
              "quiet flush)", file=sys.stderr)
        return 1
    _, missing = round_checks.locate_base_model(config.train.base_model)
    if missing:  # the same check and next step as a round's: no download retries for minutes
        print(f"gitlora: {missing}", file=sys.stderr)
        return 1
    if not versions:
        print("gitlora: no adapter yet: only the base model is measured (a round promotes the first one)",
              file=sys.stderr)
    result = evaluate(config, repo_paths.adapters, versions, data, timeout=args.timeout)
    result.update(repo=git.name, git_dir=str(git.common_dir), window_source=data["source"],
                  finished_at=time.time())
    if args.plot:
        eval_view.write_plot(result, str(args.plot))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(eval_view.render_table(result))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0


def evaluate(config, adapters_dir: Path, versions: list[str], data: dict[str, Any], *,
             timeout: float | None = None) -> dict[str, Any]:
    """Run the eval subprocess and return its result; CommandFailed after saying why it failed."""
    with tempfile.TemporaryDirectory(prefix="gitlora-eval-") as tmp:
        spec_file, result_file, log_file = Path(tmp) / "spec.json", Path(tmp) / "result.json", Path(tmp) / "log"
        spec = {"base_model": config.train.base_model, "adapters_dir": str(adapters_dir), "versions": versions,
                "eval_shards": data["eval_shards"], "sets": data["sets"], "result_file": str(result_file),
                "train": config.train.round_settings().model_dump()}
        spec_file.write_text(json.dumps(spec, indent=1))
        print(f"evaluating the base model{' and ' + ', '.join(versions) if versions else ''} "
              f"({config.train.base_model}) ...", file=sys.stderr, flush=True)
        with open(log_file, "wb") as log:
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # found locally above, as a round's model is
            try:
                done = subprocess.run([sys.executable, "-m", "gitlora.trainer.eval_run", "--spec", str(spec_file)],
                                      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                      timeout=timeout)
            except subprocess.TimeoutExpired:  # subprocess.run has killed it
                print(f"gitlora: the evaluation did not finish within {timeout:.0f}s", file=sys.stderr)
                raise CommandFailed(1) from None
            except KeyboardInterrupt:  # Ctrl-C reached the subprocess too (same process group); run() reaped it
                print("\ngitlora: evaluation interrupted", file=sys.stderr)
                raise CommandFailed(130) from None
        try:
            result = json.loads(result_file.read_text())
        except (OSError, ValueError):
            result = {"error": EXIT_REASONS.get(done.returncode, f"exit {done.returncode}"), "message": ""}
        if done.returncode != 0 or "error" in result:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
            message = result.get("message") or (tail[-1] if tail else "")
            print(f"gitlora: {EXIT_REASONS.get(done.returncode, 'the evaluation failed')}: {message}",
                  file=sys.stderr)
            raise CommandFailed(1)
        return result
