"""The hardware plan: QLoRA on an 8 GB Turing card for StarCoder2-3B, fp32 on CPU, honest arithmetic."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from gitlora.trainer import plan as P

STARCODER2_3B_CONFIG = {  # bigcode/starcoder2-3b config.json (the fields that matter)
    "architectures": ["Starcoder2ForCausalLM"], "model_type": "starcoder2", "hidden_size": 3072,
    "intermediate_size": 12288, "num_hidden_layers": 30, "num_attention_heads": 24, "num_key_value_heads": 2,
    "vocab_size": 49152, "max_position_embeddings": 16384, "tie_word_embeddings": True, "use_bias": True,
}


def test_plan_module_does_not_import_torch():
    code = "import sys, gitlora.trainer.plan, gitlora.trainer.registry, gitlora.trainer.data; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_known_sizes_match_published_param_counts():
    assert P.KNOWN_MODELS["starcoder2-3b"].params() == pytest.approx(3.03e9, rel=0.01)
    assert P.KNOWN_MODELS["starcoder2-7b"].params() == pytest.approx(7.17e9, rel=0.01)
    assert P.KNOWN_MODELS["starcoder2-15b"].params() == pytest.approx(15.96e9, rel=0.01)


def test_starcoder2_3b_on_8gb_turing_is_qlora_fp16_and_fits():
    plan = P.make_plan("bigcode/starcoder2-3b", vram_gb=8, compute_capability=7.5)
    assert plan.device == "cuda"
    assert plan.quantization == "nf4"
    assert plan.compute_dtype == "float16"  # Turing has no bf16
    assert plan.gradient_checkpointing
    assert plan.attention == "sdpa"
    assert plan.fits and plan.estimated_peak_gb <= 7.5
    assert plan.context_length >= 1024
    assert set(plan.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"}
    terms = {name: gb for name, gb, _ in plan.breakdown}
    assert sum(terms.values()) == pytest.approx(plan.estimated_peak_gb, abs=0.01)
    # weights: 2.88B quantised linear weights at 4.127 bits + 0.15B embeddings/biases in fp16
    assert 1.5 < terms["weights"] < 1.8
    assert terms["cuda"] >= 0.5
    text = P.format_plan(plan)
    for needle in ("nf4", "float16", "checkpointing on", "weights", "lora", "total", "fits"):
        assert needle in text


def test_ampere_uses_bf16_and_cpu_falls_back_to_fp32():
    assert P.make_plan("starcoder2-3b", vram_gb=8, compute_capability=8.6).compute_dtype == "bfloat16"
    cpu = P.make_plan("starcoder2-3b")
    assert (cpu.device, cpu.quantization, cpu.compute_dtype) == ("cpu", None, "float32")
    assert "cpu" in P.format_plan(cpu)


def test_big_gpu_skips_quantisation_and_tiny_gpu_says_it_does_not_fit():
    assert P.make_plan("starcoder2-3b", vram_gb=80, compute_capability=9.0).quantization is None
    small = P.make_plan("starcoder2-15b", vram_gb=4, compute_capability=7.5)
    assert not small.fits and "DOES NOT FIT" in P.format_plan(small)


def test_shape_from_local_config_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(STARCODER2_3B_CONFIG))
    shape = P.model_shape(tmp_path)
    assert shape.params() == P.KNOWN_MODELS["starcoder2-3b"].params()
    assert P.make_plan(tmp_path, 8, 7.5).estimated_peak_gb == \
        P.make_plan("starcoder2-3b", 8, 7.5).estimated_peak_gb


def test_detect_gpu_absent_and_parsed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert P.detect_gpu() is None
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA GeForce RTX 2070 SUPER, 8192, 512, 7.5'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    gpu = P.detect_gpu()
    assert gpu == P.GpuInfo("NVIDIA GeForce RTX 2070 SUPER", 8.0, 0.5, 7.5)
    plan = P.auto_plan("starcoder2-3b")
    assert plan.quantization == "nf4" and plan.estimated_peak_gb <= 7.5 and plan.budget_gb < 7.5
    assert P.auto_plan("starcoder2-3b", device="cpu").device == "cpu"
    assert os.environ["PATH"] == str(tmp_path)


# --------------------------------------------------------------------------------- duration and budget
def test_prior_rate_follows_compute_per_token_and_device():
    cpu3b = P.make_plan("starcoder2-3b")
    assert P.flops_per_token(cpu3b) == 4 * cpu3b.params  # no checkpointing on CPU: forward + backward
    two, eight = P.prior_tokens_per_s(cpu3b, cores=2), P.prior_tokens_per_s(cpu3b, cores=8)
    assert eight == pytest.approx(4 * two)
    assert P.prior_tokens_per_s(cpu3b, cores=10_000) == P.prior_tokens_per_s(cpu3b, cores=P.CPU_MAX_CORES)
    assert 0.5 < two < 5  # a 3B model in fp32 on two cores: a few tokens per second
    turing = P.make_plan("starcoder2-3b", vram_gb=8, compute_capability=7.5)  # nf4 + checkpointing
    assert P.flops_per_token(turing) == 6 * turing.params
    rate = P.prior_tokens_per_s(turing, compute_capability=7.5)
    assert rate == pytest.approx(12e12 * P.NF4_SLOWDOWN / (6 * turing.params))
    assert 100 * two < rate
    hopper = P.make_plan("starcoder2-3b", vram_gb=141, compute_capability=9.0)
    assert P.prior_tokens_per_s(hopper, compute_capability=9.0) > 10 * rate


def test_a_measured_rate_counts_only_for_the_same_model_device_and_precision():
    plan = P.make_plan("starcoder2-3b")
    metrics = {"plan": plan.to_dict(), "budget": {"read_tokens_per_s": 3.5}}
    assert P.measured_tokens_per_s(metrics, plan) == 3.5
    assert P.measured_tokens_per_s(metrics, P.make_plan("starcoder2-7b")) is None
    assert P.measured_tokens_per_s(metrics, P.make_plan("starcoder2-3b", 8, 7.5)) is None
    assert P.measured_tokens_per_s({"plan": plan.to_dict()}, plan) is None  # a round from before budgets
    assert P.measured_tokens_per_s(None, plan) is None


def test_budget_cap_is_the_smaller_of_tokens_and_seconds_at_the_rate():
    assert P.budget_cap(None, 10.0) == 0 and P.budget_cap({"max_tokens": 0, "max_seconds": 0}, 10.0) == 0
    assert P.budget_cap({"max_seconds": 3600}, 2.5) == 9000
    assert P.budget_cap({"max_tokens": 5000, "max_seconds": 3600}, 2.5) == 5000
    assert P.budget_cap({"max_tokens": 50_000, "max_seconds": 3600}, 2.5) == 9000
    # the round's total includes replay and epochs; the inverse gives the new tokens that fit
    assert P.round_tokens(700, replay_share=0.3, epochs=2) == 2000
    assert P.new_tokens_within(2000, replay_share=0.3, epochs=2) == 700


def test_newest_commits_within_the_budget_whole_commits_newest_first():
    commits = [("a", 100.0, 40), ("c", 300.0, 30), ("b", 200.0, 50), ("d", 400.0, 20)]
    assert P.newest_within(commits, 0) == (["d", "c", "b", "a"], [])
    assert P.newest_within(commits, 50) == (["d", "c"], ["b", "a"])
    assert P.newest_within(commits, 99) == (["d", "c", "a"], ["b"])  # b (50) does not fit in the 49 left: a does
    assert P.newest_within(commits, 100) == (["d", "c", "b"], ["a"])
    assert P.newest_within(commits, 120) == (["d", "c", "b"], ["a"])
    assert P.newest_within([("big", 1.0, 10_000), ("old", 0.0, 1)], 5) == (["big"], ["old"])  # always progress


def test_a_large_commit_is_passed_over_and_the_search_is_bounded():
    # newest first: 10 tokens, then a 1,000-token commit, then twenty of 10: the big one waits, the budget fills
    commits = [("new", 100.0, 10), ("big", 99.0, 1000)] + [(f"o{i}", 98.0 - i, 10) for i in range(20)]
    taken, deferred = P.newest_within(commits, 100)
    assert taken == ["new"] + [f"o{i}" for i in range(9)] and deferred[0] == "big"
    assert sorted(taken + deferred) == sorted(c for c, _, _ in commits)
    looked = []

    def lazy(commit, n):
        def count(room):
            looked.append(commit)
            return n
        return count

    many_big = [("new", 100.0, 10)] + [(f"b{i}", 99.0 - i, 1000) for i in range(40)] + [("old", 1.0, 10)]
    taken, deferred = P.newest_within([(c, t, lazy(c, n)) for c, t, n in many_big], 100, max_skipped=4)
    assert taken == ["new"] and looked == ["new", "b0", "b1", "b2", "b3"]  # stops looking after 4 passed over
    assert deferred == [c for c, _, _ in many_big[1:]]  # newest first, nothing lost
    looked.clear()
    full = [("a", 3.0, 50), ("b", 2.0, 50), ("c", 1.0, 10)]
    assert P.newest_within([(c, t, lazy(c, n)) for c, t, n in full], 100) == (["a", "b"], ["c"])
    assert looked == ["a", "b"]  # a full budget tokenises no further


def test_select_by_budget_keeps_records_of_the_newest_commits_and_reports_the_rest():
    records = [{"commit": f"c{i}", "commit_time": 1000 + i, "n": 10} for i in range(10)]
    records += [{"commit": "c9", "commit_time": 1009, "n": 10}]  # a commit with two examples
    counted = []

    def count(r):
        counted.append(r["commit"])
        return r["n"]

    kept, report = P.select_by_budget(records, count, {"max_tokens": 0, "max_seconds": 0}, 5.0, 0.0, 1.0)
    assert kept == records and report["deferred_commits"] == [] and counted == []  # no budget: no tokenising
    # 10 s at 5 tokens/s, planned at TIME_BUDGET_FILL of the rate: 45 tokens
    kept, report = P.select_by_budget(records, count, {"max_tokens": 0, "max_seconds": 10}, 5.0, 0.0, 1.0)
    assert P.TIME_BUDGET_FILL == 0.9 and report["tokens_per_s"] == 5.0
    assert report["cap_tokens"] == 45 and report["covered_commits"] == ["c9", "c8", "c7"]
    assert [r["commit"] for r in kept] == ["c7", "c8", "c9", "c9"]  # their order kept
    assert report["deferred_commits"] == ["c6", "c5", "c4", "c3", "c2", "c1", "c0"] and report["planned_tokens"] == 40
    _, report = P.select_by_budget(records, count, {"max_tokens": 0, "max_seconds": 10}, 50 / 9, 0.0, 1.0)
    assert report["covered_commits"] == ["c9", "c8", "c7", "c6"]  # a rate that plans 50 tokens takes 50
    _, report = P.select_by_budget(records, count, {"max_tokens": 120, "max_seconds": 0}, 5.0, 0.5, 2.0)
    assert report["covered_commits"] == ["c9", "c8"]  # 120 tokens = 30 new (c9: 20, c8: 10) x 2 replay x 2 epochs
    _, report = P.select_by_budget(records, count, {"max_tokens": 116, "max_seconds": 0}, 5.0, 0.5, 2.0)
    assert report["covered_commits"] == ["c9"]
    _, report = P.select_by_budget(records, count, {"max_tokens": 1, "max_seconds": 0}, 5.0, 0.5, 2.0)
    assert report["covered_commits"] == ["c9"]  # a budget below one commit still trains the newest, never all


def test_a_commit_too_big_for_the_budget_is_not_counted_whole():
    # the newest commit takes 30 of 45 tokens; the next holds 100 records of 10: counting it stops past the
    # 15 left (two records), and the older commit that fits is still taken
    records = [{"commit": "new", "commit_time": 3, "n": 30}]
    records += [{"commit": "big", "commit_time": 2, "n": 10} for _ in range(100)]
    records += [{"commit": "old", "commit_time": 1, "n": 10}]
    counted = []

    def count(r):
        counted.append(r["commit"])
        return r["n"]

    kept, report = P.select_by_budget(records, count, {"max_tokens": 45, "max_seconds": 0}, 5.0, 0.0, 1.0)
    assert report["covered_commits"] == ["new", "old"] and report["deferred_commits"] == ["big"]
    assert counted == ["new", "big", "big", "old"] and report["planned_tokens"] == 40


def test_budget_reached_and_durations_for_people():
    assert P.budget_reached(10, 1.0, None) is None
    assert P.budget_reached(10, 1.0, {"max_tokens": 10, "max_seconds": 0}) == "max_tokens"
    assert P.budget_reached(9, 1.0, {"max_tokens": 10, "max_seconds": 1.0}) == "max_seconds"
    assert P.budget_reached(9, 0.9, {"max_tokens": 10, "max_seconds": 1.0}) is None
    assert [P.format_duration(s) for s in (45, 720, 3.5 * 3600, 6.2 * 86400)] == ["45 s", "12 min", "3.5 h",
                                                                                  "6.2 days"]


# ----------------------------------------------------------------------- the trainer keeps to its budget
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from gitlora.trainer import tiny

    return tiny.build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def budget_round(tmp_path, model, budget: dict, commits: int = 20, epochs: int = 1, left_out_newest: int = 0):
    from test_trainer_round import events, make_records, make_spec, run_cli, write_shard

    records = make_records(commits, 0)  # one example per commit, commit_time rising with the index
    for r in records[len(records) - left_out_newest:]:  # test code its sample weight leaves out
        r.update(test=True, sample_weight=0.0)
    spec = make_spec(tmp_path, model, tmp_path / "adapters", [write_shard(tmp_path / "train.jsonl", records)],
                     epochs=epochs, fim_share=0.0, grad_accum=1)
    body = json.loads(spec.read_text())
    spec.write_text(json.dumps({**body, "budget": budget}))
    proc = run_cli(spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = events(tmp_path / "progress.jsonl")
    newest_first = [r["commit"] for r in sorted(records, key=lambda r: -r["commit_time"])]
    return ev, newest_first


def test_a_round_trains_the_newest_commits_that_fit_its_token_budget(tmp_path, tiny_model):
    ev, newest_first = budget_round(tmp_path, tiny_model, {"max_tokens": 1500, "max_seconds": 0})
    start, done = ev[0], ev[-1]
    budget = done["budget"]
    covered, deferred = budget["covered_commits"], budget["deferred_commits"]
    assert 0 < len(covered) < len(newest_first)
    assert sorted(covered + deferred) == sorted(newest_first)  # whole commits; the rest left for later rounds
    assert covered[0] == newest_first[0] and covered == [c for c in newest_first if c in covered]
    assert deferred == [c for c in newest_first if c in deferred]  # newest first
    assert start["examples"] == len(covered) and budget["cap_tokens"] == 1500
    assert budget["planned_tokens"] <= 1500 and budget["stopped_by"] is None
    assert budget["read_tokens"] <= 1500 * 1.1 and budget["read_tokens_per_s"] > 0
    # nothing to replay (a first round): the new commits get the whole budget, not the 70 % replay leaves them
    assert start["replayed"] == 0 and budget["read_tokens"] > 1500 * 0.8
    metrics = json.loads((tmp_path / "adapters" / done["version"] / "metrics.json").read_text())
    assert metrics["budget"] == budget and metrics["steps"] == start["total"]


def test_a_round_leaves_out_what_its_sample_weights_do_and_budgets_only_the_rest(tmp_path, tiny_model):
    ev, newest_first = budget_round(tmp_path, tiny_model, {"max_tokens": 1500, "max_seconds": 0},
                                    left_out_newest=5)
    start, done = ev[0], ev[-1]
    covered = done["budget"]["covered_commits"]
    assert covered[:5] == newest_first[:5] and len(covered) > 5  # left out: no budget spent on them
    assert start["left_out_by_weight"] == 5 and start["examples"] == len(covered) - 5
    assert done["budget"]["planned_tokens"] <= 1500
    metrics = json.loads((tmp_path / "adapters" / done["version"] / "metrics.json").read_text())
    assert metrics["left_out_by_weight"] == 5 and metrics["examples"] == len(covered) - 5


def test_a_round_stops_its_loop_at_the_time_budget_and_records_it(tmp_path, tiny_model):
    ev, newest_first = budget_round(tmp_path, tiny_model, {"max_tokens": 0, "max_seconds": 1e-6}, commits=4,
                                      epochs=3)
    start, done = ev[0], ev[-1]
    stop = [e for e in ev if e["event"] == "budget"]
    assert stop and stop[0]["reached"] == "max_seconds" and stop[0]["step"] == 1
    assert done["budget"]["stopped_by"] == "max_seconds"
    assert done["budget"]["covered_commits"] == newest_first[:1]  # the newest commit, read once before the stop
    assert [e["step"] for e in ev if e["event"] == "progress"] == [1] and start["total"] > 1


def test_a_step_capped_round_keeps_only_the_commits_its_steps_reach_and_counts_no_further():
    """max_steps bounds what a round reads: commits beyond it are deferred (trained later, newest first), not
    marked trained; and only the commits the selection reaches are tokenised (a backfill's first round would
    otherwise tokenise the whole history to train a few steps)."""
    records = [{"commit": f"c{i}", "commit_time": 1000 + i} for i in range(100)]
    counted = []

    def count(r):
        counted.append(r["commit"])
        return 10

    # 60 tokens a round, 1/3 of them replay: 40 new tokens = the 4 newest commits; epochs do not apply
    kept, report = P.select_by_budget(records, count, None, 5.0, 1 / 3, 3.0, step_tokens=60)
    assert report["covered_commits"] == ["c99", "c98", "c97", "c96"] and len(report["deferred_commits"]) == 96
    assert [r["commit"] for r in kept] == ["c96", "c97", "c98", "c99"]
    assert counted == ["c99", "c98", "c97", "c96"]  # a full budget ends the count
    assert report["planned_tokens"] == 60 and report["step_tokens"] == 60
    # the smaller of the two bounds wins
    _, report = P.select_by_budget(records, count, {"max_tokens": 30, "max_seconds": 0}, 5.0, 0.0, 1.0,
                                   step_tokens=60)
    assert report["covered_commits"] == ["c99", "c98", "c97"]
    kept, report = P.select_by_budget(records, count, None, 5.0, 0.0, 1.0, step_tokens=0)
    assert kept == records and report["deferred_commits"] == []  # no bound at all: everything


def test_coverage_counts_a_commit_trained_only_when_every_example_of_it_was_read():
    # Examples 0-1 are c3's, 2 is c2's, 3-4 are c1's; blocks read: [0, 2] and [3]. c0 had nothing trainable.
    example_commits = ["c3", "c3", "c2", "c1", "c1", "old"]  # "old": a replayed example, not a selected commit
    covered, unread = P.coverage(["c3", "c2", "c1", "c0"], example_commits, [[0, 2], [3]])
    assert covered == ["c2", "c0"] and unread == ["c3", "c1"]
    assert P.coverage(["c3", "c2", "c1"], example_commits, [[0, 1, 2, 3, 4]]) == (["c3", "c2", "c1"], [])
    assert P.coverage(["c3"], example_commits, []) == ([], ["c3"])
