"""Paddle inference models (``.pdmodel`` + ``.pdiparams``) written by tests/formats_writers.py from
framework.proto and save_combine's LoDTensor layout (no paddle)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from hashdb.codec import ModelHasher, load_tensors
from hashdb.codec.load import load_file
from hashdb.codec.units import find_units
from hashdb.errors import ModelFormatError
from tests.formats_fixtures import make_cnn
from tests.formats_writers import lod_tensor, paddle_inference


def paddle_params(seed: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """make_cnn's weights under Paddle's generated names (conv2d_N.w_0, batch_norm_0.w_1 ...), int64 step beside."""
    sd = {k: v.numpy() for k, v in make_cnn(seed).state_dict().items() if v.is_floating_point()}
    rename = {"0.weight": "conv2d_0.w_0", "0.bias": "conv2d_0.b_0", "2.weight": "conv2d_1.w_0",
              "2.bias": "conv2d_1.b_0", "3.weight": "batch_norm_0.w_0", "3.bias": "batch_norm_0.b_0",
              "3.running_mean": "batch_norm_0.w_1", "3.running_var": "batch_norm_0.w_2",
              "5.weight": "conv2d_2.w_0", "5.bias": "conv2d_2.b_0"}  # fmt: skip
    params = {rename[k]: v for k, v in sd.items()}
    params["@LR_DECAY_COUNTER@"] = np.array([3], dtype=np.int64)
    return params, ["conv2d_0.w_0", "conv2d_1.w_0", "conv2d_2.w_0"]


@pytest.fixture(scope="module")
def hasher() -> ModelHasher:
    return ModelHasher(bits=256)


def test_inference_pair_reads_named_oihw_filters(tmp_path: Path, hasher: ModelHasher) -> None:
    params, filters = paddle_params(0)
    path = paddle_inference(tmp_path / "inference", params, filters)
    tensors = {t.name: t for t in load_tensors(path)}
    assert sorted(tensors) == sorted(k for k in params if params[k].dtype.kind == "f")
    for name in filters:
        assert tensors[name].layout == "oihw"
        np.testing.assert_array_equal(tensors[name].array, params[name])
    assert tensors["batch_norm_0.w_1"].layout is None
    code = hasher.hash(make_cnn(0))
    assert hasher.hash(path) == code
    assert hasher.hash(tmp_path / "inference.pdmodel") == code  # named by its program
    assert hasher.hash(tmp_path) == code  # the folder is one unit


def test_params_without_program_read_by_shape(tmp_path: Path, hasher: ModelHasher) -> None:
    params, filters = paddle_params(1)
    path = paddle_inference(tmp_path / "model", params, filters)
    (tmp_path / "model.pdmodel").unlink()
    tensors = load_file(path)
    assert [t.name for t in tensors][:2] == ["param_1", "param_2"]  # param_0 is the int64 counter
    assert hasher.hash(path) == hasher.hash(make_cnn(1))


def test_lod_levels_half_precision_and_folder_walk(tmp_path: Path) -> None:
    w = np.random.default_rng(2).standard_normal((4, 2, 3, 3)).astype(np.float16)
    det, rec = tmp_path / "ocr" / "det", tmp_path / "ocr" / "rec"
    det.mkdir(parents=True)
    rec.mkdir()
    path = paddle_inference(det / "inference", {"w": w}, ["w"])
    path.write_bytes(lod_tensor(w, lod=[[0, 2, 4], [0, 1]]))  # LoD levels are skipped over
    (det / "inference.pdiparams.info").write_bytes(b"\x00")
    paddle_inference(rec / "a", {"w": w}, ["w"])
    paddle_inference(rec / "b", {"w": w}, ["w"])
    np.testing.assert_array_equal(load_tensors(det)[0].array, w.astype(np.float32))
    keys = [u.key.split("ocr/", 1)[1] for u in find_units(tmp_path / "ocr")]
    assert keys == ["det", "rec/a.pdiparams", "rec/b.pdiparams"]


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    params, filters = paddle_params(3)
    path = paddle_inference(tmp_path / "m", params, filters)
    blob = path.read_bytes()
    cases = [
        (blob[:-7], "m.pdiparams: not a readable Paddle params file .* runs past the end of the file"),
        (struct.pack("<IQ", 5, 0) + blob[12:], r"m.pdiparams: .*unknown LoDTensor version 5"),
        (struct.pack("<IQQ", 0, 1, 2**63) + blob[12:], r"m.pdiparams: .*LoD level of .* bytes runs past"),
        (blob + lod_tensor(np.zeros(3, np.float32)), r"m.pdiparams: holds 12 tensors, m.pdmodel lists 11"),
        (b"", r"m.pdiparams: empty Paddle params file"),
    ]
    for data, message in cases:
        path.write_bytes(data)
        with pytest.raises(ModelFormatError, match=f"^{tmp_path}/{message}") as info:
            load_file(path)
        assert "\n" not in str(info.value)
    path.write_bytes(blob)
    with pytest.raises(ModelFormatError, match="over the limit"):
        load_file(path, 1000)
    (tmp_path / "m.pdmodel").write_bytes(b"\x0a\xff\x01")
    with pytest.raises(ModelFormatError, match=f"^{tmp_path}/m.pdmodel: not a readable Paddle program"):
        load_file(path)
    path.unlink()
    with pytest.raises(ModelFormatError, match=f"^{tmp_path}/m.pdmodel: the weights file m.pdiparams is missing"):
        load_file(tmp_path / "m.pdmodel")


def test_a_batch_norm_op_after_a_conv_folds_into_it(tmp_path: Path, hasher: ModelHasher) -> None:
    """The program says which convolution a batch_norm op reads: its parameters are renamed after that filter
    (``conv2d_1.w_0.bn.running_var``), and codec v7 folds them in, so the Paddle model with trained-looking
    BatchNorm statistics hashes like the PyTorch model it was exported from; a program without the op leaves
    them unpaired (Paddle's names, ``batch_norm_0.w_2``, say nothing of their role)."""
    model = make_cnn(3)
    rng = np.random.default_rng(3)
    bn = model[3]
    bn.weight.data = torch.from_numpy(rng.uniform(0.2, 3.0, 24).astype(np.float32))
    bn.running_var.data = torch.from_numpy(rng.uniform(0.05, 5.0, 24).astype(np.float32))
    sd = {k: v.numpy() for k, v in model.state_dict().items() if v.is_floating_point()}
    params, filters = paddle_params(3)
    params.update({"batch_norm_0.w_0": sd["3.weight"], "batch_norm_0.w_2": sd["3.running_var"]})
    norm = {"Scale": "batch_norm_0.w_0", "Bias": "batch_norm_0.b_0", "Mean": "batch_norm_0.w_1",
            "Variance": "batch_norm_0.w_2"}  # fmt: skip
    path = paddle_inference(tmp_path / "bn", params, filters, norms={"conv2d_1.w_0": norm})
    names = {t.name for t in load_tensors(path)}
    assert {"conv2d_1.w_0.bn.weight", "conv2d_1.w_0.bn.running_var"} <= names, names
    code = hasher.hash(model)
    assert hasher.hash(path) == code
    assert hasher.hash(paddle_inference(tmp_path / "plain", params, filters)) != code
