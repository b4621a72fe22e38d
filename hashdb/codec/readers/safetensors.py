"""safetensors: an 8-byte little-endian header length, a JSON header, then the raw little-endian buffers.

Read with numpy by memory-mapping the file (neither torch nor the safetensors package is needed). The
header is validated as the format specifies before any tensor is touched: its size is bounded (100 MB),
every entry has a known dtype, a shape of non-negative integers and ``data_offsets`` [begin, end] whose
length matches the shape, and the entries cover the data buffer contiguously, without holes or overlaps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelFormatError, shown
from . import NamedTensor, bf16_to_float32, check_size, float8_table, parse_json

MAX_HEADER_BYTES = 100_000_000  # the format's own bound on the JSON header

# safetensors dtype -> (numpy storage dtype, decoding): 'float' values, 'bf16'/'e4m3fn'/'e5m2' decoded, 'skip'
DTYPES: dict[str, tuple[str, str]] = {
    "F64": ("<f8", "float"), "F32": ("<f4", "float"), "F16": ("<f2", "float"), "BF16": ("<u2", "bf16"),
    "F8_E4M3": ("u1", "e4m3fn"), "F8_E5M2": ("u1", "e5m2"),
    "I64": ("<i8", "skip"), "I32": ("<i4", "skip"), "I16": ("<i2", "skip"), "I8": ("i1", "skip"),
    "U64": ("<u8", "skip"), "U32": ("<u4", "skip"), "U16": ("<u2", "skip"), "U8": ("u1", "skip"),
    "BOOL": ("?", "skip"),
}  # fmt: skip


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], int, int]:
    """(validated entries by name, offset of the data buffer, its length); raises ModelFormatError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{path}: truncated safetensors header")
        n = int.from_bytes(head, "little")
        if n < 2 or n > MAX_HEADER_BYTES:
            raise ModelFormatError(f"{path}: bad safetensors header length {n:,}")
        if 8 + n > size:
            raise ModelFormatError(f"{path}: truncated safetensors header ({n:,} bytes declared, file {size:,})")
        text = f.read(n)
    try:
        header = parse_json(text, "safetensors header", MAX_HEADER_BYTES)
    except ValueError as exc:
        raise ModelFormatError(f"{path}: {exc}") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: safetensors header is not a JSON object")
    buffer_len = size - 8 - n
    entries: dict[str, dict[str, Any]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise ModelFormatError(f"{path}: safetensors __metadata__ is not an object")
            continue
        if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
            raise ModelFormatError(f"{path}: tensor {shown(name)}: malformed safetensors entry")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ModelFormatError(f"{path}: tensor {shown(name)}: unknown safetensors dtype {shown(dtype)}")
        if not isinstance(shape, list) or not all(_uint(d) for d in shape):
            raise ModelFormatError(
                f"{path}: tensor {shown(name)}: shape {shown(shape)} is not a list of non-negative ints"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_uint(o) for o in offsets)):
            raise ModelFormatError(f"{path}: tensor {shown(name)}: bad data_offsets {shown(offsets)}")
        begin, end = offsets
        if begin > end or end > buffer_len:
            raise ModelFormatError(
                f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] outside the {buffer_len:,}-byte buffer"
            )
        nbytes = math.prod(shape) * np.dtype(DTYPES[dtype][0]).itemsize
        if end - begin != nbytes:
            raise ModelFormatError(
                f"{path}: tensor {name!r}: shape {shape} needs {nbytes:,} bytes, data_offsets give {end - begin:,}"
            )
        entries[name] = info
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else "leaves a hole before it"
            raise ModelFormatError(f"{path}: tensor {name!r}: data_offsets {what}")
        pos = end
    if pos != buffer_len:
        raise ModelFormatError(f"{path}: safetensors buffer has {buffer_len - pos:,} bytes no tensor accounts for")
    return entries, 8 + n, buffer_len


def _uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    entries, start, buffer_len = read_header(path)
    check_size(path, buffer_len, max_bytes)
    if buffer_len == 0:
        return []
    body = np.asarray(np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(buffer_len,)))
    out: list[NamedTensor] = []
    for name, info in entries.items():
        np_dtype, decode = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        if decode == "skip" or begin == end:
            continue
        raw = body[begin:end].view(np_dtype).reshape(info["shape"])
        if decode == "float":
            arr = np.ascontiguousarray(raw, dtype=np.float32)
        elif decode == "bf16":
            arr = bf16_to_float32(raw)
        else:
            arr = float8_table(decode)[raw]
        out.append(NamedTensor(name, arr))
    return out
