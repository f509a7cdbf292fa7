"""`gitlora eval` and the status line: the views on hand-made results (milliseconds), then the real thing on the
demo repository with the adapters its real rounds made (a subprocess evaluating the tiny model, no mocks)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gitlora.daemon import eval_view, status_view
from gitlora.daemon.commands.eval import choose_versions

METRIC_KEYS = {"examples", "commits", "target_loss", "changed_loss", "fim_exact", "fim_edit_sim", "fim_n"}


def summary(changed: float, target: float, exact: float, sim: float, n: int = 8) -> dict:
    return {"examples": 40, "commits": 12, "target_loss": target, "changed_loss": changed, "fim_exact": exact,
            "fim_edit_sim": sim, "fim_n": n}


def diff(kind: str, value: float, low: float, high: float) -> dict:
    return {"kind": kind, "value": value, "ci95_low": low, "ci95_high": high}


def hand_made_result() -> dict:
    """What eval_run writes (see trainer/eval_run.py), for base and two versions on window and older slice."""
    def version(created_at, current, rel, older_rel):
        return {"window": summary(2.0 * (1 + rel), 1.5 * (1 + rel), 0.25, 0.7),
                "older": summary(1.8 * (1 + older_rel), 1.4, 0.5, 0.8),
                "vs_base": {"window": {"changed_loss": diff("rel", rel, rel - 0.04, rel + 0.04),
                                       "target_loss": diff("rel", rel, rel - 0.03, rel + 0.03),
                                       "fim_exact": diff("abs", 0.125, 0.0, 0.25),
                                       "fim_edit_sim": diff("abs", 0.1, 0.05, 0.15)},
                            "older": {"changed_loss": diff("rel", older_rel, older_rel - 0.01, older_rel + 0.01),
                                      "target_loss": diff("rel", 0.0, -0.01, 0.01),
                                      "fim_exact": diff("abs", 0.0, -0.1, 0.1),
                                      "fim_edit_sim": diff("abs", 0.0, -0.05, 0.05)}},
                "created_at": created_at, "current": current, "parent": None, "promoted": current}

    return {"base_model": "/models/tiny", "versions": ["v0001", "v0002"], "repo": "demo",
            "window_source": "the daemon's rolling window",
            "sets": {"window": {"examples": 40, "commits": 12}, "older": {"examples": 40, "commits": 12}},
            "models": {"base": {"window": summary(2.0, 1.5, 0.125, 0.6), "older": summary(1.8, 1.4, 0.5, 0.8)},
                       "v0001": version(1_760_000_000, False, -0.10, 0.01),
                       "v0002": version(1_760_003_600, True, -0.18, 0.015)}}


# ------------------------------------------------------------------------------------------- pure views
def test_versions_are_chosen_by_name_number_or_keyword():
    available = ["v0001", "v0002", "v0003"]
    assert choose_versions("current", available, "v0002") == ["v0002"]
    assert choose_versions("current", [], None) == []
    assert choose_versions("all", available, "v0002") == available
    assert choose_versions("v0003,1,v0003", available, None) == ["v0001", "v0003"]  # oldest first, once each
    with pytest.raises(ValueError, match="no adapter version 'v0009'"):
        choose_versions("v0009", available, None)
    with pytest.raises(ValueError, match="names no version"):
        choose_versions(",", available, None)


def test_table_shows_each_metric_for_base_and_versions_with_the_difference_and_its_interval():
    table = eval_view.render_table(hand_made_result())
    lines = table.splitlines()
    header = next(line for line in lines if line.strip().startswith("metric"))
    assert header.split()[1:] == ["base", "v0001", "v0002", "*"]  # the current adapter is starred
    changed = next(line for line in lines if "changed-token loss" in line)  # the window block comes first
    assert "2.0000" in changed and "1.6400 −18.0 % [−22.0, −14.0]" in changed and "−10.0 % [−14.0, −6.0]" in changed
    sim = next(line for line in lines if "edit similarity" in line)
    assert "+0.100 [+0.050, +0.150]" in sim
    assert "older slice" in table and "window from the daemon's rolling window" in table
    assert sum("changed-token loss" in line for line in lines) == 2  # once per set


def test_an_empty_set_says_so_instead_of_a_row_of_dashes():
    result = hand_made_result()
    result["sets"]["older"] = {"examples": 0, "commits": 0}
    table = eval_view.render_table(result)
    assert "older slice (forgetting): 0 commits, 0 examples," in table and "empty: nothing to measure yet" in table


def test_a_model_with_non_finite_losses_shows_unknown_and_says_why():
    result = hand_made_result()
    result["models"]["v0001"]["window"].update(changed_loss=None, target_loss=None, nonfinite=3)
    result["models"]["v0001"]["vs_base"]["window"]["changed_loss"].update(value=None, ci95_low=None, ci95_high=None)
    table = eval_view.render_table(result)
    changed = next(line for line in table.splitlines() if "changed-token loss" in line)
    assert changed.split()[5:7] == ["2.0000", "-"]  # base, then v0001 unknown
    assert "v0001: 3 examples have a non-finite loss (fp16 overflow or broken weights)" in table


def test_plot_series_maps_the_paired_interval_onto_the_value_axis():
    series = eval_view.plot_series(hand_made_result(), "window", "changed_loss")
    assert series["base"] == 2.0
    last = series["points"][-1]
    assert last["version"] == "v0002" and last["current"] is True
    assert last["low"] == pytest.approx(2.0 * (1 - 0.22)) and last["high"] == pytest.approx(2.0 * (1 - 0.14))
    sim = eval_view.plot_series(hand_made_result(), "window", "fim_edit_sim")["points"][0]
    assert sim["low"] == pytest.approx(0.65) and sim["high"] == pytest.approx(0.75)


def png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_plot_is_a_png_drawn_headless(tmp_path):
    out = tmp_path / "eval.png"
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    # In a fresh interpreter, as the CLI runs it: no display, and matplotlib must not need one.
    code = ("import json, sys; from gitlora.daemon import eval_view; "
            "eval_view.write_plot(json.load(sys.stdin), sys.argv[1])")
    done = subprocess.run([sys.executable, "-c", code, str(out)], input=json.dumps(hand_made_result()),
                          text=True, capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    width, height = png_size(out)
    assert width > 500 and height > 400 and out.stat().st_size > 10_000


# ------------------------------------------------------------------------------------------- status line
def metrics_json(rel=-0.18, low=-0.22, high=-0.14) -> dict:
    """A version's metrics.json as a round writes it (ISSUE11.md: `evaluation` and `gate`)."""
    def sets(changed):
        return {"window": summary(changed, 1.5, 0.25, 0.7) | {"commits": 31}, "older": summary(1.8, 1.4, 0.5, 0.8)}

    return {"version": "v0003", "parent": "v0002", "gate_passed": True,
            "evaluation": {"base": sets(2.0), "current": sets(1.8), "candidate": sets(2.0 * (1 + rel))},
            "gate": {"passed": True, "reason": "better than current",
                     "vs_current": {"changed_loss_rel": -0.09, "ci95_low": -0.12, "ci95_high": -0.05},
                     "vs_base": {"changed_loss_rel": rel, "ci95_low": low, "ci95_high": high}, "older_rel": 0.004}}


