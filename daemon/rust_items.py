"""Rust source text -> items, and old/new item maps -> changed items (pure; tree-sitter-rust only).

An item is keyed inside its file by (kind, local name, occurrence), e.g. ("method", "<Foo as Display>::fmt", 0),
so an unchanged item that only moved, or whose file was renamed, matches its old self and yields nothing.
Containers (impl, trait, inline mod) are items too, but their *own* text for change detection is their
skeleton (the container with member items cut out): editing one method yields one `method` change, not
also an `impl` change; adding or deleting a whole impl yields the impl and each of its members.
"""
from __future__ import annotations

import bisect
from operator import itemgetter
from dataclasses import dataclass, field
from functools import lru_cache

import tree_sitter_rust
from tree_sitter import Language, Node, Parser, Query, QueryCursor, Tree

from .memo import ByteLRU

ITEM_KINDS = ("fn", "method", "struct", "enum", "union", "trait", "impl", "mod", "macro", "const", "static", "type")

_LEAF_NODE_KINDS = {
    "function_item": "fn",
    "function_signature_item": "fn",
    "struct_item": "struct",
    "enum_item": "enum",
    "union_item": "union",
    "macro_definition": "macro",
    "const_item": "const",
    "static_item": "static",
    "type_item": "type",
    "mod_item": "mod",  # `mod foo;` (no body) is a leaf; `mod foo { .. }` a container
}
_CONTAINERS = {"impl_item", "trait_item", "mod_item"}
_DECORATIONS = {"attribute_item", "line_comment", "block_comment"}


@lru_cache(maxsize=1)
def _language() -> Language:
    return Language(tree_sitter_rust.language())


class _ParserHolder:
    """tree-sitter parsers are not thread-safe: one per thread (and so one per worker process)."""

    import threading

    _local = threading.local()

    @classmethod
    def get(cls) -> Parser:
        parser = getattr(cls._local, "parser", None)
        if parser is None:
            parser = cls._local.parser = Parser(_language())
        return parser


@dataclass(frozen=True, slots=True)
class Span:
    """Where an item's text lies in its file's bytes: `source[start_byte:end_byte]` is the item's text (with its
    attributes and doc comments), lines `start_line`..`end_line` (1-based, inclusive) hold it, and the first
    `start_col` bytes of `start_line` come before it (its indentation, for a method or a nested item)."""

    start_byte: int
    end_byte: int
    start_line: int
    end_line: int  # the line holding the item's last byte
    start_col: int  # in bytes, as tree-sitter counts columns

    def as_dict(self) -> dict[str, int]:
        return {"start_byte": self.start_byte, "end_byte": self.end_byte, "start_line": self.start_line,
                "end_line": self.end_line, "start_col": self.start_col}


@dataclass(frozen=True, slots=True)
class Item:
    kind: str
    name: str  # local qualified name inside the file, e.g. "net::<Peer as Drop>::drop"
    text: str  # full source text, with its attributes and doc comments
    compare_text: str  # what decides "changed": the text, or a container's skeleton
    line: int  # 1-based start line
    span: Span | None = None  # where `text` lies in the file


ItemKey = tuple[str, str, int]


@dataclass(slots=True)
class FileItems:
    """What one version of a file holds."""

    items: dict[ItemKey, Item] = field(default_factory=dict)
    imports: list[str] = field(default_factory=list)
    syntax_error: bool = False
    broken_items: int = 0  # items dropped because their own text contains a syntax error


@dataclass(frozen=True, slots=True)
class ItemChange:
    change_kind: str  # added | modified | deleted
    kind: str
    name: str
    before: str
    after: str
    old_span: Span | None = None  # where `before` lies in the old file (None: absent there)
    new_span: Span | None = None  # where `after` lies in the new file


def _text(node: Node, source: bytes) -> str:
    return source[node.start_byte:node.end_byte].decode("utf-8")


def _norm(text: str) -> str:
    return " ".join(text.split())  # what re.sub(r"\s+", " ", text).strip() gives, without the regex engine


def _is_doc_comment(node: Node) -> bool:
    return any(child.type in ("outer_doc_comment_marker",) for child in node.children)


