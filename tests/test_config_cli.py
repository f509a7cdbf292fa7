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
    assert stats["commits"] == {"ingested": 12} and stats["examples"] == 23
    assert stats["file_skip_reasons"] == {"binary": 1, "non-utf8": 1, "syntax-error (partial)": 1}
    # the demo's items under 50 bytes, and its merge's items (its branch's, replayed)
    assert stats["item_skip_reasons"] == {"too-small": 7, "duplicate": 3}
    assert stats["messages_omitted"] == {"template": 1}  # "Merge branch 'feature/net'"
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


# ----------------------------------------------------------------------------------------------- bounds

def write_config(text: str):
    path = paths.config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("toml,key,allowed", [
    ("[daemon]\nsocket_timeout_s = inf\n", "daemon.socket_timeout_s", "a finite number above 0 and at most 3,600"),
    ("[daemon]\nsocket_timeout_s = nan\n", "daemon.socket_timeout_s", "a finite number above 0 and at most 3,600"),
    ("[daemon]\nsocket_timeout_s = 1e9\n", "daemon.socket_timeout_s", "a finite number above 0 and at most 3,600"),
    ("[daemon]\nrescan_interval_s = 1e12\n", "daemon.rescan_interval_s", "an integer from 5 to 86,400"),
    ("[daemon]\nrescan_interval_s = 1_000_000_000_000\n", "daemon.rescan_interval_s", "from 5 to 86,400"),
    ("[train]\ncheck_interval_s = 1e14\n", "train.check_interval_s", "an integer from 1 to 86,400"),
    ("[train]\ncheck_interval_s = 100_000_000_000_000\n", "train.check_interval_s", "from 1 to 86,400"),
    ("[train]\ncooldown_s = 99_999_999_999\n", "train.cooldown_s", "from 0 to 604,800"),
    ("[train]\nmin_new_shards = true\n", "train.min_new_shards", "an integer from 1 to 10,000,000"),
    ("[train]\nlora_r = false\n", "train.lora_r", "an integer from 1 to 4,096"),
    ("[train]\nlearning_rate = -inf\n", "train.learning_rate", "a finite number above 0 and at most 1"),
    ("[train]\nepochs = inf\n", "train.epochs", "a finite number above 0 and at most 1,000"),
    ("[shards]\nquiet_flush_s = 1e100\n", "shards.quiet_flush_s", "an integer from 0 to 86,400"),
    ("[ingest]\ninclude_remotes = 1\n", "ingest.include_remotes", "true or false"),
    ("[ingest]\ninclude_remotes = 'yes'\n", "ingest.include_remotes", "true or false"),
    ("[ingest]\nworkers = '4'\n", "ingest.workers", "an integer from 0 to 64"),
])
def test_values_that_would_break_the_daemon_are_refused_with_their_range(toml, key, allowed):
    path = write_config(toml)
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.load()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: {key}: ")
    assert "; allowed: " in message and message.endswith(allowed)


def test_every_number_has_a_finite_upper_bound():
    import annotated_types

    for section_name, section in config_mod.Config.model_fields.items():
        for key, info in section.annotation.model_fields.items():
            if info.annotation in (int, float):
                assert any(isinstance(rule, (annotated_types.Le, annotated_types.Lt)) for rule in info.metadata), \
                    f"{section_name}.{key} has no upper bound"
                assert config_mod.allowed(info), key


@pytest.mark.parametrize("toml", ["[daemon]\nrescan_interval_s = 1e12\n", "[train]\ncheck_interval_s = 1e14\n",
                                  "[daemon]\nsocket_timeout_s = inf\n"])
def test_daemon_refuses_a_bad_config_in_one_line(toml):
    write_config(toml)
    # The old code died with an OverflowError traceback (or, for inf, started and failed every request).
    done = subprocess.run([sys.executable, "-m", "gitlora.daemon", "daemon"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("gitlora: error: ") and "allowed:" in line


def test_daemon_runs_with_the_largest_allowed_intervals():
    from tests.daemonutil import DaemonProcess

    write_config("[daemon]\nrescan_interval_s = 86400\nsocket_timeout_s = 3600.0\n"
                 "[train]\ncheck_interval_s = 86400\ncooldown_s = 604800\nmax_retry_backoff_s = 604800\n"
                 "[shards]\nquiet_flush_s = 86400\n")
    daemon = DaemonProcess().start()
    try:
        assert daemon.status()["ok"]
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("kind", ["directory", "fifo", "dangling-symlink", "parent-is-a-file"])
def test_config_path_of_the_wrong_kind_is_named(tmp_path, monkeypatch, kind):
    import os

    path = tmp_path / "config.toml"
    expected = {"directory": "is a directory", "fifo": "is a named pipe",
                "dangling-symlink": "dangling symlink", "parent-is-a-file": "not a directory"}[kind]
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would block forever
    elif kind == "dangling-symlink":
        path.symlink_to(tmp_path / "gone.toml")
    else:
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "config.toml"
    monkeypatch.setenv("GITLORA_CONFIG", str(path))
    # in a subprocess with a timeout: the old code blocked forever reading the FIFO
    done = subprocess.run([sys.executable, "-m", "gitlora.daemon", "config"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"gitlora: error: {path}: ") and expected in line
    with pytest.raises(config_mod.ConfigError, match=expected):
        config_mod.load()


def test_unreadable_config_is_named(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = write_config("[train]\nmin_new_shards = 7\n")
    path.chmod(0)
    with pytest.raises(config_mod.ConfigError, match="Permission denied") as caught:
        config_mod.load()
    assert str(caught.value).startswith(f"{path}: ")


def test_config_check(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text("[train]\nmin_new_shards = 7\n")
    done = gitlora("config", "--check", str(good))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ok: {good}\n", "")

    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmin_new_shards = true\n")
    done = gitlora("config", "--check", str(bad))
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert f"{bad}: train.min_new_shards:" in line and "allowed: an integer from 1 to 10,000,000" in line

    for wrong in (tmp_path, tmp_path / "missing.toml"):
        done = gitlora("config", "--check", str(wrong))
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1 and str(wrong) in done.stderr

    # without FILE: the file the daemon reads; none there means the defaults, which are fine
    done = gitlora("config", "--check")
    assert done.returncode == 0 and done.stdout.startswith(f"ok: {paths.config_path()}")
    write_config("[daemon]\nsocket_timeout_s = inf\n")
    done = gitlora("config", "--check")
    assert done.returncode == 1 and "daemon.socket_timeout_s" in done.stderr


def test_load_again_sees_the_new_file_and_names_what_changed():
    path = write_config("[train]\nmin_new_shards = 7\n")
    first = config_mod.load()
    path.write_text("[train]\nmin_new_shards = 9\n[daemon]\nrescan_interval_s = 600\n")
    second = config_mod.load()
    assert second.train.min_new_shards == 9
    assert config_mod.changed_keys(first, second) == ["daemon.rescan_interval_s", "train.min_new_shards"]
    assert config_mod.changed_keys(second, config_mod.load()) == []
