"""A commit's changed items -> example records (pure: the DESIGN.md example contract, nothing else)."""
from __future__ import annotations

from typing import Any

from .gitrepo import CommitInfo, FileChange
from .rust_items import FileItems, ItemChange, diff_items, qualified_name


def file_examples(repo_name: str, info: CommitInfo, change: FileChange,
                  old: FileItems | None, new: FileItems | None) -> list[dict[str, Any]]:
    """One example per changed item of one file; items that only moved produce nothing."""
    path = change.new_path or change.old_path or ""
    imports = (new or old or FileItems()).imports
    records = []
    for item in diff_items(old, new):
        item_path = change.old_path if item.change_kind == "deleted" and change.old_path else path
        records.append(example_record(repo_name, info, change, item, item_path, imports))
    return records


def example_record(repo_name: str, info: CommitInfo, change: FileChange, item: ItemChange,
                   path: str, imports: list[str]) -> dict[str, Any]:
    return {
        "repo": repo_name,
        "commit": info.oid,
        "parent": info.parent,
        "author_time": info.author_time,
        "commit_time": info.commit_time,
        "message": info.message,
        "path": path,
        "old_path": change.old_path if change.status == "renamed" else None,
        "kind": item.kind,
        "qualified_name": qualified_name(path, item.name),
        "change_kind": item.change_kind,
        "before": item.before,
        "after": item.after,
        "imports": list(imports),
    }
