"""Example records -> token blocks: render in StarCoder2's native formats, mask, weight, truncate, pack, mix replay.

Pure Python (the tokenizer is passed in; no torch), so every rule here is unit-testable in milliseconds.

Two renderings. StarCoder2 has no commit tokens (StarCoder 1's `<commit_before>` etc. are gone), and adding
tokens would resize the vocabulary, so both use what StarCoder2 saw in pre-training.

Fill-in-the-middle in the real file (the main kind, `1 - edit_share` of the items): what an editor asks of a
completion model. StarCoder2's repository-level FIM layout (`<fim_prefix>` before the path):

    <repo_name>{repo}<file_sep><fim_prefix>{path}
    {the new file's text above the middle}<fim_suffix>{the text below}<fim_middle>
  ->{middle}<|endoftext|>

The file's text comes from the record's `new_context` (the daemon keeps a bounded window of the new blob
around each item; the trainer never reads git): above + the item + below. The middle is whole lines of the
item (indentation kept: it starts at its line's start, not at the node): the lines the commit changed (from a
line diff of before and after), grown to the enclosing syntactic scope (by indentation, which rustfmt makes
reliable) when under FIM_MIN_BYTES, or one changed block / one scope inside the item when over FIM_MAX_BYTES.
An added item is completed inside the file it was added to (the whole item when it fits). The span depends on
(seed, item identity) alone, so training and evaluation (trainer/evaluate.py) ask the same completion. A record
without `new_context` (written before store schema 3) is completed under today's synthetic header (commit
message, what changed, `use` lines) instead of the file's text, so old shards keep training.

The edit example (a configurable minority, `edit_share`):

    <repo_name>{repo}<file_sep>{path}
    // {commit message, each line commented}
    // {change_kind} {kind} {qualified_name}
    {use lines of the new file}
    // before:                         (omitted for added items)
    {before}
    // after:
  ->{after}<|endoftext|>               (target: the only tokens with a loss)

Most of a modified item's target is copied from `before`, so its loss is weighted toward the changed tokens:
each target token copied from the before version (metrics.changed_mask) weighs `copied_weight`, a changed one
1. The benchmark's changed-token loss is defined on this rendering (evaluate.prepare keeps it).

Deleted items are skipped: the target would be an empty string, which teaches nothing but "stop", and the
daemon's shards are the only record of them (they stay there). Skips are counted, never silent.

Sampling weight. A record with `sample_weight` w (the daemon sets ingest.test_weight on test code) trains with
chance w, decided per (seed, item) by `sampled`: `build` leaves the rest out and counts them, `example_tokens`
counts them as 0 tokens (so a round's budget selection counts only what trains) and `mix_replay` sizes and
draws replay among what is kept. Evaluation (trainer/evaluate.py) ignores the weight: the held-out window is
scored on everything.

Cross-file context (store schema 4, the record's `cross_file`: definitions of other files the item references,
most relevant first) goes before the file, in StarCoder2's repository layout, in both renderings:

    <repo_name>{repo}<file_sep>{path_a}
    {skeleton_a}<file_sep>{path_b}
    {skeleton_b}<file_sep><fim_prefix>{path}
    ...

A record without it renders exactly as before; `RenderOptions.cross_file` (a round's `cross_file_context`)
turns it off, so one store trains both ways.

Truncation keeps every FIM marker and cuts at line boundaries. Cross-file blocks keep at most
CROSS_FILE_SHARE of the context when the example is too long (whole blocks, the least relevant dropped first),
so the file around the gap keeps most of it and the definitions it uses are not all lost; then the prefix loses whole lines from its top (the
kept text starts at a line start, indentation kept), the suffix whole lines from its bottom, never
`<fim_suffix>`/`<fim_middle>`. An edit example keeps its header lines and the last lines of its prompt. A
target (an edit's after, a FIM middle) too long for its share of the context ends at the last syntactic scope
boundary that fits (a whole statement, item or scope, by indentation), with the loss on what is kept and no
EOS: the text goes on, so stopping there would be wrong.

Packing. Examples are packed best-fit-decreasing into equal blocks of <= `context_length` tokens; position_ids
restart at 0 for each example, which transformers turns into a block-diagonal causal mask (no attention
across examples) when attention_mask is None. Padding (label -100) only fills what no example fits.
"""
from __future__ import annotations

import bisect
import difflib
import hashlib
import itertools
import json
import random
from dataclasses import dataclass, field

from gitlora.trainer import metrics

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


def item_digest(ex: dict, seed: int, purpose: str = "") -> bytes:
    """A seeded digest of an item's identity: what every per-item random choice derives from (`purpose` keeps
    independent choices independent: the FIM span does not depend on whether training drew a FIM example)."""
    key = f"{seed}:{ex.get('commit')}:{ex.get('path')}:{ex.get('qualified_name')}:{ex.get('change_kind')}"
    key += f":{purpose}" if purpose else ""
    return hashlib.sha256(key.encode()).digest()


