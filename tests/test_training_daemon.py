"""The daemon's training scheduler with real rounds on the tiny model: thresholds, one round at a time,
failures recorded and retried while the daemon and `current` stay intact."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gitlora.daemon import paths
from gitlora.daemon.config import Config
from gitlora.daemon.gitrepo import GitRepo
from gitlora.trainer import registry, tiny

from daemonutil import DaemonProcess, gitlora, wait_stored
from gitutil import commit_files, init_repo


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def configure(home: Path, model: Path, **train) -> None:
    settings = {"base_model": f'"{model}"', "min_new_examples": 10, "cooldown_s": 0, "check_interval_s": 1,
                "max_steps": 4, "warmup_steps": 1, "device": '"cpu"', "window_commits": 2, "window_examples": 2,
                "older_slice_commits": 0, **{k: str(v) for k, v in train.items()}}
    config = home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[train]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
                      + "[shards]\nshard_size = 3\nquiet_flush_s = 1\n"
                      + "[ingest]\nmin_item_bytes = 0\n")  # make_commits writes one-line functions


def trainer_pids() -> list[int]:
    """Trainer processes of this test's daemon only (their spec lives under this test's state dir)."""
    pattern = f"gitlora.trainer --spec {paths.state_home()}"
    done = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


def repo_status(daemon: DaemonProcess, name: str) -> dict:
    return next(r for r in daemon.status()["repos"] if r["name"] == name)


# Bounds for a loaded 2-core machine (a 4-step round on the tiny model takes seconds on an idle one): when to
# call it a hang, not how long things should take.
ROUNDS_S = 1200
STEP_S = 300


def wait_for(predicate, timeout: float, what: str, during=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if during:
            during()
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def make_commits(repo: Path, start: int, count: int) -> list[str]:
    return [commit_files(repo, {f"src/f{n}.rs": f"pub fn f{n}(x: u32) -> u32 {{ x + {n} }}\n"
                                f"pub fn g{n}() -> u32 {{ {n} }}\n"}, f"commit {n}") for n in range(start, start + count)]


def test_rounds_start_only_at_threshold_and_never_two_at_once(tmp_path, isolated_home, tiny_model):
    configure(isolated_home, tiny_model)
    repos = [init_repo(tmp_path / name) for name in ("alpha", "beta")]
    daemon = DaemonProcess().start()
    try:
        for repo in repos:
            gitlora("install", str(repo))
            wait_stored(repo, make_commits(repo, 0, 1))

        def below_threshold(name: str) -> dict | None:
            """The quiet flush wrote a shard, and a scheduled check has counted it since: one commit (two
            examples), too young to hold out anything, all of it new data."""
            view = repo_status(daemon, name)
            return view if view["shards"] >= 1 and "2/10 new examples" in (view["training"]["next_trigger"] or "") \
                else None

        for repo in repos:
            view = wait_for(lambda: below_threshold(repo.name), STEP_S, f"{repo.name}'s check below the threshold")
            assert view["training"]["rounds"] == 0
        assert trainer_pids() == []
        firsts = {}
        for repo in repos:  # enough data for both repos at once
            firsts[repo.name] = make_commits(repo, 1, 12)
            wait_stored(repo, firsts[repo.name])
        most_at_once = 0

        def watch():
            nonlocal most_at_once
            most_at_once = max(most_at_once, len(trainer_pids()))

        wait_for(lambda: all(repo_status(daemon, r.name)["training"]["rounds"] >= 1
                             and repo_status(daemon, r.name)["training"]["round"] is None for r in repos),
                 ROUNDS_S, "a round in each repo", during=watch)
        assert most_at_once == 1
        for repo in repos:
            training = repo_status(daemon, repo.name)["training"]
            assert training["last_round"]["outcome"] in ("promoted", "kept current")
            state_dir = paths.RepoPaths.for_git_dir(GitRepo(repo).common_dir)
            versions = registry.list_versions(state_dir.adapters)
            # later flush groups may have earned a second round meanwhile; each is a complete 4-step round
            assert versions and all(v["metrics"]["steps"] == 4 for v in versions)
            # round 1: the commit flushed alone trains like the others; the two newest are held out
            spec = json.loads((state_dir.rounds / "0001" / "spec.json").read_text())
            assert spec["window_commits"] == firsts[repo.name][:-3:-1]
            assert firsts[repo.name][-3] in spec["new_commits"] and len(spec["new_commits"]) == 11
            assert not set(spec["new_commits"]) & set(spec["window_commits"])
            # the round's settings are the config's, all of them, from their one definition
            assert spec["train"] == {**Config.model_validate({"train": {
                "max_steps": 4, "warmup_steps": 1, "device": "cpu", "window_commits": 2, "window_examples": 2,
                "older_slice_commits": 0}}).train.round_settings().model_dump(), "seed": 1}
        assert daemon.status()["ok"]
        # the registry from the command line
        listed = gitlora("adapters", "list", "--repo", str(repos[0])).stdout
        assert listed.startswith("* v0001") or listed.startswith("  v0001")
        adapters = paths.RepoPaths.for_git_dir(GitRepo(repos[0]).common_dir).adapters
        current = registry.current_version(adapters)
        parent = next((v["metrics"].get("parent") for v in registry.list_versions(adapters)
                       if v["version"] == current), None)
        rolled = gitlora("adapters", "rollback", "--repo", str(repos[0]), check=False)
        if parent:  # a second round was promoted on top of the first: roll back to it
            assert rolled.returncode == 0 and registry.current_version(adapters) == parent
        else:  # one version (or none promoted): nothing earlier to go back to
            assert rolled.returncode == 1 and "roll back" in rolled.stdout
        state_dir = paths.RepoPaths.for_git_dir(GitRepo(repos[0]).common_dir)
        if registry.current_version(state_dir.adapters):
            merged = tmp_path / "merged"
            gitlora("adapters", "export", "--repo", str(repos[0]), "--merged", str(merged))
            assert (merged / "config.json").exists() and list(merged.glob("*.safetensors"))
    finally:
        daemon.stop()


def start_long_round(daemon: DaemonProcess, repo: Path) -> None:
    """Install, commit, force round 1 (configured long) and wait until it is training."""
    gitlora("install", str(repo))
    wait_stored(repo, make_commits(repo, 0, 8))
    assert "started round 1" in gitlora("train", "--now", str(repo)).stdout
    wait_for(lambda: (repo_status(daemon, repo.name)["training"]["round"] or {}).get("step"), STEP_S,
             "the round to train")


def test_a_killed_round_is_recorded_and_retried_while_current_stays(tmp_path, isolated_home, tiny_model):
    configure(isolated_home, tiny_model, min_new_examples=10_000, max_steps=400)
    repo = init_repo(tmp_path / "gamma")
    daemon = DaemonProcess().start()
    try:
        start_long_round(daemon, repo)
        adapters = paths.RepoPaths.for_git_dir(GitRepo(repo).common_dir).adapters
        assert "already running" in gitlora("train", "--now", str(repo)).stdout
        for pid in trainer_pids():
            os.kill(pid, signal.SIGKILL)
        last = wait_for(lambda: repo_status(daemon, "gamma")["training"]["last_round"], STEP_S, "the failure record")
        assert last["outcome"] == "failed" and last["reason"] == "killed"
        assert registry.current_version(adapters) is None and registry.list_versions(adapters) == []
        state = json.loads((adapters.parent / "rounds/state.json").read_text())
        assert state["failures"] == 1 and state["next_retry_at"] > time.time() + 30
        wait_for(lambda: "retrying after failure" in repo_status(daemon, "gamma")["training"]["next_trigger"],
                 STEP_S, "the scheduler to report the backoff")
        assert daemon.status()["ok"]  # the daemon stayed up
    finally:
        daemon.stop()


def test_a_round_orphaned_by_a_killed_daemon_is_stopped_and_recorded(tmp_path, isolated_home, tiny_model):
    configure(isolated_home, tiny_model, min_new_examples=10_000, max_steps=400)
    repo = init_repo(tmp_path / "delta")
    daemon = DaemonProcess().start()
    try:
        start_long_round(daemon, repo)
        [orphan] = trainer_pids()
        daemon.kill()  # SIGKILL: the trainer lives on in its own session
        assert trainer_pids() == [orphan]
        daemon = DaemonProcess().start()
        last = wait_for(lambda: repo_status(daemon, "delta")["training"]["last_round"], STEP_S, "the recovery")
        assert last["round"] == 1 and last["outcome"] == "failed" and last["reason"] == "daemon restarted"
        wait_for(lambda: trainer_pids() == [], STEP_S, "the orphaned trainer to stop")
        adapters = paths.RepoPaths.for_git_dir(GitRepo(repo).common_dir).adapters
        state = json.loads((adapters.parent / "rounds/state.json").read_text())
        assert state["active"] is None and registry.current_version(adapters) is None
        assert "started round 2" in gitlora("train", "--now", str(repo)).stdout  # the adapters lock was freed
    finally:
        daemon.stop()


def test_a_corrupt_shard_is_rebuilt_from_the_store_before_a_round(tmp_path, isolated_home, tiny_model):
    configure(isolated_home, tiny_model, min_new_examples=10_000, max_steps=400)
    repo = init_repo(tmp_path / "epsilon")
    daemon = DaemonProcess().start()
    try:
        gitlora("install", str(repo))
        wait_stored(repo, make_commits(repo, 0, 8))
        state_dir = paths.RepoPaths.for_git_dir(GitRepo(repo).common_dir)
        wait_for(lambda: repo_status(daemon, "epsilon")["shards"] >= 2, STEP_S, "the quiet flush")
        first = json.loads(state_dir.manifest.read_text())["shards"][0]
        shard = state_dir.shards / first["file"]
        good = shard.read_bytes()
        shard.write_bytes(good[: len(good) // 2] + b"garbage\n")  # a disk error, or a hand edit
        assert "started round 1" in gitlora("train", "--now", str(repo)).stdout
        assert shard.read_bytes() == good  # rewritten from the store before the trainer read it
    finally:
        daemon.stop()


def test_a_rejected_round_keeps_its_data_for_the_next_and_status_says_why(tmp_path, isolated_home, tiny_model):
    # a margin no 4-step round reaches: the gate keeps current
    configure(isolated_home, tiny_model, min_new_examples=10_000, promote_margin=0.9, max_tries=2)
    repo = init_repo(tmp_path / "zeta")
    daemon = DaemonProcess().start()
    try:
        gitlora("install", str(repo))
        wait_stored(repo, make_commits(repo, 0, 8))
        assert "started round 1" in gitlora("train", "--now", str(repo)).stdout
        last = wait_for(lambda: repo_status(daemon, "zeta")["training"]["last_round"], ROUNDS_S, "round 1")
        assert last["outcome"] == "kept current" and last["reason"]  # the gate's one-line reason
        state_dir = paths.RepoPaths.for_git_dir(GitRepo(repo).common_dir)
        state = json.loads((state_dir.rounds / "state.json").read_text())
        spec = json.loads((state_dir.rounds / "0001" / "spec.json").read_text())
        assert state["trained"] == {} and state["tries"] == {c: 1 for c in spec["new_commits"]}
        wait_for(lambda: (repo_status(daemon, "zeta")["training"]["next_round"] or {}).get("retried_commits")
                 == len(spec["new_commits"]), STEP_S, "status to show the next round retries them")
        assert "started round 2" in gitlora("train", "--now", str(repo)).stdout
        wait_for(lambda: repo_status(daemon, "zeta")["training"]["last_round"]["round"] == 2, ROUNDS_S, "round 2")
        again = json.loads((state_dir.rounds / "0002" / "spec.json").read_text())
        assert again["new_commits"] == spec["new_commits"]  # the same data, tried again
        # a fresh seed for training, the same held-out samples for the gate
        assert again["train"]["seed"] != spec["train"]["seed"] and again["eval_seed"] == spec["eval_seed"]
        state = json.loads((state_dir.rounds / "state.json").read_text())
        # tried max_tries times: in the replay pool now, untried
        assert state["tries"] == {} and set(state["trained"]) == set(spec["new_commits"])
        view = repo_status(daemon, "zeta")["training"]
        assert view["last_round"]["retired_commits"] == len(spec["new_commits"])
        wait_for(lambda: (repo_status(daemon, "zeta")["training"]["next_round"] or {}).get("replay_commits")
                 == len(spec["new_commits"]), STEP_S, "the next check to plan them as replay")
    finally:
        daemon.stop()
