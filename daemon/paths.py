"""Where gitlora keeps things on disk (the contract in DESIGN.md, *State on disk*).

Per-repo state lives outside the work tree, keyed by the repository's absolute *common* git dir so that
linked worktrees of one repository share one store.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / fallback


def state_home() -> Path:
    """Root of all per-repo state; GITLORA_STATE_HOME overrides the XDG default."""
    override = os.environ.get("GITLORA_STATE_HOME")
    if override:
        return Path(override)
    return _xdg("XDG_STATE_HOME", ".local/state") / "gitlora"


def config_path() -> Path:
    override = os.environ.get("GITLORA_CONFIG")
    if override:
        return Path(override)
    return _xdg("XDG_CONFIG_HOME", ".config") / "gitlora" / "config.toml"


def data_home() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "gitlora"


def models_dir() -> Path:
    return data_home() / "models"


def runtime_dir() -> Path:
    """Socket and lock directory; falls back to a per-uid dir in /tmp when XDG_RUNTIME_DIR is unset."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base):
        return Path(base) / "gitlora"
    return Path(f"/tmp/gitlora-{os.getuid()}")


def control_socket_path() -> Path:
    return runtime_dir() / "control.sock"


def daemon_lock_path() -> Path:
    return runtime_dir() / "daemon.lock"


def registry_path() -> Path:
    """The list of repositories the daemon serves (written by `gitlora install`)."""
    return state_home() / "repos.json"


def repo_name(common_git_dir: str | os.PathLike[str]) -> str:
    """What a repository is called everywhere (status, examples, state dirs): the folder holding `.git`, or a
    bare repository's folder without its `.git` suffix (`foo.git` is `foo`)."""
    git_dir = Path(os.path.abspath(common_git_dir))
    return git_dir.parent.name if git_dir.name == ".git" else git_dir.name.removesuffix(".git")


def repo_key(common_git_dir: str | os.PathLike[str]) -> str:
    """`<repo-name>-<8 hex of the absolute git dir path>`: readable and unique per repository."""
    git_dir = Path(os.path.abspath(common_git_dir))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in repo_name(git_dir)) or "repo"
    digest = hashlib.sha256(str(git_dir).encode()).hexdigest()[:8]
    return f"{safe}-{digest}"


@dataclass(frozen=True)
class RepoPaths:
    """Every per-repo path in one place, so no module invents its own layout."""

    root: Path

    @classmethod
    def for_git_dir(cls, common_git_dir: str | os.PathLike[str]) -> "RepoPaths":
        return cls(state_home() / "repos" / repo_key(common_git_dir))

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def rounds(self) -> Path:
        return self.root / "rounds"

    @property
    def log(self) -> Path:
        return self.root / "gitlora.log"

    @property
    def info(self) -> Path:
        """Small JSON naming the repository this state belongs to (for humans and `status`)."""
        return self.root / "repo.json"

    def ensure(self) -> "RepoPaths":
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self
