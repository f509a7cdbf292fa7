"""Cross-file context (pure): a file's definitions as skeletons, a name index over a commit's files, and the
resolution of an item's referenced names to the definitions of *other* files (DESIGN.md, *Cross-file context*).

No compiler: resolution is what a parser can do. A name resolves through the file's `use` lines (an alias
names a path, which names a crate and module), else to the same crate's definitions, else to any file's; a
name the item's own file defines is local and never a cross-file block; a name with too many equally good
definitions is skipped rather than guessed. Skeletons are what a caller needs to use a definition: an fn's
signature, a type's definition (long ones cut at a field), a trait's or impl's header and method signatures.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from tree_sitter import Node, Tree

from .memo import ByteLRU

# Per definition and per blob: a generated 10,000-item file or a 300-field struct must not fill the store
# (nor the daemon's in-memory index), and no prompt budget would hold more anyway.
MAX_DEF_BYTES = 600
MAX_DEFS_PER_BLOB = 256
MAX_AMBIGUOUS_FILES = 3  # a name defined (equally well) in more files than this is not guessed
CROSS_FILE_BYTES = 1536  # `ingest.cross_file_bytes`: the context's byte budget per example

_SIGNATURES = {"function_item", "function_signature_item"}
_TYPES = {"struct_item": "struct", "enum_item": "enum", "union_item": "union"}
_PLAIN = {"type_item": "type", "const_item": "const", "static_item": "static"}
_MEMBER_TEXTS = {"associated_type", "const_item", "type_item"}
_EXTERNAL_CRATES = {"std", "core", "alloc", "proc_macro", "test"}
# Kinds in the order a reader wants them: what a name *is* before what is implemented for it.
_KIND_ORDER = {"struct": 0, "enum": 0, "union": 0, "trait": 0, "type": 1, "fn": 1, "const": 1, "static": 1,
               "macro": 1, "impl": 2}
_USE_TOKEN = re.compile(r"r#[A-Za-z_]\w*|[A-Za-z_]\w*|::|[{},*;]")
_IDENT = re.compile(r"(?:r#)?[A-Za-z_]\w*")


@dataclass(frozen=True, slots=True)
class Definition:
    name: str  # the simple name it is looked up by (an impl block: its type's name)
    kind: str  # fn | struct | enum | union | type | const | static | trait | impl | macro
    scope: str  # inline `mod` path inside its file ("a::b"), "" at the top
    text: str  # its skeleton

    def encode(self) -> list[str]:
        return [self.name, self.kind, self.scope, self.text]

    @classmethod
    def decode(cls, value: Sequence[str]) -> "Definition":
        return cls(*value)


# ----------------------------------------------------------------------------------- definitions of a file
def _slice(source: bytes, start: int, end: int) -> str:
    return source[start:end].decode("utf-8", "replace")


def _cut(text: str, limit: int = MAX_DEF_BYTES) -> str:
    """At most `limit` bytes, ended at a line (or a character) boundary, marked as cut."""
    if len(text.encode("utf-8")) <= limit:
        return text
    head = text.encode("utf-8")[:limit].decode("utf-8", "ignore")
    newline = head.rfind("\n")
    return (head[:newline] if newline > 0 else head).rstrip() + " ..."


def _signature(node: Node, source: bytes) -> str:
    body = node.child_by_field_name("body")
    if body is None:
        return _cut(_slice(source, node.start_byte, node.end_byte).rstrip())
    return _cut(_slice(source, node.start_byte, body.start_byte).rstrip() + ";")


def _type_definition(node: Node, source: bytes) -> str:
    """A struct, enum or union whole; a long one cut after the last field or variant that fits."""
    text = _slice(source, node.start_byte, node.end_byte)
    body = node.child_by_field_name("body")
    if len(text.encode("utf-8")) <= MAX_DEF_BYTES or body is None or not body.named_children:
        return _cut(text)
    end = None
    for member in body.named_children:
        if member.end_byte - node.start_byte + 8 > MAX_DEF_BYTES:
            break
        end = member.end_byte
    if end is None:
        return _cut(text)
    closing = "}" if source[body.end_byte - 1:body.end_byte] == b"}" else ")"
    return _slice(source, node.start_byte, end) + ", ..." + closing


def _members(node: Node, body: Node, source: bytes, with_members: bool) -> str:
    """A trait or impl: its header, then its members' signatures (methods) or texts (associated types and
    consts), while they fit."""
    header = _slice(source, node.start_byte, body.start_byte).rstrip()
    if not with_members:
        return _cut(header + " { ... }")
    lines = [header + " {"]
    size = len(header) + 4
    for member in body.named_children:
        if member.type in _SIGNATURES:
            text = _signature(member, source)
        elif member.type in _MEMBER_TEXTS:
            text = _cut(_slice(source, member.start_byte, member.end_byte))
        else:
            continue
        size += len(text.encode("utf-8")) + 5
        if size > MAX_DEF_BYTES:
            lines.append("    ...")
            break
        lines.append("    " + text)
    lines.append("}")
    return "\n".join(lines)


def _impl_type_name(node: Node, source: bytes) -> str | None:
    """`impl<T> a::Peer<T>` -> "Peer": the name the type's own definition has."""
    type_node = node.child_by_field_name("type")
    while type_node is not None and type_node.type in ("generic_type", "scoped_type_identifier", "reference_type"):
        inner = type_node.child_by_field_name("type") if type_node.type != "scoped_type_identifier" else \
            type_node.child_by_field_name("name")
        if inner is None:
            break
        type_node = inner
    if type_node is None or type_node.type != "type_identifier":
        return None
    return _slice(source, type_node.start_byte, type_node.end_byte)