def test_status_line_reads_the_adapter_against_the_base_from_metrics_json():
    vs_base = status_view.adapter_vs_base(metrics_json())
    line = status_view.vs_base_line(vs_base)
    assert line == "changed-token loss −18 % vs base (±4 %, 95 % interval −22 % to −14 %, window of 31 commits)"
    lines = status_view.render_training({"current_adapter": "v0003", "vs_base": vs_base})
    assert lines[0] == f"adapter   v0003   {line}"


def test_status_line_without_an_interval_or_without_an_evaluation():
    no_gate = metrics_json()
    del no_gate["gate"]
    vs_base = status_view.adapter_vs_base(no_gate)  # the point estimate from the two evaluations
    assert vs_base["changed_loss_rel"] == pytest.approx(-0.18) and vs_base["ci95_low"] is None
    assert status_view.vs_base_line(vs_base) == "changed-token loss −18 % vs base (window of 31 commits)"
    old_round = {"version": "v0001", "eval_loss_before": 2.0, "eval_loss_after": 1.9, "gate_passed": True}
    assert status_view.adapter_vs_base(old_round) is None and status_view.adapter_vs_base(None) is None
    assert status_view.render_training({"current_adapter": "v0001", "vs_base": None})[0] == "adapter   v0001"


def test_offline_status_shows_the_line_from_the_current_versions_metrics_json(tmp_path):
    """No daemon: `gitlora status` reads the current version's metrics.json from the state dir."""
    from gitlora.daemon import paths
    from gitlora.daemon.gitrepo import GitRepo
    from gitlora.trainer import registry

    from daemonutil import gitlora
    from gitutil import commit_files, init_repo

    repo = init_repo(tmp_path / "crate")
    commit_files(repo, {"src/lib.rs": "pub fn one() -> u32 { 1 }\n"}, "one")
    gitlora("install", str(repo))
    adapters = paths.RepoPaths.for_git_dir(GitRepo(repo).common_dir).adapters
    (adapters / "v0003").mkdir(parents=True)
    (adapters / "v0003" / registry.METRICS).write_text(json.dumps(metrics_json()))
    registry.promote(adapters, "v0003")
    done = gitlora("status", check=False)
    assert done.returncode == 1  # no daemon
    assert ("  adapter   v0003   changed-token loss −18 % vs base (±4 %, 95 % interval −22 % to −14 %, window of "
            "31 commits)") in done.stdout.splitlines()