def sample_weight(ex: dict) -> float:
    """The chance training takes the record (the daemon's `sample_weight`, ingest.test_weight on test code);
    1 when absent."""
    weight = ex.get("sample_weight")
    return 1.0 if weight is None else float(weight)


def sampled(ex: dict, seed: int) -> bool:
    """Whether training takes the record: its digest's uniform draw is under its sample weight. Per (seed,
    item), so a round, its budget count and a rerun agree, and the edit/FIM draw and span stay independent."""
    weight = sample_weight(ex)
    if weight >= 1.0:
        return True
    return int.from_bytes(item_digest(ex, seed, "sample")[:8], "big") / 2.0 ** 64 < weight


def _example_rng(ex: dict, seed: int) -> random.Random:
    return random.Random(int.from_bytes(item_digest(ex, seed)[:8], "big"))


FIM_MIN_BYTES = 50  # a middle this small grows to its enclosing scope
FIM_MAX_BYTES = 1000  # a larger one is cut to one changed block or one scope inside the item
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<fim_prefix>", "<fim_suffix>", "<fim_middle>"
EDIT, FIM = "edit", "fim"


@dataclass(frozen=True)
class RenderOptions:
    """How training renders its examples: the share of edit examples (the rest fill in the middle of the real
    file) and the loss weight of an edit target's copied tokens. The defaults are the plain change rendering
    (every example an edit, unweighted); a round's come from its settings (`from_settings`)."""

    edit_share: float = 1.0
    copied_weight: float = 1.0
    cross_file: bool = True  # render the record's cross-file context (when it has one)
    context_weight: float = 0.0  # a FIM example's prefix and suffix tokens as targets at this weight (0: not)

    @classmethod
    def from_settings(cls, cfg: dict) -> "RenderOptions":
        """A round's options; the deprecated `fim_share` (set: an older spec or config) means edit_share =
        1 - fim_share, as it did."""
        fim_share = cfg.get("fim_share")
        edit_share = 1.0 - float(fim_share) if fim_share is not None else float(cfg["edit_share"])
        return cls(edit_share=edit_share, copied_weight=float(cfg["copied_token_weight"]),
                   cross_file=bool(cfg.get("cross_file_context", True)),
                   context_weight=float(cfg.get("context_token_weight") or 0.0))


@dataclass(frozen=True)
class FimParts:
    """One fill-in-the-middle task: prefix + middle + suffix is a contiguous text (the file's, or for an old
    record the synthetic header and the item); `head` is the StarCoder2 header before the prefix; `context` the
    cross-file blocks (`<file_sep>path\ntext`, most relevant first) that go into it, before the file's own
    `<file_sep>`."""

    head: str
    prefix: str
    middle: str
    suffix: str
    context: tuple[str, ...] = ()

    def prompt(self) -> str:
        return f"{with_context(self.head, self.context)}{self.prefix}{FIM_SUFFIX}{self.suffix}{FIM_MIDDLE}"


@dataclass(frozen=True)
class Rendering:
    kind: str  # EDIT | FIM
    prompt: str
    target: str
    fim: FimParts | None = None
    before: str = ""  # an edit's before version in the target's shape (for the copied-token weights)
    context: tuple[str, ...] = ()  # an edit's cross-file blocks (in `prompt`; truncation drops them first)


FILE_SEP = "<file_sep>"


def cross_file_blocks(ex: dict, enabled: bool = True) -> tuple[str, ...]:
    """The record's cross-file context as StarCoder2 file blocks, `<file_sep>{path}\n{skeleton}`, most relevant
    first; none for a record without it (written before store schema 4) or when `enabled` is off."""
    blocks = ex.get("cross_file") if enabled else None
    if not isinstance(blocks, list):
        return ()
    out = []
    for block in blocks:
        if isinstance(block, dict) and block.get("path") and block.get("text"):
            text = str(block["text"])
            out.append(f"{FILE_SEP}{block['path']}\n{text if text.endswith(chr(10)) else text + chr(10)}")
    return tuple(out)


def with_context(head: str, context: tuple[str, ...] | list[str]) -> str:
    """`head` (`<repo_name>{repo}<file_sep>...`) with the cross-file blocks before its file's `<file_sep>`."""
    if not context:
        return head
    cut = head.find(FILE_SEP)
    cut = len(head) if cut == -1 else cut
    return head[:cut] + "".join(context) + head[cut:]


def fim_head(ex: dict) -> str:
    """StarCoder2's repository-level header of the file being completed: `<fim_prefix>` before the path."""
    return f"<repo_name>{ex.get('repo', '')}<file_sep>{FIM_PREFIX}{ex.get('path', '')}\n"


def renderable(ex: dict) -> bool:
    """Whether the record has anything to learn (not deleted, a non-empty new version)."""
    return ex.get("change_kind") != "deleted" and bool((ex.get("after") or "").strip())