def _impl_names(node: Node, source: bytes) -> tuple[str, str]:
    """(impl item name, prefix for its members)."""
    type_node = node.child_by_field_name("type")
    trait_node = node.child_by_field_name("trait")
    type_text = _norm(_text(type_node, source)) if type_node is not None else "?"
    base = type_node
    if base is not None and base.type == "generic_type" and base.child_by_field_name("type") is not None:
        base = base.child_by_field_name("type")
    base_text = _norm(_text(base, source)) if base is not None else "?"
    if trait_node is not None:
        trait_text = _norm(_text(trait_node, source))
        return f"impl {trait_text} for {type_text}", f"<{base_text} as {trait_text}>"
    return f"impl {type_text}", base_text


def _name(node: Node, source: bytes) -> str:
    name_node = node.child_by_field_name("name")
    return _text(name_node, source) if name_node is not None else "?"


# What a top-level item adds, memoised by its text and start column (an error-free file's item parses alike
# wherever it stands): each item's kind, name, texts, and span and line relative to the item's start. A new
# version of a file mostly repeats its predecessor's items, which then cost a lookup and new spans, not a walk of
# their nodes, a decode of their text and a skeleton each.
_Relative = tuple[str, str, str, str, int, int, int, int, int, int]


class _Extractor:
    def __init__(self, source: bytes, memo: ByteLRU | None = None) -> None:
        """`memo`: top-level items by their text (`_Relative`), used and filled (only for a tree without syntax
        errors, where an item's parse does not depend on what stands around it)."""
        self.source = source
        self.result = FileItems()
        self.memo = memo
        self._occurrences: dict[tuple[str, str], int] = {}
        self._added: list[Item] = []

    def add(self, kind: str, name: str, first: Node, node: Node, compare_text: str | None = None) -> None:
        """Item `node`, whose text starts at `first` (its first attribute or doc comment, or itself)."""
        text = self.source[first.start_byte:node.end_byte].decode("utf-8")
        (start_row, start_col), (end_row, end_col) = first.start_point, node.end_point
        # A node that ends right after a newline (a trailing line comment) ends on the line before.
        end_line = end_row if end_col == 0 and end_row > start_row else end_row + 1
        span = Span(first.start_byte, node.end_byte, start_row + 1, end_line, start_col)
        self._put(Item(kind, name, text, compare_text if compare_text is not None else text, node.start_point[0] + 1,
                       span))

    def _put(self, item: Item) -> None:
        occurrence = self._occurrences.get((item.kind, item.name), 0)
        self._occurrences[(item.kind, item.name)] = occurrence + 1
        self.result.items[(item.kind, item.name, occurrence)] = item
        self._added.append(item)

    def top_level_item(self, node: Node, start: Node) -> None:
        """`item(node, start, "", False)`, from the memo when the same text was met before."""
        assert self.memo is not None
        first_byte, (first_row, first_col) = start.start_byte, start.start_point
        text = self.source[first_byte:node.end_byte]
        known: tuple[_Relative, ...] | None = self.memo.get((text, first_col))
        if known is None:
            mark = len(self._added)
            self.item(node, start, "", False)
            known = tuple((i.kind, i.name, i.text, i.compare_text, i.line - first_row, i.span.start_byte - first_byte,
                           i.span.end_byte - first_byte, i.span.start_line - first_row, i.span.end_line - first_row,
                           i.span.start_col) for i in self._added[mark:] if i.span is not None)
            self.memo.put((text, first_col), known, 3 * len(text) + 200 * len(known))
            return
        for kind, name, item_text, compare_text, line, start_byte, end_byte, start_line, end_line, col in known:
            self._put(Item(kind, name, item_text, compare_text, line + first_row,
                           Span(start_byte + first_byte, end_byte + first_byte, start_line + first_row,
                                end_line + first_row, col)))

    def walk(self, children: list[Node], prefix: str, in_impl_or_trait: bool) -> None:
        decoration: Node | None = None  # the first attribute or doc comment of the coming item
        for child in children:
            if child.type in _DECORATIONS:
                is_decoration = child.type == "attribute_item" or _is_doc_comment(child)
                if is_decoration and decoration is None:
                    decoration = child
                elif not is_decoration:
                    decoration = None
                continue
            start = decoration if decoration is not None else child
            decoration = None
            if child.type == "ERROR":
                # Recovery: an ERROR node may still wrap items that parsed cleanly.
                self.result.syntax_error = True
                self.walk(child.named_children, prefix, in_impl_or_trait)
                continue
            if child.type == "use_declaration" and not prefix:
                self.result.imports.append(_text(child, self.source))
                continue
            if child.type not in _LEAF_NODE_KINDS and child.type not in _CONTAINERS:
                continue
            if child.has_error:
                self.result.syntax_error = True
                self.result.broken_items += 1
                body = child.child_by_field_name("body")
                if body is not None and child.type in _CONTAINERS:
                    self.walk(body.named_children, self._member_prefix(child, prefix), child.type != "mod_item")
                continue
            if self.memo is not None and not prefix:
                self.top_level_item(child, start)
            else:
                self.item(child, start, prefix, in_impl_or_trait)

    def _member_prefix(self, node: Node, prefix: str) -> str:
        if node.type == "impl_item":
            member = _impl_names(node, self.source)[1]
        else:
            member = _name(node, self.source)
        return f"{prefix}::{member}" if prefix else member

    def item(self, node: Node, start: Node, prefix: str, in_impl_or_trait: bool) -> None:
        qualify = (lambda n: f"{prefix}::{n}" if prefix else n)
        body = node.child_by_field_name("body")
        if node.type in _CONTAINERS and body is not None and body.type == "declaration_list":
            if node.type == "impl_item":
                own_name, member_prefix = _impl_names(node, self.source)
                kind = "impl"
            else:
                own_name = member_prefix = _name(node, self.source)
                kind = "trait" if node.type == "trait_item" else "mod"
            skeleton = self._skeleton(node, start, body)
            self.add(kind, qualify(own_name), start, node, compare_text=skeleton)
            self.walk(body.named_children, qualify(member_prefix), node.type != "mod_item")
            return
        kind = _LEAF_NODE_KINDS.get(node.type)
        if kind is None:
            return
        if kind == "fn" and in_impl_or_trait:
            kind = "method"
        self.add(kind, qualify(_name(node, self.source)), start, node)

    def _skeleton(self, node: Node, start: Node, body: Node) -> str:
        """The container's text with its member items cut out, whitespace-normalised."""
        pieces: list[str] = []
        cursor = start.start_byte
        for member in body.named_children:
            if member.type in _LEAF_NODE_KINDS or member.type in _CONTAINERS:
                pieces.append(self.source[cursor:member.start_byte].decode("utf-8", "replace"))
                cursor = member.end_byte
        pieces.append(self.source[cursor:node.end_byte].decode("utf-8", "replace"))
        return _norm("".join(pieces))


