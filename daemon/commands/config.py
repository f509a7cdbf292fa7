"""`gitlora config`: print the effective configuration (defaults overlaid with the user's file)."""
from __future__ import annotations

import argparse

from .. import config as config_mod
from .. import paths


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the effective config")
    p.add_argument("--path", action="store_true", help="print only the config file's path")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = paths.config_path()
    if args.path:
        print(path)
        return 0
    config = config_mod.load(path)
    origin = "defaults overlaid with " + str(path) if path.exists() else f"defaults ({path} does not exist)"
    print(f"# effective gitlora config: {origin}\n{config_mod.to_toml(config)}", end="")
    return 0