def _name(node: Node, source: bytes) -> str | None:
    name = node.child_by_field_name("name")
    return _slice(source, name.start_byte, name.end_byte) if name is not None else None


def definitions(source: bytes, tree: Tree, memo: ByteLRU | None = None) -> list[Definition]:
    """The definitions of one file, top-level and inside inline `mod` blocks, breadth first (all top-level ones,
    then those one `mod` deep, ...), at most MAX_DEFS_PER_BLOB (attributes and doc comments dropped: a skeleton
    says how to use a name, not why it exists).

    `memo` (the caller's own: `memo.TextMemos.definitions`) keeps a top-level node's definitions by its text,
    level by level: in an error-free file a node parses alike wherever it stands, and a file's next version
    repeats most of its nodes."""
    root = tree.root_node
    if root.has_error or memo is None:  # an ERROR node's parse depends on what stands around it
        return [d for level in _levels(root.named_children, source) for d in level][:MAX_DEFS_PER_BLOB]
    # Level k of the file is level k of each top-level node in turn, so nodes met before come from the memo.
    levels: list[list[Definition]] = []
    for node in root.named_children:
        text = source[node.start_byte:node.end_byte]
        own: tuple[tuple[Definition, ...], ...] | None = memo.get(text)
        if own is None:
            own = _levels([node], source)
            memo.put(text, own, 2 * len(text) + 100 * sum(map(len, own)))
        for depth, found in enumerate(own):
            if depth == len(levels):
                levels.append([])
            levels[depth].extend(found)
    return [d for level in levels for d in level][:MAX_DEFS_PER_BLOB]


def _levels(nodes: list[Node], source: bytes) -> tuple[tuple[Definition, ...], ...]:
    """The definitions among `nodes` (at the top of a file) by depth: those of the nodes themselves, then those
    one inline `mod` (or ERROR node) deeper, and so on; stops at the level where MAX_DEFS_PER_BLOB are found."""
    levels: list[tuple[Definition, ...]] = []
    pending: list[tuple[list[Node], str]] = [(nodes, "")]
    total = 0
    while pending and total < MAX_DEFS_PER_BLOB:
        found: list[Definition] = []
        deeper: list[tuple[list[Node], str]] = []
        for children, scope in pending:
            for node in children:
                if node.type == "ERROR":
                    deeper.append((node.named_children, scope))
                    continue
                definition = _definition(node, source, scope)
                if definition is not None:
                    found.append(definition)
                elif node.type == "mod_item":
                    body, name = node.child_by_field_name("body"), _name(node, source)
                    if body is not None and name:
                        deeper.append((body.named_children, f"{scope}::{name}" if scope else name))
        levels.append(tuple(found))
        total += len(found)
        pending = deeper
    while levels and not levels[-1]:
        levels.pop()
    return tuple(levels)