def render_edit(ex: dict, cross_file: bool = True) -> tuple[str, str] | None:
    """(prompt, target) of the edit example ("message + before -> after"), or None when there is nothing to
    learn."""
    if not renderable(ex):
        return None
    after, before = ex.get("after") or "", ex.get("before") or ""
    prompt = with_context(header(ex), cross_file_blocks(ex, cross_file)) + context_lines(ex)
    if before.strip():
        prompt += "// before:\n" + before.rstrip("\n") + "\n// after:\n"
    return prompt, after.rstrip("\n") + "\n" + EOS


def rendering(ex: dict, options: RenderOptions = RenderOptions(), seed: int = 0) -> Rendering | None:
    """How training sees one record, or None when it has nothing to learn. Deterministic: edit or FIM, and the
    FIM span, depend only on (seed, item identity)."""
    if not renderable(ex):
        return None
    if options.edit_share < 1.0 and _example_rng(ex, seed).random() >= options.edit_share:
        parts = fim_parts(ex, seed, options.cross_file)
        if parts is not None:
            return Rendering(FIM, parts.prompt(), parts.middle + EOS, parts)
    prompt, target = render_edit(ex, options.cross_file)
    return Rendering(EDIT, prompt, target, before=before_text(ex),
                     context=cross_file_blocks(ex, options.cross_file))


def render(ex: dict, fim_share: float | None = None, seed: int = 0, *, edit_share: float = 1.0
           ) -> tuple[str, str] | None:
    """(prompt, target) as training renders the record, or None. `fim_share` is the deprecated spelling of
    1 - edit_share."""
    if fim_share is not None:
        edit_share = 1.0 - fim_share
    r = rendering(ex, RenderOptions(edit_share=edit_share), seed)
    return None if r is None else (r.prompt, r.target)


def render_fim(ex: dict, seed: int = 0, cross_file: bool = True) -> tuple[str, str] | None:
    """(prompt, middle) of the completion task for one record: the FIM rendering training uses, without EOS, its
    span chosen by (seed, item identity) alone; None when there is nothing to learn."""
    parts = fim_parts(ex, seed, cross_file)
    return None if parts is None else (parts.prompt(), parts.middle)


def fim_parts(ex: dict, seed: int = 0, cross_file: bool = True) -> FimParts | None:
    """The record's fill-in-the-middle task (see the module docstring), or None when there is nothing to learn
    (then training renders the edit)."""
    if not renderable(ex):
        return None
    after = ex.get("after") or ""
    context = ex.get("new_context")
    if isinstance(context, dict):
        above, below = context.get("above") or "", context.get("below") or ""
    else:  # a record from before the file's text was kept: the item under the synthetic header
        above, below = context_lines(ex), ""
    # The item's first line starts at its line start: what precedes it there (its indentation) joins it.
    cut = above.rfind("\n") + 1
    above, lead = above[:cut], above[cut:]
    # Its last line ends at the line's end: the rest of that line in `below` joins it too.
    newline = below.find("\n")
    tail, below = (below[:newline + 1], below[newline + 1:]) if newline != -1 else (below, "")
    lines = (lead + after + tail).splitlines(keepends=True)
    rng = random.Random(int.from_bytes(item_digest(ex, seed, "span")[:8], "big"))
    lo, hi = choose_middle(lines, _changed_lines(ex.get("before") or "", after), rng)
    middle = "".join(lines[lo:hi])
    if not middle.strip():
        return None
    return FimParts(fim_head(ex), above + "".join(lines[:lo]), middle, "".join(lines[hi:]) + below,
                    cross_file_blocks(ex, cross_file))


def _changed_lines(before: str, after: str) -> list[int]:
    """Indices of the lines of `after` a line diff from `before` marks as changed (an insertion's or
    replacement's lines; for a pure deletion, the line after the gap); every line for an added item."""
    new = after.splitlines(keepends=True)
    if not before.strip():
        return list(range(len(new)))
    changed: set[int] = set()
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, before.splitlines(keepends=True), new).get_opcodes():
        if tag != "equal":
            changed.update(range(j1, j2) if j2 > j1 else [min(j1, len(new) - 1)])
    return sorted(c for c in changed if c >= 0)


def _size(lines: list[str], lo: int, hi: int) -> int:
    return sum(len(line.encode("utf-8")) for line in lines[lo:hi])


def _indent(line: str) -> int | None:
    """Leading whitespace width; None for a blank line (it belongs to no scope)."""
    stripped = line.lstrip(" \t")
    return None if not stripped.strip() else len(line) - len(stripped)


def _scope_end(lines: list[str], i: int) -> int:
    """One past the last line of the scope opened at line i: the lines indented deeper, and the closing line at
    i's indentation when it starts with a closing bracket."""
    base = _indent(lines[i])
    j = i + 1
    while j < len(lines) and (_indent(lines[j]) is None or _indent(lines[j]) > base):
        j += 1
    if j < len(lines) and _indent(lines[j]) == base and lines[j].lstrip()[:1] in ("}", ")", "]"):
        j += 1
    return j


