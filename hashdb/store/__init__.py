"""The storage layer: a hashdb database is one LMDB environment (a directory) with named tables.

    env.py      the LMDB environment: opening and creating (owner-only files by default), read and write
                transactions, map growth, LMDB errors turned into StorageError
    schema.py   the tables, their key encodings, format version and the metadata that makes a database
    records.py  key <-> id allocation (freed ids reused) and the block codec that stores codes by id
    log.py      the change log every write appends to, its compaction, and the readers registry
    core.py     Store, which joins them, and open_store()/release_store(): one Store per path per process

Nothing here knows the in-memory index; ``HashDB`` (db.py) ties the two together.
"""

from .core import LAYER_NEXT_ID, MAX_LAYERS, Change, LayerSet, LayerSpace, Store, layer_key, open_store, release_store
from .env import DEFAULT_MAP_SIZE, DEFAULT_MODE, MAX_MAP_SIZE, Environment, RWLock, Txn, file_identity
from .log import LOG_BATCH, LOG_PIN_BYTES, OP_DELETE, OP_PUT, ChangeLog, LogBatch, pid_alive
from .records import MAX_KEY_BYTES, Records, block_size, put_reserve
from .schema import (
    ALL_TABLES,
    FORMAT_VERSION,
    LAYER_TABLES,
    TABLES,
    Tables,
    pack_meta,
    pack_seq,
    unpack_meta,
    unpack_seq,
)

__all__ = [
    "ALL_TABLES",
    "LAYER_NEXT_ID",
    "LAYER_TABLES",
    "MAX_LAYERS",
    "Change",
    "LayerSet",
    "LayerSpace",
    "layer_key",
    "DEFAULT_MAP_SIZE",
    "DEFAULT_MODE",
    "FORMAT_VERSION",
    "LOG_BATCH",
    "LOG_PIN_BYTES",
    "MAX_KEY_BYTES",
    "MAX_MAP_SIZE",
    "OP_DELETE",
    "OP_PUT",
    "TABLES",
    "ChangeLog",
    "Environment",
    "LogBatch",
    "RWLock",
    "Records",
    "Store",
    "Tables",
    "Txn",
    "block_size",
    "file_identity",
    "open_store",
    "pack_meta",
    "pack_seq",
    "pid_alive",
    "put_reserve",
    "release_store",
    "unpack_meta",
    "unpack_seq",
]
