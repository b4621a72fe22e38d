"""ONNX models: the graph's initializers (needs the optional ``onnx`` package: pip install hashdb[onnx]).

Conv weights (input 1 of a Conv or ConvTranspose node, an initializer or a Constant node's value) are OIHW
by the ONNX spec and are marked so. Quantized weights are dequantized ``(q - zero_point) * scale``: the
int8/uint8 (or int4/uint4) constant behind a DequantizeLinear (per tensor, along its axis, or blocked by
``block_size``), the weight of QLinearConv/QLinearMatMul (per tensor or per output channel), and the weight
of dynamic-int8 ConvInteger/MatMulInteger with its zero point and the scale the graph multiplies its output
by (none found: zero point only; a per-tensor scale does not change the code).
External data is resolved against the model file's own folder only: an absolute location, one that
leaves the folder (``..``, a symlink out) or a missing file is refused; the current directory is never
looked at. Its declared length is size-checked before it is mapped.
The weights' bytes (the raw_data of initializers and of Constant nodes' tensors) never go through onnx: the file
is mapped, our wire-format reader (protowire) leaves those payloads out of what onnx parses and notes where each
lies, and each tensor is copied out of the map when it is read, so the process holds a model's weights once
(peak ~1.2x the weights, where onnx.load's parse plus the arrays made 2x; weights in the typed fields, such as
float_data, still go through onnx: 2x). A file the walker does not read (protobuf's deprecated groups) is parsed
whole by onnx, as before; a tag or length varint longer than protobuf allows, in a record the walker leaves out,
is read where onnx would refuse the file.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelFormatError
from . import (
    NamedTensor,
    batchnorm_name,
    bf16_to_float32,
    check_expansion,
    check_size,
    close_map,
    drop_mapped_pages,
    float8_table,
    float32_or_none,
)
from . import protowire as pw

# TensorProto.DataType -> (numpy dtype of the stored bytes, decoding)
_TYPES: dict[int, tuple[str, str]] = {
    1: ("<f4", "float"), 10: ("<f2", "float"), 11: ("<f8", "float"), 16: ("<u2", "bf16"),
    17: ("u1", "e4m3fn"), 19: ("u1", "e5m2"),
}  # fmt: skip


def _external(path: Path, init: Any, folder: Path, max_bytes: int) -> np.ndarray | None:
    info = {e.key: e.value for e in init.external_data}
    location = info.get("location", "")
    if not location or os.path.isabs(location) or "\x00" in location:
        raise ModelFormatError(f"{path}: initializer {init.name!r}: external data location {location!r} refused")
    target = (folder / location).resolve()
    if not target.is_relative_to(folder):
        raise ModelFormatError(
            f"{path}: initializer {init.name!r}: external data {location!r} lies outside the model's folder"
        )
    if not target.is_file():
        raise ModelFormatError(f"{path}: initializer {init.name!r}: external data file {location!r} not found")
    if init.data_type not in _TYPES and init.data_type not in _INT_TYPES:
        return None
    np_dtype = _TYPES[init.data_type][0] if init.data_type in _TYPES else _INT_TYPES[init.data_type]
    shape = tuple(int(d) for d in init.dims)
    if any(d < 0 for d in shape):
        raise ModelFormatError(f"{path}: initializer {init.name!r}: negative dimension")
    nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
    check_size(path, nbytes, max_bytes)
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info.get("length", str(nbytes)) or nbytes)
    except ValueError:
        raise ModelFormatError(f"{path}: initializer {init.name!r}: bad external data offset/length") from None
    if offset < 0 or length != nbytes or offset + nbytes > target.stat().st_size:
        raise ModelFormatError(f"{path}: initializer {init.name!r}: external data range does not fit {location!r}")
    if nbytes == 0:
        return np.zeros(shape, dtype=np_dtype)
    return np.asarray(np.memmap(target, dtype=np_dtype, mode="r", offset=offset, shape=shape))


def _decode(raw: np.ndarray, data_type: int) -> np.ndarray | None:
    decode = _TYPES[data_type][1]
    if decode == "float":
        return float32_or_none(raw)
    if decode == "bf16":
        return bf16_to_float32(raw)
    return float8_table(decode)[raw]


# Integer element types of quantized weights, zero points and int32 biases (TensorProto.DataType -> dtype).
_INT_TYPES: dict[int, str] = {2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4"}
_INT4_TYPES: dict[int, type] = {21: np.uint8, 22: np.int8}  # UINT4, INT4: two per byte, unpacked by onnx
# Ops whose weight is input 1 and OIHW by the ONNX spec (ConvTranspose: (in, out/groups, *k), torch's order).
_CONV_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger"})
# Ops a weight passes through unchanged on its way from its constant to the op that uses it.
_PASS_THROUGH = frozenset({"Identity", "Cast"})


def _stored(
    path: Path, init: Any, folder: Path, max_bytes: int, numpy_helper: Any, raw: np.ndarray | None
) -> np.ndarray | None:
    """The tensor as stored (floats decoded to float32, integers kept as integers); None for other types.
    ``raw``: its raw_data (uint8, copied out of the file's map), which ``_without_payloads`` left out of ``init``;
    None where it has none."""
    if init.data_location == 1:  # TensorProto.EXTERNAL
        if init.data_type in _INT4_TYPES:
            raise ModelFormatError(f"{path}: tensor {init.name!r}: 4-bit weights in external data are not supported")
        raw = _external(path, init, folder, max_bytes)
        return raw if raw is None or init.data_type not in _TYPES else _decode(raw, init.data_type)
    if init.data_type not in _TYPES and init.data_type not in _INT_TYPES and init.data_type not in _INT4_TYPES:
        return None
    shape = tuple(int(d) for d in init.dims)
    if any(d < 0 for d in shape):
        raise ModelFormatError(f"{path}: tensor {init.name!r}: negative dimension")
    try:
        if init.data_type in _INT4_TYPES:
            check_size(path, math.prod(shape), max_bytes)  # unpacked to a byte each
            if raw is not None:  # onnx unpacks the nibbles from raw_data: handed back for this tensor only
                init.raw_data = raw.tobytes()
            return np.asarray(numpy_helper.to_array(init)).astype(_INT4_TYPES[init.data_type])
        if raw is not None:  # present, even empty: then onnx reads it, not the typed fields, and so do we
            stored = _TYPES[init.data_type][0] if init.data_type in _TYPES else _INT_TYPES[init.data_type]
            values = raw.view(stored).reshape(shape)
            return _decode(values, init.data_type) if init.data_type in _TYPES else values
        # values in the typed fields (float_data, int32_data for fp16/bf16/int8): onnx decodes them
        arr = np.asarray(numpy_helper.to_array(init))
        return arr.astype(np.float32) if init.data_type in _TYPES else arr
    except (ValueError, TypeError) as exc:
        raise ModelFormatError(f"{path}: tensor {init.name!r}: {str(exc)[:120]}") from None


def _constants(
    path: Path, graph: Any, folder: Path, max_bytes: int, numpy_helper: Any, mm: mmap.mmap | None,
    payloads: Payloads,
) -> dict[str, np.ndarray]:
    """Initializers and the ``value`` tensors of Constant nodes (paddle2onnx keeps weights there), by name; each
    one's raw_data (where ``payloads`` says it lies in the file's map ``mm``) copied out of the map as it is read."""
    out: dict[str, np.ndarray] = {}
    used = unmapped = 0  # bytes of arrays made; bytes copied out of the map since its pages were last dropped
    protos: list[tuple[str, Any, PayloadKey]] = [
        (init.name, init, ("initializer", i)) for i, init in enumerate(graph.initializer)
    ]
    for n, node in enumerate(graph.node):
        if node.op_type == "Constant" and node.output:
            protos += [(node.output[0], a.t, ("node", n, i)) for i, a in enumerate(node.attribute)
                       if a.name == "value" and a.type == 4]  # fmt: skip
    for name, proto, key in protos:
        at = payloads.get(key)
        raw = None
        if at is not None and mm is not None:
            # copied in one expression: no view of the map outlives it (an error's traceback would keep it open)
            raw = np.frombuffer(mm, np.uint8, at[1], at[0]).copy()
            unmapped += at[1]
            if unmapped >= _DROP_EVERY:  # the process holds the arrays, not the file's pages as well
                drop_mapped_pages(mm)
                unmapped = 0
        arr = _stored(path, proto, folder, max_bytes - used, numpy_helper, raw)
        del raw
        if arr is not None and arr.size:
            used += arr.size * 4
            check_size(path, used, max_bytes)
            out[name] = arr
    return out


# The file's pages are dropped once this many bytes have been copied out of them: a bounded excess over 1x the
# weights, for one madvise call per 16 MiB instead of one per tensor (30 % of reading 20,000 small tensors)
_DROP_EVERY = 16 << 20

# Where the weights' bytes lie in a ModelProto: (message, field number) -> the message that field holds, down to
# TensorProto.raw_data (ModelProto.graph, GraphProto.initializer and .node, NodeProto.attribute, AttributeProto.t).
_FIELDS = {("model", 7): "graph", ("graph", 5): "tensor", ("graph", 1): "node", ("node", 5): "attribute",
           ("attribute", 5): "tensor", ("tensor", 9): "raw_data"}  # fmt: skip

PayloadKey = tuple[str, int] | tuple[str, int, int]  # ("initializer", i) or ("node", n, attribute a of node n)
Payloads = dict[PayloadKey, tuple[int, int]]  # -> (offset, length) of that tensor's raw_data in the file


def _without_payloads(buf: memoryview) -> tuple[bytes, Payloads]:
    """The ModelProto in ``buf`` without the raw_data of its graph's initializers and of its nodes' tensor
    attributes (the weights: nearly all of a model file's bytes), and where each left-out raw_data lies in
    ``buf``. onnx parses the rest, so a model's weights are never held twice (peak ~1x the weights, not 2x).

    Counted as protobuf merges messages: the fields of a repeated ``graph`` or ``t`` record add to one message, a
    repeated raw_data is its last record, and a record of another wire type where a message belongs is an unknown
    field to protobuf (kept as it is, not counted). Records are kept as slices of ``buf`` and joined once."""
    payloads: Payloads = {}
    initializers, nodes = itertools.count(), itertools.count()

    def walk(msg: memoryview, at: int, kind: str, key: Any) -> list[bytes | memoryview]:
        """``msg`` (a ``kind`` message at offset ``at`` of ``buf``) as pieces that join into its skeleton."""
        pieces: list[bytes | memoryview] = []
        attributes = itertools.count()
        for number, wire, value, start, end in pw.records(msg):
            inner = _FIELDS.get((kind, number)) if wire == pw.LENGTH else None
            if inner is None or not isinstance(value, memoryview):
                pieces.append(msg[start:end])
                continue
            value_at = at + end - len(value)
            if inner == "raw_data":
                payloads[key] = (value_at, len(value))
                continue
            if inner == "tensor" and kind == "graph":
                inner_key: Any = ("initializer", next(initializers))
            elif inner == "node":
                inner_key = ("node", next(nodes))
            elif inner == "attribute":
                inner_key = (*key, next(attributes))
            else:  # the graph; an attribute's tensor, which is that attribute's
                inner_key = key
            parts = walk(value, value_at, inner, inner_key)
            pieces.append(pw.length_header(number, sum(map(len, parts))))
            pieces += parts
        return pieces

    return b"".join(walk(buf, 0, "model", None)), payloads


def _dequantize(path: Path, name: str, q: np.ndarray, scale: np.ndarray | None, zero: np.ndarray | None,
                axis: int, block: int = 0) -> np.ndarray:  # fmt: skip
    """``(q - zero_point) * scale``, per tensor or along ``axis`` (a 1-D scale/zero point of that axis' length),
    or blocked (``block`` > 0: the parameters have q's rank, ``ceil(n / block)`` along ``axis``)."""
    w = q.astype(np.float32)
    for param in (zero, scale):
        if param is None or param.size == 1:
            value = np.float32(1.0 if param is None else param.reshape(()).astype(np.float32))
            w = w - value if param is zero else w * value
            continue
        ax = axis + q.ndim if axis < 0 else axis
        if block > 0:
            want = tuple(-(-d // block) if i == ax else d for i, d in enumerate(q.shape))
            if param.shape != want:
                raise ModelFormatError(
                    f"{path}: quantized tensor {name!r} of shape {q.shape}: blocked scale/zero point of shape "
                    f"{param.shape}, want {want} (block {block} along axis {axis})"
                )
            expanded = np.repeat(param.astype(np.float32), block, axis=ax)
            expanded = np.take(expanded, np.arange(q.shape[ax]), axis=ax)
            w = w - expanded if param is zero else w * expanded
            continue
        if param.ndim != 1 or not 0 <= ax < q.ndim or param.size != q.shape[ax]:
            raise ModelFormatError(
                f"{path}: quantized tensor {name!r} of shape {q.shape}: scale/zero point of shape "
                f"{param.shape} does not fit axis {axis}"
            )
        shape = [1] * q.ndim
        shape[ax] = param.size
        column = param.astype(np.float32).reshape(shape)
        w = w - column if param is zero else w * column
    return w


def _following_scale(
    node: Any, consumers: dict[str, list[Any]], producers: dict[str, Any], consts: dict[str, np.ndarray]
) -> np.ndarray | None:
    """The weight scale of a dynamic-int8 ConvInteger/MatMulInteger, from the graph after it: onnxruntime writes
    op -> Cast -> Mul(by Mul(x_scale, w_scale)); the constant float factor of that inner Mul is w_scale.
    None where the graph says otherwise (a per-tensor scale does not change the code)."""
    out = node.output[0] if node.output else ""
    for _ in range(3):
        nexts = consumers.get(out, [])
        if len(nexts) != 1:
            return None
        nxt = nexts[0]
        if nxt.op_type in _PASS_THROUGH and nxt.output:
            out = nxt.output[0]
            continue
        if nxt.op_type != "Mul":
            return None
        for other in nxt.input:
            if other == out:
                continue
            if other in consts and consts[other].dtype.kind == "f":
                return consts[other]
            inner = producers.get(other)
            if inner is not None and inner.op_type == "Mul":
                found = [consts[i] for i in inner.input if i in consts and consts[i].dtype.kind == "f"]
                if len(found) == 1:
                    return found[0]
        return None
    return None


def _quantized(path: Path, graph: Any, consts: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
    """Integer weight constant -> (the name the graph uses for its float value, the dequantized array)."""
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def integer(name: str) -> bool:
        return name in consts and consts[name].dtype.kind in "iu"

    out: dict[str, tuple[str, np.ndarray]] = {}
    for node in graph.node:
        ins = [*node.input, "", "", "", "", "", "", "", ""]
        q, scale, zero, axis, block, name = "", None, None, 0, 0, ""
        if node.op_type == "DequantizeLinear" and integer(ins[0]) and ins[1] in consts and node.output:
            q, scale, zero, name = ins[0], consts[ins[1]], consts.get(ins[2]), node.output[0]
            axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 1)
            block = next((int(a.i) for a in node.attribute if a.name == "block_size"), 0)
        elif node.op_type in ("QLinearConv", "QLinearMatMul") and integer(ins[3]):
            q, scale, zero, name = ins[3], consts.get(ins[4]), consts.get(ins[5]), ins[3]
            axis = 0 if node.op_type == "QLinearConv" else -1
        elif node.op_type in ("ConvInteger", "MatMulInteger") and integer(ins[1]):
            q, zero, name = ins[1], consts.get(ins[3]), ins[1]
            axis = 0 if node.op_type == "ConvInteger" else -1
            scale = _following_scale(node, consumers, producers, consts)
            if scale is not None and scale.size > 1:
                scale = scale.reshape(-1)
        if q and q not in out:
            try:
                out[q] = (name, _dequantize(path, q, consts[q], scale, zero, axis, block))
            except (ValueError, TypeError) as exc:
                raise ModelFormatError(f"{path}: {node.op_type} node {node.name!r}: {str(exc)[:120]}") from None
    return out


# Inputs of quantization ops that are scales or zero points, not weights: (op, input indices).
_PARAM_INPUTS = {"DequantizeLinear": (1, 2), "QuantizeLinear": (1, 2), "QLinearConv": (1, 2, 4, 5, 6, 7),
                 "QLinearMatMul": (1, 2, 4, 5, 6, 7)}  # fmt: skip


def _quantization_params(graph: Any) -> set[str]:
    """Names of the scales and zero points of quantization ops (a blocked scale has the weight's rank, and would
    pass for a kernel)."""
    return {node.input[i] for node in graph.node for i in _PARAM_INPUTS.get(node.op_type, ()) if i < len(node.input)}


def _conv_weights(graph: Any) -> set[str]:
    """Names of the float tensors that are conv weights: input 1 of Conv/ConvTranspose/ConvInteger (traced
    back through Identity/Cast to its constant or to the DequantizeLinear that makes it), input 3 of QLinearConv."""
    producers = {out: node for node in graph.node for out in node.output}
    names: set[str] = set()
    for node in graph.node:
        index = 3 if node.op_type == "QLinearConv" else 1
        if (node.op_type in _CONV_OPS or node.op_type == "QLinearConv") and len(node.input) > index:
            name = node.input[index]
            for _ in range(8):
                producer = producers.get(name)
                if producer is None or producer.op_type not in _PASS_THROUGH or not producer.input:
                    break
                name = producer.input[0]
            names.add(name)
    return names


def _ints(node: Any, name: str) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == name), None)


def _input_uses(graph: Any) -> dict[str, int]:
    """How many node inputs name each tensor (a weight read by one node only can be rewritten for it)."""
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return uses


def _split_convs(graph: Any, consts: dict[str, np.ndarray]) -> dict[str, tuple[str, str, str]]:
    """Pairs of Conv nodes the graph shows as one linear map: a Conv (group 1) whose output only a square 1x1
    Conv (group 1, stride 1, no padding) reads, with nothing between them (no activation, no BatchNorm, no add) and
    not a graph output; a split convolution (W -> A^-1 W then A, Neural Structural Obfuscation) or a
    factorised layer. Returns the 1x1's weight name -> (the first weight's name, its bias name, the 1x1's
    bias name) ("" where absent); each weight plain float and used by its own node only."""
    producers = {out: node for node in graph.node for out in node.output}
    uses = _input_uses(graph)
    outputs = {o.name for o in graph.output}

    def plain_conv(node: Any) -> bool:
        ins = list(node.input)
        return (
            node.op_type == "Conv" and len(ins) >= 2 and ins[1] in consts and consts[ins[1]].dtype.kind == "f"
            and consts[ins[1]].ndim >= 3 and uses.get(ins[1]) == 1
            and next((int(a.i) for a in node.attribute if a.name == "group"), 1) == 1
        )  # fmt: skip

    pairs: dict[str, tuple[str, str, str]] = {}
    merged: set[str] = set()
    for node in graph.node:
        if not plain_conv(node) or not node.input[0]:
            continue
        a = consts[node.input[1]]
        square = a.shape[0] == a.shape[1]  # a split keeps the width; a width-changing 1x1 is the architecture's
        if not square or any(d != 1 for d in a.shape[2:]) or any(v != 1 for v in _ints(node, "strides") or [1]):
            continue
        if any(v != 0 for v in _ints(node, "pads") or [0]):
            continue
        first = producers.get(node.input[0])
        if first is None or not plain_conv(first) or uses.get(node.input[0]) != 1 or node.input[0] in outputs:
            continue
        w = consts[first.input[1]]
        if w.shape[0] != a.shape[1] or first.input[1] in merged or node.input[1] in pairs:
            continue
        first_bias, second_bias = (
            n[0] if n and n[0] in consts and uses.get(n[0]) == 1 else "" for n in (first.input[2:3], node.input[2:3])
        )
        pairs[node.input[1]] = (first.input[1], first_bias, second_bias)
        merged.add(node.input[1])
    return pairs


def _compose(consts: dict[str, np.ndarray], pairs: dict[str, tuple[str, str, str]]) -> set[str]:
    """Replace each pair's first weight (and bias) by the composed kernel A @ W (bias A @ b_W + b_A), in place;
    returns the names of the 1x1 weights and biases now inside it."""
    dropped: set[str] = set()
    for one_by_one, (first, first_bias, second_bias) in pairs.items():
        one = consts[one_by_one]
        a = one.reshape(one.shape[0], one.shape[1]).astype(np.float64)
        consts[first] = np.einsum("po,o...->p...", a, consts[first].astype(np.float64)).astype(np.float32)
        bias = a @ consts[first_bias].astype(np.float64) if first_bias else np.zeros(a.shape[0])
        if second_bias:
            bias = bias + consts[second_bias].astype(np.float64)
        if first_bias or second_bias:
            consts[first_bias or second_bias] = bias.astype(np.float32)
        dropped |= {one_by_one, second_bias if first_bias else ""} - {""}
    return dropped


_NORM_INPUTS = ("weight", "bias", "running_mean", "running_var")  # BatchNormalization inputs 1-4, by role


def _batchnorms(graph: Any, consts: dict[str, np.ndarray]) -> dict[str, str]:
    """New names for the parameters of each BatchNormalization node that reads a Conv's output:
    ``<conv weight>.bn.weight`` ... ``.bn.running_var`` (scale, B, input_mean, input_var), so that codec v7 folds
    it into that convolution (hashdb/codec/batchnorm.py) whatever the exporter called them. A parameter another
    node also reads keeps its name."""
    weight_of = {node.output[0]: node.input[1] for node in graph.node
                 if node.op_type == "Conv" and node.output and len(node.input) >= 2}  # fmt: skip
    uses = _input_uses(graph)
    renamed: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "BatchNormalization" or len(node.input) < 5 or node.input[0] not in weight_of:
            continue
        for name, role in zip(node.input[1:5], _NORM_INPUTS, strict=True):
            if name in consts and uses.get(name) == 1:
                renamed[name] = batchnorm_name(weight_of[node.input[0]], role)
    return renamed


def _label(name: str | bytes) -> str:
    """A tensor's name as text: ONNX's proto2 strings come back as bytes where they are not UTF-8 (undecodable
    bytes replaced: names are only labels)."""
    return name if isinstance(name, str) else name.decode("utf-8", "replace")


def _check_expansion(path: Path, model: Any, folder: Path, max_bytes: int) -> None:
    """What the float initializers make against the bytes stored (check_expansion): many initializers may
    name one range of one external file, and each would be read again."""
    import onnx

    produced = 0
    ranges: dict[str, dict[int, int]] = {}  # external location -> offset -> length
    for init in model.graph.initializer:
        if init.data_type not in _TYPES or any(int(d) < 0 for d in init.dims):
            continue  # skipped, or refused with its own message when read
        produced += 4 * math.prod(int(d) for d in init.dims)
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            try:
                offset, length = int(info.get("offset", "0") or 0), int(info.get("length", "0") or 0)
            except ValueError:
                continue  # refused when read
            at = ranges.setdefault(info.get("location", ""), {})
            at[offset] = max(at.get(offset, 0), length)
    stored = path.stat().st_size
    for location, lengths in ranges.items():
        try:  # only its size: where it may be read from is checked (and refused) when it is read
            target = folder / location
            size = target.stat().st_size if location and target.is_file() else 0
        except (OSError, ValueError):  # a NUL or an over-long name
            size = 0
        stored += min(sum(lengths.values()), size)  # overlapping ranges never count past the file
    check_expansion(path, stored, produced, max_bytes)


def _parse(mm: mmap.mmap | None, onnx: Any) -> tuple[Any, Payloads, str | None]:
    """(the ModelProto without its weights' bytes, where they lie, None) or (None, {}, why it is unreadable).
    A file our walker refuses (protobuf's deprecated groups, which it does not read) is parsed whole by onnx, as
    it was before the walker: the same tensors at the old cost (2x the weights)."""
    if mm is None:
        return onnx.ModelProto(), {}, None
    try:
        skeleton, payloads = _without_payloads(memoryview(mm))
    except ValueError:
        skeleton, payloads = bytes(mm), {}
    drop_mapped_pages(mm)  # the pages the skeleton was copied from
    try:
        return onnx.load_model_from_string(skeleton), payloads, None
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not a valid ModelProto
        return None, {}, type(exc).__name__


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ModelFormatError(f"{path}: needs the optional 'onnx' package: pip install hashdb[onnx]") from None
    size = path.stat().st_size
    check_size(path, size, max_bytes)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    try:
        model, payloads, failure = _parse(mm, onnx)
        if failure is not None:  # raised here, not in an except block: no traceback holds a view of the map
            raise ModelFormatError(f"{path}: not a readable ONNX model ({failure})")
        graph = model.graph
        folder = path.resolve().parent
        _check_expansion(path, model, folder, max_bytes)  # before anything is read: aliased external ranges
        consts = _constants(path, graph, folder, max_bytes, numpy_helper, mm, payloads)
    finally:
        close_map(mm)
    dequantized = _quantized(path, graph, consts)
    conv_weights = _conv_weights(graph)
    params = _quantization_params(graph)
    # a kxk Conv whose only reader is a 1x1 Conv is one linear map: hashed as that one kernel (docs/codec.md)
    composed_away = _compose(consts, _split_convs(graph, consts))
    norms = _batchnorms(graph, consts)
    out: list[NamedTensor] = []
    for name, arr in consts.items():  # in the file's order; integer constants only as their dequantized weights
        if name in composed_away:
            continue
        if name in dequantized:
            name, arr = dequantized[name]
        elif arr.dtype.kind != "f" or name in params:
            continue
        layout = "oihw" if name in conv_weights and arr.ndim >= 3 else None
        out.append(NamedTensor(_label(norms.get(name, name)), np.ascontiguousarray(arr, dtype=np.float32), layout))
    return out
