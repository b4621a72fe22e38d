"""A Unix-socket server in front of one HashDB: ``hashdb serve DB --socket PATH``.

One thread runs a selector loop that accepts connections, reads frames, answers every read request itself
and packs replies; a single writer thread runs the writes, one at a time, so each is committed before its
reply is sent. The loop holds no database logic: each op is one HashDB method call (see protocol.OPS).

Why a single loop thread and not a thread per client or a read pool: with the GIL, threads only add
hand-off cost (a round trip to a worker thread and back through two SimpleQueues measured 5-11 us on this
2-core machine) while a radius query costs HashDB about 20 us. Instead, every loop
turn gathers the ready requests of all connections and answers the radius queries that share a radius with
one ``radius_many`` call, and the writer commits the inserts waiting from several connections in one
transaction (group commit: an fsync costs ~7.7 ms here). Pipelined requests on one connection are answered
in order: while a write of a connection is in flight, its later requests wait (so a client always reads its
own writes), while the other connections keep being served.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import queue
import select
import selectors
import signal
import socket
import stat
import struct
import threading
import time
from typing import Any

import msgpack
import numpy as np

from .codes import to_bytes
from .errors import HashDBError, ProtocolError, ServerError
from .protocol import DEFAULT_MAX_FRAME, HEADER_SIZE, OPS, PROTOCOL_VERSION, READ, WRITE, error_payload, unpack_body

MAX_SOCKET_PATH = 108  # bytes in sun_path on Linux (what socket.bind accepts)
log = logging.getLogger("hashdb.server")

RECV_SIZE = 256 * 1024
# Stop reading from a connection whose client does not read its replies (or pipelines this far ahead);
# resume when it drains. Bounds the server's memory per connection.
MAX_PENDING = 4096
OUT_HIGH_WATER = 64 * 1024 * 1024
SHUTDOWN_GRACE_S = 10.0

_HEADER = struct.Struct(">I")
_LISTENER = object()
_NO_JOB = object()
_WAKE = object()


def _to_builtin(obj: Any) -> Any:
    """msgpack fallback for numpy values a HashDB method may return (stats, distances)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _new_packer() -> msgpack.Packer:
    return msgpack.Packer(default=_to_builtin, use_bin_type=True, autoreset=True)


READABLE, WRITABLE = selectors.EVENT_READ, selectors.EVENT_WRITE


class _Poller:
    """epoll where there is one (a plain fd -> object map: about 2 us per loop turn less than selectors on
    this machine), else the selectors module. poll() yields (object, READABLE | WRITABLE)."""

    def __init__(self) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._sel = None if self._epoll is not None else selectors.DefaultSelector()
        self._data: dict[int, Any] = {}

    @staticmethod
    def _mask(events: int) -> int:
        return (select.EPOLLIN if events & READABLE else 0) | (select.EPOLLOUT if events & WRITABLE else 0)

    def register(self, fd: int, events: int, data: Any) -> None:
        self._data[fd] = data
        if self._epoll is not None:
            self._epoll.register(fd, self._mask(events))
        else:
            self._sel.register(fd, events, data)  # type: ignore[union-attr]

    def modify(self, fd: int, events: int, data: Any) -> None:
        self._data[fd] = data
        if self._epoll is not None:
            self._epoll.modify(fd, self._mask(events))
        else:
            self._sel.modify(fd, events, data)  # type: ignore[union-attr]

    def unregister(self, fd: int) -> None:
        self._data.pop(fd, None)
        if self._epoll is not None:
            self._epoll.unregister(fd)
        else:
            self._sel.unregister(fd)  # type: ignore[union-attr]

    def poll(self, timeout: float | None) -> list[tuple[Any, int]]:
        if self._epoll is None:
            return [(key.data, mask) for key, mask in self._sel.select(timeout)]  # type: ignore[union-attr]
        out = []
        data = self._data
        for fd, mask in self._epoll.poll(-1 if timeout is None else timeout):
            # A hang-up or error reads as readable: recv() then reports it.
            events = (READABLE if mask & ~select.EPOLLOUT else 0) | (WRITABLE if mask & select.EPOLLOUT else 0)
            if fd in data:
                out.append((data[fd], events))
        return out

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
        else:
            self._sel.close()  # type: ignore[union-attr]


class _Request:
    __slots__ = ("rid", "op", "args", "error")

    def __init__(self, rid: Any, op: str | None, args: dict[str, Any] | None, error: HashDBError | None = None):
        self.rid, self.op, self.args, self.error = rid, op, args, error


