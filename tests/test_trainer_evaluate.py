"""Evaluation on the tiny StarCoder2 (real model, real tokenizer, no mocks): per-example losses recovered from
packed blocks equal each example scored alone, the changed-token mask on a real rendering, the base model seen
through peft's disable_adapter(), cached greedy decoding equals decoding without a cache, stable sampling."""
from __future__ import annotations

import pytest

from gitlora.trainer import data, evaluate, plan as planlib, tiny
from gitlora.trainer import round as R


def record(n: int, *, added: bool = False, lines: int = 4) -> dict:
    body = "".join(f"    let v{i} = self.get_{n}(v{i - 1}).unwrap();\n" for i in range(1, lines + 1))
    before = f"pub fn item_{n}(&self, v0: u64) -> u64 {{\n{body}    v{lines}\n}}\n"
    after = before.replace(".unwrap()", '.expect("checked")')
    return dict(repo="demo", commit=f"{n // 2:040x}", parent=None, author_time=1_700_000_000 + n,
                commit_time=1_700_000_000 + n, message=f"Explain the unwraps of item {n}", path=f"src/m{n % 3}.rs",
                old_path=None, kind="fn", qualified_name=f"m::item_{n}", change_kind="added" if added else "modified",
                before="" if added else before, after=after, imports=["use std::fmt;"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("evaluate")
    model_dir = tiny.build_tiny_model(root / "tiny")
    cfg = {**R.DEFAULTS, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
    model, _ = R.attach_adapter(R.load_base(str(model_dir), planlib.make_plan(model_dir), torch), root / "a", cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # make the adapter matter, so "adapter disabled" is a different model
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir), model_dir


def test_changed_mask_on_a_real_rendering(setup):
    _, tokenizer, _ = setup
    rec = record(1, lines=6)
    es = evaluate.prepare([rec, record(3, added=True)], tokenizer, 1024, fim_samples=0)
    by_name = {r["qualified_name"]: k for k, r in enumerate(es.records)}
    k = by_name["m::item_1"]
    target = [t for t in data.tokenize(tokenizer, *data.render(rec), 1024)[0].labels if t != data.IGNORE]
    mask = es.changed[k]
    assert len(mask) == len(target)
    changed_text = tokenizer.decode([t for t, c in zip(target, mask) if c])
    copied_text = tokenizer.decode([t for t, c in zip(target, mask) if not c])
    assert "expect" in changed_text and "unwrap" not in changed_text
    assert "pub fn item_1" in copied_text and "expect" not in copied_text
    assert 0 < sum(mask) < len(mask) / 2  # the edit is a minority of the item's tokens
    assert all(es.changed[by_name["m::item_3"]])  # added: every token is new


def test_per_example_losses_from_packed_blocks_equal_each_example_alone(setup):
    import torch

    model, tokenizer, _ = setup
    records = [record(n, added=n % 4 == 0, lines=2 + n % 5) for n in range(9)]
    packed = evaluate.prepare(records, tokenizer, 1024, fim_samples=0)
    assert any(len(m) > 1 for m in packed.packed.members)  # several examples share a block
    got = evaluate.score_losses(model, packed, 2, torch, torch.device("cpu"))
    for k, rec in enumerate(packed.records):
        alone = evaluate.prepare([rec], tokenizer, 1024, fim_samples=0)
        (want,) = evaluate.score_losses(model, alone, 1, torch, torch.device("cpu"))
        assert got[k].commit == rec["commit"] and got[k].target_n == want.target_n
        assert got[k].changed_n == want.changed_n == sum(packed.changed[k])
        assert got[k].target_sum == pytest.approx(want.target_sum, rel=1e-4)
        assert got[k].changed_sum == pytest.approx(want.changed_sum, rel=1e-4)
    # and the total is the training loss path's own sum over the same blocks
    with torch.no_grad():
        total = sum(float(R.target_loss_sum(model, *(torch.tensor([getattr(packed.packed, f)[b]])
                                                     for f in ("input_ids", "position_ids", "labels")), torch)[0])
                    for b in range(len(packed.packed.input_ids)))
    assert sum(e.target_sum for e in got) == pytest.approx(total, rel=1e-4)


def test_disable_adapter_scores_the_base_model(setup):
    import torch
    from transformers import AutoModelForCausalLM

    from gitlora.trainer import packed_attention

    model, tokenizer, model_dir = setup
    es = evaluate.prepare([record(n) for n in range(4)], tokenizer, 1024, fim_samples=2)
    with model.disable_adapter():
        via_peft = evaluate.evaluate(model, tokenizer, es, 2, torch, torch.device("cpu"))
    adapted = evaluate.evaluate(model, tokenizer, es, 2, torch, torch.device("cpu"))
    plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    packed_attention.enable(plain)
    base = evaluate.evaluate(plain, tokenizer, es, 2, torch, torch.device("cpu"))
    assert [e.target_sum for e in via_peft.losses] == pytest.approx([e.target_sum for e in base.losses], rel=1e-5)
    assert via_peft.fim == base.fim
    assert sum(e.target_sum for e in adapted.losses) != pytest.approx(sum(e.target_sum for e in base.losses))


def test_cached_greedy_decoding_equals_decoding_without_cache(setup):
    import torch

    model, tokenizer, _ = setup
    es = evaluate.prepare([record(n, lines=6) for n in range(6)], tokenizer, 1024, fim_samples=4)
    assert len(es.fim) == 4
    stop = {tokenizer.eos_token_id}
    attention = model.get_base_model().config._attn_implementation
    with torch.no_grad():
        for item in es.fim:
            with evaluate._cached_attention(model) as cache_arg:
                cached = evaluate.greedy(model, item.prompt_ids, stop, 12, torch, torch.device("cpu"), cache_arg)
            slow = evaluate.greedy(model, item.prompt_ids, stop, 12, torch, torch.device("cpu"), None)
            assert cached == slow and len(cached) > 0
    assert model.get_base_model().config._attn_implementation == attention  # packed attention restored
    scores = evaluate.score_fim(model, tokenizer, es, torch, torch.device("cpu"), max_new_tokens=8)
    assert [s.commit for s in scores] == [f.commit for f in es.fim]
    assert all(0.0 <= s.edit_sim <= 1.0 for s in scores)


def test_fim_task_reference_is_the_middle_span(setup):
    _, tokenizer, _ = setup
    rec = record(5, lines=8)
    prompt, middle = data.render_fim(rec, seed=0)
    assert prompt.endswith("<fim_middle>") and "<fim_suffix>" in prompt and middle and middle in rec["after"]
    assert data.render_fim(rec, seed=0) == (prompt, middle)  # fixed per (seed, item)
    assert data.render_fim({**rec, "change_kind": "deleted"}) is None
    one_line = data.render_fim({**rec, "after": "fn f() {}\n"})  # a small item: completed whole
    assert one_line is not None and one_line[1] == "fn f() {}\n"
    es = evaluate.prepare([rec], tokenizer, 1024, fim_samples=1)
    reference = tokenizer.decode(tokenizer(middle, add_special_tokens=False)["input_ids"][:evaluate.FIM_MAX_NEW_TOKENS])
    assert es.fim[0].reference == reference and middle.startswith(reference)
    assert tokenizer.decode(es.fim[0].prompt_ids) == prompt


def test_sample_is_stable_when_records_join_and_skips_what_cannot_be_rendered():
    records = [record(n) for n in range(30)]
    deleted = {**record(99), "change_kind": "deleted"}
    all_, skipped = evaluate.sample(records + [deleted], 0, seed=0)
    assert skipped == 1 and len(all_) == 30
    some, _ = evaluate.sample(records[:20], 0, seed=0)
    assert [r for r in all_ if r in records[:20]] == some  # a record keeps its place when others join
    assert evaluate.sample(records, 10, seed=0)[0] == all_[:10]
    assert evaluate.sample(records, 10, seed=1)[0] != all_[:10]


def test_split_by_example_uses_position_boundaries():
    ig = data.IGNORE
    pos = [0, 1, 2, 3, 0, 1, 2, 0, 1]  # two examples, then padding
    labels = [ig, ig, 7, 8, ig, ig, 9, ig, ig]
    assert evaluate.split_by_example([0.1, 0.2, 0.3], pos, labels) == [[0.1, 0.2], [0.3], []]
    with pytest.raises(ValueError):
        evaluate.split_by_example([0.1, 0.2], pos, labels)


def test_fim_tasks_complete_inside_the_real_file(setup):
    """A record with the new file's text: the completion task is the real-file FIM training renders (StarCoder2's
    repository layout, the same span), its prompt cut without losing a marker; the losses stay on the edit."""
    _, tokenizer, _ = setup
    rec = record(3, lines=6)
    above = "use std::fmt;\n\n" + "".join(f"// context line {i}\n" for i in range(40)) + "\n"
    below = "\n\n" + "".join(f"// below line {i}\n" for i in range(40))
    rec["after"] = rec["after"].rstrip("\n")
    rec["new_context"] = {"above": above, "below": below}
    parts = data.fim_parts(rec, seed=0)
    assert parts.prefix + parts.middle + parts.suffix == above + rec["after"] + below
    assert parts.prompt().startswith("<repo_name>demo<file_sep><fim_prefix>src/m0.rs\nuse std::fmt;\n")
    es = evaluate.prepare([rec], tokenizer, 1024, fim_samples=1)
    assert tokenizer.decode(es.fim[0].prompt_ids) == parts.prompt()
    assert parts.middle.startswith(es.fim[0].reference)
    small = evaluate.prepare([rec], tokenizer, 64 + 96, fim_samples=1)  # a context that cannot hold the file
    ids = small.fim[0].prompt_ids
    assert len(ids) <= 96 and ids[-1] == tokenizer.convert_tokens_to_ids("<fim_middle>")
    assert ids.count(tokenizer.convert_tokens_to_ids("<fim_suffix>")) == 1
    prompt_ids = tokenizer(data.render_edit(rec)[0], add_special_tokens=False)["input_ids"]
    assert es.packed.input_ids[0][:len(prompt_ids)] == prompt_ids  # the loss set: the edit rendering


def test_fim_loss_set_targets_the_middle_and_masks_what_the_old_version_had(setup):
    """The FIM-format loss set: each item's real-file FIM task with the middle (+ EOS) as its only target, the
    span the completion task uses; the changed mask leaves out the middle's tokens copied from the before
    version; an added item's middle is all changed; per-example losses equal the item scored alone."""
    import torch

    model, tokenizer, _ = setup
    rec = record(7, lines=8)
    above = "use std::fmt;\n\n" + "".join(f"// context line {i}\n" for i in range(20)) + "\n"
    rec["new_context"] = {"above": above, "below": "\n// after the item\n"}
    added = {**record(9, added=True), "new_context": {"above": "mod m;\n", "below": ""}}
    deleted = {**record(11), "change_kind": "deleted", "after": ""}
    es = evaluate.prepare_fim_losses([rec, added, deleted], tokenizer, 1024)
    assert es.skipped == 1 and {r["qualified_name"] for r in es.records} == {"m::item_7", "m::item_9"}
    assert es.fim == []
    by_name = {r["qualified_name"]: k for k, r in enumerate(es.records)}
    k = by_name["m::item_7"]
    tok = es.tokens[k]
    parts = data.fim_parts(rec, seed=0)
    target = [t for t in tok.labels if t != data.IGNORE]
    assert tokenizer.decode(target) == parts.middle + data.EOS
    prompt = tok.input_ids[:len(tok.input_ids) - len(target)]
    assert tokenizer.decode(prompt) == parts.prompt()
    mask = es.changed[k]
    changed_text = tokenizer.decode([t for t, c in zip(target, mask) if c])
    copied_text = tokenizer.decode([t for t, c in zip(target, mask) if not c])
    assert "expect" in changed_text and "unwrap" not in changed_text
    assert "expect" not in copied_text and 0 < sum(mask) < len(mask)
    assert all(es.changed[by_name["m::item_9"]])
    fim_prompt = evaluate.prepare([rec], tokenizer, 1024, fim_samples=1).fim[0].prompt_ids
    assert prompt == fim_prompt  # the same task the completion scores

    losses = evaluate.score_losses(model, es, 2, torch, torch.device("cpu"))
    assert [e.target_n for e in losses] == [len(es.changed[i]) for i in range(2)]
    assert [e.changed_n for e in losses] == [sum(es.changed[i]) for i in range(2)]
    alone = evaluate.score_losses(model, evaluate.prepare_fim_losses([rec], tokenizer, 1024), 1, torch,
                                  torch.device("cpu"))[0]
    assert alone.target_sum == pytest.approx(losses[k].target_sum, rel=1e-4)
    assert alone.changed_sum == pytest.approx(losses[k].changed_sum, rel=1e-4)


# ------------------------------------------------------------------------------------------- score cache
def test_score_cache_reuses_scores_and_scores_only_what_it_lacks(setup, tmp_path):
    import torch

    from gitlora.trainer import score_cache

    model, tokenizer, model_dir = setup
    cpu = torch.device("cpu")
    first = evaluate.prepare([record(n, lines=3 + n % 4) for n in range(8)], tokenizer, 1024, fim_samples=3)
    # The window moved: two records left, two newer ones joined.
    moved = evaluate.prepare([record(n, lines=3 + n % 4) for n in range(2, 10)], tokenizer, 1024, fim_samples=3)
    plain = evaluate.evaluate(model, tokenizer, moved, 2, torch, cpu)

    key = score_cache.base_key(str(model_dir), {"device": "cpu", "compute_dtype": "float32"})
    cache = score_cache.ScoreCache.for_model(tmp_path, "base", key)
    evaluate.evaluate(model, tokenizer, first, 2, torch, cpu, cache=cache)
    assert cache.stats() == {"hits": 0, "misses": len(first.records) + len(first.fim)}
    cache.save()

    reloaded = score_cache.ScoreCache.for_model(tmp_path, "base", key)
    cached = evaluate.evaluate(model, tokenizer, moved, 2, torch, cpu, cache=reloaded)
    shared = sum(k in set(first.loss_keys()) for k in moved.loss_keys())
    assert 0 < shared < len(moved.records)  # the premise: some records are new
    assert reloaded.stats()["misses"] == len(moved.records) - shared + sum(
        k not in set(first.fim_keys()) for k in moved.fim_keys())
    # Cached and freshly computed (repacked) scores equal a plain evaluation of the moved set.
    assert [x.commit for x in cached.losses] == [x.commit for x in plain.losses]
    for a, b in zip(cached.losses, plain.losses):
        assert (a.target_n, a.changed_n) == (b.target_n, b.changed_n)
        assert a.target_sum == pytest.approx(b.target_sum, rel=1e-4)
        assert a.changed_sum == pytest.approx(b.changed_sum, rel=1e-4, abs=1e-6)
    assert [(f.commit, f.exact) for f in cached.fim] == [(f.commit, f.exact) for f in plain.fim]
    assert [f.edit_sim for f in cached.fim] == pytest.approx([f.edit_sim for f in plain.fim])

    # Another model (other weights or precision) never reads these scores.
    other = score_cache.ScoreCache.for_model(tmp_path, "base", score_cache.base_key(
        str(model_dir), {"device": "cpu", "compute_dtype": "float16"}))
    assert not other.losses and not other.fim


def test_score_cache_is_bounded_and_keyed_by_the_adapter_files(tmp_path):
    from gitlora.trainer import score_cache

    cache = score_cache.ScoreCache(tmp_path / "c.json", "k")
    for i in range(score_cache.MAX_ENTRIES + 5):
        cache.put("losses", str(i), [1.0, 1, 0.0, 0])
    assert len(cache.losses) == score_cache.MAX_ENTRIES and "0" not in cache.losses
    version = tmp_path / "v0001"
    version.mkdir()
    (version / "adapter_model.safetensors").write_bytes(b"a")
    before = score_cache.adapter_key("base", version)
    assert before == score_cache.adapter_key("base", version)
    (version / "adapter_model.safetensors").write_bytes(b"bb")
    assert score_cache.adapter_key("base", version) != before
    (tmp_path / "c.json").write_text("{not json")  # a torn or foreign file is an empty cache, never an error
    assert not score_cache.ScoreCache(tmp_path / "c.json", "k").losses
