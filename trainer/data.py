"""Example records -> token blocks: render in StarCoder2's native format, mask, truncate, pack, mix replay.

Pure Python (the tokenizer is passed in; no torch), so every rule here is unit-testable in milliseconds.

Rendering. StarCoder2 has no commit tokens (StarCoder 1's `<commit_before>` etc. are gone), and adding tokens
would resize the vocabulary, so a change is rendered the way StarCoder2 saw repositories in pre-training:

    <repo_name>{repo}<file_sep>{path}
    // {commit message, each line commented}
    // {change_kind} {kind} {qualified_name}
    {use lines of the new file}
    // before:                         (omitted for added items)
    {before}
    // after:
  ->{after}<|endoftext|>               (target: the only tokens with a loss)

A share (`fim_share`) of items is rendered as fill-in-the-middle instead (PSM order, as StarCoder2 was trained):
`<repo_name>..<file_sep>path\\n<fim_prefix>{header}{after[:i]}<fim_suffix>{after[j:]}<fim_middle>` -> `{after[i:j]}`
with a line-aligned middle span, which is what an editor completion asks for.

Deleted items are skipped: the target would be an empty string, which teaches nothing but "stop", and the
daemon's shards are the only record of them (they stay there). Skips are counted, never silent.

Packing. Examples are packed best-fit-decreasing into equal blocks of <= `context_length` tokens; position_ids
restart at 0 for each example, which transformers turns into a block-diagonal causal mask (no attention
across examples) when attention_mask is None. Padding (label -100) only fills what no example fits.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import random
from dataclasses import dataclass, field

IGNORE = -100
EOS = "<|endoftext|>"
MAX_MESSAGE_LINES = 8
MAX_MESSAGE_CHARS = 600


# ----------------------------------------------------------------------------------------------- reading shards
def read_shards(paths) -> list[dict]:
    """All example records of the given JSONL shards, in order. A malformed line is an error (shards are
    written atomically and never rewritten, so one means corruption, not a partial write)."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: malformed example record: {e}") from e
    return records


# ------------------------------------------------------------------------------------------------- rendering
def _comment(text: str) -> str:
    lines = text.strip().splitlines()[:MAX_MESSAGE_LINES] or ["(no message)"]
    body = "\n".join(f"// {line}".rstrip() for line in lines)
    return body[:MAX_MESSAGE_CHARS] + "\n"


def header(ex: dict) -> str:
    """StarCoder2's repository-level file header."""
    return f"<repo_name>{ex.get('repo', '')}<file_sep>{ex.get('path', '')}\n"


def context_lines(ex: dict) -> str:
    """Commit message, what changed, and the new file's `use` lines: what a completion would see above."""
    out = _comment(ex.get("message", ""))
    name = ex.get("qualified_name") or ""
    out += f"// {ex.get('change_kind', 'modified')} {ex.get('kind', 'item')} {name}".rstrip() + "\n"
    imports = [u.strip() for u in ex.get("imports") or [] if u.strip()]
    if imports:
        out += "\n".join(imports) + "\n"
    return out


def item_digest(ex: dict, seed: int) -> bytes:
    """A seeded digest of an item's identity: what every per-item random choice derives from."""
    key = f"{seed}:{ex.get('commit')}:{ex.get('path')}:{ex.get('qualified_name')}:{ex.get('change_kind')}"
    return hashlib.sha256(key.encode()).digest()


def _example_rng(ex: dict, seed: int) -> random.Random:
    return random.Random(int.from_bytes(item_digest(ex, seed)[:8], "big"))


def render(ex: dict, fim_share: float = 0.0, seed: int = 0) -> tuple[str, str] | None:
    """(prompt, target) for one example record, or None when it has nothing to learn (deleted / empty after).

    Deterministic: whether an item becomes FIM and where its span lies depend only on (seed, item identity).
    """
    after = ex.get("after") or ""
    if ex.get("change_kind") == "deleted" or not after.strip():
        return None
    rng = _example_rng(ex, seed)
    if fim_share > 0 and rng.random() < fim_share:
        fim = _fim_split(ex, after, rng)
        if fim is not None:
            return fim[0], fim[1] + EOS
    before = ex.get("before") or ""
    prompt = header(ex) + context_lines(ex)
    if before.strip():
        prompt += "// before:\n" + before.rstrip("\n") + "\n// after:\n"
    return prompt, after.rstrip("\n") + "\n" + EOS


