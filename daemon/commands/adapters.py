"""`gitlora adapters list | rollback [VERSION] | export (--merged DIR | --gguf FILE) [VERSION]`."""
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
    how = p.add_mutually_exclusive_group()
    how.add_argument("--merged", type=Path, default=None, help="export: directory for the merged full model")
    # FILE [VERSION] in the option itself, so `export --gguf FILE v0003` parses (argparse takes no positional
    # after an option once the positionals are consumed); `export v0003 --gguf FILE` works too.
    how.add_argument("--gguf", nargs="+", default=None, metavar=("FILE", "VERSION"),
                     help="export: file for a llama.cpp LoRA adapter (llama-server --lora, Ollama ADAPTER)")
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
    if args.gguf is not None:
        if len(args.gguf) > 2 or (len(args.gguf) == 2 and args.version is not None):
            print("gitlora: export --gguf takes FILE and at most one VERSION")
            return 2
        version = args.gguf[1] if len(args.gguf) == 2 else args.version
        return _export_gguf(adapters, version, config.train.base_model, Path(args.gguf[0]))
    if args.merged is None:
        print("gitlora: export needs --merged DIR or --gguf FILE")
        return 2
    try:
        out = registry.export_merged(adapters, args.version, config.train.base_model, args.merged)
    except ValueError as exc:
        print(f"gitlora: {exc}")
        return 1
    print(f"merged model written to {out} (convert for llama.cpp with convert_hf_to_gguf.py)")
    return 0


def _export_gguf(adapters: Path, version: str | None, base_model: str, out: Path) -> int:
    """The adapter as a llama.cpp LoRA GGUF, the base model untouched (gitlora.trainer.gguf_export)."""
    from gitlora.trainer import gguf_export, registry

    version = version or registry.current_version(adapters)
    if version is None:
        print(f"gitlora: no adapter to export in {adapters}")
        return 1
    if version.isdigit():
        version = registry.version_name(int(version))
    if not registry.VERSION_RE.match(version) or not (adapters / version).is_dir():
        print(f"gitlora: no adapter version {version!r} in {adapters}")
        return 1
    try:
        result = gguf_export.export_gguf(adapters / version, base_model, out, version=version)
    except (gguf_export.ExportError, OSError) as exc:  # OSError: the target cannot be written
        print(f"gitlora: cannot export {version} as GGUF: {exc}")
        return 1
    print(f"{version} written to {result['file']} ({result['architecture']} LoRA, r={result['rank']}, "
          f"alpha={result['alpha']:g}, {result['lora_pairs']} tensor pairs); use it on the base model's GGUF: "
          f"llama-server -m BASE.gguf --lora {result['file']}")
    return 0