def _definition(node: Node, source: bytes, scope: str) -> Definition | None:
    kind = node.type
    if kind in _SIGNATURES:
        name = _name(node, source)
        return Definition(name, "fn", scope, _signature(node, source)) if name else None
    if kind in _TYPES:
        name = _name(node, source)
        return Definition(name, _TYPES[kind], scope, _type_definition(node, source)) if name else None
    if kind in _PLAIN:
        name = _name(node, source)
        return Definition(name, _PLAIN[kind], scope, _cut(_slice(source, node.start_byte, node.end_byte))) \
            if name else None
    if kind == "trait_item":
        name, body = _name(node, source), node.child_by_field_name("body")
        return Definition(name, "trait", scope, _members(node, body, source, True)) if name and body else None
    if kind == "impl_item":
        body = node.child_by_field_name("body")
        name = _impl_type_name(node, source)
        if name is None or body is None:
            return None
        # A trait's impl says only that it exists: its methods' signatures are the trait's.
        inherent = node.child_by_field_name("trait") is None
        return Definition(name, "impl", scope, _members(node, body, source, inherent))
    if kind == "macro_definition":
        name = _name(node, source)
        return Definition(name, "macro", scope, f"macro_rules! {name} {{ ... }}") if name else None
    return None


# ------------------------------------------------------------------------------------------ modules, use
@lru_cache(maxsize=4096)
def crate_and_module(path: str) -> tuple[str, tuple[str, ...]]:
    """(crate, module path) a file's items live in, from its repository path: `node/src/net/peer.rs` ->
    ("node", ("net", "peer")); `src/lib.rs` -> ("", ()); a file outside `src/` (tests/, benches/) keeps its
    directories as modules of the first one."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "", ()
    stem = parts[-1][:-3] if parts[-1].endswith(".rs") else parts[-1]
    dirs = parts[:-1]
    if "src" in dirs:
        idx = len(dirs) - 1 - dirs[::-1].index("src")
        crate, mods = (dirs[idx - 1] if idx > 0 else ""), dirs[idx + 1:]
    else:
        crate, mods = (dirs[0] if dirs else ""), dirs[1:]
    if stem not in ("lib", "main", "mod"):
        mods = [*mods, stem]
    return crate.replace("-", "_"), tuple(m.replace("-", "_") for m in mods)


@dataclass
class Uses:
    """What a file's `use` lines bring into scope: alias -> full path, and glob-imported paths."""

    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    globs: list[tuple[str, ...]] = field(default_factory=list)


@lru_cache(maxsize=256)
def parse_uses(lines: tuple[str, ...]) -> Uses:
    """`use a::b::{C, d::E as F, self, g::*};` -> aliases C, F, b (self) and the glob a::b::g. A line that does
    not parse contributes what parsed before the problem. Cached: a file's examples share its `use` lines (the
    result is not to be changed)."""
    uses = Uses()
    for line in lines:
        tokens = _USE_TOKEN.findall(line)
        if "use" not in tokens:
            continue
        tokens = tokens[tokens.index("use") + 1:]
        if tokens[:1] == ["::"]:
            tokens = tokens[1:]
        try:
            _use_tree(tokens, 0, (), uses)
        except IndexError:
            continue
    return uses


def _use_tree(tokens: list[str], i: int, prefix: tuple[str, ...], uses: Uses) -> int:
    path = list(prefix)
    while True:
        token = tokens[i]
        if token == "{":
            i += 1
            while tokens[i] != "}":
                i = _use_tree(tokens, i, tuple(path), uses)
                if tokens[i] == ",":
                    i += 1
            return i + 1
        if token == "*":
            uses.globs.append(tuple(path))
            return i + 1
        if not _IDENT.fullmatch(token):
            return i
        i += 1
        if token == "self" and path:
            pass  # `a::{self}`: names `a` itself
        else:
            path.append(token.removeprefix("r#"))
        if tokens[i:i + 1] == ["::"]:
            i += 1
            continue
        alias = path[-1] if path else None
        if tokens[i:i + 1] == ["as"]:
            alias = tokens[i + 1]
            i += 2
        if alias and alias != "_":
            uses.aliases[alias] = tuple(path)
        return i


def _target_module(segments: Sequence[str], crate: str, module: tuple[str, ...]
                   ) -> tuple[str, tuple[str, ...]] | None:
    """The (crate, module) a path's leading `segments` name, seen from a file in (crate, module); None for a
    crate outside the repository's (std and friends)."""
    if not segments:
        return None
    first, rest = segments[0], tuple(segments[1:])
    if first == "crate":
        return crate, rest
    if first == "self":
        return crate, module + rest
    if first == "super":
        up = module
        for segment in segments:
            if segment != "super":
                break
            up = up[:-1]
        return crate, up + tuple(s for s in rest if s != "super")
    if first in _EXTERNAL_CRATES:
        return None
    return first, rest