# op -> (required arguments, every name a request of that op may carry)
_SPECS = {op: (required, frozenset(required + optional + ("id", "op"))) for op, (_, required, optional) in OPS.items()}


def parse_request(message: Any) -> _Request:
    """Check a decoded request map against protocol.OPS; a bad one becomes a request carrying its error.

    ``message`` is consumed: its arguments become the request's (it is a fresh map from the decoder)."""
    if not isinstance(message, dict):
        return _Request(None, None, None, ProtocolError(f"a request must be a map, got {type(message).__name__}"))
    rid = message.pop("id", None)
    op = message.pop("op", None)
    spec = _SPECS.get(op) if type(op) is str else None
    if spec is None:
        return _Request(rid, None, None, ProtocolError(f"unknown op {op!r:.100}"))
    required, allowed = spec
    if not message.keys() <= allowed:
        unknown = sorted(str(name) for name in message if name not in allowed)
        return _Request(rid, op, None, ProtocolError(f"op {op!r} takes no argument {', '.join(unknown)}"))
    for name in required:
        if name not in message:
            missing = [n for n in required if n not in message]
            return _Request(rid, op, None, ProtocolError(f"op {op!r} is missing {', '.join(missing)}"))
    return _Request(rid, op, message)


def call(db: Any, op: str, args: dict[str, Any], info: dict[str, Any]) -> Any:
    """Run one checked request against ``db``: the HashDB method of that name, len(), ``in``, or ping."""
    if op == "len":
        return len(db)
    if op == "contains":
        return args["key"] in db
    if op == "ping":
        return info
    if op == "codec":
        return db.codec
    return getattr(db, op)(**args)


class _Connection:
    __slots__ = ("sock", "fd", "inbuf", "outbuf", "pending", "busy", "eof", "closing", "events", "closed")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.pending: collections.deque[_Request] = collections.deque()
        self.busy = False  # a write of this connection is with the writer thread
        self.eof = False  # the client shut down its sending side
        self.closing = False  # the stream cannot be re-synchronized: answer what we have, then close
        self.events = 0
        self.closed = False

    def idle(self) -> bool:
        return not self.pending and not self.busy and not self.outbuf


