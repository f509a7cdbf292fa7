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


def test_render_fim_is_psm_and_deterministic():
    rec = record(after="".join(f"    let v{i} = {i};\n" for i in range(12)))
    prompt, target = data.render(rec, fim_share=1.0, seed=3)
    assert prompt.startswith("<repo_name>the-block<file_sep>node/src/f.rs\n<fim_prefix>")
    assert prompt.index("<fim_prefix>") < prompt.index("<fim_suffix>") < prompt.index("<fim_middle>")
    assert prompt.endswith("<fim_middle>") and target.endswith("<|endoftext|>")
    prefix = prompt.split("<fim_prefix>")[1].split("<fim_suffix>")[0]
    suffix = prompt.split("<fim_suffix>")[1].split("<fim_middle>")[0]
    middle = target.removesuffix("<|endoftext|>")
    assert prefix.endswith("\n") and middle.endswith("\n") and middle  # line-aligned, non-empty span
    assert (prefix + middle + suffix).endswith(rec["after"])
    assert data.render(rec, fim_share=1.0, seed=3) == (prompt, target)
    shares = [data.render(record(i), fim_share=0.3, seed=0)[0].count("<fim_prefix>") for i in range(400)]
    assert 0.2 < sum(shares) / 400 < 0.4


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
    long_before = "".join(f"    let value_{i} = compute_{i}(x);\n" for i in range(300))
    prompt, target = data.render(record(before=long_before))
    t, cut = data.tokenize(tok, prompt, target, 256)
    assert cut and len(t.input_ids) == 256
    assert t.input_ids[0] == tok.convert_tokens_to_ids("<repo_name>")
    assert tok.decode([x for x in t.labels if x != data.IGNORE]) == target  # whole target kept
    huge_target = "".join(f"let a{i} = {i};\n" for i in range(400)) + "<|endoftext|>"
    t2, cut2 = data.tokenize(tok, "<repo_name>r<file_sep>p\n", huge_target, 256)
    assert cut2 and len(t2.input_ids) <= 256


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
