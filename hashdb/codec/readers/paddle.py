"""Paddle inference models: ``X.pdiparams`` (the weights) with ``X.pdmodel`` (the program) beside it.

``X.pdiparams`` is what Paddle's ``save_combine`` writes: the persistable variables one after another in
sorted-name order, each a LoDTensor serialization: uint32 version (0), uint64 LoD level count and that many
(uint64 byte length, offsets) levels, uint32 tensor version (0), int32 length of a ``TensorDesc`` protobuf
(data_type = 1, dims = 2), then the raw little-endian data. The file is memory-mapped; every length is
checked against what is left of the file before it is used.

``X.pdmodel`` is a ``ProgramDesc`` protobuf (framework.proto), decoded with our own wire-format reader: block
0's ``VarDesc``s name the persistable LoD tensors (sorted by name, as Paddle saves and loads them; ``feed``
and ``fetch`` excluded) and its ``OpDesc``s say which are convolution filters (the ``Filter`` input of
conv2d, depthwise_conv2d, conv3d and their transposes). Paddle's filters are OIHW (transposed convolutions
``(in, out/groups, *k)``, torch's order): they are returned as stored and marked so. Without a ``.pdmodel``
(also beside Paddle 3's ``inference.json`` programs, which are not read) the tensors are named ``param_N`` and
their layout is left to the shape guess. A ``batch_norm`` op reading a convolution's output has its parameters
renamed after that convolution's filter (``<filter>.bn.weight``, ``.bn.running_var``, ...), so that codec v7 folds
it in (hashdb/codec/batchnorm.py).

float32, float64, float16 and bfloat16 tensors are returned; integer and bool tensors are skipped.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ...errors import ModelFormatError
from . import NamedTensor, batchnorm_name, bf16_to_float32, check_size
from . import protowire as pw

# VarType.Type -> (numpy dtype of the stored bytes, is a float type)
_DTYPES: dict[int, tuple[str, bool]] = {
    0: ("u1", False), 1: ("<i2", False), 2: ("<i4", False), 3: ("<i8", False), 4: ("<f2", True),
    5: ("<f4", True), 6: ("<f8", True), 20: ("u1", False), 21: ("i1", False), 22: ("<u2", True),
    23: ("<c8", False), 24: ("<c16", False),
}  # fmt: skip
_BF16 = 22
LOD_TENSOR = 7
_CONV_OPS = frozenset({
    "conv2d", "depthwise_conv2d", "conv3d", "conv2d_transpose", "depthwise_conv2d_transpose", "conv3d_transpose",
    "fused_conv2d", "fused_conv2d_add_act", "conv2d_fusion",
})  # fmt: skip
MAX_PROGRAM_BYTES = 1 << 30


def _tensor_desc(buf: memoryview) -> tuple[int, tuple[int, ...]]:
    msg = pw.message(buf)
    dtype = pw.as_int(msg.get(1, [-1])[-1])
    dims = tuple(pw.signed(d) for d in pw.varints(msg.get(2, [])))
    return dtype, dims


def _op_vars(op: dict, field: int) -> dict[str, list[str]]:
    """An OpDesc's inputs (field 1) or outputs (2): parameter name -> argument (variable) names."""
    out: dict[str, list[str]] = {}
    for raw_var in op.get(field, []):
        var = pw.message(pw.as_bytes(raw_var))
        out[pw.text(var.get(1, [memoryview(b"")])[-1])] = [pw.text(a) for a in var.get(2, [])]
    return out


_NORM_OPS = frozenset({"batch_norm", "sync_batch_norm"})
_NORM_PARTS = {"Scale": "weight", "Bias": "bias", "Mean": "running_mean", "Variance": "running_var"}


def program_vars(buf: memoryview) -> tuple[list[tuple[str, int, tuple[int, ...]]], set[str], dict[str, str]]:
    """(persistable LoD tensors of block 0 sorted by name as (name, dtype, dims), names of conv filters, the new
    names of the parameters of each BatchNorm that reads a convolution's output: ``<filter>.bn.weight``,
    ``.bn.running_var``..., so that codec v7 folds it into that convolution, hashdb/codec/batchnorm.py)."""
    program = pw.message(buf)
    blocks = program.get(1, [])
    if not blocks:
        raise ValueError("the program has no blocks")
    block = pw.message(pw.as_bytes(blocks[0]))
    persistable: list[tuple[str, int, tuple[int, ...]]] = []
    for raw in block.get(3, []):
        var = pw.message(pw.as_bytes(raw))
        name = pw.text(var.get(1, [memoryview(b"")])[-1])
        if not var.get(3) or not pw.as_int(var[3][-1]) or name in ("feed", "fetch"):
            continue
        vtype = pw.message(pw.as_bytes(var.get(2, [memoryview(b"")])[-1]))
        if pw.as_int(vtype.get(1, [-1])[-1]) != LOD_TENSOR or 3 not in vtype:
            continue
        lod = pw.message(pw.as_bytes(vtype[3][-1]))
        dtype, dims = _tensor_desc(pw.as_bytes(lod.get(1, [memoryview(b"")])[-1]))
        persistable.append((name, dtype, dims))
    filters: set[str] = set()
    filter_of: dict[str, str] = {}  # a convolution's output variable -> its filter
    norms: list[dict[str, list[str]]] = []
    for raw in block.get(4, []):
        op = pw.message(pw.as_bytes(raw))
        kind = pw.text(op.get(3, [memoryview(b"")])[-1])
        if kind in _NORM_OPS:
            norms.append(_op_vars(op, 1))
        if kind not in _CONV_OPS:
            continue
        inputs = _op_vars(op, 1)
        filters.update(inputs.get("Filter", []))
        for output in _op_vars(op, 2).get("Output", []):
            if inputs.get("Filter"):
                filter_of[output] = inputs["Filter"][0]
    renamed: dict[str, str] = {}
    for inputs in norms:
        source = filter_of.get((inputs.get("X") or [""])[0])
        for part, role in _NORM_PARTS.items():
            if source is not None and inputs.get(part):
                renamed[inputs[part][0]] = batchnorm_name(source, role)
    persistable.sort(key=lambda v: v[0].encode())
    return persistable, filters, renamed


