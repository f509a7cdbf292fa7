"""Reading git: the only module that imports pygit2.

Refs -> tips, tips -> commits not yet stored (parents before children), commit -> changed Rust files, and
blob reads that turn every way a file can be unreadable (missing in a partial clone, binary, not UTF-8, a
submodule) into a recorded reason instead of an exception.
"""
from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pygit2

from .paths import repo_name

_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_TRACKED_REF_PREFIXES = ("refs/heads/", "refs/tags/")


class GitRepoError(Exception):
    """The repository cannot be read by gitlora; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class CommitInfo:
    oid: str
    parent: str | None  # first parent: merges are diffed against it
    parents: tuple[str, ...]
    author_time: int
    commit_time: int
    message: str
    author: str


@dataclass(frozen=True, slots=True)
class FileChange:
    """One changed Rust file. A side is None where the file (or a .rs file of that name) does not exist."""

    status: str  # added | deleted | modified | renamed
    old_path: str | None
    new_path: str | None
    old_oid: str | None
    new_oid: str | None
    hunks: tuple[tuple[int, int, int, int], ...] | None = None  # line hunks old->new (for incremental parsing)
    # A name's bytes where they are not UTF-8 (None otherwise): the *_path fields then show it readably.
    old_raw: bytes | None = None
    new_raw: bytes | None = None


@dataclass(frozen=True, slots=True)
class SkippedFile:
    path: str  # readable (see readable_path)
    reason: str
    raw: bytes | None = None  # the name's bytes where they are not UTF-8


def readable_path(raw: bytes) -> tuple[str, bytes | None]:
    """A git path (bytes: git does not require any encoding) -> (UTF-8 text to show, the bytes where they are
    not UTF-8). Invalid bytes show as backslash escapes (`src/b\\xe9.rs`); pygit2's `path` would instead
    carry surrogate escapes, which no UTF-8 encoder (JSON, LMDB, a log line) accepts."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), raw


