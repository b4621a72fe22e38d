"""Codes as users hand them to us, and the two forms we keep.

Canonical form: ``bytes`` of length bits/8, bit i is bit (7 - i % 8) of byte i // 8 (numpy ``packbits``
order). Internal form: uint64 words, one row per code, the canonical bytes viewed little-endian. Hamming
distance only needs *some* fixed bijection between the two, and a plain view is free.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .errors import InvalidArgument, InvalidCode

MIN_BITS = 64
MAX_BITS = 2048

Code = bytes | bytearray | memoryview | str | np.ndarray

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def check_bits(bits: Any) -> int:
    """Return ``bits`` as an int if it is a multiple of 64 in 64..2048, else raise InvalidArgument."""
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise InvalidArgument(f"bits must be an int, got {type(bits).__name__}")
    bits = int(bits)
    if bits < MIN_BITS or bits > MAX_BITS or bits % 64:
        raise InvalidArgument(f"bits must be a multiple of 64 in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return bits


def to_bytes(code: Any, bits: int) -> bytes:
    """Canonical bytes of one code given as bytes, hex str, uint8 array (packed) or bool/0-1 array (unpacked)."""
    nbytes = bits // 8
    if isinstance(code, bytes | bytearray | memoryview):
        raw = bytes(code)
        if len(raw) != nbytes:
            raise InvalidCode(f"code has {len(raw)} bytes, expected {nbytes} ({bits} bits)")
        return raw
    if isinstance(code, str):
        text = code.strip()
        if text[:2].lower() == "0x":
            text = text[2:]
        if len(text) != 2 * nbytes:
            raise InvalidCode(f"hex code has {len(text)} digits, expected {2 * nbytes} ({bits} bits)")
        # bytes.fromhex skips spaces, so "0011 22" would pass the length check and come out short.
        if not _HEX_DIGITS.issuperset(text):
            raise InvalidCode(f"code is not valid hex (only 0-9 and a-f, no spaces): {code[:80]!r}")
        return bytes.fromhex(text)
    if isinstance(code, np.ndarray):
        return _array_to_bytes(code, bits)
    if isinstance(code, list | tuple):
        try:
            arr = np.asarray(code)
        except (ValueError, TypeError, OverflowError):  # ragged nesting, or items numpy cannot hold
            raise InvalidCode(f"code list must be a flat list of {bits} bits or {nbytes} bytes") from None
        return _array_to_bytes(arr, bits)
    raise InvalidCode(
        f"code must be bytes, a hex str, a uint8 array or a bool array, got {type(code).__name__}"
    )


def _array_to_bytes(arr: np.ndarray, bits: int) -> bytes:
    nbytes = bits // 8
    if arr.ndim != 1:
        raise InvalidCode(f"code array must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        if arr.size != bits:
            raise InvalidCode(f"bool code has {arr.size} bits, expected {bits}")
        return np.packbits(arr).tobytes()
    if arr.dtype == np.uint8 and arr.size == nbytes:
        return arr.tobytes()
    if arr.dtype.kind in "iu" and arr.size == bits:
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise InvalidCode("an unpacked code array must hold only 0 and 1")
        return np.packbits(arr.astype(np.uint8)).tobytes()
    raise InvalidCode(
        f"code array of dtype {arr.dtype} and size {arr.size} is neither {nbytes} packed uint8 bytes "
        f"nor {bits} bits"
    )


def many_to_bytes(codes: Any, bits: int) -> list[bytes]:
    """Canonical bytes of many codes: an (n, bits/8) uint8 array, an (n, bits) bool array, or an iterable."""
    if isinstance(codes, np.ndarray) and codes.ndim == 2:
        if codes.dtype == np.uint8 and codes.shape[1] == bits // 8:
            return [row.tobytes() for row in np.ascontiguousarray(codes)]
        if codes.dtype == np.bool_ and codes.shape[1] == bits:
            packed = np.packbits(codes, axis=1)
            return [row.tobytes() for row in packed]
        raise InvalidCode(f"code matrix of dtype {codes.dtype} and shape {codes.shape} does not fit {bits} bits")
    if isinstance(codes, str | bytes) or (isinstance(codes, np.ndarray) and codes.ndim == 0):
        raise InvalidCode("expected a sequence of codes, got a single code")
    if not isinstance(codes, Iterable):
        raise InvalidCode(f"expected a sequence of codes, got {type(codes).__name__}")
    return [to_bytes(c, bits) for c in codes]


def bytes_to_words(raw: bytes | Sequence[bytes], bits: int) -> np.ndarray:
    """uint64 words: shape (bits/64,) for one code, (n, bits/64) for a sequence."""
    words = bits // 64
    if isinstance(raw, bytes | bytearray | memoryview):
        return np.frombuffer(bytes(raw), dtype="<u8").astype(np.uint64)
    joined = b"".join(raw)
    return np.frombuffer(joined, dtype="<u8").astype(np.uint64).reshape(-1, words)


def words_to_bytes(words: np.ndarray) -> bytes:
    """Inverse of bytes_to_words for one code."""
    return np.ascontiguousarray(words, dtype="<u8").tobytes()


def hamming(a: bytes, b: bytes) -> int:
    """Hamming distance of two canonical codes (plain Python; for oracles and small jobs)."""
    if len(a) != len(b):
        raise InvalidCode(f"codes of different lengths: {len(a)} and {len(b)} bytes")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_count()
