"""Reader fuzz: random bytes and mutations of small valid files (truncation, byte flips, inserted and deleted
runs, edited headers) at every reader; only ModelFormatError ever escapes, and nothing from a file runs
(no file appears besides the one fuzzed). Bounded: a fixed number of examples per format, no deadline."""

from __future__ import annotations

import collections
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashdb.codec.load import _READER_MODULES, load_file, sniff_format
from hashdb.errors import ModelFormatError

EXAMPLES = 80
FUZZED: collections.Counter[str] = collections.Counter()


def _fixtures(folder: Path) -> dict[str, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    sd = model.state_dict()
    arrays = {k: v.numpy() for k, v in sd.items()}
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(sd, out.setdefault("zip.pt", folder / "zip.pt"))
        torch.save(model, out.setdefault("module.pt", folder / "module.pt"))
        torch.save(sd, out.setdefault("legacy.pt", folder / "legacy.pt"), _use_new_zipfile_serialization=False)
        torch.jit.script(model).save(str(out.setdefault("script.pt", folder / "script.pt")))
        qsd = {"w": torch.quantize_per_channel(sd["0.weight"], torch.full((3,), 0.01, dtype=torch.double),
                                               torch.zeros(3, dtype=torch.long), 0, torch.qint8)}  # fmt: skip
        torch.save(qsd, out.setdefault("quant.pt", folder / "quant.pt"))
    save_file(sd, str(out.setdefault("m.safetensors", folder / "m.safetensors")))
    np.savez(out.setdefault("m.npz", folder / "m.npz"), **arrays)
    np.savez_compressed(out.setdefault("deflated.npz", folder / "deflated.npz"), **arrays)
    np.save(out.setdefault("m.npy", folder / "m.npy"), arrays["0.weight"])
    (out.setdefault("m.pdparams", folder / "m.pdparams")).write_bytes(pickle.dumps(arrays, protocol=2))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "0.weight"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v, name=k) for k, v in arrays.items()],
    )  # fmt: skip
    onnx.save(helper.make_model(graph), str(out.setdefault("m.onnx", folder / "m.onnx")))
    q = np.round(arrays["0.weight"] * 100).astype(np.int8)
    quant = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(arrays["0.weight"])),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=0),
         helper.make_node("Conv", ["x", "w"], ["y0"]), helper.make_node("Conv", ["y0", "c"], ["y1"]),
         helper.make_node("ConvInteger", ["y1", "q", "", "z"], ["y2"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.full(3, 0.01, np.float32), "s"),
                     numpy_helper.from_array(np.zeros(3, np.int8), "z")],
    )  # fmt: skip
    onnx.save(helper.make_model(quant), str(out.setdefault("quant.onnx", folder / "quant.onnx")))
    return out


