"""Core ML: ``.mlmodel`` specs and ``.mlpackage`` folders (``Data/com.apple.CoreML/model.mlmodel`` with its
``weights/weight.bin``), decoded with our own protobuf wire-format reader (no coremltools).

The spec is a ``Model`` message (Model.proto). Read from it:

- NeuralNetwork models (``neuralNetwork`` 500, ``neuralNetworkClassifier`` 403, ``neuralNetworkRegressor``
  303, also inside pipelines 200-202): each layer's ``convolution`` (100) and ``innerProduct`` (140)
  ``WeightParams``: ``floatValue`` (packed float32), ``float16Value``, ``rawValue`` holding float32 bytes, or
  quantized weights: ``rawValue``/``int8RawValue`` of n-bit values (1-8 bits, packed most significant bit
  first, as coremltools writes them) with ``linearQuantization`` (``scale * q + bias``, per tensor or per
  output channel) or ``lookupTableQuantization`` (palettized: ``table[q]``). Convolution weights are
  ``(outputChannels, kernelChannels, kH, kW)`` (deconvolution ``(kernelChannels, outputChannels / nGroups, kH,
  kW)``, torch's ConvTranspose order): OIHW, marked so. Inner products are ``(out, in)``.
- BatchNorm: a NeuralNetwork ``batchnorm`` layer (160: gamma, beta, mean, variance) and an ML Program's
  ``batch_norm`` op, named after the convolution whose output they read (``<conv weight>.bn.weight``,
  ``.bn.running_var``), so that codec v7 folds them into it (hashdb/codec/batchnorm.py); a ``batchnorm`` layer
  reading another layer (after an activation: not a fold) or computing its statistics at run time is skipped.
- ML Programs (``mlProgram`` 502, MIL): every ``const`` op's float ``val`` (an immediate tensor, or a
  ``blobFileValue`` in ``@model_path/weights/*.bin``) and the weights of compression ops, named by their
  output: ``constexpr_affine_dequantize`` (iOS 16: int8/uint8 ``(q - zero_point) * scale`` along ``axis``),
  ``constexpr_lut_to_dense`` (iOS 16 palettization: ``lut[index]``, n-bit indices packed least significant
  bit first) and ``constexpr_blockwise_shift_scale`` (iOS 18: int8/uint8 ``scale * (data - offset)``, per
  tensor, channel or block). A const that reaches a ``conv``, ``conv_transpose`` (``[C_in, C_out/groups,
  *k]``) or ``linear`` op's ``weight`` (through ``cast`` ops) is marked OIHW (MIL's ``[C_out, C_in/groups,
  *k]``). A weight made by another constexpr op (sparse compression, iOS 18 vector palettization, int4
  data) is refused in one line.

Blob files (BlobStorage v2): a 64-byte header (uint32 count, uint32 version = 2, reserved), then per blob a
64-byte metadata record at the offset the spec names (uint32 sentinel 0xDEADBEEF, uint32 data type, uint64
size in bytes, uint64 data offset, reserved) and the data. A blob must lie inside the spec's own folder,
hold exactly the bytes its tensor type declares and lie inside its file; it is memory-mapped.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ...errors import ModelFormatError
from . import NamedTensor, batchnorm_name, bf16_to_float32, check_size
from . import protowire as pw

_NEURAL_NETWORKS = (500, 403, 303)
_PIPELINES = (200, 201, 202)
ML_PROGRAM = 502
CONVOLUTION, INNER_PRODUCT, BATCHNORM = 100, 140, 160
# BatchnormLayerParams' gamma, beta, mean, variance (fields 15-18) and MIL batch_norm's inputs, by the role names
# PyTorch gives them (codec.batchnorm folds a BatchNorm named ``<conv weight>.bn.<role>`` into that conv)
_NORM_FIELDS = ((15, "weight"), (16, "bias"), (17, "running_mean"), (18, "running_var"))
_NORM_INPUTS = (("gamma", "weight"), ("beta", "bias"), ("mean", "running_mean"), ("variance", "running_var"))
# MIL DataType -> numpy dtype of the stored values
_MIL_DTYPES = {
    10: "<f2", 11: "<f4", 12: "<f8", 13: "<u2", 21: "i1", 22: "<i2", 23: "<i4", 31: "u1", 32: "<u2", 33: "<u4",
}  # fmt: skip
_MIL_BF16 = 13
# BlobStorage data type -> numpy dtype
_BLOB_DTYPES = {1: "<f2", 2: "<f4", 3: "u1", 4: "i1", 5: "<u2", 6: "<i2", 7: "<u2"}
BLOB_SENTINEL = 0xDEADBEEF
_WEIGHT_OPS = {"conv": "weight", "conv_transpose": "weight", "linear": "weight"}
MAX_DEPTH = 16


def _first(msg: dict[int, list[int | memoryview]], number: int) -> memoryview:
    return pw.as_bytes(msg[number][-1]) if number in msg else memoryview(b"")


def _int(msg: dict[int, list[int | memoryview]], number: int, default: int = 0) -> int:
    return pw.as_int(msg[number][-1]) if number in msg else default


def unpack_bits(raw: memoryview | bytes, nbits: int, count: int) -> np.ndarray:
    """``count`` unsigned ``nbits``-bit values packed most significant bit first (coremltools' order)."""
    data = np.frombuffer(raw, dtype=np.uint8)
    if nbits == 8:
        if data.size < count:
            raise ValueError(f"{data.size} bytes hold fewer than {count} 8-bit values")
        return data[:count]
    if data.size * 8 < count * nbits:
        raise ValueError(f"{data.size} bytes hold fewer than {count} {nbits}-bit values")
    bits = np.unpackbits(data)[: count * nbits].reshape(count, nbits)
    return bits @ (1 << np.arange(nbits - 1, -1, -1)).astype(np.uint8)  # at most 7 bits: no overflow


def _weight_params(raw: memoryview, shape: tuple[int, ...], channel_axis: int) -> np.ndarray | None:
    """A WeightParams message as a float32 array of ``shape`` (None when it holds no values)."""
    msg = pw.message(raw)
    n = math.prod(shape)
    if 1 in msg:
        values = pw.packed_array(msg[1], "<f4")
    elif 2 in msg:
        values = np.frombuffer(_first(msg, 2), dtype="<f2")
    elif 40 in msg:
        return _quantized(msg, shape, channel_axis)
    elif 30 in msg:  # float32 bytes
        if len(_first(msg, 30)) % 4:
            raise ValueError(f"raw weights of {len(_first(msg, 30))} bytes are not float32 values")
        values = np.frombuffer(_first(msg, 30), dtype="<f4")
    else:
        return None
    if values.size == 0:
        return None
    if values.size != n:
        raise ValueError(f"{values.size} weight values do not fill a {shape} tensor")
    return values.astype(np.float32, copy=False).reshape(shape)


def _quantized(msg: dict[int, list[int | memoryview]], shape: tuple[int, ...], channel_axis: int) -> np.ndarray:
    quant = pw.message(_first(msg, 40))
    nbits = _int(quant, 1)
    n = math.prod(shape)
    if not 1 <= nbits <= 8:
        raise ValueError(f"{nbits}-bit quantized weights are not supported")
    if 31 in msg and nbits == 8:  # int8RawValue: signed bytes
        raw = np.frombuffer(_first(msg, 31), dtype=np.int8)
        if raw.size != n:
            raise ValueError(f"{raw.size} int8 values do not fill a {shape} tensor")
        q = raw.astype(np.float32)
    else:
        q = unpack_bits(_first(msg, 30), nbits, n).astype(np.float32)
    if 101 in quant:
        linear = pw.message(_first(quant, 101))
        scale = pw.packed_array(linear.get(1, []), "<f4").astype(np.float32)
        bias = pw.packed_array(linear.get(2, []), "<f4").astype(np.float32)
        w = q.reshape(shape)
        for param, is_scale in ((scale, True), (bias, False)):
            if param.size > 1:
                if param.size != shape[channel_axis]:
                    raise ValueError(f"{param.size} quantization parameters for {shape[channel_axis]} channels")
                column = [1] * len(shape)
                column[channel_axis] = param.size
                param = param.reshape(column)
            elif param.size == 0:
                continue
            w = w * param if is_scale else w + param
        return np.ascontiguousarray(w, dtype=np.float32)
    if 102 in quant:
        table = pw.packed_array(pw.message(_first(quant, 102)).get(1, []), "<f4").astype(np.float32)
        if table.size != 1 << nbits:
            raise ValueError(f"a lookup table of {table.size} values for {nbits}-bit indices")
        return table[q.astype(np.int64)].reshape(shape)
    raise ValueError("quantized weights without linear or lookup-table parameters")


def _neural_network(path: Path, msg: dict[int, list[int | memoryview]], out: list[NamedTensor], max_bytes: int) -> None:
    used = 0
    conv_of: dict[str, str] = {}  # a convolution layer's output blob -> its weight tensor's name
    for i, raw_layer in enumerate(msg.get(1, [])):
        layer = pw.message(pw.as_bytes(raw_layer))
        name = pw.text(layer[1][-1]) if 1 in layer else f"layer_{i}"
        if BATCHNORM in layer:
            bn = pw.message(_first(layer, BATCHNORM))
            source = pw.text(layer[2][0]) if 2 in layer else ""
            # only one reading a convolution folds into it; statistics computed at run time (or instance norm):
            # nothing to fold
            if source not in conv_of or _int(bn, 5) or _int(bn, 6):
                continue
            channels = _int(bn, 1)
            used += 4 * 4 * channels
            check_size(path, used, max_bytes)
            for number, role in _NORM_FIELDS:
                values = _weight_params(_first(bn, number), (channels,), 0) if number in bn else None
                if values is not None:  # named after the convolution it reads: ``conv1.weight.bn.running_var``
                    out.append(NamedTensor(batchnorm_name(conv_of[source], role), values))
        elif CONVOLUTION in layer:
            conv = pw.message(_first(layer, CONVOLUTION))
            out_ch, k_ch, groups = _int(conv, 1), _int(conv, 2), max(_int(conv, 10, 1), 1)
            kernel = tuple(pw.varints(conv.get(20, []))) or (3, 3)
            deconv = bool(_int(conv, 60))
            # a BatchNorm reading a convolution's output folds into it; a deconvolution's rows are its inputs
            if not deconv and 3 in layer:
                conv_of[pw.text(layer[3][0])] = f"{name}.weight"
            shape = (k_ch, out_ch // groups, *kernel) if deconv else (out_ch, k_ch, *kernel)
            used += 4 * (math.prod(shape) + out_ch)  # before decoding: n-bit weights expand up to 32x
            check_size(path, used, max_bytes)
            weights = _weight_params(_first(conv, 90), shape, 1 if deconv else 0) if 90 in conv else None
            if weights is not None:
                out.append(NamedTensor(f"{name}.weight", weights, "oihw"))
            bias = _weight_params(_first(conv, 91), (out_ch,), 0) if 91 in conv else None
            if bias is not None:
                out.append(NamedTensor(f"{name}.bias", bias))
        elif INNER_PRODUCT in layer:
            fc = pw.message(_first(layer, INNER_PRODUCT))
            n_in, n_out = _int(fc, 1), _int(fc, 2)
            used += 4 * (n_in * n_out + n_out)
            check_size(path, used, max_bytes)
            weights = _weight_params(_first(fc, 20), (n_out, n_in), 0) if 20 in fc else None
            if weights is not None:
                out.append(NamedTensor(f"{name}.weight", weights, "oihw"))
            bias = _weight_params(_first(fc, 21), (n_out,), 0) if 21 in fc else None
            if bias is not None:
                out.append(NamedTensor(f"{name}.bias", bias))


class _Program:
    """The const tensors of an ML Program, blobs memory-mapped from files inside the spec's folder."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.folder = path.resolve().parent
        self.max_bytes = max_bytes
        self.used = 0
        self.tensors: dict[str, np.ndarray] = {}
        self.ints: dict[str, np.ndarray] = {}  # integer consts: the data, offsets of blockwise quantization
        self.params: set[str] = set()  # consts that are quantization scales/offsets, not weights
        self.decoded: set[tuple[str, str]] = set()  # (constexpr op, output) decoded into tensors
        self.producers: dict[str, tuple[str, dict[str, str]]] = {}  # output -> (op type, input bindings)
        self.weights: set[str] = set()
        self.norms: list[dict[str, str]] = []  # the input bindings of every batch_norm op

    def blob(self, file_name: str, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        if not file_name.startswith("@model_path/"):
            raise ValueError(f"blob file {file_name!r} is not under @model_path")
        target = (self.folder / file_name[len("@model_path/") :]).resolve()
        if not target.is_relative_to(self.folder) or not target.is_file():
            raise ValueError(f"blob file {file_name!r} is missing or lies outside the model's folder")
        size = target.stat().st_size
        if offset < 64 or offset + 64 > size:
            raise ValueError(f"blob metadata at {offset} lies outside {file_name!r}")
        with open(target, "rb") as f:
            f.seek(offset)
            meta = f.read(64)
        sentinel, blob_type, nbytes, data_offset = (int.from_bytes(meta[a:b], "little") for a, b in
                                                    ((0, 4), (4, 8), (8, 16), (16, 24)))  # fmt: skip
        if sentinel != BLOB_SENTINEL:
            raise ValueError(f"no blob at offset {offset} of {file_name!r} (bad sentinel)")
        stored = _BLOB_DTYPES.get(blob_type)
        if stored is None or np.dtype(stored).itemsize != np.dtype(dtype).itemsize:
            raise ValueError(f"blob at {offset} of {file_name!r} has data type {blob_type}, not its tensor's")
        if nbytes != math.prod(shape) * np.dtype(dtype).itemsize or data_offset + nbytes > size:
            raise ValueError(f"blob at {offset} of {file_name!r}: {nbytes} bytes at {data_offset} do not hold {shape}")
        if nbytes == 0:
            return np.zeros(shape, dtype=dtype)
        return np.asarray(np.memmap(target, dtype=dtype, mode="r", offset=data_offset, shape=(math.prod(shape),)))

    def value(self, raw: memoryview) -> np.ndarray | None:
        """A MIL Value holding a tensor, as stored (floats decoded, integers kept); None for other values."""
        val = pw.message(raw)
        vtype = pw.message(_first(val, 2))
        if 1 not in vtype:
            return None
        ttype = pw.message(_first(vtype, 1))
        data_type = _int(ttype, 1)
        shape_list = []
        for raw_dim in ttype.get(3, []):
            dim = pw.message(pw.as_bytes(raw_dim))
            if 1 not in dim:
                raise ValueError("a const tensor of unknown shape")
            shape_list.append(_int(pw.message(_first(dim, 1)), 1))
        shape = tuple(shape_list)
        dtype = _MIL_DTYPES.get(data_type)
        if dtype is None:
            return None
        count = math.prod(shape)
        self.used += count * 4
        check_size(self.path, self.used, self.max_bytes)
        if 5 in val:
            blob = pw.message(_first(val, 5))
            arr = self.blob(pw.text(blob[1][-1]) if 1 in blob else "", _int(blob, 2), dtype, shape)
        elif 3 in val:
            immediate = pw.message(_first(val, 3))
            if 1 not in immediate:
                return None
            tensor = pw.message(_first(immediate, 1))
            if 1 in tensor:
                arr = pw.packed_array(pw.message(_first(tensor, 1)).get(1, []), "<f4")
            elif 6 in tensor:
                arr = pw.packed_array(pw.message(_first(tensor, 6)).get(1, []), "<f8")
            elif 7 in tensor:
                arr = np.frombuffer(_first(pw.message(_first(tensor, 7)), 1), dtype=dtype)
            elif 2 in tensor:  # ints (int32 varints): zero points, shapes
                arr = np.array([pw.signed(v, 32) for v in pw.varints(pw.message(_first(tensor, 2)).get(1, []))])
            else:
                return None
        else:
            return None
        if arr.size != count:
            raise ValueError(f"a const of {arr.size} values for shape {shape}")
        arr = arr.reshape(shape)
        if data_type == _MIL_BF16:
            return bf16_to_float32(arr)
        return arr.astype(np.float32, copy=False) if arr.dtype.kind == "f" else arr

    def block(self, raw: memoryview, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise ValueError("blocks nested too deep")
        for raw_op in pw.message(raw).get(3, []):
            op = pw.message(pw.as_bytes(raw_op))
            op_type = pw.text(op[1][-1]) if 1 in op else ""
            outputs = [pw.text(pw.message(pw.as_bytes(o)).get(1, [memoryview(b"")])[-1]) for o in op.get(3, [])]
            inputs: dict[str, str] = {}
            for entry in op.get(2, []):
                kv = pw.message(pw.as_bytes(entry))
                bindings = pw.message(_first(kv, 2)).get(1, [])
                names = [pw.message(pw.as_bytes(b)) for b in bindings]
                if names and 1 in names[0]:
                    inputs[pw.text(_first(kv, 1))] = pw.text(names[0][1][-1])
            attrs = {}
            for entry in op.get(5, []):
                kv = pw.message(pw.as_bytes(entry))
                attrs[pw.text(_first(kv, 1))] = _first(kv, 2)
            if outputs:
                self.producers[outputs[0]] = (op_type, inputs)
            if op_type == "const" and outputs and "val" in attrs:
                arr = self.value(attrs["val"])
                if arr is not None and arr.dtype.kind == "f":
                    self.tensors[outputs[0]] = arr
                elif arr is not None and arr.dtype.kind in "iu":
                    self.ints[outputs[0]] = arr
            elif op_type == "constexpr_affine_dequantize" and outputs:
                self.tensors[outputs[0]] = self.affine(attrs)
            elif op_type == "constexpr_lut_to_dense" and outputs and "lut" in attrs:  # iOS 16 (attributes)
                self.tensors[outputs[0]] = self.lut(attrs)
            elif op_type == "constexpr_blockwise_shift_scale" and outputs:
                self.tensors[outputs[0]] = self.blockwise(inputs)
                self.params.update(inputs[k] for k in ("scale", "offset") if k in inputs)
            if op_type.startswith("constexpr_") and outputs and outputs[0] in self.tensors:
                self.decoded.add((op_type, outputs[0]))
            if op_type in _WEIGHT_OPS and _WEIGHT_OPS[op_type] in inputs:
                self.weights.add(self.source(inputs[_WEIGHT_OPS[op_type]]))
            if op_type == "batch_norm" and "x" in inputs:
                self.norms.append(inputs)
            for nested in op.get(4, []):
                self.block(pw.as_bytes(nested), depth + 1)

    def affine(self, attrs: dict[str, memoryview]) -> np.ndarray:
        q, zero, scale = (
            self.value(attrs[k]) if k in attrs else None for k in ("quantized_data", "zero_point", "scale")
        )
        axis_value = self.value(attrs["axis"]) if "axis" in attrs else None
        axis = int(axis_value.reshape(-1)[0]) if axis_value is not None and axis_value.size else 0
        if q is None or scale is None or q.dtype.kind not in "iu":
            raise ValueError("constexpr_affine_dequantize without integer data and a scale")
        w = q.astype(np.float32)
        ax = axis + q.ndim if axis < 0 else axis
        for param, is_scale in ((zero, False), (scale, True)):
            if param is None or param.size == 0:
                continue
            p: np.ndarray = param.astype(np.float32).reshape(-1)
            if p.size > 1:
                if not 0 <= ax < q.ndim or p.size != q.shape[ax]:
                    raise ValueError(
                        f"affine dequantization parameters of {p.size} values for axis {axis} of {q.shape}"
                    )
                column = [1] * q.ndim
                column[ax] = p.size
                p = p.reshape(column)
            else:
                p = p.reshape(())
            w = w * p if is_scale else w - p
        return w

    def lut(self, attrs: dict[str, memoryview]) -> np.ndarray:
        """iOS 16 palettization: ``lut[index]`` for n-bit indices packed least significant bit first (the
        op's specification: bit fields filled from each byte's LSB upward, an index may span two bytes)."""
        lut, indices, shape = (self.value(attrs[k]) if k in attrs else None for k in ("lut", "indices", "shape"))
        if lut is None or indices is None or shape is None or lut.dtype.kind != "f" or indices.dtype != np.uint8:
            raise ValueError("constexpr_lut_to_dense without a float table, uint8 indices and a shape")
        nbits = int(lut.size).bit_length() - 1
        if lut.ndim != 1 or lut.size != 1 << nbits or not 1 <= nbits <= 8:
            raise ValueError(f"a lookup table of {lut.size} values is not 2^n for n in 1..8")
        dims = tuple(int(d) for d in shape.reshape(-1))
        count = math.prod(dims)
        self.used += count * 4
        check_size(self.path, self.used, self.max_bytes)
        if indices.size * 8 < count * nbits:
            raise ValueError(f"{indices.size} index bytes hold fewer than {count} {nbits}-bit indices")
        bits = np.unpackbits(indices.reshape(-1), bitorder="little")[: count * nbits].reshape(count, nbits)
        index = bits.astype(np.uint16) @ (1 << np.arange(nbits, dtype=np.uint16))
        return lut[index].reshape(dims)

    def blockwise(self, inputs: dict[str, str]) -> np.ndarray:
        """iOS 18 ``scale * (data - offset)``: scale and offset have the data's rank, each dim dividing the
        data's (a block of data elements shares one scale)."""
        data = self.ints.get(inputs.get("data", ""))
        scale = self.tensors.get(inputs.get("scale", ""))
        if data is None or scale is None:
            raise ValueError("constexpr_blockwise_shift_scale without int8/uint8 data and a float scale")
        offset_name = inputs.get("offset", "")
        offset = self.ints.get(offset_name, self.tensors.get(offset_name))
        if (
            scale.ndim != data.ndim
            or any(s == 0 or d % s for d, s in zip(data.shape, scale.shape, strict=True))
            or (offset is not None and offset.shape != scale.shape)
        ):
            raise ValueError(f"blockwise scale {scale.shape} / offset does not divide data {data.shape}")
        blocked = [x for d, s in zip(data.shape, scale.shape, strict=True) for x in (s, d // s)]

        def per_block(param: np.ndarray) -> np.ndarray:
            return param.astype(np.float32).reshape([x for s in param.shape for x in (s, 1)])

        w = data.astype(np.float32).reshape(blocked)
        if offset is not None:
            w = w - per_block(offset)
        return (w * per_block(scale)).reshape(data.shape)

    def batchnorms(self) -> dict[str, str]:
        """New names for the consts of each batch_norm op that reads a conv's output: ``<conv weight>.bn.weight``
        ... ``.bn.running_var``, so that codec v7 folds it into that conv (hashdb/codec/batchnorm.py)."""
        renamed: dict[str, str] = {}
        for inputs in self.norms:
            producer = self.producers.get(inputs["x"])
            if producer is None or producer[0] != "conv" or "weight" not in producer[1]:
                continue
            weight = self.uncast(producer[1]["weight"])
            for key, role in _NORM_INPUTS:
                if key in inputs:
                    renamed.setdefault(self.uncast(inputs[key]), batchnorm_name(weight, role))
        return renamed

    def uncast(self, name: str) -> str:
        """The tensor ``name`` is a cast of (through up to 8 ``cast`` ops), else ``name``."""
        for _ in range(8):
            producer = self.producers.get(name)
            if producer is None or producer[0] != "cast" or "x" not in producer[1]:
                break
            name = producer[1]["x"]
        return name

    def source(self, name: str) -> str:
        """The const a weight input reads (``uncast``); a weight another constexpr op makes is refused."""
        name = self.uncast(name)
        producer = self.producers.get(name)
        if producer is not None and producer[0].startswith("constexpr_") and (producer[0], name) not in self.decoded:
            raise ValueError(f"weight {name!r} is compressed with {producer[0]}: not supported")
        return name


def _program(path: Path, raw: memoryview, max_bytes: int, out: list[NamedTensor]) -> None:
    program = _Program(path, max_bytes)
    for entry in pw.message(raw).get(2, []):  # functions: map<string, Function>
        function = pw.message(_first(pw.message(pw.as_bytes(entry)), 2))
        for spec in function.get(3, []):  # block_specializations: map<string, Block>
            program.block(_first(pw.message(pw.as_bytes(spec)), 2), 0)
    norms = program.batchnorms()
    for name, arr in program.tensors.items():
        if arr.size and name not in program.params:  # a blockwise scale has its weight's rank: not a kernel
            layout = "oihw" if name in program.weights and arr.ndim >= 2 else None
            out.append(NamedTensor(norms.get(name, name), np.ascontiguousarray(arr, dtype=np.float32), layout))


def _model(path: Path, raw: memoryview, max_bytes: int, out: list[NamedTensor], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("pipelines nested too deep")
    model = pw.message(raw)
    for number in _NEURAL_NETWORKS:
        if number in model:
            _neural_network(path, pw.message(_first(model, number)), out, max_bytes)
    if ML_PROGRAM in model:
        _program(path, _first(model, ML_PROGRAM), max_bytes, out)
    for number in _PIPELINES:
        if number in model:
            pipeline = pw.message(_first(model, number))
            if number != 202:  # PipelineClassifier/Regressor wrap a Pipeline (field 1)
                pipeline = pw.message(_first(pipeline, 1))
            for sub in pipeline.get(1, []):
                _model(path, pw.as_bytes(sub), max_bytes, out, depth + 1)


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    check_size(path, path.stat().st_size, max_bytes)
    out: list[NamedTensor] = []
    try:
        with open(path, "rb") as f:
            raw = memoryview(f.read())
        _model(path, raw, max_bytes, out, 0)
    except ValueError as exc:
        raise ModelFormatError(f"{path}: not a readable Core ML model ({exc})") from None
    return out
