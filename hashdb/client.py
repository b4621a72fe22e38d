"""The client of ``hashdb serve``: ``hashdb.connect(path)`` gives an object that behaves like HashDB.

Same methods, same return types, same error classes (a reply's error type maps back through ERROR_TYPES).
A Client may be shared between threads (each call holds a lock for its round trip), but calls on one
connection are then serialized: give each thread its own Client for parallel queries. ``pipeline()``
queues many calls and sends them in one write, which is how to get high throughput from one thread.
"""

from __future__ import annotations

import collections
import os
import selectors
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgpack

from .codes import Code, many_to_bytes, to_bytes
from .errors import HashDBError, InvalidArgument, InvalidMeta, ProtocolError, ServerError
from .protocol import (
    DEFAULT_MAX_FRAME,
    MAX_KEYS_PAGE,
    RECV_SIZE,
    FrameReader,
    encode_frame,
    error_from_payload,
    unpack_body,
)

Convert = Callable[[Any], Any] | None

if TYPE_CHECKING:
    from .matching import ModelMatch


def _pairs(result: Any) -> list[tuple[str, int]]:
    return [(key, dist) for key, dist in result]


def _many_pairs(result: Any) -> list[list[tuple[str, int]]]:
    return [[(key, dist) for key, dist in rows] for rows in result]


def _code_meta(result: Any) -> tuple[bytes, dict | None]:
    code, meta = result
    return code, meta


def _layer_codes(result: Any) -> list[tuple[str, bytes]]:
    return [(name, code) for name, code in result]


def _layer_matches(result: Any) -> list[tuple[str, str, int]]:
    return [(key, layer, dist) for key, layer, dist in result]


def _many_layer_matches(result: Any) -> list[list[tuple[str, str, int]]]:
    return [_layer_matches(rows) for rows in result]


def _layers_arg(layers: Any, bits: int) -> list[list[Any]]:
    """One model's layer codes as the wire carries them: [[name, code bytes], ...] (the server judges names)."""
    if isinstance(layers, str | bytes) or not isinstance(layers, Iterable):
        raise InvalidArgument(f"layers must be a sequence of (name, code) pairs, got {type(layers).__name__}")
    out: list[list[Any]] = []
    for i, pair in enumerate(layers):
        if isinstance(pair, str | bytes) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise InvalidArgument(f"layers[{i}] must be a (name, code) pair, got {type(pair).__name__}")
        out.append([pair[0], to_bytes(pair[1], bits)])
    return out


# msgpack carries ints below 2**64 only; larger radii and counts mean the same as these, as they do embedded.
_MAX_K = 2**63 - 1


def _clamp(value: Any, top: int) -> Any:
    """A valid int above ``top`` lowered to ``top`` (same answer); anything else is left for the server to judge."""
    if isinstance(value, int) and not isinstance(value, bool) and value > top:
        return top
    return value