def _sibling_fixtures(folder: Path) -> dict[str, dict[str, bytes]]:
    """Formats of several files (TensorFlow bundle, Paddle inference pair, Core ML package): fixture name ->
    {relative path: bytes}; the fixture name is also the file that is mutated, the others stay intact."""
    from tests import formats_writers as fw

    w = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)
    fw.tf_checkpoint(folder / "m", fw.keras_names({"0.weight": w, "0.bias": w[:, 0, 0, 0].copy()}), block_size=64)
    tf = {name: (folder / name).read_bytes() for name in ("m.index", "m.data-00000-of-00001")}
    paddle_params = {"conv2d_0.w_0": w, "conv2d_0.b_0": w[:, 0, 0, 0].copy()}
    fw.paddle_inference(folder / "inference", paddle_params, ["conv2d_0.w_0"])
    paddle = {name: (folder / name).read_bytes() for name in ("inference.pdmodel", "inference.pdiparams")}
    lut = fw.wp_lut(np.arange(54) % 4, 2, np.arange(4, dtype=np.float32))
    stats = [np.full(3, 0.5, np.float32)] * 4  # a batchnorm layer (and below a batch_norm op) reading the conv
    nn = fw.coreml_nn(folder / "nn.mlmodel", [fw.nn_conv("c", 3, 2, (3, 3), fw.wp_float(w), fw.wp_half(w[:, 0, 0, 0])),
                                              fw.nn_batchnorm("bn", "c_out", stats),
                                              fw.nn_inner_product("fc", 6, 9, lut)])  # fmt: skip
    blobs = fw.BlobWriter()
    w16 = w.astype(np.float16)
    ops = [fw.mil_op("const", "w16", attrs={"val": fw.mil_blob_value(w16, "@model_path/weights/weight.bin",
                                                                    blobs.add(w16))}),
           fw.mil_op("cast", "w", {"x": "w16"}), fw.mil_op("conv", "y", {"x": "x", "weight": "w"}),
           *[fw.mil_op("const", f"bn_{k}", attrs={"val": fw.mil_immediate(v)}) for k, v in zip("gbmv", stats,
                                                                                                strict=True)],
           fw.mil_op("batch_norm", "n", {"x": "y", "gamma": "bn_g", "beta": "bn_b", "mean": "bn_m",
                                         "variance": "bn_v"}),
           fw.mil_op("constexpr_affine_dequantize", "v", attrs={
               "quantized_data": fw.mil_immediate(np.arange(6, dtype=np.int8).reshape(2, 3)),
               "scale": fw.mil_immediate(np.ones(2, np.float32)), "zero_point": fw.mil_immediate(np.int8(1)),
               "axis": fw.mil_immediate(np.array(0, np.int32))}),
           fw.mil_op("const", "d", attrs={"val": fw.mil_immediate(np.arange(6, dtype=np.int8).reshape(2, 3))}),
           fw.mil_op("const", "s", attrs={"val": fw.mil_immediate(np.ones((2, 1), np.float32))}),
           fw.mil_op("constexpr_blockwise_shift_scale", "b", {"data": "d", "scale": "s"}),
           fw.mil_op("constexpr_lut_to_dense", "p", attrs={
               "lut": fw.mil_immediate(np.arange(4, dtype=np.float32)),
               "indices": fw.mil_immediate(np.array([0x1B, 0xE4], np.uint8)),
               "shape": fw.mil_immediate(np.array([2, 4], np.int32))})]  # fmt: skip
    spec = fw.mlpackage(folder / "p.mlpackage", ops)
    (spec.parent / "weights" / "weight.bin").write_bytes(blobs.bytes())
    program = {"model.mlmodel": spec.read_bytes(), "weights/weight.bin": blobs.bytes()}
    return {
        "m.index": tf, "m.data-00000-of-00001": tf,
        "inference.pdiparams": paddle, "inference.pdmodel": paddle,
        "nn.mlmodel": {"nn.mlmodel": nn.read_bytes()},
        "model.mlmodel": program, "weights/weight.bin": program,
    }  # fmt: skip


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("fuzz_fixtures")
    files = _fixtures(folder)
    for path in files.values():  # every fixture reads cleanly before it is mutated
        assert load_file(path)
    return {name: path.read_bytes() for name, path in files.items()}


