"""TensorFlow checkpoints and SavedModel variables: a TensorBundle (``PREFIX.index`` + ``PREFIX.data-NNNNN-of-NNNNN``).

``PREFIX.index`` is an SSTable (LevelDB's table format, as TensorFlow's lib/io/table writes it): a 48-byte
footer at the end (the meta-index and index block handles as varints, padding, the magic
0xdb4775248b80fb57), an index block whose values are the handles (offset, size) of the data blocks, and data
blocks of prefix-compressed entries (shared key length, unshared length, value length, key suffix, value)
followed by their restart array; each block is followed by a 5-byte trailer (compression type, crc32c).
TensorFlow writes these blocks uncompressed; a snappy-compressed block is refused in one line. The entry
under the empty key is the BundleHeaderProto (num_shards, endianness); every other key is a tensor name whose
value is a BundleEntryProto (dtype, shape, shard_id, offset, size, crc32c, slices), decoded with our own
protobuf wire-format reader. The tensor bytes lie at [offset, offset + size) of shard ``shard_id``, read by
memory map after the size and range are checked against the header and the file. (The crc32c of each tensor
is not verified: the bytes are only hashed, and the checks above bound every read.)

What is returned: float32/float64/float16/bfloat16 variables of the model. Skipped: the header, the
object graph (``_CHECKPOINTABLE_OBJECT_GRAPH``), optimizer state (object-based checkpoints'
``.OPTIMIZER_SLOT`` paths and the ``optimizer/...`` tree, name-based checkpoints' ``.../Adam``,
``.../Momentum``... slots), non-float tensors (step counters, strings). Object-based names lose their
``/.ATTRIBUTES/VARIABLE_VALUE`` tail. Partitioned variables (entries with slices) are refused in one line.

Layout: TensorFlow kernels are HWIO. A variable named ``.../kernel`` or ``.../weights`` (Keras, TF-slim) with
3-5 dims is ``(*k, in/groups, out)`` -> returned ``(out, in/groups, *k)`` (a Conv2DTranspose kernel
``(*k, out, in)`` becomes ``(in, out, *k)``, torch's own order); ``depthwise_kernel``/``depthwise_weights``
``(*k, C, M)`` -> ``(C*M, 1, *k)``; a 2-D kernel is Dense ``(in, out)`` -> ``(out, in)``; all marked OIHW.
Other tensors are returned as stored (``layout=None``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from ...errors import ModelFormatError
from . import NamedTensor, bf16_to_float32, check_size
from . import protowire as pw

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER = 48
# DataType enum of tensorflow/core/framework/types.proto -> numpy dtype of the stored bytes
_DTYPES = {1: "f4", 2: "f8", 19: "f2", 14: "u2"}  # DT_FLOAT, DT_DOUBLE, DT_HALF, DT_BFLOAT16 (read as uint16)
_BF16 = 14
_SLOT = re.compile(
    r"^(Adam|AdamW|Adamax|Nadam|RMSProp|Adadelta|Ftrl|Adagrad|Momentum|ExponentialMovingAverage)(_\d+)?$"
)
_KERNELS = frozenset({"kernel", "_kernel", "weights", "pointwise_kernel", "pointwise_weights"})
_DEPTHWISE = frozenset({"depthwise_kernel", "depthwise_weights"})
_DATA_FILE = re.compile(r"\.data-\d{5}-of-\d{5}$")


def is_table(path: Path) -> bool:
    """True when the file ends with the SSTable footer's magic (how a TensorBundle index is recognised)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < FOOTER:
                return False
            f.seek(size - 8)
            return int.from_bytes(f.read(8), "little") == TABLE_MAGIC
    except OSError:
        return False


def index_of(path: Path) -> Path:
    """The ``.index`` of a bundle named by its index, by one of its data shards, or by a SavedModel's graph."""
    if path.name in ("saved_model.pb", "saved_model.pbtxt"):
        return path.parent / "variables" / "variables.index"
    match = _DATA_FILE.search(path.name)
    return path.with_name(path.name[: match.start()] + ".index") if match else path


