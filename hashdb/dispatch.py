"""What the server does with a request, apart from moving bytes: check it, run it on HashDB, encode the reply.

``parse_request`` checks a decoded map against protocol.OPS (and gives an insert's layer codes the shape HashDB
takes: (name, code) tuples); ``answer_reads`` runs a turn's cheap reads
(radius queries sharing a radius as one ``radius_many``); ``run_read`` runs one expensive read on a reader
thread, with a bound on the size of its answer; ``run_writes`` hands writes to ``HashDB.write_batch``
(group commit); ``encode_reply`` packs a result or an error into one frame. No sockets here (server.py).
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import numpy as np

from .codes import to_bytes
from .errors import HashDBError, InvalidArgument, ProtocolError, ServerError, shown
from .protocol import MAX_KEYS_PAGE, OPS, READ, WRITE, encode_frame, error_payload

log = logging.getLogger("hashdb.server")

# radius_many answers at most this many matches in one reply (about 40 MB of msgpack with 16-byte keys,
# a few hundred MB of Python objects while it is built); it is answered in chunks of codes and refused
# as soon as the running count passes the limit, before the rest is computed.
MAX_REPLY_MATCHES = 2_000_000
RADIUS_MANY_CHUNK = 64
# Reads the loop thread answers itself (no thread hop): bounded work. Anything else goes to a reader
# thread so that one huge query does not hold up every other connection.
INLINE_RADIUS_MANY = 16


class Request:
    __slots__ = ("rid", "op", "args", "error")

    def __init__(self, rid: Any, op: str | None, args: dict[str, Any] | None, error: HashDBError | None = None):
        self.rid, self.op, self.args, self.error = rid, op, args, error


# op -> (required arguments, every name a request of that op may carry)
_SPECS = {op: (required, frozenset(required + optional + ("id", "op"))) for op, (_, required, optional) in OPS.items()}


def parse_request(message: Any) -> Request:
    """Check a decoded request map against protocol.OPS; a bad one becomes a request carrying its error.

    ``message`` is consumed: its arguments become the request's (it is a fresh map from the decoder)."""
    if not isinstance(message, dict):
        return Request(None, None, None, ProtocolError(f"a request must be a map, got {type(message).__name__}"))
    rid = message.pop("id", None)
    op = message.pop("op", None)
    spec = _SPECS.get(op) if type(op) is str else None
    if spec is None:
        return Request(rid, None, None, ProtocolError(f"unknown op {shown(op)}"))
    required, allowed = spec
    if not message.keys() <= allowed:
        unknown = sorted(name[:80] if type(name) is str else shown(name) for name in message if name not in allowed)
        return Request(rid, op, None, ProtocolError(f"op {op!r} takes no argument {', '.join(unknown)}"))
    for name in required:
        if name not in message:
            missing = [n for n in required if n not in message]
            return Request(rid, op, None, ProtocolError(f"op {op!r} is missing {', '.join(missing)}"))
    if message.get("layers") is not None:
        try:
            if op == "insert":
                message["layers"] = _layer_pairs(message["layers"], "layers")
            else:
                message["layers"] = _layers_per_key(message["layers"])
        except InvalidArgument as e:
            return Request(rid, op, None, e)
    return Request(rid, op, message)


def _layer_pairs(value: Any, where: str) -> list[tuple[Any, Any]]:
    """One model's layer codes from the wire ([[name, code], ...]) as the (name, code) tuples HashDB takes;
    what the names and codes hold is HashDB's to check (it refuses bad ones before writing anything)."""
    if not isinstance(value, list):
        raise InvalidArgument(f"{where} must be an array of [name, code] pairs, got {_kind(value)}")
    pairs: list[tuple[Any, Any]] = []
    for i, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            raise InvalidArgument(f"{where}[{i}] must be a [name, code] pair, got {_kind(pair)}")
        pairs.append((pair[0], pair[1]))
    return pairs


def _layers_per_key(value: Any) -> list[list[tuple[Any, Any]] | None]:
    """insert_many's layers: one array of [name, code] pairs, or nil, per key."""
    if not isinstance(value, list):
        raise InvalidArgument(f"layers must be an array with one entry per key, got {_kind(value)}")
    return [None if item is None else _layer_pairs(item, f"layers[{i}]") for i, item in enumerate(value)]


def _kind(value: Any) -> str:
    """What a wire value is, in a few words (never its repr: it may be nested a thousand deep)."""
    return f"an array of {len(value)}" if isinstance(value, list) else type(value).__name__


def is_write(request: Request) -> bool:
    return request.error is None and OPS[request.op][0] == WRITE  # type: ignore[index]


def is_heavy(request: Request, bits: int) -> bool:
    """True for a read whose cost has no small bound (a wide radius, a kNN, many codes, a forced plan): a reader
    thread runs it."""
    if request.error is not None:
        return False
    op, args = request.op, request.args
    if op in _QUERIES and args.get("force") is not None:  # type: ignore[union-attr]
        return True  # a forced plan may cost anything (building a BK-tree over 1M codes took 7.2 s)
    if op in ("radius", "layer_radius"):  # a layer query is bounded as a model query of the same radius
        r = args["r"]  # type: ignore[index]
        return not (type(r) is int and r * 8 <= bits)
    if op in ("radius_many", "layer_radius_many"):
        r, codes = args["r"], args["codes"]  # type: ignore[index]
        return not (type(r) is int and r * 8 <= bits and isinstance(codes, list) and len(codes) <= INLINE_RADIUS_MANY)
    return op == "knn"


