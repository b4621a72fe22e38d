"""ONNX graphs that keep weights outside the initializers: Constant nodes (paddle2onnx) and quantized weights
(QDQ DequantizeLinear, QLinearConv, dynamic-int8 ConvInteger), written with onnx.helper as the ops' spec says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hashdb.codec import ModelHasher, load_tensors
from hashdb.errors import ModelFormatError

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def kernels(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in ((16, 3, 3, 3), (24, 16, 3, 3), (24, 24, 3, 3))]


def save(path: Path, nodes: list, inits: list) -> Path:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info(f"x{sum(n.op_type in ('Conv', 'ConvInteger', 'QLinearConv') for n in nodes)}",
                                       TensorProto.FLOAT, None)], initializer=inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph), str(path))
    return path


def quantize(w: np.ndarray, per_channel: bool, unsigned: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric (uint8) or symmetric (int8) linear quantization, per output channel or per tensor."""
    axes = tuple(range(1, w.ndim)) if per_channel else None
    lo, hi = np.minimum(w.min(axis=axes), 0), np.maximum(w.max(axis=axes), 0)
    if unsigned:
        scale = ((hi - lo) / 255).astype(np.float32)
        zero = np.round(-lo / scale).astype(np.uint8)
    else:
        scale = (np.maximum(-lo, hi) / 127).astype(np.float32)
        zero = np.zeros_like(scale, dtype=np.int8)
    shape = (-1,) + (1,) * (w.ndim - 1) if per_channel else ()
    info = np.iinfo(np.uint8 if unsigned else np.int8)
    q = np.clip(np.round(w / scale.reshape(shape)) + zero.reshape(shape), info.min, info.max).astype(zero.dtype)
    return q, np.asarray(scale), np.asarray(zero)


