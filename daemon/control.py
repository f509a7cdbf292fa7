"""The daemon's control socket: a JSON-lines server and the CLI's client (the contract in shared/DESIGN.md).

One JSON object per line each way; a connection may carry several requests. The socket lives in a 0700
directory owned by us and every peer's uid is checked with SO_PEERCRED, because anyone who can talk to the
daemon can make it train, roll back adapters and read repository data: the directory mode keeps others out
on a sane system, the uid check still holds when the directory is shared or misconfigured.

Threads, not asyncio: the daemon is thread-based (ingest threads, watchdog, APScheduler) and requests are
rare, so a thread per connection with a hard cap is the smallest thing that cannot starve the process.
"""
from __future__ import annotations

import errno
import json
import os
import select
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable

from gitlora.daemon import log
from gitlora.daemon.paths import control_socket_path

Handler = Callable[[dict], dict]
_MAX_REPLY = 16 * 1024 * 1024  # the client's bound on one reply line; status replies are a few KiB


class ControlError(Exception):
    """A request failed: an error reply (when the caller asked for check=True) or a protocol failure."""


class DaemonNotRunning(ControlError):
    """Nothing listens on the control socket (absent, or a stale file whose owner died)."""


class AlreadyRunning(ControlError):
    """Another live server answers on the socket path we were asked to bind."""


# --------------------------------------------------------------------------------------------- server


