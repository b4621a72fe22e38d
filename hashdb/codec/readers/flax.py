"""Flax/JAX ``.msgpack`` checkpoints (``flax.serialization.to_bytes``), read with msgpack and numpy only.

The format: the state dict (nested maps with string keys; lists become maps with keys "0", "1", ...) packed
with msgpack, every array as an ext object of type 1 whose payload is itself msgpack of
``(shape: [int], dtype name: str, C-order little-endian bytes)``; ext type 3 is a numpy scalar
``(dtype name, bytes)`` and type 2 a complex scalar. Arrays over 1 GiB are split by flax into a map
``{"__msgpack_chunked_array__": True, "shape": {"0": ...}, "chunks": {"0": flat part, ...}}``, joined here.

Which arrays are kernels (flax stores input dims before output dims): a leaf named ``kernel`` with 3 to 5
dims whose module name contains "conv" (``Conv_0``, ``ConvTranspose_1``, ``conv1``; case-insensitive) is a
convolution ``(*k, in/groups, out)`` and is returned as ``(out, in/groups, *k)``; a 2-D ``kernel`` is a Dense
``(in, out)`` and is returned as ``(out, in)``; both with ``layout="oihw"``. (A depthwise flax Conv with
``feature_group_count=C`` stores ``(*k, 1, C*M)``, which becomes torch's ``(C*M, 1, *k)``.) Other float
leaves, including ``kernel`` leaves of non-conv modules with 3+ dims (DenseGeneral, attention), are returned
unchanged with ``layout=None``. A checkpoint with a top-level ``params`` entry (a TrainState or a variables
dict) is read from there only, so optimizer moments are never hashed as weights; otherwise an
``opt_state`` subtree is skipped.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelFormatError, shown
from . import MAX_NESTING, NamedTensor, bf16_to_float32, check_size

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_SCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
_CONV_MODULE = re.compile("conv", re.IGNORECASE)
_DTYPES = {
    "float16": "<f2", "float32": "<f4", "float64": "<f8", "bfloat16": "<u2",
    "int8": "i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
    "uint8": "u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "bool": "?",
}  # fmt: skip


class _Array:
    """An array decoded from an ext object: raw values in their stored dtype, not yet float32."""

    __slots__ = ("raw", "dtype_name")

    def __init__(self, raw: np.ndarray, dtype_name: str) -> None:
        self.raw, self.dtype_name = raw, dtype_name


class _Bad(Exception):
    pass


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    """The float arrays of a flax msgpack checkpoint, kernels transposed by the rule in the module docstring."""
    import msgpack

    declared = [0]

    def ext_hook(code: int, data: bytes) -> Any:
        if code == _EXT_NDARRAY:
            shape, dtype_name, buffer = msgpack.unpackb(data, raw=False)
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise _Bad(f"array with bad shape {shown(shape)}")
            if not isinstance(dtype_name, str) or not isinstance(buffer, bytes):
                raise _Bad("array ext object without a dtype name and a byte buffer")
            dtype = _DTYPES.get(dtype_name)
            if dtype is None:
                raise _Bad(f"array of unsupported dtype {dtype_name[:40]!r}")
            count = math.prod(shape)
            if count * np.dtype(dtype).itemsize != len(buffer):
                raise _Bad(f"array of shape {shape} ({dtype_name}) with a {len(buffer)}-byte buffer")
            if dtype_name.startswith(("float", "bfloat")):
                declared[0] += 4 * count
                check_size(path, declared[0], max_bytes)
            return _Array(np.frombuffer(buffer, dtype=dtype).reshape(shape), dtype_name)
        if code in (_EXT_COMPLEX, _EXT_SCALAR):
            return None  # scalars (step counters, learning rates) are not weights
        raise _Bad(f"unknown msgpack ext type {code}")

    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise ModelFormatError(f"{path}: empty file")
        f.seek(0)
        # Streamed: the unpacker holds at most one array's bytes besides the arrays it has decoded, so the
        # file is never in memory twice.
        unpacker = msgpack.Unpacker(
            f, ext_hook=ext_hook, raw=False, strict_map_key=False, max_buffer_size=min(size, 2**32 - 1)
        )
        try:
            tree = unpacker.unpack()
            extra = unpacker.tell() < size
        except ModelFormatError:
            raise
        except _Bad as exc:
            raise ModelFormatError(f"{path}: bad flax msgpack checkpoint: {exc}") from None
        except Exception as exc:  # msgpack's OutOfData, FormatError, StackError, ValueError on bad bytes
            raise ModelFormatError(f"{path}: not a flax msgpack checkpoint ({type(exc).__name__})") from None
    if extra:
        raise ModelFormatError(f"{path}: not a flax msgpack checkpoint (bytes after the state dict)")
    if not isinstance(tree, dict):
        raise ModelFormatError(f"{path}: not a flax msgpack checkpoint (top level is {type(tree).__name__})")
    if isinstance(tree.get("params"), dict):
        tree, prefix = tree["params"], ["params"]
    else:
        tree, prefix = {k: v for k, v in tree.items() if k != "opt_state"}, []
    out: list[NamedTensor] = []
    try:
        _walk(tree, prefix, out)
    except _Bad as exc:
        raise ModelFormatError(f"{path}: bad flax msgpack checkpoint: {exc}") from None
    return out


def _walk(node: Any, names: list[str], out: list[NamedTensor]) -> None:
    if len(names) > MAX_NESTING:  # msgpack nests up to 1,024 deep: past Python's recursion limit
        raise _Bad(f"state dict nests over {MAX_NESTING} deep")
    if isinstance(node, dict):
        if node.get(_CHUNKED) is True:
            _leaf(_unchunk(node, names), names, out)
            return
        for key in list(node):
            value, node[key] = node[key], None  # drop the raw array once read: no second copy of the model
            _walk(value, [*names, str(key)], out)
    elif isinstance(node, _Array):
        _leaf(node, names, out)


def _unchunk(node: dict, names: list[str]) -> _Array:
    shape, chunks = node.get("shape"), node.get("chunks")
    if not isinstance(shape, dict) or not isinstance(chunks, dict):
        raise _Bad(f"chunked array {'/'.join(names)} without shape and chunks")
    dims_read = [shape.get(str(i)) for i in range(len(shape))]
    parts_read = [chunks.get(str(i)) for i in range(len(chunks))]
    dims = [d for d in dims_read if isinstance(d, int) and d >= 0]
    parts = [p for p in parts_read if isinstance(p, _Array)]
    if len(dims) != len(dims_read) or len(parts) != len(parts_read):
        raise _Bad(f"chunked array {'/'.join(names)} with a bad shape or chunk")
    if not parts or len({p.dtype_name for p in parts}) != 1:
        raise _Bad(f"chunked array {'/'.join(names)} with no chunks or mixed dtypes")
    flat = np.concatenate([p.raw.reshape(-1) for p in parts])
    if flat.size != math.prod(dims):
        raise _Bad(f"chunked array {'/'.join(names)}: {flat.size} values for shape {dims}")
    return _Array(flat.reshape(dims), parts[0].dtype_name)


def _leaf(arr: _Array, names: list[str], out: list[NamedTensor]) -> None:
    if not arr.dtype_name.startswith(("float", "bfloat")) or arr.raw.size == 0:
        return
    if arr.dtype_name == "bfloat16":
        w = bf16_to_float32(arr.raw)
    else:
        w = arr.raw.astype(np.float32, copy=False)
    name = "/".join(names)
    if names and names[-1] == "kernel":
        module = names[-2] if len(names) >= 2 else ""
        if w.ndim == 2:
            out.append(NamedTensor(name, np.ascontiguousarray(w.T), "oihw"))
            return
        if 3 <= w.ndim <= 5 and _CONV_MODULE.search(module):
            ks = w.ndim - 2
            out.append(NamedTensor(name, np.ascontiguousarray(np.moveaxis(w, (ks + 1, ks), (0, 1))), "oihw"))
            return
    out.append(NamedTensor(name, np.ascontiguousarray(w), None))
