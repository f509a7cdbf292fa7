"""The control socket over real AF_UNIX sockets: protocol, error replies, permissions, lifecycle."""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest

from gitlora.daemon import control
from gitlora.daemon.control import AlreadyRunning, ControlError, ControlServer, DaemonNotRunning
from gitlora.daemon.paths import control_socket_path


def handler(req: dict) -> dict:
    cmd = req["cmd"]
    if cmd == "status":
        return {"state": "idle", "echo": req.get("arg")}
    if cmd == "boom":
        raise RuntimeError("kaboom")
    if cmd == "notdict":
        return ["nope"]  # type: ignore[return-value]
    return {"ok": False, "error": f"unknown command: {cmd}"}


@pytest.fixture
def server():
    srv = ControlServer(control_socket_path(), handler, timeout_s=2.0).start()
    yield srv
    srv.close()


def raw(path: Path, data: bytes, *, timeout: float = 5.0) -> list[dict]:
    """Send raw bytes, half-close, read every reply line until the server hangs up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server hung up early (e.g. request too large): its reply is still readable
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return [json.loads(line) for line in b"".join(chunks).splitlines() if line.strip()]


def test_round_trip(server):
    reply = control.request({"cmd": "status", "arg": [1, "x"]})
    assert reply == {"ok": True, "state": "idle", "echo": [1, "x"]}


def test_several_requests_on_one_connection(server):
    with control.Connection() as conn:
        for i in range(5):
            assert conn.request({"cmd": "status", "arg": i})["echo"] == i
    # and pipelined in one write
    replies = raw(server.path, b"".join(json.dumps({"cmd": "status", "arg": i}).encode() + b"\n" for i in range(3)))
    assert [r["echo"] for r in replies] == [0, 1, 2]


@pytest.mark.parametrize("line, fragment", [
    (b"{not json\n", "malformed JSON"),
    (b"\xff\xfe\n", "malformed JSON"),
    (b"[1, 2]\n", "JSON object"),
    (b'"status"\n', "JSON object"),
    (b'{"command": "status"}\n', '"cmd"'),
    (b'{"cmd": 3}\n', '"cmd"'),
])
def test_bad_requests_get_error_and_connection_survives(server, line, fragment):
    replies = raw(server.path, line + b'{"cmd": "status"}\n')
    assert replies[0]["ok"] is False and fragment in replies[0]["error"]
    assert replies[1] == {"ok": True, "state": "idle", "echo": None}


def test_unknown_command_from_handler(server):
    reply = control.request({"cmd": "frobnicate"})
    assert reply == {"ok": False, "error": "unknown command: frobnicate"}
    with pytest.raises(ControlError, match="unknown command"):
        control.request({"cmd": "frobnicate"}, check=True)
    assert control.request({"cmd": "status"}, check=True)["ok"] is True


@pytest.mark.parametrize("cmd, fragment", [("boom", "RuntimeError: kaboom"), ("notdict", "not dict")])
def test_handler_failure_is_internal_error_and_server_lives(server, cmd, fragment):
    with control.Connection() as conn:
        reply = conn.request({"cmd": cmd})
        assert reply["ok"] is False and reply["error"].startswith("internal error: ") and fragment in reply["error"]
        assert conn.request({"cmd": "status"})["ok"] is True
    assert control.request({"cmd": "status"})["state"] == "idle"


def test_oversized_request_is_refused_and_closed(server):
    big = b'{"cmd": "status", "pad": "' + b"x" * (64 * 1024 + 10) + b'"}\n'
    replies = raw(server.path, big + b'{"cmd": "status"}\n')
    assert replies == [{"ok": False, "error": "request too large"}]  # connection closed after the error
    # without a newline in sight the cap still applies
    replies = raw(server.path, b"x" * (200 * 1024))
    assert replies == [{"ok": False, "error": "request too large"}]
    assert control.request({"cmd": "status"})["ok"] is True


def test_request_just_under_the_cap_is_served(server):
    req = {"cmd": "status", "arg": ""}
    req["arg"] = "y" * (64 * 1024 - len(json.dumps(req)))
    assert len(json.dumps(req)) == 64 * 1024
    assert control.request(req)["echo"] == req["arg"]


def test_idle_connection_is_dropped_after_timeout(tmp_path):
    srv = ControlServer(control_socket_path(), handler, timeout_s=0.3).start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(srv.path))
            sock.sendall(b'{"cmd": "sta')  # never finishes
            assert sock.recv(100) == b""  # server hung up without waiting for the client's 5 s
        assert control.request({"cmd": "status"})["ok"] is True
    finally:
        srv.close()


def test_modes_of_dir_and_socket(server):
    directory = server.path.parent
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    st = os.lstat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) & 0o077 == 0


def test_existing_dir_with_wrong_mode_is_fixed():
    directory = control_socket_path().parent
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    with ControlServer(control_socket_path(), handler):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


def test_dir_owned_by_someone_else_is_refused():
    if os.geteuid() != 0:
        pytest.skip("needs root to create a directory owned by another uid")
    directory = control_socket_path().parent
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(PermissionError, match="owned by uid 65534"):
        ControlServer(control_socket_path(), handler).start()


def test_symlinked_dir_is_refused(tmp_path):
    directory = control_socket_path().parent
    directory.symlink_to(tmp_path)
    with pytest.raises(PermissionError, match="not a directory"):
        ControlServer(control_socket_path(), handler).start()


def test_stale_socket_file_is_replaced():
    path = control_socket_path()
    path.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a crashed daemon leaves behind
    assert path.exists()
    with pytest.raises(DaemonNotRunning, match="stale"):
        control.request({"cmd": "status"})
    with ControlServer(path, handler):
        assert control.request({"cmd": "status"})["ok"] is True
    assert not path.exists()  # close() cleans up


def test_non_socket_file_is_not_replaced():
    path = control_socket_path()
    path.parent.mkdir(mode=0o700)
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        ControlServer(path, handler).start()
    assert path.read_text() == "precious"


def test_second_server_on_live_path_is_refused(server):
    with pytest.raises(AlreadyRunning):
        ControlServer(server.path, handler).start()
    assert control.request({"cmd": "status"})["ok"] is True  # the first one is untouched


def test_close_leaves_a_successors_socket_alone():
    path = control_socket_path()
    first = ControlServer(path, handler).start()
    path.unlink()  # e.g. an operator removed it, and a new daemon took the path
    with ControlServer(path, handler):
        first.close()
        assert control.request({"cmd": "status"})["ok"] is True


def test_client_on_absent_socket():
    path = control_socket_path()
    with pytest.raises(DaemonNotRunning, match=str(path)):
        control.request({"cmd": "status"})


def test_client_on_a_server_that_never_answers():
    path = control_socket_path()
    path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen(1)
        with pytest.raises(ControlError, match="did not answer"):
            control.request({"cmd": "status"}, timeout=0.3)


def test_concurrent_clients(server):
    results: list[dict] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        reply = control.request({"cmd": "status", "arg": i})
        with lock:
            results.append(reply)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r["ok"]]
    busy = [r for r in results if not r["ok"]]
    assert len(results) == 40 and len(ok) >= 16
    assert all("busy" in r["error"] for r in busy)


def test_close_hangs_up_on_open_connections():
    srv = ControlServer(control_socket_path(), handler, timeout_s=30).start()
    conn = control.Connection()
    assert conn.request({"cmd": "status"})["ok"]
    srv.close(timeout=2)
    with pytest.raises(ControlError):
        conn.request({"cmd": "status"})
    conn.close()


def test_peer_with_another_uid_is_refused():
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    # A directory nobody can traverse but not list (0711), and a socket they may connect to (0666): then the
    # connection really happens and it is SO_PEERCRED that refuses it, not the file system.
    directory = Path(tempfile.mkdtemp(prefix="gl-peer-", dir="/tmp"))
    try:
        os.chmod(directory, 0o711)
        path = directory / "control.sock"
        with ControlServer(path, handler, dir_mode=0o711) as srv:
            os.chmod(path, 0o666)
            client = textwrap.dedent(f"""
                import socket
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(5)
                s.connect({str(path)!r})
                try:
                    s.sendall(b'{{"cmd": "status"}}\\n')
                except OSError:
                    pass  # the server may refuse us before reading: its reply is still there to read
                data = b""
                try:
                    while chunk := s.recv(4096):
                        data += chunk
                except ConnectionResetError:
                    pass
                print(data.decode(), end="")
            """)
            done = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                                   sys.executable, "-I", "-c", client],
                                  capture_output=True, text=True, timeout=30, cwd="/")
            assert done.returncode == 0, done.stderr
            assert [json.loads(line) for line in done.stdout.splitlines()] == [
                {"ok": False, "error": "permission denied: uid 65534"}]
            assert control.request({"cmd": "status"}, path=srv.path)["ok"] is True
    finally:
        shutil.rmtree(directory, ignore_errors=True)