def _grow(lines: list[str], lo: int, hi: int) -> tuple[int, int]:
    """The scope enclosing lines lo..hi: from the nearest line above with less indentation through its closing
    line; the whole item when none is above."""
    depths = [d for d in map(_indent, lines[lo:hi]) if d is not None]
    depth = min(depths) if depths else 0
    opener = next((i for i in range(lo - 1, -1, -1) if (d := _indent(lines[i])) is not None and d < depth), None)
    if opener is None:
        return (0, len(lines)) if (lo, hi) != (0, len(lines)) else (lo, hi)
    return opener, max(hi, _scope_end(lines, opener))


def choose_middle(lines: list[str], changed: list[int], rng: random.Random) -> tuple[int, int]:
    """The middle's line range [lo, hi) in the item's `lines`: the changed lines' hull, grown to its enclosing
    scope while under FIM_MIN_BYTES (never past FIM_MAX_BYTES), or, over FIM_MAX_BYTES, one changed block, or
    one scope of FIM_MIN_BYTES..FIM_MAX_BYTES inside it, or a line-aligned window of at most FIM_MAX_BYTES."""
    n = len(lines)
    if n == 0:
        return 0, 0
    changed = [c for c in changed if 0 <= c < n] or list(range(n))
    lo, hi = changed[0], changed[-1] + 1
    if _size(lines, lo, hi) > FIM_MAX_BYTES:
        blocks: list[list[int]] = []
        for c in changed:
            if blocks and c == blocks[-1][1]:
                blocks[-1][1] = c + 1
            else:
                blocks.append([c, c + 1])
        lo, hi = blocks[rng.randrange(len(blocks))] if len(blocks) > 1 else blocks[0]
    if _size(lines, lo, hi) > FIM_MAX_BYTES:
        scopes = [(i, e) for i in range(lo, hi) if _indent(lines[i]) is not None
                  and (e := min(_scope_end(lines, i), hi)) - i > 1
                  and FIM_MIN_BYTES <= _size(lines, i, e) <= FIM_MAX_BYTES]
        if scopes:
            return scopes[rng.randrange(len(scopes))]
        start = rng.randrange(lo, hi)
        end = start + 1
        while end < hi and _size(lines, start, end + 1) <= FIM_MAX_BYTES:
            end += 1
        return start, end
    while _size(lines, lo, hi) < FIM_MIN_BYTES:
        grown = _grow(lines, lo, hi)
        if grown == (lo, hi) or _size(lines, *grown) > FIM_MAX_BYTES:
            break
        lo, hi = grown
    return lo, hi


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
    weights: list[float] | None = None  # per position: the loss weight of its target token; None = 1 on targets


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


WINDOW_CHARS_PER_TOKEN = 4  # a first window's characters per token: more than code's tokens usually hold
# The estimate of a cut from a window's token offsets is off by the token that straddles the line start at
# most: a cut whose estimate is over the budget by more is not tried.
ESTIMATE_SLACK = 2


def _ids_within(tokenizer, text: str, limit: int) -> list[int] | None:
    """The text's tokens when they number at most `limit`, else None. A long text is judged by its last lines
    first: when a window of them already holds more than `limit` tokens, so does the whole (token counts grow
    with the text), and the whole is never tokenised."""
    window = limit * WINDOW_CHARS_PER_TOKEN
    while len(text) > window:
        start = text.find("\n", len(text) - window)
        if start == -1:
            break
        if len(_ids(tokenizer, text[start + 1:])) > limit:
            return None
        window *= 2
    ids = _ids(tokenizer, text)
    return ids if len(ids) <= limit else None


