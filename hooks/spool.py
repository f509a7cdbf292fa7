"""The spool: one line per hook event, appended by the sh hooks, read by the daemon.

Line format (UTF-8/ASCII, fields separated by a single TAB, terminated by LF)::

    <hook> TAB <new-oid> TAB <unix-time> TAB <old-oid> TAB <info> LF

``hook``
    ``post-commit`` | ``post-merge`` | ``post-rewrite`` | ``post-applypatch``.
``new-oid``
    Full hex object id of the commit the event produced (``git rev-parse HEAD`` for post-commit, post-merge and
    post-applypatch; the rewritten commit for post-rewrite). 40 hex (SHA-1) or 64 hex (SHA-256 repositories).
``unix-time``
    Seconds since the epoch when the hook ran, not the commit time; **empty** on the hooks' fast path, which
    reads HEAD without starting any process (sh has no clock of its own). Readers use their own read time.
``old-oid``
    post-rewrite only: the commit that was rewritten (the ``old`` of git's ``old new`` stdin pair). Empty
    otherwise, and empty in the post-rewrite fallback line written when the hook got no pairs on stdin (a
    wrapper such as pre-commit calls "legacy" hooks with empty stdin): then ``new-oid`` is HEAD.
``info``
    post-rewrite: the rewrite type git passed as ``$1`` (``amend`` | ``rebase``); post-merge: ``squash`` for
    ``git merge --squash`` (HEAD did not move), else empty; empty for the others.

Examples (``→`` is a TAB)::

    post-commit→3f2a…(40 hex)→1718000000→→
    post-rewrite→9c1e…→1718000005→3f2a…→amend

Each line is written by a single ``printf … >> spool`` (O_APPEND; a line is far below PIPE_BUF, so concurrent
hooks never interleave bytes). Readers should still expect junk: a torn last line while a hook is writing, a
truncated file, lines from a future version with more fields (extra trailing fields are ignored).
:func:`parse_spool_line` returns ``None`` for anything it does not understand; :func:`parse_spool_chunk` parses
only complete lines so a tailing reader can resume at the returned offset.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

HOOK_NAMES = ("post-commit", "post-merge", "post-rewrite", "post-applypatch")
_OID = re.compile(r"(?:[0-9a-f]{40}|[0-9a-f]{64})\Z")
_INFO = re.compile(r"[A-Za-z0-9_.-]*\Z")


@dataclass(frozen=True)
class SpoolEntry:
    hook: str
    """One of :data:`HOOK_NAMES`."""
    new: str
    """Hex oid of the commit produced (HEAD after the event, or the rewritten commit for post-rewrite)."""
    time: int | None
    """Unix seconds when the hook ran; None for lines from the no-process fast path."""
    old: str | None = None
    """post-rewrite: the commit that was rewritten (None in the no-stdin fallback line); None otherwise."""
    info: str | None = None
    """post-rewrite: "amend" | "rebase"; post-merge: "squash" or None; None otherwise."""

    @property
    def rewrite_type(self) -> str | None:
        return self.info if self.hook == "post-rewrite" else None

    def to_line(self) -> str:
        """The exact line the sh hooks write (with the trailing newline)."""
        when = "" if self.time is None else self.time
        return f"{self.hook}\t{self.new}\t{when}\t{self.old or ''}\t{self.info or ''}\n"


def parse_spool_line(line: str) -> SpoolEntry | None:
    """Parse one spool line (with or without its line terminator); ``None`` for junk, never raises."""
    if not isinstance(line, str):
        return None
    line = line.rstrip("\r\n")
    fields = line.split("\t")
    if len(fields) < 3:
        return None
    hook, new, when = fields[0], fields[1].strip().lower(), fields[2].strip()
    old = fields[3].strip().lower() if len(fields) > 3 else ""
    info = fields[4].strip() if len(fields) > 4 else ""
    if hook not in HOOK_NAMES or not _OID.match(new):
        return None
    if when and (not when.isascii() or not when.isdigit()):
        return None
    if old and not _OID.match(old):
        return None
    if not _INFO.match(info):
        return None
    return SpoolEntry(hook=hook, new=new, time=int(when) if when else None, old=old or None, info=info or None)


def parse_spool_chunk(data: bytes) -> tuple[list[SpoolEntry], int]:
    """Parse the complete lines in ``data`` (bytes read from the spool at some offset).

    Returns the entries (junk lines skipped) and how many bytes were consumed, i.e. up to and including the
    last LF; an unterminated tail (a line still being written) is left for the next read.
    """
    end = data.rfind(b"\n") + 1
    entries = []
    for raw in data[:end].split(b"\n"):
        entry = parse_spool_line(raw.decode("utf-8", "replace"))
        if entry is not None:
            entries.append(entry)
    return entries, end