Hunk = tuple[int, int, int, int]  # git's (old_start, old_lines, new_start, new_lines), zero context lines


def _line_starts(data: bytes) -> list[int]:
    """Byte offset of every line start, found by numpy (a per-line Python loop, or a split into line objects,
    showed up in backfill profiles; an incremental reparse needs both versions' starts)."""
    import numpy as np  # only a process that reparses pays for numpy

    return [0, *(np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A) + 1).tolist()]


def _point(starts: list[int], offset: int) -> tuple[int, int]:
    row = bisect.bisect_right(starts, offset) - 1
    return row, offset - starts[row]


def _hunk_bytes(starts: list[int], size: int, first: int, count: int) -> tuple[int, int]:
    """Byte range of `count` lines from 1-based line `first`; for count 0 the empty range after line `first`
    (git's convention for pure insertions and deletions)."""
    line = first if count else first + 1
    start = starts[line - 1] if 0 < line <= len(starts) else size
    end = starts[line + count - 1] if 0 < line + count <= len(starts) else size
    return start, end


def parse(source: bytes, previous: tuple[bytes, Tree] | None = None, hunks: list[Hunk] | None = None) -> Tree:
    """Parse `source`; given the previous version's text and tree and git's hunks between them, reparse
    incrementally.

    A commit usually edits a few places of a large file: telling tree-sitter exactly which line ranges changed
    lets it reuse every untouched subtree (about 7x faster than full parses on the-block's history, with
    identical trees)."""
    parser = _ParserHolder.get()
    if previous is None or hunks is None:
        return parser.parse(source)
    old_source, old_tree = previous
    old_starts, new_starts = _line_starts(old_source), _line_starts(source)
    tree = old_tree.copy()
    for old_first, old_count, new_first, new_count in hunks:
        old_start, old_end = _hunk_bytes(old_starts, len(old_source), old_first, old_count)
        new_start, new_end = _hunk_bytes(new_starts, len(source), new_first, new_count)
        # Hunks come in order: before this one the tree is already in new-file coordinates.
        start_point = _point(new_starts, new_start)
        old_start_point, old_end_point = _point(old_starts, old_start), _point(old_starts, old_end)
        rows = old_end_point[0] - old_start_point[0]
        end_col = old_end_point[1] if rows else start_point[1] + old_end_point[1] - old_start_point[1]
        tree.edit(start_byte=new_start, old_end_byte=new_start + (old_end - old_start), new_end_byte=new_end,
                  start_point=start_point, old_end_point=(start_point[0] + rows, end_col),
                  new_end_point=_point(new_starts, new_end))
    return parser.parse(source, tree)


