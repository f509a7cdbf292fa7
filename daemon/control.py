"""The daemon's control socket: a JSON-lines server and the CLI's client (DESIGN.md, *Control socket*).

One JSON object per line each way; a connection may carry several requests, answered in order. Every request
gets a reply line, and so does a connection we hang up on while it waits for one (idle, incomplete, too
large, server full): the client always learns why. The socket lives in a 0700 directory owned by us and
every peer's uid is checked with SO_PEERCRED, because anyone who can talk to the daemon can make it train,
roll back adapters and read repository data: the directory mode keeps others out on a sane system, the uid
check still holds when the directory is shared or misconfigured.

Shape: one `selectors` loop thread owns every socket (no thread per connection, so thousands of idle clients
cost a descriptor and a small buffer each), and a few handler threads run the requests, because a handler may
take seconds (status reads stores, register opens a repository) and must not stall the loop or the others.
Requests beyond the busy handlers wait in a bounded queue. selectors rather than asyncio: the rest of the
daemon is threads and its handlers are blocking code, and the server needs its own buffer anyway (to tell an
idle client from a half-sent line, and to bound a request's size and nesting before decoding it); asyncio
would add an event loop to drive across threads, cancellation on close and an executor whose threads block
interpreter exit, for no less code here.
"""
from __future__ import annotations

import collections
import errno
import json
import math
import os
import queue
import re
import resource
import selectors
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable

from gitlora.daemon import compact_json, log
from gitlora.daemon.paths import control_socket_path

Handler = Callable[[dict], dict]
_MAX_REPLY = 16 * 1024 * 1024  # the client's bound on one reply line; status replies are a few KiB
_RECV = 65536
_ACCEPT_BATCH = 64  # connections accepted per wake-up, so a connect storm cannot starve replies
_ACCEPT_PAUSE_S = 0.5  # out of descriptors: the listener stays readable, so stop polling it for a while
_MAX_SLEEP_S = 60.0  # select() timeout cap: an infinite or huge timeout_s must not overflow it


class ControlError(Exception):
    """A request failed: an error reply (when the caller asked for check=True) or a protocol failure."""


class DaemonNotRunning(ControlError):
    """Nothing listens on the control socket (absent, or a stale file whose owner died)."""


class AlreadyRunning(ControlError):
    """Another live server answers on the socket path we were asked to bind."""


# --------------------------------------------------------------------------------------------- limits


def raise_open_file_limit(wanted: int = 65536) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard limit (at most `wanted`); returns the soft limit in force.

    Each control client holds a descriptor, and the common soft default (1024) would let a thousand idle
    clients starve ingest of files. Capped at `wanted` because some hard limits are ~1e6 or unlimited and a
    process needs nowhere near that. Call once at start, before threads open files.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            soft = ceiling
        except (ValueError, OSError):
            pass  # keep the old limit; the connection cap below is derived from what is in force
    return soft