def _u(buf: np.ndarray, pos: int, width: int) -> int:
    if pos + width > len(buf):
        raise ValueError("truncated tensor header")
    return int.from_bytes(buf[pos : pos + width].tobytes(), "little")


def params_tensors(path: Path, buf: np.ndarray, max_bytes: int) -> list[tuple[int, tuple[int, ...], int]]:
    """(dtype, dims, data offset) of each LoDTensor of a combined params file, headers checked (the float
    tensors' total against ``max_bytes`` as it grows: a ModelFormatError; other faults: ValueError)."""
    out: list[tuple[int, tuple[int, ...], int]] = []
    pos = 0
    total = 0
    while pos < len(buf):
        if _u(buf, pos, 4) != 0:
            raise ValueError(f"tensor {len(out)}: unknown LoDTensor version {_u(buf, pos, 4)}")
        levels = _u(buf, pos + 4, 8)
        pos += 12
        if levels > 64:
            raise ValueError(f"tensor {len(out)}: {levels} LoD levels")
        for _ in range(levels):
            size = _u(buf, pos, 8)
            if size > len(buf) - pos - 8:
                raise ValueError(f"tensor {len(out)}: LoD level of {size} bytes runs past the file")
            pos += 8 + size
        if _u(buf, pos, 4) != 0:
            raise ValueError(f"tensor {len(out)}: unknown tensor version {_u(buf, pos, 4)}")
        desc_size = _u(buf, pos + 4, 4)
        pos += 8
        if desc_size > len(buf) - pos:
            raise ValueError(f"tensor {len(out)}: descriptor of {desc_size} bytes runs past the file")
        dtype, dims = _tensor_desc(memoryview(buf[pos : pos + desc_size].tobytes()))
        pos += desc_size
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {len(out)}: unknown data type {dtype}")
        if any(d < 0 for d in dims):
            raise ValueError(f"tensor {len(out)}: negative dimension in {dims}")
        nbytes = math.prod(dims) * np.dtype(_DTYPES[dtype][0]).itemsize
        if _DTYPES[dtype][1]:
            total += math.prod(dims) * 4
            check_size(path, total, max_bytes)
        if nbytes > len(buf) - pos:
            raise ValueError(f"tensor {len(out)}: {dims} data runs past the end of the file")
        out.append((dtype, dims, pos))
        pos += nbytes
    return out


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    params = path.with_suffix(".pdiparams")
    program = path.with_suffix(".pdmodel")
    if not params.is_file():
        raise ModelFormatError(f"{path}: the weights file {params.name} is missing beside the program")
    names: list[tuple[str, int, tuple[int, ...]]] | None = None
    filters: set[str] = set()
    renamed: dict[str, str] = {}
    if program.is_file():
        size = program.stat().st_size
        if size > MAX_PROGRAM_BYTES:
            raise ModelFormatError(f"{program}: a program of {size:,} bytes is not a Paddle model")
        try:
            names, filters, renamed = program_vars(memoryview(program.read_bytes()))
        except ValueError as exc:
            raise ModelFormatError(f"{program}: not a readable Paddle program ({exc})") from None
    if params.stat().st_size == 0:
        raise ModelFormatError(f"{params}: empty Paddle params file")
    buf = np.memmap(params, dtype=np.uint8, mode="r")
    try:
        tensors = params_tensors(params, buf, max_bytes)
    except ValueError as exc:
        raise ModelFormatError(f"{params}: not a readable Paddle params file ({exc})") from None
    if names is not None:
        if len(names) != len(tensors):
            raise ModelFormatError(
                f"{params}: holds {len(tensors)} tensors, {program.name} lists {len(names)} persistable variables"
            )
        for (name, _, dims), (_, stored, _) in zip(names, tensors, strict=True):
            if tuple(dims) != stored:
                raise ModelFormatError(f"{params}: variable {name!r} is {stored} here, {dims} in {program.name}")
    out: list[NamedTensor] = []
    for i, (dtype, dims, offset) in enumerate(tensors):
        stored_dtype, is_float = _DTYPES[dtype]
        if not is_float or math.prod(dims) == 0:
            continue
        arr = np.frombuffer(buf, dtype=stored_dtype, count=math.prod(dims), offset=offset).reshape(dims)
        arr = bf16_to_float32(arr) if dtype == _BF16 else np.ascontiguousarray(arr, dtype=np.float32)
        name = names[i][0] if names is not None else f"param_{i}"
        layout = "oihw" if name in filters and arr.ndim >= 3 else None
        out.append(NamedTensor(renamed.get(name, name), arr, layout))
    return out
