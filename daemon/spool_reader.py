"""Reading the hooks' spool from where the daemon left off.

The offset (with the file's inode, so a replaced file starts from 0) is saved in the store's meta only
after the commits it names are stored: a crash re-reads some lines, and the store's exactly-once check makes
that harmless. When the spool grows large it is rotated by rename; hooks recreate it with `>>`.
"""
from __future__ import annotations

import os
from pathlib import Path

from gitlora.hooks.spool import SpoolEntry, parse_spool_chunk

from .store import Store

_ROTATE_BYTES = 4 << 20


class SpoolReader:
    def __init__(self, spool: Path, store: Store) -> None:
        self.spool = spool
        self.rotated = spool.with_name(spool.name + ".old")
        self.store = store

    def read_new(self) -> tuple[list[SpoolEntry], dict[str, int] | None]:
        """Entries not yet consumed, and the position to `commit()` once they are stored."""
        entries: list[SpoolEntry] = []
        position: dict[str, int] = {}
        if self.rotated.exists():  # rotated earlier: whatever is in it was either consumed or is read now
            with open(self.rotated, "rb") as handle:
                stat = os.fstat(handle.fileno())
                saved = self.store.get_meta("spool_rotated", {})
                start = saved.get("offset", 0) if saved.get("inode") == stat.st_ino else 0
                handle.seek(start)
                parsed, consumed = parse_spool_chunk(handle.read())
            entries.extend(parsed)
            # A hook that opened the spool just before the rename may still append to the rotated file (or
            # finish a torn line there): it is dropped only once everything in it has been read.
            position.update(rotated_inode=stat.st_ino, rotated_offset=start + consumed)
        try:
            fd = os.open(self.spool, os.O_RDONLY)
        except FileNotFoundError:
            return entries, {"inode": 0, "offset": 0, **position}
        with os.fdopen(fd, "rb") as handle:
            stat = os.fstat(handle.fileno())
            saved = self.store.get_meta("spool", {})
            offset = saved.get("offset", 0) if saved.get("inode") == stat.st_ino else 0
            if offset > stat.st_size:
                offset = 0  # truncated by hand
            handle.seek(offset)
            data = handle.read()
        parsed, consumed = parse_spool_chunk(data)
        entries.extend(parsed)
        return entries, {"inode": stat.st_ino, "offset": offset + consumed, **position}

    def commit(self, position: dict[str, int] | None) -> None:
        if position is None:
            return
        position = dict(position)
        rotated_inode, rotated_offset = position.pop("rotated_inode", None), position.pop("rotated_offset", 0)
        if rotated_inode is not None:
            try:
                stat = self.rotated.stat()
            except FileNotFoundError:
                stat = None
            if stat is not None and stat.st_ino == rotated_inode:
                if stat.st_size <= rotated_offset:
                    self.rotated.unlink()
                else:  # written to after our read: keep it, and read on from here next time
                    self.store.set_meta("spool_rotated", {"inode": rotated_inode, "offset": rotated_offset})
        self.store.set_meta("spool", position)
        if position["offset"] >= _ROTATE_BYTES and not self.rotated.exists():
            # Saved before the rename: a crash between the two re-reads nothing already consumed.
            self.store.set_meta("spool_rotated", {"inode": position["inode"], "offset": position["offset"]})
            try:
                os.replace(self.spool, self.rotated)
            except FileNotFoundError:
                return