_QUERIES = ("radius", "radius_many", "knn", "layer_radius", "layer_radius_many")


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
    if op == "keys_after":
        limit = args.get("limit", MAX_KEYS_PAGE)
        if type(limit) is int and limit > MAX_KEYS_PAGE:
            limit = MAX_KEYS_PAGE  # a page is bounded; the client asks again from the last key
        return db.keys_after(args.get("after"), limit)
    if op in ("radius_many", "layer_radius_many"):
        return _bounded_many(getattr(db, op), op, **args)
    if op == "layer_radius":  # one code's layer matches are bounded as radius_many's (a layer index is larger)
        answer = db.layer_radius(**args)
        _check_reply_size(op, len(answer))
        return answer
    return getattr(db, op)(**args)


def _bounded_many(query: Any, op: str, codes: Any, r: Any, force: Any = None) -> list[Any]:
    """radius_many or layer_radius_many in chunks of codes, refused once the answer passes MAX_REPLY_MATCHES
    matches."""
    if not isinstance(codes, list) or len(codes) <= RADIUS_MANY_CHUNK:
        answers = query(codes, r, force=force)
        _check_reply_size(op, sum(map(len, answers)))
        return answers
    out: list[Any] = []
    total = 0
    for start in range(0, len(codes), RADIUS_MANY_CHUNK):
        part = query(codes[start : start + RADIUS_MANY_CHUNK], r, force=force)
        total += sum(map(len, part))
        _check_reply_size(op, total, start + len(part), len(codes))
        out.extend(part)
    return out


def _check_reply_size(op: str, matches: int, done: int | None = None, of: int | None = None) -> None:
    if matches > MAX_REPLY_MATCHES:
        where = "" if done is None else f" after {done} of {of} codes"
        raise ProtocolError(
            f"{op} answer has more than {MAX_REPLY_MATCHES:,} matches{where}; "
            "ask for fewer codes or a smaller radius"
        )


def run(db: Any, request: Request, info: dict[str, Any]) -> tuple[str, Any]:
    """("ok", result) or ("error", exception) of one request; never raises."""
    if request.error is not None:
        return "error", request.error
    try:
        return "ok", call(db, request.op, request.args, info)  # type: ignore[arg-type]
    except HashDBError as e:
        return "error", e
    except Exception as e:  # a bug in a layer below: answer, log, keep serving
        log.exception("internal error in op %s", request.op)
        return "error", e


def answer_reads(db: Any, requests: list[Request], info: dict[str, Any], bits: int) -> list[tuple[str, Any]]:
    """Results of cheap reads in order; radius queries sharing (r, force) run as one radius_many call."""
    results: list[tuple[str, Any] | None] = [None] * len(requests)
    by_radius: dict[tuple[int, Any], list[int]] = {}
    for i, request in enumerate(requests):
        if request.op == "radius" and request.error is None:
            args = request.args
            r, force = args["r"], args.get("force")  # type: ignore[index,union-attr]
            if type(r) is int and (force is None or type(force) is str):
                by_radius.setdefault((r, force), []).append(i)
    for (r, force), indices in by_radius.items():
        if len(indices) < 2:
            continue
        try:
            codes = [to_bytes(requests[i].args["code"], bits) for i in indices]  # type: ignore[index]
            answers = db.radius_many(codes, r, force=force)
        except Exception:  # any bad code in the batch (whatever it raises): answer one by one below
            continue
        for i, answer in zip(indices, answers, strict=True):
            results[i] = ("ok", answer)
    return [result if result is not None else run(db, requests[i], info) for i, result in enumerate(results)]


def run_writes(db: Any, requests: list[Request]) -> list[tuple[str, Any]]:
    """Results of checked write requests, through ``db.write_batch`` (group commit, one result per request)."""
    out: list[tuple[str, Any]] = []
    for request, result in zip(requests, db.write_batch([(r.op, r.args) for r in requests]), strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, HashDBError):
                log.error("internal error in op %s", request.op, exc_info=result)
            out.append(("error", result))
        else:
            out.append(("ok", result))
    return out


def _to_builtin(obj: Any) -> Any:
    """msgpack fallback for numpy values a HashDB method may return (stats, distances)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def new_packer() -> msgpack.Packer:
    """A reply packer; Packer objects are not thread-safe, so each thread has its own."""
    return msgpack.Packer(default=_to_builtin, use_bin_type=True, autoreset=True)


def encode_reply(packer: msgpack.Packer, request: Request, kind: str, value: Any) -> bytes:
    """The frame answering ``request``: ``{"id", "ok": value}`` or ``{"id", "error": {...}}``."""
    if kind == "error":
        payload = error_payload(value)
        if isinstance(value, ProtocolError):
            log.warning("protocol error (op %s): %s", request.op, value)
        else:
            log.info("error reply to op %s: %s: %s", request.op, payload["type"], payload["message"])
        return encode_frame(packer.pack({"id": request.rid, "error": payload}))
    try:
        return encode_frame(packer.pack({"id": request.rid, "ok": value}))
    except Exception as e:
        packer.reset()
        log.error("cannot encode the result of op %s: %s", request.op, e)
        error = error_payload(ServerError(f"cannot encode result: {e}"))
        return encode_frame(packer.pack({"id": request.rid, "error": error}))


__all__ = [
    "READ",
    "WRITE",
    "Request",
    "answer_reads",
    "call",
    "encode_reply",
    "is_heavy",
    "is_write",
    "new_packer",
    "parse_request",
    "run",
    "run_writes",
]