def dequantized(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    shape = (-1,) + (1,) * (q.ndim - 1) if scale.ndim else ()
    return ((q.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.reshape(shape)).astype(np.float32)


@pytest.fixture(scope="module")
def hasher() -> ModelHasher:
    return ModelHasher(bits=256)


def test_weights_in_constant_nodes_read_like_initializers(tmp_path: Path, hasher: ModelHasher) -> None:
    ws = kernels()
    consts = [helper.make_node("Constant", [], [f"w{i}"], value=numpy_helper.from_array(w)) for i, w in enumerate(ws)]
    convs = [helper.make_node("Conv", [f"x{i}", f"w{i}"], [f"x{i + 1}"]) for i in range(len(ws))]
    path = save(tmp_path / "const.onnx", consts + convs, [])
    tensors = load_tensors(path)
    assert [t.name for t in tensors] == ["w0", "w1", "w2"] and {t.layout for t in tensors} == {"oihw"}
    for t, w in zip(tensors, ws, strict=True):
        np.testing.assert_array_equal(t.array, w)
    inits = save(tmp_path / "init.onnx", convs, [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    assert hasher.hash(path) == hasher.hash(inits) == hasher.hash({f"w{i}": w for i, w in enumerate(ws)})


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("unsigned", [True, False])
def test_dequantize_linear_feeding_conv_is_dequantized(tmp_path: Path, per_channel: bool, unsigned: bool) -> None:
    ws = kernels(1)
    nodes, inits, expect = [], [], []
    for i, w in enumerate(ws):
        q, scale, zero = quantize(w, per_channel, unsigned)
        inits += [numpy_helper.from_array(q, f"q{i}"), numpy_helper.from_array(scale, f"s{i}"),
                  numpy_helper.from_array(zero, f"z{i}")]  # fmt: skip
        nodes += [helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"w{i}"], axis=0),
                  helper.make_node("Conv", [f"x{i}", f"w{i}"], [f"x{i + 1}"])]  # fmt: skip
        expect.append(dequantized(q, scale, zero))
    kernels_read = [t for t in load_tensors(save(tmp_path / "qdq.onnx", nodes, inits)) if t.array.ndim == 4]
    assert [t.name for t in kernels_read] == ["w0", "w1", "w2"] and {t.layout for t in kernels_read} == {"oihw"}
    for t, w, e in zip(kernels_read, ws, expect, strict=True):
        np.testing.assert_allclose(t.array, e, rtol=1e-6)
        assert np.abs(t.array - w).max() < 0.05 * np.abs(w).max()  # the quantization error only


def test_qlinearconv_per_channel_and_per_tensor(tmp_path: Path, hasher: ModelHasher) -> None:
    ws = kernels(2)
    nodes, inits, expect = [], [], {}
    for i, w in enumerate(ws):
        q, scale, zero = quantize(w, per_channel=i != 1, unsigned=i == 2)
        inits += [numpy_helper.from_array(q, f"q{i}"), numpy_helper.from_array(scale, f"ws{i}"),
                  numpy_helper.from_array(zero, f"wz{i}")]  # fmt: skip
        nodes.append(helper.make_node("QLinearConv", [f"x{i}", "xs", "xz", f"q{i}", f"ws{i}", f"wz{i}", "ys", "yz"],
                                      [f"x{i + 1}"]))  # fmt: skip
        expect[f"q{i}"] = dequantized(q, scale, zero)
    inits += [numpy_helper.from_array(np.float32(0.1), "xs"), numpy_helper.from_array(np.uint8(128), "xz"),
              numpy_helper.from_array(np.float32(0.1), "ys"), numpy_helper.from_array(np.uint8(128), "yz")]  # fmt: skip
    path = save(tmp_path / "qlinear.onnx", nodes, inits)
    got = {t.name: t for t in load_tensors(path) if t.array.ndim == 4}
    assert set(got) == set(expect) and {t.layout for t in got.values()} == {"oihw"}
    for name, e in expect.items():
        np.testing.assert_allclose(got[name].array, e, rtol=1e-6)
    assert hasher.hash(path) == hasher.hash(expect)


def _conv_integer(tmp_path: Path, with_scale: bool) -> tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """onnxruntime's quantize_dynamic pattern: DynamicQuantizeLinear(x) -> ConvInteger(x_q, W_q, x_zp, W_zp)
    -> Cast(float) -> Mul(by Mul(x_scale, W_scale)); the weights uint8 per tensor."""
    ws = kernels(3)
    nodes, inits, scaled, zero_only = [], [], {}, {}
    for i, w in enumerate(ws):
        q, scale, zero = quantize(w, per_channel=False, unsigned=True)
        inits += [numpy_helper.from_array(q, f"W{i}_quantized"), numpy_helper.from_array(zero, f"W{i}_zero_point"),
                  numpy_helper.from_array(scale, f"W{i}_scale")]  # fmt: skip
        nodes += [
            helper.make_node("DynamicQuantizeLinear", [f"x{i}"], [f"xq{i}", f"xs{i}", f"xz{i}"]),
            helper.make_node("ConvInteger", [f"xq{i}", f"W{i}_quantized", f"xz{i}", f"W{i}_zero_point"], [f"ci{i}"]),
            helper.make_node("Cast", [f"ci{i}"], [f"cf{i}"], to=TensorProto.FLOAT),
        ]
        if with_scale:
            nodes += [helper.make_node("Mul", [f"xs{i}", f"W{i}_scale"], [f"sc{i}"]),
                      helper.make_node("Mul", [f"cf{i}", f"sc{i}"], [f"x{i + 1}"])]  # fmt: skip
        else:
            nodes.append(helper.make_node("Identity", [f"cf{i}"], [f"x{i + 1}"]))
        scaled[f"W{i}_quantized"] = dequantized(q, scale, zero)
        zero_only[f"W{i}_quantized"] = dequantized(q, np.asarray(np.float32(1)), zero)
    path = save(tmp_path / f"dyn{int(with_scale)}.onnx", nodes, inits)
    return path, scaled, zero_only


@pytest.mark.parametrize("with_scale", [True, False])
def test_conv_integer_takes_the_scale_the_graph_applies_else_the_zero_point_only(
    tmp_path: Path, hasher: ModelHasher, with_scale: bool
) -> None:
    path, scaled, zero_only = _conv_integer(tmp_path, with_scale)
    got = {t.name: t for t in load_tensors(path) if t.array.ndim == 4}
    expect = scaled if with_scale else zero_only
    assert set(got) == set(expect) and {t.layout for t in got.values()} == {"oihw"}
    for name, e in expect.items():
        np.testing.assert_allclose(got[name].array, e, rtol=1e-6)
    assert hasher.hash(path) == hasher.hash(scaled) == hasher.hash(zero_only)  # a per-tensor scale: one code


def test_a_scale_that_does_not_fit_its_axis_is_one_line(tmp_path: Path) -> None:
    q, scale, zero = quantize(kernels()[0], per_channel=True, unsigned=False)
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale[:5], "s"),
             numpy_helper.from_array(zero[:5], "z")]  # fmt: skip
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=0),
             helper.make_node("Conv", ["x0", "w"], ["x1"])]  # fmt: skip
    path = save(tmp_path / "bad.onnx", nodes, inits)
    with pytest.raises(ModelFormatError, match=r"bad.onnx: quantized tensor 'q' .* does not fit axis 0$"):
        load_tensors(path)


