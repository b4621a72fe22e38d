"""The tables of a hashdb database, their key encodings, and the metadata that makes a directory one.

    meta     name -> msgpack value: format version, bits, codec config, creation time, next id, block
             size, and a random database id (sidecar files stamp themselves with it)
    ids      key (utf-8) -> dense id (8 bytes big-endian)
    keys     dense id (8 bytes big-endian) -> key
    blocks   block number (8 bytes big-endian) -> an alive bitmap, then the block's codes (records.py)
    attrs    key -> msgpack map (user metadata; absent when the key has none)
    free     ids of deleted keys (8 bytes big-endian) -> b"", handed out again before fresh ones
    log      sequence (8 bytes big-endian) -> one batch of upserts or deletes (log.py)
    readers  pid + token -> last sequence that reader's in-memory index applied (compaction hint only)

Per-layer codes live in a second space of the same tables, prefixed ``layer_`` (layer_ids, layer_keys,
layer_blocks, layer_attrs, layer_free, layer_log, layer_readers), with their own id counter
(``layer_next_id`` in meta). A layer's key is its model's dense id (8 bytes big-endian) and its position
in the model (2 bytes big-endian), so one model's layers are one key range; its attrs value is its name.
A database made before layers existed has none of these tables: a writable open creates them, a
read-only open reports no layers (``Tables.layers`` is None).
"""

from __future__ import annotations

import secrets
import struct
import time
from typing import Any

import lmdb
import msgpack

from ..errors import BitsMismatch, InvalidArgument, NotADatabase, StorageError
from .env import Environment, Txn

FORMAT_VERSION = 1
TABLES = ("meta", "ids", "keys", "blocks", "attrs", "free", "log", "readers")
# The layer space: the same tables but meta (shared), under a prefix.
LAYER_PREFIX = "layer_"
LAYER_TABLES = tuple(LAYER_PREFIX + name for name in TABLES if name != "meta")
ALL_TABLES = TABLES + LAYER_TABLES

_SEQ = struct.Struct(">Q")


def pack_seq(seq: int) -> bytes:
    """An id, block number or log sequence as an 8-byte big-endian key (byte order = numeric order)."""
    return _SEQ.pack(seq)


def unpack_seq(raw: bytes) -> int:
    return _SEQ.unpack(raw)[0]


def pack_meta(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack_meta(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


class Tables:
    """The named sub-database handles of one space (models, or layers) of an environment."""

    __slots__ = TABLES
    meta: Any
    ids: Any
    keys: Any
    blocks: Any
    attrs: Any
    free: Any
    log: Any
    readers: Any

    def __init__(self, handles: dict[str, Any], prefix: str = "") -> None:
        for name in TABLES:
            setattr(self, name, handles[name if name == "meta" else prefix + name])


def open_tables(env: Environment) -> tuple[Tables, Tables | None]:
    """Open (creating when writable) every table; refuse an environment holding anything else. Returns the
    model tables and the layer tables (None when a read-only open finds a database made before layers)."""
    path = env.path
    try:
        if env.readonly:  # no write transaction at all: lmdb opens the handles in a read transaction
            handles = {n: env.env.open_db(n.encode(), create=False) for n in TABLES}
            layers = open_layer_tables(env)
            return Tables(handles), layers
        with env.env.begin(write=True) as txn:
            # Refuse (and leave untouched) an environment holding anything but our tables.
            names = [k.decode("latin-1") for k in txn.cursor().iternext(values=False)]
            if any(n not in ALL_TABLES for n in names):
                raise NotADatabase(f"{path!r} is an LMDB environment but not a hashdb database")
            handles = {n: env.env.open_db(n.encode(), txn=txn) for n in ALL_TABLES}
    except lmdb.NotFoundError as e:
        raise NotADatabase(f"{path!r} is not a hashdb database (missing table: {e})") from e
    except lmdb.Error as e:
        raise StorageError(f"cannot open the tables of {path!r}: {e}") from e
    return Tables(handles), Tables(handles, LAYER_PREFIX)


def open_layer_tables(env: Environment, meta: Any = None) -> Tables | None:
    """Read-only: the layer tables, or None while the database has none (made before layers existed).
    The caller holds no transaction of this environment's in this thread."""
    try:
        handles = {n: env.env.open_db(n.encode(), create=False) for n in LAYER_TABLES}
        handles["meta"] = meta if meta is not None else env.env.open_db(b"meta", create=False)
    except lmdb.NotFoundError:
        return None
    return Tables(handles, LAYER_PREFIX)


def get_meta(txn: Txn, tables: Tables, name: bytes) -> Any:
    raw = txn.get(name, db=tables.meta)
    return None if raw is None else unpack_meta(raw)


def init_meta(env: Environment, tables: Tables, bits: int | None, codec: dict[str, Any] | None, block: int) -> int:
    """Check the stored metadata against ``bits``/``codec``, or write it for a new database; returns bits."""
    path = env.path
    with env.read() as txn:
        if txn.get(b"format", db=tables.meta) is not None:
            return check_meta(txn, tables, path, bits, codec)
    if bits is None:
        raise NotADatabase(f"{path!r} holds no hashdb metadata, and no bits= was given to create it")
    if env.readonly:
        raise NotADatabase(f"{path!r} holds no hashdb metadata")

    def create(txn: Txn) -> int:
        if txn.get(b"format", db=tables.meta) is not None:  # another process created it meanwhile
            return -1
        if txn.stat(tables.ids)["entries"]:
            raise NotADatabase(f"{path!r} has data but no hashdb metadata")
        for name, value in (
            (b"format", FORMAT_VERSION),
            (b"bits", bits),
            (b"block", block),
            (b"created", time.time()),
            (b"next_id", 0),
            (b"codec", codec),
            (b"db_id", secrets.token_hex(16)),
        ):
            txn.put(name, pack_meta(value), db=tables.meta)
        return bits

    if env.write(create) == -1:
        with env.read() as txn:
            return check_meta(txn, tables, path, bits, codec)
    return bits


def check_meta(txn: Txn, tables: Tables, path: str, bits: int | None, codec: dict[str, Any] | None) -> int:
    version = unpack_meta(txn.get(b"format", db=tables.meta))
    if version != FORMAT_VERSION:
        raise StorageError(f"{path!r} has format version {version!r}; this hashdb reads {FORMAT_VERSION}")
    raw = txn.get(b"bits", db=tables.meta)
    if raw is None:
        raise StorageError(f"{path!r} has no stored code width")
    stored = unpack_meta(raw)
    if bits is not None and bits != stored:
        raise BitsMismatch(f"{path!r} holds {stored}-bit codes, not {bits}")
    if codec is not None:
        current = get_meta(txn, tables, b"codec")
        if current is not None and current != codec:
            raise InvalidArgument(f"{path!r} was built with another codec config: {current!r}")
    return int(stored)


def database_id(txn: Txn, tables: Tables) -> str:
    """A stable identity of this database, kept by copies: the random id stored at creation, or (for a
    database made before ids were stored) its creation time."""
    stored = get_meta(txn, tables, b"db_id")
    if isinstance(stored, str):
        return stored
    return f"created-{get_meta(txn, tables, b'created')!r}"
