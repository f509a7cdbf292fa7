"""What is not worth training on, decided per file, item and commit message (pure; DESIGN.md, *Hygiene and
deduplication*).

- Generated files (a marker such as `@generated` or "do not edit" in their first lines) and data-only files
  (mostly literals: lookup tables, test vectors) are skipped with their reason, like an excluded path: a model
  that learns them learns to emit tables, and nobody edits them by hand. Vendored crates are found by git
  (`gitrepo.py`: a directory with both `Cargo.toml` and `.cargo-checksum.json`).
- Items shorter than `min_item_bytes` (`use`-sized constants, one-line type aliases) teach little per example
  and are skipped, counted in their commit's record.
- Test code is kept, flagged (`test`) and given a sampling weight (`sample_weight`): a repository's tests are a
  large share of its items but not what an editor completes most.
- A commit message that says nothing about the change (a bot's, a template's such as "Merge branch 'x'", an
  empty one) is left out of the prompts of its examples; the examples keep everything else. The store leaves
  out a message repeated more than `repeated_message_limit` times (it counts them, in commit order).
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from .config import IngestConfig
from .rust_items import FileItems, qualified_name

# Literals as a Rust lexer sees them, roughly: strings (raw ones too), byte strings, chars, numbers. Enough to
# tell a table of literals from code; a lexer-exact count would need the syntax tree, which costs far more.
# Written for the regex engine's speed, with the same matches as the plain
# `b?r(#*)".*?"\1 | b?"(?:\\.|[^"\\])*" | b?'(?:\\.|[^'\\])' | \b\d[\w.]*`: it starts with a character set,
# so the engine skips to a literal's possible first byte in C, then branches on that byte (a lookbehind); and
# the string bodies are unrolled loops (a run of plain bytes at a time, not one alternation per byte).
_LITERALS = re.compile(rb"""[br"'0-9](?:
      (?<=b)(?: r(\#*)"[^"]*(?:"(?!\1)[^"]*)*"\1 | "[^"\\]*(?:\\.[^"\\]*)*" | '(?:\\.|[^'\\])' )
    | (?<=r)(\#*)"[^"]*(?:"(?!\2)[^"]*)*"\2
    | (?<=")[^"\\]*(?:\\.[^"\\]*)*"
    | (?<=')(?:\\.|[^'\\])'
    | (?<=[0-9])(?<!\w[0-9])[\w.]*
)""", re.DOTALL | re.VERBOSE)
_WHITESPACE = b" \t\n\r\x0b\x0c"
_DOC_LINE = re.compile(r"^\s*//[^\n]*\n?", re.MULTILINE)
_TEST_ATTRIBUTE = re.compile(r"#\[\s*(?:\w+\s*::\s*)*test\s*[\](]")
_CFG_TEST = re.compile(r"#\[\s*cfg\s*\(\s*(?:all\s*\(\s*)?test\b")


def generated_reason(data: bytes, config: IngestConfig) -> str | None:
    """`generated: …` when a file is generated (a marker in its first lines) or data-only; None for code."""
    head = b"\n".join(data.split(b"\n", config.generated_header_lines)[:config.generated_header_lines])
    head_text = head.decode("utf-8", "replace").lower()
    for marker in config.generated_markers:
        if marker.lower() in head_text:
            return f"generated: marker {marker!r} in the first {config.generated_header_lines} lines"
    if len(data) >= config.data_only_min_bytes:
        share = literal_share(data)
        if share > config.data_only_share:
            return f"data-only: {share:.0%} of its non-blank bytes are literals"
    return None


def literal_share(data: bytes) -> float:
    """The share of a file's non-whitespace bytes that are literals. The literals' share is what cutting them
    out removes: one C-level `sub`, not a Python step per literal (a table has hundreds of thousands)."""
    solid = len(data.translate(None, _WHITESPACE))
    if not solid:
        return 0.0
    rest = len(_LITERALS.sub(b"", data).translate(None, _WHITESPACE))
    return (solid - rest) / solid


def _leading_part(text: str) -> str:
    """An item's attributes and signature: its text up to the first `{` or `;`, doc and line comments left out
    (a doc comment may hold braces or the word test).

    Comment lines are cut from the text's first lines only, up to the first line that holds a `{` or `;` after
    the cut: a large `mod tests { .. }` is read a few lines deep, not whole (the cut is per line, so the lines
    read give the same leading part as the whole text would)."""
    read_to = 0
    while True:
        marks = [i for i in (text.find("{", read_to), text.find(";", read_to)) if i >= 0]
        line_end = text.find("\n", min(marks)) if marks else -1
        code = _DOC_LINE.sub("", text if line_end < 0 else text[:line_end + 1])
        ends = [i for i in (code.find("{"), code.find(";")) if i >= 0]
        if ends or line_end < 0:
            return code[:min(ends)] if ends else code
        read_to = line_end + 1


def is_test_item_text(text: str) -> bool:
    """Whether an item's own attributes make it test code: `#[test]`-like or `#[cfg(test)]`."""
    head = _leading_part(text)
    return bool(_TEST_ATTRIBUTE.search(head) or _CFG_TEST.search(head))


def is_test_path(path: str) -> bool:
    """A file of an integration-test directory (`tests/…`, `crate/tests/…`) or a `tests.rs` module file."""
    parts = path.split("/")
    return "tests" in parts[:-1] or parts[-1] == "tests.rs"


def test_module_prefixes(path: str, items: FileItems | None) -> tuple[str, ...]:
    """Qualified names of the file's `#[cfg(test)]` modules: every item below one is test code."""
    if items is None:
        return ()
    return tuple(qualified_name(path, item.name) for item in items.items.values()
                 if item.kind == "mod" and is_test_item_text(item.text))


def is_test_example(example: dict[str, Any], prefixes: Iterable[str]) -> bool:
    name = example.get("qualified_name") or ""
    if is_test_path(example.get("path") or ""):
        return True
    if any(name == p or name.startswith(p + "::") for p in prefixes):
        return True
    return is_test_item_text(example.get("after") or example.get("before") or "")


@lru_cache(maxsize=16)
def _templates(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p, re.IGNORECASE) for p in patterns)


def message_omission(message: str, author: str, config: IngestConfig) -> str | None:
    """Why a commit's message is left out of its examples' prompts (`empty`, `bot-author`, `template`), or
    None to keep it. Conservative: a template must match the whole stripped message, so a merge message with a
    body of its own is kept."""
    stripped = message.strip()
    if not stripped:
        return "empty"
    lowered = author.lower()
    if any(bot.lower() in lowered for bot in config.bot_authors):
        return "bot-author"
    if any(t.fullmatch(stripped) for t in _templates(tuple(config.template_messages))):
        return "template"
    return None


def message_key(message: str) -> bytes | None:
    """What makes two messages the same for the repetition count (case and spacing aside); None when empty."""
    normal = " ".join(message.split()).lower()
    return hashlib.blake2b(normal.encode(), digest_size=16).digest() if normal else None


def item_bytes(example: dict[str, Any]) -> int:
    """An item's size: its text after the change (before it, for a deleted item)."""
    return len((example.get("after") or example.get("before") or "").encode("utf-8", "surrogatepass"))


def screen_file(examples: list[dict[str, Any]], new_path: str | None, new: FileItems | None, old_path: str | None,
                old: FileItems | None, config: IngestConfig,
                message_omitted: str | None) -> tuple[list[dict[str, Any]], Counter[str]]:
    """One file's examples less the items too small to teach (and the count of each reason left out), with test
    examples flagged and weighted, and the reason the message was left out, when it was, recorded on each. The
    paths are those of each side (a renamed file's deleted items carry its old path)."""
    prefixes = test_module_prefixes(new_path or "", new) + test_module_prefixes(old_path or "", old)
    kept = []
    skips: Counter[str] = Counter()
    for example in examples:
        if item_bytes(example) < config.min_item_bytes:
            skips["too-small"] += 1
            continue
        if is_test_example(example, prefixes):
            example["test"] = True
            example["sample_weight"] = config.test_weight
        if message_omitted:
            example["message_omitted"] = message_omitted
        kept.append(example)
    return kept, skips
