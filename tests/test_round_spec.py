"""One definition of a round's settings, spec and outcomes (trainer/spec.py): the config, the trainer and the
daemon agree on every default, and the config keeps its strict, bounded validation for them."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from gitlora.daemon import config as config_mod
from gitlora.daemon.config import Config, ConfigError, TrainConfig
from gitlora.trainer import spec


def test_config_and_trainer_defaults_are_the_spec_defaults():
    from gitlora.trainer import round as trainer_round

    assert trainer_round.DEFAULTS is spec.DEFAULTS
    assert Config().train.round_settings().model_dump() == spec.DEFAULTS
    for name, info in spec.RoundSettings.model_fields.items():
        mine = TrainConfig.model_fields[name]  # inherited, not restated
        assert (mine.annotation, mine.default, mine.metadata) == (info.annotation, info.default, info.metadata), name
    assert spec.DEFAULTS["promote_margin"] == 0.0
    # the spec's settings validate what the trainer reads; the daemon's scheduling keys are not among them
    assert "cooldown_s" not in spec.DEFAULTS and "min_new_examples" not in spec.DEFAULTS


def test_every_number_is_bounded_and_settings_are_strict():
    for name, info in spec.RoundSettings.model_fields.items():
        if info.annotation in (int, float):
            rule = config_mod.allowed(info)
            assert any(bound in rule for bound in (" to ", "at most", "below")), (name, rule)
    for text, key in (("lora_r = true", "train.lora_r"), ("learning_rate = inf", "train.learning_rate"),
                      ("window_commits = 1.5", "train.window_commits"), ('device = "tpu"', "train.device"),
                      ("max_round_s = nan", "train.max_round_s")):
        with pytest.raises(ConfigError, match=f"^f: {key}: "):
            config_mod.from_dict(__import__("tomllib").loads(f"[train]\n{text}\n"), "f")
    with pytest.raises(Exception):
        spec.RoundSpec.model_validate({"base_model": "m", "adapters_dir": "/a", "train": {"lora_r": "8"}})
    assert math.isfinite(spec.RoundSpec.model_validate({"base_model": "m", "adapters_dir": "/a"}).budget.max_seconds)


def test_removed_and_deprecated_threshold_keys_say_what_to_do():
    with pytest.raises(ConfigError, match=r"^f: shards.eval_fraction: no longer used: .*window_commits"):
        config_mod.from_dict({"shards": {"eval_fraction": 0.1}}, "f")
    with pytest.raises(ConfigError, match=r"^f: train.min_new_shards and train.min_new_examples both set"):
        config_mod.from_dict({"train": {"min_new_shards": 2, "min_new_examples": 5}}, "f")
    legacy = config_mod.from_dict({"train": {"min_new_shards": 2}, "shards": {"shard_size": 100}})
    assert legacy.min_new_examples() == 200 and "min_new_shards = 2" in config_mod.to_toml(legacy)
    assert Config().min_new_examples() == 1024 and "min_new_shards" not in config_mod.to_toml(Config())


def test_exit_codes_and_reasons():
    assert [spec.exit_reason(c) for c in (1, 2, 3, 143, -9, -15, 7)] == [
        "exception", "spec", "oom", "terminated", "killed", "terminated", "exit 7"]


def test_the_daemon_side_imports_no_torch_and_no_cycle():
    code = ("import sys; import gitlora.daemon.training_jobs, gitlora.daemon.config; "
            "assert 'torch' not in sys.modules and 'gitlora.daemon.service' not in sys.modules; "
            "import gitlora.daemon.service; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fim_share_is_deprecated_for_edit_share():
    from gitlora.trainer import data

    assert data.RenderOptions.from_settings(spec.DEFAULTS) == data.RenderOptions(
        edit_share=spec.DEFAULTS["edit_share"], copied_weight=spec.DEFAULTS["copied_token_weight"],
        context_weight=spec.DEFAULTS["context_token_weight"])
    legacy = config_mod.from_dict({"train": {"fim_share": 0.3}}, "f")  # an old config still loads, as it meant
    settings = legacy.train.round_settings().model_dump()
    assert data.RenderOptions.from_settings(settings).edit_share == pytest.approx(0.7)
    assert "fim_share = 0.3" in config_mod.to_toml(legacy) and "fim_share" not in config_mod.to_toml(Config())
    # an old spec (its train section carries fim_share; edit_share comes from the defaults) trains as it meant
    assert data.RenderOptions.from_settings({**spec.DEFAULTS, "fim_share": 1.0}).edit_share == 0.0
    with pytest.raises(ConfigError, match=r"^f: train.fim_share and train.edit_share both set: keep edit_share"):
        config_mod.from_dict({"train": {"fim_share": 0.3, "edit_share": 0.5}}, "f")
    with pytest.raises(ConfigError, match=r"^f: train.edit_share: "):
        config_mod.from_dict({"train": {"edit_share": 1.5}}, "f")