def extract_items(source: bytes, tree: Tree | None = None, memo: ByteLRU | None = None) -> FileItems:
    """Items of one Rust file. `source` must be valid UTF-8 (callers record non-UTF-8 files as skipped).
    `memo` (the caller's own: `memo.TextMemos.items`) keeps top-level items for the file's next version."""
    if tree is None:
        tree = _ParserHolder.get().parse(source)
    extractor = _Extractor(source, memo if not tree.root_node.has_error else None)
    extractor.walk(tree.root_node.children, "", False)
    if tree.root_node.has_error:
        extractor.result.syntax_error = True
    return extractor.result


def diff_items(old: FileItems | None, new: FileItems | None) -> list[ItemChange]:
    """Changed items between two versions of a file (None = the file does not exist on that side).

    When the new version has syntax errors, items missing from it are not reported as deleted: tree-sitter's
    recovery may have swallowed them, and a false deletion is worse than a missed one.
    """
    old_items = old.items if old else {}
    new_items = new.items if new else {}
    changes: list[ItemChange] = []
    for key, item in new_items.items():
        before = old_items.get(key)
        if before is None:
            changes.append(ItemChange("added", item.kind, item.name, "", item.text, new_span=item.span))
        elif before.compare_text != item.compare_text:
            changes.append(ItemChange("modified", item.kind, item.name, before.text, item.text,
                                      old_span=before.span, new_span=item.span))
    suppress_deletions = new is not None and new.syntax_error
    if not suppress_deletions:
        for key, item in old_items.items():
            if key not in new_items:
                changes.append(ItemChange("deleted", item.kind, item.name, item.text, "", old_span=item.span))
    return changes


MAX_IDENTIFIERS = 64  # per item: enough to find what it uses, bounded for a huge impl or a generated table
_MAX_IDENTIFIER_CHARS = 160  # a longer path is generic noise (`Foo::<Vec<..>>::bar`), not a name to resolve
_NOT_REFERENCES = {"Self", "self", "super", "crate"}
# What an item may reference that is defined elsewhere: types, paths (`crate::net::Peer`, `Peer::new`), called
# functions and macros, and capitalised names (constants, statics, unit structs, enum variants). Plain
# lower-case identifiers are mostly locals and parameters, which never resolve to a definition.
_REFERENCE_QUERY = """
(type_identifier) @name
(scoped_identifier) @path
(scoped_type_identifier) @path
(call_expression function: (identifier) @name)
(generic_function function: (identifier) @name)
(macro_invocation macro: (identifier) @name)
(identifier) @ident
"""


@lru_cache(maxsize=1)
def _reference_query() -> Query:
    return Query(_language(), _REFERENCE_QUERY)


def referenced_identifiers(text: str, limit: int = MAX_IDENTIFIERS, memo: ByteLRU | None = None) -> list[str]:
    """The names an item's text refers to, in order of first use, deduplicated, at most `limit`: a cheap
    tree-sitter pass over the item alone (no resolution; that needs the other files). A path counts once, whole
    (`crate::net::Peer::connect`, whitespace removed), not also its parts; the item's own name is left out.

    Ingest has the item's file parsed already and uses `item_identifiers` (the same names, without a parse)."""
    source = text.encode("utf-8")
    found = memo.get((source, limit), None) if memo is not None else None
    if found is not None:
        return list(found)
    root = _ParserHolder.get().parse(source).root_node
    own = next((child.child_by_field_name("name") for child in root.named_children
                if child.type in _LEAF_NODE_KINDS or child.type in _CONTAINERS), None)
    names = _references(root, source, 0, len(source), own, limit)
    if memo is not None:
        memo.put((source, limit), tuple(names), len(source))
    return names


