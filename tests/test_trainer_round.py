"""Real training rounds on the tiny StarCoder2 (no mocks): learning, resuming, replay, evaluation of base /
current / candidate on the window and the older slice, the promotion gate (a clearly better candidate promoted;
corrupted targets, an A/A pair and a margin not reached rejected), a non-finite loss failing the round, rollback,
merged export, and a SIGKILL in the middle of a round."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gitlora.trainer import registry, tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = dict(learning_rate=3e-3, warmup_steps=2, epochs=3, context_length=1024, micro_batch=1, grad_accum=2,
            lora_r=8, lora_alpha=16, lora_dropout=0.0, edit_share=0.2, copied_token_weight=0.1, device="cpu", seed=0,
            promote_margin=0.0, fim_samples=6)


# ------------------------------------------------------------------------------------------- shard helpers
def make_records(n: int, start: int, *, corrupt: bool = False, seed: int = 0) -> list[dict]:
    """Example records like the daemon's: one consistent refactor (unwrap -> expect) over generated Rust."""
    rng = random.Random(seed + start)
    corpus = tiny.rust_corpus(300, seed=99)[5:]
    out = []
    for i in range(n):
        body = corpus[(start + i) % len(corpus)]
        before = body.replace("?;", ".unwrap();")
        after = body.replace("?;", '.expect("checked above");')
        if corrupt:  # random characters: nothing to learn, and it pulls the model away from real Rust
            after = "".join(rng.choice(string.ascii_letters + string.punctuation + " \n") for _ in range(len(after)))
        out.append(dict(repo="demo", commit=f"{start + i:040x}", parent=f"{start + i - 1:040x}",
                        author_time=1_700_000_000 + start + i, commit_time=1_700_000_000 + start + i,
                        message=f"Replace unwrap with expect in item {start + i}", path=f"src/m{i % 7}.rs",
                        old_path=None, kind="fn", qualified_name=f"m{i % 7}::item_{start + i}",
                        change_kind="added" if i % 5 == 0 else "modified",
                        before="" if i % 5 == 0 else before, after=after,
                        imports=["use std::collections::HashMap;", "use crate::error::Error;"]))
    return out


