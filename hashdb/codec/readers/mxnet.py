"""MXNet / Gluon ``.params`` files (``mx.nd.save``, ``export``'s ``-0000.params``), with the optional
``-symbol.json`` beside them.

Layout of the file (MXNet's ``NDArray::Save`` list): uint64 magic 0x112, uint64 reserved, uint64 count,
then each array: uint32 magic (0xF993FAC9 v2 or 0xF993FACA v3: int32 storage type, which must be dense;
0xF993FAC8 v1; anything else is the ndim of a legacy array with uint32 dims), the shape (uint32 ndim then
int64 dims; legacy: uint32 dims), int32 device type and id, int32 dtype flag (0 float32, 1 float64,
2 float16, 12 bfloat16; integer arrays are skipped), the raw little-endian values; then uint64 count of
names, each a uint64 length and UTF-8 bytes (``arg:conv0_weight``, ``aux:bn0_moving_mean``; the prefix is
dropped).

Layout: MXNet's Convolution kernels (``*_weight``, or ``*.weight`` in Gluon ``save_parameters`` files) are
``(out, in/group, *k)`` and Deconvolution ``(in, out/group, *k)`` (torch's order), marked OIHW. When
``<prefix>-symbol.json`` lies beside the file and names a Convolution with ``layout`` NHWC/NWC/NDHWC, its
kernel ``(out, *k, in)`` is moved to ``(out, in, *k)``; without the symbol file kernels are taken as the
default NCHW. The JSON is only read, never evaluated.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

import numpy as np

from ...errors import ModelFormatError
from . import NamedTensor, bf16_to_float32, check_size, close_map, drop_mapped_pages

LIST_MAGIC = 0x112
V1, V2, V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
_DTYPES = {0: "<f4", 1: "<f8", 2: "<f2", 3: "u1", 4: "<i4", 5: "i1", 6: "<i8", 7: "?", 8: "<i2", 9: "<u2",
           10: "<u4", 11: "<u8", 12: "<u2"}  # fmt: skip
BF16 = 12
MAX_SYMBOL_BYTES = 64 << 20
MAX_NDIM = 32


class _Cursor:
    def __init__(self, path: Path, buf: memoryview, max_bytes: int) -> None:
        self.path, self.buf, self.pos = path, buf, 0
        self.max_bytes, self.declared = max_bytes, 0  # float32 bytes of the arrays so far (fp16 widens 2x)

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelFormatError(f"{self.path}: truncated MXNet params (needs {n} bytes at {self.pos})")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def i32(self) -> int:
        return int(struct.unpack("<i", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])


def symbol_path(params: Path) -> Path | None:
    """``name-symbol.json`` for ``name-0000.params`` (or ``name.params``), when it exists."""
    stem = params.stem
    prefix = stem.rsplit("-", 1)[0] if "-" in stem and stem.rsplit("-", 1)[1].isdigit() else stem
    candidate = params.with_name(f"{prefix}-symbol.json")
    return candidate if candidate.is_file() else None


def _channels_last_convs(path: Path) -> set[str]:
    """The names of Convolution nodes of the symbol whose ``layout`` puts channels last."""
    symbol = symbol_path(path)
    if symbol is None:
        return set()
    if symbol.stat().st_size > MAX_SYMBOL_BYTES:
        raise ModelFormatError(f"{symbol}: MXNet symbol file over {MAX_SYMBOL_BYTES:,} bytes")
    try:
        nodes = json.loads(symbol.read_text(encoding="utf-8")).get("nodes", [])
        out = set()
        for node in nodes:
            attrs = node.get("attrs") or node.get("attr") or node.get("param") or {}
            layout = str(attrs.get("layout", "")).upper()
            if node.get("op") == "Convolution" and layout.startswith("N") and layout.endswith("C"):
                out.add(str(node.get("name")))
        return out
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise ModelFormatError(f"{symbol}: unreadable MXNet symbol file ({type(exc).__name__})") from None


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        check_size(path, size, max_bytes)  # the values are inside the file: its size bounds them
        if size < 24:
            raise ModelFormatError(f"{path}: truncated MXNet params file ({size} bytes)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        arrays, names = _read_list(path, _Cursor(path, memoryview(mm), max_bytes), mm)
    finally:
        close_map(mm)
    if names and len(names) != len(arrays):
        raise ModelFormatError(f"{path}: {len(arrays)} arrays but {len(names)} names")
    channels_last = _channels_last_convs(path)
    out: list[NamedTensor] = []
    for i, arr in enumerate(arrays):
        name = names[i] if names else f"array{i}"
        name = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
        if arr is None or arr.size == 0:
            continue
        layout = None
        if arr.ndim >= 3 and name.endswith(("_weight", ".weight")):  # symbol exports and Gluon save_parameters
            layout = "oihw"
            if name[: -len("_weight")] in channels_last:
                arr = np.ascontiguousarray(np.moveaxis(arr, -1, 1))
        out.append(NamedTensor(name, arr, layout))
    return out


def _read_list(path: Path, cur: _Cursor, mm: mmap.mmap) -> tuple[list[np.ndarray | None], list[str]]:
    if cur.u64() != LIST_MAGIC:
        raise ModelFormatError(f"{path}: not an MXNet params file (no 0x112 magic)")
    cur.u64()  # reserved
    count = cur.u64()
    if count > len(cur.buf) // 4:
        raise ModelFormatError(f"{path}: declares {count:,} arrays in {len(cur.buf):,} bytes")
    arrays = []
    for i in range(count):
        arrays.append(_array(path, cur, i))
        drop_mapped_pages(mm)  # the array's values are copied out
    names: list[str] = []
    if cur.pos < len(cur.buf):
        n_names = cur.u64()
        if n_names > len(cur.buf) // 8:
            raise ModelFormatError(f"{path}: declares {n_names:,} names in {len(cur.buf):,} bytes")
        for _ in range(n_names):
            length = cur.u64()
            names.append(bytes(cur.take(length)).decode("utf-8", "replace"))
    return arrays, names


def _array(path: Path, cur: _Cursor, index: int) -> np.ndarray | None:
    magic = cur.u32()
    if magic in (V2, V3):
        stype = cur.i32()
        if stype != 0:
            raise ModelFormatError(f"{path}: array {index} is sparse (storage type {stype}): not supported")
    if magic in (V1, V2, V3):
        ndim = cur.i32()
        if ndim < 0 and magic == V3:  # numpy-semantics "unknown shape": an empty array
            return None
        if not 0 <= ndim <= MAX_NDIM:
            raise ModelFormatError(f"{path}: array {index} has {ndim} dimensions")
        shape = list(struct.unpack(f"<{ndim}q", cur.take(8 * ndim)))
    else:  # a legacy array: the first word was ndim, the dims are uint32
        ndim = magic
        if ndim > MAX_NDIM:
            raise ModelFormatError(f"{path}: array {index}: not an MXNet array (bad magic {magic:#x})")
        shape = list(struct.unpack(f"<{ndim}I", cur.take(4 * ndim)))
    if ndim == 0:
        return None  # MXNet writes nothing more for an empty (none) array
    if any(d < 0 for d in shape):
        raise ModelFormatError(f"{path}: array {index} has a negative dimension {shape}")
    cur.take(8)  # the context: device type and id
    flag = cur.i32()
    if flag not in _DTYPES:
        raise ModelFormatError(f"{path}: array {index} has an unknown dtype flag {flag}")
    dtype = np.dtype(_DTYPES[flag])
    count = math.prod(shape)
    cur.declared += 4 * count
    check_size(path, cur.declared, cur.max_bytes)
    if count * dtype.itemsize > len(cur.buf) - cur.pos:
        raise ModelFormatError(f"{path}: array {index} of shape {shape} runs past the end of the file")
    raw = np.frombuffer(cur.take(count * dtype.itemsize), dtype).reshape(shape)
    if flag == BF16:
        return bf16_to_float32(raw)
    if dtype.kind != "f":
        return None  # integer arrays (counters, indices) are not weights
    return raw.astype(np.float32)
