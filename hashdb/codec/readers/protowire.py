"""A small protobuf wire-format decoder, shared by the readers of protobuf-based formats.

Protocol buffers encode a message as a sequence of (field number, wire type, value) records; readers of
Caffe, Core ML, Paddle and TensorFlow files need only a few fields of a few messages, so they walk the
records themselves instead of depending on generated classes. Nothing here allocates more than the
message's own bytes: lengths are checked against what is left before any slice is taken, and every
failure is a ``ValueError`` that the format reader turns into its one-line ``ModelFormatError``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The unsigned varint at ``pos`` and the position after it (at most 10 bytes: a 64-bit value)."""
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


def fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield (field number, wire type, value) for each record of one message.

    The value is an int for VARINT, FIXED32 and FIXED64 (the raw little-endian bits) and a memoryview of
    the payload for LENGTH (a nested message, a string, or a packed repeated field). Groups (deprecated
    wire types 3 and 4) are refused: none of the formats read here uses them.
    """
    for number, wire, value, _, _ in records(buf):
        yield number, wire, value


def records(buf: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview, int, int]]:
    """``fields``, each with the record's span in ``buf``: (number, wire type, value, start, end), where
    ``buf[start:end]`` is the whole record (key, length and payload), so a reader can copy records as they are
    or leave one out. A LENGTH payload is ``buf[end - len(value):end]``."""
    view = memoryview(buf)
    pos = 0
    end = len(view)
    while pos < end:
        start = pos
        key, pos = read_varint(view, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == VARINT:
            value, pos = read_varint(view, pos)
            yield number, wire, value, start, pos
        elif wire == FIXED64:
            if pos + 8 > end:
                raise ValueError("truncated fixed64 field")
            yield number, wire, int.from_bytes(view[pos : pos + 8], "little"), start, pos + 8
            pos += 8
        elif wire == FIXED32:
            if pos + 4 > end:
                raise ValueError("truncated fixed32 field")
            yield number, wire, int.from_bytes(view[pos : pos + 4], "little"), start, pos + 4
            pos += 4
        elif wire == LENGTH:
            size, pos = read_varint(view, pos)
            if size > end - pos:
                raise ValueError(f"field {number} claims {size} bytes, {end - pos} left")
            yield number, wire, view[pos : pos + size], start, pos + size
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wire} (field {number})")


def encode_varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_header(number: int, size: int) -> bytes:
    """The key and length that open a LENGTH record of field ``number`` with a ``size``-byte payload."""
    return encode_varint(number << 3 | LENGTH) + encode_varint(size)


def message(buf: bytes | memoryview) -> dict[int, list[int | memoryview]]:
    """All records of one message grouped by field number, in order (repeated fields keep every value)."""
    out: dict[int, list[int | memoryview]] = {}
    for number, _, value in fields(buf):
        out.setdefault(number, []).append(value)
    return out


def as_bytes(value: int | memoryview) -> memoryview:
    """A LENGTH field's payload; a scalar where a message or string was expected is a format error."""
    if not isinstance(value, memoryview):
        raise ValueError("expected a length-delimited field, found a scalar")
    return value


def as_int(value: int | memoryview) -> int:
    """A VARINT/FIXED field's integer; a length-delimited value where a scalar was expected is an error."""
    if isinstance(value, memoryview):
        raise ValueError("expected a scalar field, found a length-delimited one")
    return value


def signed(value: int, bits: int = 64) -> int:
    """Two's-complement reading of a varint that protobuf encodes as int32/int64."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def text(value: int | memoryview) -> str:
    """A string field, decoded as UTF-8 (undecodable bytes replaced: names are only labels)."""
    return bytes(as_bytes(value)).decode("utf-8", "replace")


def varints(values: list[int | memoryview]) -> list[int]:
    """A repeated integer field, whether written packed (one LENGTH record) or unpacked (one VARINT each)."""
    out: list[int] = []
    for value in values:
        if isinstance(value, memoryview):
            pos = 0
            while pos < len(value):
                item, pos = read_varint(value, pos)
                out.append(item)
        else:
            out.append(value)
    return out


def packed_array(values: list[int | memoryview], dtype: str) -> np.ndarray:
    """A repeated fixed-width field (float, double, fixed32...) as one array, packed or unpacked.

    Packed payloads are viewed in place (no copy); unpacked records (one FIXED32/FIXED64 each) are
    gathered. ``dtype`` is a little-endian numpy dtype string such as ``"<f4"``.
    """
    dt = np.dtype(dtype)
    chunks: list[np.ndarray] = []
    scalars: list[int] = []
    for value in values:
        if isinstance(value, memoryview):
            if len(value) % dt.itemsize:
                raise ValueError(f"packed field of {len(value)} bytes is not a multiple of {dt.itemsize}")
            chunks.append(np.frombuffer(value, dtype=dt))
        else:
            scalars.append(value)
    if scalars:
        raw = np.array(scalars, dtype=np.uint64 if dt.itemsize == 8 else np.uint32)
        chunks.append(raw.view(dt) if raw.dtype.itemsize == dt.itemsize else raw.astype(dt))
    if not chunks:
        return np.zeros(0, dtype=dt)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
