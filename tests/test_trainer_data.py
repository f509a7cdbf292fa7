"""Rendering, masking, truncation, packing and replay mixing, with the tiny model's real tokenizer."""
from __future__ import annotations

import json
import random

import pytest

from gitlora.trainer import data, tiny


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


def record(i=0, change_kind="modified", before="fn f() -> u32 {\n    1\n}\n", after=None, **kw):
    after = after if after is not None else f"fn f() -> u32 {{\n    let x = {i};\n    x + 1\n}}\n"
    rec = dict(repo="the-block", commit=f"{i:040x}", parent=None, author_time=1_700_000_000 + i,
               commit_time=1_700_000_000 + i, message="Fix overflow in f\n\nUse checked add.", path="node/src/f.rs",
               old_path=None, kind="fn", qualified_name=f"f{i}", change_kind=change_kind,
               before=before if change_kind != "added" else "", after=after if change_kind != "deleted" else "",
               imports=["use std::fmt;", "use crate::ledger::Ledger;"])
    rec.update(kw)
    return rec


def realistic_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    corpus = tiny.rust_corpus(200, seed=seed + 1)[5:]
    recs = []
    for i in range(n):
        a = "".join(rng.choice(corpus) for _ in range(rng.choice([1, 1, 1, 2, 3])))
        kind = rng.choice(["modified", "modified", "added"])
        recs.append(record(i, change_kind=kind, before=rng.choice(corpus), after=a))
    return recs


def test_render_modified_uses_starcoder2_native_format():
    prompt, target = data.render(record())
    assert prompt.startswith("<repo_name>the-block<file_sep>node/src/f.rs\n")
    assert "// Fix overflow in f" in prompt and "// modified fn f0" in prompt
    assert "use crate::ledger::Ledger;" in prompt
    assert "// before:\nfn f() -> u32 {\n    1\n}\n// after:\n" in prompt
    assert target.endswith("<|endoftext|>") and "let x = 0;" in target
    assert "<commit" not in prompt  # StarCoder2 has no commit tokens


def test_render_added_has_no_before_and_deleted_is_skipped():
    prompt, _ = data.render(record(change_kind="added"))
    assert "// before:" not in prompt and "// added fn f0" in prompt
    assert data.render(record(change_kind="deleted")) is None


PEER_V1 = """use std::fmt;

pub struct Peer { addr: String }

impl Peer {
    pub fn connect(addr: &str) -> Peer {
        let a = addr;
        Peer { addr: a.to_string() }
    }

    pub fn close(&self) {}
}
"""
CHANGED_LINE = "        let a = addr.trim().to_lowercase().replace(' ', \"\");\n"
PEER_V2 = PEER_V1.replace("        let a = addr;\n", CHANGED_LINE)


def in_file(text: str, item: str, **kw) -> dict:
    """A record of `item` as the daemon writes it from the new file `text`: its span and the text around it."""
    start = text.index(item)
    end = start + len(item)
    return record(after=item, new_context={"above": text[:start], "below": text[end:]},
                  new_span={"start_byte": len(text[:start].encode()), "end_byte": len(text[:end].encode())}, **kw)


def method(text: str, name: str) -> str:
    """The method's text as the daemon takes it: from `pub fn` (after its indentation) through its `}`."""
    start = text.index(f"pub fn {name}")
    end = text.index("\n    }\n", start) + len("\n    }")
    return text[start:end]


def fim(rec: dict, seed: int = 0) -> data.FimParts:
    r = data.rendering(rec, data.RenderOptions(edit_share=0.0), seed)
    assert r.kind == data.FIM and r.target == r.fim.middle + "<|endoftext|>"
    return r.fim


def test_fim_golden_starcoder2_repository_layout_in_the_real_file():
    """A modified method: its changed line is the middle, the file above and below are prefix and suffix, in
    StarCoder2's repository-level FIM layout (`<fim_prefix>` before the path), indentation kept."""
    rec = in_file(PEER_V2, method(PEER_V2, "connect"), path="node/src/peer.rs", kind="method",
                  before=method(PEER_V1, "connect"))
    prompt, target = data.render(rec, edit_share=0.0, seed=0)
    assert prompt == (
        "<repo_name>the-block<file_sep><fim_prefix>node/src/peer.rs\n"
        "use std::fmt;\n\npub struct Peer { addr: String }\n\nimpl Peer {\n    pub fn connect(addr: &str) -> Peer {\n"
        "<fim_suffix>"
        "        Peer { addr: a.to_string() }\n    }\n\n    pub fn close(&self) {}\n}\n"
        "<fim_middle>")
    assert target == CHANGED_LINE + "<|endoftext|>"
    parts = fim(rec)
    assert parts.prefix + parts.middle + parts.suffix == PEER_V2  # the file's text, byte for byte
    assert "Fix overflow" not in prompt  # an editor's completion has no commit message
    assert data.render(rec, edit_share=0.0, seed=0) == (prompt, target)  # deterministic per (seed, item)


def test_a_small_change_grows_to_its_scope_with_indentation_kept():
    v1 = PEER_V1.replace("        let a = addr;\n", "        let a = addr;\n        let _b = 1;\n")
    v2 = v1.replace("let _b = 1;", "let _b = 2;")
    rec = in_file(v2, method(v2, "connect"), before=method(v1, "connect"), kind="method")
    parts = fim(rec)
    # The changed line (under FIM_MIN_BYTES) grows to the enclosing scope: the whole method, from its line start.
    assert parts.middle == "    " + method(v2, "connect") + "\n"
    assert parts.prefix.endswith("impl Peer {\n") and parts.suffix.startswith("\n    pub fn close")
    assert parts.prefix + parts.middle + parts.suffix == v2


def test_an_added_item_is_completed_inside_its_file():
    v2 = PEER_V1.replace("    pub fn close(&self) {}\n", "    pub fn close(&self) {}\n\n"
                         "    pub fn reset(&mut self) {\n        self.addr.clear();\n    }\n")
    rec = in_file(v2, method(v2, "reset"), change_kind="added", kind="method")
    parts = fim(rec)
    assert parts.middle == "    " + method(v2, "reset") + "\n"
    assert parts.prefix.endswith("    pub fn close(&self) {}\n\n") and parts.suffix == "}\n"
    assert parts.prefix + parts.middle + parts.suffix == v2
    assert parts.prefix.startswith("use std::fmt;")


