"""A regular (non-editable) install ships every module: the wheel holds all of daemon/, hooks/, trainer/."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_module_under_the_gitlora_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("gitlora-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"gitlora/{folder}/{path.relative_to(ROOT / folder).as_posix()}"
                for folder in ("daemon", "hooks", "trainer")
                for path in (ROOT / folder).rglob("*") if path.suffix in (".py", ".sh") and "__pycache__" not in path.parts}
    assert expected <= names, sorted(expected - names)
    assert not any(name.startswith(("daemon/", "trainer/", "hooks/")) for name in names)  # no bare top-level modules
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gitlora = gitlora.daemon.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
