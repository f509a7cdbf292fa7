"""Config validation and the CLI's user-facing behaviour, run as real subprocesses."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gitlora.daemon import config as config_mod
from gitlora.daemon import paths
from gitlora.daemon.demo_repo import build_demo_repo


def gitlora(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gitlora.daemon", *args], capture_output=True, text=True)


def test_defaults_and_round_trip():
    config = config_mod.load()
    assert config.train.replay_share == 0.3
    again = config_mod.from_dict(__import__("tomllib").loads(config_mod.to_toml(config)))
    assert again == config


@pytest.mark.parametrize("toml,key", [
    ("[train]\nreplay_share = 1.5\n", "train.replay_share"),
    ("[ingest]\nbatch_commits = 'many'\n", "ingest.batch_commits"),
    ("[shards]\nshrad_size = 3\n", "shards.shrad_size"),
    ("[nonsense]\n", "nonsense"),
])
def test_bad_value_is_one_line_naming_the_key(toml, key):
    path = paths.config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml)
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.load()
    message = str(caught.value)
    assert "\n" not in message and f": {key}:" in message and str(path) in message
    done = gitlora("config")
    assert done.returncode == 2 and key in done.stderr and "Traceback" not in done.stderr


def test_invalid_toml_is_a_clear_error():
    path = paths.config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[train\n")
    done = gitlora("config")
    assert done.returncode == 2 and "not valid TOML" in done.stderr


def test_config_prints_the_effective_config():
    path = paths.config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[train]\nmin_new_shards = 7\n")
    done = gitlora("config")
    assert done.returncode == 0
    assert "min_new_shards = 7" in done.stdout and "replay_share = 0.3" in done.stdout


def test_backfill_stats_examples_from_the_command_line(tmp_path):
    repo = build_demo_repo(tmp_path / "demo")
    done = gitlora("backfill", "--no-progress", str(repo))
    assert done.returncode == 0, done.stderr
    assert "stored 12 commits" in done.stdout
    stats = json.loads(gitlora("stats", "--json", str(repo)).stdout)
    assert stats["commits"] == {"ingested": 12} and stats["examples"] == 33
    assert stats["file_skip_reasons"] == {"binary": 1, "non-utf8": 1, "syntax-error (partial)": 1}
    lines = gitlora("examples", "--json", "--commit", "HEAD", str(repo)).stdout.splitlines()
    assert [json.loads(line)["qualified_name"] for line in lines] == ["math::is_even"]
    assert len(gitlora("examples", "--json", "--limit", "5", str(repo)).stdout.splitlines()) == 5
    bad = gitlora("examples", "--commit", "no-such-rev", str(repo))
    assert bad.returncode == 2 and "unknown commit" in bad.stderr
    # state lives outside the work tree, under the XDG state dir
    assert not (repo / ".gitlora").exists()
    assert list(paths.state_home().glob("repos/demo-*/store/data.mdb"))
    assert (paths.state_home() / "repos").is_dir()
    log_lines = next(paths.state_home().glob("repos/demo-*/gitlora.log")).read_text().splitlines()
    assert json.loads(log_lines[-1])["event"] == "backfill_done"
