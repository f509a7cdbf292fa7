"""The control socket over real AF_UNIX sockets: protocol, error replies, permissions, lifecycle."""
from __future__ import annotations

import json
import os
import select
import shutil
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
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
    too_large = {"ok": False, "error": "request too large: over 65536 bytes"}
    assert replies == [too_large]  # connection closed after the error
    # without a newline in sight the cap still applies
    replies = raw(server.path, b"x" * (200 * 1024))
    assert replies == [too_large]
    assert control.request({"cmd": "status"})["ok"] is True


def test_request_just_under_the_cap_is_served(server):
    req = {"cmd": "status", "arg": ""}
    req["arg"] = "y" * (64 * 1024 - len(json.dumps(req)))
    assert len(json.dumps(req)) == 64 * 1024
    assert control.request(req)["echo"] == req["arg"]


def read_until_eof(sock: socket.socket) -> list[dict]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.parametrize("sent, error", [
    (b"", "idle timeout: no complete request within 0.3 s"),
    (b'{"cmd": "sta', "incomplete request: no newline within 0.3 s (12 bytes received)"),
])
def test_idle_or_partial_connection_gets_an_error_reply_then_eof(sent, error):
    with ControlServer(control_socket_path(), handler, timeout_s=0.3) as srv:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            started = time.monotonic()
            sock.connect(str(srv.path))
            sock.sendall(sent)  # and then nothing
            assert read_until_eof(sock) == [{"ok": False, "error": error}]
            assert time.monotonic() - started >= 0.3
        assert control.request({"cmd": "status"})["ok"] is True


def test_a_client_that_writes_after_its_hang_up_still_reads_the_reason():
    with ControlServer(control_socket_path(), handler, timeout_s=0.3) as srv:
        with connect(srv.path) as sock:
            hung_up = select.poll()
            hung_up.register(sock, select.POLLRDHUP)
            assert hung_up.poll(30_000)  # the server has sent its reason and ended its side
            sock.sendall(b'{"cmd": "status"}\n')  # a late request must not fail with EPIPE or reset
            sock.shutdown(socket.SHUT_WR)
            assert read_until_eof(sock) == [{"ok": False, "error": "idle timeout: no complete request within 0.3 s"}]


def test_idle_clock_restarts_after_each_reply():
    with ControlServer(control_socket_path(), handler, timeout_s=0.3) as srv:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(srv.path))
            sock.sendall(b'{"cmd": "status"}\n')
            assert read_until_eof(sock) == [
                {"ok": True, "state": "idle", "echo": None},
                {"ok": False, "error": "idle timeout: no complete request within 0.3 s"}]


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


# --------------------------------------------------------------------------------------- serving many


class Gate:
    """A handler whose "gate" command blocks until the test opens the gate: a slow request, observable."""

    def __init__(self) -> None:
        self.entered = 0
        self._cond = threading.Condition()
        self._open = threading.Event()

    def __call__(self, req: dict) -> dict:
        if req["cmd"] != "gate":
            return handler(req)
        with self._cond:
            self.entered += 1
            self._cond.notify_all()
        if not self._open.wait(60):
            raise TimeoutError("the test never opened the gate")
        return {"gated": req.get("arg")}

    def wait_entered(self, count: int, timeout: float = 30.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.entered >= count, timeout), f"{self.entered} of {count} entered"

    def open(self) -> None:
        self._open.set()


def connect(path: Path, *, send: bytes = b"") -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(path))
    if send:
        sock.sendall(send)
    return sock


def read_line(sock: socket.socket) -> dict:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, f"EOF before a reply line (got {data!r})"
        data += chunk
    return json.loads(data)


