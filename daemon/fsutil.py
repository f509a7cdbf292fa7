"""Crash-safe file and directory replacement, the one way gitlora publishes a file or a finished directory.

A reader (or a crash at any instant) sees the old version or the new one, never half of one: the new content is
written under a temporary name beside the target, flushed to disk, then renamed over it (rename is atomic on
POSIX), and the directory entry is flushed too so that the rename itself survives a power cut.

Standard library only: the hook installer (run by the CLI) and the trainer import it, and neither may pay for
the daemon's imports.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside `target`, created empty; when the block ends, what was written there is flushed
    and renamed over `target` (on an exception it is removed and `target` is left as it was). For writers that
    open a path themselves (the GGUF writer); `atomic_write_bytes` for bytes in memory.

    `mode` sets the permission bits exactly (0o755 for a hook script), whatever the umask; without it the file
    gets what `open()` would give a new file (0o666 less the umask).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique name per writer (pid, random token), created exclusively: two threads or processes writing the
    # same target never share a temp file, and whoever renames last wins with a whole file.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes, *, mode: int | None = None) -> None:
    """Replace `target` with `data` atomically, creating its parent dirs (`mode`: as `atomic_path`)."""
    with atomic_path(target, mode=mode) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


def atomic_write_text(target: str | os.PathLike[str], text: str, *, mode: int | None = None) -> None:
    """`atomic_write_bytes` of `text` in UTF-8."""
    atomic_write_bytes(target, text.encode("utf-8"), mode=mode)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename or a new name in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree_files(directory: str | os.PathLike[str]) -> None:
    """Flush every regular file directly in `directory` (what a finished, not yet renamed, directory holds)."""
    for entry in Path(directory).iterdir():
        if entry.is_file() and not entry.is_symlink():
            with open(entry, "rb") as handle:
                os.fsync(handle.fileno())


def publish_dir(tmp: str | os.PathLike[str], target: str | os.PathLike[str], *, replace: bool = False) -> Path:
    """Make a fully written directory `tmp` visible as `target`: its files flushed, then one rename.

    With `replace`, an existing `target` is removed first (a rebuilt model): between the removal and the rename
    there is no `target` at all, never a half-written one. Without it, an existing `target` is an error.
    """
    tmp, target = Path(tmp), Path(target)
    fsync_tree_files(tmp)
    if replace and target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    return target


def replace_symlink(link: str | os.PathLike[str], points_to: str) -> None:
    """Point the symlink `link` at `points_to` atomically: a new link under a temp name renamed over the old."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(points_to, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)
