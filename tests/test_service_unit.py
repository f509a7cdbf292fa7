"""The user unit: its text, `systemd-analyze verify` on the rendered file, install/uninstall into a temp dir."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gitlora.daemon import service_unit
from gitlora.daemon.service_unit import UNIT_NAME, install_unit, render_unit, uninstall_unit

REPO = Path(__file__).resolve().parent.parent


def fake_exec(directory: Path, name: str = "gitlora") -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def keys(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_reference_copy_matches_embedded_template():
    assert (REPO / "systemd" / "gitlora.service").read_text() == service_unit.UNIT_TEMPLATE


def test_render_contents(tmp_path):
    text = render_unit(tmp_path / "bin" / "gitlora")
    k = keys(text)
    assert k["ExecStart"] == f"{tmp_path}/bin/gitlora daemon"
    assert k["Type"] == "notify" and k["NotifyAccess"] == "main" and k["WatchdogSec"] == "30"
    assert k["Restart"] == "on-failure" and k["RestartSec"] == "5" and k["WantedBy"] == "default.target"
    assert k["ExecReload"] == "/bin/kill -HUP $MAINPID"  # `systemctl --user reload gitlora`: SIGHUP
    assert "Nice" not in k and "IOSchedulingClass" not in k  # the daemon runs at normal priority
    assert "@GITLORA@" not in text


def test_exec_reload_sends_sighup_to_the_main_pid(tmp_path):
    """Run the unit's ExecReload= line as systemd would (it expands $MAINPID) against a process that waits
    for SIGHUP; the signal must arrive and the process must live on (a reload is not a restart)."""
    command = keys(render_unit(tmp_path / "gitlora"))["ExecReload"]
    main = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, sys\n"
         "signal.signal(signal.SIGHUP, lambda *_: print('reload', flush=True))\n"
         "print('ready', flush=True)\n"
         "signal.pause()\n"
         "sys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert main.stdout.readline() == "ready\n"
        argv = [word.replace("$MAINPID", str(main.pid)) for word in command.split()]
        subprocess.run(argv, check=True, timeout=30)
        assert main.stdout.readline() == "reload\n"  # blocks until the handler ran
        assert main.poll() is None
    finally:
        main.kill()
        main.wait()


def test_render_requires_absolute_path():
    with pytest.raises(ValueError, match="absolute"):
        render_unit(Path("bin/gitlora"))


@pytest.mark.parametrize("bad", ['/opt/q"uote/gitlora', "/opt/it's/gitlora", "/opt/back\\slash/gitlora",
                                 "/opt/new\nline/gitlora", "/opt/tab\tx/gitlora"])
def test_render_refuses_paths_systemd_cannot_run(bad):
    with pytest.raises(ValueError, match="systemd cannot run"):
        render_unit(Path(bad))


@pytest.mark.parametrize("dirname", ["plain", "with space", "100%", "dollar$HOME", "semi;colon", "ünï"])
def test_systemd_analyze_verify(tmp_path, dirname):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    bindir = tmp_path / dirname
    bindir.mkdir()
    unit = tmp_path / UNIT_NAME
    unit.write_text(render_unit(fake_exec(bindir)))
    # --user: it is a user unit; verify exits 0 even on unknown keys, so stderr must be empty too.
    done = subprocess.run([analyze, "--user", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    # and verify does look at ExecStart: a missing binary is reported
    (bindir / "gitlora").unlink()
    done = subprocess.run([analyze, "--user", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "gitlora" in done.stderr


def test_install_without_systemctl_returns_commands(tmp_path):
    exe = fake_exec(tmp_path)
    units = tmp_path / "units"
    report = install_unit(exe, unit_dir=units, run_systemctl=False)
    assert report.unit_path == units / UNIT_NAME and report.changed and not report.ran
    assert report.unit_path.read_text() == render_unit(exe)
    assert oct(report.unit_path.stat().st_mode & 0o777) == oct(0o644)
    assert report.commands == [["systemctl", "--user", "daemon-reload"],
                               ["systemctl", "--user", "enable", "--now", UNIT_NAME]]
    assert "systemctl --user enable --now gitlora.service" in report.summary()
    again = install_unit(exe, unit_dir=units, run_systemctl=False)
    assert not again.changed  # idempotent


def test_install_default_dir_and_exec_path(tmp_path, monkeypatch):
    exe = fake_exec(tmp_path)
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))  # the console script sits beside it
    report = install_unit(run_systemctl=False)
    assert report.unit_path == Path(os.environ["XDG_CONFIG_HOME"]) / "systemd/user" / UNIT_NAME
    assert f"ExecStart={exe} daemon" in report.unit_path.read_text()


def test_install_refuses_missing_or_relative_exec(tmp_path):
    with pytest.raises(FileNotFoundError):
        install_unit(tmp_path / "nope", unit_dir=tmp_path, run_systemctl=False)
    with pytest.raises(ValueError):
        install_unit(Path("gitlora"), unit_dir=tmp_path, run_systemctl=False)
    assert not (tmp_path / UNIT_NAME).exists()


@pytest.fixture
def systemctl_on_path(tmp_path, monkeypatch):
    """A stand-in `systemctl` executable on PATH that logs its argv; the probe's exit status is settable."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    log = tmp_path / "systemctl.log"
    (bindir / "systemctl").write_text(
        '#!/bin/sh\necho "$*" >> "$FAKE_SYSTEMCTL_LOG"\n'
        'case "$*" in *show-environment*) exit "${FAKE_PROBE_RC:-0}";; esac\nexit 0\n')
    (bindir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SYSTEMCTL_LOG", str(log))
    return log


def test_install_and_uninstall_run_systemctl_when_it_answers(tmp_path, systemctl_on_path):
    exe = fake_exec(tmp_path)
    units = tmp_path / "units"
    report = install_unit(exe, unit_dir=units)
    assert report.ran and report.error is None
    assert systemctl_on_path.read_text().splitlines() == [
        "--user show-environment", "--user daemon-reload", "--user enable --now gitlora.service"]
    systemctl_on_path.unlink()
    report = uninstall_unit(unit_dir=units)
    assert report.ran and report.error is None and not (units / UNIT_NAME).exists()
    assert systemctl_on_path.read_text().splitlines() == [
        "--user show-environment", "--user disable --now gitlora.service", "--user daemon-reload"]


def test_install_when_user_manager_is_unreachable(tmp_path, systemctl_on_path, monkeypatch):
    monkeypatch.setenv("FAKE_PROBE_RC", "1")
    report = install_unit(fake_exec(tmp_path), unit_dir=tmp_path / "units")
    assert not report.ran and report.unit_path.exists()
    assert systemctl_on_path.read_text().splitlines() == ["--user show-environment"]
    assert "run:" in report.summary()


def test_uninstall_without_systemctl_removes_unit_and_wants_link(tmp_path):
    exe = fake_exec(tmp_path)
    units = tmp_path / "units"
    install_unit(exe, unit_dir=units, run_systemctl=False)
    wants = units / "default.target.wants"
    wants.mkdir()
    (wants / UNIT_NAME).symlink_to(units / UNIT_NAME)  # what `systemctl --user enable` creates
    report = uninstall_unit(unit_dir=units, run_systemctl=False)
    assert report.changed and not report.ran
    assert not (units / UNIT_NAME).exists() and not (wants / UNIT_NAME).is_symlink()
    assert report.commands == [["systemctl", "--user", "stop", UNIT_NAME],
                               ["systemctl", "--user", "daemon-reload"]]
    assert not uninstall_unit(unit_dir=units, run_systemctl=False).changed