def item_identifiers(tree: Tree, source: bytes, span: Span, limit: int = MAX_IDENTIFIERS,
                     memo: ByteLRU | None = None) -> list[str]:
    """`referenced_identifiers(source[span])` for an item of the file `source` parsed as `tree`, read from the
    item's own nodes in that tree instead of parsing its text again (an item parses alike alone and in its
    file: tests/test_records.py checks that on real files)."""
    text = source[span.start_byte:span.end_byte]
    # The names are a function of the item's text (the contract above), so a text met before (a merge
    # replaying its branch) is not queried again: `memo` (the caller's own, `memo.TextMemos.identifiers`).
    found = memo.get((text, limit), None) if memo is not None else None
    if found is not None:
        return list(found)
    item = _item_node(tree.root_node, span)
    if item is None:  # not an item's span: the item alone, as the contract says
        return referenced_identifiers(text.decode("utf-8"), limit, memo)
    names = _references(tree.root_node, source, span.start_byte, span.end_byte, item.child_by_field_name("name"),
                        limit)
    if memo is not None:
        memo.put((text, limit), tuple(names), len(text))
    return names


def _item_node(root: Node, span: Span) -> Node | None:
    """The item node whose text `span` is: it ends where the span ends (at its own `}` or `;`, which no item
    nested in it shares) and starts at or after the span's start (after its attributes and doc comments)."""
    if span.end_byte <= span.start_byte:
        return None
    node = root.descendant_for_byte_range(span.end_byte - 1, span.end_byte)
    while node is not None and node.end_byte == span.end_byte and node.start_byte >= span.start_byte:
        if node.type in _LEAF_NODE_KINDS or node.type in _CONTAINERS:
            return node
        node = node.parent
    return None


_FIRST_WINDOW_BYTES = 4096  # most items end within it; a large impl or module is read in doubling windows
_NOT_CAPITAL = frozenset(range(0x80)) - frozenset(range(0x41, 0x5B))  # first bytes of an ASCII name not capitalised


def _references(root: Node, source: bytes, start_byte: int, end_byte: int, own: Node | None,
                limit: int) -> list[str]:
    """The names referenced in `source[start_byte:end_byte]`, a stretch of the tree under `root`.

    The query runs over windows of the stretch in order, and stops once `limit` names are found: a large
    container's first names come from its first lines, and querying all of it would capture thousands of
    nodes to keep 64 names. Each window takes the captures that start in it, so the names come in the same
    order as from one query over the whole stretch."""
    cursor = QueryCursor(_reference_query())
    names: dict[str, None] = {}
    covered_to = -1  # the end of the last path taken: its parts are not names of their own
    low, window = start_byte, _FIRST_WINDOW_BYTES
    while low < end_byte and len(names) < limit:
        high = min(end_byte, low + window)
        window *= 2
        cursor.set_byte_range(low, high)
        found: list[tuple[int, int, str]] = []
        last = end_byte if high == end_byte else high - 1
        for label, nodes in cursor.captures(root).items():
            # The cursor also returns matches that only overlap the window; a reference of the item lies inside
            # the stretch, and belongs to the window it starts in. A plain identifier only counts capitalised,
            # and most are not: those that start with an ASCII lower-case letter, digit or `_` are dropped here.
            spans = ((node.start_byte, node.end_byte) for node in nodes)
            found.extend((start, -end, label) for start, end in spans
                         if low <= start <= last and end <= end_byte
                         and not (label == "ident" and start < end and source[start] in _NOT_CAPITAL))
        low = high
        found.sort(key=itemgetter(0, 1))  # by start; the outermost (longest) first
        for start, neg_end, label in found:
            if start < covered_to or (own is not None and start == own.start_byte and -neg_end == own.end_byte):
                continue
            name = "".join(source[start:-neg_end].decode("utf-8", "replace").split())  # whitespace removed
            if label == "path":
                covered_to = -neg_end
            elif label == "ident" and not name[:1].isupper():
                continue
            if name in _NOT_REFERENCES or len(name) > _MAX_IDENTIFIER_CHARS:
                continue
            names.setdefault(name, None)
            if len(names) >= limit:
                break
    return list(names)


def module_path(path: str) -> list[str]:
    """Module path a file's items live in, from its repository path (`node/src/net/peer.rs` ->
    ["node", "net", "peer"]): the crate directory, then the modules below `src/`."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return []
    if "src" in parts[:-1]:
        idx = len(parts) - 1 - parts[::-1].index("src", 1)
        parts = ([parts[idx - 1]] if idx > 0 else []) + parts[idx + 1:]
    stem = parts[-1][:-3] if parts[-1].endswith(".rs") else parts[-1]
    mods = parts[:-1] + ([] if stem in ("lib", "main", "mod") else [stem])
    return [m.replace("-", "_") for m in mods]


def qualified_name(path: str, local_name: str) -> str:
    return "::".join([*module_path(path), local_name])
