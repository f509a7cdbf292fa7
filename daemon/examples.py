"""A commit's changed items -> example records (pure: DESIGN.md's *Example record* contract, nothing else)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .gitrepo import CommitInfo, FileChange
from .memo import ByteLRU
from .rust_items import (FileItems, ItemChange, Span, diff_items, item_identifiers, qualified_name,
                         referenced_identifiers)

if TYPE_CHECKING:
    from tree_sitter import Tree

# The fields each store schema added to every example record (DESIGN.md, *Example record*, *Schema versions
# and upgrade*): 2, what lets a reader rebuild the item's context from git (the file around it) without
# re-parsing; 3, the new file's text around the item, for the trainer, which never reads git; 4, the definitions
# of other files the item references (added by ingest's symbol index, daemon/symbol_index.py, after the record
# is composed here: it needs the repository at the commit, which only the process writing in order has).
SCHEMA_FIELDS = {
    2: ("old_blob", "new_blob", "old_span", "new_span", "identifiers"),
    3: ("new_context",),
    4: ("cross_file",),
}
CONTEXT_FIELDS = tuple(f for fields in SCHEMA_FIELDS.values() for f in fields)

# Bytes of the new file kept above and below an item (`ingest.context_above_bytes` / `context_below_bytes`):
# enough for the trainer to fill its prefix/suffix token budget, bounded so the store stays a small multiple
# of the items themselves. A cut moves to a line boundary when at least MIN_CONTEXT_BYTES remain.
CONTEXT_ABOVE_BYTES = 2048
CONTEXT_BELOW_BYTES = 1024
MIN_CONTEXT_BYTES = 200


def path_fields(key: str, path: str | None, raw: bytes | None) -> dict[str, Any]:
    """`{key: readable path}`, plus `{key}_hex` (the name's exact bytes, hex) only where the name is not UTF-8:
    every record shows a path readably and keeps it losslessly."""
    return {key: path, f"{key}_hex": raw.hex()} if raw is not None else {key: path}


def file_examples(repo_name: str, info: CommitInfo, change: FileChange,
                  old: FileItems | None, new: FileItems | None, new_text: bytes | None = None, *,
                  above: int = CONTEXT_ABOVE_BYTES, below: int = CONTEXT_BELOW_BYTES, new_tree: Tree | None = None,
                  old_file: tuple[bytes, Tree] | None = None, memo: ByteLRU | None = None) -> list[dict[str, Any]]:
    """One example per changed item of one file; items that only moved produce nothing. `new_text` is the new
    blob's bytes (the items' `new_context` comes from it: up to `above` / `below` bytes around each item).
    `new_tree` (the syntax tree of `new_text`) and `old_file` (the old blob's bytes and tree), where the caller
    has them, give the items' identifiers without parsing each item again; `memo` keeps them by item text (see
    `rust_items.item_identifiers`)."""
    path, raw = (change.new_path, change.new_raw) if change.new_path else (change.old_path or "", change.old_raw)
    imports = (new or old or FileItems()).imports
    new_file = (new_text, new_tree) if new_text is not None and new_tree is not None else None
    records = []
    for item in diff_items(old, new):
        context = around(new_text, item.new_span, above, below)
        names = identifiers(item, new_file, old_file, memo)
        if item.change_kind == "deleted" and change.old_path:
            records.append(example_record(repo_name, info, change, item, change.old_path, imports, change.old_raw,
                                          context, names))
        else:
            records.append(example_record(repo_name, info, change, item, path, imports, raw, context, names))
    return records


def identifiers(item: ItemChange, new_file: tuple[bytes, Tree] | None = None,
                old_file: tuple[bytes, Tree] | None = None, memo: ByteLRU | None = None) -> list[str]:
    """The names the item uses: of its new text, or of its old text for a deleted item; from the file's syntax
    tree where given (the side the text comes from), else by parsing the text."""
    if item.after:
        if new_file is not None and item.new_span is not None:
            return item_identifiers(new_file[1], new_file[0], item.new_span, memo=memo)
        return referenced_identifiers(item.after, memo=memo)
    if old_file is not None and item.old_span is not None:
        return item_identifiers(old_file[1], old_file[0], item.old_span, memo=memo)
    return referenced_identifiers(item.before, memo=memo)


def example_record(repo_name: str, info: CommitInfo, change: FileChange, item: ItemChange,
                   path: str, imports: list[str], raw_path: bytes | None = None,
                   new_context: dict[str, str] | None = None, names: list[str] | None = None) -> dict[str, Any]:
    renamed = change.status == "renamed"
    return {
        "repo": repo_name,
        "commit": info.oid,
        "parent": info.parent,
        "author_time": info.author_time,
        "commit_time": info.commit_time,
        "message": info.message,
        **path_fields("path", path, raw_path),
        **path_fields("old_path", change.old_path if renamed else None, change.old_raw if renamed else None),
        "kind": item.kind,
        "qualified_name": qualified_name(path, item.name),
        "change_kind": item.change_kind,
        "before": item.before,
        "after": item.after,
        "imports": list(imports),
        **context_fields(change, item, names),
        "new_context": new_context,
    }


def context_fields(change: FileChange, item: ItemChange, names: list[str] | None = None) -> dict[str, Any]:
    """Where the item lies in the file's old and new blob, and the names it uses (`names`, else `identifiers`
    of its text)."""
    return {
        "old_blob": change.old_oid,
        "new_blob": change.new_oid,
        "old_span": _span(item.old_span),
        "new_span": _span(item.new_span),
        "identifiers": names if names is not None else identifiers(item),
    }


def around(text: bytes | None, span: Span | None, above: int, below: int) -> dict[str, str] | None:
    """The file's text just above and just below `span` (the item), `{"above", "below"}`, or None without a
    new side: `text[start:span.start_byte]` and `text[span.end_byte:end]`, so above + item + below is a
    contiguous slice of the file (indentation included: `above` ends with the item's first line's lead).

    At most `above` / `below` bytes, cut at a line boundary where at least MIN_CONTEXT_BYTES stay (else after
    the character the budget ends in, up to 3 bytes more): the trainer cuts again by tokens, from the top of
    `above` and the bottom of `below`."""
    if text is None or span is None:
        return None
    start = max(0, span.start_byte - above)
    if start > 0:
        newline = text.find(b"\n", start, span.start_byte)
        if newline != -1 and span.start_byte - (newline + 1) >= MIN_CONTEXT_BYTES:
            start = newline + 1
        while start > 0 and text[start] & 0xC0 == 0x80:  # a whole UTF-8 character: up to 3 bytes more
            start -= 1
    end = min(len(text), span.end_byte + below)
    if end < len(text):
        newline = text.rfind(b"\n", span.end_byte, end)
        if newline != -1 and newline + 1 - span.end_byte >= MIN_CONTEXT_BYTES:
            end = newline + 1
        while end < len(text) and text[end] & 0xC0 == 0x80:
            end += 1
    return {"above": text[start:span.start_byte].decode("utf-8", "replace"),
            "below": text[span.end_byte:end].decode("utf-8", "replace")}


def _span(span: Span | None) -> dict[str, int] | None:
    return span.as_dict() if span is not None else None


def upgraded_record(record: dict[str, Any]) -> dict[str, Any]:
    """An example stored by an older schema, given the fields git cannot give it any more (its commit is gone):
    blob ids, spans and the file around it unknown (null), identifiers from its own text. `gitlora upgrade` uses
    it only where a commit cannot be re-derived, so the store still holds one shape of record."""
    return {**record, "old_blob": record.get("old_blob"), "new_blob": record.get("new_blob"),
            "old_span": record.get("old_span"), "new_span": record.get("new_span"),
            "identifiers": record.get("identifiers") or referenced_identifiers(
                record.get("after") or record.get("before") or ""),
            "new_context": record.get("new_context"), "cross_file": record.get("cross_file")}