def test_eval_of_a_repository_never_installed_says_so_and_writes_nothing(tmp_path, isolated_home):
    from daemonutil import gitlora
    from gitutil import commit_files, init_repo

    repo = init_repo(tmp_path / "stranger")
    commit_files(repo, {"src/lib.rs": "pub fn one() -> u32 { 1 }\n"}, "one")
    done = gitlora("eval", str(repo), check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == f"gitlora: stranger has no gitlora state: install it first (`gitlora install {repo}`)"
    assert not (isolated_home / ".local/state/gitlora/repos").exists()


# ------------------------------------------------------------------------------- the real thing, on the demo
# Bounds for a loaded 2-core machine: when to call it a hang, not how long things should take.
ROUND_S = 1200
EVAL_S = 900
pytestmark = pytest.mark.timeout(3600)  # the module's fixture runs two real rounds inside the first test's time

FOLLOW_UPS = [  # commits after the first round: the oldest window commits graduate into round 2's new data
    ("src/lib.rs", "\npub fn farewell(config: &Config) -> String {\n    format!(\"bye, {}\", config.name)\n}\n"),
    ("src/math.rs", "\npub fn span(values: &[i64]) -> i64 {\n    let max = values.iter().max().unwrap_or(&0);\n"
                    "    let min = values.iter().min().unwrap_or(&0);\n    max - min\n}\n"),
    ("src/lib.rs", "\npub fn shout(config: &Config) -> String {\n    let name = config.name.to_uppercase();\n"
                   "    format!(\"HELLO, {}\", name)\n}\n"),
    ("src/math.rs", "\npub fn total(values: &[i64]) -> i64 {\n    let mut sum = 0;\n    for v in values {\n"
                    "        sum += v;\n    }\n    sum\n}\n"),
]


def wait_for(predicate, timeout: float, what: str):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo repository served by a real daemon with the tiny model: backfilled, one forced round, four
    more commits through the hooks, a second round; the daemon keeps running for the tests. `env` points every
    command at this world (and never at the real HOME)."""
    from gitlora.daemon.demo_repo import build_demo_repo
    from gitlora.trainer import tiny

    from daemonutil import DaemonProcess, wait_stored

    base = tmp_path_factory.mktemp("eval-demo")
    home = base / "home"
    runtime = Path("/tmp") / f"gl-eval-{os.getpid()}"  # short: AF_UNIX paths are limited to 108 bytes
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "XDG_", "GITLORA_", "NOTIFY_"))}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
               XDG_STATE_HOME=str(home / ".local/state"), XDG_DATA_HOME=str(home / ".local/share"),
               XDG_RUNTIME_DIR=str(runtime), GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="Demo Dev",
               GIT_AUTHOR_EMAIL="dev@example.com", GIT_COMMITTER_NAME="Demo Dev",
               GIT_COMMITTER_EMAIL="dev@example.com")
    model = tiny.build_tiny_model(base / "tiny")
    config = home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'[train]\nbase_model = "{model}"\nmin_new_examples = 1000000\ncooldown_s = 0\n'
                      'check_interval_s = 3600\nmax_steps = 3\nwarmup_steps = 1\nlearning_rate = 0.003\n'
                      'device = "cpu"\ncontext_length = 1024\nmicro_batch = 1\ngrad_accum = 1\nfim_samples = 6\n'
                      '[shards]\nshard_size = 8\nquiet_flush_s = 1\n')
    repo = build_demo_repo(base / "demo-crate")
    with pytest.MonkeyPatch.context() as mp:  # this process's view of the world too (socket, state dir)
        for key in [k for k in os.environ if k.startswith(("GIT_", "XDG_", "GITLORA_", "NOTIFY_"))]:
            mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        daemon = DaemonProcess().start()
        world = {"repo": repo, "env": env, "out": base, "daemon": daemon, "runtime": runtime}

        def training() -> dict:
            return daemon.status()["repos"][0].get("training") or {}

        def flushed() -> bool:
            view = daemon.status()["repos"][0]
            return view.get("shards", 0) >= 1 and view.get("unflushed_examples", 1) == 0 and not view.get("ingesting")

        def round_done(number: int):
            last = training().get("last_round") or {}
            return last if last.get("round") == number and not training().get("round") else None

        try:
            run_gitlora(world, "install", str(repo))
            wait_for(lambda: daemon.status()["repos"][0]["commits_ingested"] >= 12 and flushed(), ROUND_S,
                     "the backfill, flushed")
            for number in (1, 2):
                if number == 2:
                    for path, addition in FOLLOW_UPS:
                        with open(repo / path, "a", encoding="utf-8") as handle:
                            handle.write(addition)
                        subprocess.run(["git", "commit", "-q", "-am", f"Add to {path}"], cwd=repo, env=env,
                                       check=True)
                        oid = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, env=env, check=True,
                                             capture_output=True, text=True).stdout.strip()
                        wait_stored(repo, [oid])
                    wait_for(flushed, ROUND_S, "the follow-ups flushed")
                started = run_gitlora(world, "train", "--now", str(repo), timeout=120)
                assert f"started round {number}" in started.stdout, started.stdout + started.stderr
                outcome = wait_for(lambda: round_done(number), ROUND_S, f"round {number}")
                assert outcome["outcome"] in ("promoted", "kept current"), outcome
            yield world
        finally:
            assert daemon.stop() == 0
            import shutil

            shutil.rmtree(runtime, ignore_errors=True)


def run_gitlora(demo, *args: str, timeout: float = EVAL_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gitlora.daemon", *args], capture_output=True, text=True,
                          timeout=timeout, env=demo["env"])


def adapters_dir(demo) -> Path:
    state = Path(demo["env"]["XDG_STATE_HOME"]) / "gitlora" / "repos"
    return next(state.glob("demo-crate-*")) / "adapters"


def test_eval_json_measures_base_and_current_adapter_on_the_held_out_window(demo):
    from gitlora.trainer import registry

    current = registry.current_version(adapters_dir(demo))
    assert current, "neither round promoted an adapter"
    done = run_gitlora(demo, "eval", "--json", str(demo["repo"]))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["versions"] == [current] and list(result["models"]) == ["base", current]
    assert result["repo"] == "demo-crate" and "daemon's planner" in result["window_source"]
    window = result["sets"]["window"]
    assert window["examples"] > 0 and window["commits"] >= 2
    for name in ("base", current):
        numbers = result["models"][name]["window"]
        assert set(numbers) >= METRIC_KEYS and numbers["examples"] == window["examples"]
        assert numbers["target_loss"] > 0 and numbers["changed_loss"] > 0  # losses of a real model
        assert numbers["fim_n"] > 0 and 0 <= numbers["fim_exact"] <= 1 and 0 <= numbers["fim_edit_sim"] <= 1
    model = result["models"][current]
    assert model["current"] is True and model["created_at"] > 0
    for metric in ("changed_loss", "target_loss", "fim_exact", "fim_edit_sim"):
        d = model["vs_base"]["window"][metric]
        assert d["kind"] == ("rel" if metric.endswith("loss") else "abs")
        assert isinstance(d["value"], float) and d["ci95_low"] <= d["value"] <= d["ci95_high"]
    ours, theirs = model["window"]["changed_loss"], result["models"]["base"]["window"]["changed_loss"]
    assert model["vs_base"]["window"]["changed_loss"]["value"] == pytest.approx(ours / theirs - 1, rel=1e-6)
    assert "older" in result["sets"] and "older" in model["vs_base"]  # measured, even when the slice is small


def test_eval_table_and_plot_over_every_version(demo):
    from gitlora.trainer import registry

    versions = [v["version"] for v in registry.list_versions(adapters_dir(demo))]
    assert versions == ["v0001", "v0002"]  # each round leaves a version, promoted or not
    plot = demo["out"] / "eval.png"
    # --plot defaults to all versions. Run as `gitlora` runs, then ask the CLI process whether it imported torch:
    # the model belongs to the subprocess.
    code = ("import sys; from gitlora.daemon.cli import main; code = main(sys.argv[1:]); "
            "print('torch imported' if 'torch' in sys.modules else 'torch-free', file=sys.stderr); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, "eval", "--plot", str(plot), str(demo["repo"])],
                          capture_output=True, text=True, timeout=EVAL_S, env=demo["env"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.strip().endswith("torch-free")
    header = next(line for line in done.stdout.splitlines() if line.strip().startswith("metric"))
    assert [c for c in header.split() if c.startswith("v")] == versions
    changed = next(line for line in done.stdout.splitlines() if "changed-token loss" in line)
    assert changed.count(" %") == 2  # a difference vs base for each version
    assert f"plot written to {plot}" in done.stdout
    width, height = png_size(plot)
    assert width > 500 and height > 400


def test_eval_names_the_versions_when_asked_for_one_that_does_not_exist(demo):
    done = run_gitlora(demo, "eval", "--versions", "v0042", str(demo["repo"]), timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "gitlora: no adapter version 'v0042' (versions: v0001, v0002)"


def test_status_shows_the_adapter_against_the_base_from_its_rounds_metrics(demo):
    from gitlora.trainer import registry

    adapters = adapters_dir(demo)
    current = registry.current_version(adapters)
    metrics = json.loads((adapters / current / registry.METRICS).read_text())
    assert metrics["evaluation"]["base"]["window"]["changed_loss"] > 0  # the round recorded the base
    expected = status_view.vs_base_line(status_view.adapter_vs_base(metrics))
    assert expected.startswith("changed-token loss ") and " vs base (±" in expected
    online = run_gitlora(demo, "status", timeout=120)
    assert online.returncode == 0, online.stdout + online.stderr
    assert f"adapter   {current}   {expected}" in online.stdout
    assert "data      next round " in online.stdout  # the planner's window as the daemon holds it out


def test_status_says_what_the_next_round_will_use():
    plan = {"new_commits": 3, "new_examples": 12, "fresh_examples": 4, "retried_commits": 2, "replay_commits": 5,
            "window_commits": 6, "window_examples": 30, "older_commits": 1}
    lines = status_view.render_training({"current_adapter": None, "next_round": plan})
    assert lines[-1] == ("data      next round 3 new commits (12 examples, 2 commits retried), 5 to replay; held out: "
                         "window 6 commits (30 examples), older slice 1 commits")


def test_eval_without_the_base_model_locally_says_why_at_once(demo, tmp_path):
    config = Path(demo["env"]["XDG_CONFIG_HOME"]) / "gitlora" / "config.toml"
    elsewhere = tmp_path / "config.toml"
    elsewhere.write_text(config.read_text().replace(
        next(line for line in config.read_text().splitlines() if line.startswith("base_model")),
        f'base_model = "{tmp_path / "gone"}"'))
    done = subprocess.run([sys.executable, "-m", "gitlora.daemon", "eval", str(demo["repo"])], capture_output=True,
                          text=True, timeout=120, env={**demo["env"], "GITLORA_CONFIG": str(elsewhere)})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == (f"gitlora: base model {tmp_path / 'gone'} does not exist: set train.base_model "
                                   "to a model directory (`gitlora model tiny` builds a small one)")