def _prepare_dir(directory: Path, mode: int) -> None:
    """Create the socket directory with `mode`, or fix the mode of ours; refuse one we do not own.

    lstat, not stat: the /tmp fallback of runtime_dir() is guessable, so a symlink planted there by another
    user must not redirect our socket.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(directory, mode)
    except FileExistsError:
        pass
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{directory} is not a directory; refusing to put the control socket there")
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{directory} is owned by uid {st.st_uid}, not us (uid {os.geteuid()})")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(directory, mode)  # mkdir's mode is filtered by the umask; an old dir may be too open


def _remove_stale(path: Path) -> None:
    """Unlink a socket file nobody answers on; refuse a live one or a file that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # the previous daemon died without cleaning up
        return
    except OSError as exc:
        raise AlreadyRunning(f"cannot tell whether {path} is live ({exc}); not replacing it") from exc
    finally:
        probe.close()
    raise AlreadyRunning(f"another server is already listening on {path}")


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class ControlServer:
    """Listen on `path`, answer each request line with `handler(request)`.

    The handler gets the decoded request dict (always with a string "cmd") and returns a dict; "ok": true is
    added when absent. Its exceptions become `{"ok": false, "error": "internal error: ..."}` so one bad
    command cannot take the daemon down. `timeout_s` bounds how long one request may take to arrive (a
    silent or trickling client is disconnected); `max_connections` bounds the threads.
    """

    def __init__(self, path: Path, handler: Handler, *, max_request: int = 64 * 1024, timeout_s: float = 5.0,
                 max_connections: int = 16, dir_mode: int = 0o700) -> None:
        self.path = Path(path)
        self.handler = handler
        self.max_request = max_request
        self.timeout_s = timeout_s
        self.dir_mode = dir_mode  # 0o700 always, except tests that must let another uid reach the socket
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._sock: socket.socket | None = None
        self._wake_r = self._wake_w = -1
        self._accept_thread: threading.Thread | None = None
        self._ident: tuple[int, int] | None = None
        self._closed = threading.Event()
        self._log = log.get("gitlora.control")

    # lifecycle -------------------------------------------------------------------------------------

    def start(self) -> "ControlServer":
        """Bind and listen, then serve from a background thread; returns once clients can connect."""
        if self._sock is not None:
            raise RuntimeError("ControlServer already started")
        _prepare_dir(self.path.parent, self.dir_mode)
        _remove_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o077)  # process-wide, but only for the instant of bind(): the file is born 0600
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise AlreadyRunning(f"another server bound {self.path} first") from exc
            raise
        try:
            st = os.lstat(self.path)
            self._ident = (st.st_dev, st.st_ino)
            sock.listen(64)
        except OSError:
            sock.close()
            self.path.unlink(missing_ok=True)
            raise
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)
        self._accept_thread.start()
        self._log.info("control socket listening", path=str(self.path))
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, hang up on open connections, remove the socket file if it is still ours."""
        if self._sock is None or self._closed.is_set():
            return
        self._closed.set()
        os.write(self._wake_w, b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv()
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        try:  # while our socket is still bound its inode cannot be reused, so the identity check is sound
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:  # never unlink a successor's socket
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._log.info("control socket closed", path=str(self.path))

    def __enter__(self) -> "ControlServer":
        return self.start() if self._sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # serving ---------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        poller = select.poll()  # not select(): the daemon may hold more than 1024 descriptors
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closed.is_set():
            ready = {fd for fd, _ in poller.poll()}
            if self._closed.is_set() or self._wake_r in ready:
                return
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:  # EMFILE and friends: back off instead of spinning on a readable socket
                self._log.warning("control accept failed", error=str(exc))
                time.sleep(0.1)
                continue
            if not self._slots.acquire(blocking=False):
                self._reply_and_close(conn, {"ok": False, "error": "server busy: too many connections"})
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True)
            with self._lock:
                self._conns.add(conn)
                self._threads.add(thread)
            try:
                thread.start()
            except RuntimeError:  # "can't start new thread": refuse this one, keep the server up
                with self._lock:
                    self._conns.discard(conn)
                    self._threads.discard(thread)
                self._slots.release()
                self._reply_and_close(conn, {"ok": False, "error": "server busy: cannot start a thread"})

    def _reply_and_close(self, conn: socket.socket, reply: dict) -> None:
        try:
            conn.settimeout(1.0)
            conn.sendall(_encode(reply))
        except OSError:
            pass
        finally:
            _discard_pending(conn)
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            uid = _peer_uid(conn)
            if uid != os.geteuid():
                self._log.warning("control peer refused", uid=uid)
                self._send(conn, {"ok": False, "error": f"permission denied: uid {uid}"})
                return
            buf = b""
            while not self._closed.is_set():
                line, buf, error = self._read_line(conn, buf)
                if error:
                    self._send(conn, {"ok": False, "error": error})
                    return
                if line is None:
                    return  # EOF or idle timeout
                if line.strip():
                    self._send(conn, self._answer(line))
        except OSError:
            pass  # the peer went away mid-reply
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            _discard_pending(conn)
            conn.close()
            self._slots.release()

    def _read_line(self, conn: socket.socket, buf: bytes) -> tuple[bytes | None, bytes, str | None]:
        """Next request line (without newline), remaining buffer, error; line is None on EOF/timeout."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            newline = buf.find(b"\n")
            if newline >= 0:
                if newline > self.max_request:
                    return None, b"", "request too large"
                return buf[:newline], buf[newline + 1:], None
            if len(buf) > self.max_request:
                return None, b"", "request too large"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, b"", None
            conn.settimeout(remaining)
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                return None, b"", None
            if not chunk:
                # A client that half-closes without a final newline still gets its answer.
                return (buf if buf.strip() else None), b"", None
            buf += chunk

    def _answer(self, line: bytes) -> dict:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, ValueError) as exc:
            return {"ok": False, "error": f"malformed JSON: {exc}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "request must be a JSON object"}
        if not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'request needs a "cmd" string'}
        try:
            reply = self.handler(request)
            if not isinstance(reply, dict):
                raise TypeError(f"handler returned {type(reply).__name__}, not dict")
            reply = dict(reply)
            reply.setdefault("ok", True)
            _encode(reply)  # fail here, inside the try, if the reply cannot be serialised
            return reply
        except Exception as exc:  # noqa: BLE001 - one bad command must not kill the daemon
            self._log.exception("control handler failed", cmd=request.get("cmd"))
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def _send(self, conn: socket.socket, reply: dict) -> None:
        conn.settimeout(self.timeout_s)  # a client that never reads cannot pin the thread forever
        conn.sendall(_encode(reply))


