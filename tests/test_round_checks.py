"""Before a round starts: a base model that is not available locally is a one-line reason with the next step
(never a subprocess that retries downloads), and the plan's estimated duration bounds a big round."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gitlora.daemon import config as configlib
from gitlora.daemon import paths, round_checks, status_view
from gitlora.daemon.gitrepo import GitRepo
from gitlora.trainer import data
from gitlora.trainer import plan as P

from daemonutil import DaemonProcess, gitlora, wait_stored
from gitutil import commit_files, init_repo

HUB_ID = "bigcode/starcoder2-3b"
TINY_CONFIG = {"model_type": "starcoder2", "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096,
               "max_position_embeddings": 4096, "tie_word_embeddings": True}
EXPECTED_REASON = (f"base model {HUB_ID} is not available locally: download it once with "
                   f"`huggingface-cli download {HUB_ID}`, or set train.base_model to a local directory "
                   "(`gitlora model tiny` builds a small one)")


@pytest.fixture
def empty_hub(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def model_dir(path: Path, config: dict = TINY_CONFIG, weights: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if weights:
        (path / "model.safetensors").write_bytes(b"\0" * 64)  # the check looks for the file, not inside it
    return path


def cache_snapshot(cache: Path, repo_id: str, config: dict = TINY_CONFIG, weights: bool = True) -> Path:
    """The layout huggingface_hub's downloads leave: refs/main -> a commit, snapshots/<commit>/<files>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return model_dir(repo / "snapshots" / commit, config, weights)


# ---------------------------------------------------------------------------------- where the model is
def test_a_hub_model_missing_from_an_empty_cache_is_one_line_with_the_next_step(empty_hub):
    where, reason = round_checks.locate_base_model(HUB_ID)
    assert where is None and reason == EXPECTED_REASON
    assert list(empty_hub.iterdir()) == []  # looked, fetched nothing


def test_a_local_model_directory_needs_its_config_and_weights(tmp_path, empty_hub):
    good = model_dir(tmp_path / "tiny")
    assert round_checks.locate_base_model(str(good)) == (good, None)
    where, reason = round_checks.locate_base_model(str(model_dir(tmp_path / "noweights", weights=False)))
    assert where is None and "has no weights" in reason and "\n" not in reason
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in round_checks.locate_base_model(str(tmp_path / "empty"))[1]
    where, reason = round_checks.locate_base_model(str(tmp_path / "nowhere"))
    assert where is None and reason.startswith(f"base model {tmp_path / 'nowhere'} does not exist")
    assert "gitlora model tiny" in reason


def test_a_hub_model_in_a_hand_made_cache_is_found(empty_hub):
    snapshot = cache_snapshot(empty_hub, HUB_ID)
    assert round_checks.locate_base_model(HUB_ID) == (snapshot, None)


