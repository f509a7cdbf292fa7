"""sd_notify against a real AF_UNIX datagram socket standing in for systemd (no systemd runs here)."""
from __future__ import annotations

import os
import socket

import pytest

from gitlora.daemon import sdnotify


@pytest.fixture
def listener(monkeypatch):
    """A bound datagram socket in the short per-test runtime dir; NOTIFY_SOCKET points at it."""
    path = os.path.join(os.environ["XDG_RUNTIME_DIR"], "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_noop_without_notify_socket():
    assert "NOTIFY_SOCKET" not in os.environ
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False and sdnotify.watchdog_ping() is False


def test_messages_reach_the_socket(listener):
    assert sdnotify.ready() is True
    assert recv(listener) == "READY=1"
    assert sdnotify.status("ingesting 3/10\ncommits") is True
    assert recv(listener) == "STATUS=ingesting 3/10 commits"
    assert sdnotify.watchdog_ping() is True
    assert recv(listener) == "WATCHDOG=1"
    assert sdnotify.stopping() is True
    assert recv(listener) == "STOPPING=1"
    assert sdnotify.ready("serving 2 repos") is True
    assert recv(listener) == "READY=1\nSTATUS=serving 2 repos"


def test_abstract_namespace(monkeypatch):
    name = f"gitlora-test-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready() is True
        assert recv(sock) == "READY=1"


def test_unreachable_or_unsupported_socket_is_false_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval_s() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # inherited from a parent: not ours
    assert sdnotify.watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "abc", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval_s() is None