def _handle(buf: memoryview, pos: int) -> tuple[int, int, int]:
    offset, pos = pw.read_varint(buf, pos)
    size, pos = pw.read_varint(buf, pos)
    return offset, size, pos


def _block(buf: memoryview, offset: int, size: int) -> memoryview:
    """The contents of the block at a handle, its trailer checked for the compression type."""
    if size < 4 or offset + size + 5 > len(buf) - FOOTER:
        raise ValueError(f"block at {offset} of {size} bytes lies outside the table")
    kind = buf[offset + size]
    if kind == 1:
        raise ValueError("snappy-compressed table blocks are not supported")
    if kind != 0:
        raise ValueError(f"unknown block compression type {kind}")
    return buf[offset : offset + size]


def _entries(block: memoryview) -> list[tuple[bytes, memoryview]]:
    """The (key, value) entries of one block, keys rebuilt from their shared prefixes."""
    n_restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * n_restarts
    if n_restarts == 0 or end < 0:
        raise ValueError(f"block restart array of {n_restarts} entries does not fit its {len(block)} bytes")
    out: list[tuple[bytes, memoryview]] = []
    key = b""
    pos = 0
    while pos < end:
        shared, pos = pw.read_varint(block, pos)
        unshared, pos = pw.read_varint(block, pos)
        value_len, pos = pw.read_varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > end:
            raise ValueError("block entry runs past its block")
        key = key[:shared] + bytes(block[pos : pos + unshared])
        pos += unshared
        out.append((key, block[pos : pos + value_len]))
        pos += value_len
    return out


def table_entries(buf: memoryview) -> list[tuple[bytes, memoryview]]:
    """Every (key, value) of an SSTable, in key order."""
    if len(buf) < FOOTER or int.from_bytes(buf[-8:], "little") != TABLE_MAGIC:
        raise ValueError("no SSTable footer (magic) at the end of the file")
    footer = buf[len(buf) - FOOTER :]
    _, _, pos = _handle(footer, 0)  # the meta-index block: TensorFlow leaves it empty
    index_offset, index_size, _ = _handle(footer, pos)
    out: list[tuple[bytes, memoryview]] = []
    parsed = index_size
    for _, value in _entries(_block(buf, index_offset, index_size)):
        offset, size, _ = _handle(value, 0)
        parsed += size
        if parsed > len(buf):  # blocks of a table do not overlap: an index naming one block many times is refused
            raise ValueError("the index names more block bytes than the table holds")
        out.extend(_entries(_block(buf, offset, size)))
    return out


def _model_name(key: str) -> str | None:
    """The variable name to return for a bundle key, or None for a key that is not a model weight."""
    if not key or key == "_CHECKPOINTABLE_OBJECT_GRAPH":
        return None
    if "/.ATTRIBUTES/" in key or key.endswith("/.ATTRIBUTES"):  # an object-based checkpoint
        if not key.endswith("/.ATTRIBUTES/VARIABLE_VALUE") or "/.OPTIMIZER_SLOT/" in key:
            return None
        name = key[: -len("/.ATTRIBUTES/VARIABLE_VALUE")]
        return None if name.split("/", 1)[0] in ("optimizer", "save_counter") else name
    if _SLOT.match(key.rsplit("/", 1)[-1]):  # a name-based (TF1) optimizer slot: conv1/weights/Adam_1
        return None
    return key


def _to_tensor(name: str, arr: np.ndarray) -> NamedTensor:
    leaf = name.rsplit("/", 1)[-1]
    ks = arr.ndim - 2
    if leaf in _KERNELS and arr.ndim == 2:
        return NamedTensor(name, np.ascontiguousarray(arr.T, dtype=np.float32), "oihw")
    if leaf in _KERNELS and 3 <= arr.ndim <= 5:
        moved = np.moveaxis(arr, (ks + 1, ks), (0, 1))
        return NamedTensor(name, np.ascontiguousarray(moved, dtype=np.float32), "oihw")
    if leaf in _DEPTHWISE and 3 <= arr.ndim <= 5:
        c, m = arr.shape[ks], arr.shape[ks + 1]
        w = np.moveaxis(arr, (ks, ks + 1), (0, 1)).reshape(c * m, 1, *arr.shape[:ks])  # out channel = c * M + m
        return NamedTensor(name, np.ascontiguousarray(w, dtype=np.float32), "oihw")
    return NamedTensor(name, np.ascontiguousarray(arr, dtype=np.float32), None)


