"""The wire protocol shared by hashdb.server and hashdb.client.

A frame is a 4-byte big-endian length followed by that many bytes of one msgpack map. Requests are
``{"id": int, "op": str, ...arguments}``; replies are ``{"id": same, "ok": result}`` or
``{"id": same, "error": {"type": str, "message": str}}``, where ``type`` is a name from
``hashdb.errors.ERROR_TYPES``. Codes travel as msgpack bin (hex str also accepted).
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import ERROR_TYPES, HashDBError, ProtocolError, ServerError

# 16 MiB holds an insert_many of ~250k codes of 256 bits with short keys; larger batches should be split.
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
HEADER_SIZE = 4
PROTOCOL_VERSION = 1

READ, WRITE, INFO = "read", "write", "info"

# op -> (kind, required arguments, optional arguments). Each maps onto the HashDB method of the same
# name, except len / contains / ping (``len(db)``, ``key in db``, server information) and codec (the
# ``HashDB.codec`` property).
OPS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "insert": (WRITE, ("key", "code"), ("meta",)),
    "insert_many": (WRITE, ("keys", "codes"), ("metas",)),
    "delete": (WRITE, ("key",), ()),
    "get": (READ, ("key",), ()),
    "codec": (READ, (), ()),
    "set_codec": (WRITE, ("config",), ()),
    "radius": (READ, ("code", "r"), ("force",)),
    "radius_many": (READ, ("codes", "r"), ("force",)),
    "knn": (READ, ("code", "k"), ("force",)),
    "len": (READ, (), ()),
    "contains": (READ, ("key",), ()),
    "stats": (READ, (), ()),
    "ping": (INFO, (), ()),
}


def frame(body: bytes) -> bytes:
    """Prefix an encoded msgpack body with its length."""
    return len(body).to_bytes(HEADER_SIZE, "big") + body


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
