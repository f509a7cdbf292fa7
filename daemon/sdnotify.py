"""sd_notify(3) for `Type=notify` + `WatchdogSec=`: tell systemd we are ready, alive, stopping.

No library on purpose: the protocol is one datagram of `KEY=value` lines to the AF_UNIX socket named by
$NOTIFY_SOCKET, and `sdnotify` on PyPI is tiny and unmaintained (systemd-python needs libsystemd headers
to build). Every call is a no-op returning False outside systemd, so the daemon calls these unconditionally.
The unit says `NotifyAccess=main`: only the daemon process itself may send (threads are fine, children are not).
"""
from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to $NOTIFY_SOCKET; False when unset, unsupported or unreachable."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    elif not address.startswith("/"):
        return False  # unset, or vsock:… which only VMs' PID 1 uses
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
        return True
    except OSError:
        return False  # systemd gone (shutting down) or a stale variable: never crash the daemon over it


def ready(status_text: str | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text else ""))


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Free-form line shown by `systemctl --user status gitlora`."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval_s() -> float | None:
    """The watchdog timeout in seconds if it applies to this process, else None (ping at about half of it).

    systemd sets WATCHDOG_USEC and WATCHDOG_PID; a child that inherited them must not act on them, hence
    the pid check (the same rule as sd_watchdog_enabled(3)).
    """
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split("\n"))
