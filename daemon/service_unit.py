"""The systemd user unit for the daemon: render it, install it, uninstall it (`gitlora service install`).

The template is embedded here, not read from systemd/gitlora.service, because that folder is not inside a
Python package and so is not in an installed wheel; the repo copy is the template verbatim, for readers,
and a test keeps the two equal.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .fsutil import atomic_write_text

UNIT_NAME = "gitlora.service"
PLACEHOLDER = "@GITLORA@"

# Rendered by `gitlora service install`; systemd/gitlora.service in the repository is this text verbatim.
UNIT_TEMPLATE = """\
# gitlora user unit, written by `gitlora service install` (gitlora.daemon.service_unit).
# No Nice=/IOSchedulingClass=: the daemon answers hooks and its control socket at normal priority;
# the trainer subprocess lowers its own. WatchdogSec=30: the daemon pings systemd about every 15 s.
# ExecReload: `systemctl --user reload gitlora` sends SIGHUP; the daemon rereads its config file and keeps
# the config it has (logging why) when the new one is bad. `gitlora config --check` tests a file first.
[Unit]
Description=gitlora: keep a LoRA adapter fine-tuned on your repositories' commits
# Documentation=: add the project's public URL once it has one (none is known yet; none is invented here).

[Service]
Type=notify
NotifyAccess=main
ExecStart=@GITLORA@ daemon
ExecReload=/bin/kill -HUP $MAINPID
WatchdogSec=30
Restart=on-failure
RestartSec=5
Environment=PYTHONUNBUFFERED=1

[Install]
WantedBy=default.target
"""

_TIMEOUT_S = 10.0


def user_unit_dir() -> Path:
    """$XDG_CONFIG_HOME/systemd/user: the per-user unit directory systemd --user always searches."""
    base = os.environ.get("XDG_CONFIG_HOME")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "systemd" / "user"


def default_exec_path() -> Path:
    """The `gitlora` console script beside this interpreter; symlinks kept, so a venv stays the venv."""
    return Path(os.path.abspath(sys.executable)).parent / "gitlora"


def _quote(path: str) -> str:
    """Write `path` as ExecStart='s command word (checked with systemd-analyze verify, systemd 252).

    `%` starts a specifier, so it is doubled; whitespace needs double quotes; `$` is literal in the command
    word. systemd refuses quotes, backslashes and control characters in an executable name outright.
    """
    if any(c in "\"'\\" or not c.isprintable() for c in path):
        raise ValueError(f"systemd cannot run an executable whose path contains quotes, backslashes or "
                         f"control characters: {path!r}")
    text = path.replace("%", "%%")
    return f'"{text}"' if any(c.isspace() or c == ";" for c in text) else text


def render_unit(exec_path: Path) -> str:
    """The unit text with ExecStart pointing at `exec_path`; ValueError where systemd could not run it."""
    if not Path(exec_path).is_absolute():
        raise ValueError(f"ExecStart needs an absolute path, got {str(exec_path)!r}")
    return UNIT_TEMPLATE.replace(PLACEHOLDER, _quote(str(exec_path)))


@dataclass
class InstallReport:
    """What happened; `commands` are the systemctl calls run, or still to run when `ran` is False."""

    unit_path: Path
    changed: bool
    ran: bool = False
    commands: list[list[str]] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> str:
        lines = [f"unit: {self.unit_path} ({'written' if self.changed else 'unchanged'})"]
        if self.error:
            lines.append(f"systemctl failed: {self.error}")
        if self.ran and not self.error:
            lines.append("ran: " + "; ".join(" ".join(c) for c in self.commands))
        elif self.commands:
            lines.append("systemctl --user is not reachable here; run:")
            lines += ["  " + " ".join(c) for c in self.commands]
        return "\n".join(lines)


def _systemctl_works() -> bool:
    """True when a user manager answers (is-system-running exits non-zero when merely degraded)."""
    try:
        done = subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True,
                              timeout=_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _run(report: InstallReport, commands: list[list[str]] | None = None) -> InstallReport:
    """Run `commands` (default: all of the report's) when a user manager answers; stop at the first failure."""
    if commands is None:
        if not _systemctl_works():
            return report
        commands = report.commands
    report.ran = True
    for command in commands:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            report.error = f"{' '.join(command)}: {exc}"
            break
        if done.returncode != 0:
            report.error = f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()}"
            break
    return report


def _write_atomic(path: Path, text: str) -> bool:
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    atomic_write_text(path, text, mode=0o644)
    return True


def install_unit(exec_path: Path | None = None, *, unit_dir: Path | None = None,
                 run_systemctl: bool = True) -> InstallReport:
    """Write the unit, then `daemon-reload` and `enable --now` it where systemctl --user works."""
    exec_path = Path(exec_path) if exec_path is not None else default_exec_path()
    text = render_unit(exec_path)  # ValueError on a relative path
    if not (exec_path.is_file() and os.access(exec_path, os.X_OK)):
        raise FileNotFoundError(f"{exec_path} is not an executable file; is gitlora installed there?")
    target = (unit_dir or user_unit_dir()) / UNIT_NAME
    report = InstallReport(unit_path=target, changed=_write_atomic(target, text), commands=[
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", UNIT_NAME],
    ])
    return _run(report) if run_systemctl else report


def uninstall_unit(*, unit_dir: Path | None = None, run_systemctl: bool = True) -> InstallReport:
    """`disable --now` while the unit file still exists, remove it, then `daemon-reload`.

    Without a reachable systemctl the unit file and its default.target.wants link (what `enable` made) are
    removed here, and the report lists the commands that stop a running instance later.
    """
    directory = unit_dir or user_unit_dir()
    target = directory / UNIT_NAME
    wants = directory / "default.target.wants" / UNIT_NAME
    report = InstallReport(unit_path=target, changed=target.exists() or wants.is_symlink(), commands=[
        ["systemctl", "--user", "disable", "--now", UNIT_NAME],
        ["systemctl", "--user", "daemon-reload"],
    ])
    live = run_systemctl and _systemctl_works()
    if live:
        _run(report, report.commands[:1])
    if wants.is_symlink():
        wants.unlink()
    target.unlink(missing_ok=True)
    if live:
        if report.error is None:
            _run(report, report.commands[1:])
        return report
    report.commands[0] = ["systemctl", "--user", "stop", UNIT_NAME]  # `disable` needs the file we removed
    return report