class Server:
    """Serves ``db`` (a HashDB, or anything with its methods) on the Unix socket ``path``.

    ``serve_forever()`` blocks until ``shutdown()`` (thread- and signal-safe) is called; then it stops
    accepting, answers the requests it has received, removes the socket and, if ``close_db``, closes ``db``.
    """

    def __init__(self, db: Any, path: str, *, max_frame: int = DEFAULT_MAX_FRAME, close_db: bool = False):
        if max_frame < 64:
            raise ValueError(f"max_frame must be at least 64 bytes, got {max_frame}")
        self.db = db
        self.path = os.fspath(path)
        self.max_frame = int(max_frame)
        self.close_db = close_db
        self.bits = int(db.bits)
        self.info = {"protocol": PROTOCOL_VERSION, "bits": self.bits, "max_frame": self.max_frame}
        self.requests_served = 0
        self._listener: socket.socket | None = None
        self._sel = _Poller()
        self._conns: dict[int, _Connection] = {}
        self._ready: dict[int, _Connection] = {}  # connections with requests to dispatch (ordered set)
        self._dirty: dict[int, _Connection] = {}  # connections with replies to send
        self._packer = _new_packer()
        self._jobs: queue.SimpleQueue[tuple[_Connection, _Request] | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[_Connection, bytes]] = collections.deque()
        self._writer = threading.Thread(target=self._writer_loop, name="hashdb-writer", daemon=True)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self.ready = threading.Event()  # set once the socket accepts connections

    # -- lifecycle -------------------------------------------------------------------------------------

    def bind(self) -> None:
        """Create the socket file (mode 0600); refuse if a live server answers at ``path``."""
        _clear_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the file is created by bind(): make it 0600 from its first instant
        try:
            sock.bind(self.path)
        except OSError as e:
            sock.close()
            raise ServerError(f"cannot create socket {self.path}: {e.strerror or e}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(512)
        sock.setblocking(False)
        self._listener = sock

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        self._sel.register(self._listener.fileno(), READABLE, _LISTENER)
        self._sel.register(self._wake_r, READABLE, _WAKE)
        self._writer.start()
        log.info("serving %s codes of %d bits on %s (pid %d)", _safe_len(self.db), self.bits, self.path, os.getpid())
        self.ready.set()
        try:
            while not self._stopping:
                self._turn(None)
            self._drain()
        finally:
            self._cleanup()
        log.info("stopped after %d requests; socket %s removed", self.requests_served, self.path)

    def shutdown(self) -> None:
        """Ask serve_forever to finish; safe from other threads and signal handlers."""
        self._stopping = True
        self._wake()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT call shutdown() (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _signum, _frame: self.shutdown())

    # -- the loop --------------------------------------------------------------------------------------

    def _turn(self, timeout: float | None) -> None:
        for data, mask in self._sel.poll(timeout):
            if data is _LISTENER:
                self._accept()
            elif data is _WAKE:
                self._drain_wake()
            else:
                if mask & READABLE:
                    self._read(data)
                if mask & WRITABLE and not data.closed:
                    self._dirty[data.fd] = data
        self._collect_writes()
        if self._ready:
            self._dispatch()
        if self._dirty:
            self._flush_dirty()

    def _accept(self) -> bool:
        """Accept up to 64 waiting connections; True if there may be more."""
        assert self._listener is not None
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as e:  # e.g. EMFILE: keep serving the clients we have
                log.error("accept failed: %s", e)
                return False
            sock.setblocking(False)
            conn = _Connection(sock)
            self._conns[conn.fd] = conn
            self._update_events(conn)
        return True

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            conn.eof = True
            if conn.inbuf:  # a truncated frame: nothing to answer it with
                conn.inbuf.clear()
            self._after_io(conn)
            return
        if not conn.inbuf and len(data) >= HEADER_SIZE:
            size = _HEADER.unpack_from(data)[0]
            if len(data) == HEADER_SIZE + size and size <= self.max_frame:
                # The common case, one whole request per recv: decode it in place, no buffer copies.
                try:
                    request = parse_request(unpack_body(memoryview(data)[HEADER_SIZE:]))
                except ProtocolError as e:
                    request = _Request(None, None, None, e)
                conn.pending.append(request)
                if not conn.busy:
                    self._ready[conn.fd] = conn
                self._after_io(conn)
                return
        conn.inbuf += data
        self._parse_frames(conn)
        self._after_io(conn)

    def _parse_frames(self, conn: _Connection) -> None:
        buf = conn.inbuf
        pos, end = 0, len(buf)
        while end - pos >= HEADER_SIZE and not conn.closing:
            size = _HEADER.unpack_from(buf, pos)[0]
            if size > self.max_frame:
                # The rest of the stream is likely garbage: answer once, then close.
                too_big = ProtocolError(f"frame of {size} bytes exceeds the limit of {self.max_frame}")
                conn.pending.append(_Request(None, None, None, too_big))
                conn.closing = True
                pos = end
                break
            if end - pos - HEADER_SIZE < size:
                break
            body = buf[pos + HEADER_SIZE : pos + HEADER_SIZE + size]
            pos += HEADER_SIZE + size
            try:
                request = parse_request(unpack_body(body))
            except ProtocolError as e:
                request = _Request(None, None, None, e)
            conn.pending.append(request)
        if pos:
            del buf[:pos]
        if conn.pending and not conn.busy:
            self._ready[conn.fd] = conn

    def _dispatch(self) -> None:
        """Answer the reads of every ready connection (radius queries batched); hand writes to the writer."""
        reads: list[tuple[_Connection, _Request]] = []
        writes: list[tuple[_Connection, _Request]] = []
        for conn in self._ready.values():
            if conn.closed:
                continue
            pending = conn.pending
            while pending:
                request = pending.popleft()
                if request.error is None and OPS[request.op][0] == WRITE:  # type: ignore[index]
                    writes.append((conn, request))
                    conn.busy = True
                    break
                reads.append((conn, request))
        self._ready.clear()
        if reads:
            self._answer_reads(reads)
        # Writes go out after this turn's reads ran, so a read pipelined before a write never sees it.
        for job in writes:
            self._jobs.put(job)

    def _answer_reads(self, reads: list[tuple[_Connection, _Request]]) -> None:
        results: list[Any] = [None] * len(reads)
        done = [False] * len(reads)
        by_radius: dict[tuple[int, Any], list[int]] = {}
        for i, (_conn, request) in enumerate(reads):
            if request.op == "radius" and request.error is None:
                args = request.args
                r, force = args["r"], args.get("force")  # type: ignore[union-attr,index]
                if type(r) is int and (force is None or type(force) is str):
                    by_radius.setdefault((r, force), []).append(i)
        for (r, force), indices in by_radius.items():
            if len(indices) < 2:
                continue
            try:
                codes = [to_bytes(reads[i][1].args["code"], self.bits) for i in indices]  # type: ignore[index]
                answers = self.db.radius_many(codes, r, force=force)
            except HashDBError:
                continue  # answer one by one below, so each request gets its own error
            for i, answer in zip(indices, answers, strict=True):
                results[i] = ("ok", answer)
                done[i] = True
        packer = self._packer
        for i, (conn, request) in enumerate(reads):
            if not done[i]:
                results[i] = self._run(request)
            kind, value = results[i]
            self._reply(conn, request, kind, value, packer)

    def _run(self, request: _Request) -> tuple[str, Any]:
        if request.error is not None:
            return "error", request.error
        try:
            return "ok", call(self.db, request.op, request.args, self.info)  # type: ignore[arg-type]
        except HashDBError as e:
            return "error", e
        except Exception as e:  # a bug in a layer below: answer, log, keep serving
            log.exception("internal error in op %s", request.op)
            return "error", e

    def _reply(self, conn: _Connection, request: _Request, kind: str, value: Any, packer: msgpack.Packer) -> None:
        body = self._encode(request, kind, value, packer)
        if conn.closed:
            return
        conn.outbuf += _HEADER.pack(len(body))
        conn.outbuf += body
        self.requests_served += 1
        self._dirty[conn.fd] = conn

    @staticmethod
    def _encode(request: _Request, kind: str, value: Any, packer: msgpack.Packer) -> bytes:
        if kind == "error":
            payload = error_payload(value)
            if isinstance(value, ProtocolError):
                log.warning("protocol error (op %s): %s", request.op, value)
            else:
                log.info("error reply to op %s: %s: %s", request.op, payload["type"], payload["message"])
            return packer.pack({"id": request.rid, "error": payload})
        try:
            return packer.pack({"id": request.rid, "ok": value})
        except Exception as e:
            log.error("cannot encode the result of op %s: %s", request.op, e)
            return packer.pack({"id": request.rid, "error": error_payload(ServerError(f"cannot encode result: {e}"))})

    # -- writes ----------------------------------------------------------------------------------------

    def _writer_loop(self) -> None:
        packer = _new_packer()  # Packer objects are not thread-safe: one per thread
        carry: Any = _NO_JOB  # a job taken from the queue that must run after the current group
        while True:
            job = carry if carry is not _NO_JOB else self._jobs.get()
            carry = _NO_JOB
            if job is None:
                return
            group = [job]
            if job[1].op == "insert":
                # Group commit: inserts waiting from other connections share one transaction (one fsync).
                keys = {job[1].args["key"]} if isinstance(job[1].args["key"], str) else None  # type: ignore[index]
                while keys is not None:
                    try:
                        nxt = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    key = nxt[1].args["key"] if nxt is not None and nxt[1].op == "insert" else None  # type: ignore[index]
                    if not isinstance(key, str) or key in keys:  # anything else runs after this group
                        carry = nxt
                        break
                    keys.add(key)
                    group.append(nxt)
            for conn, (kind, value), request in zip(
                (c for c, _ in group), self.run_writes([r for _, r in group]), (r for _, r in group), strict=True
            ):
                self._done.append((conn, self._encode(request, kind, value, packer)))
            self._wake()

    def run_writes(self, requests: list[_Request]) -> list[tuple[str, Any]]:
        """Results of write requests: several inserts (distinct keys) as one insert_many, else one by one.

        If the combined insert fails, nothing of it was committed (one LMDB transaction), and each insert is
        run alone so that only the bad one gets the error."""
        if len(requests) > 1:
            args = [r.args for r in requests]
            try:
                self.db.insert_many(
                    [a["key"] for a in args],  # type: ignore[index]
                    [a["code"] for a in args],  # type: ignore[index]
                    [a.get("meta") for a in args],  # type: ignore[union-attr]
                )
                return [("ok", None)] * len(requests)
            except HashDBError:
                pass
        return [self._run(request) for request in requests]

    def _collect_writes(self) -> None:
        while self._done:
            conn, body = self._done.popleft()
            conn.busy = False
            if conn.closed:
                continue
            conn.outbuf += _HEADER.pack(len(body))
            conn.outbuf += body
            self.requests_served += 1
            self._dirty[conn.fd] = conn
            if conn.pending:
                self._ready[conn.fd] = conn

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is already pending) or closed at exit

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    # -- output and connection state -------------------------------------------------------------------

    def _flush_dirty(self) -> None:
        dirty = list(self._dirty.values())
        self._dirty.clear()
        for conn in dirty:
            if conn.closed:
                continue
            if conn.outbuf:
                try:
                    sent = conn.sock.send(conn.outbuf)
                    del conn.outbuf[:sent]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:  # the client went away; its pending replies have no reader
                    self._close(conn)
                    continue
            self._after_io(conn)

    def _after_io(self, conn: _Connection) -> None:
        if conn.closed:
            return
        if (conn.eof or conn.closing) and conn.idle():
            self._close(conn)
            return
        self._update_events(conn)

    def _update_events(self, conn: _Connection) -> None:
        events = 0
        if (
            not conn.eof
            and not conn.closing
            and not self._stopping
            and len(conn.pending) < MAX_PENDING
            and len(conn.outbuf) < OUT_HIGH_WATER
        ):
            events |= READABLE
        if conn.outbuf:
            events |= WRITABLE
        if events == conn.events:
            return
        if conn.events == 0:
            self._sel.register(conn.fd, events, conn)
        elif events == 0:
            self._sel.unregister(conn.fd)
        else:
            self._sel.modify(conn.fd, events, conn)
        conn.events = events

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.events:
            self._sel.unregister(conn.fd)
            conn.events = 0
        conn.sock.close()
        self._conns.pop(conn.fd, None)
        self._ready.pop(conn.fd, None)
        self._dirty.pop(conn.fd, None)

    # -- shutdown --------------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Stop accepting; answer every request already received (and waiting in the kernel); then return."""
        if self._listener is not None:  # clients already in the backlog sent their requests too: take them
            while self._accept():
                pass
        self._close_listener()
        for conn in list(self._conns.values()):
            self._read_available(conn)
            self._update_events(conn)
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while any(not c.idle() for c in self._conns.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                stuck = sum(not c.idle() for c in self._conns.values())
                log.warning("shutdown: gave up on %d unanswered connections", stuck)
                break
            self._turn(min(left, 0.5))

    def _read_available(self, conn: _Connection) -> None:
        while not conn.closed and not conn.eof and not conn.closing:
            try:
                data = conn.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn)
                return
            if not data:
                conn.eof = True
                break
            conn.inbuf += data
            self._parse_frames(conn)

    def _close_listener(self) -> None:
        if self._listener is None:
            return
        try:
            self._sel.unregister(self._listener.fileno())
        except (KeyError, ValueError, OSError):
            pass
        self._listener.close()
        self._listener = None
        _remove_socket_file(self.path)

    def _cleanup(self) -> None:
        self._close_listener()
        for conn in list(self._conns.values()):
            self._close(conn)
        if self._writer.is_alive():
            self._jobs.put(None)
            self._writer.join()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.close_db:
            self.db.close()