def _fim_split(ex: dict, after: str, rng: random.Random) -> tuple[str, str] | None:
    """(PSM prompt, middle) with a line-aligned middle span drawn from `rng`; None below three lines."""
    lines = after.splitlines(keepends=True)
    if len(lines) < 3:
        return None
    i = rng.randrange(1, len(lines) - 1)
    j = rng.randrange(i + 1, min(len(lines), i + 1 + max(1, len(lines) // 3)) + 1)
    prefix, middle, suffix = "".join(lines[:i]), "".join(lines[i:j]), "".join(lines[j:])
    return f"{header(ex)}<fim_prefix>{context_lines(ex)}{prefix}<fim_suffix>{suffix}<fim_middle>", middle


def render_fim(ex: dict, seed: int = 0) -> tuple[str, str] | None:
    """(prompt, middle) of the completion task for one example: the FIM rendering training uses, without EOS,
    its span chosen by (seed, item identity) alone; None when the item is deleted, empty or under three lines."""
    after = ex.get("after") or ""
    if ex.get("change_kind") == "deleted" or not after.strip():
        return None
    return _fim_split(ex, after, _example_rng(ex, seed))


def before_text(ex: dict) -> str:
    """The before version in the target's own shape (what a copy of it would look like as a target); empty for
    added items. Tokenised and aligned with the target to find the copied tokens (metrics.changed_mask)."""
    before = ex.get("before") or ""
    return before.rstrip("\n") + "\n" + EOS if before.strip() else ""


# -------------------------------------------------------------------------------------------- tokenise + mask
@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens, the token id on target tokens


def tokenize(tokenizer, prompt: str, target: str, context_length: int) -> tuple[Tokenized, bool]:
    """Prompt and target tokenised separately (so the mask boundary is exact); over-long examples are cut.

    Truncation keeps the whole target when it fits in 3/4 of the context (else its first 3/4), then the prompt's
    first 32 tokens (repo/path header) and as much of its end (the `before` text nearest the target) as fits.
    Returns (tokenized, truncated?).
    """
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    truncated = len(p) + len(t) > context_length
    if truncated:
        t = t[: max(1, context_length * 3 // 4)] if len(t) > context_length * 3 // 4 else t
        budget = context_length - len(t)
        if len(p) > budget:
            head = min(32, budget // 2)
            p = p[:head] + (p[len(p) - (budget - head):] if budget - head > 0 else [])
    return Tokenized(p + t, [IGNORE] * len(p) + list(t)), truncated


# ------------------------------------------------------------------------------------------------- packing
@dataclass
class Packed:
    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    position_ids: list[list[int]] = field(default_factory=list)
    context_length: int = 0
    real_tokens: int = 0
    target_tokens: int = 0
    members: list[list[int]] = field(default_factory=list)  # per block: indices of the examples it holds, in order

    @property
    def waste(self) -> float:
        """Share of block positions that are padding."""
        total = len(self.input_ids) * self.context_length
        return 0.0 if total == 0 else 1.0 - self.real_tokens / total


def _best_fit(lengths: list[int], block: int) -> list[list[int]]:
    """Best-fit decreasing: each example goes into the fullest block it still fits in (bisect over free space)."""
    order = sorted(range(len(lengths)), key=lambda k: (-lengths[k], k))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for k in order:
        n = lengths[k]
        if n == 0:
            continue
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            cap, b = free.pop(pos)
        else:
            cap, b = block, len(bins)
            bins.append([])
        bins[b].append(k)
        if cap - n > 0:
            bisect.insort(free, (cap - n, b))
    return bins


def pack(examples: list[Tokenized], context_length: int, pad_id: int, seed: int = 0) -> Packed:
    """Pack examples into equal-length blocks of at most `context_length` tokens; block order shuffled by seed.

    With many blocks the only real waste is the last block's tail; with few (a small round) that tail is a big
    share, so shorter block lengths (multiples of 64, never below the longest example) are tried too and the
    least wasteful kept: fewer, fuller blocks cost less compute than padded ones.
    """
    lengths = [len(e.input_ids) for e in examples]
    longest = max(lengths, default=0)
    bins, block = _best_fit(lengths, context_length), context_length
    if 0 < len(bins) < 512:
        for length in range(context_length - 64, max(longest, 64) - 1, -64):
            cand = _best_fit(lengths, length)
            if len(cand) * length < len(bins) * block:
                bins, block = cand, length
    random.Random(seed).shuffle(bins)
    out = Packed(context_length=block)
    for members in bins:
        ids, labels, pos_ids = [], [], []
        for k in members:
            ex = examples[k]
            ids += ex.input_ids
            labels += ex.labels
            pos_ids += range(len(ex.input_ids))
            out.target_tokens += sum(1 for x in ex.labels if x != IGNORE)
        out.real_tokens += len(ids)
        out.members.append(list(members))
        pad = block - len(ids)
        out.input_ids.append(ids + [pad_id] * pad)
        out.labels.append(labels + [IGNORE] * pad)
        out.position_ids.append(pos_ids + list(range(pad)))
    return out


# ------------------------------------------------------------------------------------------------- replay mix
def mix_replay(new: list[dict], old: list[dict], replay_share: float, seed: int,
               newest_first: list[str] | None = None, halflife_commits: float = 0.0) -> tuple[list[dict], int]:
    """New examples plus a deterministic sample of older ones so that old ones make `replay_share` of the mix
    (by example count). With `halflife_commits` > 0 and the replay pool's commits in `newest_first` order, an
    example's chance of being drawn halves every `halflife_commits` commits back (recency weighting); else every
    old example is equally likely. Returns (mixed list in a seeded shuffle, number of replayed examples)."""
    if not old or replay_share <= 0 or not new:
        mixed = list(new)
        random.Random(seed).shuffle(mixed)
        return mixed, 0
    # At least one old example whenever there is old data: a one-commit round would otherwise round to zero
    # and train on nothing but the newest change, the case replay exists for.
    want = max(1, round(len(new) * replay_share / max(1e-9, 1.0 - replay_share)))
    rng = random.Random(seed)
    weights = replay_weights(old, newest_first, halflife_commits)
    if weights is None:
        replay = rng.sample(old, want) if want <= len(old) else (
            list(old) + [rng.choice(old) for _ in range(want - len(old))])
    elif want <= len(old):
        # Weighted sampling without replacement (Efraimidis & Spirakis): the `want` largest u ** (1 / w).
        keys = sorted(((rng.random() ** (1.0 / w), i) for i, w in enumerate(weights)), reverse=True)
        replay = [old[i] for _, i in keys[:want]]
    else:  # fewer old examples than wanted: take all of them, then repeat a weighted sample
        replay = list(old) + rng.choices(old, weights=weights, k=want - len(old))
    mixed = list(new) + replay
    rng.shuffle(mixed)
    return mixed, len(replay)


def replay_weights(old: list[dict], newest_first: list[str] | None, halflife_commits: float) -> list[float] | None:
    """Each old example's draw weight, 0.5 ** (its commit's rank among the replay commits / half-life); None
    for uniform. A commit missing from the list counts as the oldest."""
    if halflife_commits <= 0 or not newest_first:
        return None
    rank = {c: i for i, c in enumerate(newest_first)}
    oldest = len(newest_first)
    return [0.5 ** (rank.get(r.get("commit"), oldest) / halflife_commits) for r in old]


# ------------------------------------------------------------------------------------------------- all together
@dataclass
class Dataset:
    packed: Packed
    examples: int
    skipped: int
    truncated: int
    replayed: int = 0


def build(records: list[dict], tokenizer, context_length: int, *, fim_share: float = 0.0, seed: int = 0
          ) -> Dataset:
    """Render, tokenise and pack a list of example records."""
    toks, skipped, truncated = [], 0, 0
    for ex in records:
        rendered = render(ex, fim_share=fim_share, seed=seed)
        if rendered is None:
            skipped += 1
            continue
        tok, cut = tokenize(tokenizer, *rendered, context_length)
        truncated += cut
        toks.append(tok)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Dataset(pack(toks, context_length, pad_id, seed=seed), len(toks), skipped, truncated)

