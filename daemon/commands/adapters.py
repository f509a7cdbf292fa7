"""`gitlora adapters list | rollback [VERSION] | export --merged DIR`."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .. import config as config_mod
from ..repos import open_repo


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapters", help="list, roll back or export adapter versions")
    p.add_argument("action", choices=("list", "rollback", "export"))
    p.add_argument("version", nargs="?", default=None, help="rollback/export: a version (default: see help)")
    p.add_argument("--repo", default=".")
    p.add_argument("--merged", type=Path, default=None, help="export: directory for the merged full model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def _fmt(loss) -> str:
    return f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"


def run(args: argparse.Namespace) -> int:
    from gitlora.trainer import registry  # torch-free except export_merged

    config = config_mod.load()
    adapters = open_repo(args.repo, config).paths.adapters
    if args.action == "list":
        versions = registry.list_versions(adapters)
        if args.json:
            print(json.dumps(versions, indent=2))
            return 0
        if not versions:
            print("no adapters yet")
        for v in versions:
            m = v["metrics"]
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(Path(v["path"]).stat().st_mtime))
            print(f"{'*' if v['current'] else ' '} {v['version']}  {when}  eval {_fmt(m.get('eval_loss_before'))} -> "
                  f"{_fmt(m.get('eval_loss_after'))}  train {_fmt(m.get('train_loss_first'))} -> "
                  f"{_fmt(m.get('train_loss_last'))}  {m.get('target_tokens', '-')} tokens  "
                  f"{'promoted' if m.get('gate_passed') else 'not promoted'}")
        return 0
    if args.action == "rollback":
        try:
            version = registry.rollback(adapters, args.version)
        except ValueError as exc:
            print(f"gitlora: {exc}")
            return 1
        print(f"current adapter is now {version}")
        return 0
    if args.merged is None:
        print("gitlora: export needs --merged DIR")
        return 2
    try:
        out = registry.export_merged(adapters, args.version, config.train.base_model, args.merged)
    except ValueError as exc:
        print(f"gitlora: {exc}")
        return 1
    print(f"merged model written to {out} (convert for llama.cpp with convert_hf_to_gguf.py)")
    return 0