class _Calibration:
    """onnxruntime's CalibrationDataReader: a few random inputs for the static quantizers."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.batches = iter([{"x0": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


@pytest.mark.parametrize("mode", ["dynamic ConvInteger", "static QDQ per channel", "static QLinearConv"])
def test_onnxruntime_quantized_models_read_as_their_float_weights_within_the_quantization_step(
    tmp_path: Path, hasher: ModelHasher, mode: str
) -> None:
    """Cross-check against the graphs onnxruntime's own quantizers write (quantize_dynamic, quantize_static):
    every conv weight comes back OIHW within half a quantization step of the float weight (so the scale the
    graph holds was found and applied), and the code stays within the copy radius of the float model's."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    from hashdb.codes import hamming

    ws = kernels(4)
    ws = [w * (0.1 * (i + 1)) for i, w in enumerate(ws)]  # distinct per-layer scales
    nodes = [helper.make_node("Conv", [f"x{i}", f"w{i}", f"b{i}"], [f"x{i + 1}"], name=f"conv{i}") for i in range(3)]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)]
    inits += [numpy_helper.from_array(np.zeros(len(w), np.float32), f"b{i}") for i, w in enumerate(ws)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("x3", TensorProto.FLOAT, [1, 24, 10, 10])], initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    src, dst = tmp_path / "float.onnx", tmp_path / "quant.onnx"
    onnx.save(model, str(src))
    if mode.startswith("dynamic"):
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8)
        ops = {"ConvInteger"}
    else:
        fmt = QuantFormat.QDQ if "QDQ" in mode else QuantFormat.QOperator
        quantize_static(str(src), str(dst), _Calibration(), quant_format=fmt, per_channel="QDQ" in mode,
                        weight_type=QuantType.QInt8)  # fmt: skip
        ops = {"DequantizeLinear"} if "QDQ" in mode else {"QLinearConv"}
    written = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert ops <= written and ("Conv" in written) == ("QDQ" in mode)  # QDQ keeps Conv, fed by DequantizeLinear
    got = [t for t in load_tensors(dst) if t.array.ndim == 4]
    assert len(got) == 3 and {t.layout for t in got} == {"oihw"}
    for t, w in zip(got, ws, strict=True):
        step = (w.max() - min(w.min(), 0)) / 255 if mode.startswith("dynamic") else np.abs(w).max() / 127
        assert t.array.shape == w.shape
        assert np.abs(t.array - w).max() <= 0.5 * step * 1.01 + 1e-7, t.name
    assert hamming(hasher.hash(dst), hasher.hash({f"w{i}": w for i, w in enumerate(ws)})) <= hasher.copy_radius


def int4_tensor(name: str, kind: int, values: np.ndarray, raw: bool) -> TensorProto:
    """An int4/uint4 tensor: in int32_data (one value each), or packed two to a byte in raw_data, the low nibble
    first (what numpy_helper.from_array and onnxruntime's int4 quantizer write)."""
    if not raw:
        return helper.make_tensor(name, kind, values.shape, values.ravel().tolist())
    nibbles = np.append(values.ravel(), [0] * (values.size % 2)).astype(np.uint8) & 0x0F
    return helper.make_tensor(name, kind, values.shape, (nibbles[0::2] | nibbles[1::2] << 4).tobytes(), raw=True)


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("signed", [True, False])
def test_blocked_int4_dequantize_linear(tmp_path: Path, signed: bool, raw: bool) -> None:
    """opset 21 blocked quantization: int4/uint4 weights, a scale (and zero point) per block of 8 input channels;
    their values in int32_data or packed in raw_data (which the reader takes out of the file itself)."""
    w = kernels(5)[1]  # (24, 16, 3, 3)
    block = 8
    lo, hi = (-8, 7) if signed else (0, 15)
    blocks = w.reshape(24, 2, block, 3, 3)
    scale = (np.abs(blocks).max(axis=2) / 7).astype(np.float32)  # (24, 2, 3, 3): the spec's blocked shape
    zero = np.zeros_like(scale, dtype=np.int8) if signed else np.full(scale.shape, 8, np.uint8)
    full_scale = np.repeat(scale, block, axis=1)
    full_zero = np.repeat(zero.astype(np.float32), block, axis=1)
    q = np.clip(np.round(w / full_scale) + full_zero, lo, hi).astype(np.int8 if signed else np.uint8)
    kind = TensorProto.INT4 if signed else TensorProto.UINT4
    inits = [int4_tensor("q", kind, q, raw), numpy_helper.from_array(scale, "s"), int4_tensor("z", kind, zero, raw)]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=1, block_size=block),
             helper.make_node("Conv", ["x0", "w"], ["x1"])]  # fmt: skip
    got = load_tensors(save(tmp_path / "int4.onnx", nodes, inits))
    assert [t.name for t in got if t.array.ndim == 4] == ["w"] and got[0].layout == "oihw"
    np.testing.assert_allclose(got[0].array, (q - full_zero) * full_scale, rtol=1e-6)
    assert np.abs(got[0].array - w).max() <= 0.5 * scale.max() * 1.01
    bad = save(tmp_path / "bad.onnx", nodes, [inits[0], numpy_helper.from_array(scale[:, :1], "s"), inits[2]])
    with pytest.raises(ModelFormatError, match=r"blocked scale/zero point of shape \(24, 1, 3, 3\), want \(24, 2"):
        load_tensors(bad)