def write_shard(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_spec(tmp: Path, model: Path, adapters: Path, train, replay=(), eval_=(), *, window=None, older=None,
              budget=None, eval_seed=None, **train_cfg) -> Path:
    """A round spec; `window` / `older` (commit lists) select the window and the older slice from eval_."""
    spec = dict(base_model=str(model), adapters_dir=str(adapters), train_shards=[str(p) for p in train],
                replay_shards=[str(p) for p in replay], eval_shards=[str(p) for p in eval_],
                progress_file=str(tmp / "progress.jsonl"), train={**FAST, **train_cfg}, eval_seed=eval_seed)
    if budget is not None:
        spec["budget"] = budget
    if window is not None:
        spec.update(window_commits=list(window), older_commits=list(older or []))
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def events(progress_file: Path) -> list[dict]:
    if not progress_file.exists():
        return []
    return [json.loads(line) for line in progress_file.read_text().splitlines() if line.strip()]


# Bounds for a loaded 2-core machine (a round here takes well under a minute on an idle one): they say when to
# call it a hang, not how long a round should take.
ROUND_TIMEOUT_S = 1200
TRAINING_STARTS_S = 600


def run_cli(spec: Path, timeout=ROUND_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gitlora.trainer", "--spec", str(spec)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def run_inprocess(spec: Path) -> dict:
    from gitlora.trainer import round as R

    s = json.loads(spec.read_text())
    return R.run_round(s, R.Progress(s["progress_file"]))


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny model, shards, and two chained rounds (the first through the real CLI subprocess)."""
    root = tmp_path_factory.mktemp("trainer")
    model = tiny.build_tiny_model(root / "tiny")
    shards = root / "shards"
    old = write_shard(shards / "000001.jsonl", make_records(40, 0))
    new = write_shard(shards / "000002.jsonl", make_records(40, 100))
    ev = write_shard(shards / "000003.jsonl", make_records(12, 200))
    adapters = root / "adapters"

    r1 = root / "round1"
    r1.mkdir()
    # A time budget far above what the round needs: no rate measured yet, so the round measures one.
    # Seeds as the daemon sets them: the round's own for training, the settings' for the held-out samples.
    proc = run_cli(make_spec(r1, model, adapters, [old], [], [ev], budget={"max_seconds": 100_000}, seed=1,
                             eval_seed=0))
    assert proc.returncode == 0, proc.stderr[-3000:]
    round1 = events(r1 / "progress.jsonl")

    r2 = root / "round2"
    r2.mkdir()  # the window spec: eval_shards filtered to the window's and the older slice's commits
    window = [r["commit"] for r in make_records(12, 200)]
    older = [r["commit"] for r in make_records(40, 0)][::4]
    round2 = run_inprocess(make_spec(r2, model, adapters, [new], [old], [ev, old], window=window, older=older,
                                     replay_share=0.3, seed=2, eval_seed=0))
    return dict(root=root, model=model, adapters=adapters, old=old, new=new, eval=ev, round1=round1,
                round2=round2, round2_events=events(r2 / "progress.jsonl"))


def snapshot(world, name: str) -> Path:
    """A private copy of the adapters dir (symlink kept) so a test can train on it without disturbing others."""
    dst = world["root"] / name
    shutil.copytree(world["adapters"], dst, symlinks=True)
    return dst


# ------------------------------------------------------------------------------------------------- tests
def test_first_round_lowers_loss_and_saves_a_plain_peft_adapter(world):
    ev = world["round1"]
    kinds = [e["event"] for e in ev]
    assert kinds[0] == "start" and kinds[-1] == "done" and "error" not in kinds
    assert kinds.count("eval") == 2
    prog = [e for e in ev if e["event"] == "progress"]
    assert prog and all({"step", "total", "loss", "tokens", "eta_s"} <= set(e) for e in prog)
    assert prog[-1]["step"] == prog[-1]["total"]
    from gitlora.trainer import round as R  # the loop follows the schedule (tests/test_trainer_schedule.py)

    assert [e["lr"] for e in prog] == pytest.approx([R.lr_at(s, prog[-1]["total"], {**R.DEFAULTS, **FAST})
                                                     for s in range(prog[-1]["total"])], rel=1e-9)
    done = ev[-1]
    assert done["promoted"] is True and done["version"] == "v0001" and done["current"] == "v0001"
    assert done["train_loss_last"] < done["train_loss_first"] - 0.3
    assert done["eval_loss_after"] < done["eval_loss_before"]
    # 40 short examples pack into a few blocks, so the last blocks' tails are a visible share (the packer's own
    # bound, on a round-sized set, is tests/test_trainer_data.py's 5 %).
    assert done["padding_waste"] <= 0.08 and done["target_tokens"] > 0 and done["tokens_per_s"] > 0
    assert registry.current_version(world["adapters"]) in ("v0001", "v0002")

    metrics = json.loads((world["adapters"] / "v0001" / "metrics.json").read_text())
    assert metrics["parent"] is None and metrics["eval_loss_after"] == done["eval_loss_after"]
    assert metrics["data"]["commits"] == 40 and metrics["data"]["first_commit_time"] == 1_700_000_000

    # A clearly better candidate (trained on the refactor the window repeats) passes the gate against the base
    # (round 1: current = base), with the interval over the window's 12 commits below zero.
    gate, evaluation = metrics["gate"], metrics["evaluation"]
    assert done["gate"] == gate and done["evaluation"] == evaluation
    assert gate["passed"] is True and "vs base (round 1)" in gate["reason"]
    assert gate["vs_current"]["ci95_high"] < 0 and gate["vs_current"] == gate["vs_base"]
    assert gate["older_rel"] is None  # a spec without window_commits: all eval shards are the window
    assert evaluation["current"] is None and set(evaluation) == {"base", "current", "candidate"}
    keys = {"examples", "commits", "target_loss", "changed_loss", "fim_exact", "fim_edit_sim", "fim_n"}
    for who in ("base", "candidate"):
        window = evaluation[who]["window"]
        assert set(window) == keys and set(evaluation[who]) == {"window", "older"}
        assert window["examples"] == 12 and window["commits"] == 12 and window["fim_n"] == FAST["fim_samples"]
        assert evaluation[who]["older"]["examples"] == 0
    base, cand = evaluation["base"]["window"], evaluation["candidate"]["window"]
    assert cand["changed_loss"] < base["changed_loss"] and cand["target_loss"] < base["target_loss"]
    assert gate["vs_base"]["changed_loss_rel"] == pytest.approx(cand["changed_loss"] / base["changed_loss"] - 1)
    assert done["eval_loss_before"] == base["target_loss"] and done["eval_loss_after"] == cand["target_loss"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(world["model"])
    peft_model = PeftModel.from_pretrained(base, str(world["adapters"] / "v0001"))
    assert peft_model.get_input_embeddings().weight.shape[0] == tiny.VOCAB_SIZE  # vocabulary untouched
    cfg = json.loads((world["adapters"] / "v0001" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"}


def test_first_timed_round_calibrates_its_rate_and_later_rounds_use_the_measured_one(world):
    first = json.loads((world["adapters"] / "v0001" / registry.METRICS).read_text())["budget"]
    assert first["rate_source"] == "calibrated" and first["max_seconds"] == 100_000
    # The calibration is the loop's own work (forward + backward on a full block): the same order as the rate
    # the loop then measured, not a FLOP-count guess (bounds wide for a loaded machine).
    assert first["tokens_per_s"] / 5 < first["read_tokens_per_s"] < first["tokens_per_s"] * 5
    second = world["round2"]["budget"]
    assert second["rate_source"] == "measured" and second["tokens_per_s"] == first["read_tokens_per_s"]


def test_the_next_round_reuses_the_base_and_current_scores_of_the_last(world):
    # Round 1 scored the base and its (promoted) candidate on the window; round 2's window holds the same
    # examples: its base and current scores come from those, the new candidate's are computed.
    cached = world["round2"]["eval_cache"]
    assert cached["base"]["hits"] > 0 and cached["current"]["hits"] > 0
    assert cached["current"]["misses"] < cached["current"]["hits"]
    # The rounds' seeds differ, their held-out samples and completion spans do not: every window score is
    # reused, only the older slice (new in round 2) is scored.
    older = len(make_records(40, 0)[::4])
    assert cached["base"]["misses"] <= older and cached["current"]["misses"] <= older
    files = sorted(p.stem for p in (world["adapters"] / "eval-cache").glob("*.json"))
    current = registry.current_version(world["adapters"])
    assert files == sorted({"base", current})  # older versions' scores are pruned with each promotion


def test_calibration_leaves_the_adapter_and_the_random_stream_as_they_were(world):
    import contextlib

    import torch

    from gitlora.trainer import round as R
    from gitlora.trainer.spec import DEFAULTS

    cfg = {**DEFAULTS, **FAST, "context_length": 256, "lora_dropout": 0.1}  # dropout draws random numbers
    plan = R.round_plan(str(world["model"]), cfg)
    model, _ = R.attach_adapter(R.load_base(str(world["model"]), plan, torch), world["root"] / "no-adapters", cfg)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    rate = R.calibrated_rate(model, plan, 1, torch, torch.device("cpu"), contextlib.nullcontext)
    assert rate > 0 and torch.equal(torch.rand(4), expected)
    after = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_second_round_resumes_the_first_adapter_and_replays(world):
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from gitlora.trainer import plan as P
    from gitlora.trainer import round as R

    r2 = world["round2"]
    assert r2["parent"] == "v0001" and r2["version"] == "v0002" and r2["promoted"]
    start = next(e for e in world["round2_events"] if e["event"] == "start")
    assert start["parent"] == "v0001" and start["replayed"] == round(40 * 0.3 / 0.7) > 0
    assert r2["replayed"] == start["replayed"]
    # Same eval shard, same data: round 2's "before" is exactly round 1's "after" -> it started from v0001.
    assert r2["eval_loss_before"] == pytest.approx(world["round1"][-1]["eval_loss_after"], rel=1e-5)
    # Every model on every set: the base (adapter disabled) scores what it scored in round 1, the current
    # adapter what round 1's candidate scored; the older slice is the spec's older commits.
    r1 = world["round1"][-1]["evaluation"]
    ev = r2["evaluation"]
    assert ev["base"]["window"] == pytest.approx(r1["base"]["window"], rel=1e-5)
    assert ev["current"]["window"] == pytest.approx(r1["candidate"]["window"], rel=1e-5)
    assert all(ev[who]["older"]["examples"] == ev[who]["older"]["commits"] == 10 for who in ev)
    # completions are scored on the window only (the older slice measures forgetting by its losses)
    assert all(ev[who]["older"]["fim_n"] == 0 and ev[who]["window"]["fim_n"] > 0 for who in ev)
    assert ev["base"]["older"]["changed_loss"] > ev["current"]["older"]["changed_loss"]  # trained on in round 1
    assert r2["gate"]["older_rel"] == pytest.approx(
        ev["candidate"]["older"]["changed_loss"] / ev["current"]["older"]["changed_loss"] - 1)
    assert r2["data"]["window_commits"] == 12 and r2["data"]["older_commits"] == 10

    # And directly: attaching in a fresh model loads v0001's saved tensors (not a fresh init), trainable.
    adapters = snapshot(world, "resume-check")
    registry.rollback(adapters, "v0001")
    cfg = {**R.DEFAULTS, **FAST}
    model, parent = R.attach_adapter(R.load_base(str(world["model"]), P.make_plan(world["model"]), torch),
                                     adapters, cfg)
    assert parent == "v0001"
    saved = load_file(str(adapters / "v0001" / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert set(saved) == set(loaded)
    for k, v in saved.items():
        assert torch.equal(loaded[k].cpu(), v), k
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # fresh LoRA has B == 0
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_gate_keeps_current_when_candidate_is_worse(world):
    adapters = snapshot(world, "gate")
    before = registry.current_version(adapters)
    tmp = world["root"] / "gate-round"
    tmp.mkdir()
    bad = write_shard(tmp / "bad.jsonl", make_records(24, 300, corrupt=True))
    result = run_inprocess(make_spec(tmp, world["model"], adapters, [bad], [], [world["eval"]],
                                     learning_rate=1e-2, epochs=2, replay_share=0.0))
    assert result["promoted"] is False and result["eval_loss_after"] > result["eval_loss_before"]
    assert result["gate"]["passed"] is False and result["gate"]["vs_current"]["changed_loss_rel"] > 0
    assert "not better" in result["gate"]["reason"]
    assert registry.current_version(adapters) == before
    versions = [v["version"] for v in registry.list_versions(adapters)]
    assert result["version"] in versions  # kept for inspection, just not promoted
    assert events(tmp / "progress.jsonl")[-1]["promoted"] is False

    # A margin gates too: a real improvement smaller than 90 % is not enough.
    tmp2 = world["root"] / "margin-round"
    tmp2.mkdir()
    result = run_inprocess(make_spec(tmp2, world["model"], adapters, [world["new"]], [], [world["eval"]],
                                     promote_margin=0.9, epochs=1))
    assert result["promoted"] is False and registry.current_version(adapters) == before
    assert "margin 90.0 %" in result["gate"]["reason"]


def test_gate_rejects_a_candidate_that_equals_current(world):
    """A/A: a round that changes nothing (learning rate 0) yields a candidate identical to current; the paired
    difference is exactly zero and its interval cannot exclude zero."""
    adapters = snapshot(world, "a-a")
    before = registry.current_version(adapters)
    tmp = world["root"] / "a-a-round"
    tmp.mkdir()
    result = run_inprocess(make_spec(tmp, world["model"], adapters, [world["new"]], [], [world["eval"]],
                                     learning_rate=0.0, max_steps=2))
    ev = result["evaluation"]
    assert ev["candidate"]["window"] == ev["current"]["window"]
    assert result["gate"]["vs_current"]["changed_loss_rel"] == 0.0
    assert result["promoted"] is False and registry.current_version(adapters) == before


def fp16_overflowing_model(src: Path, dst: Path) -> Path:
    """The tiny model with its last MLP scaled up: every weight still fits in float16 and float32 losses are
    ordinary, but the MLP's output exceeds float16's range (65504), as a model on an fp16 GPU can overflow."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(dst)
    with torch.no_grad():
        mlp = model.model.layers[-1].mlp
        mlp.c_fc.weight.mul_(100)
        mlp.c_proj.weight.mul_(1e4)
        assert max(float(p.abs().max()) for p in model.parameters()) < 65504
    model.save_pretrained(dst)
    return dst


def test_nonfinite_loss_fails_the_round(world):
    """A float16 overflow is a failed round (exit 1, error event "nonfinite"), never a silent "kept current":
    caught by the base model's evaluation when there is a window, by the training loop when there is none."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gitlora.trainer import evaluate, metrics, packed_attention
    from gitlora.trainer import round as R

    hot = fp16_overflowing_model(world["model"], world["root"] / "hot-model")
    tokenizer = AutoTokenizer.from_pretrained(hot)
    es = evaluate.prepare(make_records(4, 200), tokenizer, 1024, fim_samples=0)
    for dtype, finite in ((torch.float32, True), (torch.float16, False)):  # the overflow is float16's alone
        model = AutoModelForCausalLM.from_pretrained(hot, dtype=dtype).eval()
        packed_attention.enable(model)
        losses = evaluate.score_losses(model, es, 1, torch, torch.device("cpu"))
        assert (metrics.nonfinite(losses) == 0) is finite

    adapters = snapshot(world, "nonfinite")
    before = registry.current_version(adapters)
    versions = [v["version"] for v in registry.list_versions(adapters)]
    for name, eval_, where in (("with-window", [world["eval"]], "base model"), ("no-window", [], "training loss")):
        tmp = world["root"] / f"nonfinite-{name}"
        tmp.mkdir()
        proc = run_cli(make_spec(tmp, hot, adapters, [world["new"]], [], eval_, compute_dtype="float16"))
        assert proc.returncode == R.EXIT_FAIL, proc.stderr[-3000:]
        last = events(tmp / "progress.jsonl")[-1]
        assert last["event"] == "error" and last["reason"] == "nonfinite" and where in last["message"], last
        assert not any(e["event"] == "done" for e in events(tmp / "progress.jsonl"))
        assert registry.current_version(adapters) == before
        assert [v["version"] for v in registry.list_versions(adapters)] == versions  # nothing saved


def test_rollback_and_export_merged(world, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapters = snapshot(world, "rollback")
    assert registry.current_version(adapters) == "v0002"
    assert registry.rollback(adapters) == "v0001"  # None = the version v0002 was trained from
    assert registry.current_version(adapters) == "v0001"
    with pytest.raises(ValueError):
        registry.rollback(adapters)  # v0001 has no parent
    assert registry.rollback(adapters, "2") == "v0002"
    listed = registry.list_versions(adapters)
    assert [(v["version"], v["current"]) for v in listed] == [("v0001", False), ("v0002", True)]
    history = [json.loads(line) for line in (adapters / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history][-2:] == ["rollback", "rollback"]

    out = registry.export_merged(adapters, None, world["model"], tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<fim_middle>") == 2
    assert json.loads((out / "gitlora-export.json").read_text())["adapter_version"] == "v0002"
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["model"]),
                                    str(adapters / "v0002"))
    ids = torch.tensor([[5, 100, 6, 200, 300, 400, 12, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(world["model"])
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)


def test_sigkill_mid_round_leaves_current_intact(world):
    adapters = snapshot(world, "killed")
    before = registry.current_version(adapters)
    tmp = world["root"] / "kill-round"
    tmp.mkdir()
    spec = make_spec(tmp, world["model"], adapters, [world["new"]], [world["old"]], [world["eval"]],
                     max_steps=100_000)
    proc = subprocess.Popen([sys.executable, "-m", "gitlora.trainer", "--spec", str(spec)], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TRAINING_STARTS_S
        while time.monotonic() < deadline:
            if any(e["event"] == "progress" for e in events(tmp / "progress.jsonl")):
                break
            assert proc.poll() is None, "round exited before training"
            time.sleep(0.2)
        else:
            pytest.fail(f"no progress event within {TRAINING_STARTS_S} s")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert registry.current_version(adapters) == before
    assert [v["version"] for v in registry.list_versions(adapters)] == ["v0001", "v0002"]
    # simulate the worst instant too: killed while writing the version dir / swapping the link
    (adapters / ".tmp-v0003-12345").mkdir()
    (adapters / ".tmp-v0003-12345" / "adapter_model.safetensors").write_bytes(b"half")
    os.symlink("v0003", adapters / ".current.tmp-12345")
    assert registry.current_version(adapters) == before
    assert [v["version"] for v in registry.list_versions(adapters)] == ["v0001", "v0002"]
    assert registry.next_version_dir(adapters).name == "v0004"
    assert sorted(registry.clean_partial(adapters)) == [".current.tmp-12345", ".tmp-v0003-12345"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["model"]), str(adapters / "current"))


def test_sigterm_reports_terminated_and_a_second_round_is_refused(world):
    adapters = snapshot(world, "terminated")
    before = registry.current_version(adapters)
    tmp = world["root"] / "term-round"
    tmp.mkdir()
    spec = make_spec(tmp, world["model"], adapters, [world["new"]], [], [world["eval"]], max_steps=100_000)
    proc = subprocess.Popen([sys.executable, "-m", "gitlora.trainer", "--spec", str(spec)], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TRAINING_STARTS_S
        while not any(e["event"] == "progress" for e in events(tmp / "progress.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, "round never started training"
            time.sleep(0.2)
        from gitlora.trainer import round as R

        other = tmp / "other"
        other.mkdir()
        with pytest.raises(R.SpecError, match="another training round"):  # the adapters lock is held
            run_inprocess(make_spec(other, world["model"], adapters, [world["new"]]))
        proc.send_signal(signal.SIGTERM)  # handled between two torch ops: a slow step delays it
        assert proc.wait(timeout=ROUND_TIMEOUT_S) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = events(tmp / "progress.jsonl")[-1]
    assert last["event"] == "error" and last["reason"] == "terminated"
    assert registry.current_version(adapters) == before


def test_bad_spec_exits_nonzero_with_error_event(tmp_path):
    progress = tmp_path / "progress.jsonl"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base_model": str(tmp_path / "nope"), "adapters_dir": str(tmp_path / "a"),
                                "train_shards": [], "progress_file": str(progress), "train": {"device": "cpu"}}))
    from gitlora.trainer import round as R

    rc = R.main(["--spec", str(spec)])
    assert rc != 0
    err = events(progress)[-1]
    assert err["event"] == "error" and err["reason"] in ("spec", "exception")
