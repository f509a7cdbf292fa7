"""What several subcommands share: asking the daemon, naming a repository to it, printing hook actions,
saying what is wrong with a store."""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from ..control import ControlError, DaemonNotRunning, request
from ..store import StoreDamaged, StoreError, StoreOutdated
from . import CommandFailed


def repo_selector(path: str) -> str:
    """An existing path is sent absolute (the daemon's cwd differs); anything else as typed (a repo name)."""
    return os.path.abspath(path) if os.path.exists(path) else path


def ask_daemon(payload: dict[str, Any], *, timeout: float = 5.0) -> dict[str, Any]:
    """The daemon's reply, or CommandFailed after a one-line explanation (1: not running or refused, 2: broken)."""
    try:
        reply = request(payload, timeout=timeout)
    except DaemonNotRunning as exc:
        print(f"gitlora: {exc}", file=sys.stderr)
        raise CommandFailed(1) from None
    except ControlError as exc:
        print(f"gitlora: error: {exc}", file=sys.stderr)
        raise CommandFailed(2) from None
    if not reply.get("ok"):
        print(f"gitlora: {reply.get('error')}", file=sys.stderr)
        raise CommandFailed(1)
    return reply


def print_hook_actions(actions) -> None:
    for action in actions:
        detail = f" ({action.detail})" if action.detail else ""
        print(f"  {action.hook:16} {action.action}{detail}")


def store_error_line(exc: StoreError) -> str:
    """One line for any store error; a damaged store's line ends with the command that rebuilds it."""
    if isinstance(exc, StoreDamaged):
        return f"{exc}; rebuild it from git: {repair_command(exc.path)}"
    if isinstance(exc, StoreOutdated):
        return f"{exc}; re-derive it from git: {repair_command(exc.path, 'upgrade')}"
    return str(exc)


def repair_command(store_dir: Path, verb: str = "repair") -> str:
    """`gitlora repair <the repository>` (or another verb) for a store dir, the repository read from its state
    dir's repo.json."""
    try:
        info = json.loads((Path(store_dir).parent / "repo.json").read_text())
        target = info.get("workdir") or info.get("git_dir")
    except (OSError, ValueError, AttributeError):
        target = None
    return f"gitlora {verb} {shlex.quote(str(target))}" if target else f"gitlora {verb} REPO"