def readable(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets with something to read (a line or EOF) within `timeout`; poll, since fds may pass 1024."""
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN)
    by_fd = {sock.fileno(): sock for sock in socks}
    return [by_fd[fd] for fd, _ in poller.poll(timeout * 1000)]


def still_open_and_silent(sock: socket.socket) -> bool:
    return not readable([sock], 0)  # neither a line (a refusal) nor EOF


def test_status_is_fast_with_a_thousand_idle_clients():
    clients = 1000
    soft = control.raise_open_file_limit()
    if soft < 2 * clients + 200:  # the clients' ends and the server's ends live in this one process
        pytest.skip(f"the open-file limit ({soft}) cannot hold {clients} clients and their server in one process")
    idle: list[socket.socket] = []
    with ControlServer(control_socket_path(), handler, timeout_s=120) as srv:
        try:
            for _ in range(clients):
                idle.append(connect(srv.path))
            # The listen queue is served in order, so once this is answered every idle client was accepted.
            assert control.request({"cmd": "status"}, timeout=30)["ok"] is True
            times = []
            for _ in range(7):
                started = time.perf_counter()
                reply = control.request({"cmd": "status"}, timeout=30)
                times.append(time.perf_counter() - started)
                assert reply == {"ok": True, "state": "idle", "echo": None}
            assert statistics.median(times) < 0.1, times
            assert all(still_open_and_silent(sock) for sock in idle)  # none was refused or dropped
        finally:
            for sock in idle:
                sock.close()


@pytest.mark.parametrize("depth", [64, 1_000, 30_000])
def test_deep_json_gets_an_error_reply_and_the_server_keeps_serving(server, depth):
    # the request object itself is one level: its "arg" nests depth - 1 more
    line = b'{"cmd": "status", "arg": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}\n"
    replies = raw(server.path, line + b'{"cmd": "status", "arg": 1}\n')
    if depth <= 64:
        assert replies[0]["ok"] is True
    else:
        assert replies[0] == {"ok": False, "error": "request nested deeper than 64 levels"}
    assert replies[1] == {"ok": True, "state": "idle", "echo": 1}
    assert control.request({"cmd": "status"})["ok"] is True


@pytest.mark.parametrize("arg", ["[" * 1000, '"\\' + "{" * 1000, "\\\\" + "[" * 100 + '"' + "]" * 100, "x]" * 100])
def test_brackets_inside_strings_do_not_count_as_nesting(server, arg):
    assert control.request({"cmd": "status", "arg": [arg] * 3})["echo"] == [arg] * 3


def test_a_slow_handler_does_not_delay_a_fast_one():
    gate = Gate()
    with ControlServer(control_socket_path(), gate, timeout_s=60) as srv:
        bystanders = [connect(srv.path) for _ in range(32)]  # other clients connected meanwhile, idle
        slow = connect(srv.path, send=b'{"cmd": "gate", "arg": "slow"}\n')
        try:
            gate.wait_entered(1)
            started = time.monotonic()
            assert control.request({"cmd": "status"}, timeout=30)["ok"] is True  # while the slow one still runs
            assert time.monotonic() - started < 5
            gate.open()
            assert read_line(slow) == {"ok": True, "gated": "slow"}
        finally:
            gate.open()
            for sock in [slow, *bystanders]:
                sock.close()


def test_many_concurrent_requests_are_all_answered():
    gate = Gate()
    clients = 200
    with ControlServer(control_socket_path(), gate, timeout_s=60, handler_threads=4) as srv:
        socks = [connect(srv.path, send=json.dumps({"cmd": "gate", "arg": i}).encode() + b"\n")
                 for i in range(clients)]
        try:
            gate.wait_entered(4)  # every handler thread busy: the rest wait in the queue
            gate.open()
            assert [read_line(sock) for sock in socks] == [{"ok": True, "gated": i} for i in range(clients)]
            assert gate.entered == clients
        finally:
            gate.open()
            for sock in socks:
                sock.close()


def test_concurrent_clients(server):
    results: list[dict] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        reply = control.request({"cmd": "status", "arg": i}, timeout=30)
        with lock:
            results.append(reply)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["echo"] for r in results if r["ok"]) == list(range(64))


def test_the_request_queue_is_bounded_and_overflow_is_answered():
    gate = Gate()
    with ControlServer(control_socket_path(), gate, timeout_s=60, handler_threads=1, max_queued=2) as srv:
        socks = [connect(srv.path, send=b'{"cmd": "gate"}\n') for _ in range(10)]
        try:
            gate.wait_entered(1)
            # 1 running + 2 queued are held; the other 7 are answered now, without waiting for the gate
            deadline = time.monotonic() + 30
            answered: list[socket.socket] = []
            while len(answered) < 7 and time.monotonic() < deadline:
                answered = readable(socks, 0.1)
            assert len(answered) == 7
            busy = {"ok": False, "error": "server busy: too many requests in progress (3); try again"}
            assert [read_line(sock) for sock in answered] == [busy] * 7
            held = [sock for sock in socks if sock not in answered]
            gate.open()
            assert [read_line(sock) for sock in held] == [{"ok": True, "gated": None}] * 3
        finally:
            gate.open()
            for sock in socks:
                sock.close()


def test_at_the_connection_limit_the_longest_idle_client_makes_room():
    with ControlServer(control_socket_path(), handler, timeout_s=60, max_connections=3) as srv:
        first, second, third = (connect(srv.path) for _ in range(3))
        try:
            assert control.request({"cmd": "status"}, timeout=30)["ok"] is True
            assert read_until_eof(first) == [{"ok": False, "error": "connection closed: the server holds its limit "
                                              "of 3 connections and this one had waited longest"}]
            assert still_open_and_silent(second) and still_open_and_silent(third)
        finally:
            for sock in (first, second, third):
                sock.close()


def test_a_client_that_never_reads_its_reply_is_dropped():
    big = "z" * (8 * 1024 * 1024)  # far more than a socket buffer holds

    def big_reply(req: dict) -> dict:
        return {"big": big} if req["cmd"] == "big" else handler(req)

    with ControlServer(control_socket_path(), big_reply, timeout_s=0.5) as srv:
        with connect(srv.path, send=b'{"cmd": "big"}\n') as sock:
            assert control.request({"cmd": "status"})["ok"] is True  # the stalled write blocks nobody
            hung_up = select.poll()
            hung_up.register(sock, select.POLLRDHUP)  # the server closed its end, our unread data aside
            assert hung_up.poll(30_000), "the server kept a client that does not read"
            data = b""
            while chunk := sock.recv(1 << 20):
                data += chunk
            assert 0 < len(data) < len(big)  # it was dropped mid-reply


def test_close_is_prompt_and_leaves_no_threads_or_descriptors():
    def control_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("control-")]

    fds_before = len(os.listdir("/proc/self/fd"))
    gate = Gate()
    srv = ControlServer(control_socket_path(), gate, timeout_s=60).start()
    idle = [connect(srv.path) for _ in range(50)]
    busy = connect(srv.path, send=b'{"cmd": "gate"}\n')
    try:
        gate.wait_entered(1)
        started = time.monotonic()
        srv.close(timeout=0.5)  # one handler is stuck in the gate: close does not wait for it beyond 0.5 s
        assert time.monotonic() - started < 5
        assert read_until_eof(busy) == [{"ok": False, "error": "the gitlora daemon is shutting down"}]
        assert all(read_until_eof(sock) == [] for sock in idle)
        assert not srv.path.exists()
        gate.open()  # the stuck handler finishes, finds the server closed and its thread exits
        for thread in control_threads():
            thread.join(30)
        assert control_threads() == []
    finally:
        gate.open()
        for sock in [busy, *idle]:
            sock.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_the_cli_prints_one_line_when_the_server_refuses(capsys):
    from gitlora.daemon import cli

    gate = Gate()
    with ControlServer(control_socket_path(), gate, timeout_s=60, handler_threads=1, max_queued=0) as srv:
        with connect(srv.path, send=b'{"cmd": "gate"}\n') as holder:
            try:
                gate.wait_entered(1)  # the only handler is taken: the next request is refused, for real
                capsys.readouterr()
                assert cli.main(["status"]) == 2
                out, err = capsys.readouterr()
                assert (out, err) == ("", "gitlora: error: server busy: too many requests in progress (1); try again\n")
                assert cli.main(["pause"]) == 1
                out, err = capsys.readouterr()
                assert (out, err) == ("", "gitlora: server busy: too many requests in progress (1); try again\n")
            finally:
                gate.open()
            assert read_line(holder) == {"ok": True, "gated": None}