# ------------------------------------------------------------------------------------------ the name index
class NameIndex:
    """The definitions of one commit's files: path -> blob, blob -> its definitions, name -> the paths that
    define it. Updated file by file (a commit's diff, or a tree-to-tree diff)."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self._by_blob: dict[str, dict[str, list[Definition]]] = {}
        self._blob_users: dict[str, int] = {}
        self._by_name: dict[str, dict[str, None]] = {}
        self.changed: set[str] = set()  # names whose entries changed since `take_changed` last ran

    def take_changed(self) -> set[str]:
        """The names whose definitions or places changed since the last call (what a LookupMemo must forget)."""
        changed, self.changed = self.changed, set()
        return changed

    def __len__(self) -> int:
        return len(self.files)

    def has_blob(self, blob: str) -> bool:
        return blob in self._by_blob

    def blob_of(self, path: str) -> str | None:
        return self.files.get(path)

    def remove(self, path: str) -> None:
        blob = self.files.pop(path, None)
        if blob is None:
            return
        self.changed.update(self._by_blob.get(blob, ()))
        for name in self._by_blob.get(blob, {}):
            paths = self._by_name.get(name)
            if paths is not None:
                paths.pop(path, None)
                if not paths:
                    del self._by_name[name]
        self._blob_users[blob] -= 1
        if not self._blob_users[blob]:
            del self._blob_users[blob]
            self._by_blob.pop(blob, None)

    def put(self, path: str, blob: str, defs: Iterable[Definition]) -> None:
        if self.files.get(path) == blob:
            return
        self.remove(path)
        if blob not in self._by_blob:
            by_name: dict[str, list[Definition]] = {}
            for definition in defs:
                by_name.setdefault(definition.name, []).append(definition)
            self._by_blob[blob] = by_name
        self.files[path] = blob
        self._blob_users[blob] = self._blob_users.get(blob, 0) + 1
        self.changed.update(self._by_blob[blob])
        for name in self._by_blob[blob]:
            self._by_name.setdefault(name, {})[path] = None

    def defined_in(self, name: str) -> list[str]:
        return list(self._by_name.get(name, ()))

    def definitions(self, path: str, name: str) -> list[Definition]:
        blob = self.files.get(path)
        return list(self._by_blob.get(blob, {}).get(name, ())) if blob is not None else []


# ------------------------------------------------------------------------------------------ resolution
@dataclass(frozen=True)
class Resolution:
    blocks: list[dict[str, str]]  # [{"path", "text"}], most relevant first
    referencing: bool  # the item names something defined in another file of the repository


_MISSING = object()


class LookupMemo:
    """What each (path, imports, identifier) names, kept from commit to commit for one NameIndex: a lookup reads
    only the index's entries for the names its identifier's segments hold, so when those change (`forget` with
    the index's `take_changed`) the lookups that read them are dropped, and every other one still holds."""

    def __init__(self, max_entries: int = 1 << 14) -> None:
        self.max_entries = max_entries  # emptied when full: a long backfill's lookups would not all fit
        self._values: dict[tuple, Any] = {}
        self._by_name: dict[str, list[tuple]] = {}
        self._imports: dict[tuple[str, ...], tuple[str, ...]] = {}  # one copy of each file's imports for the keys

    def __len__(self) -> int:
        return len(self._values)

    def imports(self, imports: tuple[str, ...]) -> tuple[str, ...]:
        return self._imports.setdefault(imports, imports)

    def get(self, key: tuple) -> Any:
        return self._values.get(key, _MISSING)

    def put(self, key: tuple, names: Iterable[str], value: Any) -> None:
        if len(self._values) >= self.max_entries:
            self.clear()
        self._values[key] = value
        for name in names:
            self._by_name.setdefault(name, []).append(key)

    def forget(self, names: Iterable[str]) -> None:
        for name in names:
            for key in self._by_name.pop(name, ()):
                self._values.pop(key, None)

    def clear(self) -> None:
        self._values.clear()
        self._by_name.clear()
        self._imports.clear()


def resolve(index: NameIndex, path: str, identifiers: Sequence[str], imports: Sequence[str],
            budget: int = CROSS_FILE_BYTES, memo: LookupMemo | None = None) -> Resolution:
    """The definitions in other files that the item at `path` references (its `identifiers`, read through its
    file's `imports`), as one block per file within `budget` bytes (each block's path and text count): imported
    names first, then in order of first use; per name the best-placed definitions (the module its path names,
    then its crate, then anywhere), skipped when more than MAX_AMBIGUOUS_FILES files tie. `memo`: lookups
    kept for the next examples, and commits, of the same index (see LookupMemo)."""
    memo = LookupMemo() if memo is None else memo
    imports = memo.imports(tuple(imports))
    uses: Uses | None = None  # parsed when a lookup needs them
    crate, module = crate_and_module(path)
    ranked: list[tuple[int, int, str, Definition]] = []  # (imported first, order of use, path, definition)
    referencing = False
    taken: set[tuple[str, str]] = set()
    for order, identifier in enumerate(identifiers):
        key = (path, imports, identifier)
        found = memo.get(key)
        if found is _MISSING:
            uses = uses if uses is not None else parse_uses(imports)
            segments = _segments(identifier, uses)
            found = _lookup(index, path, segments, uses, crate, module) if segments else None
            memo.put(key, segments[1] if segments else (), found)
        if found is None:
            continue
        imported, places = found
        referencing = True
        if len(places) > MAX_AMBIGUOUS_FILES:
            continue
        for other, name in places:
            if (other, name) in taken:
                continue
            taken.add((other, name))
            for definition in sorted(index.definitions(other, name), key=lambda d: _KIND_ORDER.get(d.kind, 3)):
                ranked.append((0 if imported else 1, order, other, definition))
    if budget <= 0 or not ranked:
        return Resolution([], referencing)
    ranked.sort(key=lambda entry: entry[:2])
    texts: dict[str, list[str]] = {}
    used = 0
    for _, _, other, definition in ranked:
        cost = len(definition.text.encode("utf-8")) + 1
        if other not in texts:
            cost += len(other.encode("utf-8")) + len("<file_sep>\n")
        if used + cost > budget:
            continue
        used += cost
        texts.setdefault(other, []).append(definition.text)
    return Resolution([{"path": p, "text": "\n".join(t) + "\n"} for p, t in texts.items()], referencing)


def _segments(identifier: str, uses: Uses) -> tuple[bool, list[str]] | None:
    """(imported?, the path's segments, its imported alias expanded) of an identifier; None when it has none."""
    segments = [s.removeprefix("r#") for s in identifier.split("::") if _IDENT.fullmatch(s)]
    if not segments:
        return None
    imported = segments[0] in uses.aliases
    if imported:
        segments = [*uses.aliases[segments[0]], *segments[1:]]
    return imported, segments


def _lookup(index: NameIndex, path: str, found: tuple[bool, list[str]], uses: Uses, crate: str,
            module: tuple[str, ...]) -> tuple[bool, list[tuple[str, str]]] | None:
    """(imported?, the best places [(path, name)]) of what an identifier (its `_segments`) names in other files,
    or None when it names nothing there (or something of its own file, or outside the repository). Reads the
    index's entries for those segments' names only (what LookupMemo relies on)."""
    imported, segments = found
    if segments[0] in _EXTERNAL_CRATES:
        return None
    # The rightmost capitalised segment names a type, trait or constant (`Peer::new` -> Peer; an enum
    # variant's type when the variant itself is not a definition); a path of lower-case segments, a function.
    candidates = [i for i in range(len(segments) - 1, -1, -1) if segments[i][:1].isupper()]
    if not segments[-1][:1].isupper():
        candidates.append(len(segments) - 1)
    for i in candidates:
        name = segments[i]
        places = index.defined_in(name)
        if path in places and any(d.kind != "impl" for d in index.definitions(path, name)):
            return None  # defined in the item's own file: local, whatever other files define
        others = sorted(p for p in places if p != path)  # not the order files entered the index: any history
        # that reaches this commit's tree resolves alike (an upgrade moves by tree diffs, a backfill by commits)
        if not others:
            continue
        hint = _target_module(segments[:i], crate, module) if i else None
        return imported, [(p, name) for p in _best(index, others, name, hint, uses, crate, module)]
    return None


def _best(index: NameIndex, places: list[str], name: str, hint: tuple[str, tuple[str, ...]] | None,
          uses: Uses, crate: str, module: tuple[str, ...]) -> list[str]:
    """The places of the best score: the module the path names (or a glob import's), then the crate it names
    (or the item's), then anywhere."""
    globs = {_target_module(g, crate, module) for g in uses.globs}
    scored: dict[int, list[str]] = {}
    for place in places:
        place_crate, place_module = crate_and_module(place)
        score = 0
        for definition in index.definitions(place, name):
            module = place_module + (tuple(definition.scope.split("::")) if definition.scope else ())
            if hint is not None and (place_crate, module) == hint or (place_crate, module) in globs:
                score = max(score, 2)
            elif place_crate == (hint[0] if hint is not None else crate):
                score = max(score, 1)
        scored.setdefault(score, []).append(place)
    return scored[max(scored)]