def _discard_pending(conn: socket.socket) -> None:
    """Read (a bounded amount of) what the peer already sent before hanging up: closing with unread data
    makes Linux reset the connection, and a client still reading our last error reply may see ECONNRESET."""
    try:
        conn.setblocking(False)
        for _ in range(16):
            if not conn.recv(65536):
                return
    except OSError:
        pass


def _encode(obj: Any) -> bytes:
    """One line of JSON; Paths and datetimes are common in replies, so fall back to str()."""
    return json.dumps(obj, default=str, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


# --------------------------------------------------------------------------------------------- client


class Connection:
    """One client connection for several requests (the CLI usually needs just `request()`)."""

    def __init__(self, path: Path | None = None, *, timeout: float = 5.0) -> None:
        self.path = Path(path) if path is not None else control_socket_path()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buf = b""
        try:
            self._connect(timeout)
        except FileNotFoundError:
            self._sock.close()
            raise DaemonNotRunning(
                f"gitlora daemon is not running: no control socket at {self.path} "
                "(start it with `gitlora daemon` or `systemctl --user start gitlora`)") from None
        except ConnectionRefusedError:
            self._sock.close()
            raise DaemonNotRunning(
                f"gitlora daemon is not running: nothing listens on {self.path} (stale socket file)") from None
        except OSError as exc:
            self._sock.close()
            raise ControlError(f"cannot connect to the gitlora daemon at {self.path}: {exc}") from exc

    def _connect(self, timeout: float) -> None:
        """connect(), retrying while the listen backlog is full: with a timeout set, an AF_UNIX connect to a
        saturated listener fails at once with EAGAIN instead of waiting for room."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock.connect(str(self.path))
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the control socket's backlog stayed full for {timeout} s") from None
                time.sleep(0.01)

    def request(self, payload: dict, *, check: bool = False) -> dict:
        """Send one request, return the reply; with check=True an `"ok": false` reply raises ControlError.

        A server that refuses us (busy, wrong uid) may answer and hang up before reading the request, so a
        failed send or a reset still reads whatever reply already arrived.
        """
        failure: OSError | None = None
        try:
            self._sock.sendall(_encode(payload))
        except (BrokenPipeError, ConnectionResetError) as exc:
            failure = exc
        except TimeoutError:
            raise ControlError(f"the gitlora daemon did not accept a request within {self._sock.gettimeout()} s") \
                from None
        try:
            while b"\n" not in self._buf:
                if len(self._buf) > _MAX_REPLY:
                    raise ControlError(f"reply from {self.path} exceeds {_MAX_REPLY} bytes")
                chunk = self._sock.recv(65536)
                if not chunk:
                    break
                self._buf += chunk
        except TimeoutError:
            raise ControlError(f"the gitlora daemon did not answer within {self._sock.gettimeout()} s") from None
        except ConnectionResetError as exc:
            failure = failure or exc
        except OSError as exc:
            raise ControlError(f"control connection to {self.path} failed: {exc}") from exc
        if b"\n" not in self._buf and failure is not None:
            raise ControlError(f"control connection to {self.path} failed: {failure}") from failure
        line, sep, self._buf = self._buf.partition(b"\n")
        if not sep and not line.strip():
            raise ControlError(f"the gitlora daemon closed the connection without a reply ({self.path})")
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise ControlError(f"protocol error: the daemon's reply is not JSON: {exc}") from exc
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise ControlError(f'protocol error: reply lacks a boolean "ok": {line[:200]!r}')
        if check and not reply["ok"]:
            raise ControlError(str(reply.get("error", "unknown error")))
        return reply

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(payload: dict, *, path: Path | None = None, timeout: float = 5.0, check: bool = False) -> dict:
    """One request on a fresh connection; raises DaemonNotRunning when nothing listens on the socket."""
    with Connection(path, timeout=timeout) as conn:
        return conn.request(payload, check=check)