@pytest.fixture(scope="module")
def sibling_fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    folder = tmp_path_factory.mktemp("fuzz_sibling_fixtures")
    groups = _sibling_fixtures(folder)
    check = tmp_path_factory.mktemp("fuzz_sibling_check")
    for name, files in groups.items():  # every group reads cleanly, through the file that will be mutated
        for rel, data in files.items():
            (check / rel).parent.mkdir(parents=True, exist_ok=True)
            (check / rel).write_bytes(data)
        assert _read(_target(check, name)), name
    return groups


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """One to four edits of ``data``: truncate, flip bytes, overwrite a run, insert or delete a run, or
    rewrite a little-endian integer field (sizes, offsets, lengths) with an extreme value."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        op = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete", "int_field"]))
        at = draw(st.integers(0, len(out) - 1))
        if op == "truncate":
            del out[at:]
        elif op == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            run = draw(st.binary(min_size=1, max_size=16))
            out[at : at + len(run)] = run
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 64))]
        else:
            width = draw(st.sampled_from([2, 4, 8]))
            value = draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1, 2**40]))
            out[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return bytes(out)


OWN_FORMATS = frozenset({"torch", "pdparams", "safetensors", "npz", "npy", "onnx", "tf_bundle", "paddle_inference",
                         "coreml", "caffe", "darknet", "ncnn", "openvino", "mxnet", "mnn"})  # fmt: skip


def _read(path: Path) -> object:
    """The format's reader itself, without load_file's safety net that wraps any stray exception."""
    import importlib

    fmt = sniff_format(path)
    if fmt not in OWN_FORMATS:  # None, or keras/tflite/flax bytes: their own tests fuzz those readers
        return load_file(path)
    module, function = _READER_MODULES[fmt]
    return getattr(importlib.import_module(f"hashdb.codec.readers.{module}"), function)(path, 1 << 30)


def _check(tmp: Path, name: str, blob: bytes, companions: dict[str, bytes] | None = None) -> None:
    """Read ``blob`` as ``tmp/name`` (with the other files of its pair beside it, unmutated)."""
    path = tmp / name
    path.write_bytes(blob)
    for other, data in (companions or {}).items():
        (tmp / other).write_bytes(data)
    try:
        _read(path)
    except ModelFormatError as exc:
        message = str(exc)
        named = str(path) if not companions else str(tmp)  # a pair's error may name the other file
        assert "\n" not in message and message.startswith(named), message
    finally:
        path.unlink()
        for other in companions or {}:
            (tmp / other).unlink()
    assert list(tmp.iterdir()) == [], "a file appeared while reading"
    FUZZED[name] += 1


FORMATS = ["zip.pt", "module.pt", "legacy.pt", "script.pt", "quant.pt", "m.safetensors", "m.npz", "deflated.npz",
           "m.npy", "m.pdparams", "m.onnx", "quant.onnx"]  # fmt: skip
SIBLING_FORMATS = ["m.index", "m.data-00000-of-00001", "inference.pdiparams", "inference.pdmodel", "nn.mlmodel",
                   "model.mlmodel", "weights/weight.bin"]  # fmt: skip


def _target(folder: Path, name: str) -> Path:
    """The file read for a mutated ``name``: a blob file is read through its package's spec."""
    return folder / ("model.mlmodel" if name == "weights/weight.bin" else name)


