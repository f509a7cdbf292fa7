"""Filesystem events on a repository's refs and spool, as nudges.

Events are hints, never data: inotify drops events on queue overflow (watchdog #654) and IDEs or libgit2
tools update refs in ways hooks never see, so every nudge only makes the repo worker reconcile ref tips
against the store. Only refs/, packed-refs, HEAD, worktrees/*/HEAD and the spool count; object writes and
*.lock churn are ignored.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from watchdog.events import (DirMovedEvent, FileClosedEvent, FileCreatedEvent, FileMovedEvent,
                             FileSystemEvent, FileSystemEventHandler)
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch


def is_relevant(git_dir: Path, spool: Path, path: str) -> bool:
    """Pure filter: does a change at `path` possibly mean new commits?"""
    if not path or path.endswith(".lock"):
        return False
    p = Path(path)
    if p == spool:
        return True
    try:
        rel = p.relative_to(git_dir)
    except ValueError:
        return False
    parts = rel.parts
    if not parts:
        return False
    if parts[0] == "refs":
        return True
    if parts in (("packed-refs",), ("HEAD",), ("ORIG_HEAD",), ("FETCH_HEAD",)):
        return True
    return len(parts) == 3 and parts[0] == "worktrees" and parts[2] == "HEAD"


class _Handler(FileSystemEventHandler):
    def __init__(self, git_dir: Path, spool: Path, nudge: Callable[[str], None]) -> None:
        self.git_dir, self.spool, self.nudge = git_dir, spool, nudge

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        for path in (event.src_path, getattr(event, "dest_path", "")):
            if isinstance(path, bytes):
                path = path.decode("utf-8", "replace")
            if is_relevant(self.git_dir, self.spool, path):
                self.nudge(f"fs:{Path(path).name}")
                return


class RepoWatcher:
    """Watches one repository on a shared observer; `state` is what `gitlora status` shows."""

    def __init__(self, observer: Observer, git_dir: Path, state_dir: Path, spool: Path,
                 nudge: Callable[[str], None]) -> None:
        self.state = "starting"
        self._observer = observer
        self._watches: list[ObservedWatch] = []
        handler = _Handler(git_dir, spool, nudge)
        # Git and libgit2 update refs, packed-refs and HEAD by renaming a lock file into place, so only renames
        # (and, under refs/, creations: a new ref directory, a ref written in place by a tool without lock
        # files) matter; asking the kernel for nothing else keeps the daemon from waking on every write of the
        # index, or on the index.lock and COMMIT_EDITMSG that `git commit` creates in the git dir, while the
        # commit runs. A hook appends its spool line with one write and closes the file: the close
        # (IN_CLOSE_WRITE) is the one event that means "a line is there".
        root_events = [FileMovedEvent, DirMovedEvent]
        ref_events = [FileMovedEvent, DirMovedEvent, FileCreatedEvent]
        spool_events = [FileCreatedEvent, FileClosedEvent, FileMovedEvent]
        try:
            self._watches.append(observer.schedule(handler, str(git_dir), recursive=False, event_filter=root_events))
            self._watches.append(observer.schedule(handler, str(git_dir / "refs"), recursive=True,
                                                   event_filter=ref_events))
            if (git_dir / "worktrees").is_dir():
                self._watches.append(observer.schedule(handler, str(git_dir / "worktrees"), recursive=True,
                                                       event_filter=ref_events))
            state_dir.mkdir(parents=True, exist_ok=True)
            self._watches.append(observer.schedule(handler, str(state_dir), recursive=False,
                                                   event_filter=spool_events))
            self.state = "watching"
        except OSError as exc:  # e.g. inotify watch limit: the periodic rescan still covers this repo
            self.state = f"failed: {exc}; relying on periodic rescans"

    def close(self) -> None:
        for watch in self._watches:
            try:
                self._observer.unschedule(watch)
            except (KeyError, ValueError, OSError):
                pass
        self._watches.clear()
        self.state = "stopped"
