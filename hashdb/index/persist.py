"""The persisted index: a MemoryIndex's arrays in one flat file beside the LMDB environment, mapped on open.

LMDB stays the source of truth; this file is derived from it and never trusted blindly. Layout:

    magic (8 bytes) | header length (u32) | header (JSON) | crc32 of the header (u32) | arrays, each at a
    4 KiB-aligned offset

The header names the format version, the code width, the database it was made from (the LMDB
environment's creation stamp), the log sequence it reflects, the crc32 of that log entry, the file's total
size, and for each array its dtype, shape, offset and a digest. ``read`` refuses (returns None, with the
reason) a file that is short or long (torn), has a bad magic, version, header crc or digest (corrupt), or
names another database or width (foreign); whether its sequence is still reachable through the log is the
caller's check (db.py), as is the fallback: rebuild from LMDB.

Arrays are mapped copy-on-write (``mmap.ACCESS_COPY``): the handle replays the log into them in place
without ever writing the file, and pages it never touches are never read. ``write`` goes to a temporary
file in the same directory, is fsynced and renamed over the old one, so readers see the old file or the new
one, never half of either (a process that still maps the old one keeps its own consistent copy).

Only numpy is needed here: reading and checking a file does not load numba.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
import zlib
from typing import Any

import numpy as np

FILENAME = "index.hashdb"
MAGIC = b"HDBINDEX"
VERSION = 1
ALIGN = 4096
DIGEST_CHUNK = 1 << 17  # words per digest chunk (1 MiB)
_HEAD = struct.Struct("<8sI")
_CRC = struct.Struct("<I")


class Rejected(Exception):
    """The file exists but must not be used (the message says why); the caller rebuilds."""


def path_in(directory: str) -> str:
    return os.path.join(directory, FILENAME)


def digest(buf: np.ndarray) -> int:
    """A position-sensitive 64-bit digest of an array's bytes at memory speed (zlib.crc32 measured 1.8 s/GB
    on the development machine, this 0.3 s/GB): the wrapping sum of each 1 MiB chunk of uint64 words,
    chained across chunks by a multiply-add, so a flipped, zeroed, truncated or moved chunk shows."""
    raw = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    tail = raw.size % 8
    words = raw[: raw.size - tail].view(np.uint64)
    h = raw.size
    mask = (1 << 64) - 1
    for start in range(0, words.size, DIGEST_CHUNK):
        s = int(np.add.reduce(words[start : start + DIGEST_CHUNK], dtype=np.uint64))
        h = (h * 0x100000001B3 + s + 1) & mask
    if tail:
        h = (h * 0x100000001B3 + int.from_bytes(raw[raw.size - tail :].tobytes(), "little") + 1) & mask
    return h


def write(directory: str, stamp: dict[str, Any], arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> str:
    """Save ``arrays`` (and JSON-able ``scalars``) stamped with ``stamp`` (bits, database, seq, log_crc)
    atomically as the directory's index file; returns its path. Raises OSError when it cannot."""
    layout = []
    offset = 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        arrays[name] = a
        layout.append(
            {"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "nbytes": int(a.nbytes), "digest": digest(a)}
        )
    header: dict[str, Any] = {"version": VERSION, **stamp, "scalars": scalars, "arrays": layout}
    # Offsets depend on the header's length, which depends on the offsets: fix them with a generous pad.
    for _ in range(2):
        raw = json.dumps(header, sort_keys=True).encode()
        offset = _round_up(_HEAD.size + len(raw) + _CRC.size + 64)
        for entry in layout:
            entry["offset"] = offset
            offset = _round_up(offset + entry["nbytes"])
        header["size"] = offset
    raw = json.dumps(header, sort_keys=True).encode()
    if layout and _HEAD.size + len(raw) + _CRC.size > layout[0]["offset"]:
        raise ValueError("index header outgrew its padding")
    target = path_in(directory)
    fd, tmp = tempfile.mkstemp(prefix=".index-", suffix=".tmp", dir=directory)
    try:
        try:  # readable by whoever may read the database itself (mkstemp makes it 0600)
            os.fchmod(fd, os.stat(os.path.join(directory, "data.mdb")).st_mode & 0o666)
        except OSError:
            pass
        with os.fdopen(fd, "wb") as f:
            f.write(_HEAD.pack(MAGIC, len(raw)) + raw + _CRC.pack(zlib.crc32(raw)))
            for entry in layout:
                if entry["nbytes"]:
                    f.seek(entry["offset"])
                    f.write(arrays[entry["name"]].reshape(-1).view(np.uint8).data)
            f.truncate(header["size"])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


def read_header(directory: str) -> dict[str, Any]:
    """The header of the directory's index file, checked for magic, version, crc and size; Rejected if not
    usable, FileNotFoundError if there is none."""
    with open(path_in(directory), "rb") as f:
        return _header(f.read(_HEAD.size), f)


def _header(head: bytes, f: Any) -> dict[str, Any]:
    if len(head) < _HEAD.size:
        raise Rejected("shorter than its header (torn)")
    magic, length = _HEAD.unpack(head)
    if magic != MAGIC:
        raise Rejected("not a hashdb index file (bad magic)")
    if length > 1 << 24:
        raise Rejected("implausible header length (corrupt)")
    raw = f.read(length)
    crc = f.read(_CRC.size)
    if len(raw) != length or len(crc) != _CRC.size:
        raise Rejected("shorter than its header (torn)")
    if zlib.crc32(raw) != _CRC.unpack(crc)[0]:
        raise Rejected("header checksum mismatch (corrupt)")
    try:
        header = json.loads(raw)
    except ValueError:
        raise Rejected("unreadable header (corrupt)") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise Rejected(f"format version {header.get('version') if isinstance(header, dict) else None!r}, not {VERSION}")
    size = os.fstat(f.fileno()).st_size
    if header.get("size") != size:
        raise Rejected(f"{size} bytes where the header says {header.get('size')} (torn)")
    return header


def read(directory: str, expect: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Map the directory's index file copy-on-write and check it: every field of ``expect`` (bits,
    database) must match the header and every array its digest. Returns (header, arrays); raises
    Rejected (unusable: rebuild) or FileNotFoundError (none yet)."""
    with open(path_in(directory), "rb") as f:
        header = _header(f.read(_HEAD.size), f)
        for name, value in expect.items():
            if header.get(name) != value:
                raise Rejected(f"made for {name}={header.get(name)!r}, not {value!r} (foreign)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    arrays: dict[str, np.ndarray] = {}
    try:
        for entry in header["arrays"]:
            dtype = np.dtype(entry["dtype"])
            shape = tuple(int(x) for x in entry["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            if entry["offset"] + count * dtype.itemsize > header["size"] or entry["offset"] % ALIGN:
                raise Rejected(f"array {entry['name']!r} lies outside the file (corrupt)")
            a = np.frombuffer(mm, dtype=dtype, count=count, offset=entry["offset"]).reshape(shape)
            if digest(a) != entry["digest"]:
                raise Rejected(f"array {entry['name']!r} fails its digest (corrupt)")
            arrays[entry["name"]] = a
    except (KeyError, TypeError, ValueError) as e:
        raise Rejected(f"malformed header ({e})") from None
    return header, arrays


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


__all__ = ["FILENAME", "Rejected", "digest", "path_in", "read", "read_header", "write"]
