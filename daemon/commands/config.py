"""`gitlora config`: print the effective configuration (defaults overlaid with the user's file), or check one."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import config as config_mod
from .. import paths

_DEFAULT = object()  # `--check` given without FILE: check the file the daemon reads


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the effective config, or check a config file")
    p.add_argument("--path", action="store_true", help="print only the config file's path")
    p.add_argument("--check", nargs="?", const=_DEFAULT, default=None, metavar="FILE",
                   help="validate FILE (default: the config file the daemon reads); prints one line, "
                        "exit 0 when it can be used, 1 when not")
    p.set_defaults(run=run)


def check(path: Path, *, must_exist: bool) -> int:
    """One line: `ok: PATH` or the reason it cannot be used; 0 or 1."""
    if must_exist and not (path.exists() or path.is_symlink()):
        print(f"gitlora: error: {path}: no such file", file=sys.stderr)
        return 1
    try:
        config_mod.load(path)
    except config_mod.ConfigError as exc:
        print(f"gitlora: error: {exc}", file=sys.stderr)
        return 1
    note = "" if path.exists() else " (no file: the defaults apply)"
    print(f"ok: {path}{note}")
    return 0


def run(args: argparse.Namespace) -> int:
    path = paths.config_path()
    if args.check is not None:
        explicit = args.check is not _DEFAULT
        return check(Path(args.check) if explicit else path, must_exist=explicit)
    if args.path:
        print(path)
        return 0
    config = config_mod.load(path)
    origin = "defaults overlaid with " + str(path) if path.exists() else f"defaults ({path} does not exist)"
    print(f"# effective gitlora config: {origin}\n{config_mod.to_toml(config)}", end="")
    return 0