def test_a_large_item_completes_one_scope_of_bounded_size():
    arms = "".join(f"            {i} => {{\n                let v{i} = compute_{i}(x);\n                v{i} + 1\n"
                   f"            }}\n" for i in range(40))
    item = f"pub fn big(x: u32) -> u32 {{\n    match x {{\n{arms}            _ => 0,\n        }}\n}}"
    text = f"use std::fmt;\n\n{item}\n\npub fn after() {{}}\n"
    rec = in_file(text, item, change_kind="added")
    for seed in range(5):
        parts = fim(rec, seed)
        assert data.FIM_MIN_BYTES <= len(parts.middle.encode()) <= data.FIM_MAX_BYTES
        assert parts.prefix + parts.middle + parts.suffix == text
        assert parts.prefix.endswith("\n") and parts.middle.endswith("\n")
        first, last = parts.middle.splitlines()[0], parts.middle.splitlines()[-1]
        assert len(first) - len(first.lstrip()) == len(last) - len(last.lstrip())  # a whole scope: opener..closer
    assert len({fim(rec, seed).middle for seed in range(8)}) > 1  # the scope is drawn per (seed, item)


def test_fim_markers_survive_truncation(tok):
    filler = "".join(f"// line {n}: some words about the code\n" for n in range(60))
    text = filler + PEER_V2 + filler
    rec = in_file(text, method(PEER_V2, "connect"), before=method(PEER_V1, "connect"), kind="method")
    parts = fim(rec)
    whole, cut = data.tokenize_fim(tok, parts, 10_000)
    assert not cut
    short, cut = data.tokenize_fim(tok, parts, 256)
    assert cut and len(short.input_ids) <= 256
    ids = short.input_ids
    marks = [tok.convert_tokens_to_ids(m) for m in ("<repo_name>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>")]
    assert [ids.count(m) for m in marks] == [1, 1, 1, 1]
    assert ids[0] == marks[0] and ids.index(marks[1]) < ids.index(marks[2]) < ids.index(marks[3])
    target = [t for t in short.labels if t != data.IGNORE]
    assert tok.decode(target) == CHANGED_LINE + "<|endoftext|>"  # the middle whole
    kept_prefix = ids[ids.index(marks[1]) + 1:ids.index(marks[2])]
    kept_suffix = ids[ids.index(marks[2]) + 1:ids.index(marks[3])]
    # The prefix lost its top (the text nearest the middle stays), the suffix its bottom.
    assert tok.decode(kept_prefix).endswith("    pub fn connect(addr: &str) -> Peer {\n")
    assert tok.decode(kept_suffix).startswith("        Peer { addr: a.to_string() }\n")
    assert len(kept_prefix) > len(kept_suffix) > 0
    prompt_only, _ = data.tokenize_fim(tok, parts, 128, with_target=False)
    assert len(prompt_only.input_ids) <= 128 and prompt_only.input_ids[-1] == marks[3]
    assert all(label == data.IGNORE for label in prompt_only.labels)


def fim_pieces(tok, tokenized: data.Tokenized) -> tuple[str, str, str]:
    """(kept prefix, kept suffix, target) of a tokenized FIM example, as text."""
    ids = tokenized.input_ids
    p, s, m = (tok.convert_tokens_to_ids(x) for x in ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))
    header_end = ids.index(p) + 1 + next(i for i, x in enumerate(ids[ids.index(p) + 1:])
                                         if tok.decode(ids[ids.index(p) + 1:ids.index(p) + 2 + i]).endswith("\n"))
    target = [x for x in tokenized.labels if x != data.IGNORE]
    return (tok.decode(ids[header_end + 1:ids.index(s)]), tok.decode(ids[ids.index(s) + 1:ids.index(m)]),
            tok.decode(target))


def many_methods(n: int) -> str:
    return "".join(f"    pub fn get_{i}(&self, key: u64) -> Option<u64> {{\n        let slot = key % {i + 7};\n"
                   f"        self.table.get(slot as usize).copied()\n    }}\n\n" for i in range(n))


def test_fim_truncation_cuts_whole_lines_and_the_kept_bytes_are_the_files(tok):
    """Golden, StarCoder2's layout: cut to a small context, the prefix starts at a line start (indentation
    kept), the suffix ends at a line end, every marker once and in order, and prefix + middle + suffix are one
    contiguous byte range of the file."""
    text = "use std::fmt;\n\nimpl Table {\n" + many_methods(20) + "    " + method(PEER_V2, "connect") + "\n\n"
    text += many_methods(20).replace("get_", "put_") + "}\n"
    rec = in_file(text, method(PEER_V2, "connect"), before=method(PEER_V1, "connect"), kind="method")
    parts = fim(rec)
    assert parts.middle == CHANGED_LINE
    for context in (96, 160, 300, 600):
        short, cut = data.tokenize_fim(tok, parts, context)
        assert cut and len(short.input_ids) <= context
        ids = short.input_ids
        marks = [tok.convert_tokens_to_ids(m) for m in ("<repo_name>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>")]
        assert [ids.count(m) for m in marks] == [1, 1, 1, 1]
        assert ids[0] == marks[0] and ids.index(marks[1]) < ids.index(marks[2]) < ids.index(marks[3])
        prefix, suffix, target = fim_pieces(tok, short)
        assert target == CHANGED_LINE + "<|endoftext|>"
        assert parts.prefix.endswith(prefix) and parts.suffix.startswith(suffix)
        assert prefix == "" or parts.prefix[:len(parts.prefix) - len(prefix)].endswith("\n")  # a line start
        assert prefix.endswith("    pub fn connect(addr: &str) -> Peer {\n")  # the lines nearest the middle
        assert suffix == "" or suffix.endswith("\n")  # (empty when not even its first line fits)
        first = prefix.splitlines()[0]
        assert first.startswith("    ") or first == ""  # indentation kept: the line is whole
        start = len(parts.prefix.encode()) - len(prefix.encode())
        kept = (prefix + parts.middle + suffix).encode()
        assert text.encode()[start:start + len(kept)] == kept  # a byte range of the file, round-tripped
        assert context < 160 or suffix.startswith("        Peer { addr: a.to_string() }\n")
        assert len(tok(prefix, add_special_tokens=False)["input_ids"]) >= len(
            tok(suffix, add_special_tokens=False)["input_ids"])  # the prefix, nearer the gap's meaning, gets more