class _Calls:
    """Argument handling shared by Client (call now) and Pipeline (queue for later)."""

    bits: int

    def _submit(self, op: str, args: dict[str, Any], convert: Convert = None) -> Any:
        raise NotImplementedError

    def insert(
        self, key: str, code: Code, meta: dict | None = None, *, layers: Sequence[tuple[str, Code]] | None = None
    ) -> Any:
        """As HashDB.insert; ``layers`` (name, code) pairs are sent only when given (None and [] mean the same)."""
        args: dict[str, Any] = {"key": key, "code": to_bytes(code, self.bits)}
        if meta is not None:
            args["meta"] = meta
        if layers is not None:
            args["layers"] = _layers_arg(layers, self.bits)
        return self._submit("insert", args)

    def insert_many(
        self, keys: Iterable[str], codes: Any, metas: Iterable[dict | None] | None = None, *,
        layers: Iterable[Sequence[tuple[str, Code]] | None] | None = None,
    ) -> Any:  # fmt: skip
        """As HashDB.insert_many; ``layers``: None, or one sequence of (name, code) pairs (or None) per key."""
        args: dict[str, Any] = {"keys": list(keys), "codes": many_to_bytes(codes, self.bits)}
        if metas is not None:
            args["metas"] = list(metas)
        if layers is not None:
            if isinstance(layers, str | bytes) or not isinstance(layers, Iterable):
                raise InvalidArgument(f"layers must be None or one entry per key, got {type(layers).__name__}")
            args["layers"] = [None if item is None else _layers_arg(item, self.bits) for item in layers]
        return self._submit("insert_many", args)

    def delete(self, key: str) -> Any:
        return self._submit("delete", {"key": key})

    def get(self, key: str) -> Any:
        return self._submit("get", {"key": key}, _code_meta)

    def radius(self, code: Code, r: int, force: str | None = None) -> Any:
        args: dict[str, Any] = {"code": to_bytes(code, self.bits), "r": _clamp(r, self.bits)}
        if force is not None:
            args["force"] = force
        return self._submit("radius", args, _pairs)

    def radius_many(self, codes: Any, r: int, force: str | None = None) -> Any:
        args: dict[str, Any] = {"codes": many_to_bytes(codes, self.bits), "r": _clamp(r, self.bits)}
        if force is not None:
            args["force"] = force
        return self._submit("radius_many", args, _many_pairs)

    def knn(self, code: Code, k: int, force: str | None = None) -> Any:
        args: dict[str, Any] = {"code": to_bytes(code, self.bits), "k": _clamp(k, _MAX_K)}
        if force is not None:
            args["force"] = force
        return self._submit("knn", args, _pairs)

    def layers(self, key: str) -> Any:
        """The stored layer codes of ``key``: (name, code) pairs in stored order; KeyNotFound if absent."""
        return self._submit("layers", {"key": key}, _layer_codes)

    def layer_radius(self, code: Code, r: int, force: str | None = None) -> Any:
        """(model key, layer name, distance) of every stored layer code within ``r`` of ``code``."""
        args: dict[str, Any] = {"code": to_bytes(code, self.bits), "r": _clamp(r, self.bits)}
        if force is not None:
            args["force"] = force
        return self._submit("layer_radius", args, _layer_matches)

    def layer_radius_many(self, codes: Any, r: int, force: str | None = None) -> Any:
        args: dict[str, Any] = {"codes": many_to_bytes(codes, self.bits), "r": _clamp(r, self.bits)}
        if force is not None:
            args["force"] = force
        return self._submit("layer_radius_many", args, _many_layer_matches)

    def layer_count(self) -> Any:
        return self._submit("layer_count", {})

    def contains(self, key: str) -> Any:
        return self._submit("contains", {"key": key})

    def len(self) -> Any:
        return self._submit("len", {})

    def keys_after(self, after: str | None = None, limit: int = MAX_KEYS_PAGE) -> Any:
        """One page of keys in utf-8 byte order after ``after``; the server caps a page at MAX_KEYS_PAGE."""
        args: dict[str, Any] = {"limit": _clamp(limit, MAX_KEYS_PAGE)}
        if after is not None:
            args["after"] = after
        return self._submit("keys_after", args)

    def stats(self) -> Any:
        return self._submit("stats", {})

    def ping(self) -> Any:
        return self._submit("ping", {})

    def set_codec(self, config: dict[str, Any] | None) -> Any:
        return self._submit("set_codec", {"config": config})


