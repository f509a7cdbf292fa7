"""The trainer's target-only loss equals Hugging Face's `model(labels=...).loss` on the same labels: the same
shift, the same mask, the same mean, through the same LoRA-wrapped tiny StarCoder2 (values and gradients),
for a block holding one example and for a packed block of several, with the lm_head chunked or not."""
from __future__ import annotations

import pytest

from gitlora.trainer import data, plan as planlib, tiny
from gitlora.trainer import round as R


def record(n: int, body_lines: int) -> dict:
    body = "".join(f"    let v{i} = x.wrapping_mul({i + n});\n" for i in range(body_lines))
    return dict(repo="demo", commit=f"{n:040x}", parent=None, author_time=1_700_000_000, commit_time=1_700_000_000,
                message=f"Tune item {n}", path=f"src/m{n}.rs", old_path=None, kind="fn",
                qualified_name=f"m{n}::item_{n}", change_kind="modified",
                before=f"pub fn item_{n}(x: u64) -> u64 {{\n    x\n}}\n",
                after=f"pub fn item_{n}(x: u64) -> u64 {{\n{body}    x\n}}\n", imports=["use std::fmt;"])


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("loss")
    model_dir = tiny.build_tiny_model(root / "tiny")
    cfg = {**R.DEFAULTS, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
    model, parent = R.attach_adapter(R.load_base(str(model_dir), planlib.make_plan(model_dir), torch),
                                     root / "adapters", cfg)
    assert parent is None
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh LoRA has B = 0; make the adapter matter, so its path is compared too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.eval()  # no dropout: both losses see the same forward
    return model, AutoTokenizer.from_pretrained(model_dir)


def one_block(tokenizer, records):
    """All `records` rendered, masked and packed by the trainer's own code into a single block."""
    import torch

    toks = [data.tokenize(tokenizer, *data.render(r), 4096)[0] for r in records]
    packed = data.pack(toks, sum(len(t.input_ids) for t in toks), tokenizer.pad_token_id or 0)
    assert len(packed.input_ids) == 1
    return tuple(torch.tensor(getattr(packed, k)) for k in ("input_ids", "position_ids", "labels"))


def hf_loss(model, ids, pos, labels):
    """transformers' own causal-LM loss: shifts labels by one and averages CE over those != -100."""
    from gitlora.trainer import packed_attention

    return model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False,
                 **packed_attention.attention_kwargs(pos)).loss


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk", [planlib.LOSS_CHUNK, 7], ids=["one-chunk", "chunks-of-7"])
@pytest.mark.parametrize("examples", [1, 4], ids=["one-example", "packed-block"])
def test_target_loss_equals_hf_loss_with_the_same_labels(model_and_tokenizer, monkeypatch, chunk, examples):
    import torch

    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(planlib, "LOSS_CHUNK", chunk)
    records = [record(n, 3 + n) for n in range(examples)]
    ids, pos, labels = one_block(tokenizer, records)
    # The labels mask everything but the targets: per example only the rendered `after` (+ EOS) is learned.
    targets = [tokenizer(data.render(r)[1], add_special_tokens=False)["input_ids"] for r in records]
    assert int((labels != data.IGNORE).sum()) == sum(len(t) for t in targets)
    assert int((pos == 0).sum()) >= examples  # several examples restart their positions inside the block

    model.zero_grad(set_to_none=True)
    theirs = hf_loss(model, ids, pos, labels)
    theirs.backward()
    theirs_grads = lora_grads(model)
    for checkpointed in (False, True):  # the chunks plain, and each chunk recomputed in backward
        model.zero_grad(set_to_none=True)
        total, count = R.target_loss_sum(model, ids, pos, labels, torch, chunked_ckpt=checkpointed)
        ours = total / count
        ours.backward()
        ours_grads = lora_grads(model)
        assert count == int((labels[:, 1:] != data.IGNORE).sum())  # a block's first token has no prediction
        torch.testing.assert_close(ours.detach(), theirs.detach().float(), rtol=1e-5, atol=1e-6)
        assert ours_grads.keys() == theirs_grads.keys() and any("lora_A" in n for n in ours_grads)
        for name, grad in ours_grads.items():
            torch.testing.assert_close(grad, theirs_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    model.zero_grad(set_to_none=True)


def test_evaluation_is_the_token_weighted_mean_over_blocks(model_and_tokenizer):
    """Evaluation pools examples by target tokens (not a mean of block or example means): its target loss equals
    HF's loss summed over the packed blocks, weighted by each block's target count."""
    import torch

    from gitlora.trainer import evaluate, metrics

    model, tokenizer = model_and_tokenizer
    records = [record(n, 2 + 5 * n) for n in range(6)]
    es = evaluate.prepare(records, tokenizer, 128, fim_samples=0)
    packed = es.packed
    assert len(packed.input_ids) >= 2
    got = metrics.summarize(evaluate.score_losses(model, es, 1, torch, torch.device("cpu")), [])["target_loss"]
    model.eval()
    total = count = 0
    with torch.no_grad():
        for b in range(len(packed.input_ids)):
            ids, pos, labels = (torch.tensor([getattr(packed, k)[b]]) for k in ("input_ids", "position_ids", "labels"))
            n = int((labels[:, 1:] != data.IGNORE).sum())
            total += float(hf_loss(model, ids, pos, labels)) * n
            count += n
    assert got == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("chunk", [planlib.LOSS_CHUNK, 7], ids=["one-chunk", "chunks-of-7"])
def test_weighted_loss_is_each_target_tokens_loss_times_its_weight(model_and_tokenizer, monkeypatch, chunk):
    """The training loss with an edit's copied tokens down-weighted: sum of per-token CE x weight (the same per
    token as the unweighted path), plain and checkpointed; weights of 1 give the plain sum."""
    import torch

    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(planlib, "LOSS_CHUNK", chunk)
    records = [record(n, 3 + n) for n in range(3)]
    built = data.build(records, tokenizer, 4096, options=data.RenderOptions(edit_share=1.0, copied_weight=0.25))
    packed = built.packed
    assert len(packed.input_ids) == 1 and {w for w in packed.weights[0]} == {0.0, 0.25, 1.0}
    ids, pos, labels = (torch.tensor(getattr(packed, k)) for k in ("input_ids", "position_ids", "labels"))
    weights = torch.tensor(packed.weights, dtype=torch.float32)
    with torch.no_grad():
        per_token, n = R.target_loss_sum(model, ids, pos, labels, torch, per_token=True)
        want = float((per_token * weights[:, 1:][labels[:, 1:] != data.IGNORE]).sum())
        ones = torch.where(labels != data.IGNORE, 1.0, 0.0)
        plain, _ = R.target_loss_sum(model, ids, pos, labels, torch)
        assert float(R.target_loss_sum(model, ids, pos, labels, torch, weights=ones)[0]) == pytest.approx(
            float(plain), rel=1e-6)
    for checkpointed in (False, True):
        model.zero_grad(set_to_none=True)
        got, count = R.target_loss_sum(model, ids, pos, labels, torch, chunked_ckpt=checkpointed, weights=weights)
        assert count == n and float(got) == pytest.approx(want, rel=1e-5) and float(got) < float(plain)
        got.backward()  # gradients flow through the weighted chunks
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