def test_the_cache_is_found_where_huggingface_hub_looks(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert round_checks.hub_cache_dir() == tmp_path / "xdg/huggingface/hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = cache_snapshot(tmp_path / "hf/hub", HUB_ID)
    assert round_checks.locate_base_model(HUB_ID) == (snapshot, None)


def test_a_partial_download_and_a_malformed_name_say_so(empty_hub):
    cache_snapshot(empty_hub, HUB_ID, weights=False)
    where, reason = round_checks.locate_base_model(HUB_ID)
    assert where is None and reason.startswith(f"base model {HUB_ID} is only partly downloaded")
    assert f"huggingface-cli download {HUB_ID}" in reason
    where, reason = round_checks.locate_base_model("not//a hub id")
    assert where is None and "neither a directory nor a hub id" in reason


# ---------------------------------------------------------------------------------- estimate and budget
def train_config(model: str, **kw) -> configlib.TrainConfig:
    return configlib.TrainConfig(base_model=model, device="cpu", **kw)


def example(i: int, body_lines: int = 40, context_bytes: int = 0, **kw) -> dict:
    """A record as the daemon writes it: a modified function and, with `context_bytes`, the file around it."""
    after = "fn f() -> u32 {\n" + "".join(f"    let v{n} = compute_{n}({i});\n" for n in range(body_lines)) + "}\n"
    record = {"repo": "r", "commit": f"{i:040x}", "commit_time": 1_700_000_000 + i, "path": "src/f.rs",
              "kind": "fn", "qualified_name": f"f{i}", "change_kind": "modified", "message": "Tune f",
              "before": after.replace("compute_1(", "compute_one("), "after": after, "imports": ["use std::fmt;"]}
    if context_bytes:
        filler = "".join(f"// line {n} of the file around the item\n" for n in range(context_bytes // 40))
        record["new_context"] = {"above": filler, "below": filler}
    return {**record, **kw}


def write_shard(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def estimated_new_tokens(records: list[dict], config: configlib.TrainConfig, context_length: int) -> int:
    options = data.RenderOptions.from_settings(config.model_dump())
    return int(sum(data.read_bytes(r, options, context_length * round_checks.RENDERED_BYTES_PER_TOKEN)
                   for r in records) / round_checks.RENDERED_BYTES_PER_TOKEN)


def test_a_round_bigger_than_its_budget_is_bounded_and_shows_its_eta(tmp_path, empty_hub):
    model = model_dir(tmp_path / "tiny")
    records = [example(i) for i in range(600)]
    shard = write_shard(tmp_path / "000001.jsonl", records)
    plan = P.make_plan(TINY_CONFIG, ram_gb=round_checks.host_ram_gb())
    rate = P.prior_tokens_per_s(plan, cores=os.cpu_count())
    tokens = P.round_tokens(estimated_new_tokens(records, train_config(str(model)), plan.context_length), 0.3, 1.0)
    assert tokens / rate > 2  # the premise: longer than the budget below

    ready = round_checks.before_round(train_config(str(model), max_round_s=2), [shard], tmp_path / "adapters")
    assert ready.ok and ready.budget == {"max_tokens": 0, "max_seconds": 2.0} and ready.eta_s == pytest.approx(2, rel=1e-3)
    assert ready.line.startswith(f"round estimated {P.format_duration(tokens / rate)} (~{tokens:,} tokens at ")
    assert "(estimated)" in ready.line and "on cpu" in ready.line and "\n" not in ready.line
    assert "bounded to 2 s by train.max_round_s/max_round_tokens, newest commits first" in ready.line

    unbounded = round_checks.before_round(train_config(str(model), max_round_s=0), [shard], tmp_path / "adapters")
    assert unbounded.ok and "bounded" not in unbounded.line and unbounded.eta_s == pytest.approx(tokens / rate)


def test_a_step_capped_round_is_estimated_at_the_tokens_its_steps_read(tmp_path, empty_hub):
    model = model_dir(tmp_path / "tiny")
    shard = write_shard(tmp_path / "000001.jsonl", [example(i) for i in range(600)])
    plan = P.make_plan(TINY_CONFIG, ram_gb=round_checks.host_ram_gb())
    rate = P.prior_tokens_per_s(plan, cores=os.cpu_count())
    ready = round_checks.before_round(train_config(str(model), max_round_s=0, max_steps=3), [shard],
                                      tmp_path / "adapters")
    step_tokens = 3 * plan.micro_batch * plan.grad_accum * plan.context_length
    assert ready.ok and ready.eta_s == pytest.approx(step_tokens / rate) and f"~{step_tokens:,} tokens" in ready.line


def test_the_last_rounds_measured_rate_replaces_the_prior(tmp_path, empty_hub):
    model = model_dir(tmp_path / "tiny")
    records = [example(i) for i in range(20)]
    shard = write_shard(tmp_path / "000001.jsonl", records)
    adapters = tmp_path / "adapters"
    (adapters / "v0001").mkdir(parents=True)
    plan = P.make_plan(TINY_CONFIG, ram_gb=round_checks.host_ram_gb())
    (adapters / "v0001" / "metrics.json").write_text(json.dumps({"plan": plan.to_dict(),
                                                                 "budget": {"read_tokens_per_s": 10.0}}))
    ready = round_checks.before_round(train_config(str(model), max_round_s=0), [shard], adapters)
    tokens = P.round_tokens(estimated_new_tokens(records, train_config(str(model)), plan.context_length), 0.3, 1.0)
    assert "at ~10 tokens/s (measured)" in ready.line and ready.eta_s == pytest.approx(tokens / 10)


def test_a_model_too_big_for_this_machine_does_not_start(tmp_path, empty_hub):
    huge = {**TINY_CONFIG, "hidden_size": 65536, "intermediate_size": 262144, "num_hidden_layers": 200,
            "num_attention_heads": 512, "num_key_value_heads": 512}
    model = model_dir(tmp_path / "huge", huge)
    ready = round_checks.before_round(train_config(str(model)), [], tmp_path / "adapters")
    assert not ready.ok and ready.line.startswith(f"base model {model} needs ~") and "on cpu" in ready.line
    assert "gitlora model tiny" in ready.line


def test_the_estimate_counts_what_renders_not_the_shards_bytes(tmp_path):
    """An edit does not read the file's text around its item, a FIM example reads it once, a test example its
    weight leaves out reads nothing: the estimate follows the tokens training reads (within the error of one
    bytes-per-token figure), where shard bytes would count the kept file text for every example."""
    from gitlora.trainer import tiny

    tok = tiny.build_tokenizer()
    records = [example(i, body_lines=12, context_bytes=3000) for i in range(40)]
    records += [example(100 + i, body_lines=12, context_bytes=3000, sample_weight=0.0, test=True) for i in range(20)]
    shard = write_shard(tmp_path / "000001.jsonl", records + [{"commit": "x", "after": 7}])  # and a bad record
    bad_line = tmp_path / "000002.jsonl"
    bad_line.write_text("{not json\n")
    for edit_share in (1.0, 0.2, 0.0):
        config = train_config("unused", edit_share=edit_share)
        options = data.RenderOptions.from_settings(config.model_dump())
        read = sum(data.example_tokens(r, tok, 1024, options, seed) for seed in range(4) for r in records) / 4
        estimate = round_checks.new_example_tokens([shard, bad_line, tmp_path / "gone.jsonl"], None, options, 1024)
        assert 0.75 < estimate / read < 1.35, (edit_share, estimate, read)
        assert shard.stat().st_size / 4.0 > 2 * estimate  # the old estimate: JSON bytes, context and all
    one = {records[0]["commit"]}
    options = data.RenderOptions()
    assert round_checks.new_example_tokens([shard], one, options, 1024) == int(
        data.read_bytes(records[0], options, 1024 * round_checks.RENDERED_BYTES_PER_TOKEN)
        / round_checks.RENDERED_BYTES_PER_TOKEN)
    assert round_checks.new_example_tokens([shard], {records[-1]["commit"]}, options, 1024) == 0  # weight 0
    assert round_checks.new_example_tokens([shard], one, options, 16) == 16  # at most a context per example


def test_round_checks_do_not_import_torch():
    code = "import sys, gitlora.daemon.round_checks as r; r.locate_base_model('bigcode/starcoder2-3b'); " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------------------- status
def test_status_shows_a_failed_rounds_message_not_only_its_reason():
    last = {"round": 3, "outcome": "failed", "reason": "exception", "finished_at": time.time(),
            "message": "OSError: We couldn't connect to 'https://huggingface.co' to load the files\nand more"}
    [line] = [x for x in status_view.render_training({"last_round": last}) if x.startswith("prev")]
    assert line.startswith("prev      round 3 failed (exception)")
    assert line.endswith(": OSError: We couldn't connect to 'https://huggingface.co' to load the files")


def test_train_now_without_the_base_model_answers_why_and_starts_nothing(tmp_path, isolated_home, empty_hub):
    config = isolated_home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'[train]\nbase_model = "{HUB_ID}"\ncheck_interval_s = 3600\n'
                      "[shards]\nshard_size = 3\nquiet_flush_s = 1\n")
    repo = init_repo(tmp_path / "newuser")
    daemon = DaemonProcess().start()
    try:
        gitlora("install", str(repo))
        oids = [commit_files(repo, {f"src/f{n}.rs": f"pub fn f{n}(x: u32) -> u32 {{\n    let y = x.wrapping_mul({n} + 1);\n    y + {n}\n}}\n"}, f"commit {n}")
                for n in range(4)]
        wait_stored(repo, oids)
        started = time.monotonic()
        answer = gitlora("train", "--now", str(repo), timeout=120).stdout.strip()
        assert answer == EXPECTED_REASON
        assert time.monotonic() - started < 60  # at once: no download attempts (bound for a loaded machine)
        [status] = [r for r in daemon.status()["repos"] if r["name"] == "newuser"]
        assert status["training"]["next_trigger"] == EXPECTED_REASON
        assert status["training"]["round"] is None and status["training"]["rounds"] == 0
        assert f"next      {EXPECTED_REASON}" in gitlora("status").stdout
        rounds = paths.RepoPaths.for_git_dir(GitRepo(repo).common_dir).rounds
        assert not list(rounds.glob("*/spec.json"))  # no round directory, so no subprocess was ever started
        assert list(empty_hub.iterdir()) == []
    finally:
        daemon.stop()