@dataclass(slots=True)
class CommitDiff:
    files: list[FileChange] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class BlobUnreadable(Exception):
    """A blob that yields no text; `reason` is a short stable tag (missing-object, binary, non-utf8, too-large)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def limit_object_cache(max_bytes: int) -> None:
    """libgit2 keeps up to 256 MB of decoded commits and trees per process by default: right for a backfill,
    too much for a daemon that idles between commits. 0 turns the cache off."""
    pygit2.settings.cache_max_size(max_bytes)


class GitRepo:
    def __init__(self, path: str | os.PathLike[str], *, exclude: Iterable[str] = (), include_remotes: bool = False,
                 skip_vendored: bool = True):
        found = pygit2.discover_repository(str(path))
        if found is None:
            raise GitRepoError(f"{path}: not a git repository")
        self._check_readable(Path(found))
        try:
            self.repo = pygit2.Repository(found)
        except pygit2.GitError as exc:
            raise GitRepoError(f"{path}: libgit2 cannot open this repository: {exc}") from None
        self.exclude = tuple(exclude)
        self.include_remotes = include_remotes
        self.skip_vendored = skip_vendored

    @staticmethod
    def _check_readable(git_dir: Path) -> None:
        config = git_dir / "config"
        commondir = git_dir / "commondir"
        if commondir.exists():
            config = (git_dir / commondir.read_text().strip()).resolve() / "config"
        try:
            text = config.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return
        if re.search(r"^\s*refstorage\s*=\s*reftable\s*$", text, re.IGNORECASE | re.MULTILINE):
            raise GitRepoError(
                f"{git_dir}: uses the reftable ref format, which libgit2 (and so gitlora) cannot read yet; "
                "convert with `git refs migrate --ref-format=files`"
            )

    # -- identity --------------------------------------------------------------------------------
    @property
    def common_dir(self) -> Path:
        """The git dir shared by all linked worktrees (the per-repo state key)."""
        path = Path(self.repo.path)
        commondir = path / "commondir"
        if commondir.exists():
            return (path / commondir.read_text().strip()).resolve()
        return path.resolve()

    @property
    def workdir(self) -> Path | None:
        return Path(self.repo.workdir) if self.repo.workdir else None

    @property
    def name(self) -> str:
        return repo_name(self.common_dir)

    @property
    def is_shallow(self) -> bool:
        return (self.common_dir / "shallow").exists()

    def shallow_boundary(self) -> frozenset[str]:
        """Commits whose parents a shallow clone cut off (libgit2 shows them as parentless)."""
        try:
            return frozenset(self.common_dir.joinpath("shallow").read_text().split())
        except OSError:
            return frozenset()

    # -- refs and history ------------------------------------------------------------------------
    def tips(self) -> dict[str, str]:
        """Every local ref that points (possibly through a tag) at a commit, plus detached HEADs of the main
        worktree and of each linked worktree. Name -> commit hex."""
        tips: dict[str, str] = {}
        prefixes = _TRACKED_REF_PREFIXES + (("refs/remotes/",) if self.include_remotes else ())
        for ref in self.repo.references.iterator():
            if not ref.name.startswith(prefixes):
                continue
            try:
                target = ref.peel(pygit2.Commit)
            except (pygit2.GitError, KeyError, ValueError, pygit2.InvalidSpecError):
                continue  # tag of a tree/blob, dangling ref, or a missing object
            tips[ref.name] = str(target.id)
        head = self._read_head(Path(self.repo.path) / "HEAD")
        if head:
            tips["HEAD"] = head
        worktrees = self.common_dir / "worktrees"
        if worktrees.is_dir():
            for entry in sorted(worktrees.iterdir()):
                head = self._read_head(entry / "HEAD")
                if head:
                    tips[f"worktrees/{entry.name}/HEAD"] = head
        return tips

    def _read_head(self, head_file: Path) -> str | None:
        """A detached HEAD's oid (symbolic HEADs point at branches that are already tips)."""
        try:
            content = head_file.read_text().strip()
        except OSError:
            return None
        return content if _HEX40.match(content) and content in self.repo else None

    def new_commits(self, is_known: Callable[[list[bytes]], set[bytes]], tips: Iterable[str] | None = None,
                    walk_through: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Commits reachable from `tips` that `is_known` does not report, parents before children.

        Walks back from the tips only until it meets stored commits, so a nudge after one new commit costs
        one commit lookup, not a history walk. Missing parents (shallow or partial clones) end the walk there.
        """
        tips = list(dict.fromkeys(tips if tips is not None else self.tips().values()))
        unknown: dict[str, tuple[str, ...]] = {}
        seen: set[str] = set()
        # Stored shallow boundaries are walked from too: once unshallowed, their parents are new history.
        frontier = tips + sorted(o for o in walk_through if o in self.repo)
        while frontier:
            batch = [oid for oid in dict.fromkeys(frontier) if oid not in seen]
            seen.update(batch)
            known = is_known([bytes.fromhex(o) for o in batch])
            frontier = []
            for oid in batch:
                if bytes.fromhex(oid) in known:
                    if oid in walk_through:  # stored, but its parents may have arrived since (unshallowed)
                        frontier.extend(p for p in (self._parent_ids(oid) or ()) if p not in seen)
                    continue
                parents = self._parent_ids(oid)
                if parents is None:
                    continue
                unknown[oid] = parents
                frontier.extend(p for p in parents if p not in seen)
        return _parents_first(unknown, tips + list(unknown))  # tips first; then what only a boundary reached

    def _parent_ids(self, oid: str) -> tuple[str, ...] | None:
        try:
            commit = self.repo[oid]
        except (KeyError, ValueError):
            return None
        if not isinstance(commit, pygit2.Commit):
            return None
        return tuple(str(p) for p in commit.parent_ids if str(p) in self.repo)

    def resolve_commit(self, revision: str) -> str:
        """A revision (`HEAD~1`, a short oid, a tag) -> the commit's full hex oid."""
        try:
            return str(self.repo.revparse_single(revision).peel(pygit2.Commit).id)
        except (KeyError, ValueError, pygit2.GitError, pygit2.InvalidSpecError) as exc:
            raise GitRepoError(f"unknown commit {revision!r}: {exc}") from None

    def commit_info(self, oid: str) -> CommitInfo:
        commit = self.repo[oid]
        parents = tuple(str(p) for p in commit.parent_ids)
        try:
            message = commit.message
        except (UnicodeDecodeError, LookupError):
            message = commit.raw_message.decode("utf-8", "replace")
        return CommitInfo(
            oid=oid, parent=parents[0] if parents else None, parents=parents,
            author_time=commit.author.time, commit_time=commit.commit_time, message=message,
            author=f"{commit.author.name} <{commit.author.email}>",
        )

    # -- diffs and blobs -------------------------------------------------------------------------
    def changed_rust_files(self, oid: str, hunks: bool = True, renames: bool = True) -> CommitDiff:
        """The .rs files a commit changed against its first parent (the empty tree for a root commit); with each
        modified file's line hunks unless `hunks` is False (only which files and blobs changed); a renamed file
        as a deletion and an addition when `renames` is False (rename detection reads blobs)."""
        commit = self.repo[oid]
        result = CommitDiff()
        parent_tree = None
        if commit.parent_ids:
            parent_id = commit.parent_ids[0]
            if parent_id not in self.repo:
                result.notes.append(f"parent {parent_id} missing (shallow clone): diffed against the empty tree")
            else:
                parent_tree = self.repo[parent_id].tree
        diff = self._diff(parent_tree, commit.tree)
        try:
            if renames:
                diff.find_similar(flags=pygit2.enums.DiffFind.FIND_RENAMES, rename_threshold=50)
        except (pygit2.GitError, KeyError, OSError) as exc:
            # Rename detection reads blobs; in a partial clone some are missing. Fall back to add+delete.
            diff = self._diff(parent_tree, commit.tree)
            result.notes.append(f"rename detection failed, diffed without it: {exc}")
        vendored = _VendoredCrates(commit.tree, parent_tree) if self.skip_vendored else None
        for index, delta in enumerate(diff.deltas):
            change = self._classify(delta, result, vendored)
            if hunks and change is not None and change.old_oid and change.new_oid:
                change = self._with_hunks(diff, index, change)
            if change is not None:
                result.files.append(change)
        return result

    def rust_change_size(self, oid: str) -> tuple[int, int]:
        """(.rs paths a commit touches, bytes of their old and new blobs), cheaply (no rename detection, no
        hunks, object headers only): sizes up the work a commit costs before anything is parsed."""
        try:
            commit = self.repo[oid]
            first = commit.parent_ids[0] if commit.parent_ids else None
            diff = self._diff(self.repo[first].tree if first is not None and first in self.repo else None, commit.tree)
        except (KeyError, ValueError, pygit2.GitError):
            return 0, 0
        files = size = 0
        for delta in diff.deltas:
            if not (delta.new_file.raw_path.endswith(b".rs") or delta.old_file.raw_path.endswith(b".rs")):
                continue
            files += 1
            for side in (delta.old_file, delta.new_file):
                if side.mode in (pygit2.enums.FileMode.BLOB, pygit2.enums.FileMode.BLOB_EXECUTABLE):
                    try:
                        size += self.repo.odb.read_header(side.id)[1]
                    except (KeyError, ValueError, pygit2.GitError):
                        pass  # missing (a partial clone): it will be a recorded skip, at no parsing cost
        return files, size

    def rust_tree_changes(self, old: str | None, new: str | None) -> list[FileChange]:
        """The .rs files that differ between two commits' trees (None: the empty tree), classified as a
        commit's diff is (exclusions, vendored crates, submodules left out), without rename detection or hunks:
        what moves ingest's symbol index from the tree it reflects to another (a branch switch)."""
        empty = self.repo.TreeBuilder().write()
        trees = [self.repo[oid].peel(pygit2.Tree) if oid is not None else self.repo[empty] for oid in (old, new)]
        diff = trees[0].diff_to_tree(trees[1], context_lines=0)
        scratch = CommitDiff()
        vendored = _VendoredCrates(trees[1], trees[0]) if self.skip_vendored else None
        return [change for delta in diff.deltas if (change := self._classify(delta, scratch, vendored)) is not None]

    @staticmethod
    def _with_hunks(diff: pygit2.Diff, index: int, change: FileChange) -> FileChange:
        """Attach git's line hunks (zero context) so the parser can reparse only what changed."""
        try:
            patch = diff[index]
            hunks = tuple((h.old_start, h.old_lines, h.new_start, h.new_lines) for h in patch.hunks)
        except (pygit2.GitError, KeyError, ValueError, IndexError, OSError):
            return change  # e.g. a missing blob: the file is parsed in full (or recorded as missing)
        return FileChange(change.status, change.old_path, change.new_path, change.old_oid, change.new_oid, hunks,
                          change.old_raw, change.new_raw)

    def line_hunks(self, old_oid: str, new_oid: str) -> tuple[tuple[int, int, int, int], ...] | None:
        """git's line hunks (zero context) between two blobs, as a commit's diff gives them (`FileChange.hunks`);
        None when a blob cannot be read. Asked for only where a reparse can use them: most parses can not (the
        new blob was parsed before, or the old one's tree is not at hand)."""
        try:
            patch = self.repo[old_oid].peel(pygit2.Blob).diff(self.repo[new_oid].peel(pygit2.Blob), context_lines=0)
            return tuple((h.old_start, h.old_lines, h.new_start, h.new_lines) for h in patch.hunks)
        except (pygit2.GitError, KeyError, ValueError, OSError):
            return None

    @staticmethod
    def _diff(old_tree: pygit2.Tree | None, new_tree: pygit2.Tree) -> pygit2.Diff:
        if old_tree is None:
            return new_tree.diff_to_tree(swap=True, context_lines=0)
        return old_tree.diff_to_tree(new_tree, context_lines=0)

    def is_excluded(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.exclude)

    def _classify(self, delta: pygit2.DiffDelta, result: CommitDiff,
                  vendored: "_VendoredCrates | None" = None) -> FileChange | None:
        """The delta as a changed Rust file, or None (not Rust, or recorded in `result.skipped`)."""
        Status = pygit2.enums.DeltaStatus
        old, new = delta.old_file, delta.new_file
        (old_path, old_raw), (new_path, new_raw) = readable_path(old.raw_path), readable_path(new.raw_path)
        old_rs = delta.status not in (Status.ADDED,) and old_path.endswith(".rs")
        new_rs = delta.status not in (Status.DELETED,) and new_path.endswith(".rs")
        if not (old_rs or new_rs):
            return None
        shown = (new_path, new_raw) if new_rs else (old_path, old_raw)
        for side, is_rs, named in ((old, old_rs, (old_path, old_raw)), (new, new_rs, (new_path, new_raw))):
            if not is_rs:
                continue
            if side.mode == pygit2.enums.FileMode.COMMIT:
                result.skipped.append(SkippedFile(named[0], "submodule", named[1]))
                return None
            if side.mode == pygit2.enums.FileMode.LINK:
                result.skipped.append(SkippedFile(named[0], "symlink", named[1]))
                return None
        if (new_rs and self.is_excluded(new_path)) or (old_rs and not new_rs and self.is_excluded(old_path)):
            result.skipped.append(SkippedFile(shown[0], "excluded", shown[1]))
            return None
        crate = vendored.crate_of(new_path if new_rs else old_path, new_rs) if vendored is not None else None
        if crate is not None:
            result.skipped.append(SkippedFile(shown[0], f"vendored: crate {crate}/ has .cargo-checksum.json",
                                              shown[1]))
            return None
        if delta.status == Status.RENAMED and old_rs and new_rs:
            status = "renamed"
        elif old_rs and new_rs:
            status = "modified"
        else:
            status = "added" if new_rs else "deleted"
        return FileChange(
            status=status,
            old_path=old_path if old_rs else None, new_path=new_path if new_rs else None,
            old_oid=str(old.id) if old_rs else None, new_oid=str(new.id) if new_rs else None,
            old_raw=old_raw if old_rs else None, new_raw=new_raw if new_rs else None,
        )

    def read_text_blob(self, oid: str, max_bytes: int) -> bytes:
        """A blob's bytes if it is usable Rust source text; raises BlobUnreadable with the reason otherwise."""
        try:
            blob = self.repo[oid]
        except KeyError:
            raise BlobUnreadable("missing-object", oid) from None
        except pygit2.GitError as exc:
            raise BlobUnreadable("missing-object", f"{oid}: {exc}") from None
        if not isinstance(blob, pygit2.Blob):
            raise BlobUnreadable("not-a-blob", oid)
        if blob.size > max_bytes:
            raise BlobUnreadable("too-large", f"{blob.size} bytes")
        data = blob.data
        if b"\0" in data[:8192]:
            raise BlobUnreadable("binary")
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BlobUnreadable("non-utf8", f"byte {exc.start}") from None
        return data


class _VendoredCrates:
    """Which directories of a commit's trees are vendored crates: `cargo vendor` writes each crate with its
    own `Cargo.toml` and a `.cargo-checksum.json` (path globs miss vendor dirs under other names). One per
    diff: each directory is looked up once."""

    def __init__(self, new_tree: pygit2.Tree, old_tree: pygit2.Tree | None) -> None:
        self.trees = {True: new_tree, False: old_tree}
        self.known: dict[tuple[bool, str], bool] = {}

    def crate_of(self, path: str, new_side: bool) -> str | None:
        """The vendored crate directory holding `path` on that side of the diff, or None."""
        tree = self.trees[new_side]
        if tree is None:
            return None
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            found = self.known.get((new_side, directory))
            if found is None:
                try:
                    sub = tree[directory]
                    found = isinstance(sub, pygit2.Tree) and ".cargo-checksum.json" in sub and "Cargo.toml" in sub
                except (KeyError, ValueError, pygit2.GitError):
                    found = False
                self.known[(new_side, directory)] = found
            if found:
                return directory
        return None


def _parents_first(parents_of: dict[str, tuple[str, ...]], tips: list[str]) -> list[str]:
    """Iterative post-order DFS from the tips: each commit after all of its (unknown) parents."""
    order: list[str] = []
    done: set[str] = set()
    for tip in tips:
        if tip not in parents_of or tip in done:
            continue
        stack: list[tuple[str, int]] = [(tip, 0)]
        on_stack = {tip}
        while stack:
            oid, index = stack[-1]
            parents = [p for p in parents_of[oid] if p in parents_of]
            if index < len(parents):
                stack[-1] = (oid, index + 1)
                parent = parents[index]
                if parent not in done and parent not in on_stack:
                    stack.append((parent, 0))
                    on_stack.add(parent)
                continue
            stack.pop()
            on_stack.discard(oid)
            if oid not in done:
                done.add(oid)
                order.append(oid)
    return order
