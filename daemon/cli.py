"""The `gitlora` command: a thin dispatcher over daemon/commands/ (one module per subcommand).

Heavy modules are imported only by the subcommand that needs them, so `gitlora status` starts fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .commands import CommandFailed
from .config import ConfigError
from .gitrepo import GitRepoError
from .store import StoreError

# Subcommand modules under gitlora.daemon.commands, in help order.
COMMANDS = ("demo", "install", "uninstall", "daemon", "status", "ingest", "backfill", "stats", "examples",
            "repair", "upgrade", "config", "service", "train", "eval", "plan", "model", "adapters")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gitlora", description="Keep a code model continuously LoRA-fine-tuned on your Rust repository.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"gitlora.daemon.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["daemon"]:
        # structlog renders exceptions with rich (and pygments) whenever it can import them; the daemon logs
        # JSON to a file and never uses them, and they would stay resident for its whole life.
        sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ConfigError, GitRepoError) as exc:
        print(f"gitlora: error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        from .commands.common import store_error_line  # the error path only: it imports the socket client

        print(f"gitlora: error: {store_error_line(exc)}", file=sys.stderr)
        return 2
    except CommandFailed as failed:  # the command already said why
        return failed.code
    except BrokenPipeError:  # `gitlora examples | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
