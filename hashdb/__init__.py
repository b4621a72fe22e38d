"""hashdb: find copies of neural-network models among millions.

``import hashdb`` stays light: HashDB (numba, lmdb) and the client load on first use, and the codec never
imports torch until a model is actually hashed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    BitsMismatch,
    DatabaseNotFound,
    HashDBError,
    InvalidArgument,
    InvalidCode,
    InvalidKey,
    InvalidMeta,
    KeyNotFound,
    ModelFormatError,
    NotADatabase,
    ProtocolError,
    ServerError,
    StorageError,
)

__version__ = "0.1.0"

# Code length of the codec when none is given (ModelHasher, `hashdb hash`, the demo). 768 bits: the shortest length
# measured at which the codec meets its independence targets and its recall target on the zoo (docs/codec.md,
# *Code length*). A database keeps the length it was created with.
DEFAULT_BITS = 768

__all__ = [
    "HashDB",
    "connect",
    "HashDBError",
    "InvalidCode",
    "InvalidKey",
    "InvalidMeta",
    "InvalidArgument",
    "KeyNotFound",
    "BitsMismatch",
    "StorageError",
    "DatabaseNotFound",
    "NotADatabase",
    "ModelFormatError",
    "ProtocolError",
    "ServerError",
    "DEFAULT_BITS",
    "__version__",
]

if TYPE_CHECKING:
    from .client import connect
    from .db import HashDB


def __getattr__(name: str) -> Any:
    if name == "HashDB":
        from .db import HashDB

        return HashDB
    if name == "connect":
        from .client import connect

        return connect
    raise AttributeError(f"module 'hashdb' has no attribute {name!r}")
