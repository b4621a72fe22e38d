"""The error hierarchy. The CLI maps these to exit codes and the server to error replies."""

from __future__ import annotations


class HashDBError(Exception):
    """Base class of every error hashdb raises on purpose."""


class InvalidCode(HashDBError, ValueError):
    """A code of the wrong length, bad hex, a non-binary array, or an unsupported type."""


class InvalidKey(HashDBError, ValueError):
    """A key that is not a non-empty str or is longer than 511 utf-8 bytes."""


class InvalidMeta(HashDBError, ValueError):
    """Metadata that msgpack cannot serialize (or that is not a mapping)."""


class InvalidArgument(HashDBError, ValueError):
    """Any other bad argument: a negative radius, k < 1, bits not a multiple of 64, an unknown force=..."""


class KeyNotFound(HashDBError, KeyError):
    """The key is not in the database."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else "key not found"


class BitsMismatch(HashDBError):
    """The database was created with another code width than the one asked for."""


class StorageError(HashDBError):
    """The database directory cannot be opened, is of an unknown format, or is corrupted; or LMDB failed
    (a full disk, no permission): the write concerned stored nothing."""


class DatabaseNotFound(StorageError):
    """No database at the path, and it was not to be created (read-only, create=False, or no bits=)."""


class NotADatabase(StorageError):
    """The path exists but is not a hashdb database (a file, a foreign LMDB environment, missing tables)."""


class ModelFormatError(HashDBError):
    """A model file or object that cannot be read, is empty, or holds no convolution weights.

    Always one line of printable text: what a file puts in a message (a name, a parser's quote of its bytes)
    has its line breaks and other control characters (a terminal's colour codes) written as escapes."""

    def __init__(self, message: object = "", *args: object) -> None:
        text = str(message)
        if not text.isprintable():
            text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
        super().__init__(text, *args)


class ProtocolError(HashDBError):
    """A malformed, oversized or unknown request or reply on the server socket."""


class ServerError(HashDBError):
    """The server is unreachable or answered with an error hashdb has no class for."""


def shown(value: object, limit: int = 80) -> str:
    """``value`` as an error message may show it: the repr of a scalar, cut to ``limit`` characters; only the
    type and size of a container. A request's field may nest 1,000 deep and repr() of it raises RecursionError
    (which killed the server), so untrusted containers are never repr'd."""
    scalars = (type(None), bool, int, float, str, bytes, bytearray)
    if isinstance(value, scalars):
        text = repr(value[: limit + 1] if isinstance(value, str | bytes | bytearray) else value)
        return text if len(text) <= limit else text[:limit] + "..."
    if isinstance(value, list | tuple) and len(value) <= 8 and all(isinstance(v, bool | int | float) for v in value):
        return repr(value)[:limit]  # a short flat list of numbers (a shape, offsets): safe to show whole
    try:
        size = f" of {len(value)} items"  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - an object without a length (or a hostile __len__): its type alone
        size = ""
    return f"a {type(value).__name__}{size}"


# Stable names used on the wire and by the CLI; the server sends type(e).__name__ and the client maps it back.
ERROR_TYPES: dict[str, type[HashDBError]] = {
    cls.__name__: cls
    for cls in (
        HashDBError,
        InvalidCode,
        InvalidKey,
        InvalidMeta,
        InvalidArgument,
        KeyNotFound,
        BitsMismatch,
        StorageError,
        DatabaseNotFound,
        NotADatabase,
        ModelFormatError,
        ProtocolError,
        ServerError,
    )
}
