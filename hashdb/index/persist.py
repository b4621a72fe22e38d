"""The persisted index: a MemoryIndex's arrays in one flat file beside the LMDB environment, mapped on open.

LMDB stays the source of truth; this file is derived from it and never trusted blindly. Layout:

    magic (8 bytes) | header length (u32) | header (JSON) | crc32 of the header (u32) | arrays, each at a
    4 KiB-aligned offset

The header names the format version, the code width, the database it was made from (the LMDB
environment's creation stamp), the log sequence it reflects, the crc32 of that log entry, the file's total
size, and for each array its dtype, shape and offset, the offset of its chunk sums (one uint64 wrapping sum
per 64 KiB of the array) and a digest of those sums. ``read`` refuses (raises Rejected, with the reason) a
file that is short or long (torn), has a bad magic, version, header crc or sums digest (corrupt), or names
another database or width (foreign); whether its sequence is still reachable through the log is the
caller's check (db.py), as is the fallback: rebuild from LMDB.

The data itself is checked lazily, chunk by chunk, before first use (``Checker``): a query that probes nine
table runs and verifies a few candidates reads and checks a few chunks, not the whole 800 MB of a 10M-code
file (checking all of it measured 0.3 s/GB at memory speed, and more when the pages come from disk). A
chunk that fails raises Rejected in the middle of a query; HashDB then rebuilds and asks again.

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
from collections.abc import Callable
from typing import Any, NotRequired, TypedDict

import numpy as np

from .arrays import sorted_unique

FILENAME = "index.hashdb"
LAYERS_FILENAME = "layers.index.hashdb"  # the layer space's index (db.py): the same format, its own file
MAGIC = b"HDBINDEX"
VERSION = 1
ALIGN = 4096
DIGEST_CHUNK = 1 << 17  # words per digest chunk (1 MiB)
CHECK_BYTES = 1 << 16  # bytes per lazily checked chunk
_HEAD = struct.Struct("<8sI")
_CRC = struct.Struct("<I")


class Rejected(Exception):
    """The file exists but must not be used (the message says why); the caller rebuilds."""


def path_in(directory: str, name: str = FILENAME) -> str:
    return os.path.join(directory, name)


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


def chunk_sums(a: np.ndarray) -> np.ndarray:
    """The wrapping uint64 sum of each CHECK_BYTES chunk of an array's bytes (the last chunk zero-padded)."""
    raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    full = raw.size // CHECK_BYTES
    sums = np.zeros(full + (raw.size % CHECK_BYTES > 0), np.uint64)
    if full:
        sums[:full] = raw[: full * CHECK_BYTES].view(np.uint64).reshape(full, -1).sum(axis=1, dtype=np.uint64)
    if raw.size % CHECK_BYTES:
        tail = np.zeros(CHECK_BYTES, np.uint8)
        tail[: raw.size % CHECK_BYTES] = raw[full * CHECK_BYTES :]
        sums[full] = tail.view(np.uint64).sum(dtype=np.uint64)
    return sums


