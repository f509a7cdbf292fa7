"""Keeping a long-lived daemon small: the few libc calls that measurement showed are needed, in one place.

The repository worker calls `after_burst(store)` once an ingest or a flush is done; `configure_malloc()` runs
once at daemon start, before any thread. Everything here is a no-op where glibc or /proc is missing (musl,
macOS): their allocators behave differently anyway. There is no library for these; each is one libc call.
"""
from __future__ import annotations

import ctypes
import gc
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import Store

_MADV_DONTNEED = 4


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def configure_malloc(arenas: int = 2, mmap_threshold: int = 256 << 10) -> None:
    """Tune glibc malloc for a long-lived daemon of mostly idle threads (call before starting threads;
    mallopt is the runtime form of MALLOC_ARENA_MAX / MALLOC_MMAP_THRESHOLD_):
    - few arenas: glibc gives each thread that allocates its own heap arena otherwise;
    - a fixed mmap threshold: glibc raises it after each large free (up to 32 MB), so big buffers (a pool
      worker's pickled results, several MB) would end up inside the heap and leave it fragmented for good;
      kept low they are mapped and unmapped on their own."""
    libc = _libc()
    try:
        if libc is not None:
            libc.mallopt(-8, arenas)  # M_ARENA_MAX
            libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD (setting it also turns off the dynamic raise)
    except AttributeError:
        pass


def collect_cycles_rarely() -> None:
    """For a batch process that builds a large heap of long-lived, acyclic objects (a backfill's writer, its parser
    workers): at the default thresholds the cyclic collector runs every 700 net allocations and walks the growing
    older generations again and again, a sizeable share of a backfill's CPU (bench/README.md), to free the few
    cycles such code makes. Collections still happen, about a hundred times less often."""
    gc.set_threshold(100_000, 50, 50)


def release_memory() -> None:
    """Give freed heap back to the OS: CPython's allocator and glibc keep freed arenas otherwise."""
    gc.collect()
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:
        pass


def drop_mapped_pages(mapped_file: Path) -> int:
    """Drop this process's resident pages of every mapping of `mapped_file` (bytes released); they fault back
    in from the page cache on the next read. LMDB maps its file read-only and shared (no writemap), so
    MADV_DONTNEED loses nothing. The caller must own the map (no other thread may move it meanwhile: a range
    freed and reused by malloc would be zeroed). py-lmdb does not expose the map's address: /proc/self/maps."""
    target = str(Path(mapped_file).resolve())
    libc = _libc()
    if libc is None:
        return 0
    released = 0
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                if not line.rstrip().endswith(target):
                    continue
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
                    released += end - start
    except (OSError, AttributeError, ValueError):
        return 0
    return released


def after_burst(store: "Store") -> None:
    """After an ingest or a flush, so an idle daemon stays small: LMDB's dirty-page buffers (a reopen), then
    the heap, then the map's resident pages. Called by the store's owning thread only."""
    store.release_write_buffers()
    release_memory()
    drop_mapped_pages(store.path / "data.mdb")
