"""Per-example evaluation scores of one model, kept across rounds and `gitlora eval` runs.

A round scores three models on the held-out window and the older slice: the base, the current adapter and the
candidate. The window moves by the few commits that landed since the last round, and the base and the current
adapter are the models the previous round already scored (the promoted candidate is the next round's current),
so without a cache most of a round's evaluation, greedy completion above all, repeats work already done.

An entry is keyed by what decides the score and nothing else: the example's tokens, target labels and
changed-token mask (a loss), or the completion prompt's tokens, its reference and the decoding limit (a FIM
score); a cache file belongs to one model identity (`model_key`: the base's weights and the plan's device and
precision, plus an adapter version's weights), and a file written for another identity or format is ignored.
Losses do not depend on how examples are packed (attention never crosses examples), so a subset scored alone
gives the numbers the whole set would.

torch-free: plain JSON, written atomically (a round killed mid-write leaves the previous file).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from gitlora.daemon.fsutil import atomic_write_text

FORMAT = 1  # bump when what a score means changes (loss definition, decoding): old files are then ignored
MAX_ENTRIES = 20_000  # per model and kind; the least recently used go first (a window is a few hundred examples)
CACHE_DIR = "eval-cache"  # inside the adapters dir (not a version: registry lists v#### dirs only)


def digest(*parts) -> str:
    """A stable key of JSON-able parts (token id lists, strings, numbers)."""
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()[:32]


def files_identity(directory: str | Path, names: Sequence[str] | None = None) -> list:
    """(name, size, mtime_ns) of a model directory's files (all, or `names`): what changes when weights are
    replaced. A name that is not a local directory (a hub id) is its own identity."""
    root = Path(directory)
    if not root.is_dir():
        return [str(directory)]
    out = []
    for p in sorted(root.iterdir()):
        if p.is_file() and (names is None or p.name in names):
            st = p.stat()
            out.append([p.name, st.st_size, st.st_mtime_ns])
    return [str(root.resolve()), out]


def base_key(base_model: str, plan_facts: dict) -> str:
    """The base model's identity for scores: its files and how the plan runs it (device, quantisation,
    compute dtype, attention): an nf4 base scores differently from an fp16 one."""
    return digest("base", FORMAT, files_identity(base_model),
                  {k: plan_facts.get(k) for k in ("device", "quantization", "compute_dtype", "attention")})


def adapter_key(base: str, version_dir: str | Path) -> str:
    """An adapter version on that base (a version directory is written once, by temp dir + rename)."""
    return digest("adapter", base, files_identity(version_dir, ("adapter_model.safetensors",
                                                                "adapter_config.json")))


class ScoreCache:
    """The cached scores of one model: `losses[key] = [target_sum, target_n, changed_sum, changed_n]`,
    `fim[key] = [exact, edit_sim]`; `hits`/`misses` count lookups since loading."""

    def __init__(self, path: str | Path, model_key: str):
        self.path = Path(path)
        self.model_key = model_key
        self.losses: OrderedDict[str, list] = OrderedDict()
        self.fim: OrderedDict[str, list] = OrderedDict()
        self.hits = self.misses = 0
        try:
            stored = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # absent or unreadable (a cache): start empty
        if isinstance(stored, dict) and stored.get("format") == FORMAT and stored.get("model_key") == model_key:
            self.losses.update(stored.get("losses") or {})
            self.fim.update(stored.get("fim") or {})

    @classmethod
    def for_model(cls, adapters_dir: str | Path, name: str, model_key: str) -> "ScoreCache":
        """The cache file of `name` ("base" or a version) in an adapters dir."""
        return cls(Path(adapters_dir) / CACHE_DIR / f"{name}.json", model_key)

    def get(self, table: str, key: str):
        entries = getattr(self, table)
        value = entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        entries.move_to_end(key)
        return value

    def put(self, table: str, key: str, value: list) -> None:
        entries = getattr(self, table)
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > MAX_ENTRIES:
            entries.popitem(last=False)

    def save(self) -> None:
        os.makedirs(self.path.parent, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"format": FORMAT, "model_key": self.model_key,
                                                 "losses": self.losses, "fim": self.fim}, separators=(",", ":")))

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses}


def prune(adapters_dir: str | Path, keep: Sequence[str]) -> None:
    """Remove the cache files of models not in `keep` (versions pruned or never promoted)."""
    root = Path(adapters_dir) / CACHE_DIR
    if not root.is_dir():
        return
    for p in root.glob("*.json"):
        if p.stem not in keep:
            p.unlink(missing_ok=True)