class Checker:
    """Checks the mapped arrays against their chunk sums on first use of each chunk. Arrays it does not
    know (replaced in memory since) are trusted."""

    def __init__(self, arrays: dict[str, np.ndarray], sums: dict[str, np.ndarray]) -> None:
        self.arrays = dict(arrays)
        self.sums = sums
        self.ok = {name: np.zeros(s.size, bool) for name, s in sums.items()}
        # Set by the index that adopts the arrays (validate.SavedTables): ``validate(name, lo_byte, hi_byte)``
        # checks each chunk's contents against the other arrays once its sums passed, and ``complete()``
        # what only the whole can show, once everything is checked. Both raise Rejected.
        self.validate: Callable[[str, int, int], None] | None = None
        self.complete: Callable[[], None] | None = None
        # ``whole(name)``: check all of ``name`` at once before long-lived kernels take it (True), else False
        self.whole: Callable[[str], bool] | None = None
        self._completed = False

    def forget(self, name: str) -> None:
        """``name`` now lives in memory (copied after a full check): nothing left to check."""
        self.ok.pop(name, None)
        self.arrays.pop(name, None)

    def chunks(self, name: str, chunks: np.ndarray) -> None:
        ok = self.ok.get(name)
        if ok is None or chunks.size == 0:
            return
        todo = sorted_unique(chunks)
        todo = todo[~ok[todo]]
        if todo.size == 0:
            return
        raw = self.arrays[name].reshape(-1).view(np.uint8)
        breaks = np.flatnonzero(np.diff(todo) != 1) + 1
        for run in np.split(todo, breaks):  # each run of consecutive chunks summed in one numpy call
            c0, c1 = int(run[0]), int(run[-1]) + 1
            fresh = chunk_sums(raw[c0 * CHECK_BYTES : c1 * CHECK_BYTES])
            bad = np.flatnonzero(fresh != self.sums[name][c0:c1])
            if bad.size:
                at = (c0 + int(bad[0])) * CHECK_BYTES
                raise Rejected(f"array {name!r} fails its checksum at byte {at} (corrupt)")
            if self.validate is not None:
                self.validate(name, c0 * CHECK_BYTES, min(c1 * CHECK_BYTES, raw.size))
        ok[todo] = True

    def items(self, name: str, index: np.ndarray, item_bytes: int) -> None:
        """Check the chunks holding items ``index`` (flat positions of ``item_bytes`` each)."""
        if name not in self.ok or np.size(index) == 0:
            return
        first = (np.asarray(index, np.int64) * item_bytes) // CHECK_BYTES
        last = (np.asarray(index, np.int64) * item_bytes + item_bytes - 1) // CHECK_BYTES
        self.chunks(name, np.concatenate([first, last]))

    def span(self, name: str, lo_byte: int, hi_byte: int) -> None:
        if name not in self.ok:
            return
        hi_byte = min(hi_byte, self.arrays[name].nbytes)
        if hi_byte > lo_byte:
            self.chunks(name, np.arange(lo_byte // CHECK_BYTES, (hi_byte - 1) // CHECK_BYTES + 1))

    def everything(self) -> None:
        """Check every chunk not checked yet (before the arrays are handed to long-lived kernels)."""
        for name, ok in list(self.ok.items()):
            if not ok.all():
                fresh = chunk_sums(self.arrays[name])
                bad = np.flatnonzero(fresh != self.sums[name])
                if bad.size:
                    raise Rejected(f"array {name!r} fails its checksum at byte {int(bad[0]) * CHECK_BYTES} (corrupt)")
                if self.validate is not None and not (self.whole is not None and self.whole(name)):
                    todo = np.flatnonzero(~ok)
                    for run in np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1):
                        nbytes = self.arrays[name].nbytes
                        self.validate(name, int(run[0]) * CHECK_BYTES, min((int(run[-1]) + 1) * CHECK_BYTES, nbytes))
                ok[:] = True
        if self.complete is not None and not self._completed:
            self.complete()
            self._completed = True


class _Entry(TypedDict):
    """One array's line in the header's ``arrays``; the offsets are set once the header's length is known."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    sums_digest: int
    offset: NotRequired[int]
    sums_offset: NotRequired[int]


def write(
    directory: str, stamp: dict[str, Any], arrays: dict[str, np.ndarray], scalars: dict[str, Any], name: str = FILENAME
) -> str:
    """Save ``arrays`` (and JSON-able ``scalars``) stamped with ``stamp`` (bits, database, seq, log_crc)
    atomically as the directory's index file ``name``; returns its path. Raises OSError when it cannot."""
    layout: list[_Entry] = []
    offset = 0
    sums: dict[str, np.ndarray] = {}
    for array_name, a in arrays.items():
        a = np.ascontiguousarray(a)
        arrays[array_name] = a
        sums[array_name] = chunk_sums(a)
        layout.append(
            {"name": array_name, "dtype": a.dtype.str, "shape": list(a.shape), "nbytes": int(a.nbytes),
             "sums_digest": digest(sums[array_name])}  # fmt: skip
        )
    header: dict[str, Any] = {"version": VERSION, **stamp, "scalars": scalars, "arrays": layout}
    # Offsets depend on the header's length, which depends on the offsets: fix them with a generous pad.
    for _ in range(2):
        raw = json.dumps(header, sort_keys=True).encode()
        offset = _round_up(_HEAD.size + len(raw) + _CRC.size + 64)
        for entry in layout:
            entry["offset"] = offset
            offset = _round_up(offset + entry["nbytes"])
            entry["sums_offset"] = offset
            offset = _round_up(offset + sums[entry["name"]].nbytes)
        header["size"] = offset
    raw = json.dumps(header, sort_keys=True).encode()
    if layout and _HEAD.size + len(raw) + _CRC.size > layout[0]["offset"]:
        raise ValueError("index header outgrew its padding")
    target = path_in(directory, name)
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
                f.seek(entry["sums_offset"])
                f.write(sums[entry["name"]].data)
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


def read_header(directory: str, name: str = FILENAME) -> dict[str, Any]:
    """The header of the directory's index file ``name``, checked for magic, version, crc and size; Rejected
    if not usable, FileNotFoundError if there is none."""
    with open(path_in(directory, name), "rb") as f:
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
    except (ValueError, RecursionError):  # a header nested past the recursion limit (crafted): no traceback
        raise Rejected("unreadable header (corrupt)") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise Rejected(f"format version {header.get('version') if isinstance(header, dict) else None!r}, not {VERSION}")
    size = os.fstat(f.fileno()).st_size
    if header.get("size") != size:
        raise Rejected(f"{size} bytes where the header says {header.get('size')} (torn)")
    return header


def read(
    directory: str, expect: dict[str, Any], name: str = FILENAME
) -> tuple[dict[str, Any], dict[str, np.ndarray], Checker]:
    """Map the directory's index file ``name`` copy-on-write and check it: every field of ``expect`` (bits,
    database) must match the header and every array's chunk sums their digest. Returns (header, arrays,
    checker): the arrays' chunks are checked lazily through the checker. Raises Rejected (unusable:
    rebuild) or FileNotFoundError (none yet)."""
    with open(path_in(directory, name), "rb") as f:
        header = _header(f.read(_HEAD.size), f)
        for field, value in expect.items():
            if header.get(field) != value:
                raise Rejected(f"made for {field}={header.get(field)!r}, not {value!r} (foreign)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    arrays: dict[str, np.ndarray] = {}
    sums: dict[str, np.ndarray] = {}
    try:
        for entry in header["arrays"]:
            dtype = np.dtype(entry["dtype"])
            shape = tuple(int(x) for x in entry["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            if entry["offset"] + count * dtype.itemsize > header["size"] or entry["offset"] % ALIGN:
                raise Rejected(f"array {entry['name']!r} lies outside the file (corrupt)")
            n_sums = -(-count * dtype.itemsize // CHECK_BYTES)
            if entry["sums_offset"] + 8 * n_sums > header["size"] or entry["sums_offset"] % ALIGN:
                raise Rejected(f"chunk sums of {entry['name']!r} lie outside the file (corrupt)")
            s = np.frombuffer(mm, dtype=np.uint64, count=n_sums, offset=entry["sums_offset"])
            if digest(s) != entry["sums_digest"]:
                raise Rejected(f"chunk sums of {entry['name']!r} fail their digest (corrupt)")
            arrays[entry["name"]] = np.frombuffer(mm, dtype=dtype, count=count, offset=entry["offset"]).reshape(shape)
            sums[entry["name"]] = s
    except (KeyError, TypeError, ValueError) as e:
        raise Rejected(f"malformed header ({e})") from None
    return header, arrays, Checker(arrays, sums)


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


__all__ = [
    "FILENAME",
    "LAYERS_FILENAME",
    "Checker",
    "Rejected",
    "chunk_sums",
    "digest",
    "path_in",
    "read",
    "read_header",
    "write",
]
