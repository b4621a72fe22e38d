"""A Unix-socket server in front of one HashDB: ``hashdb serve DB --socket PATH``. The transport.

One thread runs an epoll loop that accepts connections, cuts their byte streams into frames
(protocol.FrameReader), and sends replies. What is done with a request lives in dispatch.py: the loop
answers cheap reads itself, a pool of reader threads runs the expensive ones (wide radius, kNN, many
codes), and a single writer thread runs the writes through ``HashDB.write_batch`` (group commit), each
committed before its reply is sent.

Why cheap reads stay on the loop thread: with the GIL, threads only add hand-off cost (a round trip to a
worker thread and back through two SimpleQueues measured 5-11 us on this 2-core machine) while a radius
query costs HashDB about 20 us. Every loop turn gathers the ready requests of all connections and answers
the radius queries that share a radius with one ``radius_many`` call. An expensive read would hold up
every connection for its duration, so it goes to a reader thread (the GIL is shared, but the loop gets
its turns). Pipelined requests on one connection are answered in order: while a write or an expensive
read of a connection is in flight, its later requests wait (so a client always reads its own writes).

Bounds per connection: it is not read while it pipelines MAX_PENDING requests ahead or has
OUT_HIGH_WATER bytes of replies unsent, and none of its requests is started while its replies exceed
OUT_HIGH_WATER, so a client that never reads costs the server at most that much memory, whatever it sent.
What clients send is bounded in bytes too: requests wait as their frame bytes (decoded when they start), a
connection holds at most a frame and a half, all connections MAX_HELD_TOTAL (past it, those holding any
are not read), and a partial frame idle for PARTIAL_FRAME_TIMEOUT_S drops its connection. Shutdown waits
SHUTDOWN_GRACE_S for answers and threads, however long a reader's query runs.
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
import threading
import time
from typing import Any

from .dispatch import (
    Request,
    answer_reads,
    encode_reply,
    is_heavy,
    is_write,
    new_packer,
    parse_request,
    run,
    run_writes,
)
from .dispatch import call as call
from .errors import ProtocolError, ServerError
from .protocol import DEFAULT_MAX_FRAME, PROTOCOL_VERSION, READ, RECV_SIZE, WRITE, FrameReader, unpack_body

MAX_SOCKET_PATH = 108  # bytes in sun_path on Linux (what socket.bind accepts)
log = logging.getLogger("hashdb.server")

# Stop reading from a connection whose client does not read its replies (or pipelines this far ahead);
# resume when it drains. Bounds the server's memory per connection.
MAX_PENDING = 4096
OUT_HIGH_WATER = 16 * 1024 * 1024
# Bytes of requests held (a partial frame being received, whole frames waiting undecoded): per connection a
# frame and a half, and in total across connections; past the total, connections that hold any are not read
# until it drains (100 connections each stalling one byte short of a 16 MiB frame held 1.84 GB).
# Requests are decoded only when they start, so what waits is its bytes, not its objects (one 16.8 MB
# frame of 5.5M tiny strings decoded to 390 MB).
MAX_HELD_TOTAL = 256 * 1024 * 1024
# A connection whose partial frame made no progress for this long is dropped.
PARTIAL_FRAME_TIMEOUT_S = 30.0
# Cheap reads one connection may have answered per loop turn, so one pipelining client cannot make a
# turn (and the other clients' wait) arbitrarily long; the rest waits for the next turn.
MAX_READS_PER_TURN = 64
READ_THREADS = 2
MAX_WRITE_GROUP = 1024  # writes the writer takes from its queue for one write_batch
SHUTDOWN_GRACE_S = 10.0
# Out of file descriptors, accept() fails at once for as long as the backlog is full: stop polling the
# listener for a while (doubling up to a second) instead of spinning, and log it at most this often.
ACCEPT_BACKOFF_S = (0.01, 1.0)
ACCEPT_LOG_INTERVAL_S = 10.0
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

_LISTENER = object()
_WAKE = object()

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


class _Connection:
    __slots__ = ("sock", "fd", "reader", "outbuf", "pending", "busy", "eof", "closing", "events", "closed",
                 "held", "progress_at")  # fmt: skip

    def __init__(self, sock: socket.socket, max_frame: int):
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = FrameReader(max_frame)
        self.outbuf = bytearray()
        # requests in order: a frame body not decoded yet, or a Request (decoded, or an error to answer)
        self.pending: collections.deque[Request | bytes | bytearray | memoryview] = collections.deque()
        self.held = 0  # bytes of the partial frame and the undecoded bodies (counted in Server._held)
        self.progress_at = 0.0  # when its partial frame last grew
        self.busy = False  # a write or an expensive read of this connection is with a worker thread
        self.eof = False  # the client shut down its sending side
        self.closing = False  # the stream cannot be re-synchronized: answer what we have, then close
        self.events = 0
        self.closed = False

    def idle(self) -> bool:
        return not self.pending and not self.busy and not self.outbuf

    def startable(self) -> bool:
        """May its next request start now: nothing of it in flight, and its unsent replies under the bound."""
        return bool(self.pending) and not self.busy and not self.closed and len(self.outbuf) < OUT_HIGH_WATER


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
        self._held = 0  # bytes held by all connections (_Connection.held)
        self._starved: dict[int, _Connection] = {}  # not read while _held is over MAX_HELD_TOTAL
        self._next_sweep = 0.0
        self._packer = new_packer()
        # Work for the threads: (connection, request), None to stop. Answers come back through _done.
        self._jobs: queue.SimpleQueue[tuple[_Connection, Request] | None] = queue.SimpleQueue()
        self._read_jobs: queue.SimpleQueue[tuple[_Connection, Request] | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[_Connection, bytes]] = collections.deque()
        self._workers = [threading.Thread(target=self._writer_loop, name="hashdb-writer", daemon=True)]
        self._workers += [
            threading.Thread(target=self._reader_loop, name=f"hashdb-reader-{i}", daemon=True)
            for i in range(READ_THREADS)
        ]
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self._deadline: float | None = None  # when shutdown stops waiting for answers and threads
        self._accept_paused_until: float | None = None
        self._accept_backoff = ACCEPT_BACKOFF_S[0]
        self._accept_failures = 0  # since the last log line about them
        self._accept_logged_at = -ACCEPT_LOG_INTERVAL_S
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
        for worker in self._workers:
            worker.start()
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
        if self._ready:
            timeout = 0  # requests held back from the last turn
        if self._held:  # partial frames may go idle: wake up to drop them
            timeout = PARTIAL_FRAME_TIMEOUT_S / 4 if timeout is None else min(timeout, PARTIAL_FRAME_TIMEOUT_S / 4)
        if self._accept_paused_until is not None:
            left = self._accept_paused_until - time.monotonic()
            if left <= 0:
                self._resume_accepting()
            else:
                timeout = left if timeout is None else min(timeout, left)
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
        self._collect_done()
        if self._ready:
            self._dispatch()
        if self._dirty:
            self._flush_dirty()
        if self._held and time.monotonic() >= self._next_sweep:
            self._drop_idle_partial_frames()

    def _drop_idle_partial_frames(self) -> None:
        now = time.monotonic()
        self._next_sweep = now + PARTIAL_FRAME_TIMEOUT_S / 4
        idle = [c for c in self._conns.values() if c.reader.buffered and now - c.progress_at > PARTIAL_FRAME_TIMEOUT_S]
        if idle:
            log.warning("dropping %d connections idle for %.0f s inside a frame", len(idle), PARTIAL_FRAME_TIMEOUT_S)
        for conn in idle:
            self._close(conn)

    def _hold(self, conn: _Connection, change: int) -> None:
        """Count ``change`` more (or fewer) bytes held by ``conn``; wake starved connections once under the total."""
        conn.held += change
        self._held += change
        if change < 0 and self._starved and self._held < MAX_HELD_TOTAL:
            starved, self._starved = self._starved, {}
            for other in starved.values():
                self._update_events(other)

    def _accept(self) -> bool:
        """Accept up to 64 waiting connections; True if there may be more."""
        if self._listener is None or self._accept_paused_until is not None:
            return False
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as e:  # keep serving the clients we have
                self._accept_failed(e)
                return False
            self._accept_backoff = ACCEPT_BACKOFF_S[0]
            sock.setblocking(False)
            conn = _Connection(sock, self.max_frame)
            self._conns[conn.fd] = conn
            self._update_events(conn)
        return True

    def _accept_failed(self, e: OSError) -> None:
        self._accept_failures += 1
        pause = self._accept_backoff if e.errno in _OUT_OF_RESOURCES else ACCEPT_BACKOFF_S[1]
        now = time.monotonic()
        if now - self._accept_logged_at >= ACCEPT_LOG_INTERVAL_S:
            more = f" ({self._accept_failures - 1} more since the last report)" if self._accept_failures > 1 else ""
            log.error("accept failed: %s%s; not accepting for %.2f s", e.strerror or e, more, pause)
            self._accept_logged_at = now
            self._accept_failures = 0
        self._accept_backoff = min(2 * self._accept_backoff, ACCEPT_BACKOFF_S[1])
        if self._listener is not None and self._accept_paused_until is None:
            try:
                self._sel.unregister(self._listener.fileno())
            except (KeyError, ValueError, OSError):
                pass  # not registered (shutting down)
        self._accept_paused_until = now + pause

    def _resume_accepting(self) -> None:
        self._accept_paused_until = None
        if self._listener is not None and not self._stopping:
            self._sel.register(self._listener.fileno(), READABLE, _LISTENER)

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            conn.eof = True  # a truncated frame left in the reader has nothing to answer it with
        else:
            self._take(conn, data)
        self._after_io(conn)

    def _take(self, conn: _Connection, data: bytes) -> None:
        """Parse the frames ``data`` completes into pending requests."""
        if conn.closing:
            return
        reader = conn.reader
        before = reader.buffered
        bodies = reader.feed(data)
        conn.pending.extend(bodies)
        if reader.buffered:
            conn.progress_at = time.monotonic()
        self._hold(conn, reader.buffered - before + sum(len(body) for body in bodies))
        if reader.too_big is not None:
            # The rest of the stream is likely garbage: answer once, then close.
            too_big = ProtocolError(f"frame of {reader.too_big} bytes exceeds the limit of {self.max_frame}")
            conn.pending.append(Request(None, None, None, too_big))
            conn.closing = True
        if conn.pending and not conn.busy:
            self._ready[conn.fd] = conn

    def _dispatch(self) -> None:
        """Answer the cheap reads of every ready connection (radius queries batched); hand the rest to threads."""
        ready, self._ready = self._ready, {}
        conns: list[_Connection] = []
        reads: list[Request] = []
        heavy: list[tuple[_Connection, Request]] = []
        writes: list[tuple[_Connection, Request]] = []
        bits = self.bits
        for conn in ready.values():
            if not conn.startable():
                continue  # in flight (resumes when it is answered) or too much unsent (when it drains)
            pending = conn.pending
            taken = 0
            while pending:
                if taken == MAX_READS_PER_TURN:
                    self._ready[conn.fd] = conn
                    break
                request = self._decode(conn, pending.popleft())
                if is_write(request):
                    writes.append((conn, request))
                    conn.busy = True
                    break
                if is_heavy(request, bits):
                    heavy.append((conn, request))
                    conn.busy = True
                    break
                conns.append(conn)
                reads.append(request)
                taken += 1
        if reads:
            packer = self._packer
            for conn, request, (kind, value) in zip(
                conns, reads, answer_reads(self.db, reads, self.info, bits), strict=True
            ):
                self._reply(conn, encode_reply(packer, request, kind, value))
        # Writes go out after this turn's reads ran, so a read pipelined before a write never sees it.
        for job in heavy:
            self._read_jobs.put(job)
        for job in writes:
            self._jobs.put(job)

    def _decode(self, conn: _Connection, item: Request | bytes | bytearray | memoryview) -> Request:
        """The request of a pending item: decoded and checked now that it starts (its bytes no longer held)."""
        if isinstance(item, Request):
            return item
        self._hold(conn, -len(item))
        try:
            return parse_request(unpack_body(item))
        except ProtocolError as e:
            return Request(None, None, None, e)
        except Exception as e:  # noqa: BLE001 - a bug in checking one request must not stop the loop
            log.error("cannot parse a request: %s", type(e).__name__)
            return Request(None, None, None, ProtocolError(f"malformed request ({type(e).__name__})"))

    def _reply(self, conn: _Connection, data: bytes) -> None:
        if conn.closed:
            return
        conn.outbuf += data
        self.requests_served += 1
        self._dirty[conn.fd] = conn

    # -- worker threads --------------------------------------------------------------------------------

    def _writer_loop(self) -> None:
        packer = new_packer()  # Packer objects are not thread-safe: one per thread
        stop = False
        while not stop:
            job = self._jobs.get()
            if job is None:
                return
            group = [job]
            # Group commit: writes waiting from other connections go to one write_batch (one fsync).
            while len(group) < MAX_WRITE_GROUP:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
            try:
                results = self.run_writes([request for _, request in group])
            except BaseException as e:  # write_batch returns its errors; this is the last line of defence
                log.exception("writer: write_batch failed")
                results = [("error", e)] * len(group)
            self._finish(packer, group, results)

    def run_writes(self, requests: list[Request]) -> list[tuple[str, Any]]:
        """Results of write requests: ("ok", result) or ("error", exception), one per request.

        Inserts next to each other commit together (HashDB.write_batch); if that commit fails, nothing of
        it was written and each insert runs alone so that only the bad one gets the error."""
        return run_writes(self.db, requests)

    def _reader_loop(self) -> None:
        packer = new_packer()
        while True:
            job = self._read_jobs.get()
            if job is None:
                return
            try:
                result = run(self.db, job[1], self.info)
            except BaseException as e:  # run() answers errors itself; this is the last line of defence
                log.exception("reader: op %s failed", job[1].op)
                result = ("error", e)
            self._finish(packer, [job], [result])

    def _finish(self, packer: Any, jobs: list[tuple[_Connection, Request]], results: list[tuple[str, Any]]) -> None:
        """From a worker thread: encode the replies and hand them to the loop."""
        for (conn, request), (kind, value) in zip(jobs, results, strict=True):
            try:
                body = encode_reply(packer, request, kind, value)
            except BaseException as e:  # noqa: BLE001 - the connection must get an answer, whatever happened
                body = encode_reply(packer, request, "error", ServerError(f"cannot encode reply: {e}"))
            self._done.append((conn, body))
        self._wake()

    def _collect_done(self) -> None:
        while self._done:
            conn, body = self._done.popleft()
            conn.busy = False
            if conn.closed:
                continue
            self._reply(conn, body)
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
            if conn.startable():
                self._ready[conn.fd] = conn  # it drained below the bound: its waiting requests may start
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
        starved = conn.held > 0 and self._held >= MAX_HELD_TOTAL  # one holding nothing may still send a ping
        if starved:
            self._starved[conn.fd] = conn
        if (
            not conn.eof
            and not conn.closing
            and not self._stopping
            and len(conn.pending) < MAX_PENDING
            and conn.held < conn.reader.max_frame + (conn.reader.max_frame >> 1)  # type: ignore[operator]
            and len(conn.outbuf) < OUT_HIGH_WATER
            and not starved
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
        self._starved.pop(conn.fd, None)
        conn.pending.clear()
        self._hold(conn, -conn.held)

    # -- shutdown --------------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Stop accepting; answer every request already received (and waiting in the kernel); then return."""
        if self._accept_paused_until is not None:
            self._resume_accepting()
        while self._accept():  # clients already in the backlog sent their requests too: take them
            pass
        self._close_listener()
        for conn in list(self._conns.values()):
            self._read_available(conn)
            self._update_events(conn)
        deadline = self._deadline = time.monotonic() + SHUTDOWN_GRACE_S
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
            self._take(conn, data)

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
        self._jobs.put(None)
        for _ in range(READ_THREADS):
            self._read_jobs.put(None)
        # The threads finish what they run, within the grace: a reader busy with one long query (a wide
        # radius_many at 1M codes) must not hold SIGTERM up for minutes. One still running then keeps the
        # database open (closing LMDB under it could crash it); the process exits and LMDB needs no close.
        deadline = self._deadline if self._deadline is not None else time.monotonic() + SHUTDOWN_GRACE_S
        for worker in self._workers:
            if worker.is_alive():
                worker.join(max(0.1, deadline - time.monotonic()))
        busy = [w.name for w in self._workers if w.is_alive()]
        if busy:
            log.warning("shutdown: %s still running after the grace; leaving the database to the exit", busy)
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.close_db and not busy:
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
    try:
        db.refresh()  # a server answers many queries: build the index tables now, not after a second of scans
    except BaseException:
        db.close()
        raise
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