class Client(_Calls):
    """A connection to a hashdb server; see the module docstring. Use ``hashdb.connect(path)``."""

    def __init__(self, path: str | os.PathLike[str], timeout: float | None = None):
        self.path = os.fspath(path)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=True)
        self._reader = FrameReader()  # replies have no size limit: the server bounds what it sends
        self._frames: collections.deque[Any] = collections.deque()  # bodies read but not yet consumed
        self._next_id = 1
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as e:
            self._sock.close()
            self._sock = None
            raise ServerError(f"no hashdb server at {self.path}: {e.strerror or e}") from None
        self.max_frame = DEFAULT_MAX_FRAME
        self.bits = 64  # replaced by the server's width below; ping sends no code
        info = self.ping()
        self.bits = int(info["bits"])
        self.max_frame = int(info["max_frame"])
        self.server_info: dict[str, Any] = info

    @property
    def codec(self) -> dict[str, Any] | None:
        """The codec configuration stored with the served database (None if never set)."""
        return self._submit("codec", {})

    def find_matches(
        self,
        code: Code,
        layers: Sequence[tuple[str, Code]] | None = None,
        *,
        radius: int | None = None,
        knn: int | None = None,
        layer_radius: int | None = None,
        family: str | None = None,
    ) -> list[ModelMatch]:
        """HashDB.find_matches over this connection (the rule runs here, on the server's answers)."""
        from .matching import find_matches

        return find_matches(self, code, layers, radius=radius, knn=knn, layer_radius=layer_radius, family=family)

    # -- HashDB's dunder protocol ----------------------------------------------------------------------

    def __len__(self) -> int:
        return self.len()

    def __contains__(self, key: object) -> bool:
        return self.contains(key)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[str]:
        """Keys in utf-8 byte order, a page per request (HashDB's rule: concurrent writes may show)."""
        after = None
        while True:
            page = self.keys_after(after)
            if not page:
                return
            yield from page
            after = page[-1]

    def keys(self) -> list[str]:
        return list(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "open"
        return f"<hashdb.Client {self.path} bits={self.bits} {state}>"

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    def pipeline(self) -> Pipeline:
        """A queue of calls sent in one write and answered in order by ``execute()``."""
        return Pipeline(self)

    # -- transport -------------------------------------------------------------------------------------

    def _encode(self, op: str, args: dict[str, Any]) -> tuple[int, bytes]:
        rid = self._next_id
        self._next_id = rid + 1
        message = args  # built by our own methods for this one request: safe to extend
        message["id"] = rid
        message["op"] = op
        try:
            body = self._packer.pack(message)
        except (TypeError, ValueError, OverflowError) as e:
            self._packer.reset()
            bad_meta = "meta" in args or "metas" in args
            raise (InvalidMeta if bad_meta else InvalidArgument)(f"cannot serialize {op} request: {e}") from None
        if len(body) > self.max_frame:
            raise ProtocolError(
                f"{op} request of {len(body)} bytes exceeds the server's frame limit of {self.max_frame}; split it"
            )
        return rid, encode_frame(body)

    def _submit(self, op: str, args: dict[str, Any], convert: Convert = None) -> Any:
        with self._lock:
            sock = self._live_socket()
            rid, data = self._encode(op, args)
            try:
                sock.sendall(data)
                reply = unpack_body(self._next_frame(sock))
            except TimeoutError:
                self._break()
                raise ServerError(f"timed out after {self.timeout} s waiting for {self.path}") from None
            except BaseException:
                self._break()
                raise
        return self._result(reply, rid, convert)

    def _exchange(self, calls: list[tuple[str, dict[str, Any]]]) -> tuple[list[int], list[Any]]:
        """Send many requests while reading replies, so neither side blocks on a full socket buffer.

        Returns the request ids and the replies, in order."""
        with self._lock:
            sock = self._live_socket()
            frames = [self._encode(op, args) for op, args in calls]  # under the lock: ids stay unique
            out = memoryview(b"".join(data for _, data in frames))
            replies: list[Any] = []
            sent = 0
            sel = selectors.DefaultSelector()
            sock.setblocking(False)
            try:
                sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
                while len(replies) < len(frames):
                    events = sel.select(self.timeout)
                    if not events:
                        raise ServerError(f"timed out after {self.timeout} s waiting for {self.path}")
                    mask = events[0][1]
                    if mask & selectors.EVENT_WRITE and sent < len(out):
                        try:
                            sent += sock.send(out[sent : sent + RECV_SIZE])
                        except BlockingIOError:
                            pass
                        if sent == len(out):
                            sel.modify(sock, selectors.EVENT_READ)
                    if mask & selectors.EVENT_READ:
                        try:
                            data = sock.recv(RECV_SIZE)
                        except BlockingIOError:
                            continue
                        if not data:
                            raise ServerError(f"the server at {self.path} closed the connection")
                        replies.extend(unpack_body(body) for body in self._reader.feed(data))
                if self._reader.buffered:
                    raise ProtocolError("the server sent more replies than requests")
            except BaseException:
                self._break()
                raise
            finally:
                sel.close()
                if self._sock is not None:
                    sock.settimeout(self.timeout)
        return [rid for rid, _ in frames], replies

    def _live_socket(self) -> socket.socket:
        if self._sock is None:
            raise ServerError(f"the connection to {self.path} is closed")
        return self._sock

    def _break(self) -> None:
        """After a failed exchange the stream position is unknown: drop the connection."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._reader = FrameReader()
        self._frames.clear()

    def _next_frame(self, sock: socket.socket) -> Any:
        """The next reply body; in the common case the whole reply is one recv, sliced without a copy."""
        frames = self._frames
        while not frames:
            data = sock.recv(RECV_SIZE)
            if not data:
                raise ServerError(f"the server at {self.path} closed the connection")
            frames.extend(self._reader.feed(data))
        return frames.popleft()

    def _result(self, reply: Any, rid: int, convert: Convert) -> Any:
        if not isinstance(reply, dict):
            raise ProtocolError(f"malformed reply: {reply!r:.200}")
        if "error" in reply:
            error = error_from_payload(reply["error"])
            if isinstance(error, ProtocolError) and reply.get("id") is None:
                self._break()  # the server could not read our frame; it may have closed the stream
            raise error
        if reply.get("id") != rid:
            self._break()
            raise ProtocolError(f"reply id {reply.get('id')!r} does not match request id {rid}")
        value = reply.get("ok")
        return convert(value) if convert is not None else value


class Pipeline(_Calls):
    """Queued calls of one Client: each method returns the pipeline; ``execute()`` returns the results.

    >>> p = client.pipeline()
    >>> p.radius(code_a, 8).radius(code_b, 8).get("key")   # doctest: +SKIP
    >>> hits_a, hits_b, (code, meta) = p.execute()           # doctest: +SKIP
    """

    def __init__(self, client: Client):
        self.client = client
        self.bits = client.bits
        self._calls: list[tuple[str, dict[str, Any], Convert]] = []

    def _submit(self, op: str, args: dict[str, Any], convert: Convert = None) -> Pipeline:
        self._calls.append((op, args, convert))
        return self

    def __len__(self) -> int:
        return len(self._calls)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self._calls.clear()

    def execute(self, return_exceptions: bool = False) -> list[Any]:
        """Send every queued call and return their results in order.

        An error raises the first failed call's exception (after all replies are read, so the connection
        stays usable), or with ``return_exceptions=True`` takes that call's place in the list.
        """
        calls, self._calls = self._calls, []
        if not calls:
            return []
        client = self.client
        ids, replies = client._exchange([(op, args) for op, args, _ in calls])
        results: list[Any] = []
        first_error: HashDBError | None = None
        for rid, (_, _, convert), reply in zip(ids, calls, replies, strict=True):
            try:
                results.append(client._result(reply, rid, convert))
            except HashDBError as e:
                if client.closed:
                    raise
                first_error = first_error or e
                results.append(e)
        if first_error is not None and not return_exceptions:
            raise first_error
        return results


def connect(path: str | os.PathLike[str], timeout: float | None = None) -> Client:
    """Connect to the hashdb server listening on the Unix socket ``path``."""
    return Client(path, timeout=timeout)


__all__ = ["Client", "Pipeline", "connect"]