def _lines(text: str) -> list[str]:
    """`text` as lines, each with its newline (only a newline ends one: a cut lands where an editor's line
    ends)."""
    lines = [line + "\n" for line in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def scope_boundaries(lines: list[str]) -> list[int]:
    """The line counts k (ascending) at which lines[:k] ends a whole syntactic unit: an item, a statement, or a
    scope through its closing line, at any depth inside `{` blocks (indentation, which rustfmt makes reliable,
    delimits them; see `_scope_end`). Not inside `(`/`[`: an argument list's lines are not statements. Trailing
    blank lines are not part of the unit before them."""
    found: set[int] = set()
    regions = [(0, len(lines))]
    while regions:
        lo, hi = regions.pop()
        i = lo
        while i < hi:
            if _indent(lines[i]) is None:
                i += 1
                continue
            end = min(_scope_end(lines, i), hi)
            k = end
            while k > i + 1 and _indent(lines[k - 1]) is None:
                k -= 1
            found.add(k)
            if end - i > 1 and lines[i].rstrip().endswith("{"):
                regions.append((i + 1, end))
            i = end
    return sorted(found)


def _most_that_fits(tokenizer, text_of, count: int, budget: int) -> tuple[int, list[int]]:
    """The largest n in 1..count whose `text_of(n)` tokenises within `budget` tokens, and those tokens; (0, [])
    when none does. Texts grow with n, and so do their token counts: a bisection needs a few tokenisations."""
    lo, hi, best = 1, count, (0, [])
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = _ids(tokenizer, text_of(mid))
        if len(ids) <= budget:
            best, lo = (mid, ids), mid + 1
        else:
            hi = mid - 1
    return best


def _token_starts(tokenizer, text: str) -> tuple[list[int], list[int]] | None:
    """(ids, each token's start offset in `text`), or None from a tokenizer without offsets (a slow one)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        return None
    return enc["input_ids"], [start for start, _ in enc["offset_mapping"]]


def fit_lines(tokenizer, lines: list[str], budget: int, from_end: bool = False,
              cuts: list[int] | None = None) -> tuple[int, list[int]]:
    """The most of `lines` that tokenise within `budget`: (n, tokens) for the first n lines (or, `from_end`, the
    last n), n one of `cuts` (ascending line counts; default every count); (0, []) when none fits.

    Reads only a window of the text a little larger than what fits, never the whole of a long file (a round
    fits the text around thousands of items into its context; a bisection over the whole text tokenised each
    several times): the window's token offsets estimate where the cut lies, and exact tokenisations of the
    kept text (and of one more line, when the estimate says it might fit) settle it."""
    cuts = list(cuts) if cuts is not None else list(range(1, len(lines) + 1))
    if not cuts or budget <= 0:
        return 0, []

    def text_of(n: int) -> str:
        return "".join(lines[len(lines) - n:] if from_end else lines[:n])

    window = budget * WINDOW_CHARS_PER_TOKEN
    while True:
        chars, span = 0, 0  # `span`: the lines the window holds, whole
        for line in (reversed(lines) if from_end else lines):
            if chars >= window:
                break
            chars, span = chars + len(line), span + 1
        text = text_of(span)
        found = _token_starts(tokenizer, text)
        if found is None:
            return _most_that_fits(tokenizer, lambda i: text_of(cuts[i - 1]), len(cuts), budget)
        ids, starts = found
        if len(ids) <= budget and span == len(lines):
            return (cuts[-1], ids) if cuts[-1] == len(lines) else _confirm(tokenizer, text_of, cuts, len(cuts) - 1,
                                                                           budget)
        if len(ids) > budget:
            break
        window *= 2  # the window fits whole: the cut lies further out
    # where each line of the window starts, and so the tokens n lines hold (within a token at the cut)
    line_start = [0, *itertools.accumulate(map(len, lines[len(lines) - span:] if from_end else lines[:span]))]

    def estimate(n: int) -> int:
        if from_end:
            return len(ids) - bisect.bisect_left(starts, line_start[span - n])
        return bisect.bisect_left(starts, line_start[n])

    best = -1
    for i, n in enumerate(cuts):
        if n > span:
            break
        if estimate(n) <= budget:
            best = i
        else:
            break
    return _confirm(tokenizer, text_of, cuts, best, budget,
                    lambda n: estimate(n) if n <= span else budget + ESTIMATE_SLACK + 1)


def _confirm(tokenizer, text_of, cuts: list[int], guess: int, budget: int, estimate=None) -> tuple[int, list[int]]:
    """The exact answer near an estimated cut (`cuts[guess]`, -1 for none): fewer lines while the guess is over
    the budget, more while the next still fits (not tried when its `estimate` is over by more than the slack)."""
    i, ids = guess, (_ids(tokenizer, text_of(cuts[guess])) if guess >= 0 else [])
    while i >= 0 and len(ids) > budget:
        i -= 1
        ids = _ids(tokenizer, text_of(cuts[i])) if i >= 0 else []
    while i + 1 < len(cuts):
        if estimate is not None and estimate(cuts[i + 1]) > budget + ESTIMATE_SLACK:
            break
        more = _ids(tokenizer, text_of(cuts[i + 1]))
        if len(more) > budget:
            break
        i, ids = i + 1, more
    return (cuts[i], ids) if i >= 0 else (0, [])


def head_lines(tokenizer, text: str, budget: int) -> list[int]:
    """The tokens of `text`'s first whole lines that fit in `budget` (a suffix cut ends at a line end)."""
    return fit_lines(tokenizer, _lines(text), budget)[1]


def tail_lines(tokenizer, text: str, budget: int) -> list[int]:
    """The tokens of `text`'s last whole lines that fit in `budget` (a prefix cut drops the partial first line,
    so the kept text starts at a line start, its indentation kept)."""
    return fit_lines(tokenizer, _lines(text), budget, from_end=True)[1]


def cut_target(tokenizer, target: str, budget: int) -> list[int]:
    """The tokens of a target (its text + EOS) within `budget`: whole when it fits; else the lines up to its last
    syntactic scope boundary that fits (`scope_boundaries`), without EOS, which would teach the model to stop
    where the text goes on; else its first whole lines; else (one line longer than the budget) its first tokens."""
    ids = _ids(tokenizer, target)
    if len(ids) <= budget:
        return ids
    body = target[:-len(EOS)] if target.endswith(EOS) else target
    lines = _lines(body)
    for cuts in (scope_boundaries(lines), range(1, len(lines) + 1)):
        cuts = list(cuts)
        n, kept = fit_lines(tokenizer, lines, budget, cuts=cuts)
        if n:
            return kept
    return ids[:max(1, budget)]


def tokenize(tokenizer, prompt: str, target: str, context_length: int,
             ids: tuple[list[int], list[int]] | None = None) -> tuple[Tokenized, bool]:
    """Prompt and target tokenised separately (so the mask boundary is exact); over-long examples are cut at line
    boundaries.

    Truncation keeps the whole target when it fits in 3/4 of the context (else cuts it at a syntactic boundary,
    `cut_target`), then the prompt's first whole lines within 32 tokens (the repo/path header line always whole)
    and as many of its last whole lines (the `before` text nearest the target) as fit. Returns (tokenized,
    truncated?). `ids`: the prompt's and the target's tokens when the caller has them.
    """
    p, t = ids if ids is not None else (_ids(tokenizer, prompt), _ids(tokenizer, target))
    truncated = len(p) + len(t) > context_length
    if truncated:
        if len(t) > context_length * 3 // 4:
            t = cut_target(tokenizer, target, max(1, context_length * 3 // 4))
        budget = context_length - len(t)
        if len(p) > budget:
            lines = _lines(prompt)
            first = len(_ids(tokenizer, lines[0]))  # the header line whole, even when a long path makes it long
            n, head = fit_lines(tokenizer, lines, min(max(32, first), budget // 2))
            p = head + tail_lines(tokenizer, "".join(lines[n:]), budget - len(head))
    return Tokenized(p + t, [IGNORE] * len(p) + list(t)), truncated


CROSS_FILE_SHARE = 0.25  # of the context, what cross-file blocks may keep when an example is too long


def blocks_within(sizes: list[int], room: int, context_length: int) -> int:
    """How many of the cross-file blocks (token counts, most relevant first) an example keeps: all that fit in
    `room` (the context less everything else); when that is less than CROSS_FILE_SHARE of the context, as many
    as fit in that share (the file's own prefix and suffix are then cut for them)."""
    allowance, used = max(room, int(CROSS_FILE_SHARE * context_length)), 0
    for keep, size in enumerate(sizes):
        if used + size > allowance:
            return keep
        used += size
    return len(sizes)


def tokenize_edit(tokenizer, prompt: str, target: str, context: tuple[str, ...], context_length: int
                  ) -> tuple[Tokenized, bool]:
    """An edit example whose prompt holds the cross-file blocks `context` (between the repository name and the
    file's own header): when it is too long the blocks keep at most CROSS_FILE_SHARE of the context (the least
    relevant dropped first, whole), and `tokenize` cuts the file's part in the rest. Returns (tokenized,
    truncated?)."""
    joined = "".join(context)
    at = prompt.find(joined) if context else -1
    if at == -1:
        return tokenize(tokenizer, prompt, target, context_length)
    repo_head, file_prompt = _ids(tokenizer, prompt[:at]), prompt[at + len(joined):]
    blocks = [_ids(tokenizer, block) for block in context]
    file_ids = (_ids(tokenizer, file_prompt), _ids(tokenizer, target))
    rest = len(repo_head) + len(file_ids[0]) + len(file_ids[1])
    keep = blocks_within([len(b) for b in blocks], context_length - rest, context_length)
    head = repo_head + [token for block in blocks[:keep] for token in block]
    tok, cut = tokenize(tokenizer, file_prompt, target, context_length - len(head), ids=file_ids)
    return Tokenized(head + tok.input_ids, [IGNORE] * len(head) + tok.labels), cut or keep < len(blocks)


def tokenize_fim(tokenizer, parts: FimParts, context_length: int, with_target: bool = True,
                 context_weight: float = 0.0) -> tuple[Tokenized, bool]:
    """A FIM task tokenised piece by piece, so truncation never loses a marker: when it is too long the
    cross-file blocks keep at most `CROSS_FILE_SHARE` of the context (whole blocks, the least relevant dropped
    first), the middle at most half of the rest (cut at a syntactic boundary, `cut_target`), the suffix its
    first whole lines within max(1/4 of what is left, what the prefix does not need) and the prefix its last
    whole lines within the rest. Without target: the prompt alone (an evaluation task). `context_weight` > 0:
    the prefix and suffix tokens kept are targets too, at that loss weight (the middle weighs 1; headers,
    markers and cross-file blocks are never targets). Returns (tokenized, truncated?)."""
    cut = parts.head.find(FILE_SEP)
    cut = len(parts.head) if cut == -1 or not parts.context else cut
    repo_head, file_head = _ids(tokenizer, parts.head[:cut]), _ids(tokenizer, parts.head[cut:])
    blocks = [_ids(tokenizer, block) for block in parts.context]
    # A prefix or suffix longer than the whole context counts as context_length + 1 tokens: every decision below
    # comes out as with its full count (both cut), and a long file is never tokenised whole.
    pre, suf = _ids_within(tokenizer, parts.prefix, context_length), _ids_within(tokenizer, parts.suffix,
                                                                                 context_length)
    n_pre, n_suf = (context_length + 1 if ids is None else len(ids) for ids in (pre, suf))
    s_mark, m_mark = _ids(tokenizer, FIM_SUFFIX), _ids(tokenizer, FIM_MIDDLE)
    t = _ids(tokenizer, parts.middle + EOS) if with_target else []
    fixed = len(repo_head) + len(file_head) + len(s_mark) + len(m_mark)
    rest = fixed + n_pre + n_suf + len(t)
    truncated = rest + sum(map(len, blocks)) > context_length
    blocks = blocks[:blocks_within(list(map(len, blocks)), context_length - rest, context_length)]
    head = repo_head + [token for block in blocks for token in block] + file_head
    fixed += len(head) - len(repo_head) - len(file_head)
    if fixed + n_pre + n_suf + len(t) > context_length:
        if len(t) > (context_length - fixed) // 2:
            t = cut_target(tokenizer, parts.middle + EOS, max(1, (context_length - fixed) // 2))
        room = max(0, context_length - fixed - len(t))
        keep_suf = min(n_suf, max(room // 4, room - n_pre))
        if keep_suf < n_suf:
            suf = head_lines(tokenizer, parts.suffix, keep_suf)
        if n_pre > room - len(suf):
            pre = tail_lines(tokenizer, parts.prefix, room - len(suf))
    prompt = head + pre + s_mark + suf + m_mark
    if not context_weight:
        return Tokenized(prompt + t, [IGNORE] * len(prompt) + list(t)), truncated
    labels = [IGNORE] * len(head) + pre + [IGNORE] * len(s_mark) + suf + [IGNORE] * len(m_mark) + list(t)
    weights = ([0.0] * len(head) + [context_weight] * len(pre) + [0.0] * len(s_mark) + [context_weight] * len(suf)
               + [0.0] * len(m_mark) + [1.0] * len(t))
    return Tokenized(prompt + t, labels, weights), truncated


def tokenize_rendering(tokenizer, r: Rendering, context_length: int, copied_weight: float = 1.0,
                       context_weight: float = 0.0) -> tuple[Tokenized, bool]:
    """One training example's tokens. An edit's target tokens copied from its before version weigh
    `copied_weight` (changed ones 1); a FIM middle weighs 1 and its prefix and suffix `context_weight`."""
    if r.kind == FIM and r.fim is not None:
        return tokenize_fim(tokenizer, r.fim, context_length, context_weight=context_weight)
    tok, cut = tokenize_edit(tokenizer, r.prompt, r.target, r.context, context_length)
    if copied_weight != 1.0 and r.before:
        target = [t for t in tok.labels if t != IGNORE]
        mask = metrics.changed_mask(target, _ids(tokenizer, r.before))
        tok.weights = [0.0] * (len(tok.labels) - len(target)) + [1.0 if c else copied_weight for c in mask]
    return tok, cut


def example_tokens(record: dict, tokenizer, context_length: int, options: RenderOptions, seed: int) -> int:
    """Tokens the training loop reads for one record, rendered and cut exactly as `build` does (0 if skipped or
    left out by its sample weight, so a round's budget counts only what trains)."""
    return Tokenizations(tokenizer, context_length, options, seed).tokens(record)


class Tokenizations:
    """Each record's training example (rendering, tokens, truncated?) made once: a round's budget selection
    counts the tokens of the records it reaches and `build` then packs the same examples, so neither renders
    nor tokenises a record twice. Held for one round; keyed by the record object (kept alive with its entry,
    so a key is never reused)."""

    def __init__(self, tokenizer, context_length: int, options: RenderOptions, seed: int):
        self.tokenizer, self.context_length, self.options, self.seed = tokenizer, context_length, options, seed
        self._made: dict[int, tuple[dict, tuple[str, Tokenized, bool] | None]] = {}

    def example(self, record: dict) -> tuple[str, Tokenized, bool] | None:
        """(kind, tokens, truncated?) of the record as training sees it, or None when it has nothing to learn.
        Sample weights are the caller's (`sampled`)."""
        made = self._made.get(id(record))
        if made is None or made[0] is not record:
            r = rendering(record, self.options, self.seed)
            out = None
            if r is not None:
                tok, cut = tokenize_rendering(self.tokenizer, r, self.context_length, self.options.copied_weight,
                                              self.options.context_weight)
                out = (r.kind, tok, cut)
            made = self._made[id(record)] = (record, out)
        return made[1]

    def tokens(self, record: dict) -> int:
        """Tokens the loop reads for the record (0 if left out by its sample weight or skipped)."""
        if not sampled(record, self.seed):
            return 0
        made = self.example(record)
        return 0 if made is None else len(made[1].input_ids)


def _utf8(*texts: str) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def read_bytes(ex: dict, options: RenderOptions, max_bytes: float = 0) -> float:
    """The UTF-8 bytes of text training is expected to read for one record, without tokenising or choosing a FIM
    span (prefix + middle + suffix is the same text whatever the span): its edit rendering's and its FIM
    rendering's bytes mixed by edit_share, each at most `max_bytes` (0: no limit; truncation keeps a context),
    times its sample weight; 0 when it has nothing to learn. What a round's estimate counts, rather than shard
    bytes, which hold fields no rendering reads (an edit does not read the file's text around the item)."""
    if not renderable(ex):
        return 0.0
    prompt, target = render_edit(ex)
    edit = _utf8(prompt, target)
    context = ex.get("new_context")
    around = ((context.get("above") or "", context.get("below") or "") if isinstance(context, dict)
              else (context_lines(ex), ""))
    fim = _utf8(fim_head(ex), *around, ex.get("after") or "", FIM_SUFFIX, FIM_MIDDLE, EOS)
    if max_bytes:
        edit, fim = min(edit, max_bytes), min(fim, max_bytes)
    return sample_weight(ex) * (options.edit_share * edit + (1.0 - options.edit_share) * fim)


# ------------------------------------------------------------------------------------------------- packing
@dataclass
class Packed:
    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    position_ids: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)  # per position: its target's loss weight, 0 elsewhere
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
        ids, labels, pos_ids, weights = [], [], [], []
        for k in members:
            ex = examples[k]
            ids += ex.input_ids
            labels += ex.labels
            pos_ids += range(len(ex.input_ids))
            weights += ex.weights if ex.weights is not None else [0.0 if x == IGNORE else 1.0 for x in ex.labels]
            out.target_tokens += sum(1 for x in ex.labels if x != IGNORE)
        out.real_tokens += len(ids)
        out.members.append(list(members))
        pad = block - len(ids)
        out.input_ids.append(ids + [pad_id] * pad)
        out.labels.append(labels + [IGNORE] * pad)
        out.position_ids.append(pos_ids + list(range(pad)))
        out.weights.append(weights + [0.0] * pad)
    return out


# ------------------------------------------------------------------------------------------------- replay mix
def mix_replay(new: list[dict], old: list[dict], replay_share: float, seed: int,
               newest_first: list[str] | None = None, halflife_commits: float = 0.0) -> tuple[list[dict], int]:
    """New examples plus a deterministic sample of older ones so that old ones make `replay_share` of the mix
    (by example count). With `halflife_commits` > 0 and the replay pool's commits in `newest_first` order, an
    example's chance of being drawn halves every `halflife_commits` commits back (recency weighting); else every
    old example is equally likely. Returns (mixed list in a seeded shuffle, number of replayed examples).

    Shares count what trains: replay is sized by the new examples their sample weight keeps (`sampled` with
    this `seed`, the one `build` uses) and drawn among the old ones it keeps. The new ones it leaves out stay in
    the mix for `build` to count."""
    kept_new = sum(1 for r in new if sampled(r, seed))
    old = [r for r in old if sampled(r, seed)]
    if not old or replay_share <= 0 or not kept_new:
        mixed = list(new)
        random.Random(seed).shuffle(mixed)
        return mixed, 0
    # At least one old example whenever there is old data: a one-commit round would otherwise round to zero
    # and train on nothing but the newest change, the case replay exists for.
    want = max(1, round(kept_new * replay_share / max(1e-9, 1.0 - replay_share)))
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
    fim: int = 0  # examples rendered as fill-in-the-middle (the rest: edits)
    left_out_by_weight: int = 0  # records their sample weight left out (`sampled`)
    example_commits: list = field(default_factory=list)  # per tokenised example (packed.members' indices)


def build(records: list[dict], tokenizer, context_length: int, *, options: RenderOptions | None = None,
          seed: int = 0, fim_share: float | None = None, made: Tokenizations | None = None) -> Dataset:
    """Render, tokenise, weight and pack a list of example records, less those their sample weight leaves out
    (`fim_share`: the deprecated spelling of options' 1 - edit_share). `made`: the examples already made for
    some of the records (a round's budget selection), with the same tokenizer, length, options and seed."""
    if options is None:
        options = RenderOptions(edit_share=1.0 - fim_share) if fim_share is not None else RenderOptions()
    if made is None:
        made = Tokenizations(tokenizer, context_length, options, seed)
    elif (made.tokenizer, made.context_length, made.options, made.seed) != (tokenizer, context_length, options,
                                                                            seed):
        raise ValueError("build: the examples made beforehand used other settings")
    toks, commits, skipped, truncated, fim, left_out = [], [], 0, 0, 0, 0
    for ex in records:
        if not sampled(ex, seed):
            left_out += 1
            continue
        example = made.example(ex)
        if example is None:
            skipped += 1
            continue
        kind, tok, cut = example
        truncated += cut
        fim += kind == FIM
        toks.append(tok)
        commits.append(ex.get("commit"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Dataset(pack(toks, context_length, pad_id, seed=seed), len(toks), skipped, truncated, fim=fim,
                   left_out_by_weight=left_out, example_commits=commits)
