"""The append-only example store: the only module that imports lmdb.

Named databases (DESIGN.md, *Store (LMDB) schema*): `commits` (20-byte binary oid -> JSON record), `examples` (8-byte
big-endian sequence -> JSON example), `meta` (schema version, counters), `example_keys` (16-byte digest of an
example's (path, qualified_name, after) -> the oid of the first commit that stored it: a commit
whose every example is already there replays earlier commits, e.g. a merge of its branch, and its record says
so with `duplicates`), `symbols` (20-byte blob oid -> JSON list of the blob's definitions: content-addressed,
written put-if-absent in the transaction of the commit that first needed them; ingest's symbol index reads them
instead of parsing again), `file_changes` (16-byte key of a changed file, ingest's `file_change_key`: its paths,
old and new blob and what decides its items -> what the file change yielded the first time it was stored: see
`FileOutcome`). A commit's record and all of its
examples are written in one write transaction, and the transaction first checks that the commit is not
already stored: LMDB's atomic commit makes that "exactly once" even if the process dies at any instant.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import lmdb

from . import compact_json
from .dedup import SHA1_SCHEME, Screen, band_keys, similarity

#: What the example records of a store hold (DESIGN.md, *Store (LMDB) schema*): 1 = the item's texts and where
#: it is (path, qualified name, imports); 2 = also its blob ids, byte/line spans and referenced identifiers;
#: 3 = also the new file's text around the item (`new_context`, what the trainer's fill-in-the-middle needs);
#: 4 = also the definitions of other files it references (`cross_file`, resolved by ingest's symbol index).
#: A store whose version is older than this one is never written to by ingest (its records would mix two
#: shapes): `gitlora upgrade` brings it here. One with a newer version is refused.
SCHEMA_VERSION = 4
_SEQ = struct.Struct(">Q")
_SKETCH_SCHEME = b"sketch_scheme"  # meta: the scheme of the store's near-duplicate sketches (dedup.SCHEMES)
_INITIAL_MAP_SIZE = 64 << 20
_MAX_MAP_SIZE = 1 << 40


class StoreError(Exception):
    """The store cannot be used as asked (newer schema, corrupt record, failed append)."""


class StoreOutdated(StoreError):
    """The store's records were written by an older schema: nothing may add records to it (two shapes would
    mix) until `gitlora upgrade` re-derives them. Reading it is fine."""

    def __init__(self, path: Path, version: int) -> None:
        self.path = Path(path)
        self.version = version
        self.reason = f"its records have schema {version}, this gitlora writes schema {SCHEMA_VERSION}"
        super().__init__(f"store at {self.path} needs an upgrade: {self.reason}")


class StoreDamaged(StoreError):
    """The store's files are damaged (truncated, overwritten, emptied). The store is derived data: `gitlora
    repair` rebuilds it from git. Raised before LMDB maps a file that would fault (SIGBUS) when read."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"store at {self.path} is damaged: {reason}")


# What LMDB reports when the pages it reads are not what it wrote. BadTxnError too: inside the store every
# transaction is fresh and scoped, so a transaction already failed means an earlier read in it hit a bad page
# (opening a cursor on a database whose record is damaged fails silently, and the cursor's first read says so).
_DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError, lmdb.InvalidError,
                  lmdb.VersionMismatchError, lmdb.BadValsizeError, lmdb.BadTxnError)

# LMDB's on-disk meta page (mdb.c: MDB_page header, then MDB_meta), in native sizes: page 0 and page 1 each
# hold one; readers use the valid one with the larger transaction id. size_t fields are pointer-sized.
_MDB_MAGIC = 0xBEEFC0DE
_MDB_DATA_VERSION = 1
_P_META = 0x08
_WORD = struct.calcsize("P")
_WORD_FMT = "Q" if _WORD == 8 else "I"
_PAGE_HEADER = _WORD + 8  # mp_pgno, mp_pad, mp_flags, mp_lower, mp_upper
_DB_RECORD = 8 + 5 * _WORD  # MDB_db: md_pad (= page size in the free DB), flags, depth, 5 page counts/ids
_META_FLAGS = struct.Struct(f"@{_WORD_FMT}HH")  # mp_pgno, mp_pad, mp_flags
_META_HEAD = struct.Struct("@II")  # mm_magic, mm_version
_META_PSIZE_AT = _PAGE_HEADER + 8 + 2 * _WORD  # after magic, version, mm_address, mm_mapsize
_META_TAIL = struct.Struct(f"@{_WORD_FMT}{_WORD_FMT}")  # mm_last_pg, mm_txnid
_META_TAIL_AT = _META_PSIZE_AT + 2 * _DB_RECORD
_META_BYTES = _META_TAIL_AT + _META_TAIL.size


def check_data_file(store_dir: Path) -> None:
    """Raise StoreDamaged unless `store_dir/data.mdb` holds two valid LMDB meta pages and every page the newer
    one uses. LMDB maps the file and trusts it: a file shorter than its own last page makes the first read
    past the end a SIGBUS that kills the process, so this runs before the file is ever mapped. Meta first,
    size second: a writer in another process only grows the file, and writes pages before the meta naming them.
    """
    data = Path(store_dir) / "data.mdb"
    try:
        with open(data, "rb") as handle:
            first = handle.read(_META_BYTES)
            # Empty for a moment while another process's lmdb.open creates the store (it writes both metas
            # right away); empty for good is damage, and not a new store: sequence numbers would start over.
            deadline = time.monotonic() + 0.5
            while len(first) < _META_BYTES and time.monotonic() < deadline:
                time.sleep(0.01)
                handle.seek(0)
                first = handle.read(_META_BYTES)
            if not first:
                raise StoreDamaged(store_dir, "data.mdb is empty")
            metas = [_parse_meta(store_dir, first, 0)]
            handle.seek(metas[0][0])
            metas.append(_parse_meta(store_dir, handle.read(_META_BYTES), 1))
            size = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise StoreError(f"cannot read the store at {store_dir}: {exc.strerror or exc}") from None
    page_size, last_page, _ = max(metas, key=lambda meta: meta[2])
    needed = (last_page + 1) * page_size
    if size < needed:
        raise StoreDamaged(store_dir, f"data.mdb is truncated: {size} bytes, but its pages reach {needed}")


def _parse_meta(store_dir: Path, raw: bytes, number: int) -> tuple[int, int, int]:
    """(page size, last used page, transaction id) of meta page `number`, or StoreDamaged."""
    if len(raw) < _META_BYTES:
        raise StoreDamaged(store_dir, f"data.mdb is truncated: it ends inside meta page {number}")
    _, _, flags = _META_FLAGS.unpack_from(raw, 0)
    magic, version = _META_HEAD.unpack_from(raw, _PAGE_HEADER)
    if not flags & _P_META or magic != _MDB_MAGIC:
        raise StoreDamaged(store_dir, f"meta page {number} of data.mdb is not an LMDB meta page (overwritten?)")
    if version != _MDB_DATA_VERSION:
        raise StoreDamaged(store_dir, f"meta page {number} of data.mdb has LMDB data version {version}, "
                                      f"not {_MDB_DATA_VERSION}")
    (page_size,) = struct.unpack_from("@I", raw, _META_PSIZE_AT)
    last_page, txnid = _META_TAIL.unpack_from(raw, _META_TAIL_AT)
    if page_size < 512 or page_size > (1 << 20) or page_size & (page_size - 1):
        raise StoreDamaged(store_dir, f"meta page {number} of data.mdb names an impossible page size {page_size}")
    return page_size, last_page, txnid


def _loads(raw: bytes | memoryview, path: Path) -> Any:
    """A stored JSON value; one that does not parse is damage, not a bug of the caller."""
    try:
        return compact_json.loads(raw)
    except ValueError as exc:
        raise StoreDamaged(path, f"a stored record does not parse ({exc})") from None


def seq_key(seq: int) -> bytes:
    return _SEQ.pack(seq)


_MAX_DUPLICATE_OF = 8  # a commit record names at most this many of the commits it duplicates
_MAX_RECORDED_SKIPS = 50  # a commit record lists at most this many skipped files (ingest's limit too)


def example_key(example: dict[str, Any] | bytes) -> bytes:
    """What makes two examples the same change: the item (path, qualified name) and its text after. Not its
    change kind: a branch that adds a file and then edits it is, in its merge, that file added with its final
    text (kind "added"), where the branch's last edit stored the same text as "modified"."""
    record = compact_json.loads(example) if isinstance(example, (bytes, bytearray)) else example
    fields = [record.get("path"), record.get("path_hex"), record.get("qualified_name"), record.get("after")]
    return hashlib.blake2b(json.dumps(fields).encode(), digest_size=16).digest()


class ReplayUnconfirmed(StoreError):
    """A commit whose ingest left out a file change as a replay (`FileOutcome.built` False) that the store has not
    indexed: its first occurrence was not stored as built (its commit skipped, the file failed). Nothing of the
    batch is written; ingest builds that commit in full and writes again."""

    def __init__(self, oid: bytes) -> None:
        self.oid = oid
        super().__init__(f"commit {oid.hex()} left out a file change the store has not seen built")


@dataclass(frozen=True)
class FileOutcome:
    """What one changed file of a commit yielded, in the order of the commit's files (its examples are the next
    `examples` of `PendingCommit.examples`). The same file change (paths, old and new blob, and the settings and
    code that decide its items: `key`) yields the same items again, so every example of its second occurrence
    (a merge replaying its branch, a cherry-pick onto the same base) is an exact duplicate of the first's. The
    store indexes each first occurrence (`file_changes`) and stores a later one as a *replay*: none of its
    examples, each counted as a duplicate, and its hygiene skips, file skip and syntax errors counted again as
    the first occurrence recorded them; so ingest need not build it at all (`built` False). `gitlora stats` thus
    counts by reason what building the replay and screening it would: its examples as duplicates (also one its
    first occurrence left out as a near-duplicate: it is an exact copy of an example already screened), and
    neither its examples nor their cross-file lookups appear in the record's cross-file counts. A replay built
    anyway (one the parent could not foresee: a renamed file) is stored the same way."""

    key: bytes  # ingest's file_change_key
    examples: int = 0  # examples built for it (0 when not built)
    skipped_items: dict[str, int] = field(default_factory=dict)  # hygiene's skips of its items
    skipped_file: dict[str, Any] | None = None  # its recorded skip (path fields, reason), when it was skipped
    syntax_error: dict[str, Any] | None = None  # its record's syntax_errors entry, when it has one
    built: bool = True  # False: left out as a replay of an indexed file change (nothing above is filled)
    indexable: bool = True  # False: its outcome is no property of the file change (a bug's error): not indexed

    def encode(self, oid: bytes) -> bytes:
        value: dict[str, Any] = {"commit": oid.hex(), "examples": self.examples}
        for name in ("skipped_items", "skipped_file", "syntax_error"):
            if getattr(self, name):
                value[name] = getattr(self, name)
        return compact_json.encode(value)


@dataclass
class PendingCommit:
    """One commit's outcome, ready to be stored: its record and the examples it produced."""

    oid: bytes  # 20-byte binary oid
    record: dict[str, Any]
    examples: list[dict[str, Any] | bytes] = field(default_factory=list)  # dicts, or their JSON already encoded
    # Ingest's screening (duplicates, near-duplicates, repeated messages), applied in the commit's transaction;
    # None: every example is stored and duplicates only marked (issue 11's commit-level rule).
    screen: Screen | None = None
    # Definitions of blobs (hex oid -> their encoded JSON list) first parsed for this commit, stored put-if-absent
    # in its transaction (whether or not the commit itself was stored before).
    definitions: dict[str, bytes] = field(default_factory=dict)
    # Ingest's symbol index only (never stored): the .rs files the commit changed, (old path, new path, new
    # blob), and per example what resolving it needs, (path, identifiers, imports); None for a skipped commit.
    changes: list[tuple[str | None, str | None, str | None]] | None = None
    references: list[tuple[str, list[str], list[str]] | None] | None = None
    # What each changed file yielded (`FileOutcome`), for the store's replay rule; None: no such rule (every
    # example screened on its own, as a store written before the rule or `repair` re-storing shard lines).
    files: list[FileOutcome] | None = None


@dataclass(frozen=True)
class WriteResult:
    stored: int  # commits newly stored
    already_present: int  # commits skipped because an earlier writer stored them
    examples: int  # examples appended
    bytes_written: int = 0  # example bytes appended
    replayed_files: int = 0  # file changes stored as replays of their first occurrence (`FileOutcome`)


class Store:
    """One LMDB environment per repository, used by one thread (in the daemon: the repository's worker; in
    the CLI: the main thread), so nothing here locks across threads. LMDB's own lock serialises writers
    across processes (a backfill next to the daemon stays exactly-once)."""

    def __init__(self, path: Path, *, readonly: bool = False, map_size: int = _INITIAL_MAP_SIZE,
                 outdated_ok: bool = False) -> None:
        """`outdated_ok`: open a store of an older schema for writing too (StoreOutdated otherwise); only for
        `upgrade`, which rewrites its records, and `repair`, which rebuilds shards from them."""
        self.path = Path(path)
        self.readonly = readonly
        self.outdated_ok = outdated_ok
        self.schema_version = SCHEMA_VERSION
        if readonly:
            if not (self.path / "data.mdb").exists():
                raise StoreError(f"no store at {self.path}")
        else:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._written_since_open = 0
        existing = (self.path / "data.mdb").stat().st_size if (self.path / "data.mdb").exists() else 0
        if (self.path / "data.mdb").exists():
            check_data_file(self.path)
        self._open(max(map_size, existing * 2, _INITIAL_MAP_SIZE))
        try:
            self._check_schema()
            if not self.readonly:
                self._index_example_keys()
        except StoreError:
            self.env.close()
            raise

    def _open(self, map_size: int) -> None:
        try:
            self.env = lmdb.open(
                str(self.path), max_dbs=10, map_size=map_size,
                readonly=self.readonly, subdir=True, lock=True, readahead=False, meminit=False,
            )
        except _DAMAGE_ERRORS as exc:
            raise _unreadable(self.path, exc) from None
        except lmdb.Error as exc:  # permissions, a full disk, a stale lock file: not damage, still one line
            raise StoreError(f"cannot open the store at {self.path}: {_lmdb_reason(exc)}") from None
        try:
            self._commits, self._examples, self._meta = (self.env.open_db(name, create=not self.readonly)
                                                         for name in (b"commits", b"examples", b"meta"))
        except lmdb.NotFoundError:  # read-only, and the writer has not created its databases yet
            self.env.close()
            raise StoreError(f"store at {self.path} is not initialised yet") from None
        except _DAMAGE_ERRORS as exc:
            self.env.close()
            raise _unreadable(self.path, exc) from None
        # Databases added after schema 1's first stores: a reader of a store no writer has opened since has none.
        self._keys = self._optional_db(b"example_keys")
        self._screening = self._optional_db(b"screening")  # near-duplicate clusters, message counts
        self._symbols = self._optional_db(b"symbols")  # blob -> definitions (schema 4)
        self._files = self._optional_db(b"file_changes")  # file change -> its first outcome (`FileOutcome`)

    def _optional_db(self, name: bytes):
        """A sub-database a writer creates on open; None for a reader of a store that lacks it."""
        try:
            return self.env.open_db(name, create=not self.readonly)
        except lmdb.NotFoundError:
            return None
        except _DAMAGE_ERRORS as exc:
            self.env.close()
            raise _unreadable(self.path, exc) from None

    @contextmanager
    def _txn(self, db: Literal["commits", "examples", "meta", "symbols", "files"] | None = None,
             **kwargs: Any) -> Iterator[lmdb.Transaction]:
        """A transaction that survives the map growing, with LMDB's reports of damaged pages (on any read)
        turned into StoreDamaged. Another process (a backfill next to the daemon) may have grown the map,
        which LMDB reports as MapResizedError until this process adopts the new size. `db` is a name,
        resolved now: `release_write_buffers` may have reopened the environment."""
        if db is not None:
            kwargs["db"] = getattr(self, f"_{db}")
        try:
            try:
                txn = self.env.begin(**kwargs)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)  # 0 = adopt the size the other process set
                txn = self.env.begin(**kwargs)
            with txn:
                yield txn
        except _DAMAGE_ERRORS as exc:
            raise _unreadable(self.path, exc) from None

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_schema(self) -> None:
        with self._txn(db="meta") as txn:
            raw = txn.get(b"schema_version")
            empty = raw is not None and self._next_seq(txn) == 0
        if raw is None:
            if self.readonly:
                return
            with self._txn(db="meta", write=True) as txn:
                if txn.get(b"schema_version") is None:
                    txn.put(b"schema_version", str(SCHEMA_VERSION).encode())
            return
        try:
            version = int(raw)
        except ValueError:
            raise StoreDamaged(self.path, f"its schema version {bytes(raw)[:20]!r} is not a number") from None
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store at {self.path} has schema version {version}, newer than this gitlora "
                f"understands ({SCHEMA_VERSION}); upgrade gitlora"
            )
        if version < SCHEMA_VERSION and empty and not self.readonly and not self.outdated_ok:
            # No example to re-derive (commit records did not change shape): current as it stands.
            self.set_schema_version(SCHEMA_VERSION)
            version = SCHEMA_VERSION
        self.schema_version = version
        if version < SCHEMA_VERSION and not self.readonly and not self.outdated_ok:
            raise StoreOutdated(self.path, version)

    def set_schema_version(self, version: int) -> None:
        """Say which schema the store's records have: `upgrade` once every record is rewritten (and the upgrade
        progress it kept in `meta` is dropped in the same transaction); `repair` when it rebuilt the store
        from shards of an older schema."""
        with self._txn(db="meta", write=True) as txn:
            txn.put(b"schema_version", str(version).encode())
            txn.delete(b"x:upgrade")
        self.schema_version = version

    # -- writing ---------------------------------------------------------------------------------
    def write(self, batch: Iterable[PendingCommit]) -> WriteResult:
        """Store each commit exactly once, all in one transaction; grows the map and retries when full."""
        if self.readonly:
            raise StoreError("store opened read-only")
        batch = list(batch)
        while True:
            try:
                with self._txn(write=True) as txn:
                    result = self._write_txn(txn, batch)
                self._written_since_open += result.bytes_written
                return result
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:  # grown by another process while our write was pending
                self.env.set_mapsize(0)

    def _grow(self) -> None:
        new_size = self.env.info()["map_size"] * 2
        if new_size > _MAX_MAP_SIZE:
            raise StoreError(f"store at {self.path} would exceed {_MAX_MAP_SIZE} bytes")
        self.env.set_mapsize(new_size)

    def _write_txn(self, txn: lmdb.Transaction, batch: list[PendingCommit]) -> WriteResult:
        next_seq = self._next_seq(txn)
        indexed = txn.get(b"keys_indexed_upto", db=self._meta)
        index_complete = indexed is not None and int(indexed) >= next_seq
        counters = self._counters(txn)
        stored = present = appended = written = replayed = 0
        seen_in_batch: set[bytes] = set()
        self._check_sketch_scheme(txn, batch)
        for pending in batch:
            if len(pending.oid) != 20:
                raise StoreError(f"commit key must be a 20-byte oid, got {len(pending.oid)} bytes")
            self._put_definitions(txn, pending.definitions)
            if pending.oid in seen_in_batch or txn.get(pending.oid, db=self._commits) is not None:
                present += 1
                continue
            seen_in_batch.add(pending.oid)
            record = dict(pending.record)
            examples = pending.examples
            if pending.screen is not None and pending.screen.enforce:
                screen = pending.screen
                if pending.files is not None:
                    kept, replays = self._replays(txn, pending.oid, len(examples), pending.files, record)
                    replayed += replays
                    if len(kept) < len(examples):
                        examples = [examples[i] for i in kept]
                        screen = replace(screen, sketches=_at(screen.sketches, kept, None),
                                         keys=tuple(_at(screen.keys, kept, b"")) if screen.keys else ())
                examples = self._screen(txn, pending.oid, examples, screen, record, next_seq)
            elif pending.files is not None and not all(f.built for f in pending.files):
                raise StoreError(f"commit {pending.oid.hex()} left out file changes, but is not screened: a bug")
            elif pending.screen is not None:
                self._register(txn, pending.oid, examples, pending.screen, record, next_seq)
            if examples:
                record["first_seq"] = next_seq
                record["last_seq"] = next_seq + len(examples) - 1
            record["examples"] = len(examples)
            if examples and (pending.screen is None or not pending.screen.enforce):
                record.update(self._mark_duplicates(txn, pending.oid, [example_key(e) for e in examples]))
            for example in examples:
                # append=True is LMDB's fast path for sorted keys; it returns False (not an exception)
                # when the key is out of order, which would mean a corrupt counter: stop loudly.
                value = example if isinstance(example, bytes) else compact_json.encode(example)
                written += len(value)
                if not txn.put(seq_key(next_seq), value, db=self._examples, append=True):
                    raise StoreError(f"append of example {next_seq} refused: sequence out of order")
                next_seq += 1
                appended += 1
            if not txn.put(pending.oid, compact_json.encode(record), db=self._commits, overwrite=False):
                raise StoreError(f"commit {pending.oid.hex()} appeared during its own transaction")
            status = record.get("status", "ingested")
            counters[f"commits_{status}"] = counters.get(f"commits_{status}", 0) + 1
            if str(record.get("reason", "")).startswith("shallow-boundary"):
                boundaries = json.loads(txn.get(b"shallow_boundaries", b"[]", db=self._meta))
                boundaries.append(pending.oid.hex())
                txn.put(b"shallow_boundaries", compact_json.encode(boundaries), db=self._meta)
            stored += 1
        counters["examples"] = counters.get("examples", 0) + appended
        txn.put(b"next_seq", str(next_seq).encode(), db=self._meta)
        if index_complete:  # else the next open catches up (a writer of an older gitlora wrote in between)
            txn.put(b"keys_indexed_upto", str(next_seq).encode(), db=self._meta)
        txn.put(b"counters", compact_json.encode(counters), db=self._meta)
        return WriteResult(stored, present, appended, written, replayed)

    def _check_sketch_scheme(self, txn: lmdb.Transaction, batch: list[PendingCommit]) -> None:
        """Sketches of two schemes are unrelated numbers: the store records the scheme of its first sketches and
        refuses a batch sketched with another (ingest sketches with `sketch_scheme()`, so this is a bug's stop)."""
        schemes = {p.screen.scheme for p in batch
                   if p.screen is not None and any(sketch is not None for sketch in p.screen.sketches)}
        if not schemes:
            return
        held = self._sketch_scheme(txn)
        if held is None and len(schemes) == 1:
            txn.put(_SKETCH_SCHEME, schemes.pop().encode(), db=self._meta)
            return
        if held is None or schemes != {held}:
            raise StoreError(f"store at {self.path} holds near-duplicate sketches of scheme {held!r}; refusing "
                             f"sketches of scheme {', '.join(sorted(schemes - {held}))} (never compared silently)")

    def _sketch_scheme(self, txn: lmdb.Transaction) -> str | None:
        raw = txn.get(_SKETCH_SCHEME, db=self._meta)
        if raw is not None:
            return bytes(raw).decode()
        if self._screening is None:
            return None
        cursor = txn.cursor(db=self._screening)
        # Clusters stored before the scheme was recorded were sketched with datasketch's default hash.
        return SHA1_SCHEME if cursor.set_range(b"c") and bytes(cursor.key()).startswith(b"c") else None

    def sketch_scheme(self) -> str | None:
        """The scheme of the near-duplicate sketches this store holds (dedup.SCHEMES); None while it holds none
        (its first sketches then set it)."""
        with self._txn() as txn:
            return self._sketch_scheme(txn)

    def _put_definitions(self, txn: lmdb.Transaction, definitions: dict[str, bytes]) -> None:
        for blob, value in definitions.items():
            txn.put(bytes.fromhex(blob), value, db=self._symbols, overwrite=False)

    def _mark_duplicates(self, txn: lmdb.Transaction, oid: bytes, keys: list[bytes]) -> dict[str, Any]:
        """Index one commit's example keys; the fields its record gets when some were stored before it."""
        earlier = [bytes(found) for found in (txn.get(key, db=self._keys) for key in keys) if found is not None]
        for key in keys:
            txn.put(key, oid, db=self._keys, overwrite=False)
        if not earlier:
            return {}
        return {"duplicates": len(earlier),
                "duplicate_of": sorted({o.hex() for o in earlier})[:_MAX_DUPLICATE_OF]}

    def _replays(self, txn: lmdb.Transaction, oid: bytes, examples: int, files: list[FileOutcome],
                 record: dict[str, Any]) -> tuple[list[int], int]:
        """The positions of the commit's examples to screen, and how many of its file changes were replays: all
        but the examples of file changes stored before (`FileOutcome`), each of those counted as a duplicate of the first occurrence's commit, with what the first occurrence recorded of the file
        (hygiene's item skips, the file's skip, its syntax errors) recorded again where ingest did not build it;
        every other file change is indexed with its outcome. Raises ReplayUnconfirmed (before anything is
        written) for a file change ingest left out that is not indexed."""
        if self._files is None:
            raise StoreError(f"store at {self.path} has no file_changes database (opened read-only?)")
        if sum(f.examples for f in files) != examples:
            raise StoreError(f"commit {oid.hex()}: its file outcomes count {sum(f.examples for f in files)} "
                             f"examples, it has {examples}")
        kept: list[int] = []
        skips: dict[str, int] = dict(record.get("skipped_items") or {})
        originals: set[str] = set()
        replayed = at = 0
        for outcome in files:
            mine = range(at, at + outcome.examples)
            at += outcome.examples
            found = txn.get(outcome.key, db=self._files)
            if found is None:
                if not outcome.built:
                    raise ReplayUnconfirmed(oid)
                if outcome.indexable:
                    txn.put(outcome.key, outcome.encode(oid), db=self._files)
                kept.extend(mine)
                continue
            first = _loads(found, self.path)
            replayed += 1
            if first["commit"] != oid.hex():
                originals.add(first["commit"])
            duplicates = len(mine) if outcome.built else int(first.get("examples", 0))
            if duplicates:
                skips["duplicate"] = skips.get("duplicate", 0) + duplicates
            if outcome.built:
                continue  # the file's skips, syntax errors and hygiene counts are in the record already
            for reason, count in (first.get("skipped_items") or {}).items():
                skips[reason] = skips.get(reason, 0) + int(count)
            if first.get("skipped_file"):
                total = record.get("skipped_files_total", len(record.get("skipped_files", [])))
                if total < _MAX_RECORDED_SKIPS:
                    record["skipped_files"] = [*record.get("skipped_files", []), first["skipped_file"]]
                record["skipped_files_total"] = total + 1
            if first.get("syntax_error") and len(record.get("syntax_errors", [])) < _MAX_RECORDED_SKIPS:
                record["syntax_errors"] = [*record.get("syntax_errors", []), first["syntax_error"]]
        if replayed:
            if skips:
                record["skipped_items"] = skips
            if originals:
                record["duplicate_of"] = sorted(originals)[:_MAX_DUPLICATE_OF]
        return kept, replayed

    def _screen(self, txn: lmdb.Transaction, oid: bytes, examples: list[dict[str, Any] | bytes], screen: Screen,
                record: dict[str, Any], next_seq: int) -> list[dict[str, Any] | bytes]:
        """The examples worth storing (DESIGN.md, *Hygiene and deduplication*): less those whose (path, item,
        text after) is stored already (a merge replaying its branch, a cherry-pick) and those beyond the cap of
        their near-duplicate cluster; with the message left out when it was stored `repeated_message_limit`
        times before. What was left out is counted in `record` (`skipped_items`, `duplicate_of`,
        `message_omitted`). Decided here, in the commit's transaction, so each example's fate is decided once,
        in commit order, whichever process ingests it."""
        kept: list[dict[str, Any] | bytes] = []
        skips: dict[str, int] = dict(record.get("skipped_items") or {})
        originals: set[str] = set(record.get("duplicate_of") or ())  # those of replayed file changes
        taken: set[bytes] = set()
        keys = screen.keys if len(screen.keys) == len(examples) else [example_key(e) for e in examples]
        for index, (example, key) in enumerate(zip(examples, keys)):
            found = txn.get(key, db=self._keys)
            if found is not None or key in taken:
                skips["duplicate"] = skips.get("duplicate", 0) + 1
                if found is not None and bytes(found) != oid:
                    originals.add(bytes(found).hex())
                continue
            sketch = screen.sketches[index] if index < len(screen.sketches) else None
            if sketch is not None and screen.near_cap and not self._near_admits(
                    txn, sketch, screen, next_seq + len(kept)):
                skips["near-duplicate"] = skips.get("near-duplicate", 0) + 1
                continue
            taken.add(key)
            txn.put(key, oid, db=self._keys)
            kept.append(example)
        if skips:
            record["skipped_items"] = skips
        if originals:
            record["duplicate_of"] = sorted(originals)[:_MAX_DUPLICATE_OF]
        if self._repeated_message(txn, screen) and kept:
            record["message_omitted"] = "repeated"
            kept = [_without_message(example) for example in kept]
        return kept

    def _near_admits(self, txn: lmdb.Transaction, sketch: bytes, screen: Screen, seq: int) -> bool:
        """Whether a target may be stored: it founds a cluster (its bands then find it), or joins the first
        cluster its bands propose whose founder is similar enough, while that cluster is under the cap."""
        bands = band_keys(sketch)
        checked: set[bytes] = set()
        for band in bands:
            cluster = txn.get(b"b" + band, db=self._screening)
            if cluster is None or bytes(cluster) in checked:
                continue
            cluster = bytes(cluster)
            checked.add(cluster)
            value = txn.get(b"c" + cluster, db=self._screening)
            if value is None or similarity(bytes(value[4:]), sketch) < screen.near_threshold:
                continue
            members = int.from_bytes(value[:4], "big")
            if members >= screen.near_cap:
                return False
            txn.put(b"c" + cluster, (members + 1).to_bytes(4, "big") + bytes(value[4:]), db=self._screening)
            return True
        cluster = seq_key(seq)
        txn.put(b"c" + cluster, (1).to_bytes(4, "big") + sketch, db=self._screening)
        for band in bands:
            txn.put(b"b" + band, cluster, db=self._screening, overwrite=False)
        return True

    def _repeated_message(self, txn: lmdb.Transaction, screen: Screen) -> bool:
        """Count the commit's message; True when it was stored `repeated_message_limit` times before."""
        if screen.message_key is None:
            return False
        key = b"m" + screen.message_key
        raw = txn.get(key, db=self._screening)
        seen = int(raw) if raw is not None else 0
        txn.put(key, str(seen + 1).encode(), db=self._screening)
        return bool(screen.repeated_message_limit) and seen >= screen.repeated_message_limit

    def _register(self, txn: lmdb.Transaction, oid: bytes, examples: list[dict[str, Any] | bytes], screen: Screen,
                  record: dict[str, Any], next_seq: int) -> None:
        """Screening state for examples stored as they are (repair re-storing shard bytes): their near-duplicate
        clusters and the message's count, so the commits ingested after them are screened as before; and the
        record's counts of what was left out (`screen.left_out`), by reason, as when the commit was first
        stored."""
        for index, sketch in enumerate(screen.sketches[:len(examples)]):
            if sketch is not None and screen.near_cap:
                self._near_admits(txn, sketch, replace(screen, near_cap=1 << 30), next_seq + index)
        repeated = self._repeated_message(txn, screen)
        skips: dict[str, int] = dict(record.get("skipped_items") or {})
        originals: set[str] = set()
        taken = {example_key(e) for e in examples} if screen.left_out else set()
        for key in screen.left_out:
            found = txn.get(key, db=self._keys)
            reason = "duplicate" if found is not None or key in taken else "near-duplicate"
            if found is not None and bytes(found) != oid:
                originals.add(bytes(found).hex())
            taken.add(key)
            skips[reason] = skips.get(reason, 0) + 1
        if skips:
            record["skipped_items"] = skips
        if originals:
            record["duplicate_of"] = sorted(originals)[:_MAX_DUPLICATE_OF]
        if repeated and examples:
            record["message_omitted"] = "repeated"

    def _index_example_keys(self, chunk: int = 4096) -> None:
        """Bring the key index up to the examples stored (once, for a store written before it existed),
        marking the duplicate commits found on the way; a chunk of whole commits per transaction."""
        while True:
            try:
                if self._index_chunk(chunk):
                    return
            except lmdb.MapFullError:
                self._grow()

    def _index_chunk(self, chunk: int) -> bool:
        """One transaction of `_index_example_keys`; True when the index is complete."""
        with self._txn(write=True) as txn:
            raw = txn.get(b"keys_indexed_upto", db=self._meta)
            upto, stop = (int(raw) if raw else 0), self._next_seq(txn)
            if upto >= stop:
                if raw is None:
                    txn.put(b"keys_indexed_upto", str(stop).encode(), db=self._meta)
                return True
            by_commit: dict[str, list[bytes]] = {}
            cursor = txn.cursor(db=self._examples)
            last, taken = upto, 0
            if cursor.set_range(seq_key(upto)):
                for key, value in cursor:
                    seq = _SEQ.unpack(key)[0]
                    example = _loads(value, self.path)
                    if taken >= chunk and example["commit"] not in by_commit:
                        break  # whole commits only: a commit's examples are contiguous
                    by_commit.setdefault(example["commit"], []).append(example_key(example))
                    last, taken = seq + 1, taken + 1
            if not by_commit:
                last = stop
            for commit, keys in by_commit.items():
                oid = bytes.fromhex(commit)
                fields = self._mark_duplicates(txn, oid, keys)
                found = txn.get(oid, db=self._commits)
                if fields and found is not None:
                    txn.put(oid, compact_json.encode({**_loads(found, self.path), **fields}), db=self._commits)
            txn.put(b"keys_indexed_upto", str(last).encode(), db=self._meta)
        return False

    def _next_seq(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(b"next_seq", db=self._meta)
        if raw is not None:
            return int(raw)
        with txn.cursor(db=self._examples) as cursor:
            return _SEQ.unpack(cursor.key())[0] + 1 if cursor.last() else 0

    def _counters(self, txn: lmdb.Transaction) -> dict[str, int]:
        raw = txn.get(b"counters", db=self._meta)
        return _loads(raw, self.path) if raw else {}

    def reserve_seqs(self, upto: int) -> None:
        """Make `upto` the next sequence number, never moving it back; the numbers skipped hold no example.
        Repair keeps a lost shard's numbers out of later shard groups this way."""
        if self.readonly:
            raise StoreError("store opened read-only")
        with self._txn(write=True) as txn:
            if upto > self._next_seq(txn):
                txn.put(b"next_seq", str(upto).encode(), db=self._meta)

    def rewrite(self, examples: dict[int, bytes], commits: dict[bytes, dict[str, Any]],
                meta: dict[str, Any], definitions: dict[str, bytes] | None = None) -> None:
        """Replace stored examples (at their sequence numbers, which must exist) and commit records, and set
        `x:` meta keys, all in one transaction: how `upgrade` moves whole commits to a new schema, with its
        progress in the same transaction (killed at any instant, a commit is rewritten entirely or not at all).
        Counters, sequence numbers and the example-key index do not change: an example's key does not.
        `definitions` (blob -> encoded definitions) are added put-if-absent, as `write` adds them."""
        if self.readonly:
            raise StoreError("store opened read-only")
        while True:
            try:
                with self._txn(write=True) as txn:
                    for seq, value in examples.items():
                        if txn.get(seq_key(seq), db=self._examples) is None:
                            raise StoreError(f"example {seq} is not in the store: nothing to rewrite")
                        txn.put(seq_key(seq), value, db=self._examples)
                    for oid, record in commits.items():
                        if txn.get(oid, db=self._commits) is None:
                            raise StoreError(f"commit {oid.hex()} is not in the store: nothing to rewrite")
                        txn.put(oid, compact_json.encode(record), db=self._commits)
                    for key, value in meta.items():
                        txn.put(b"x:" + key.encode(), compact_json.encode(value), db=self._meta)
                    self._put_definitions(txn, definitions or {})
                return
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)

    def set_meta(self, key: str, value: Any) -> None:
        with self._txn(db="meta", write=True) as txn:
            txn.put(b"x:" + key.encode(), compact_json.encode(value))

    # -- reading ---------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._txn(db="meta") as txn:
            raw = txn.get(b"x:" + key.encode())
        return _loads(raw, self.path) if raw is not None else default

    def shallow_boundaries(self) -> set[str]:
        """Commits stored as skipped because a shallow clone cut off their parents: a later walk goes on
        through them, so history fetched by `git fetch --unshallow` is still ingested."""
        with self._txn(db="meta") as txn:
            return set(_loads(txn.get(b"shallow_boundaries", b"[]"), self.path))

    def get_definitions(self, blobs: Iterable[str]) -> dict[str, bytes]:
        """The stored definitions (encoded) of those of `blobs` (hex oids) that have them, in one transaction."""
        if self._symbols is None:
            return {}
        with self._txn(db="symbols") as txn:
            found = {}
            for blob in blobs:
                raw = txn.get(bytes.fromhex(blob))
                if raw is not None:
                    found[blob] = bytes(raw)
            return found

    def known_file_changes(self, keys: Iterable[bytes]) -> set[bytes]:
        """Which file changes (`FileOutcome.key`) the store has indexed as built, in one read transaction."""
        if self._files is None:
            return set()
        with self._txn(db="files", buffers=True) as txn:
            return {key for key in keys if txn.get(key) is not None}

    def has_commit(self, oid: bytes) -> bool:
        with self._txn(db="commits", buffers=True) as txn:
            return txn.get(oid) is not None

    def known_commits(self, oids: Iterable[bytes]) -> set[bytes]:
        """Which of `oids` are stored, in one read transaction."""
        with self._txn(db="commits", buffers=True) as txn:
            return {oid for oid in oids if txn.get(oid) is not None}

    def get_commit(self, oid: bytes) -> dict[str, Any] | None:
        with self._txn(db="commits") as txn:
            raw = txn.get(oid)
        return _loads(raw, self.path) if raw is not None else None

    def iter_commits(self) -> Iterator[tuple[bytes, dict[str, Any]]]:
        with self._txn(db="commits") as txn:
            for key, value in txn.cursor():
                yield bytes(key), _loads(value, self.path)

    def iter_examples(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        for seq, raw in self.iter_raw_examples(start, stop):
            yield seq, _loads(raw, self.path)

    def iter_raw_examples(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Examples exactly as stored (the bytes shards are made of), in sequence order."""
        with self._txn(db="examples") as txn:
            cursor = txn.cursor()
            if not cursor.set_range(seq_key(start)):
                return
            for key, value in cursor:
                seq = _SEQ.unpack(key)[0]
                if stop is not None and seq >= stop:
                    return
                yield seq, bytes(value)

    def get_raw_examples(self, seqs: Iterable[int]) -> list[bytes]:
        """Examples by sequence number, as stored, in one read transaction (random access is cheap: mmap)."""
        with self._txn(db="examples") as txn:
            found = []
            for seq in seqs:
                raw = txn.get(seq_key(seq))
                if raw is None:
                    raise StoreError(f"example {seq} is not in the store")
                found.append(bytes(raw))
            return found

    def next_seq(self) -> int:
        with self._txn() as txn:
            return self._next_seq(txn)

    def counters(self) -> dict[str, int]:
        with self._txn() as txn:
            counters = self._counters(txn)
        counters.setdefault("examples", 0)
        return counters

    def release_write_buffers(self, min_written: int = 4 << 20) -> bool:
        """Reopen the environment once `min_written` bytes have been written since it was opened; True if it
        was. LMDB keeps every page a write transaction dirtied on a free list for reuse until the environment
        closes (mdb_dpage_free), so one big transaction (a new repository's first commit: thousands of
        examples) pins tens of MB of heap in a daemon that then writes a few pages per commit. Must not be
        called with a transaction of this store open (an unfinished iterator)."""
        if self.readonly or self._written_since_open < min_written:
            return False
        map_size = self.env.info()["map_size"]
        self.env.close()
        for attempt in range(3):  # out of file handles or memory for a moment: the store must not stay closed
            try:
                self._open(map_size)
                break
            except StoreError as exc:
                if attempt == 2:
                    raise StoreError(f"could not reopen the store at {self.path}: {exc}") from exc
                time.sleep(0.2)
        self._written_since_open = 0
        return True

    def size_bytes(self) -> int:
        data = self.path / "data.mdb"
        return os.path.getsize(data) if data.exists() else 0


def _at(values: tuple, positions: list[int], missing: Any) -> tuple:
    """`values` at `positions` (`missing` past its end: a screen's per-example tuples may be shorter)."""
    return tuple(values[i] if i < len(values) else missing for i in positions)


def _without_message(example: dict[str, Any] | bytes) -> dict[str, Any]:
    record = compact_json.loads(example) if isinstance(example, (bytes, bytearray)) else dict(example)
    return {**record, "message": "", "message_omitted": "repeated"}


def _unreadable(path: Path, exc: lmdb.Error) -> StoreDamaged:
    return StoreDamaged(path, f"LMDB cannot read its pages ({_lmdb_reason(exc)})")


def _lmdb_reason(exc: lmdb.Error) -> str:
    """py-lmdb's message (`mdb_txn_begin: MDB_CORRUPTED: Located page was wrong type`), on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__
