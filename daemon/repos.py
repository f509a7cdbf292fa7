"""Resolving a user's repository to its reader, its state dir and its store, and the registry of repos the
daemon serves. The one place that decides which state dir belongs to which repository."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .config import Config
from .gitrepo import GitRepo


@dataclass
class OpenedRepo:
    git: GitRepo
    paths: paths.RepoPaths


def open_repo(path: str | os.PathLike[str], config: Config) -> OpenedRepo:
    git = GitRepo(path, exclude=config.ingest.exclude, include_remotes=config.ingest.include_remotes)
    repo_paths = paths.RepoPaths.for_git_dir(git.common_dir).ensure()
    info = {"git_dir": str(git.common_dir), "workdir": str(git.workdir) if git.workdir else None,
            "name": git.name}
    if not repo_paths.info.exists() or json.loads(repo_paths.info.read_text() or "{}") != info:
        atomic_write_text(repo_paths.info, json.dumps(info, indent=2) + "\n")
    return OpenedRepo(git, repo_paths)


def atomic_write_text(target: Path, text: str) -> None:
    """temp file + fsync + rename: readers see the old or the new file, never half of one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def registered() -> list[str]:
    """Git dirs of the repositories `gitlora install` registered."""
    try:
        data = json.loads(paths.registry_path().read_text())
    except (OSError, ValueError):
        return []
    return [str(p) for p in data.get("repos", []) if isinstance(p, str)]


def register(git_dir: Path) -> bool:
    repos = registered()
    if str(git_dir) in repos:
        return False
    atomic_write_text(paths.registry_path(), json.dumps({"repos": [*repos, str(git_dir)]}, indent=2) + "\n")
    return True


def unregister(git_dir: Path) -> bool:
    repos = registered()
    if str(git_dir) not in repos:
        return False
    repos.remove(str(git_dir))
    atomic_write_text(paths.registry_path(), json.dumps({"repos": repos}, indent=2) + "\n")
    return True
