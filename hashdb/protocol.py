"""The wire protocol shared by hashdb.server and hashdb.client.

A frame is a 4-byte big-endian length followed by that many bytes of one msgpack map. Requests are
``{"id": int, "op": str, ...arguments}``; replies are ``{"id": same, "ok": result}`` or
``{"id": same, "error": {"type": str, "message": str}}``, where ``type`` is a name from
``hashdb.errors.ERROR_TYPES``. Codes travel as msgpack bin (hex str also accepted); a model's layer codes as
an array of [name, code] pairs (``insert``'s ``layers``; ``insert_many``'s: one such array or nil per key).
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from .errors import ERROR_TYPES, HashDBError, ProtocolError, ServerError

# 16 MiB holds an insert_many of ~250k codes of 256 bits with short keys; larger batches should be split.
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
# One recv of this size holds a whole reply or pipelined batch in the common case (both sides use it).
RECV_SIZE = 256 * 1024
PROTOCOL_VERSION = 1
# Most keys one "keys_after" request may ask for: a page of 4096 keys of at most 511 bytes stays near 2 MiB.
MAX_KEYS_PAGE = 4096

READ, WRITE, INFO = "read", "write", "info"

# op -> (kind, required arguments, optional arguments). Each maps onto the HashDB method of the same
# name, except len / contains / ping (``len(db)``, ``key in db``, server information) and codec (the
# ``HashDB.codec`` property); keys_after returns at most MAX_KEYS_PAGE keys whatever its limit.
OPS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "insert": (WRITE, ("key", "code"), ("meta", "layers")),
    "insert_many": (WRITE, ("keys", "codes"), ("metas", "layers")),
    "delete": (WRITE, ("key",), ()),
    "get": (READ, ("key",), ()),
    "codec": (READ, (), ()),
    "set_codec": (WRITE, ("config",), ()),
    "radius": (READ, ("code", "r"), ("force",)),
    "radius_many": (READ, ("codes", "r"), ("force",)),
    "knn": (READ, ("code", "k"), ("force",)),
    "layers": (READ, ("key",), ()),
    "layer_radius": (READ, ("code", "r"), ("force",)),
    "layer_radius_many": (READ, ("codes", "r"), ("force",)),
    "layer_count": (READ, (), ()),
    "len": (READ, (), ()),
    "contains": (READ, ("key",), ()),
    "stats": (READ, (), ()),
    "keys_after": (READ, (), ("after", "limit")),
    "ping": (INFO, (), ()),
}


def encode_frame(body: bytes) -> bytes:
    """One frame: ``body`` (an encoded msgpack map) prefixed with its length."""
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Splits a byte stream into frame bodies, however the stream was cut into chunks.

    ``feed(chunk)`` returns the bodies completed by ``chunk``, in order. When nothing is buffered, frames
    are sliced out of ``chunk`` itself (memoryviews over the immutable bytes, no copy): the common case of
    one recv holding whole frames costs no buffering. A header announcing more than ``max_frame`` bytes
    sets ``too_big`` to that size and stops the reader (the rest of such a stream cannot be trusted).
    """

    __slots__ = ("max_frame", "too_big", "_buf")

    def __init__(self, max_frame: int | None = None) -> None:
        self.max_frame = max_frame
        self.too_big: int | None = None
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back for the next chunk."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[bytes | bytearray | memoryview]:
        if self.too_big is not None:
            return []
        if self._buf:
            self._buf += chunk
            data: bytes | bytearray = self._buf
        else:
            data = chunk
        bodies: list[bytes | bytearray | memoryview] = []
        view = memoryview(data) if data is chunk else None
        pos, end, limit = 0, len(data), self.max_frame
        while end - pos >= HEADER_SIZE:
            size = HEADER.unpack_from(data, pos)[0]
            if limit is not None and size > limit:
                self.too_big = size
                self._buf = bytearray()
                return bodies
            start = pos + HEADER_SIZE
            if end - start < size:
                break
            # Slices of the bytearray are copies (it is cut below); views of an immutable chunk are not.
            bodies.append(view[start : start + size] if view is not None else data[start : start + size])
            pos = start + size
        if view is not None:
            if pos < end:
                self._buf += view[pos:]
        elif pos:
            del self._buf[:pos]
        return bodies


def unpack_body(body: bytes | bytearray | memoryview) -> Any:
    """Decode one frame body; raises ProtocolError on anything that is not valid msgpack."""
    try:
        # strict_map_key=False: user metadata may use int keys, as HashDB itself allows.
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for malformed input
        raise ProtocolError(f"malformed msgpack frame: {str(e) or type(e).__name__}") from None


def error_payload(exc: BaseException) -> dict[str, str]:
    """The ``error`` member of a reply for ``exc``: the hashdb class name, or ServerError for anything else."""
    if isinstance(exc, HashDBError):
        name = type(exc).__name__
        if name not in ERROR_TYPES:  # a subclass we do not know on the wire: send its nearest known base
            name = next(c.__name__ for c in type(exc).__mro__ if c.__name__ in ERROR_TYPES)
        return {"type": name, "message": str(exc)}
    return {"type": "ServerError", "message": f"internal error: {type(exc).__name__}: {exc}"}


def error_from_payload(payload: Any) -> HashDBError:
    """The exception to raise for a reply's ``error`` member (the inverse of error_payload)."""
    if not isinstance(payload, dict):
        return ProtocolError(f"malformed error reply: {payload!r:.200}")
    cls = ERROR_TYPES.get(str(payload.get("type")), ServerError)
    return cls(str(payload.get("message", "")))
