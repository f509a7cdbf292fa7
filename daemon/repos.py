"""Resolving a user's repository to its reader, its state dir and its store, and the registry of repos the
daemon serves. The one place that decides which state dir belongs to which repository."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paths
from .config import Config
from .fsutil import atomic_write_text
from .gitenv import git_env
from .gitrepo import GitRepo, GitRepoError


@dataclass
class OpenedRepo:
    git: GitRepo
    paths: paths.RepoPaths


def open_repo(path: str | os.PathLike[str], config: Config) -> OpenedRepo:
    git = GitRepo(path, exclude=config.ingest.exclude, include_remotes=config.ingest.include_remotes,
                  skip_vendored=config.ingest.skip_vendored_crates)
    repo_paths = paths.RepoPaths.for_git_dir(git.common_dir).ensure()
    write_info(repo_paths, git)
    return OpenedRepo(git, repo_paths)


def read_info(repo_paths: paths.RepoPaths) -> dict[str, Any]:
    try:
        info = json.loads(repo_paths.info.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def write_info(repo_paths: paths.RepoPaths, git: GitRepo, **extra: Any) -> None:
    """Name the repository a state dir belongs to, with its root commits: what recognises it after a move."""
    old = read_info(repo_paths)
    roots = old.get("roots") or root_commits(git.common_dir)  # history never loses its roots: walked once
    info = {"git_dir": str(git.common_dir), "workdir": str(git.workdir) if git.workdir else None,
            "name": git.name, "roots": roots, **{k: v for k, v in old.items() if k == "moved_from"}, **extra}
    if info != old:
        atomic_write_text(repo_paths.info, json.dumps(info, indent=2) + "\n")


def root_commits(git_dir: str | os.PathLike[str]) -> list[str]:
    """The parentless commits reachable from any ref, sorted (empty for a repository without commits)."""
    try:
        done = subprocess.run(["git", "--git-dir", str(git_dir), "rev-list", "--max-parents=0", "--all"],
                              capture_output=True, text=True, env=git_env(), timeout=300)
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted(set(done.stdout.split())) if done.returncode == 0 else []


def moved_candidates(git: GitRepo) -> list[str]:
    """Git dirs of state dirs that look like this repository before a move: their repository is gone and
    they recorded the same root commits. (Their stores are checked by `holds_history_of`.)"""
    roots = root_commits(git.common_dir)
    if not roots:
        return []
    here = str(git.common_dir)
    found = []
    base = paths.state_home() / "repos"
    for info_file in sorted(base.glob("*/repo.json")) if base.is_dir() else []:
        info = read_info(paths.RepoPaths(info_file.parent))
        old = info.get("git_dir")
        if not isinstance(old, str) or old == here or Path(old).exists():
            continue
        if sorted(info.get("roots") or []) == roots and paths.RepoPaths.for_git_dir(old).root == info_file.parent:
            found.append(old)
    return found


def holds_history_of(old_git_dir: str, git: GitRepo, sample: int = 64) -> bool:
    """Are the commits stored for `old_git_dir` (a sample of them) in `git`? True for a store with none."""
    from .store import Store, StoreError  # the CLI's fast paths need not load lmdb

    store_dir = paths.RepoPaths.for_git_dir(old_git_dir).store
    if not (store_dir / "data.mdb").exists():
        return True
    try:
        with Store(store_dir, readonly=True) as store:
            oids = []
            for oid, _record in store.iter_commits():
                oids.append(oid.hex())
                if len(oids) >= sample:
                    break
    except StoreError:
        return False
    for oid in oids:
        try:
            git.resolve_commit(oid)
        except (GitRepoError, KeyError, ValueError):
            return False
    return True


def find_moved(git: GitRepo, *, skip: set[str] = frozenset()) -> str | None:
    """The git dir this repository was registered under before it moved, if its state is there to adopt."""
    for old in moved_candidates(git):
        if old not in skip and holds_history_of(old, git):
            return old
    return None


def adopt(old_git_dir: str, git: GitRepo) -> paths.RepoPaths:
    """Move the state dir of `old_git_dir` to where `git`'s state belongs, and re-register it there.

    A state dir already at the new place may hold only what hooks wrote before this (repo.json, spool lines):
    its spool lines are appended to the adopted spool. One holding more is a state of its own: refused."""
    old_paths = paths.RepoPaths.for_git_dir(old_git_dir)
    new_paths = paths.RepoPaths.for_git_dir(git.common_dir)
    if new_paths.root.exists():
        extra = {p.name for p in new_paths.root.iterdir()} - {"repo.json", "spool"}
        if extra:
            raise GitRepoError(f"{new_paths.root} already holds gitlora state ({', '.join(sorted(extra))}); "
                               f"not adopting {old_paths.root}")
        if new_paths.spool.exists() and new_paths.spool.stat().st_size:
            with open(old_paths.spool, "ab") as spool:
                spool.write(new_paths.spool.read_bytes())
        shutil.rmtree(new_paths.root)
    os.rename(old_paths.root, new_paths.root)
    write_info(new_paths, git, moved_from=old_git_dir)
    entries = registered()
    new = str(git.common_dir)
    updated = [new if entry == old_git_dir else entry for entry in entries]
    if new not in updated:
        updated.append(new)
    updated = list(dict.fromkeys(updated))
    atomic_write_text(paths.registry_path(), json.dumps({"repos": updated}, indent=2) + "\n")
    return new_paths


def registered_match(selector: str) -> list[str]:
    """Registered git dirs a path or name names, without needing the repository to exist (a deleted one):
    its git dir, its work tree (from the state dir's info), or its name."""
    path = os.path.abspath(os.path.expanduser(selector))
    found = []
    for git_dir in registered():
        info = read_info(paths.RepoPaths.for_git_dir(git_dir))
        names = {git_dir, info.get("workdir"), str(Path(git_dir).parent) if Path(git_dir).name == ".git" else None}
        if path in names or selector == git_dir or selector == paths.repo_name(git_dir):
            found.append(git_dir)
    return found


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