@pytest.mark.parametrize("name", FORMATS)
def test_mutated_files_only_ever_raise_model_format_error(
    name: str, fixtures: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(st.data())
    def run(data: st.DataObject) -> None:
        _check(tmp, name, data.draw(mutations(fixtures[name])))

    before = FUZZED[name]
    run()
    assert FUZZED[name] - before == EXAMPLES


@pytest.mark.parametrize("name", SIBLING_FORMATS)
def test_mutated_files_of_several_file_formats_only_ever_raise_model_format_error(
    name: str, sibling_fixtures: dict[str, dict[str, bytes]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    files = sibling_fixtures[name]
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    counted = [0]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(st.data())
    def run(data: st.DataObject) -> None:
        (tmp / name).write_bytes(data.draw(mutations(files[name])))
        path = _target(tmp, name)
        try:
            _read(path)
        except ModelFormatError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(str(tmp)), str(exc)
        assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before, "a file appeared while reading"
        counted[0] += 1

    run()
    assert counted[0] == EXAMPLES


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors", ".npz", ".npy", ".onnx", ".pdparams",
                                    ".index", ".pdiparams", ".pdmodel", ".mlmodel"])  # fmt: skip
def test_random_bytes_only_ever_raise_model_format_error(suffix: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("rand")
    heads = [b"", b"PK\x03\x04", b"\x80\x02", b"\x93NUMPY", b"\x08\x00\x00\x00\x00\x00\x00\x00{"]

    @settings(max_examples=40, deadline=None, derandomize=True, database=None)
    @given(st.sampled_from(heads), st.binary(max_size=512))
    def run(head: bytes, body: bytes) -> None:
        _check(tmp, "r" + suffix, head + body)

    run()


def test_header_edits_of_safetensors_are_refused_cleanly(tmp_path: Path, fixtures: dict[str, bytes]) -> None:
    blob = fixtures["m.safetensors"]
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
    @given(st.data())
    def run(data: st.DataObject) -> None:
        edited = json.loads(json.dumps(header))
        name = data.draw(st.sampled_from(sorted(k for k in edited if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        value = data.draw(st.one_of(st.integers(-(2**70), 2**70), st.text(max_size=5), st.none(),
                                    st.lists(st.integers(-(2**66), 2**66), max_size=5)))  # fmt: skip
        edited[name][field] = value
        text = json.dumps(edited).encode()
        _check(tmp_path, "h.safetensors", len(text).to_bytes(8, "little") + text + blob[8 + n :])

    run()


@pytest.fixture(scope="module")
def cnn_fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, dict[str, bytes]]]:
    """Caffe, Darknet, ncnn, OpenVINO and MXNet files of one small net: name -> (bytes, the pair's other files)."""
    from cnn_format_writers import (
        caffe_model,
        darknet_files,
        mnn_model,
        mxnet_files,
        ncnn_files,
        openvino_files,
        torch_layers,
    )

    folder = tmp_path_factory.mktemp("fuzz_cnn")
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 1), nn.Flatten(), nn.Linear(4, 2))
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    layers = torch_layers(sd)
    (folder / "net.caffemodel").write_bytes(caffe_model(layers))
    (folder / "v1.caffemodel").write_bytes(caffe_model(layers, v1=True))
    darknet_files(folder, layers, "yolo", height=4)
    ncnn_files(folder, layers, "m", "fp16")
    ncnn_files(folder, layers, "q", "int8")
    openvino_files(folder, layers[:2], "ov", "u8")
    mxnet_files(folder, layers, "net")
    (folder / "m.mnn").write_bytes(mnn_model(layers))
    (folder / "q.mnn").write_bytes(mnn_model(layers, "q8", split_groups=3))
    pairs = {"net.caffemodel": [], "v1.caffemodel": [], "yolo.weights": ["yolo.cfg"], "yolo.cfg": ["yolo.weights"],
             "m.param": ["m.bin"], "m.bin": ["m.param"], "q.param": ["q.bin"], "ov.xml": ["ov.bin"],
             "ov.bin": ["ov.xml"], "net-0000.params": ["net-symbol.json"], "m.mnn": [], "q.mnn": []}  # fmt: skip
    for name in pairs:  # every fixture reads cleanly before it is mutated
        assert load_file(folder / name)
    return {name: ((folder / name).read_bytes(), {o: (folder / o).read_bytes() for o in others})
            for name, others in pairs.items()}  # fmt: skip


CNN_FORMATS = ["net.caffemodel", "v1.caffemodel", "yolo.weights", "yolo.cfg", "m.param", "m.bin", "q.param", "ov.xml",
               "ov.bin", "net-0000.params", "m.mnn", "q.mnn"]  # fmt: skip


@pytest.mark.parametrize("name", CNN_FORMATS)
def test_mutated_cnn_format_files_only_ever_raise_model_format_error(
    name: str, cnn_fixtures: dict[str, tuple[bytes, dict[str, bytes]]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("fuzz_cnn")
    blob, companions = cnn_fixtures[name]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(st.data())
    def run(data: st.DataObject) -> None:
        _check(tmp, name, data.draw(mutations(blob)), companions)

    before = FUZZED[name]
    run()
    assert FUZZED[name] - before == EXAMPLES


@pytest.mark.parametrize("suffix", [".caffemodel", ".weights", ".param", ".xml", ".params", ".mnn"])
def test_random_bytes_in_cnn_format_files_only_ever_raise_model_format_error(
    suffix: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("rand_cnn")
    heads = [b"", b"7767517\n1 1\n", (0x112).to_bytes(8, "little"), b"<net>", b"\xa2\x06"]
    companion = {".weights": ("r.cfg", b"[net]\nchannels=2\n[convolutional]\nfilters=2\nsize=1\n"),
                 ".param": ("r.bin", b"\0" * 64), ".xml": ("r.bin", b"\0" * 64)}.get(suffix)  # fmt: skip

    @settings(max_examples=40, deadline=None, derandomize=True, database=None)
    @given(st.sampled_from(heads), st.binary(max_size=512))
    def run(head: bytes, body: bytes) -> None:
        _check(tmp, "r" + suffix, head + body, dict([companion]) if companion else None)

    run()

def test_nesting_of_any_shape_and_depth_is_read_or_refused_in_one_line(tmp_path: Path) -> None:
    """Pickles nesting tuples, lists, dicts and frozensets in random orders up to 3,000 deep, as a dict key or
    a list item, raw or inside a torch zip: read, or refused in one line (refused whenever over MAX_NESTING)."""
    from test_formats_hostile import WRAPPERS, nested_pickle, zipped

    from hashdb.codec.readers.unpickler import MAX_NESTING

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
    @given(st.lists(st.sampled_from(sorted(WRAPPERS)), min_size=1, max_size=12), st.integers(1, 3000),
           st.booleans(), st.booleans())  # fmt: skip
    def run(pattern: list[str], depth: int, as_key: bool, in_zip: bool) -> None:
        pkl = nested_pickle((pattern * depth)[:depth], as_key)
        path = tmp_path / ("n.pt" if in_zip else "n.pdparams")
        path.write_bytes(zipped(pkl) if in_zip else pkl)
        try:
            _read(path)
            assert depth <= MAX_NESTING
        except ModelFormatError as exc:
            assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)
            assert ("nests objects over" in str(exc)) == (depth > MAX_NESTING), str(exc)
        FUZZED["nesting"] += 1

    run()
    assert FUZZED["nesting"] == EXAMPLES


def test_views_and_aliases_are_read_within_the_byte_budget_or_refused(tmp_path: Path) -> None:
    """Hand-built torch views (any size, stride 0 included, any offset) over a small storage, and pdparams
    arrays referenced many times through the memo: what is read never exceeds MAX_EXPANSION x the bytes
    stored (plus the floor), and anything else is refused in one line."""
    from formats_fixtures import HandTensor, torch_pickle, torch_zip

    from hashdb.codec.readers import EXPANSION_FLOOR, MAX_EXPANSION

    dims = st.lists(st.tuples(st.integers(0, 1 << 13), st.integers(0, 3)), min_size=1, max_size=3)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None)
    @given(st.integers(1, 64), st.lists(st.tuples(dims, st.integers(0, 8)), min_size=1, max_size=4),
           st.integers(1, 600), st.integers(1, 1 << 16))  # fmt: skip
    def run(numel: int, views: list, aliases: int, array_len: int) -> None:
        tensors = {f"t{i}": HandTensor("0", offset, tuple(n for n, _ in d), tuple(s for _, s in d))
                   for i, (d, offset) in enumerate(views)}  # fmt: skip
        pt = tmp_path / "views.pt"
        pt.write_bytes(torch_zip(torch_pickle(tensors, {"0": ("FloatStorage", numel)}), {"0": bytes(4 * numel)}))
        arr = np.ones(array_len, np.float32)
        pd = tmp_path / "alias.pdparams"
        pd.write_bytes(pickle.dumps({f"w{i}": arr for i in range(aliases)}, protocol=2))
        for path, stored in ((pt, 4 * numel), (pd, arr.nbytes)):
            try:
                produced = sum(t.array.nbytes for t in _read(path))  # type: ignore[attr-defined]
                assert produced <= MAX_EXPANSION * stored + EXPANSION_FLOOR
            except ModelFormatError as exc:
                assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)
            FUZZED["views and aliases"] += 1

    run()
    assert FUZZED["views and aliases"] == 2 * EXAMPLES
