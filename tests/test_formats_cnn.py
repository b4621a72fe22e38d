"""Caffe, Darknet, ncnn, OpenVINO IR and MXNet: files written by our own writers from the formats'
specifications (tests/cnn_format_writers.py) read back to exactly the weights written, in OIHW; the same
weights in every format give one code; pairs are one unit; bad files fail in one line naming the file."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn
from cnn_format_writers import (
    caffe_model,
    darknet_files,
    mnn_model,
    mxnet_files,
    mxnet_params,
    ncnn_files,
    openvino_files,
    torch_layers,
)
from formats_fixtures import make_cnn
from formats_writers import tf_checkpoint

from hashdb.codec import ModelHasher
from hashdb.codec.load import load_tensors, sniff_format
from hashdb.codec.units import find_units, unit_files
from hashdb.errors import ModelFormatError


@pytest.fixture(scope="module")
def hasher() -> ModelHasher:
    return ModelHasher(256)


def numpy_sd(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()}


def kernels(path: Path) -> list[np.ndarray]:
    return [t.array for t in load_tensors(path) if t.layout == "oihw"]


def distance(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(bytes(x ^ y for x, y in zip(a, b, strict=True)), np.uint8)).sum())


def write_all(folder: Path, sd: dict[str, np.ndarray]) -> dict[str, Path]:
    layers = torch_layers(sd)
    files = {}
    (folder / "caffe").mkdir()
    files["caffe"] = folder / "caffe" / "net.caffemodel"
    files["caffe"].write_bytes(caffe_model(layers))
    (folder / "caffe_v1").mkdir()
    files["caffe_v1"] = folder / "caffe_v1" / "net.caffemodel"
    files["caffe_v1"].write_bytes(caffe_model(layers, v1=True, double=True))
    for name in ("darknet", "ncnn", "openvino", "mxnet"):
        (folder / name).mkdir()
    files["darknet"] = darknet_files(folder / "darknet", layers)
    files["ncnn"] = ncnn_files(folder / "ncnn", layers)[0]
    files["openvino"] = openvino_files(folder / "openvino", layers)[0]
    files["mxnet"] = mxnet_files(folder / "mxnet", layers)
    (folder / "mnn").mkdir()
    files["mnn"] = folder / "mnn" / "m.mnn"
    files["mnn"].write_bytes(mnn_model(layers))
    return files


def test_every_cnn_format_reads_the_kernels_written_and_gives_the_torch_code(
    tmp_path: Path, hasher: ModelHasher
) -> None:
    model = make_cnn(10)
    sd = numpy_sd(model)
    want = [w for kind, w, _ in torch_layers(sd) if kind == "conv"]
    code = hasher.hash(model)
    for fmt, path in write_all(tmp_path, sd).items():
        got = kernels(path)
        assert len(got) == len(want), fmt
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=fmt)
        assert hasher.hash(path) == code, fmt
        assert hasher.hash(path.parent) == code, fmt  # the folder holding the pair is the same one model


def test_biases_and_batchnorm_come_back_flat_and_linear_layers_as_out_in(tmp_path: Path) -> None:
    sd = {"0.weight": np.arange(2 * 3 * 9, dtype=np.float32).reshape(2, 3, 3, 3), "0.bias": np.ones(2, np.float32),
          "1.weight": np.arange(10, dtype=np.float32).reshape(5, 2), "1.bias": np.zeros(5, np.float32)}  # fmt: skip
    layers = torch_layers(sd)
    files = write_all(tmp_path, sd)
    for fmt, path in files.items():
        by_shape = {t.array.shape: t for t in load_tensors(path)}
        assert (2, 3, 3, 3) in by_shape and by_shape[(2, 3, 3, 3)].layout == "oihw", fmt
        np.testing.assert_array_equal(by_shape[(5, 2)].array, layers[1][1], err_msg=fmt)
        if fmt != "openvino":  # the IR returns the weight inputs of its ops only
            assert (2,) in by_shape and (5,) in by_shape, fmt


def test_sniffing_is_by_leading_bytes_first_then_suffix(tmp_path: Path) -> None:
    files = write_all(tmp_path, numpy_sd(make_cnn(1)))
    want = {"caffe": "caffe", "caffe_v1": "caffe", "darknet": "darknet", "ncnn": "ncnn", "openvino": "openvino",
            "mxnet": "mxnet", "mnn": "mnn"}  # fmt: skip
    for fmt, path in files.items():
        assert sniff_format(path) == want[fmt]
    renamed = tmp_path / "mxnet" / "weights.dat"  # MXNet's list magic is enough
    renamed.write_bytes(files["mxnet"].read_bytes())
    assert sniff_format(renamed) == "mxnet"
    # the .bin of a pair is read through its graph file, whichever half is named
    assert sniff_format(files["ncnn"].with_suffix(".bin")) == "ncnn"
    assert sniff_format(files["openvino"].with_suffix(".bin")) == "openvino"
    np.testing.assert_array_equal(kernels(files["openvino"].with_suffix(".bin"))[0], kernels(files["openvino"])[0])


def test_pairs_are_one_unit_keyed_by_their_graph_or_weights_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_all(tmp_path, numpy_sd(make_cnn(2)))
    (tmp_path / "openvino" / "notes.xml").write_text("<?xml version='1.0'?><notes/>")  # an xml that is no model
    (tmp_path / "ncnn" / "other.param").write_text("learning_rate=3\n")
    monkeypatch.chdir(tmp_path)
    keys = [u.key for u in find_units(tmp_path)]
    assert keys == sorted(str(p.relative_to(tmp_path)) for p in files.values())
    assert not any(k.endswith(".bin") for k in keys)


def test_a_pair_unit_names_both_files_for_its_identity(tmp_path: Path) -> None:
    # an incremental add compares these files' sizes and times: the weights half of a pair must be among them
    write_all(tmp_path, numpy_sd(make_cnn(2)))
    (tmp_path / "darknet" / "yolo.weights").rename(tmp_path / "darknet" / "tiny.weights")  # the folder's only .cfg
    for unit in find_units(tmp_path):
        files = unit_files(unit.path)
        assert files[0] == unit.path and sorted(files) == sorted(unit.path.parent.iterdir()), unit.key
    tf = tmp_path / "tf"
    tf.mkdir()
    tf_checkpoint(tf / "ckpt-1", {"a": np.zeros(3, np.float32)}, num_shards=2)
    index, shards = tf / "ckpt-1.index", sorted(tf.glob("ckpt-1.data-*"))
    assert len(shards) == 2 and unit_files(index) == [index, *shards] and unit_files(shards[1])[0] == shards[1]


def test_quantized_and_half_storage_dequantize_close_to_the_float_weights(tmp_path: Path, hasher: ModelHasher) -> None:
    model = make_cnn(3)
    sd = numpy_sd(model)
    layers = torch_layers(sd)
    want = [w for _, w, _ in layers]
    code = hasher.hash(model)
    cases = [("fp16", ncnn_files(tmp_path, layers, "h", "fp16")[0], 1e-3),
             ("table", ncnn_files(tmp_path, layers, "t", "table")[0], 1e-2),
             ("int8", ncnn_files(tmp_path, layers, "q", "int8")[0], 1e-2),
             ("ov-f16", openvino_files(tmp_path, layers, "ovh", "f16")[0], 1e-3),
             ("ov-u8", openvino_files(tmp_path, layers, "ovq", "u8")[0], 2e-2),
             ("ov-fq", openvino_files(tmp_path, layers, "ovfq", "fq")[0], 1e-2)]  # fmt: skip
    for storage, tol in (("fp16", 1e-3), ("q8", 1e-2)):
        mnn_path = tmp_path / f"{storage}.mnn"
        mnn_path.write_bytes(mnn_model(layers, storage))
        cases.append((f"mnn-{storage}", mnn_path, tol))
    for what, path, tol in cases:
        got = kernels(path)
        assert len(got) == len(want), what
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max(), err_msg=what)
            assert not np.array_equal(a, b) or what == "none"  # really stored quantized, really dequantized
        assert distance(hasher.hash(path), code) <= hasher.copy_radius, what


def test_grouped_and_depthwise_kernels_come_back_in_torch_grouped_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    layers = torch_layers({"0.weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float32)})
    grouped = rng.standard_normal((2, 3, 2, 3, 3)).astype(np.float32)  # G=2, O/G=3, I/G=2
    xml, _ = openvino_files(tmp_path, layers, "g", group_conv=grouped)
    got = kernels(xml)
    np.testing.assert_array_equal(got[1], grouped.reshape(6, 2, 3, 3))
    dw = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    param, _ = ncnn_files(tmp_path, layers, "dw", depthwise=dw)
    np.testing.assert_array_equal(kernels(param)[1], dw)


def test_mxnet_versions_dtypes_and_channels_last_symbols(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    layers = torch_layers({"0.weight": w})
    for version in (0, 1, 2):
        (tmp_path / f"v{version}").mkdir()
        path = mxnet_files(tmp_path / f"v{version}", layers, version=version)
        np.testing.assert_array_equal(kernels(path)[0], w)
        names = [t.name for t in load_tensors(path)]
        assert names == ["conv0_weight", "bn0_moving_mean"]  # prefixes dropped, the int32 counter skipped
    (tmp_path / "nhwc").mkdir()
    np.testing.assert_array_equal(kernels(mxnet_files(tmp_path / "nhwc", layers, channels_last=True))[0], w)
    gluon = tmp_path / "gluon.params"  # save_parameters: structural names, no arg:/aux: prefixes
    gluon.write_bytes(mxnet_params({"features.0.weight": w}))
    assert [(t.name, t.layout) for t in load_tensors(gluon)] == [("features.0.weight", "oihw")]
    half = tmp_path / "half.params"
    half.write_bytes(mxnet_params({"arg:c_weight": w.astype("<f2"), "arg:d_weight": w.astype("<f8")}))
    got = kernels(half)
    np.testing.assert_array_equal(got[0], w.astype("<f2").astype(np.float32))
    np.testing.assert_array_equal(got[1], w)


def test_darknet_header_versions_backbone_files_and_cfg_mismatch(tmp_path: Path) -> None:
    sd = numpy_sd(make_cnn(4))
    layers = torch_layers(sd)
    old = darknet_files(tmp_path, layers, "old", major_minor=(0, 1))  # 32-bit "seen"
    assert [k.shape for k in kernels(old)] == [w.shape for _, w, _ in layers]
    full = darknet_files(tmp_path, layers, "full")
    blob = full.read_bytes()
    first = 4 * (16 + 16 * 3 * 9)  # layer 0: biases then the kernel
    backbone = tmp_path / "full.conv.1"  # darknet53.conv.74-style: the first layers only, same cfg
    (tmp_path / "bb.cfg").write_text((tmp_path / "full.cfg").read_text())
    backbone = tmp_path / "bb.weights"
    backbone.write_bytes(blob[: 20 + first])
    assert [k.shape for k in kernels(backbone)] == [(16, 3, 3, 3)]
    (tmp_path / "cut.cfg").write_text((tmp_path / "full.cfg").read_text())
    (tmp_path / "cut.weights").write_bytes(blob[: 20 + first + 8])
    with pytest.raises(ModelFormatError, match=r"cut.weights: ends inside layer 1_convolutional .*does not match"):
        load_tensors(tmp_path / "cut.weights")
    (tmp_path / "cut.weights").write_bytes(blob[: 20 + first + 4 * 24])  # layer 1's biases, not its BN or kernel
    with pytest.raises(ModelFormatError, match=r"cut.weights: ends inside layer 1_convolutional"):
        load_tensors(tmp_path / "cut.weights")
    (tmp_path / "long.cfg").write_text((tmp_path / "full.cfg").read_text())
    (tmp_path / "long.weights").write_bytes(blob + b"\0" * 8)
    with pytest.raises(ModelFormatError, match="long.weights: holds more values than the cfg describes"):
        load_tensors(tmp_path / "long.weights")


def test_darknet_connected_layers_follow_the_channel_chain(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    sd = {"0.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
          "1.weight": rng.standard_normal((6, 8, 3, 3)).astype(np.float32),
          "2.weight": rng.standard_normal((5, 6)).astype(np.float32), "2.bias": np.ones(5, np.float32)}  # fmt: skip
    path = darknet_files(tmp_path, torch_layers(sd), "cls")
    by_name = {t.name: t.array for t in load_tensors(path)}
    assert by_name["1_convolutional.bn.weight"].tolist() == [1.5] * 6
    np.testing.assert_array_equal(by_name["6_connected.weight"], sd["2.weight"])
    np.testing.assert_array_equal(by_name["6_connected.bias"], sd["2.bias"])
    transposed = dict(sd, **{"2.weight": np.ascontiguousarray(sd["2.weight"].T).reshape(5, 6)})  # stored (in, out)
    path = darknet_files(tmp_path, torch_layers(transposed), "tr", major_minor=(0, 1001))
    np.testing.assert_array_equal({t.name: t.array for t in load_tensors(path)}["6_connected.weight"], sd["2.weight"])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (d / "a.weights").write_bytes(b"\0" * 40), r"a.weights: a Darknet .weights file needs its .cfg"),
        (lambda d: ((d / "a.weights").write_bytes(b"\0" * 40), (d / "a.cfg").write_text("[convolutional]\n")),
         r"a.cfg: a Darknet cfg starts with a \[net\] section"),
        (lambda d: ((d / "a.weights").write_bytes(b"\0" * 40),
                    (d / "a.cfg").write_text("[net]\n[convolutional]\nbinary=1\n")),
         r"a.cfg: layer 0: binary convolutions \(bit-packed weights\) are not read"),
        (lambda d: ((d / "a.weights").write_bytes(b"\0" * 40), (d / "a.cfg").write_text("[net]\n[lstm]\n")),
         r"a.cfg: layer 0: \[lstm\] layers carry weights hashdb does not read"),
        (lambda d: ((d / "a.weights").write_bytes(b"\0" * 40), (d / "a.cfg").write_text("[net]\n[route]\nlayers=4\n")),
         r"a.cfg: layer 0 \(route\) refers to layer 4"),
        (lambda d: (d / "a.param").write_text("7767517\n1 1\nInput in 0 1 x\n"),
         r"a.param: its .bin file a.bin is missing"),
        (lambda d: ((d / "a.param").write_text("7767517\n2 1\nInput in 0 1 x\n"), (d / "a.bin").write_bytes(b"")),
         r"a.param: declares 2 layers, has 1 layer lines"),
        (lambda d: ((d / "a.param").write_text("7767517\n1 1\nLSTM l 1 1 x y 0=4 1=64\n"),
                    (d / "a.bin").write_bytes(b"")),
         r"a.param: layer 'l' of type LSTM carries weights hashdb does not read"),
        (lambda d: ((d / "a.param").write_text("7767517\n1 1\nConvolution c 1 1 x y 0=2 1=3 6=36\n"),
                    (d / "a.bin").write_bytes(b"\0" * 20)), r"a.bin: ends inside c weights"),
        (lambda d: ((d / "a.param").write_text("7767517\n1 1\nConvolution c 1 1 x y 0=2 1=3 6=36\n"),
                    (d / "a.bin").write_bytes(b"\0" * 200)), r"a.bin: 52 bytes left after the last layer"),
        (lambda d: ((d / "a.param").write_text("7767517\n1 1\nConvolution c 1 1 x y 0=2 1=3 6=35\n"),
                    (d / "a.bin").write_bytes(b"\0" * 200)), r"a.param: layer 'c': weight_data_size 35 does not fit"),
        # two negative kernel dims multiply to a positive kernel size (found by fuzzing: numpy's reshape refused it)
        (lambda d: ((d / "a.param").write_text("7767517\n1 1\nConvolutionDepthWise c 1 1 x y 0=4 1=-1 6=4 7=4\n"),
                    (d / "a.bin").write_bytes(b"\0" * 200)),
         r"a.param: layer 'c': weight_data_size 4 does not fit 4 outputs of kernel \[-1, -1\]"),
        (lambda d: (d / "a.xml").write_text("<net><layers/></net>"), r"a.xml: its weights file a.bin is missing"),
        (lambda d: ((d / "a.xml").write_text('<!DOCTYPE n [<!ENTITY x "xx">]><net>&x;</net>'),
                    (d / "a.bin").write_bytes(b"")), r"a.xml: xml with a DOCTYPE/ENTITY declaration refused"),
        (lambda d: ((d / "a.xml").write_text('<net version="7"><layers/></net>'), (d / "a.bin").write_bytes(b"")),
         r"a.xml: OpenVINO IR version 7 is not read"),
        (lambda d: ((d / "a.xml").write_text("<net><layers>"), (d / "a.bin").write_bytes(b"")),
         r"a.xml: not well-formed xml"),
        (lambda d: (d / "a.params").write_bytes(struct.pack("<QQQ", 0x112, 0, 1) + struct.pack("<Ii", 0xF993FAC9, 1)),
         r"a.params: array 0 is sparse"),
        (lambda d: (d / "a.params").write_bytes(struct.pack("<QQQ", 0x112, 0, 10**9) + b"\0" * 8),
         r"a.params: declares 1,000,000,000 arrays"),
        (lambda d: (d / "a.caffemodel").write_bytes(b"\x0a\x03net"), r"a.caffemodel: not a Caffe model \(no layers"),
        (lambda d: (d / "a.caffemodel").write_bytes(b"\xa2\x06\x04\x3a\x02\x2a\x00"),
         r"a.caffemodel: layer 'layer1' blob 0 has 0 values for shape \[1, 1, 1, 1\]"),
        (lambda d: (d / "a.caffemodel").write_bytes(b"\xa2\x06\xff\xff\x01"),
         r"a.caffemodel: not a readable Caffe model"),
    ],
)  # fmt: skip
def test_bad_files_fail_in_one_line_naming_the_file(tmp_path: Path, make: object, message: str) -> None:
    make(tmp_path)  # type: ignore[operator]
    target = next(p for p in sorted(tmp_path.iterdir()) if p.suffix in (".weights", ".param", ".xml", ".params",
                                                                          ".caffemodel"))  # fmt: skip
    with pytest.raises(ModelFormatError, match=message) as info:
        load_tensors(target)
    assert "\n" not in str(info.value)


def test_openvino_constants_outside_the_bin_are_refused(tmp_path: Path) -> None:
    xml, binary = openvino_files(tmp_path, torch_layers({"0.weight": np.ones((2, 1, 3, 3), np.float32)}))
    binary.write_bytes(binary.read_bytes()[:-4])
    with pytest.raises(ModelFormatError, match=r"model.xml: constant 'l0.weight' \(f32 \[2, 1, 3, 3\]\) claims bytes"):
        load_tensors(xml)


def test_sizes_are_checked_before_anything_is_read(tmp_path: Path) -> None:
    huge = "7767517\n1 1\nConvolution c 1 1 x y 0=65536 1=3 6=40000000000\n"
    (tmp_path / "h.param").write_text(huge)
    (tmp_path / "h.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ModelFormatError, match="h.param: declares 160,000,262,144 bytes of tensors, over the limit"):
        load_tensors(tmp_path / "h.param")
    w = np.ones((50, 20, 1, 1), np.float32)  # 1,000 weights stored in 1 or 2 bytes each widen to 4,000 bytes
    xml, _ = openvino_files(tmp_path, torch_layers({"0.weight": w}), "narrow", "u8")
    with pytest.raises(ModelFormatError, match="narrow.xml: declares 4,[0-9,]+ bytes of tensors, over the limit"):
        load_tensors(xml, max_bytes=3000)
    (tmp_path / "half.params").write_bytes(mxnet_params({"arg:c_weight": w.astype("<f2")}))
    with pytest.raises(ModelFormatError, match="half.params: declares 4,000 bytes of tensors, over the limit of 3,000"):
        load_tensors(tmp_path / "half.params", max_bytes=3000)
    files = write_all(tmp_path, numpy_sd(make_cnn(5)))
    for fmt, path in files.items():
        with pytest.raises(ModelFormatError, match="over the limit of 1,000"):
            load_tensors(path, max_bytes=1000)
        assert fmt


def test_mnn_grouped_convs_split_by_the_converter_are_joined_and_matmuls_are_matrices(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    sd = {"0.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "0.bias": np.arange(8, dtype=np.float32),
          "1.weight": rng.standard_normal((5, 8)).astype(np.float32)}  # fmt: skip
    path = tmp_path / "g.mnn"
    path.write_bytes(mnn_model(torch_layers(sd), split_groups=2))
    by_name = {t.name: t for t in load_tensors(path)}
    assert by_name["l0.weight"].layout == "oihw"
    np.testing.assert_array_equal(by_name["l0.weight"].array, sd["0.weight"])
    np.testing.assert_array_equal(by_name["l0.bias"].array, sd["0.bias"])
    assert by_name["l1__matmul_converted.weight"].layout is None  # a Linear, as in the torch model: not a conv
    np.testing.assert_array_equal(by_name["l1__matmul_converted.weight"].array, sd["1.weight"])
    four_bit = tmp_path / "q4.mnn"
    four_bit.write_bytes(mnn_model(torch_layers(sd), "q4"))
    got = {t.name: t.array for t in load_tensors(four_bit)}["l0.weight"]
    step = (sd["0.weight"].reshape(8, -1).max(axis=1) - sd["0.weight"].reshape(8, -1).min(axis=1)) / 15
    assert np.all(np.abs(got - sd["0.weight"]).reshape(8, -1).max(axis=1) <= step / 2 + 1e-6)


def test_mnn_bad_files_fail_in_one_line(tmp_path: Path) -> None:
    good = mnn_model(torch_layers({"0.weight": np.ones((2, 1, 3, 3), np.float32)}), "q8")
    for name, blob, message in [
        ("short.mnn", good[:6], "truncated MNN file"),
        ("cut.mnn", good[: len(good) // 2], "truncated or corrupt MNN flatbuffer"),
        ("zero.mnn", b"\0" * 64, "truncated or corrupt MNN flatbuffer"),
    ]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ModelFormatError, match=f"{name}: {message}") as info:
            load_tensors(tmp_path / name)
        assert "\n" not in str(info.value)


def test_ncnn_dynamic_weights_read_nothing_from_the_bin(tmp_path: Path) -> None:
    from hashdb.codec.readers import ncnn

    (tmp_path / "d.param").write_text("7767517\n2 3\nInput in 0 1 x\nConvolution c 2 1 x w y 0=2 1=3 6=36 19=1\n")
    (tmp_path / "d.bin").write_bytes(b"")
    assert ncnn.read(tmp_path / "d.param", 1 << 20) == []


def test_openvino_shared_inputs_are_evaluated_once_per_weight(tmp_path: Path) -> None:
    """A weight behind a diamond of Multiply ops (each squaring the one before: both inputs the same layer)
    evaluates to w^(2^depth): a layer feeding two inputs gives both the same value (the reader evaluates it
    once per weight and reuses it, which also keeps such a chain linear, not 2^depth, in work)."""
    depth = 12
    w = np.full((2, 1, 1, 1), 1.0, np.float32)
    w[1] = -1.0
    dims = "".join(f"<dim>{d}</dim>" for d in w.shape)
    layers = [f'<layer id="0" name="w" type="Const" version="opset1"><data element_type="f32" shape="2,1,1,1" '
              f'offset="0" size="8"/><output><port id="0">{dims}</port></output></layer>']  # fmt: skip
    edges = []
    for i in range(1, depth + 1):
        layers.append(f'<layer id="{i}" name="sq{i}" type="Multiply" version="opset1"><data/><input><port id="0">'
                      f'{dims}</port><port id="1">{dims}</port></input><output><port id="2">{dims}</port></output>'
                      "</layer>")  # fmt: skip
        src_port = 0 if i == 1 else 2
        edges += [f'<edge from-layer="{i - 1}" from-port="{src_port}" to-layer="{i}" to-port="{p}"/>' for p in (0, 1)]
    conv = depth + 1
    layers.append(f'<layer id="{conv}" name="conv" type="Convolution" version="opset1"><data/><input>'
                  f'<port id="0"><dim>1</dim><dim>1</dim><dim>4</dim><dim>4</dim></port><port id="1">{dims}</port>'
                  "</input></layer>")  # fmt: skip
    edges.append(f'<edge from-layer="{depth}" from-port="2" to-layer="{conv}" to-port="1"/>')
    xml = tmp_path / "d.xml"
    body = f"<layers>{''.join(layers)}</layers><edges>{''.join(edges)}</edges>"
    xml.write_text(f'<net name="d" version="11">{body}</net>')
    (tmp_path / "d.bin").write_bytes(w.tobytes())
    (got,) = load_tensors(xml)
    np.testing.assert_array_equal(got.array, np.ones((2, 1, 1, 1), np.float32))  # (-1)^(2^12) = 1
    assert got.layout == "oihw"


def test_a_caffe_batchnorm_and_its_scale_fold_into_the_conv_before_them(tmp_path: Path) -> None:
    """Caffe keeps a BatchNorm's statistics times a moving-average factor, and its gamma and beta in a Scale layer
    after it. The reader hands them on as that BatchNorm's (hashdb/codec/readers/caffe.py), so codec v7 folds
    them into the convolution before: the model and its folded copy give one code."""
    rng = np.random.default_rng(3)
    sd = {"0.weight": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
          "1.weight": rng.standard_normal((24, 16, 3, 3)).astype(np.float32)}  # fmt: skip
    mean, var = rng.normal(0, 1, 16).astype(np.float32), rng.uniform(0.05, 5.0, 16).astype(np.float32)
    gamma, beta = rng.uniform(0.2, 3.0, 16).astype(np.float32), rng.normal(0, 1, 16).astype(np.float32)
    factor = np.array([999.0], np.float32)
    g = gamma / np.sqrt(var + np.float32(1e-5))
    plain = [("conv", sd["0.weight"], None), ("conv", sd["1.weight"], None)]
    folded = [("conv", sd["0.weight"] * g[:, None, None, None], beta - mean * g), ("conv", sd["1.weight"], None)]
    (tmp_path / "bn.caffemodel").write_bytes(caffe_model(plain, norms={0: [mean, var, factor, gamma, beta]}))
    (tmp_path / "folded.caffemodel").write_bytes(caffe_model(folded))
    names = [t.name for t in load_tensors(tmp_path / "bn.caffemodel")]
    assert {"bn0.running_mean", "bn0.running_var", "bn0.weight", "bn0.bias"} <= set(names), names
    stats = {t.name: t.array for t in load_tensors(tmp_path / "bn.caffemodel")}
    np.testing.assert_allclose(stats["bn0.running_var"], var, rtol=1e-6)
    h = ModelHasher(256)
    assert h.hash(tmp_path / "bn.caffemodel") == h.hash(tmp_path / "folded.caffemodel")


def test_a_caffe_batchnorm_whose_blobs_are_no_statistics_stays_as_stored(tmp_path: Path) -> None:
    """A BatchNorm whose moving-average factor is not one number (or whose mean and variance differ in length) is
    not read as statistics: its blobs come back flat under the layer's blob names, unscaled, and the Scale after it
    keeps its own name (no two tensors share one)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    mean, var = rng.normal(0, 1, 16).astype(np.float32), rng.uniform(0.05, 5.0, 16).astype(np.float32)
    factor = np.array([999.0, 2.0], np.float32)
    gamma, beta = rng.uniform(0.2, 3.0, 16).astype(np.float32), rng.normal(0, 1, 16).astype(np.float32)
    path = tmp_path / "odd.caffemodel"
    path.write_bytes(caffe_model([("conv", w, None)], norms={0: [mean, var, factor, gamma, beta]}))
    tensors = load_tensors(path)
    got = {t.name: t.array for t in tensors}
    assert len(got) == len(tensors), [t.name for t in tensors]
    assert "bn0.running_var" not in got and "bn0.blob2" in got, sorted(got)
    np.testing.assert_array_equal(got["bn0.blob2"], factor)
    np.testing.assert_array_equal(got["bn0.weight"], mean * factor[0])
    np.testing.assert_array_equal(got["bn0.bias"], var * factor[0])
    np.testing.assert_array_equal(got["scale0.weight"], gamma)
    np.testing.assert_array_equal(got["scale0.bias"], beta)
