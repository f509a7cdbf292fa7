"""The README's main job, end to end, as a user runs it."""
from __future__ import annotations

import subprocess
import sys


def test_demo_runs_the_whole_product(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gitlora.daemon", "demo", "--dir", str(tmp_path / "d"),
                           "--steps", "6"], capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "commits:  ingested 12" in out  # the backfilled demo history
    assert "15 ingested, 0 skipped" in out  # plus the three live commits, each stored via hooks/watcher
    assert "commit→stored" in out
    assert "started round 1 for demo-crate" in out
    assert "round 1: promoted" in out or "round 1: kept current" in out
    assert "v0001" in out and "round 2 resumed v0001" in out  # the second round continues the first adapter
    assert "round 2: promoted" in out or "round 2: kept current" in out
    assert "replayed from older shards" in out and " 0 replayed" not in out
    assert "daemon exited with 0" in out
    assert (tmp_path / "d" / "state" / "daemon.log").exists()