def _safe_len(db: Any) -> str:
    try:
        return str(len(db))
    except Exception:
        return "?"


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file no server answers on; refuse a live server or a file that is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ServerError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ServerError(f"cannot check the existing socket {path}: {e.strerror or e}") from None
        log.info("removing stale socket %s", path)
        _remove_socket_file(path)
        return
    finally:
        probe.close()
    raise ServerError(f"a server is already running on {path}")


def _remove_socket_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def serve(
    db_path: str,
    socket_path: str,
    *,
    bits: int | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
    install_signals: bool = True,
) -> None:
    """Open the database at ``db_path`` and serve it on ``socket_path`` until SIGTERM/SIGINT."""
    from .db import HashDB

    # Check the socket before opening the database, so a second `serve` fails fast and touches nothing.
    _clear_stale_socket(socket_path)
    folder = os.path.dirname(os.path.abspath(socket_path))
    if not os.path.isdir(folder):
        raise ServerError(f"cannot create socket {socket_path}: no directory {folder}")
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise ServerError(f"cannot create socket {socket_path}: AF_UNIX path longer than {MAX_SOCKET_PATH} bytes")
    db = HashDB(db_path, bits=bits)
    server = Server(db, socket_path, max_frame=max_frame, close_db=True)
    try:
        server.bind()
    except BaseException:
        db.close()
        raise
    if install_signals:
        server.install_signal_handlers()
    server.serve_forever()


__all__ = ["Server", "serve", "parse_request", "call", "READ", "WRITE"]
