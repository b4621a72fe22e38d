"""TensorFlow Lite ``.tflite`` flatbuffers, parsed here (no TensorFlow, no generated schema code).

Read: the weight inputs of CONV_2D (OHWI), DEPTHWISE_CONV_2D ``(1, H, W, C*M)``, CONV_3D ``(D, H, W, I, O)``
and FULLY_CONNECTED ``(out, in)``, returned as ``(out, in, *k)`` with ``layout="oihw"`` (depthwise as
``(C*M, 1, H, W)``, torch's grouped layout); TRANSPOSE_CONV (OHWI) and CONV_3D_TRANSPOSE ``(D, H, W, O, I)``
in torch's ConvTranspose order ``(in, out, *k)``. A weight
may be a constant float32/float16/bfloat16/float64 tensor, the constant input of a DEQUANTIZE op (fp16 and
int8 models), or an int8/uint8/int16 tensor with per-tensor or per-channel quantization (``scale``,
``zero_point`` along ``quantized_dimension``), which is dequantized. Buffers are read from the flatbuffer or,
for models over 2 GB, from ``offset``/``size`` past it. Other constants (biases, shapes) are not weights and
are not returned. Sparse tensors, custom quantization details, weights in external buffer files and unknown
tensor types raise ModelFormatError.

The schema fields used (tensorflow/compiler/mlir/lite/schema/schema.fbs; field ids in brackets):
Model{operator_codes[1], subgraphs[2], buffers[4]}, OperatorCode{deprecated_builtin_code[0]: int8,
builtin_code[3]: int32}, SubGraph{tensors[0], operators[3]}, Operator{opcode_index[0], inputs[1],
outputs[2]}, Tensor{shape[0], type[1]: int8, buffer[2]: uint32, name[3], quantization[4], sparsity[6],
external_buffer[10]}, QuantizationParameters{scale[2]: [float], zero_point[3]: [long], details_type[4],
quantized_dimension[6]}, Buffer{data[0]: [ubyte], offset[1]: uint64, size[2]: uint64}.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelFormatError
from . import NamedTensor, bf16_to_float32, check_expansion, close_map

CONV_2D, DEPTHWISE_CONV_2D, DEQUANTIZE, FULLY_CONNECTED, TRANSPOSE_CONV = 3, 4, 6, 9, 67
CONV_3D, CONV_3D_TRANSPOSE = 132, 141
# op -> (index of its weight input, the weight's layout)
_WEIGHT_OPS: dict[int, tuple[int, str]] = {
    CONV_2D: (1, "ohwi"), DEPTHWISE_CONV_2D: (1, "depthwise"), FULLY_CONNECTED: (1, "oi"),
    TRANSPOSE_CONV: (1, "ohwi_transpose"), CONV_3D: (1, "dhwio"), CONV_3D_TRANSPOSE: (1, "dhwio"),
}  # fmt: skip

# TensorType -> (name, numpy dtype): floats are read as they are, integers only as quantized weights.
_FLOAT_TYPES = {0: ("float32", "<f4"), 1: ("float16", "<f2"), 10: ("float64", "<f8"), 18: ("bfloat16", "<u2")}
_QUANT_TYPES = {3: ("uint8", "u1"), 7: ("int16", "<i2"), 9: ("int8", "i1")}
_TYPE_NAMES = {
    2: "int32", 4: "int64", 5: "string", 6: "bool", 8: "complex64", 11: "complex128", 12: "uint64",
    13: "resource", 14: "variant", 15: "uint32", 16: "uint16", 17: "int4", 19: "int2", 20: "uint4",
    21: "float8_e4m3fn", 22: "float8_e5m2",
}  # fmt: skip


class _Corrupt(Exception):
    """An offset or length that points outside the file: the flatbuffer is truncated or corrupt."""


# Parse work allowed per byte of file, counted in numbers and tables visited (plus one per vector; the bytes
# of tensor data are not visited one by one): a flatbuffer may point many vectors at one table, so one
# operator with L outputs listed K times cost K x L steps (85 KB took 38 s, 1.6 MB about 4 hours). A real
# model visits each of its 4-byte numbers a few times (outputs, inputs, shapes): under one step per byte.
WORK_PER_BYTE = 2
WORK_FLOOR = 1 << 18


class _Work:
    """The parse-work budget of one file, shared by all its tables."""

    __slots__ = ("left",)

    def __init__(self, file_size: int) -> None:
        self.left = WORK_PER_BYTE * file_size + WORK_FLOOR

    def spend(self, steps: int) -> None:
        self.left -= steps
        if self.left < 0:
            raise _Corrupt("the flatbuffer's tables alias each other far beyond the file's size (parse refused)")


class _Table:
    """One flatbuffer table: field i is located through the table's vtable (absent fields read as default)."""

    __slots__ = ("buf", "pos", "vtable", "vsize", "work")

    def __init__(self, buf: Any, pos: int, work: _Work) -> None:
        self.buf = buf
        self.pos = pos
        self.work = work
        vtable = pos - _get(buf, "<i", pos)
        self.vtable = vtable
        self.vsize = _get(buf, "<H", vtable)
        if self.vsize < 4 or self.vsize % 2:
            raise _Corrupt(f"bad vtable at {vtable}")
        _check(buf, vtable, self.vsize)

    def _field(self, i: int) -> int:
        at = 4 + 2 * i
        if at + 2 > self.vsize:
            return 0
        off = _get(self.buf, "<H", self.vtable + at)
        return self.pos + off if off else 0

    def scalar(self, i: int, fmt: str, default: int | float = 0) -> Any:
        at = self._field(i)
        return _get(self.buf, fmt, at) if at else default

    def _target(self, i: int) -> int:
        at = self._field(i)
        return at + _get(self.buf, "<I", at) if at else 0

    def table(self, i: int) -> _Table | None:
        at = self._target(i)
        return _Table(self.buf, at, self.work) if at else None

    def vector(self, i: int, elem_size: int) -> tuple[int, int]:
        """(start of the elements, count) of a vector field; (0, 0) when absent."""
        at = self._target(i)
        if not at:
            return 0, 0
        n = _get(self.buf, "<I", at)
        _check(self.buf, at + 4, n * elem_size)
        return at + 4, n

    def numbers(self, i: int, dtype: str) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        start, n = self.vector(i, size)
        self.work.spend(1 + n)
        return np.frombuffer(self.buf, dtype=dtype, count=n, offset=start).copy() if n else np.zeros(0, dtype)

    def tables(self, i: int) -> list[_Table]:
        start, n = self.vector(i, 4)
        self.work.spend(1 + n)
        return [_Table(self.buf, start + 4 * k + _get(self.buf, "<I", start + 4 * k), self.work) for k in range(n)]

    def string(self, i: int) -> str:
        start, n = self.vector(i, 1)
        return bytes(self.buf[start : start + n]).decode("utf-8", "replace") if n else ""