def _default_max_connections() -> int:
    """Half the descriptors we may open, so control clients can never take the ones ingest needs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 8192 if soft == resource.RLIM_INFINITY else max(16, min(8192, soft // 2))


# --------------------------------------------------------------------------------------------- requests

_JSON_STRING = re.compile(rb'"[^"]*"')  # once escapes are gone (below), a string is quote, non-quotes, quote
_BRACKET = re.compile(rb"[\[\]{}]")


def _nesting_depth(line: bytes) -> int:
    """How deep the arrays and objects of `line` nest, counted without decoding (brackets in strings skipped).

    json.loads recurses per level, so a deep request must be refused before it is decoded. Escapes go first:
    an escaped backslash, then an escaped quote, leaving strings that are plain quote-to-quote runs; linear
    time whatever the input. Malformed input may count wrong, and json.loads then rejects it anyway.
    """
    text = _JSON_STRING.sub(b"", line.replace(b"\\\\", b"").replace(b'\\"', b""))
    depth = deepest = 0
    for bracket in _BRACKET.findall(text):
        if bracket in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _parse(line: bytes, max_depth: int) -> tuple[dict | None, str | None]:
    """The request in one line, or the error to reply with."""
    openers = line.count(b"[") + line.count(b"{")  # most requests have a few: no need to look closer
    if openers > max_depth and _nesting_depth(line) > max_depth:
        return None, f"request nested deeper than {max_depth} levels"
    try:
        request = json.loads(line)
    except RecursionError:  # cannot happen below the depth bound; kept so it can never escape
        return None, f"request nested deeper than {max_depth} levels"
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"malformed JSON: {exc}"
    if not isinstance(request, dict):
        return None, "request must be a JSON object"
    if not isinstance(request.get("cmd"), str):
        return None, 'request needs a "cmd" string'
    return request, None


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


class _Conn:
    """One client as the loop sees it. At most one of its requests is in the handlers at a time (`busy`);
    while busy or while its reply is still going out, it is not read, so a client that pipelines faster than
    it is answered is held back by its own socket buffer, not by our memory."""

    __slots__ = ("sock", "buf", "out", "busy", "eof", "lingering", "events", "closed")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.out = memoryview(b"")  # reply bytes not yet sent (a view: sending in parts copies nothing)
        self.busy = False
        self.eof = False  # the client half-closed: answer what it sent, then hang up
        self.lingering = False  # told why it is being hung up on; waits for the client's EOF (see _hang_up)
        self.events = 0  # what the selector watches for it (0: not registered)
        self.closed = False


_WAKE = object()  # selector key data of the wake-up pipe (the listener's is None)


class ControlServer:
    """Listen on `path`, answer each request line with `handler(request)` run on a handler thread.

    The handler gets the decoded request dict (always with a string "cmd") and returns a dict; "ok": true is
    added when absent. Its exceptions become `{"ok": false, "error": "internal error: ..."}` so one bad
    command cannot take the daemon down. `timeout_s` bounds how long a connection may go without a complete
    request (then it gets an "idle timeout" or "incomplete request" reply and is closed) and how long a reply
    may take to be read. `max_request` and `max_depth` bound one request's bytes and nesting. At most
    `handler_threads` requests run at once and `max_queued` wait; beyond that a request is answered "server
    busy". At `max_connections` (default: half the open-file limit) the longest-idle connection is closed to
    make room.
    """

    def __init__(self, path: Path, handler: Handler, *, max_request: int = 64 * 1024, max_depth: int = 64,
                 timeout_s: float = 5.0, max_connections: int | None = None, handler_threads: int = 8,
                 max_queued: int = 1024, dir_mode: int = 0o700) -> None:
        if handler_threads < 1 or max_queued < 0 or max_request < 1 or max_depth < 1 or not timeout_s > 0:
            raise ValueError("ControlServer needs handler_threads >= 1, max_queued >= 0, max_request >= 1, "
                             "max_depth >= 1 and timeout_s > 0")
        self.path = Path(path)
        self.handler = handler
        self.max_request = max_request
        self.max_depth = max_depth
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.handler_threads = handler_threads
        self.max_queued = max_queued
        self.dir_mode = dir_mode  # 0o700 always, except tests that must let another uid reach the socket
        self._sock: socket.socket | None = None
        self._ident: tuple[int, int] | None = None
        self._selector: selectors.BaseSelector | None = None
        self._conns: set[_Conn] = set()
        # Connections waiting on a client (for a request, or for it to read a reply), by when they started
        # waiting: every deadline is "then + timeout_s" (read at expiry, so a reloaded timeout applies to all
        # alike), so insertion order is deadline order and the next expiry and the longest-idle connection are
        # both at the front.
        self._waiting_since: collections.OrderedDict[_Conn, float] = collections.OrderedDict()
        self._in_handlers = 0  # requests running or queued (loop thread only)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._results: collections.deque[tuple[_Conn, bytes]] = collections.deque()
        self._wake_lock = threading.Lock()  # guards the wake pipe against close() closing it under a worker
        self._wake_r = self._wake_w = -1
        self._loop_thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._closing = False
        self._accept_paused_until = 0.0
        self._accept_warned_at = -math.inf
        self._log = log.get("gitlora.control")

    # lifecycle -------------------------------------------------------------------------------------

    def start(self) -> "ControlServer":
        """Bind and listen, then serve from background threads; returns once clients can connect."""
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
            sock.listen(1024)  # the kernel caps it at net.core.somaxconn; a connect storm waits there
            sock.setblocking(False)
        except OSError:
            sock.close()
            self.path.unlink(missing_ok=True)
            raise
        if self.max_connections is None:
            self.max_connections = _default_max_connections()
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()  # epoll: no FD_SETSIZE limit, cost per ready socket
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        for i in range(self.handler_threads):
            worker = threading.Thread(target=self._work, name=f"control-handler-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self._loop_thread = threading.Thread(target=self._loop, name="control-loop", daemon=True)
        self._loop_thread.start()
        self._log.info("control socket listening", path=str(self.path), max_connections=self.max_connections)
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, hang up on every connection, remove the socket file if it is still ours.

        Requests in the handlers get a "shutting down" reply at once; their threads get up to `timeout`
        to finish (a handler cannot be interrupted) and exit as soon as they do.
        """
        if self._sock is None or self._closing:
            return
        self._closing = True
        deadline = time.monotonic() + timeout
        self._wake()
        assert self._loop_thread is not None
        self._loop_thread.join(timeout)  # it closes every connection and the selector on its way out
        for _ in self._workers:
            self._jobs.put(None)
        running = 0
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            running += worker.is_alive()
        if running:
            self._log.warning("control handlers still running at close", threads=running)
        try:  # while our socket is still bound its inode cannot be reused, so the identity check is sound
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:  # never unlink a successor's socket
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._sock.close()
        with self._wake_lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        self._log.info("control socket closed", path=str(self.path))

    def __enter__(self) -> "ControlServer":
        return self.start() if self._sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full of wake-ups already

    # handler threads -------------------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            conn, request = job
            reply = self._answer(request)
            if self._closing:
                continue  # the loop already told the client; nobody reads the results any more
            self._results.append((conn, reply))
            self._wake()

    def _answer(self, request: dict) -> bytes:
        try:
            reply = self.handler(request)
            if not isinstance(reply, dict):
                raise TypeError(f"handler returned {type(reply).__name__}, not dict")
            reply = dict(reply)
            reply.setdefault("ok", True)
            return _encode(reply)  # inside the try: a reply that cannot be serialised is an internal error
        except Exception as exc:  # noqa: BLE001 - one bad command must not kill the daemon
            self._log.exception("control handler failed", cmd=request.get("cmd"))
            return _encode({"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"})

    # the loop --------------------------------------------------------------------------------------

    def _loop(self) -> None:
        assert self._selector is not None
        try:
            while not self._closing:
                for key, mask in self._selector.select(self._sleep_s()):
                    if key.data is None:
                        self._accept()
                    elif key.data is _WAKE:
                        _drain(self._wake_r)
                    else:
                        self._guarded(key.data, mask)
                while self._results:
                    conn, reply = self._results.popleft()
                    self._in_handlers -= 1
                    if not conn.closed:
                        conn.busy = False
                        conn.out = memoryview(reply)
                        self._guarded(conn, 0)
                self._expire(time.monotonic())
                if self._accept_paused_until and time.monotonic() >= self._accept_paused_until:
                    self._accept_paused_until = 0.0
                    self._selector.register(self._sock, selectors.EVENT_READ, None)
        except Exception:  # noqa: BLE001 - a bug here must be loud, and must still release every socket
            self._log.exception("control loop failed")
        finally:
            for conn in list(self._conns):
                if conn.busy:  # it waits for a reply that will not come
                    self._hang_up(conn, "the gitlora daemon is shutting down", linger=False)
                else:
                    self._drop(conn)
            self._selector.close()

    def _sleep_s(self) -> float | None:
        wake_at = [self._accept_paused_until] if self._accept_paused_until else []
        if self._waiting_since:
            wake_at.append(next(iter(self._waiting_since.values())) + self.timeout_s)
        if not wake_at:
            return None
        return min(_MAX_SLEEP_S, max(0.0, min(wake_at) - time.monotonic()))

    def _guarded(self, conn: _Conn, mask: int) -> None:
        """Serve one connection's event; a bug while serving it costs that connection, not the server."""
        if conn.closed:
            return  # dropped earlier in this round (evicted, say): its event is stale
        try:
            if mask & selectors.EVENT_READ:
                self._read(conn)
            self._advance(conn)
        except Exception:  # noqa: BLE001
            self._log.exception("control connection failed")
            self._drop(conn)

    def _accept(self) -> None:
        assert self._sock is not None and self._selector is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    continue  # e.g. ECONNABORTED: that client is gone, the next may be fine
                now = time.monotonic()
                if now - self._accept_warned_at > 60:
                    self._accept_warned_at = now
                    self._log.warning("control accept failed; pausing", error=str(exc))
                self._selector.unregister(self._sock)  # readable until accepted: do not spin on it
                self._accept_paused_until = now + _ACCEPT_PAUSE_S
                return
            sock.setblocking(False)
            conn = _Conn(sock)
            try:
                uid = _peer_uid(sock)
            except OSError:
                sock.close()
                continue
            if uid != os.geteuid():
                self._log.warning("control peer refused", uid=uid)
                self._conns.add(conn)
                self._hang_up(conn, f"permission denied: uid {uid}")
                continue
            assert self.max_connections is not None
            if len(self._conns) >= self.max_connections:
                if not self._waiting_since:  # every connection is waiting on a handler: none can be dropped
                    self._hang_up(conn, f"server busy: {len(self._conns)} connections with requests running",
                                  linger=False)
                    continue
                oldest = next(iter(self._waiting_since))
                self._hang_up(oldest, f"connection closed: the server holds its limit of {self.max_connections} "
                                      "connections and this one had waited longest", linger=False)  # frees its slot
            self._conns.add(conn)
            self._set_deadline(conn)
            self._advance(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(_RECV)
        except BlockingIOError:
            return
        except OSError:
            self._drop(conn)
            return
        if conn.lingering:
            if not chunk:
                self._drop(conn)  # the client has read our reason and hung up too
        elif chunk:
            conn.buf += chunk
        else:
            conn.eof = True

    def _advance(self, conn: _Conn) -> None:
        """Move a connection on as far as it can go: flush its reply, then take its next request."""
        while not conn.closed and not conn.busy and not conn.lingering:
            if conn.out:
                if not self._flush(conn):
                    return  # waits for the socket to drain
                self._set_deadline(conn)  # the wait for the next request starts once the reply is out
                continue
            newline = conn.buf.find(b"\n")
            if newline > self.max_request or (newline < 0 and len(conn.buf) > self.max_request):
                self._hang_up(conn, f"request too large: over {self.max_request} bytes")
                return
            if newline >= 0:
                line = bytes(conn.buf[:newline])
                del conn.buf[:newline + 1]
            elif conn.eof:  # a client that half-closes without a final newline still gets its answer
                line = bytes(conn.buf)
                conn.buf.clear()
                if not line.strip():
                    self._drop(conn)
                    return
            else:
                self._watch(conn, selectors.EVENT_READ)
                return
            if not line.strip():
                continue
            request, error = _parse(line, self.max_depth)
            if error is not None:
                conn.out = memoryview(_encode({"ok": False, "error": error}))
            elif self._in_handlers >= self.max_queued + self.handler_threads:
                conn.out = memoryview(_encode({"ok": False, "error": "server busy: too many requests in progress "
                                                                     f"({self._in_handlers}); try again"}))
            else:
                conn.busy = True
                self._in_handlers += 1
                self._waiting_since.pop(conn, None)  # a slow handler is not the client's fault
                self._watch(conn, 0)
                self._jobs.put((conn, request))

    def _flush(self, conn: _Conn) -> bool:
        """Send what the socket takes now; True once the whole reply is out."""
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            sent = 0
        except OSError:  # the client went away; nothing left to tell it
            self._drop(conn)
            return False
        conn.out = conn.out[sent:]
        if conn.out:
            if conn.events != selectors.EVENT_WRITE:
                self._set_deadline(conn)  # a client that never reads its reply is dropped in timeout_s
                self._watch(conn, selectors.EVENT_WRITE)
            return False
        return True

    def _expire(self, now: float) -> None:
        while self._waiting_since:
            conn, since = next(iter(self._waiting_since.items()))
            if since + self.timeout_s > now:
                return
            if conn.out or conn.lingering:  # it stopped reading its reply, or never hung up after ours
                self._drop(conn)
            elif conn.buf.strip():
                self._hang_up(conn, f"incomplete request: no newline within {self.timeout_s:g} s "
                                    f"({len(conn.buf)} bytes received)")
            else:
                self._hang_up(conn, f"idle timeout: no complete request within {self.timeout_s:g} s")

    def _set_deadline(self, conn: _Conn) -> None:
        self._waiting_since.pop(conn, None)
        self._waiting_since[conn] = time.monotonic()  # to the end: the latest deadline

    def _watch(self, conn: _Conn, events: int) -> None:
        assert self._selector is not None
        if events == conn.events:
            return
        if not conn.events:
            self._selector.register(conn.sock, events, conn)
        elif not events:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _hang_up(self, conn: _Conn, error: str, *, linger: bool = True) -> None:
        """Tell the client why, as far as its socket buffer takes it without waiting, and end the connection.

        Lingering: half-close and discard what the client still sends until it hangs up too (or timeout_s
        passes). Closing at once would fail the send of a client that writes its request before reading
        (EPIPE), and unread data at close makes Linux reset the connection; either way the reason is lost.
        """
        try:
            conn.sock.send(_encode({"ok": False, "error": error}))
            if linger:
                conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            linger = False
        if not linger:
            self._drop(conn)
            return
        conn.lingering = True
        conn.busy = False
        conn.out = memoryview(b"")
        conn.buf.clear()
        self._set_deadline(conn)
        self._watch(conn, selectors.EVENT_READ)

    def _drop(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._watch(conn, 0)
        self._waiting_since.pop(conn, None)
        self._conns.discard(conn)
        _discard_pending(conn.sock)
        conn.sock.close()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _discard_pending(conn: socket.socket) -> None:
    """Read (a bounded amount of) what the peer already sent before hanging up: closing with unread data
    makes Linux reset the connection, and a client still reading our last error reply may see ECONNRESET."""
    try:
        conn.setblocking(False)
        for _ in range(16):
            if not conn.recv(_RECV):
                return
    except OSError:
        pass


def _encode(obj: Any) -> bytes:
    """One line of JSON; Paths and datetimes are common in replies, so fall back to str()."""
    return compact_json.encode(obj, default=str) + b"\n"


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