class CountingTokenizer:
    """The real tokenizer, counting the texts it encodes and their characters."""

    def __init__(self, tokenizer):
        self.inner, self.calls, self.chars, self.longest = tokenizer, 0, 0, 0

    def __call__(self, text, *args, **kw):
        self.calls, self.chars, self.longest = self.calls + 1, self.chars + len(text), max(self.longest, len(text))
        return self.inner(text, *args, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_line_fits_are_the_most_whole_lines_within_the_budget(tok):
    """fit_lines against the definition, tokenising every candidate: the most lines (from the start, from the
    end, or only at the given cuts) whose text fits, with exactly that text's tokens; budgets from none to more
    than the whole text (the window then grows to all of it)."""
    rng = random.Random(5)
    corpus = tiny.rust_corpus(60, seed=3)
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    for trial in range(4):
        text = "".join(rng.choice(corpus) for _ in range(rng.randint(3, 20)))
        lines = data._lines(text)
        cuts = sorted(rng.sample(range(1, len(lines) + 1), k=max(1, len(lines) // 3)))
        for from_end in (False, True):
            texts = {n: "".join(lines[len(lines) - n:] if from_end else lines[:n]) for n in range(len(lines) + 1)}
            counts = {n: len(ids(t)) for n, t in texts.items()}
            for budget in (0, 1, 17, 64, 200, counts[len(lines)] - 1, counts[len(lines)], counts[len(lines)] + 50):
                for allowed in (None, cuts):
                    want = max((n for n in (allowed or range(1, len(lines) + 1)) if counts[n] <= budget), default=0)
                    n, got = data.fit_lines(tok, lines, budget, from_end=from_end, cuts=allowed)
                    assert n == want, (trial, budget, from_end, allowed)
                    assert got == (ids(texts[n]) if n else [])


def test_an_item_in_a_huge_file_never_tokenises_the_whole_file(tok):
    """The text around an item is cut to the context from windows near the item: a 200 KB file is never
    tokenised whole, and the example is the one a full tokenisation gives."""
    filler = many_methods(1200)
    text = "use std::fmt;\n\nimpl Table {\n" + filler + "    " + method(PEER_V2, "connect") + "\n\n" + filler + "}\n"
    assert len(text) > 200_000
    rec = in_file(text, method(PEER_V2, "connect"), before=method(PEER_V1, "connect"), kind="method")
    parts = fim(rec)
    counting = CountingTokenizer(tok)
    short, cut = data.tokenize_fim(counting, parts, 512)
    assert cut and len(short.input_ids) <= 512
    assert counting.longest < 20 * 512 and counting.chars < 40 * 512  # windows of a few thousand characters
    prefix, suffix, target = fim_pieces(tok, short)
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert short.input_ids[-len(ids(target)):] == ids(target) and parts.prefix.endswith(prefix)
    # the most whole lines that fit, as tokenising each candidate would find
    room = len(ids(prefix))
    more = parts.prefix[:len(parts.prefix) - len(prefix)].rsplit("\n", 2)[-2] + "\n" + prefix
    assert len(ids(more)) > room or len(short.input_ids) + len(ids(more)) - room > 512


def test_the_file_around_a_gap_can_be_learned_at_a_lower_weight(tok):
    """context_weight: the prefix and suffix kept are targets at that weight, the middle at 1; the repository
    header, the markers and cross-file blocks never are; the tokens are the same as without it, cut or not."""
    text = "use std::fmt;\n\nimpl Table {\n" + many_methods(6) + "    " + method(PEER_V2, "connect") + "\n\n"
    text += many_methods(6).replace("get_", "put_") + "}\n"
    rec = in_file(text, method(PEER_V2, "connect"), before=method(PEER_V1, "connect"), kind="method")
    parts = fim(rec)
    marks = [tok.convert_tokens_to_ids(m) for m in ("<repo_name>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>")]
    for context in (160, 4096):
        plain, cut = data.tokenize_fim(tok, parts, context)
        weighted, cut_too = data.tokenize_fim(tok, parts, context, context_weight=0.25)
        assert weighted.input_ids == plain.input_ids and cut_too == cut == (context == 160)
        ids, labels, weights = weighted.input_ids, weighted.labels, weighted.weights
        s_at, m_at = ids.index(marks[2]), ids.index(marks[3])
        prefix_at = next(i for i in range(s_at) if labels[i] != data.IGNORE)
        # the repository line, <fim_prefix> and the file's path line are not targets
        assert all(labels[i] == data.IGNORE and weights[i] == 0.0 for i in range(prefix_at))
        assert marks[0] == ids[0] and marks[1] in ids[:prefix_at]
        assert tok.decode(ids[prefix_at:s_at]) == parts.prefix[len(parts.prefix) - len(tok.decode(ids[prefix_at:s_at])):]
        for lo, hi in ((prefix_at, s_at), (s_at + 1, m_at)):  # the prefix, the suffix
            assert all(labels[i] == ids[i] and weights[i] == 0.25 for i in range(lo, hi))
        assert [(labels[i], weights[i]) for i in (s_at, m_at)] == [(data.IGNORE, 0.0)] * 2
        assert all(labels[i] == ids[i] and weights[i] == 1.0 for i in range(m_at + 1, len(ids)))  # the middle
        assert [x for x in plain.labels if x != data.IGNORE] == ids[m_at + 1:]  # without it: the middle alone
    options = data.RenderOptions(edit_share=0.0, context_weight=0.25)
    assert data.RenderOptions.from_settings({"edit_share": 0.0, "copied_token_weight": 0.1,
                                             "context_token_weight": 0.25}).context_weight == 0.25
    packed = data.build([rec], tok, 4096, options=options, seed=0).packed
    assert sorted(set(packed.weights[0])) == [0.0, 0.25, 1.0]


def test_an_over_long_middle_ends_at_a_scope_boundary_with_its_markers(tok):
    arms = "".join(f"            {i} => {{\n                let v{i} = compute_{i}(x);\n                v{i} + 1\n"
                   f"            }}\n" for i in range(8))
    item = f"pub fn big(x: u32) -> u32 {{\n    match x {{\n{arms}            _ => 0,\n        }}\n}}"
    item = item.replace("\n", "\n    ")  # a method: indented inside its impl
    text = f"use std::fmt;\n\nimpl Big {{\n    {item}\n\n    pub fn after() {{}}\n}}\n"
    parts = fim(in_file(text, item, change_kind="added"))  # the whole item: under FIM_MAX_BYTES
    assert len(parts.middle.encode()) > 600
    short, cut = data.tokenize_fim(tok, parts, 160)
    assert cut and len(short.input_ids) <= 160
    marks = [tok.convert_tokens_to_ids(m) for m in ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")]
    assert [short.input_ids.count(m) for m in marks] == [1, 1, 1]
    prefix, suffix, target = fim_pieces(tok, short)
    lines = parts.middle.splitlines(keepends=True)
    k = len(target.splitlines())
    assert target == "".join(lines[:k]) and k in data.scope_boundaries(lines) and k < len(lines)
    assert "<|endoftext|>" not in target  # cut: no stop taught
    assert target.startswith("    pub fn big(x: u32) -> u32 {\n")  # the middle keeps its indentation
    assert parts.prefix.endswith(prefix) and parts.suffix.startswith(suffix) and suffix  # the suffix survives


CROSS_FILE = [{"path": "node/src/net.rs", "text": "pub struct Addr { host: String, port: u16 }\n"},
              {"path": "node/src/util.rs", "text": "pub fn trim_all(s: &str) -> String;\n"}]


def test_cross_file_blocks_go_before_the_file_in_starcoder2_layout():
    """The record's cross-file context: one `<file_sep>path\nskeleton` block per file, most relevant first, before
    the file's own header, in the FIM and the edit rendering alike."""
    rec = in_file(PEER_V2, method(PEER_V2, "connect"), path="node/src/peer.rs", kind="method",
                  before=method(PEER_V1, "connect"), cross_file=CROSS_FILE)
    prompt, target = data.render(rec, edit_share=0.0, seed=0)
    assert prompt == (
        "<repo_name>the-block"
        "<file_sep>node/src/net.rs\npub struct Addr { host: String, port: u16 }\n"
        "<file_sep>node/src/util.rs\npub fn trim_all(s: &str) -> String;\n"
        "<file_sep><fim_prefix>node/src/peer.rs\n"
        "use std::fmt;\n\npub struct Peer { addr: String }\n\nimpl Peer {\n    pub fn connect(addr: &str) -> Peer {\n"
        "<fim_suffix>"
        "        Peer { addr: a.to_string() }\n    }\n\n    pub fn close(&self) {}\n}\n"
        "<fim_middle>")
    assert target == CHANGED_LINE + "<|endoftext|>"
    edit, _ = data.render(rec, edit_share=1.0)
    assert edit.startswith("<repo_name>the-block<file_sep>node/src/net.rs\npub struct Addr { host: String, port: u16 }"
                           "\n<file_sep>node/src/util.rs\npub fn trim_all(s: &str) -> String;\n"
                           "<file_sep>node/src/peer.rs\n// Fix overflow in f\n")
    # Without the field, with it empty, or with the option off: exactly today's rendering.
    bare = {k: v for k, v in rec.items() if k != "cross_file"}
    for options in (data.RenderOptions(edit_share=0.0), data.RenderOptions(edit_share=1.0)):
        plain = data.rendering(bare, options).prompt
        assert "net.rs" not in plain
        assert data.rendering({**rec, "cross_file": []}, options).prompt == plain
        assert data.rendering({**rec, "cross_file": None}, options).prompt == plain
        assert data.rendering(rec, data.RenderOptions(options.edit_share, cross_file=False)).prompt == plain
    assert data.RenderOptions.from_settings({"edit_share": 0.2, "copied_token_weight": 0.1,
                                             "cross_file_context": False}).cross_file is False


def test_cross_file_blocks_keep_their_share_of_the_context_and_markers_survive(tok):
    rec = in_file(PEER_V2, method(PEER_V2, "connect"), before=method(PEER_V1, "connect"), kind="method",
                  cross_file=CROSS_FILE)
    parts = fim(rec)
    whole, cut = data.tokenize_fim(tok, parts, 10_000)
    assert not cut
    marks = [tok.convert_tokens_to_ids(m) for m in ("<repo_name>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>")]
    sep = tok.convert_tokens_to_ids("<file_sep>")
    block_tokens = [len(tok(b, add_special_tokens=False)["input_ids"]) for b in data.cross_file_blocks(rec)]
    bare, _ = data.tokenize_fim(tok, fim({k: v for k, v in rec.items() if k != "cross_file"}), 10_000)
    assert len(whole.input_ids) == len(bare.input_ids) + sum(block_tokens)
    # One token short of everything: the least relevant block goes, the file's prefix and suffix stay whole.
    short, cut = data.tokenize_fim(tok, parts, len(whole.input_ids) - 1)
    assert cut and len(short.input_ids) == len(whole.input_ids) - block_tokens[1]
    assert tok.decode(short.input_ids).startswith("<repo_name>the-block<file_sep>node/src/net.rs\n")
    assert "node/src/util.rs" not in tok.decode(short.input_ids)
    repo_head = len(tok("<repo_name>the-block", add_special_tokens=False)["input_ids"])
    file_part = bare.input_ids[repo_head:]
    assert short.input_ids[-len(file_part):] == file_part  # the file's own part untouched
    # Room for less than the first block, but the block is within its share of the context: it stays, and the
    # file's prefix gives whole lines for it.
    ctx = len(bare.input_ids) + 20
    assert 20 < block_tokens[0] <= data.CROSS_FILE_SHARE * ctx  # the premise
    shared, cut = data.tokenize_fim(tok, parts, ctx)
    text = tok.decode(shared.input_ids)
    assert cut and len(shared.input_ids) <= ctx and "node/src/net.rs" in text and "node/src/util.rs" not in text
    assert [shared.input_ids.count(m) for m in marks] == [1, 1, 1, 1] and shared.input_ids.count(sep) == 2
    kept_prefix = text.split("<fim_prefix>")[1].split("<fim_suffix>")[0].split("\n", 1)[1]  # after the path
    kept_suffix = text.split("<fim_suffix>")[1].split("<fim_middle>")[0]
    assert parts.prefix.endswith(kept_prefix) and parts.suffix.startswith(kept_suffix)  # the file gave room...
    assert len(kept_prefix) + len(kept_suffix) < len(parts.prefix) + len(parts.suffix)
    assert kept_prefix == parts.prefix or parts.prefix[len(parts.prefix) - len(kept_prefix) - 1] == "\n"
    assert kept_suffix in (parts.suffix, "") or kept_suffix.endswith("\n")  # ... in whole lines
    assert tok.decode([t for t in shared.labels if t != data.IGNORE]) == CHANGED_LINE + "<|endoftext|>"
    # Shorter than the bare file and a share smaller than the first block: no block, then the prefix is cut, and
    # every marker is still there.
    tight, cut = data.tokenize_fim(tok, parts, len(bare.input_ids) - 10)
    assert data.CROSS_FILE_SHARE * (len(bare.input_ids) - 10) < block_tokens[0]  # the premise: not even the first
    assert cut and len(tight.input_ids) <= len(bare.input_ids) - 10
    assert [tight.input_ids.count(m) for m in marks] == [1, 1, 1, 1] and tight.input_ids.count(sep) == 1
    assert tok.decode([t for t in tight.labels if t != data.IGNORE]) == CHANGED_LINE + "<|endoftext|>"
    assert data.blocks_within([5, 5, 5], 3, 40) == 2 and data.blocks_within([5, 5], 100, 40) == 2
    assert data.blocks_within([20], 0, 40) == 0  # a block larger than the share is not kept
    # An edit example keeps its blocks within the same share, and its own header whole.
    edit = data.rendering(rec, data.RenderOptions(edit_share=1.0))
    full, cut = data.tokenize_rendering(tok, edit, 10_000)
    assert not cut and sum(block_tokens) <= data.CROSS_FILE_SHARE * (len(full.input_ids) - 1)
    within, cut = data.tokenize_rendering(tok, edit, len(full.input_ids) - 1)
    text = tok.decode(within.input_ids)
    assert cut and len(within.input_ids) <= len(full.input_ids) - 1
    assert text.startswith("<repo_name>the-block<file_sep>node/src/net.rs\n") and "node/src/util.rs" in text
    ctx = 4 * block_tokens[0] + 4  # a share with room for the first block alone
    dropped, cut = data.tokenize_rendering(tok, edit, ctx)
    text = tok.decode(dropped.input_ids)
    assert cut and len(dropped.input_ids) <= ctx and "node/src/util.rs" not in text
    assert text.startswith("<repo_name>the-block<file_sep>node/src/net.rs\n")
    assert "<file_sep>node/src/f.rs\n" in text  # the file's own header line whole


def test_records_without_file_context_still_fill_in_the_middle():
    """Shards written before the new file's text was kept: the item under the synthetic header (commit message,
    what changed, use lines), in the same layout."""
    rec = record(after="fn f() -> u32 {\n" + "".join(f"    let v{i} = {i};\n" for i in range(12)) + "}\n")
    assert "new_context" not in rec
    prompt, target = data.render(rec, fim_share=1.0, seed=3)  # the deprecated spelling still works
    assert prompt.startswith("<repo_name>the-block<file_sep><fim_prefix>node/src/f.rs\n// Fix overflow in f\n")
    assert prompt.index("<fim_prefix>") < prompt.index("<fim_suffix>") < prompt.index("<fim_middle>")
    parts = fim(rec, seed=3)
    assert parts.prefix.split("use crate::ledger::Ledger;\n")[1] + parts.middle + parts.suffix == rec["after"]
    assert target == parts.middle + "<|endoftext|>" and parts.middle.endswith("\n")


def test_edit_share_decides_per_item_and_deleted_items_have_no_target():
    shares = [data.rendering(record(i), data.RenderOptions(edit_share=0.3), seed=0).kind for i in range(400)]
    assert 0.2 < shares.count(data.EDIT) / 400 < 0.4
    assert [data.rendering(record(i), data.RenderOptions(edit_share=0.3), seed=0).kind
            for i in range(400)] == shares
    assert all(data.rendering(record(i)).kind == data.EDIT for i in range(20))  # the default: the change rendering
    deleted = record(change_kind="deleted")
    assert data.rendering(deleted, data.RenderOptions(edit_share=0.0)) is None
    assert data.fim_parts(deleted) is None and data.render_fim(deleted) is None and data.render_edit(deleted) is None


def test_evaluation_asks_the_completion_training_trains():
    """The FIM span does not depend on the edit/FIM draw: evaluation's task is the one training renders."""
    for i in range(30):
        rec = in_file(PEER_V2, method(PEER_V2, "connect"), before=method(PEER_V1, "connect"), qualified_name=f"m{i}")
        r = data.rendering(rec, data.RenderOptions(edit_share=0.5), seed=7)
        if r.kind == data.FIM:
            assert r.fim == data.fim_parts(rec, seed=7)


def test_edit_examples_weigh_changed_tokens_over_copied_ones(tok):
    before = "fn f(x: u32) -> u32 {\n    let total = x * 2;\n    let scaled = total + 7;\n    scaled\n}\n"
    after = before.replace("total + 7", "total.checked_add(7).unwrap_or(u32::MAX)")
    recs = [record(0, before=before, after=after), record(1, change_kind="added", after=after)]
    ds = data.build(recs, tok, 1024, options=data.RenderOptions(edit_share=1.0, copied_weight=0.1))
    packed = ds.packed
    weights = {w for b in packed.weights for w in b}
    assert weights == {0.0, 0.1, 1.0}
    for ids, labels, ws in zip(packed.input_ids, packed.labels, packed.weights):
        assert all((w == 0.0) == (lab == data.IGNORE) for lab, w in zip(labels, ws))  # weight only on targets
    by_example = []
    for block, members in enumerate(packed.members):
        pos = packed.position_ids[block]
        starts = [k for k, p in enumerate(pos) if p == 0] + [len(pos)]
        for m, (s, e) in zip(members, zip(starts, starts[1:])):
            by_example.append((m, [(packed.input_ids[block][k], packed.weights[block][k]) for k in range(s, e)
                                   if packed.labels[block][k] != data.IGNORE]))
    modified = dict(by_example)[0]
    changed = tok.decode([t for t, w in modified if w == 1.0])
    assert "checked_add" in changed and "let total" not in changed  # copied lines weigh copied_weight
    assert all(w == 1.0 for _, w in dict(by_example)[1])  # an added item: every token is new
    plain = data.build(recs, tok, 1024, options=data.RenderOptions(edit_share=1.0))
    assert {w for b in plain.packed.weights for w in b} == {0.0, 1.0}
    fim_only = data.build(recs, tok, 1024, options=data.RenderOptions(edit_share=0.0, copied_weight=0.1))
    assert fim_only.fim == 2 and {w for b in fim_only.packed.weights for w in b} == {0.0, 1.0}


def test_example_tokens_is_what_build_packs(tok):
    recs = realistic_records(40) + [in_file(PEER_V2, method(PEER_V2, "connect"), before=method(PEER_V1, "connect"))]
    options = data.RenderOptions(edit_share=0.3, copied_weight=0.1)
    ds = data.build(recs, tok, 512, options=options, seed=2)
    assert sum(data.example_tokens(r, tok, 512, options, 2) for r in recs) == ds.packed.real_tokens


def test_a_round_counts_and_packs_each_record_once(tok):
    """The budget selection's counts and build share one Tokenizations: the same packed data as a build from
    scratch, and no record rendered or tokenised twice."""
    recs = realistic_records(40) + [in_file(PEER_V2, method(PEER_V2, "connect"), before=method(PEER_V1, "connect"))]
    options = data.RenderOptions(edit_share=0.3, copied_weight=0.1)
    counting = CountingTokenizer(tok)
    fresh = data.build(recs, counting, 512, options=options, seed=2)
    build_alone = counting.calls
    counting.calls = 0
    made = data.Tokenizations(counting, 512, options, 2)
    counted = sum(made.tokens(r) for r in recs[:25])  # a selection reaches some of the records
    shared = data.build(recs, counting, 512, options=options, seed=2, made=made)
    assert counting.calls == build_alone
    assert counted == sum(data.example_tokens(r, tok, 512, options, 2) for r in recs[:25])
    for key in ("input_ids", "labels", "position_ids", "weights"):
        assert getattr(shared.packed, key) == getattr(fresh.packed, key)
    assert (shared.examples, shared.skipped, shared.truncated, shared.fim) == \
        (fresh.examples, fresh.skipped, fresh.truncated, fresh.fim)
    with pytest.raises(ValueError):
        data.build(recs, counting, 1024, options=options, seed=2, made=made)  # made for another length


def test_labels_mask_prompt_and_keep_target(tok):
    prompt, target = data.render(record())
    t, cut = data.tokenize(tok, prompt, target, 512)
    assert not cut and len(t.input_ids) == len(t.labels)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert all(x == data.IGNORE for x in t.labels[:n_prompt])
    assert t.labels[n_prompt:] == t.input_ids[n_prompt:]
    assert tok.decode(t.input_ids[n_prompt:]) == target
    assert t.input_ids[-1] == tok.convert_tokens_to_ids("<|endoftext|>")
    # the special tokens are single tokens of the native vocabulary
    assert t.input_ids[0] == tok.convert_tokens_to_ids("<repo_name>")


def test_truncation_keeps_header_and_fits(tok):
    """An edit cut to the context: its header line and the end of its prompt, each whole lines."""
    long_before = "".join(f"    let value_{i} = compute_{i}(x);\n" for i in range(300))
    prompt, target = data.render(record(before=long_before))
    t, cut = data.tokenize(tok, prompt, target, 256)
    assert cut and 200 < len(t.input_ids) <= 256
    assert t.input_ids[0] == tok.convert_tokens_to_ids("<repo_name>")
    assert tok.decode([x for x in t.labels if x != data.IGNORE]) == target  # whole target kept
    kept = tok.decode([x for x, label in zip(t.input_ids, t.labels) if label == data.IGNORE])
    lines = prompt.splitlines(keepends=True)
    head = next(n for n in range(len(lines), 0, -1) if kept.startswith("".join(lines[:n])))
    assert head >= 1 and kept.endswith("".join(lines[-3:]))  # the header line; the prompt's end ("// after:")
    assert "".join(lines[:head]) + "".join(lines[len(lines) - (len(kept.splitlines()) - head):]) == kept


def test_an_over_long_target_ends_at_its_last_scope_boundary_without_eos(tok):
    arms = "".join(f"        {i} => {{\n            let v{i} = compute_{i}(x);\n            v{i} + 1\n        }}\n"
                   for i in range(60))
    after = f"fn big(x: u32) -> u32 {{\n    let y = x;\n    match y {{\n{arms}        _ => 0,\n    }}\n}}\n"
    prompt, target = data.render(record(change_kind="added", after=after))
    t, cut = data.tokenize(tok, prompt, target, 256)
    assert cut and len(t.input_ids) <= 256
    labels = [x for x in t.labels if x != data.IGNORE]
    assert tok.eos_token_id not in labels  # the text goes on: no stop taught
    kept = tok.decode(labels)
    lines = after.splitlines(keepends=True)
    k = len(kept.splitlines())
    assert kept == "".join(lines[:k]) and k in data.scope_boundaries(lines)  # whole lines, at a boundary
    assert kept.endswith("        }\n")  # the last whole match arm that fits
    following = min(b for b in data.scope_boundaries(lines) if b > k)
    assert len(tok("".join(lines[:following]), add_special_tokens=False)["input_ids"]) > 256 * 3 // 4  # the last
    one_line = "let a = [" + ", ".join(str(i) for i in range(500)) + "];\n<|endoftext|>"
    t2, cut2 = data.tokenize(tok, "<repo_name>r<file_sep>p\n", one_line, 256)  # no line fits: its first tokens
    assert cut2 and len(t2.input_ids) <= 256 and tok.decode([x for x in t2.labels if x != data.IGNORE]) != ""


def test_scope_boundaries_golden():
    lines = ("fn f(x: u32) -> u32 {\n"      # 0
             "    let y = foo(\n"           # 1
             "        x,\n"                 # 2: inside an argument list: no boundary
             "        1,\n"                 # 3
             "    );\n"                     # 4
             "    if y > 2 {\n"             # 5
             "        return 1;\n"          # 6
             "    }\n"                      # 7
             "\n"                           # 8
             "    y + 1\n"                  # 9
             "}\n").splitlines(keepends=True)  # 10
    assert data.scope_boundaries(lines) == [5, 7, 8, 10, 11]
    assert data.scope_boundaries([]) == []
    window = lines[6:]  # a middle that starts inside a scope and closes it
    assert data.scope_boundaries(window) == [1, 2, 4, 5]


def test_packing_waste_under_five_percent_and_positions_restart(tok):
    ds = data.build(realistic_records(200), tok, 1024, fim_share=0.2)
    packed = ds.packed
    assert ds.examples > 150 and packed.waste <= 0.05, packed.waste
    assert 512 <= packed.context_length <= 1024 and packed.context_length % 64 == 0
    assert all(len(b) == packed.context_length for b in packed.input_ids + packed.labels + packed.position_ids)
    assert packed.target_tokens == sum(x != data.IGNORE for b in packed.labels for x in b)
    # every example starts at position 0 and its first token is a masked <repo_name>
    repo_name = tok.convert_tokens_to_ids("<repo_name>")
    starts = sum(pos == 0 and ids == repo_name for b, p in zip(packed.input_ids, packed.position_ids)
                 for ids, pos in zip(b, p))
    assert starts == ds.examples
    for ids, labels, pos in zip(packed.input_ids, packed.labels, packed.position_ids):
        for k, p in enumerate(pos):
            if p == 0:
                assert labels[k] == data.IGNORE  # no target ever spans two examples
    again = data.build(realistic_records(200), tok, 1024, fim_share=0.2)
    assert again.packed.input_ids == packed.input_ids  # deterministic


def test_pack_fills_blocks_best_fit():
    exs = [data.Tokenized([1] * n, [1] * n) for n in (600, 400, 500, 500, 300, 700, 24, 1000)]
    packed = data.pack(exs, 1024, pad_id=0)
    assert len(packed.input_ids) == 4 and packed.waste == pytest.approx(1 - 4024 / 4096)
    assert packed.context_length == 1024


def test_small_rounds_get_shorter_blocks_instead_of_a_padded_tail():
    exs = [data.Tokenized([1] * 200, [1] * 200) for _ in range(9)]  # 1800 tokens: 2 x 1024 wastes 12 %
    packed = data.pack(exs, 1024, pad_id=0)
    assert packed.context_length <= 1024 and packed.waste < 0.07
    assert max(len(e.input_ids) for e in exs) <= packed.context_length


def test_replay_mix_share_and_determinism():
    new = [record(i) for i in range(70)]
    old = [record(1000 + i) for i in range(200)]
    mixed, replayed = data.mix_replay(new, old, 0.3, seed=1)
    assert replayed == 30 and len(mixed) == 100
    assert sum(r["commit"] in {o["commit"] for o in old} for r in mixed) == 30
    assert data.mix_replay(new, old, 0.3, seed=1) == (mixed, replayed)
    assert data.mix_replay(new, [], 0.3, seed=1)[1] == 0
    few, n = data.mix_replay(new, old[:5], 0.3, seed=1)
    assert n == 30 and len(few) == 100  # repeats a small history rather than under-replaying


def test_recency_weighted_replay_favours_newer_commits_and_stays_deterministic():
    new = [{"commit": "n", "i": i} for i in range(60)]
    newest_first = [f"c{k:02d}" for k in range(40)]
    old = [{"commit": c, "i": i} for c in newest_first for i in range(5)]  # 200 old examples, 5 per commit
    mixed, replayed = data.mix_replay(new, old, 0.25, seed=4, newest_first=newest_first, halflife_commits=5)
    assert replayed == 20 and len(mixed) == 80
    assert data.mix_replay(new, old, 0.25, seed=4, newest_first=newest_first, halflife_commits=5) == (mixed, 20)
    drawn = [newest_first.index(r["commit"]) for r in mixed if r["commit"] != "n"]
    assert len(set(map(id, (r for r in mixed if r["commit"] != "n")))) == 20  # without replacement
    # with a half-life of 5 commits, the newest 10 commits hold 3/4 of the weight: most draws come from there;
    # uniform replay draws from each quarter alike
    assert sum(k < 10 for k in drawn) >= 12
    uniform, _ = data.mix_replay(new, old, 0.25, seed=4, newest_first=newest_first, halflife_commits=0)
    assert uniform == data.mix_replay(new, old, 0.25, seed=4)[0]  # 0 = the uniform draw, unchanged
    # a pool smaller than the draw is taken whole, the rest drawn with the weights
    few, n = data.mix_replay(new, old[:10], 0.25, seed=4, newest_first=newest_first, halflife_commits=1)
    assert n == 20 and all(o in few for o in old[:10])
    assert data.replay_weights(old[:6], newest_first, 1.0)[:6] == [1.0] * 5 + [0.5]
    assert data.replay_weights([{"commit": "gone"}], newest_first, 5.0) == [0.5 ** 8]  # unknown: the oldest


def test_read_shards(tmp_path):
    p = tmp_path / "000001.jsonl"
    p.write_text("".join(json.dumps(record(i)) + "\n" for i in range(3)) + "\n")
    assert [r["qualified_name"] for r in data.read_shards([p])] == ["f0", "f1", "f2"]
    bad = tmp_path / "000002.jsonl"
    bad.write_text(json.dumps(record(0)) + "\n{not json\n")
    with pytest.raises(ValueError, match="000002.jsonl:2"):
        data.read_shards([bad])


def test_a_tiny_round_still_replays_old_data():
    new = [{"i": 0}]
    old = [{"o": i} for i in range(10)]
    mixed, replayed = data.mix_replay(new, old, 0.3, seed=3)
    assert replayed == 1 and len(mixed) == 2 and {"i": 0} in mixed
    assert data.mix_replay(new, [], 0.3, seed=3)[1] == 0
    assert data.mix_replay(new, old, 0.0, seed=3)[1] == 0


# ------------------------------------------------------------------------------------------- sampling weight
def test_sample_weight_keeps_its_share_of_items_deterministically():
    tests = [record(i, sample_weight=0.25, test=True) for i in range(400)]
    kept = [data.sampled(r, seed=0) for r in tests]
    assert 0.18 < sum(kept) / 400 < 0.32
    assert [data.sampled(r, seed=0) for r in tests] == kept  # per (seed, item): the same every time
    assert [data.sampled(r, seed=1) for r in tests] != kept  # another seed draws another sample
    assert all(data.sampled(record(i), seed=0) for i in range(50))  # no weight: always
    assert not any(data.sampled(record(i, sample_weight=0.0), seed=0) for i in range(50))
    assert all(data.sampled(record(i, sample_weight=1.0), seed=0) for i in range(50))
    # independent of the edit/FIM draw: the kept test items are not all of one kind
    kinds = {data.rendering(r, data.RenderOptions(edit_share=0.5), 0).kind for r, k in zip(tests, kept) if k}
    assert kinds == {data.EDIT, data.FIM}


def test_build_leaves_out_by_weight_counts_them_and_example_tokens_agrees(tok):
    recs = realistic_records(30) + [record(100 + i, sample_weight=0.0, test=True) for i in range(5)]
    recs += [record(200 + i, sample_weight=0.5, test=True) for i in range(40)]
    half_kept = sum(data.sampled(r, 3) for r in recs[35:])
    assert 0 < half_kept < 40
    options = data.RenderOptions(edit_share=0.3)
    ds = data.build(recs, tok, 512, options=options, seed=3)
    assert ds.left_out_by_weight == 5 + 40 - half_kept and ds.examples == 30 + half_kept
    assert sum(data.example_tokens(r, tok, 512, options, 3) for r in recs) == ds.packed.real_tokens
    assert all(data.example_tokens(r, tok, 512, options, 3) == 0 for r in recs[30:35])
    everything = data.build([{**r, "sample_weight": None} for r in recs], tok, 512, options=options, seed=3)
    assert everything.left_out_by_weight == 0 and everything.examples == len(recs)


def test_a_rounds_budget_counts_only_what_its_weights_keep(tok):
    from gitlora.trainer import plan

    # The two newest commits are test code the weight leaves out: they cost nothing, so the budget reaches
    # two older commits that would not fit if they were counted.
    recs = [record(0, commit=f"c{i}", commit_time=1000 + i) for i in range(6)]  # the same text, 6 commits
    recs += [record(0, commit=f"c{6 + i}", commit_time=1006 + i, sample_weight=0.0, test=True) for i in range(2)]
    options = data.RenderOptions()
    one = data.example_tokens(recs[0], tok, 512, options, 0)
    assert one > 0 and data.example_tokens(recs[-1], tok, 512, options, 0) == 0
    assert {data.example_tokens(r, tok, 512, options, 0) for r in recs[:6]} == {one}
    budget = {"max_tokens": 3 * one, "max_seconds": 0}
    kept, report = plan.select_by_budget(recs, lambda r: data.example_tokens(r, tok, 512, options, 0), budget,
                                         1.0, 0.0, 1.0)
    assert report["covered_commits"] == ["c7", "c6", "c5", "c4", "c3"]
    assert report["planned_tokens"] == 3 * one


def test_replay_is_sized_by_and_drawn_among_the_examples_weights_keep():
    new = [record(i) for i in range(40)] + [record(100 + i, sample_weight=0.0) for i in range(30)]
    old = [record(1000 + i) for i in range(100)] + [record(2000 + i, sample_weight=0.0) for i in range(100)]
    mixed, replayed = data.mix_replay(new, old, 0.2, seed=1)
    assert replayed == 10  # a fifth of what trains: 40 new kept, 10 replayed
    assert len(mixed) == 80 and all(r in mixed for r in new)  # left-out new ones stay for build to count
    assert all("sample_weight" not in r for r in mixed if r not in new)  # none of the left-out old ones
    assert data.mix_replay(new[40:], old, 0.2, seed=1)[1] == 0  # nothing new trains: nothing to replay for


def test_evaluation_scores_every_example_whatever_its_weight(tok):
    from gitlora.trainer import evaluate

    recs = [record(i, sample_weight=0.0, test=True) for i in range(6)]
    es = evaluate.prepare(recs, tok, 512, fim_samples=2)
    assert len(es.records) == 6 and len(es.fim) == 2 and len(es.packed.members) > 0


def test_read_bytes_is_the_rendered_texts_bytes_without_choosing_a_span():
    rec = in_file(PEER_V2, method(PEER_V2, "connect"), before=method(PEER_V1, "connect"), kind="method")
    parts = fim(rec)
    assert data.read_bytes(rec, data.RenderOptions(edit_share=0.0)) == len(
        (parts.prompt() + parts.middle + data.EOS).encode())  # whatever the span: the file's text, once
    prompt, target = data.render_edit(rec)
    edit = len((prompt + target).encode())
    assert data.read_bytes(rec, data.RenderOptions(edit_share=1.0)) == edit
    half = data.read_bytes(rec, data.RenderOptions(edit_share=0.5))
    assert half == pytest.approx((edit + len((parts.prompt() + parts.middle + data.EOS).encode())) / 2)
    assert data.read_bytes({**rec, "sample_weight": 0.25}, data.RenderOptions(edit_share=0.5)) == half / 4
    assert data.read_bytes(rec, data.RenderOptions(edit_share=1.0), max_bytes=100) == 100
    assert data.read_bytes(record(change_kind="deleted"), data.RenderOptions()) == 0
