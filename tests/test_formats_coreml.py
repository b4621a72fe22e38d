"""Core ML ``.mlmodel`` (NeuralNetwork) and ``.mlpackage`` (ML Program + weight.bin) files written by
tests/formats_writers.py from Model.proto, NeuralNetwork.proto, MIL.proto and the BlobStorage layout
(no coremltools)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hashdb.codec import ModelHasher, load_tensors
from hashdb.codec.load import load_file
from hashdb.codec.units import find_units
from hashdb.errors import ModelFormatError
from tests import formats_writers as fw
from tests.formats_fixtures import make_cnn

CONVS = ("0", "2", "5")


@pytest.fixture(scope="module")
def hasher() -> ModelHasher:
    return ModelHasher(bits=256)


def cnn_convs(seed: int) -> dict[str, np.ndarray]:
    sd = make_cnn(seed).state_dict()
    return {k: sd[f"{k}.weight"].numpy() for k in CONVS}


def test_neural_network_float_half_and_quantized_weights(tmp_path: Path, hasher: ModelHasher) -> None:
    ws = cnn_convs(0)
    rng = np.random.default_rng(0)
    w5 = ws["5"]
    lo, hi = w5.min(axis=(1, 2, 3)), w5.max(axis=(1, 2, 3))
    scale = ((hi - lo) / 255).astype(np.float32)
    q = np.clip(np.round((w5 - lo[:, None, None, None]) / scale[:, None, None, None]), 0, 255).astype(np.int64)
    table = np.sort(rng.standard_normal(16)).astype(np.float32)
    fc_q = rng.integers(0, 16, size=(10, 24))
    layers = [
        fw.nn_conv("conv0", 16, 3, (3, 3), fw.wp_float(ws["0"]), fw.wp_float(np.arange(16, dtype=np.float32))),
        fw.nn_relu("relu0"),
        fw.nn_conv("conv1", 24, 16, (3, 3), fw.wp_half(ws["2"]), None),
        fw.nn_conv("conv2", 24, 24, (3, 3), fw.wp_linear(q, 8, scale, lo), None),
        fw.nn_inner_product("fc", 24, 10, fw.wp_lut(fc_q, 4, table)),
    ]
    got = {t.name: t for t in load_tensors(fw.coreml_nn(tmp_path / "m.mlmodel", layers))}
    assert list(got) == ["conv0.weight", "conv0.bias", "conv1.weight", "conv2.weight", "fc.weight"]
    np.testing.assert_array_equal(got["conv0.weight"].array, ws["0"])
    np.testing.assert_array_equal(got["conv1.weight"].array, ws["2"].astype(np.float16).astype(np.float32))
    want = (q * scale[:, None, None, None] + lo[:, None, None, None]).astype(np.float32)
    np.testing.assert_allclose(got["conv2.weight"].array, want, rtol=1e-6, atol=1e-7)
    assert np.abs(got["conv2.weight"].array - w5).max() <= scale.max()
    np.testing.assert_array_equal(got["fc.weight"].array, table[fc_q])
    assert {got[n].layout for n in got if n.endswith("weight")} == {"oihw"}
    floats = [fw.nn_conv(f"conv{k}", *w.shape[:2], w.shape[2:], fw.wp_float(w), None) for k, w in ws.items()]
    for kind in (500, 403, 303):  # neuralNetwork, classifier, regressor: the same layers field
        assert hasher.hash(fw.coreml_nn(tmp_path / f"f{kind}.mlmodel", floats, kind)) == hasher.hash(make_cnn(0))


def test_one_bit_to_seven_bit_lookup_tables_unpack_most_significant_bit_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for nbits in range(1, 8):
        q = rng.integers(0, 1 << nbits, size=(5, 7))
        table = rng.standard_normal(1 << nbits).astype(np.float32)
        layer = fw.nn_inner_product("fc", 7, 5, fw.wp_lut(q, nbits, table))
        path = fw.coreml_nn(tmp_path / f"b{nbits}.mlmodel", [layer])
        np.testing.assert_array_equal(load_file(path)[0].array, table[q])


def _program(tmp_path: Path, ws: dict[str, np.ndarray], fp16: str = "2", int8: str = "5") -> Path:
    blobs = fw.BlobWriter()
    ops = []
    for k, w in ws.items():
        name = f"conv_{k}_weight"
        if k == int8:  # iOS16 compression: int8 per output channel, zero point 0
            scale = (np.abs(w).max(axis=(1, 2, 3)) / 127).astype(np.float32)
            q = np.round(w / scale[:, None, None, None]).astype(np.int8)
            attrs = {"quantized_data": fw.mil_blob_value(q, "@model_path/weights/weight.bin", blobs.add(q)),
                     "scale": fw.mil_immediate(scale), "zero_point": fw.mil_immediate(np.zeros(len(scale), np.int8)),
                     "axis": fw.mil_immediate(np.array(0, np.int32))}  # fmt: skip
            ops.append(fw.mil_op("constexpr_affine_dequantize", name, attrs=attrs))
            ws[k] = q.astype(np.float32) * scale[:, None, None, None]
        elif k == fp16:  # an fp16 weight cast to fp32 before the conv
            half = w.astype(np.float16)
            val = fw.mil_blob_value(half, "@model_path/weights/weight.bin", blobs.add(half))
            ops.append(fw.mil_op("const", name + "_fp16", attrs={"val": val}))
            ops.append(fw.mil_op("cast", name, {"x": name + "_fp16"}))
            ws[k] = half.astype(np.float32)
        else:
            val = fw.mil_blob_value(w, "@model_path/weights/weight.bin", blobs.add(w))
            ops.append(fw.mil_op("const", name, attrs={"val": val}))
        ops.append(fw.mil_op("const", f"conv_{k}_bias", attrs={"val": fw.mil_immediate(np.zeros(len(w), np.float32))}))
        ops.append(fw.mil_op("conv", f"y{k}", {"x": "x", "weight": name, "bias": f"conv_{k}_bias"},
                          out_type=fw.mil_tensor_type(11, (1, len(w), 8, 8))))  # fmt: skip
    spec = fw.mlpackage(tmp_path / "net.mlpackage", ops)
    (spec.parent / "weights" / "weight.bin").write_bytes(blobs.bytes())
    return spec


def test_ml_program_package_reads_blobs_casts_and_affine_dequantize(tmp_path: Path, hasher: ModelHasher) -> None:
    ws = cnn_convs(2)
    spec = _program(tmp_path, ws)
    package = tmp_path / "net.mlpackage"
    got = {t.name: t for t in load_tensors(package)}
    assert sorted(got) == ["conv_0_bias", "conv_0_weight", "conv_2_bias", "conv_2_weight_fp16", "conv_5_bias",
                           "conv_5_weight"]  # fmt: skip
    for k, name in (("0", "conv_0_weight"), ("2", "conv_2_weight_fp16"), ("5", "conv_5_weight")):
        np.testing.assert_allclose(got[name].array, ws[k], rtol=1e-6)
        assert got[name].layout == "oihw"
    assert got["conv_0_bias"].layout is None
    assert hasher.hash(package) == hasher.hash(spec) == hasher.hash({k: v for k, v in ws.items()})
    assert [u.key.rsplit("/", 1)[1] for u in find_units(tmp_path)] == ["net.mlpackage"]
    all_float = tmp_path / "float"
    all_float.mkdir()
    assert hasher.hash(_program(all_float, cnn_convs(0), fp16="", int8="")) == hasher.hash(make_cnn(0))


def test_blobs_outside_the_package_or_malformed_are_one_line_errors(tmp_path: Path) -> None:
    w = cnn_convs(3)["0"]
    blobs = fw.BlobWriter()
    offset = blobs.add(w)
    cases = {
        "outside": (fw.mil_blob_value(w, "@model_path/../../secret.bin", offset), "lies outside the model's folder"),
        "absolute": (fw.mil_blob_value(w, "/etc/passwd", offset), "is not under @model_path"),
        "sentinel": (fw.mil_blob_value(w, "@model_path/weights/weight.bin", offset + 8), "bad sentinel"),
        "past": (fw.mil_blob_value(w, "@model_path/weights/weight.bin", 1 << 40), "lies outside"),
        "size": (fw.mil_blob_value(w[:8], "@model_path/weights/weight.bin", offset), r"do not hold \(8, 3, 3, 3\)"),
    }
    (tmp_path / "secret.bin").write_bytes(blobs.bytes())
    for name, (val, message) in cases.items():
        spec = fw.mlpackage(tmp_path / name / "m.mlpackage", [fw.mil_op("const", "w", attrs={"val": val})])
        (spec.parent / "weights" / "weight.bin").write_bytes(blobs.bytes())
        with pytest.raises(ModelFormatError, match=f"^{spec}: not a readable Core ML model .*{message}") as info:
            load_file(spec)
        assert "\n" not in str(info.value)
    sparse = fw.mil_op("constexpr_sparse_to_dense", "w", {"nonzero_data": "d", "mask": "m"})
    conv = fw.mil_op("conv", "y", {"x": "x", "weight": "w"})
    spec = fw.mlpackage(tmp_path / "sparse" / "m.mlpackage", [sparse, conv])
    with pytest.raises(ModelFormatError, match="'w' is compressed with constexpr_sparse_to_dense: not supported"):
        load_file(spec)
    broken = tmp_path / "broken.mlmodel"
    data = fw.coreml_nn(broken, [fw.nn_conv("c", 16, 3, (3, 3), fw.wp_float(w), None)]).read_bytes()
    for cut in (len(data) - 5, len(data) // 2, 7):
        broken.write_bytes(data[:cut])
        with pytest.raises(ModelFormatError, match=f"^{broken}: not a readable Core ML model"):
            load_file(broken)
    broken.write_bytes(fw.coreml_nn(broken, [fw.nn_conv("c", 16, 3, (3, 3), fw.wp_float(w[:5]), None)]).read_bytes())
    with pytest.raises(ModelFormatError, match=r"135 weight values do not fill a \(16, 3, 3, 3\) tensor"):
        load_file(broken)


def test_quantized_layers_are_size_checked_before_they_expand(tmp_path: Path) -> None:
    """A 1-bit palettized layer expands 32x: its declared shape is checked against the limit before decoding."""
    q = np.zeros((512, 512, 3, 3), dtype=np.int64)
    layer = fw.nn_conv("c", 512, 512, (3, 3), fw.wp_lut(q, 1, np.array([0.0, 1.0], np.float32)), None)
    path = fw.coreml_nn(tmp_path / "lut.mlmodel", [layer])
    assert path.stat().st_size < 300_000
    with pytest.raises(ModelFormatError, match=f"^{path}: declares 9,439,232 bytes of tensors, over the limit"):
        load_file(path, 1 << 20)
    assert load_file(path, 1 << 24)[0].array.shape == (512, 512, 3, 3)


@pytest.mark.parametrize("blocks", [(24, 1, 1, 1), (24, 2, 1, 1), (1, 1, 1, 1)])
def test_ios18_blockwise_shift_scale_per_tensor_channel_and_block(tmp_path: Path, blocks: tuple[int, ...]) -> None:
    w = cnn_convs(6)["2"]  # (24, 16, 3, 3)
    rng = np.random.default_rng(6)
    scale = rng.uniform(0.001, 0.01, size=blocks).astype(np.float32)
    offset = rng.integers(-3, 4, size=blocks).astype(np.int8)
    full_scale = scale
    full_offset = offset.astype(np.float32)
    for axis, (d, s) in enumerate(zip(w.shape, blocks, strict=True)):
        full_scale = np.repeat(full_scale, d // s, axis=axis)
        full_offset = np.repeat(full_offset, d // s, axis=axis)
    q = np.clip(np.round(w / full_scale) + full_offset, -128, 127).astype(np.int8)
    blobs = fw.BlobWriter()
    ops = [
        fw.mil_op("const", "q", attrs={"val": fw.mil_blob_value(q, "@model_path/weights/weight.bin", blobs.add(q))}),
        fw.mil_op("const", "s", attrs={"val": fw.mil_immediate(scale)}),
        fw.mil_op("const", "o", attrs={"val": fw.mil_immediate(offset)}),
        fw.mil_op("constexpr_blockwise_shift_scale", "w", {"data": "q", "scale": "s", "offset": "o"}),
        fw.mil_op("conv", "y", {"x": "x", "weight": "w"}),
    ]
    spec = fw.mlpackage(tmp_path / "b.mlpackage", ops)
    (spec.parent / "weights" / "weight.bin").write_bytes(blobs.bytes())
    got = {t.name: t for t in load_tensors(tmp_path / "b.mlpackage")}
    assert list(got) == ["w"] and got["w"].layout == "oihw"  # neither the int8 data nor the 4-D scale
    np.testing.assert_allclose(got["w"].array, full_scale * (q - full_offset), rtol=1e-6)
    assert np.abs(got["w"].array - w).max() <= 0.5 * scale.max() * 1.01


def test_blockwise_parameters_that_do_not_divide_the_data_are_one_line(tmp_path: Path) -> None:
    q = np.zeros((24, 16, 3, 3), np.int8)
    ops = [fw.mil_op("const", "q", attrs={"val": fw.mil_immediate(q)}),
           fw.mil_op("const", "s", attrs={"val": fw.mil_immediate(np.ones((24, 5, 1, 1), np.float32))}),
           fw.mil_op("constexpr_blockwise_shift_scale", "w", {"data": "q", "scale": "s"})]  # fmt: skip
    spec = fw.mlpackage(tmp_path / "b.mlpackage", ops)
    with pytest.raises(ModelFormatError, match=r"blockwise scale \(24, 5, 1, 1\) / offset does not divide data"):
        load_file(spec)


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
def test_ios16_palettized_weights_unpack_least_significant_bit_first(tmp_path: Path, nbits: int) -> None:
    rng = np.random.default_rng(nbits)
    shape = (24, 16, 3, 3)
    index = rng.integers(0, 1 << nbits, size=shape)
    lut = np.sort(rng.standard_normal(1 << nbits)).astype(np.float32)
    bits = ((index.reshape(-1, 1) >> np.arange(nbits)) & 1).astype(np.uint8)  # each index LSB first
    packed = np.packbits(bits.reshape(-1), bitorder="little")  # bytes filled from their LSB upward
    blobs = fw.BlobWriter()
    attrs = {"lut": fw.mil_immediate(lut), "shape": fw.mil_immediate(np.array(shape, np.int32)),
             "indices": fw.mil_blob_value(packed, "@model_path/weights/weight.bin", blobs.add(packed))}  # fmt: skip
    ops = [fw.mil_op("constexpr_lut_to_dense", "w", attrs=attrs), fw.mil_op("conv", "y", {"x": "x", "weight": "w"})]
    spec = fw.mlpackage(tmp_path / "p.mlpackage", ops)
    (spec.parent / "weights" / "weight.bin").write_bytes(blobs.bytes())
    got = load_file(spec)
    assert [t.name for t in got] == ["w"] and got[0].layout == "oihw"
    np.testing.assert_array_equal(got[0].array, lut[index])
    short = fw.mil_blob_value(packed[:-1], "@model_path/weights/weight.bin", blobs.add(packed[:-1]))
    op = fw.mil_op("constexpr_lut_to_dense", "w", attrs={**attrs, "indices": short})
    spec = fw.mlpackage(tmp_path / "short.mlpackage", [op])
    (spec.parent / "weights" / "weight.bin").write_bytes(blobs.bytes())
    with pytest.raises(ModelFormatError, match=f"index bytes hold fewer than 3456 {nbits}-bit indices"):
        load_file(spec)


def _bn_model(seed: int) -> tuple[torch.nn.Module, list[np.ndarray]]:
    """make_cnn with trained-looking BatchNorm statistics, and those (gamma, beta, mean, variance)."""
    model = make_cnn(seed)
    rng = np.random.default_rng(seed)
    bn = model[3]
    params = [rng.uniform(0.2, 3.0, 24), rng.normal(0, 1, 24), rng.normal(0, 1, 24), rng.uniform(0.05, 5.0, 24)]
    params = [p.astype(np.float32) for p in params]
    for tensor, value in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), params, strict=True):
        tensor.data = torch.from_numpy(value)
    return model, params


def test_a_batchnorm_layer_after_a_convolution_folds_into_it(tmp_path: Path, hasher: ModelHasher) -> None:
    """Codec v7 folds a BatchNorm into the convolution it follows (hashdb/codec/batchnorm.py). A NeuralNetwork
    ``batchnorm`` layer reading a convolution's output blob is named after that convolution's weight, so the
    model hashes like the PyTorch model with its BatchNorm; one whose statistics are computed at run time, or one
    reading another layer, has nothing to fold and is left out."""
    model, params = _bn_model(7)
    ws = {k: v.detach().numpy() for k, v in model.state_dict().items() if k.endswith("weight") and v.ndim == 4}
    convs = [fw.nn_conv(f"conv{k}", *w.shape[:2], w.shape[2:], fw.wp_float(w), None) for k, w in
             zip(("0", "2", "5"), ws.values(), strict=True)]  # fmt: skip
    layers = [convs[0], fw.nn_relu("r0"), convs[1], fw.nn_batchnorm("bn", "conv2_out", params), fw.nn_relu("r1"),
              convs[2]]  # fmt: skip
    path = fw.coreml_nn(tmp_path / "bn.mlmodel", layers)
    got = {t.name: t for t in load_tensors(path)}
    assert {"conv2.weight.bn.weight", "conv2.weight.bn.running_var"} <= set(got), sorted(got)
    np.testing.assert_array_equal(got["conv2.weight.bn.running_var"].array, params[3])
    assert hasher.hash(path) == hasher.hash(model)
    for i, bn in enumerate([fw.nn_batchnorm("bn", "conv2_out", params, run_time=True),
                            fw.nn_batchnorm("bn", "r0_out", params)]):  # fmt: skip
        layers[3] = bn  # statistics of the run, or a BatchNorm after an activation: nothing to fold
        path = fw.coreml_nn(tmp_path / f"unfolded{i}.mlmodel", layers)
        assert [t.name for t in load_tensors(path)] == [t for t in got if ".bn." not in t], i
        assert hasher.hash(path) != hasher.hash(model)
    # a deconvolution's weights are (inputs, outputs, ...): a BatchNorm after one is not folded into its rows
    deconv = fw.nn_conv("conv2", *ws["2.weight"].shape[:2], (3, 3), fw.wp_float(ws["2.weight"]), None, deconv=True)
    layers[2], layers[3] = deconv, fw.nn_batchnorm("bn", "conv2_out", params)
    assert not any(".bn." in t.name for t in load_tensors(fw.coreml_nn(tmp_path / "deconv.mlmodel", layers)))


def test_an_ml_program_batch_norm_after_a_conv_folds_into_it(tmp_path: Path, hasher: ModelHasher) -> None:
    """MIL ``batch_norm`` reading a ``conv``'s output: its consts, whatever the converter named them (and cast
    from fp16 or not), are named after the conv's weight, and the program hashes like the PyTorch model."""
    model, params = _bn_model(8)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ops, x = [], "x"
    for k in ("0", "2", "5"):
        ops.append(fw.mil_op("const", f"w{k}", attrs={"val": fw.mil_immediate(sd[f"{k}.weight"])}))
        ops.append(fw.mil_op("conv", f"y{k}", {"x": x, "weight": f"w{k}"}))
        x = f"y{k}"
        if k == "2":
            for i, p in enumerate(params):
                ops.append(fw.mil_op("const", f"op_{i}_fp16", attrs={"val": fw.mil_immediate(p)}))
                ops.append(fw.mil_op("cast", f"op_{i}", {"x": f"op_{i}_fp16"}))
            ops.append(fw.mil_op("batch_norm", "bn", {"x": "y2", "gamma": "op_0", "beta": "op_1", "mean": "op_2",
                                                      "variance": "op_3"}))  # fmt: skip
            x = "bn"
    spec = fw.mlpackage(tmp_path / "bn.mlpackage", ops)
    got = {t.name for t in load_tensors(spec)}
    assert {"w2.bn.weight", "w2.bn.bias", "w2.bn.running_mean", "w2.bn.running_var"} <= got, sorted(got)
    assert hasher.hash(spec) == hasher.hash(model)
