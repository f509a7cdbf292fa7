"""A commit's changed items -> example records (pure: DESIGN.md's *Example record* contract, nothing else)."""
from __future__ import annotations

from typing import Any

from .gitrepo import CommitInfo, FileChange
from .rust_items import FileItems, ItemChange, Span, diff_items, qualified_name, referenced_identifiers

# The fields store schema 2 added to every example record (DESIGN.md, *Example record*): what lets a reader
# rebuild the item's context from git (the file around it) without re-parsing.
CONTEXT_FIELDS = ("old_blob", "new_blob", "old_span", "new_span", "identifiers")


def path_fields(key: str, path: str | None, raw: bytes | None) -> dict[str, Any]:
    """`{key: readable path}`, plus `{key}_hex` (the name's exact bytes, hex) only where the name is not UTF-8:
    every record shows a path readably and keeps it losslessly."""
    return {key: path, f"{key}_hex": raw.hex()} if raw is not None else {key: path}


def file_examples(repo_name: str, info: CommitInfo, change: FileChange,
                  old: FileItems | None, new: FileItems | None) -> list[dict[str, Any]]:
    """One example per changed item of one file; items that only moved produce nothing."""
    path, raw = (change.new_path, change.new_raw) if change.new_path else (change.old_path or "", change.old_raw)
    imports = (new or old or FileItems()).imports
    records = []
    for item in diff_items(old, new):
        if item.change_kind == "deleted" and change.old_path:
            records.append(example_record(repo_name, info, change, item, change.old_path, imports, change.old_raw))
        else:
            records.append(example_record(repo_name, info, change, item, path, imports, raw))
    return records


def example_record(repo_name: str, info: CommitInfo, change: FileChange, item: ItemChange,
                   path: str, imports: list[str], raw_path: bytes | None = None) -> dict[str, Any]:
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
        **context_fields(change, item),
    }


def context_fields(change: FileChange, item: ItemChange) -> dict[str, Any]:
    """Where the item lies in the file's old and new blob, and the names it uses (of its new text; of its old
    text for a deleted item)."""
    return {
        "old_blob": change.old_oid,
        "new_blob": change.new_oid,
        "old_span": _span(item.old_span),
        "new_span": _span(item.new_span),
        "identifiers": referenced_identifiers(item.after or item.before),
    }


def _span(span: Span | None) -> dict[str, int] | None:
    return span.as_dict() if span is not None else None


def upgraded_record(record: dict[str, Any]) -> dict[str, Any]:
    """An example stored by an older schema, given the fields git cannot give it any more (its commit is gone):
    blob ids and spans unknown (null), identifiers from its own text. `gitlora upgrade` uses it only where a
    commit cannot be re-derived, so the store still holds one shape of record."""
    return {**record, "old_blob": record.get("old_blob"), "new_blob": record.get("new_blob"),
            "old_span": record.get("old_span"), "new_span": record.get("new_span"),
            "identifiers": referenced_identifiers(record.get("after") or record.get("before") or "")}
