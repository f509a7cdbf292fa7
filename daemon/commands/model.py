"""`gitlora model tiny [--dir DIR]`: build the small local StarCoder2 model that tests and the demo use."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="local models")
    p.add_argument("which", choices=("tiny",))
    p.add_argument("--dir", type=Path, default=None, help="where to build it (default: the XDG data dir)")
    p.add_argument("--force", action="store_true", help="rebuild even if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gitlora.trainer.tiny import build_tiny_model  # imports transformers: only for this command

    path = build_tiny_model(args.dir, force=args.force)
    print(path)
    print(f"use it: put  base_model = \"{path}\"  under [train] in your gitlora config")
    return 0
