"""TensorFlow Lite flatbuffers: fixtures written with the flatbuffers Builder following schema.fbs, checked
against the LiteRT interpreter (ai-edge-litert): it accepts them and computes what our OIHW weights compute."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashdb.codec import ModelHasher, load_tensors
from hashdb.codec.readers import tflite
from hashdb.errors import ModelFormatError

FLOAT32, FLOAT16, INT32, UINT8, INT8, INT4 = 0, 1, 2, 3, 9, 17
CONV_2D, DEPTHWISE_CONV_2D, DEQUANTIZE, FULLY_CONNECTED, RESHAPE, TRANSPOSE_CONV = 3, 4, 6, 9, 22, 67
CONV_OPTIONS, DEPTHWISE_OPTIONS, FC_OPTIONS, TRANSPOSE_CONV_OPTIONS = 1, 2, 8, 49  # BuiltinOptions union tags
VALID = 1


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    ttype: int
    buffer: int = 0
    scale: list[float] | None = None
    zero_point: list[int] | None = None
    qdim: int = 0
    sparse: bool = False
    custom_quant: bool = False


@dataclass
class TFLiteModel:
    """One subgraph; buffer 0 is the empty sentinel. ``external`` buffers go past the flatbuffer (offset/size)."""

    tensors: list[Tensor] = field(default_factory=list)
    buffers: list[bytes] = field(default_factory=lambda: [b""])
    external: set[int] = field(default_factory=set)
    ops: list[tuple[int, list[int], list[int], int, dict[int, tuple[str, int]]]] = field(default_factory=list)

    def tensor(self, name: str, shape: tuple[int, ...], ttype: int = FLOAT32, data: bytes | None = None,
               external: bool = False, **quant: object) -> int:  # fmt: skip
        buffer = 0
        if data is not None:
            self.buffers.append(data)
            buffer = len(self.buffers) - 1
            if external:
                self.external.add(buffer)
        self.tensors.append(Tensor(name, tuple(shape), ttype, buffer, **quant))  # type: ignore[arg-type]
        return len(self.tensors) - 1

    def const(self, name: str, arr: np.ndarray, **kw: object) -> int:
        types = {np.float32: FLOAT32, np.float16: FLOAT16, np.int8: INT8, np.uint8: UINT8, np.int32: INT32}
        ttype = types[arr.dtype.type]
        return self.tensor(name, arr.shape, ttype, np.ascontiguousarray(arr).tobytes(), **kw)  # type: ignore[arg-type]

    def op(self, code: int, inputs: list[int], outputs: list[int], options: int = 0,
           fields: dict[int, tuple[str, int]] | None = None) -> None:  # fmt: skip
        self.ops.append((code, inputs, outputs, options, fields or {}))

    def to_bytes(self, inputs: list[int], outputs: list[int]) -> bytes:
        first = self._build(inputs, outputs, {b: 2 for b in self.external})
        if not self.external:
            return first
        offsets, pos = {}, (len(first) + 64 + 15) // 16 * 16  # the rebuilt flatbuffer is as long: same fields
        for b in sorted(self.external):
            offsets[b] = pos
            pos = (pos + len(self.buffers[b]) + 15) // 16 * 16
        fb = bytearray(self._build(inputs, outputs, offsets))
        assert len(fb) <= min(offsets.values())
        for b, at in offsets.items():
            fb.extend(b"\0" * (at - len(fb)))
            fb.extend(self.buffers[b])
        return bytes(fb)

    def _build(self, inputs: list[int], outputs: list[int], offsets: dict[int, int]) -> bytes:
        b = flatbuffers.Builder(1024)

        def ints(values: list[int], size: int = 4) -> int:
            b.StartVector(size, len(values), size)
            for v in reversed(values):
                (b.PrependInt32 if size == 4 else b.PrependInt64)(v)
            return b.EndVector()

        def floats(values: list[float]) -> int:
            b.StartVector(4, len(values), 4)
            for v in reversed(values):
                b.PrependFloat32(v)
            return b.EndVector()

        def offsets_vector(items: list[int]) -> int:
            b.StartVector(4, len(items), 4)
            for item in reversed(items):
                b.PrependUOffsetTRelative(item)
            return b.EndVector()

        buffers = []
        for i, data in enumerate(self.buffers):
            vec = None
            if data and i not in offsets:
                b.StartVector(1, len(data), 16)  # schema: data:[ubyte] (force_align: 16)
                b.head -= len(data)
                b.Bytes[b.head : b.head + len(data)] = data
                vec = b.EndVector()
            b.StartObject(3)
            if vec is not None:
                b.PrependUOffsetTRelativeSlot(0, vec, 0)
            if i in offsets:
                b.PrependUint64Slot(1, offsets[i], 0)
                b.PrependUint64Slot(2, len(data), 0)
            buffers.append(b.EndObject())
        tensors = []
        for t in self.tensors:
            shape, name = ints(list(t.shape)), b.CreateString(t.name)
            quant = sparsity = None
            if t.scale is not None or t.custom_quant:
                scale = floats(t.scale or [1.0])
                zero = ints(t.zero_point or [0] * len(t.scale or [1.0]), 8)
                custom = None
                if t.custom_quant:
                    b.StartObject(1)
                    custom = b.EndObject()
                b.StartObject(7)
                b.PrependUOffsetTRelativeSlot(2, scale, 0)
                b.PrependUOffsetTRelativeSlot(3, zero, 0)
                if custom is not None:
                    b.PrependUint8Slot(4, 1, 0)  # QuantizationDetails.CustomQuantization
                    b.PrependUOffsetTRelativeSlot(5, custom, 0)
                b.PrependInt32Slot(6, t.qdim, 0)
                quant = b.EndObject()
            if t.sparse:
                order = ints(list(range(len(t.shape))))
                b.StartObject(3)
                b.PrependUOffsetTRelativeSlot(0, order, 0)
                sparsity = b.EndObject()
            b.StartObject(11)
            b.PrependUOffsetTRelativeSlot(0, shape, 0)
            b.PrependInt8Slot(1, t.ttype, 0)
            b.PrependUint32Slot(2, t.buffer, 0)
            b.PrependUOffsetTRelativeSlot(3, name, 0)
            if quant is not None:
                b.PrependUOffsetTRelativeSlot(4, quant, 0)
            if sparsity is not None:
                b.PrependUOffsetTRelativeSlot(6, sparsity, 0)
            tensors.append(b.EndObject())
        codes = sorted({op[0] for op in self.ops})
        ops = []
        for code, ins, outs, opt_type, fields in self.ops:
            vin, vout = ints(ins), ints(outs)
            options = None
            if opt_type:
                b.StartObject(8)
                for slot, (kind, value) in fields.items():
                    (b.PrependInt8Slot if kind == "b" else b.PrependInt32Slot)(slot, value, 0)
                options = b.EndObject()
            b.StartObject(14)
            b.PrependUint32Slot(0, codes.index(code), 0)
            b.PrependUOffsetTRelativeSlot(1, vin, 0)
            b.PrependUOffsetTRelativeSlot(2, vout, 0)
            if options is not None:
                b.PrependUint8Slot(3, opt_type, 0)
                b.PrependUOffsetTRelativeSlot(4, options, 0)
            ops.append(b.EndObject())
        vt, vi, vo, vops, gname = offsets_vector(tensors), ints(inputs), ints(outputs), offsets_vector(ops), 0
        gname = b.CreateString("main")
        b.StartObject(6)
        b.PrependUOffsetTRelativeSlot(0, vt, 0)
        b.PrependUOffsetTRelativeSlot(1, vi, 0)
        b.PrependUOffsetTRelativeSlot(2, vo, 0)
        b.PrependUOffsetTRelativeSlot(3, vops, 0)
        b.PrependUOffsetTRelativeSlot(4, gname, 0)
        subgraph = b.EndObject()
        opcodes = []
        for code in codes:
            b.StartObject(4)
            b.PrependInt8Slot(0, min(code, 127), 0)
            b.PrependInt32Slot(2, 1, 1)
            b.PrependInt32Slot(3, code, 0)
            opcodes.append(b.EndObject())
        vcodes, vgraphs, vbuffers = offsets_vector(opcodes), offsets_vector([subgraph]), offsets_vector(buffers)
        desc = b.CreateString("hashdb test fixture")
        b.StartObject(8)
        b.PrependUint32Slot(0, 3, 0)
        b.PrependUOffsetTRelativeSlot(1, vcodes, 0)
        b.PrependUOffsetTRelativeSlot(2, vgraphs, 0)
        b.PrependUOffsetTRelativeSlot(3, desc, 0)
        b.PrependUOffsetTRelativeSlot(4, vbuffers, 0)
        b.Finish(b.EndObject(), file_identifier=b"TFL3")
        return bytes(b.Output())


CONV_FIELDS = {0: ("b", VALID), 1: ("i", 1), 2: ("i", 1)}  # padding, stride_w, stride_h


def add_weight(m: TFLiteModel, name: str, w: np.ndarray, form: str, qaxis: int) -> int:
    """A weight tensor (already in TFLite layout) stored as ``form``: f32; f16 behind a DEQUANTIZE op; int8
    per-channel along ``qaxis`` behind DEQUANTIZE; hybrid: the int8 tensor fed to the float op directly."""
    if form == "f32":
        return m.const(f"{name}/w", w)
    if form == "f16":
        stored = m.const(f"{name}/w_fp16", w.astype(np.float16))
    else:
        q, scale, zero = quantize_per_channel(w, axis=qaxis)
        stored = m.const(f"{name}/w_int8", q, scale=list(scale), zero_point=list(zero), qdim=qaxis)
        if form == "hybrid":
            return stored
    out = m.tensor(f"{name}/w", w.shape)
    m.op(DEQUANTIZE, [stored], [out])
    return out


def add_conv(m: TFLiteModel, x: int, hw: int, w_oihw: np.ndarray, form: str = "f32", name: str = "conv") -> int:
    """CONV_2D (VALID, stride 1) of the NHWC tensor ``x`` with OIHW weights stored OHWI as ``form``."""
    o, i, kh, kw = w_oihw.shape
    wt = add_weight(m, name, np.ascontiguousarray(w_oihw.transpose(0, 2, 3, 1)), form, 0)
    bias = m.const(f"{name}/b", np.zeros(o, np.float32))
    y = m.tensor(f"{name}/out", (1, hw - kh + 1, hw - kw + 1, o))
    m.op(CONV_2D, [x, wt, bias], [y], CONV_OPTIONS, CONV_FIELDS)
    return y


def quantize_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric int8 per-channel quantization as the TFLite converter does it (zero point 0)."""
    red = tuple(d for d in range(w.ndim) if d != axis)
    scale = (np.abs(w).max(axis=red) / 127.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale, np.zeros(len(scale), np.int64)


def dequantized(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * q.ndim
    shape[axis] = -1
    return (q.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.reshape(shape)


def torch_layout(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "c0.weight": rng.normal(size=(16, 3, 3, 3)).astype(np.float32),
        "dw.weight": rng.normal(size=(32, 1, 3, 3)).astype(np.float32),  # 16 channels x multiplier 2
        "c2.weight": rng.normal(size=(32, 32, 3, 3)).astype(np.float32),
        "fc.weight": rng.normal(size=(10, 32)).astype(np.float32),
    }


def cnn_model(sd: dict[str, np.ndarray], form: str = "f32") -> TFLiteModel:
    """input 14x14x3 -> conv -> depthwise (x2) -> conv -> flatten-free FC on the 8x8x32 map's first pixel."""
    m = TFLiteModel()
    x = m.tensor("input", (1, 14, 14, 3))
    y = add_conv(m, x, 14, sd["c0.weight"], form, "c0")
    dw = np.ascontiguousarray(sd["dw.weight"].transpose(1, 2, 3, 0))  # (C*M, 1, H, W) -> (1, H, W, C*M)
    dwt = add_weight(m, "dw", dw, form, 3)
    z = m.tensor("dw/out", (1, 10, 10, 32))
    m.op(DEPTHWISE_CONV_2D, [y, dwt, m.const("dw/b", np.zeros(32, np.float32))], [z], DEPTHWISE_OPTIONS,
         {0: ("b", VALID), 1: ("i", 1), 2: ("i", 1), 3: ("i", 2)})  # fmt: skip
    u = add_conv(m, z, 10, sd["c2.weight"], form, "c2")
    fc = m.const("fc/w", sd["fc.weight"])
    out = m.tensor("logits", (64, 10))
    flat = m.tensor("flat", (64, 32))
    m.op(RESHAPE, [u, m.const("shape", np.array([64, 32], np.int32))], [flat])  # an int constant: not a weight
    m.op(FULLY_CONNECTED, [flat, fc, -1], [out], FC_OPTIONS, {})
    m.inputs, m.outputs = [x], [out]  # type: ignore[attr-defined]
    return m


def save(m: TFLiteModel, path: Path, inputs: list[int] | None = None, outputs: list[int] | None = None) -> Path:
    path.write_bytes(m.to_bytes(inputs or m.inputs, outputs or m.outputs))  # type: ignore[attr-defined]
    return path


@pytest.fixture(scope="module")
def hasher() -> ModelHasher:
    return ModelHasher(bits=256, include_linear=True)


def hamming(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


# ---------------------------------------------------------------- layouts and codes


def test_float_model_reads_ohwi_depthwise_and_fc_as_torch_layout(tmp_path: Path, hasher) -> None:
    sd = torch_layout(0)
    p = save(cnn_model(sd), tmp_path / "m.tflite")
    got = {t.name: t for t in load_tensors(p)}
    assert set(got) == {"c0/w", "dw/w", "c2/w", "fc/w"}  # biases and the reshape's shape are not weights
    for name, key in [("c0/w", "c0.weight"), ("dw/w", "dw.weight"), ("c2/w", "c2.weight"), ("fc/w", "fc.weight")]:
        np.testing.assert_array_equal(got[name].array, sd[key])
        assert got[name].layout == "oihw"
    assert hasher.hash(p) == hasher.hash(sd)


def test_fp16_behind_dequantize_gives_the_code_of_the_rounded_weights(tmp_path: Path, hasher) -> None:
    sd = torch_layout(1)
    p = save(cnn_model(sd, "f16"), tmp_path / "f16.tflite")
    rounded = {k: (v.astype(np.float16).astype(np.float32) if k != "fc.weight" else v) for k, v in sd.items()}
    got = {t.name: t.array for t in load_tensors(p)}
    np.testing.assert_array_equal(got["c0/w_fp16"], rounded["c0.weight"])
    assert hasher.hash(p) == hasher.hash(rounded)


def test_int8_per_channel_dequantizes_and_stays_within_copy_radius(tmp_path: Path, hasher) -> None:
    sd = torch_layout(2)
    p = save(cnn_model(sd, "int8"), tmp_path / "int8.tflite")
    got = {t.name: t.array for t in load_tensors(p)}
    ohwi = sd["c0.weight"].transpose(0, 2, 3, 1)
    q, scale, zero = quantize_per_channel(ohwi, 0)
    np.testing.assert_array_equal(got["c0/w_int8"], dequantized(q, scale, zero, 0).transpose(0, 3, 1, 2))
    dw = sd["dw.weight"].transpose(1, 2, 3, 0)
    q, scale, zero = quantize_per_channel(dw, 3)
    np.testing.assert_array_equal(got["dw/w_int8"], dequantized(q, scale, zero, 3).transpose(3, 0, 1, 2))
    exact = {"c0.weight": got["c0/w_int8"], "dw.weight": got["dw/w_int8"], "c2.weight": got["c2/w_int8"],
             "fc.weight": sd["fc.weight"]}  # fmt: skip
    assert hasher.hash(p) == hasher.hash(exact)
    assert hamming(hasher.hash(p), hasher.hash(sd)) <= hasher.copy_radius
    other = hasher.hash(save(cnn_model(torch_layout(50)), tmp_path / "other.tflite"))
    assert hamming(hasher.hash(p), other) > hasher.copy_radius


def test_uint8_per_tensor_with_zero_point(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    q = rng.integers(0, 256, size=(8, 3, 3, 4)).astype(np.uint8)
    m = TFLiteModel()
    x = m.tensor("in", (1, 5, 5, 4))
    w = m.const("w", q, scale=[0.05], zero_point=[128])
    y = m.tensor("out", (1, 3, 3, 8))
    m.op(CONV_2D, [x, w, -1], [y], CONV_OPTIONS, CONV_FIELDS)
    (t,) = load_tensors(save(m, tmp_path / "u8.tflite", [x], [y]))
    expected = ((q.astype(np.float32) - 128) * np.float32(0.05)).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(t.array, expected)


def test_buffers_past_the_flatbuffer_read_like_inline_ones(tmp_path: Path, hasher) -> None:
    sd = torch_layout(4)
    m = cnn_model(sd)
    m.external = set(range(1, len(m.buffers)))
    p = save(m, tmp_path / "ext.tflite")
    assert p.stat().st_size > sum(len(b) for b in m.buffers)
    got = {t.name: t.array for t in load_tensors(p)}
    np.testing.assert_array_equal(got["c2/w"], sd["c2.weight"])
    assert hasher.hash(p) == hasher.hash(sd)


def test_the_same_weights_in_every_layout_give_one_code(tmp_path: Path) -> None:
    """OIHW (torch), OHWI and (1, H, W, C*M) (TFLite), HWIO and (H, W, C, M) (Keras), HWIO (flax)."""
    from test_formats_flax import flax_bytes

    hasher = ModelHasher(bits=256)
    sd = torch_layout(5)
    codes = {"oihw": hasher.hash(sd), "tflite_ohwi": hasher.hash(save(cnn_model(sd), tmp_path / "m.tflite"))}
    keras_layout = {
        "c0": sd["c0.weight"].transpose(2, 3, 1, 0),
        "dw": sd["dw.weight"].reshape(16, 2, 3, 3).transpose(2, 3, 0, 1),  # (H, W, C, M)
        "c2": sd["c2.weight"].transpose(2, 3, 1, 0),
    }
    codes["hwio_guess"] = hasher.hash({k: v for k, v in keras_layout.items() if k != "dw"} | {"dw": sd["dw.weight"]})
    hwio = (2, 3, 1, 0)
    flax_tree = {"params": {f"Conv_{i}": {"kernel": sd[k].transpose(hwio)} for i, k in
                            enumerate(["c0.weight", "dw.weight", "c2.weight"])}}  # fmt: skip
    p = tmp_path / "m.msgpack"
    p.write_bytes(flax_bytes(flax_tree))
    codes["flax_hwio"] = hasher.hash(p)
    import h5py

    with h5py.File(tmp_path / "w.h5", "w") as f:  # a Keras 2 save_weights file
        f.attrs["layer_names"] = np.array([b"conv2d", b"depthwise_conv2d", b"conv2d_1"])
        for layer, key, wname in [("conv2d", "c0", "kernel"), ("depthwise_conv2d", "dw", "depthwise_kernel"),
                                  ("conv2d_1", "c2", "kernel")]:  # fmt: skip
            g = f.create_group(layer)
            g.attrs["weight_names"] = np.array([f"{layer}/{wname}:0".encode()])
            g.create_dataset(f"{layer}/{wname}:0", data=keras_layout[key])
    codes["keras_hwio_depthwise"] = hasher.hash(tmp_path / "w.h5")
    assert len(set(codes.values())) == 1, codes


# ---------------------------------------------------------------- what is refused


def one_conv(tmp_path: Path, name: str, **tensor_kw: object) -> Path:
    m = TFLiteModel()
    x = m.tensor("in", (1, 5, 5, 2))
    data = tensor_kw.pop("data", np.ones((4, 3, 3, 2), np.float32).tobytes())
    w = m.tensor("w", (4, 3, 3, 2), tensor_kw.pop("ttype", FLOAT32), data, **tensor_kw)  # type: ignore[arg-type]
    y = m.tensor("out", (1, 3, 3, 4))
    m.op(CONV_2D, [x, w, -1], [y], CONV_OPTIONS, CONV_FIELDS)
    return save(m, tmp_path / name, [x], [y])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"sparse": True}, "is sparse"),
        ({"ttype": INT4, "data": b"\0" * 36}, "type int4 is not supported"),
        ({"ttype": INT8, "data": b"\0" * 72}, "has no quantization scale"),
        ({"ttype": INT8, "data": b"\0" * 72, "scale": [1.0], "custom_quant": True}, "custom quantization"),
        ({"ttype": INT8, "data": b"\0" * 72, "scale": [1.0, 2.0], "zero_point": [0, 0]}, "2 scales"),
        ({"data": b"\0" * 100}, "100-byte buffer"),
    ],
)
def test_unsupported_tensors_are_named_in_one_line(tmp_path: Path, kw: dict, message: str) -> None:
    p = one_conv(tmp_path, "bad.tflite", **kw)
    with pytest.raises(ModelFormatError, match=message) as err:
        load_tensors(p)
    assert str(err.value).startswith(str(p)) and "\n" not in str(err.value)


def test_truncated_and_corrupt_files_give_clean_errors(tmp_path: Path) -> None:
    good = cnn_model(torch_layout(6)).to_bytes([0], [1])
    for name, raw in {"short.tflite": good[:6], "half.tflite": good[: len(good) // 2],
                      "noident.tflite": b"\0" * 4 + b"XXXX" + good[8:]}.items():  # fmt: skip
        p = tmp_path / name
        p.write_bytes(raw)
        with pytest.raises(ModelFormatError) as err:
            load_tensors(p)
        assert str(err.value).startswith(str(p)) and "\n" not in str(err.value)
    m = cnn_model(torch_layout(6))
    m.external = {next(t.buffer for t in m.tensors if t.name == "fc/w")}  # the FC weights go past the flatbuffer
    raw = m.to_bytes([0], [1])
    p = tmp_path / "cut.tflite"
    p.write_bytes(raw[:-8])
    with pytest.raises(ModelFormatError, match="past the end of the file"):
        load_tensors(p)
    with pytest.raises(ModelFormatError, match="over the limit"):
        tflite.read(save(cnn_model(torch_layout(6)), tmp_path / "ok.tflite"), max_bytes=1000)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bytes_raise_only_model_format_error(tmp_path: Path, data: st.DataObject) -> None:
    good = one_conv(tmp_path, "seed.tflite").read_bytes()
    if data.draw(st.booleans()):
        raw = bytearray(good)
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        raw = raw[: data.draw(st.integers(1, len(raw)))]
    else:
        raw = bytearray(data.draw(st.binary(min_size=8, max_size=400)))
        raw[4:8] = b"TFL3"
    p = tmp_path / "fuzz.tflite"
    p.write_bytes(bytes(raw))
    try:
        out = tflite.read(p, max_bytes=1 << 20)
    except ModelFormatError as exc:
        assert str(exc).startswith(str(p)) and "\n" not in str(exc)
    else:
        assert all(t.array.dtype == np.float32 and t.layout == "oihw" for t in out)


# ---------------------------------------------------------------- the LiteRT interpreter agrees


def run_interpreter(path: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"])


@pytest.mark.parametrize("form", ["f32", "f16", "int8", "hybrid", "ext"])
def test_interpreter_computes_what_our_oihw_weights_compute(tmp_path: Path, form: str) -> None:
    """conv -> depthwise(x2) -> conv -> FC in the LiteRT interpreter equals torch ops on the weights we read
    (hybrid models quantize activations to int8 on the fly: 3 % of the output range; a misread layout is
    off by the whole range)."""
    sd = torch_layout(7)
    m = cnn_model(sd, "f32" if form == "ext" else form)
    if form == "ext":
        m.external = set(range(1, len(m.buffers)))
    p = save(m, tmp_path / f"{form}.tflite")
    x = np.random.default_rng(8).normal(size=(1, 14, 14, 3)).astype(np.float32)
    got = run_interpreter(p, x)
    w = {t.name.split("/")[0]: torch.from_numpy(t.array) for t in load_tensors(p)}
    h = torch.from_numpy(x).permute(0, 3, 1, 2)
    h = torch.nn.functional.conv2d(h, w["c0"])
    h = torch.nn.functional.conv2d(h, w["dw"], groups=16)
    h = torch.nn.functional.conv2d(h, w["c2"])
    expected = (h.permute(0, 2, 3, 1).reshape(64, 32) @ w["fc"].T).numpy()
    assert got.shape == expected.shape
    tolerance = 0.03 if form == "hybrid" else 1e-4
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=tolerance * np.abs(expected).max())


def test_transpose_conv_reads_in_torch_conv_transpose_order(tmp_path: Path) -> None:
    """TRANSPOSE_CONV keeps (out, kh, kw, in); we return torch's ConvTranspose2d weight (in, out, kh, kw), and
    torch's conv_transpose2d with it computes what the interpreter computes."""
    w = np.random.default_rng(9).normal(size=(4, 6, 3, 3)).astype(np.float32)  # torch: (in=4, out=6, kh, kw)
    m = TFLiteModel()
    shape = m.const("output_shape", np.array([1, 7, 7, 6], np.int32))
    wt = m.const("tconv/w", np.ascontiguousarray(w.transpose(1, 2, 3, 0)))  # (out, kh, kw, in)
    x = m.tensor("in", (1, 5, 5, 4))
    y = m.tensor("out", (1, 7, 7, 6))
    m.op(TRANSPOSE_CONV, [shape, wt, x], [y], TRANSPOSE_CONV_OPTIONS, CONV_FIELDS)
    p = save(m, tmp_path / "tconv.tflite", [x], [y])
    (t,) = load_tensors(p)
    np.testing.assert_array_equal(t.array, w)
    inp = np.random.default_rng(10).normal(size=(1, 5, 5, 4)).astype(np.float32)
    expected = torch.nn.functional.conv_transpose2d(torch.from_numpy(inp).permute(0, 3, 1, 2), torch.from_numpy(w))
    got = run_interpreter(p, inp)
    np.testing.assert_allclose(got, expected.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)