def _check(buf: Any, start: int, size: int) -> None:
    if start < 0 or size < 0 or start + size > len(buf):
        raise _Corrupt(f"range {start}+{size} outside the file")


def _get(buf: Any, fmt: str, at: int) -> Any:
    _check(buf, at, struct.calcsize(fmt))
    return struct.unpack_from(fmt, buf, at)[0]


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    """The conv / depthwise / fully-connected weights of every subgraph of a ``.tflite`` model.

    The flatbuffer's tables are parsed from a memory map; tensor data is read from the file straight into
    the arrays (``readinto``), so the weights' pages never count twice in the process's memory.
    """
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 8:
            raise ModelFormatError(f"{path}: truncated TFLite file ({size} bytes)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return _read_model(path, mm, f, max_bytes)
        except _Corrupt as exc:
            raise ModelFormatError(f"{path}: truncated or corrupt TFLite flatbuffer ({exc})") from None
        except ModelFormatError:
            raise
        except Exception as exc:  # e.g. a shape that does not fit its buffer's dtype: a corrupt file, not a crash
            raise ModelFormatError(f"{path}: corrupt TFLite flatbuffer ({type(exc).__name__})") from None
        finally:
            close_map(mm)


def _read_model(path: Path, buf: Any, file: Any, max_bytes: int) -> list[NamedTensor]:
    if bytes(buf[4:8]) != b"TFL3":
        raise ModelFormatError(f"{path}: not a TFLite model (no TFL3 identifier)")
    model = _Table(buf, _get(buf, "<I", 0), _Work(len(buf)))
    codes = []
    for code in model.tables(1):
        deprecated = code.scalar(0, "<b", 0)
        codes.append(max(int(deprecated), int(code.scalar(3, "<i", 0))))
    buffers = model.tables(4)
    out: list[NamedTensor] = []
    planned: list[tuple[str, _Table, str]] = []  # (name, constant tensor, layout)
    composed: dict[int, int] = {}  # planned position of a 1x1 CONV_2D's weight -> that of the conv it follows
    for g, subgraph in enumerate(model.tables(2)):
        tensors = subgraph.tables(0)
        operators = subgraph.tables(3)
        producer: dict[int, tuple[int, _Table]] = {}
        for op in operators:
            idx = int(op.scalar(0, "<I", 0))
            for t in op.numbers(2, "<i4"):
                producer[int(t)] = (codes[idx] if idx < len(codes) else -1, op)
        at: dict[int, int] = {}  # weight tensor index -> its position in planned
        seen: set[int] = set()
        for op in operators:
            idx = int(op.scalar(0, "<I", 0))
            if idx >= len(codes):
                raise ModelFormatError(f"{path}: operator code index {idx} out of range ({len(codes)} codes)")
            spec = _WEIGHT_OPS.get(codes[idx])
            inputs = op.numbers(1, "<i4")
            if spec is None or len(inputs) <= spec[0]:
                continue
            t = int(inputs[spec[0]])
            if t < 0 or t in seen:
                continue
            seen.add(t)
            if t >= len(tensors):
                raise ModelFormatError(f"{path}: tensor index {t} out of range ({len(tensors)} tensors)")
            source = tensors[t]
            if not _has_data(source, buffers) and t in producer and producer[t][0] == DEQUANTIZE:
                dq_inputs = producer[t][1].numbers(1, "<i4")  # fp16 / int8 constant behind a DEQUANTIZE op
                if len(dq_inputs) and 0 <= int(dq_inputs[0]) < len(tensors):
                    source = tensors[int(dq_inputs[0])]
            if not _has_data(source, buffers):
                continue  # a weight computed at run time, not stored in the file
            name = source.string(3) or f"subgraph{g}/tensor{t}"
            at[t] = len(planned)
            planned.append((name if g == 0 else f"subgraph{g}/{name}", source, spec[1]))
        for one_by_one, first in _split_convs(subgraph, operators, codes, producer, tensors):
            if one_by_one in at and first in at and at[first] not in composed:
                composed[at[one_by_one]] = at[first]
    # Subgraphs and tensors may share one buffer: what they make counts against the distinct buffers stored.
    # Overlapping ranges are each counted, but never more than the file holds.
    stored = min(len(buf), sum(n for _, n in {_data_range(t, buffers) for _, t, _ in planned}))
    produced = sum(4 * math.prod(_shape(path, t)) for _, t, _ in planned)
    check_expansion(path, stored, produced, max_bytes)
    arrays = [_to_oihw(_values(path, buf, file, tensor, buffers, name), layout) for name, tensor, layout in planned]
    for one_by_one, first in list(composed.items()):  # A @ W: the kxk conv and the 1x1 after it as one kernel
        a, w = arrays[one_by_one], arrays[first]
        if a.ndim == 4 and w.ndim == 4 and a.shape[2:] == (1, 1) and a.shape[1] == w.shape[0]:
            arrays[first] = np.einsum("po,oikl->pikl", a[:, :, 0, 0].astype(np.float64), w).astype(np.float32)
        else:  # widths that do not chain: not one map after all
            del composed[one_by_one]
    for j, ((name, _, _), arr) in enumerate(zip(planned, arrays, strict=True)):
        if j not in composed:
            out.append(NamedTensor(name, arr, "oihw"))
    return out


def _split_convs(
    subgraph: _Table, operators: list[_Table], codes: list[int], producer: dict[int, tuple[int, _Table]],
    tensors: list[_Table],
) -> list[tuple[int, int]]:  # fmt: skip
    """(1x1 weight, first weight) tensor indices of CONV_2D pairs the graph shows as one linear map: a CONV_2D
    with no fused activation whose output only a square 1x1 CONV_2D of stride 1 reads (not a subgraph output), each
    weight used by its own op only. A split convolution (W -> A^-1 W then A) composes back into W."""
    uses: dict[int, int] = {}
    for op in operators:
        for t in op.numbers(1, "<i4"):
            uses[int(t)] = uses.get(int(t), 0) + 1
    outputs = {int(t) for t in subgraph.numbers(2, "<i4")}
    pairs = []
    for op in operators:
        idx = int(op.scalar(0, "<I", 0))
        inputs = op.numbers(1, "<i4")
        if idx >= len(codes) or codes[idx] != CONV_2D or len(inputs) < 2:
            continue
        x, weight = int(inputs[0]), int(inputs[1])
        options = op.table(4)
        if options is None or int(options.scalar(1, "<i", 0)) != 1 or int(options.scalar(2, "<i", 0)) != 1:
            continue
        if not 0 <= weight < len(tensors):
            continue
        shape = [int(d) for d in tensors[weight].numbers(0, "<i4")]  # OHWI: a square 1x1 (a split keeps the width)
        if len(shape) != 4 or shape[1:3] != [1, 1] or shape[0] != shape[3]:
            continue
        code, first = producer.get(x, (-1, None))
        if first is None or code != CONV_2D or uses.get(x) != 1 or x in outputs or uses.get(weight) != 1:
            continue
        first_inputs = first.numbers(1, "<i4")
        first_options = first.table(4)
        if len(first_inputs) < 2 or uses.get(int(first_inputs[1])) != 1:
            continue
        if first_options is not None and int(first_options.scalar(3, "<b", 0)) != 0:  # a fused ReLU between
            continue
        pairs.append((weight, int(first_inputs[1])))
    return pairs


def _shape(path: Path, tensor: _Table) -> list[int]:
    shape = [int(d) for d in tensor.numbers(0, "<i4")]
    if any(d < 0 for d in shape):
        raise ModelFormatError(f"{path}: constant tensor {tensor.string(3)!r} with negative dimension {shape}")
    return shape


def _buffer_of(tensor: _Table, buffers: list[_Table]) -> _Table | None:
    b = int(tensor.scalar(2, "<I", 0))
    return buffers[b] if 0 < b < len(buffers) else None  # buffer 0 is the empty sentinel


def _data_range(tensor: _Table, buffers: list[_Table]) -> tuple[int, int]:
    """(start, size) of a tensor's bytes in the file: its buffer's data vector, or its offset and size."""
    buffer = _buffer_of(tensor, buffers)
    if buffer is None:
        return 0, 0
    start, n = buffer.vector(0, 1)
    return (start, n) if n else (int(buffer.scalar(1, "<Q", 0)), int(buffer.scalar(2, "<Q", 0)))


def _has_data(tensor: _Table, buffers: list[_Table]) -> bool:
    if tensor.scalar(10, "<I", 0):
        return True  # external buffer: reported as unsupported when read
    buffer = _buffer_of(tensor, buffers)
    if buffer is None:
        return False
    return buffer.vector(0, 1)[1] > 0 or int(buffer.scalar(1, "<Q", 0)) > 1


def _values(path: Path, buf: Any, file: Any, tensor: _Table, buffers: list[_Table], name: str) -> np.ndarray:
    """The tensor's values as float32 in its stored shape, dequantized."""
    if tensor.scalar(10, "<I", 0):
        raise ModelFormatError(f"{path}: tensor {name!r} keeps its data in an external buffer file (unsupported)")
    if tensor.table(6) is not None:
        raise ModelFormatError(f"{path}: tensor {name!r} is sparse (sparse TFLite weights are not supported)")
    ttype = int(tensor.scalar(1, "<b", 0))
    shape = _shape(path, tensor)
    if ttype in _FLOAT_TYPES:
        type_name, dtype = _FLOAT_TYPES[ttype]
    elif ttype in _QUANT_TYPES:
        type_name, dtype = _QUANT_TYPES[ttype]
    else:
        what = _TYPE_NAMES.get(ttype, f"unknown type {ttype}")
        raise ModelFormatError(f"{path}: weight tensor {name!r} of type {what} is not supported")
    count = math.prod(shape)
    nbytes = count * np.dtype(dtype).itemsize
    buffer = _buffer_of(tensor, buffers)
    assert buffer is not None  # _has_data checked it
    start, n = buffer.vector(0, 1)
    if not n:  # data past the flatbuffer (models over 2 GB): offset from the start of the file
        start, n = int(buffer.scalar(1, "<Q", 0)), int(buffer.scalar(2, "<Q", 0))
        if start + n > len(buf):
            raise ModelFormatError(f"{path}: buffer of {name!r} runs past the end of the file (truncated)")
    if n != nbytes:
        raise ModelFormatError(f"{path}: tensor {name!r} of shape {shape} ({type_name}) has a {n}-byte buffer")
    raw = np.empty(shape, dtype=dtype)
    file.seek(start)
    if file.readinto(raw.reshape(-1).view(np.uint8).data) != nbytes:
        raise ModelFormatError(f"{path}: buffer of {name!r} is cut short (truncated file)")
    if ttype in _FLOAT_TYPES:
        if type_name == "bfloat16":
            return bf16_to_float32(raw)
        return raw.astype(np.float32, copy=False)
    return _dequantize(path, tensor, raw, name, type_name)


def _dequantize(path: Path, tensor: _Table, raw: np.ndarray, name: str, type_name: str) -> np.ndarray:
    quant = tensor.table(4)
    scale = quant.numbers(2, "<f4") if quant is not None else np.zeros(0, np.float32)
    if quant is None or not len(scale):
        raise ModelFormatError(f"{path}: {type_name} weight tensor {name!r} has no quantization scale")
    if quant.scalar(4, "<B", 0):
        raise ModelFormatError(f"{path}: tensor {name!r} uses custom quantization details (unsupported)")
    zero = quant.numbers(3, "<i8")
    if not len(zero):
        zero = np.zeros(len(scale), np.int64)
    axis = int(quant.scalar(6, "<i", 0))
    if len(scale) == 1 and len(zero) == 1:
        return ((raw.astype(np.float32) - np.float32(zero[0])) * np.float32(scale[0])).astype(np.float32)
    if not 0 <= axis < raw.ndim or len(scale) != raw.shape[axis] or len(zero) != len(scale):
        raise ModelFormatError(
            f"{path}: tensor {name!r} of shape {list(raw.shape)} has {len(scale)} scales and {len(zero)} zero "
            f"points along dimension {axis}"
        )
    bshape = [1] * raw.ndim
    bshape[axis] = len(scale)
    zp = zero.astype(np.float32).reshape(bshape)
    return ((raw.astype(np.float32) - zp) * scale.astype(np.float32).reshape(bshape)).astype(np.float32)


def _to_oihw(w: np.ndarray, layout: str) -> np.ndarray:
    if layout == "oi" or w.ndim < 3:
        return np.ascontiguousarray(w)
    if layout == "ohwi":  # (O, *k, I) -> (O, I, *k)
        return np.ascontiguousarray(np.moveaxis(w, -1, 1))
    if layout == "ohwi_transpose":  # TRANSPOSE_CONV (O, *k, I) -> torch's ConvTranspose order (I, O, *k)
        return np.ascontiguousarray(np.moveaxis(w, -1, 0))
    if layout == "depthwise":  # (1, *k, C*M) -> (C*M, 1, *k); output channel c*M + m as in torch
        return np.ascontiguousarray(np.moveaxis(w, -1, 0))
    ks = w.ndim - 2  # "dhwio": (*k, I, O) -> (O, I, *k)
    return np.ascontiguousarray(np.moveaxis(w, (ks + 1, ks), (0, 1)))
