"""The GPU gate, with a fake `nvidia-smi` on PATH (the daemon never imports torch: nvidia-smi is all it asks):
a busy GPU defers a due round until memory frees up, a missing or broken nvidia-smi means "no GPU" (fine for
device auto/cpu, a deferral for device cuda), and the trainer's own GPU detection reads the same tool."""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from gitlora.daemon import paths
from gitlora.daemon.config import Config
from gitlora.daemon.gitrepo import GitRepo
from gitlora.daemon.gpu import free_mb as gpu_free_mb
from gitlora.daemon.training_jobs import TrainingCoordinator
from gitlora.trainer import plan as P

from daemonutil import DaemonProcess, gitlora, wait_stored
from gitutil import commit_files, init_repo


def fake_nvidia_smi(directory: Path, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def path_without_nvidia_smi() -> str:
    return os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not os.path.exists(os.path.join(d, "nvidia-smi")))


# A fake that answers like the real one for both queries gitlora makes, reading the free MiB from a file so a
# test can free the GPU while the daemon runs.
ANSWERING = """case "$1" in
--query-gpu=memory.free) cat "$(dirname "$0")/free_mb" ;;
--query-gpu=name,*) echo "NVIDIA GeForce RTX 2070 SUPER, 8192, $((8192 - $(cat "$(dirname "$0")/free_mb"))), 7.5" ;;
*) exit 2 ;;
esac
"""


def gate(device: str, require: int = 0) -> str | None:
    coordinator = TrainingCoordinator(SimpleNamespace(  # the gate reads only the daemon's train config
        config=Config.model_validate({"train": {"device": device, "require_free_gpu_mb": require}})))
    return coordinator._gpu_gate()


@pytest.mark.parametrize("output, free", [
    ("512\n", 512),
    ("512\n7000\n", 7000),  # several GPUs: the emptiest one counts
    ("  8000 \n", 8000),
    ("[N/A]\n4000\n", 4000),  # a GPU that cannot say is passed over, the others still count
])
def test_free_memory_is_parsed(tmp_path, monkeypatch, output, free):
    fake_nvidia_smi(tmp_path, f"printf '{output}'\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{path_without_nvidia_smi()}")
    assert gpu_free_mb() == free


@pytest.mark.parametrize("body", [
    "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9\n",
    "echo 'No devices were found'\n",
    "echo '[N/A]'\n",
    "echo 'Failed to initialize NVML: Driver/library version mismatch'; echo 'NVML library version: 535.183'\n",
    "exit 0\n",  # nothing at all
    "kill -SEGV $$\n",  # crashes
], ids=["driver-down", "no-devices", "n/a", "version-mismatch", "empty", "crash"])
def test_garbage_or_failing_nvidia_smi_means_no_gpu(tmp_path, monkeypatch, body):
    fake_nvidia_smi(tmp_path, body)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{path_without_nvidia_smi()}")
    assert gpu_free_mb() is None
    assert P.detect_gpu() is None  # the trainer's plan: falls back to a CPU plan
    assert gate("auto") is None  # no GPU: device auto trains on the CPU
    assert gate("cuda") == "cuda requested but nvidia-smi finds no GPU"


def test_the_trainer_takes_the_first_gpu_reported_in_full(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, "echo 'NVIDIA A, [N/A], [N/A], 8.0'; echo 'NVIDIA B, 8192, 512, 7.5'\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{path_without_nvidia_smi()}")
    assert P.detect_gpu() == P.GpuInfo("NVIDIA B", 8.0, 0.5, 7.5)


def test_missing_nvidia_smi(monkeypatch):
    monkeypatch.setenv("PATH", path_without_nvidia_smi())
    assert gpu_free_mb() is None and P.detect_gpu() is None
    assert gate("auto") is None and gate("cpu") is None
    assert gate("cuda") == "cuda requested but nvidia-smi finds no GPU"


def test_the_gate_compares_free_memory_with_what_is_required(tmp_path, monkeypatch):
    (tmp_path / "free_mb").write_text("5999\n")
    fake_nvidia_smi(tmp_path, ANSWERING)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{path_without_nvidia_smi()}")
    assert gate("auto") == "GPU busy: 5999 MiB free, 6000 MiB needed"  # 0 = the default need
    assert gate("cuda") == "GPU busy: 5999 MiB free, 6000 MiB needed"
    assert gate("cuda", require=5000) is None
    assert gate("cpu") is None  # never asks
    (tmp_path / "free_mb").write_text("6000\n")
    assert gate("auto") is None
    assert P.detect_gpu() == P.GpuInfo("NVIDIA GeForce RTX 2070 SUPER", 8.0, 2192 / 1024, 7.5)


def wait_for(predicate, what: str, daemon: DaemonProcess, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon died"
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_due_round_waits_for_a_busy_gpu_then_starts_when_it_frees(tmp_path, isolated_home):
    fake_dir = tmp_path / "bin"
    fake_nvidia_smi(fake_dir, ANSWERING)
    (fake_dir / "free_mb").write_text("512\n")
    config = isolated_home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    model = tmp_path / "model"  # enough for the daemon's pre-start check; the trainer itself is not the point here
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, '
                                       '"intermediate_size": 128, "vocab_size": 256}')
    (model / "model.safetensors").write_bytes(b"")
    config.write_text(f'[train]\nbase_model = "{model}"\nmin_new_shards = 1\ncooldown_s = 0\n'
                      'check_interval_s = 1\ndevice = "auto"\n[shards]\nshard_size = 1\nquiet_flush_s = 1\n')
    repo = init_repo(tmp_path / "repo")
    daemon = DaemonProcess(env={"PATH": f"{fake_dir}{os.pathsep}{path_without_nvidia_smi()}"}).start()
    try:
        gitlora("install", str(repo))
        oids = [commit_files(repo, {f"src/f{n}.rs": f"pub fn f{n}() -> u32 {{\n    let base: u32 = {n};\n    base.wrapping_add(1)\n}}\n"}, f"commit {n}")
                for n in range(3)]
        wait_stored(repo, oids)

        def training() -> dict:
            return next(r for r in daemon.status()["repos"] if r["name"] == "repo")["training"]

        busy = "GPU busy: 512 MiB free, 6000 MiB needed"
        wait_for(lambda: training()["next_trigger"] == busy, "the scheduled check to meet the busy GPU", daemon)
        assert gitlora("train", "--now", str(repo)).stdout.strip().endswith(busy)  # forced rounds are gated too
        view = training()
        assert view["rounds"] == 0 and view["round"] is None and view["last_round"] is None
        rounds = paths.RepoPaths.for_git_dir(GitRepo(repo).common_dir).rounds
        assert not rounds.exists() or not any(rounds.iterdir()), "no round directory while the GPU is busy"

        (fake_dir / "free_mb").write_text("7000\n")  # the GPU frees up: the next scheduled check starts it
        wait_for(lambda: training()["rounds"] >= 1, "the deferred round to start", daemon)
        assert (rounds / "0001" / "spec.json").exists()
    finally:
        daemon.stop()