def _entry(value: memoryview) -> tuple[int, tuple[int, ...], int, int, int, bool]:
    """(dtype, shape, shard_id, offset, size, sliced) of a BundleEntryProto."""
    msg = pw.message(value)
    dtype = pw.as_int(msg.get(1, [0])[-1])
    dims: list[int] = []
    for shape in msg.get(2, []):
        for dim in pw.message(pw.as_bytes(shape)).get(2, []):
            dims.append(pw.signed(pw.as_int(pw.message(pw.as_bytes(dim)).get(1, [0])[-1])))
    shard = pw.signed(pw.as_int(msg.get(3, [0])[-1]), 32)
    offset = pw.signed(pw.as_int(msg.get(4, [0])[-1]))
    size = pw.signed(pw.as_int(msg.get(5, [0])[-1]))
    return dtype, tuple(dims), shard, offset, size, bool(msg.get(7))


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    path = index_of(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: the checkpoint's .index file is missing")
    size = path.stat().st_size
    check_size(path, size, max_bytes)
    try:
        with open(path, "rb") as f:
            buf = memoryview(f.read())
        entries = table_entries(buf)
        header = pw.message(entries[0][1]) if entries and entries[0][0] == b"" else None
        if header is None:
            raise ValueError("no bundle header entry")
        num_shards = pw.signed(pw.as_int(header.get(1, [1])[-1]), 32)
        big_endian = pw.as_int(header.get(2, [0])[-1]) == 1
        parsed = [(key.decode("utf-8", "replace"), _entry(value)) for key, value in entries[1:]]
    except ValueError as exc:
        raise ModelFormatError(f"{path}: not a readable TensorFlow checkpoint index ({exc})") from None
    if not 1 <= num_shards <= 100_000:
        raise ModelFormatError(f"{path}: bundle header declares {num_shards} data shards")
    prefix = path.name[: -len(".index")] if path.name.endswith(".index") else path.name
    wanted = []
    declared = 0
    for key, (dtype, shape, shard, offset, nbytes, sliced) in parsed:
        name = _model_name(key)
        if name is None or dtype not in _DTYPES:
            continue
        if sliced:
            raise ModelFormatError(f"{path}: variable {key!r} is partitioned (sliced): not supported")
        itemsize = np.dtype(_DTYPES[dtype]).itemsize
        if any(d < 0 for d in shape) or nbytes != math.prod(shape) * itemsize:
            raise ModelFormatError(f"{path}: variable {key!r}: {nbytes} bytes do not hold a {shape} tensor")
        if not 0 <= shard < num_shards or offset < 0:
            raise ModelFormatError(f"{path}: variable {key!r}: shard {shard} / offset {offset} out of range")
        declared += math.prod(shape) * 4
        wanted.append((key, name, dtype, shape, shard, offset, nbytes))
    check_size(path, declared, max_bytes)
    out: list[NamedTensor] = []
    shard_sizes: dict[int, int] = {}
    for key, name, dtype, shape, shard, offset, nbytes in wanted:
        data = path.with_name(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")
        if shard not in shard_sizes:
            if not data.is_file():
                raise ModelFormatError(f"{path}: data shard {data.name} is missing")
            shard_sizes[shard] = data.stat().st_size
        if offset + nbytes > shard_sizes[shard]:
            raise ModelFormatError(f"{path}: variable {key!r} lies past the end of {data.name}")
        if nbytes == 0:
            continue
        stored = (">" if big_endian else "<") + _DTYPES[dtype]
        arr = np.asarray(np.memmap(data, dtype=stored, mode="r", offset=offset, shape=(math.prod(shape),)))
        arr = arr.reshape(shape)
        if dtype == _BF16:
            arr = bf16_to_float32(arr.astype("<u2"))
        out.append(_to_tensor(name, arr))
    return out
