"""Adapter versions on disk: `adapters/vNNNN/` directories and the `adapters/current` symlink.

    adapters/
      v0001/  adapter_config.json  adapter_model.safetensors  metrics.json
      v0002/  ...
      current -> v0002            (relative symlink: the adapter serving and the next round start from)
      history.jsonl               (one line per promote / rollback)

Crash safety: a version is written under `.tmp-vNNNN-<pid>` and renamed into place only when complete, and
`current` is swapped by creating a symlink under a temp name and `os.replace`-ing it over the old one (an
atomic rename on POSIX). So a round killed at any instant leaves `current` pointing at a complete version, and
at worst a `.tmp-*` directory that `clean_partial` removes. torch/peft are imported only by `export_merged`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from gitlora.daemon.fsutil import publish_dir, replace_symlink

VERSION_RE = re.compile(r"^v(\d{4,})$")
CURRENT = "current"
HISTORY = "history.jsonl"
METRICS = "metrics.json"


def _version_num(name: str) -> int | None:
    m = VERSION_RE.match(name)
    return int(m.group(1)) if m else None


def version_name(n: int) -> str:
    return f"v{n:04d}"


def list_versions(adapters_dir) -> list[dict]:
    """Complete versions, oldest first: [{"version", "path", "current", "metrics"}]."""
    root = Path(adapters_dir)
    if not root.is_dir():
        return []
    cur = current_version(root)
    out = []
    for p in sorted((p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and _version_num(p.name)),
                    key=lambda p: _version_num(p.name)):
        try:
            metrics = json.loads((p / METRICS).read_text())
        except (OSError, json.JSONDecodeError):
            metrics = {}
        out.append({"version": p.name, "path": str(p), "current": p.name == cur, "metrics": metrics})
    return out


def current_version(adapters_dir) -> str | None:
    """The version `current` points at, or None (no adapter yet: the base model serves)."""
    link = Path(adapters_dir) / CURRENT
    try:
        target = os.readlink(link)
    except OSError:
        return None
    name = Path(target).name
    return name if _version_num(name) and (Path(adapters_dir) / name).is_dir() else None


def next_version_dir(adapters_dir) -> Path:
    """Path of the next version (not created): one past the highest complete or in-progress number."""
    root = Path(adapters_dir)
    nums = [0]
    if root.is_dir():
        for p in root.iterdir():
            m = re.match(r"^(?:\.tmp-)?v(\d{4,})", p.name)
            if m:
                nums.append(int(m.group(1)))
    return root / version_name(max(nums) + 1)


def temp_dir_for(version_dir: Path) -> Path:
    """Where a version is written before the rename that makes it visible."""
    return version_dir.parent / f".tmp-{version_dir.name}-{os.getpid()}"


def commit_version(tmp: Path, version_dir: Path) -> Path:
    """Make a fully written temp dir visible as `version_dir` (fsync'd files, then one rename)."""
    return publish_dir(tmp, version_dir)


def clean_partial(adapters_dir) -> list[str]:
    """Remove temp dirs/links left by killed rounds; returns their names."""
    root = Path(adapters_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(f".{CURRENT}.tmp-"):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


def _log(root: Path, **event) -> None:
    with open(root / HISTORY, "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.time(), **event}) + "\n")


def promote(adapters_dir, version: str, *, event: str = "promote") -> None:
    """Point `current` at `version` atomically (symlink under a temp name, then os.replace)."""
    root = Path(adapters_dir)
    if not (root / version).is_dir() or not _version_num(version):
        raise ValueError(f"no adapter version {version!r} in {root}")
    previous = current_version(root)
    replace_symlink(root / CURRENT, version)  # its temp name starts with `.current.tmp-`, as clean_partial knows
    _log(root, event=event, version=version, previous=previous)


def rollback(adapters_dir, version: str | None = None) -> str:
    """Point `current` at `version`, or (None) at the version the current one was trained from.

    The parent chain lives in each version's metrics.json ("parent"), so repeated rollbacks walk back through
    promoted versions. Raises ValueError when there is nothing to roll back to.
    """
    root = Path(adapters_dir)
    if version is None:
        cur = current_version(root)
        if cur is None:
            raise ValueError("no current adapter to roll back from")
        try:
            version = json.loads((root / cur / METRICS).read_text()).get("parent")
        except (OSError, json.JSONDecodeError):
            version = None
        if not version:
            raise ValueError(f"{cur} has no earlier promoted version to roll back to")
    elif not version.startswith("v") and version.isdigit():
        version = version_name(int(version))
    promote(root, version, event="rollback")
    return version


def export_merged(adapters_dir, version: str | None, base_model, out_dir) -> Path:
    """Merge an adapter into its base model and save a plain transformers model dir (for vLLM & co, which lack
    StarCoder2 LoRA). Loads the base unquantised in its own dtype on CPU: merging into 4-bit weights would
    round the LoRA delta away. Written to a temp sibling and renamed into place."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(adapters_dir)
    version = version or current_version(root)
    if version is None:
        raise ValueError(f"no adapter to export in {root}")
    if version.isdigit():
        version = version_name(int(version))
    vdir = root / version
    if not vdir.is_dir():
        raise ValueError(f"no adapter version {version!r} in {root}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype="auto")
        merged = PeftModel.from_pretrained(base, str(vdir)).merge_and_unload()
        merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(base_model)).save_pretrained(tmp)
    (tmp / "gitlora-export.json").write_text(json.dumps(
        {"adapter_version": version, "adapter_path": str(vdir), "base_model": str(base_model)}, indent=2))
    return publish_dir(tmp, out, replace=True)
