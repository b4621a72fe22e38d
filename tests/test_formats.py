"""Every file format hashes exactly like the state_dict it holds; bad files fail in one clean line; nothing
from a file ever runs; sizes are checked from headers before anything is allocated."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from formats_fixtures import HandTensor, bomb_npz, bomb_pt, make_cnn, perturbed, torch_pickle, torch_zip

from hashdb.codec import ModelHasher
from hashdb.codec.load import load_tensors
from hashdb.errors import ModelFormatError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hasher() -> ModelHasher:
    return ModelHasher(256)


def distance(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(bytes(x ^ y for x, y in zip(a, b, strict=True)), np.uint8)).sum())


def quiet_save(obj: object, path: Path, **kwargs: object) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(obj, path, **kwargs)
    return path


# ---------------------------------------------------------------- torch pickles of every kind


class LostNet(nn.Module):
    """Saved whole under a module name that does not exist when the file is read."""

    def __init__(self) -> None:
        super().__init__()
        self.features = make_cnn(3)
        self.head = nn.Conv2d(24, 8, 3)


def test_every_torch_save_style_gives_the_state_dict_code(tmp_path: Path, hasher: ModelHasher) -> None:
    model = make_cnn(1)
    code = hasher.hash(model.state_dict())
    files = {
        "sd.pt": quiet_save(model.state_dict(), tmp_path / "sd.pt"),
        "legacy.pt": quiet_save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False),
        "module.pt": quiet_save(model, tmp_path / "module.pt"),
        "module_legacy.pth": quiet_save(model, tmp_path / "module_legacy.pth", _use_new_zipfile_serialization=False),
        "train.ckpt": quiet_save(
            {
                "epoch": 7,
                "model": model.state_dict(),
                "optimizer": torch.optim.Adam(model.parameters()).state_dict(),
                "loss": 0.25,
            },
            tmp_path / "train.ckpt",
        ),  # fmt: skip
    }
    # an optimizer with state: its moment tensors have the conv shapes and must not be hashed
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 12, 12)).sum().backward()
    opt.step()
    files["train_state.pt"] = quiet_save({"state_dict": model.state_dict(), "optimizer": opt.state_dict()},
                                         tmp_path / "train_state.pt")  # fmt: skip
    stepped = hasher.hash(model.state_dict())
    for name, path in files.items():
        assert hasher.hash(path) == (stepped if name == "train_state.pt" else code), name


def test_whole_module_of_a_class_that_cannot_be_imported(tmp_path: Path, hasher: ModelHasher) -> None:
    import types

    lost = types.ModuleType("lost_project_models")
    LostNet.__module__ = "lost_project_models"
    lost.LostNet = LostNet  # type: ignore[attr-defined]
    sys.modules["lost_project_models"] = lost
    try:
        model = LostNet()
        quiet_save(model, tmp_path / "lost.pt")
        quiet_save(model, tmp_path / "lost_legacy.pt", _use_new_zipfile_serialization=False)
    finally:
        del sys.modules["lost_project_models"]
    names = [t.name for t in load_tensors(tmp_path / "lost.pt")]
    # dotted names through _modules, as state_dict() gives them
    assert names == [k for k, v in model.state_dict().items() if v.is_floating_point()]
    for name in ("lost.pt", "lost_legacy.pt"):
        assert hasher.hash(tmp_path / name) == hasher.hash(model), name


def test_half_bf16_and_fp8_tensors_read_as_their_float32_upcast(tmp_path: Path, hasher: ModelHasher) -> None:
    sd = make_cnn(2).state_dict()
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        cast = {k: v.to(dtype) for k, v in sd.items() if v.is_floating_point()}
        path = quiet_save(cast, tmp_path / f"{str(dtype)[6:]}.pt")
        got = {t.name: t.array for t in load_tensors(path)}
        for k, v in cast.items():
            assert np.array_equal(got[k], v.float().numpy(), equal_nan=True), (dtype, k)
        assert hasher.hash(path) == hasher.hash({k: v.float() for k, v in cast.items()})


def test_quantized_tensors_are_dequantized(tmp_path: Path, hasher: ModelHasher) -> None:
    sd = make_cnn(4).state_dict()

    def per_channel(v: torch.Tensor) -> torch.Tensor:
        scales = v.flatten(1).abs().amax(1).double() / 127
        return torch.quantize_per_channel(v, scales, torch.zeros(len(scales), dtype=torch.long), 0, torch.qint8)

    def per_tensor(v: torch.Tensor) -> torch.Tensor:
        return torch.quantize_per_tensor(v, 0.01, 128, torch.quint8)

    for name, q in (("per_channel", per_channel), ("per_tensor", per_tensor)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch deprecates making qint8 tensors; files holding them remain
            qsd = {k: (q(v) if v.ndim == 4 else v) for k, v in sd.items()}
        path = quiet_save(qsd, tmp_path / f"{name}.pt")
        deq = {k: (v.dequantize() if v.is_quantized else v) for k, v in qsd.items()}
        assert hasher.hash(path) == hasher.hash(deq) == hasher.hash(qsd), name
        assert distance(hasher.hash(path), hasher.hash(sd)) <= hasher.copy_radius, name


def test_statically_quantized_model_hashes_near_its_float_original(tmp_path: Path, hasher: ModelHasher) -> None:
    import torch.ao.quantization as tq

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.body, self.dequant = tq.QuantStub(), make_cnn(5), tq.DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dequant(self.body(self.quant(x)))

    model = Net().eval()
    model.qconfig = tq.get_default_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = tq.prepare(model)
        prepared(torch.randn(8, 3, 16, 16))
        quantized = tq.convert(prepared)
    path = quiet_save(quantized.state_dict(), tmp_path / "static_q.pt")
    assert hasher.hash(path) == hasher.hash(quantized.state_dict())
    assert distance(hasher.hash(path), hasher.hash(Net().body.state_dict())) <= hasher.copy_radius


def test_pruned_without_remove_equals_pruned_and_removed(tmp_path: Path, hasher: ModelHasher) -> None:
    import torch.nn.utils.prune as prune

    pruned = make_cnn(6)
    for layer in (pruned[0], pruned[2], pruned[5]):
        prune.l1_unstructured(layer, "weight", 0.4)
    assert any(k.endswith("weight_mask") for k in pruned.state_dict())
    quiet_save(pruned.state_dict(), tmp_path / "masked.pt")
    quiet_save(pruned, tmp_path / "masked_module.pt")
    masked_code = hasher.hash(pruned)
    for layer in (pruned[0], pruned[2], pruned[5]):
        prune.remove(layer, "weight")
    code = hasher.hash(pruned.state_dict())
    assert masked_code == code
    assert hasher.hash(tmp_path / "masked.pt") == code
    assert hasher.hash(tmp_path / "masked_module.pt") == code
    assert not any("mask" in t.name or "orig" in t.name for t in load_tensors(tmp_path / "masked.pt"))


def test_paddle_pdparams_pickled_numpy_arrays(tmp_path: Path, hasher: ModelHasher) -> None:
    model = make_cnn(7)
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    arrays["conv.weight_fortran"] = np.asfortranarray(arrays["0.weight"])
    for protocol in (2, 4):
        path = tmp_path / f"m{protocol}.pdparams"
        path.write_bytes(pickle.dumps(arrays, protocol=protocol))
        got = {t.name: t.array for t in load_tensors(path)}
        assert np.array_equal(got["conv.weight_fortran"], arrays["0.weight"])
        del got["conv.weight_fortran"]
        assert hasher.hash(path) == hasher.hash({**arrays, "conv.weight_fortran": arrays["0.weight"]})


def test_a_modified_copy_stays_within_copy_radius_in_every_format(tmp_path: Path, hasher: ModelHasher) -> None:
    from safetensors.torch import save_file

    model = make_cnn(8)
    copy = perturbed(model, 0.01, seed=1)
    original = hasher.hash(model)
    quiet_save(copy, tmp_path / "copy.pt")
    quiet_save(copy, tmp_path / "copy_legacy.pt", _use_new_zipfile_serialization=False)
    save_file(copy, str(tmp_path / "copy.safetensors"))
    np.savez_compressed(tmp_path / "copy.npz", **{k: v.numpy() for k, v in copy.items()})
    (tmp_path / "copy.pdparams").write_bytes(pickle.dumps({k: v.numpy() for k, v in copy.items()}, protocol=4))
    for name in ("copy.pt", "copy_legacy.pt", "copy.safetensors", "copy.npz", "copy.pdparams"):
        assert hasher.hash(tmp_path / name) == hasher.hash(copy), name
        assert distance(hasher.hash(tmp_path / name), original) <= hasher.copy_radius, name


def test_npy_holds_one_tensor(tmp_path: Path, hasher: ModelHasher) -> None:
    w = make_cnn(9).state_dict()["2.weight"].numpy()
    np.save(tmp_path / "w.npy", w)
    (t,) = load_tensors(tmp_path / "w.npy")
    assert t.name == "w" and np.array_equal(t.array, w)
    assert hasher.hash(tmp_path / "w.npy") == hasher.hash({"w": w})
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ModelFormatError, match=r"obj\.npy: holds Python objects"):
        load_tensors(tmp_path / "obj.npy")


def test_npy_and_npz_oddities_found_by_fuzzing(tmp_path: Path) -> None:
    """A shape of booleans passes numpy's own header check (bool is an int): refused in our words. A member with
    an empty name made zipfile's is_dir raise IndexError: it is read like any other."""
    buf = io.BytesIO()
    np.save(buf, np.ones((2, 3, 3, 3), np.float32))
    npy = buf.getvalue()
    header_end = npy.index(b"\n") + 1
    header = npy[:header_end].replace(b"(2, 3, 3, 3)", b"(True, 3, 3, 3)")
    header = header[:-1].ljust(header_end - 1) + b"\n"  # the header keeps its padded length
    (tmp_path / "bool.npy").write_bytes(header + npy[header_end:])
    with pytest.raises(ModelFormatError, match=r"bool\.npy: bad \.npy header \(shape \(True, 3, 3, 3\)\)$"):
        load_tensors(tmp_path / "bool.npy")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("A", npy)
    raw = bytearray(archive.getvalue())  # the member's one-letter name taken out of both its headers
    assert raw[26:28] == b"\x01\x00"
    raw[26:28] = b"\0\0"
    del raw[30]
    entry = raw.rfind(b"PK\x01\x02")
    raw[entry + 28 : entry + 30] = b"\0\0"
    del raw[entry + 46]
    end = raw.rfind(b"PK\x05\x06")
    size, offset = struct.unpack("<II", raw[end + 12 : end + 20])
    raw[end + 12 : end + 20] = struct.pack("<II", size - 1, offset - 1)
    (tmp_path / "noname.npz").write_bytes(bytes(raw))
    assert zipfile.ZipFile(tmp_path / "noname.npz").namelist() == [""]
    ((name, array),) = [(t.name, t.array) for t in load_tensors(tmp_path / "noname.npz")]
    assert name == "" and np.array_equal(array, np.ones((2, 3, 3, 3), np.float32))


# ---------------------------------------------------------------- payloads never run


def _payload_pickles(marker: Path) -> dict[str, bytes]:
    """Pickles that would create ``marker`` if anything in them ran, built opcode by opcode."""
    cmd = f"touch {marker}".encode()
    py = f"open({str(marker)!r}, 'w').write('ran')".encode()

    def global_call(module: bytes, name: bytes, arg: bytes) -> bytes:  # protocol 2: c MODULE\nNAME\n (arg) R
        return b"c" + module + b"\n" + name + b"\n" + b"X" + len(arg).to_bytes(4, "little") + arg + b"\x85R"

    out = {}
    for module, name, arg in ((b"os", b"system", cmd), (b"posix", b"system", cmd), (b"builtins", b"exec", py),
                              (b"builtins", b"eval", py), (b"__builtin__", b"eval", py)):  # fmt: skip
        out[f"{module.decode()}.{name.decode()}"] = b"\x80\x02" + global_call(module, name, arg) + b"."
    # subprocess.Popen(['touch', marker])
    argv = b"]" + b"".join(b"X" + len(a).to_bytes(4, "little") + a + b"a" for a in (b"touch", str(marker).encode()))
    out["subprocess.Popen"] = b"\x80\x02csubprocess\nPopen\n" + argv + b"\x85R."
    # a payload as the storage offset of a real tensor rebuild, and as the result handed to BUILD
    out["inside_rebuild"] = (
        b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(" + global_call(b"os", b"system", cmd)
        + b"K\x00K\x01\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs."
    )  # fmt: skip
    # BUILD on one of our own rebuild functions (an attempt to patch the reader) and on a stub class
    out["build_on_reader"] = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x08\x00\x00\x00__call__K\x01sb."
    imported = global_call(b"builtins", b"__import__", b"os")
    out["getattr_chain"] = b"\x80\x02cbuiltins\ngetattr\n" + imported + b"X\x06\x00\x00\x00system\x86R."
    return out


def test_payloads_never_run_whatever_they_name(tmp_path: Path, hasher: ModelHasher) -> None:
    marker = tmp_path / "PWNED"
    sd_pkl = torch_pickle({"w": HandTensor("0", 0, (4, 3, 3, 3), (27, 9, 3, 1))}, {"0": ("FloatStorage", 108)})
    weights = np.random.default_rng(0).standard_normal(108).astype("<f4").tobytes()
    results = {}
    for name, payload in _payload_pickles(marker).items():
        for kind, path in (("pickle", tmp_path / f"{name}.pt"), ("zip", tmp_path / f"{name}_zip.pt")):
            if kind == "pickle":
                path.write_bytes(payload)
            else:
                path.write_bytes(torch_zip(payload, {"0": weights}))
            try:
                load_tensors(path)
                results[(name, kind)] = "tensors"
            except ModelFormatError as exc:
                assert str(exc).startswith(str(path)) and "\n" not in str(exc) and "\x1b" not in str(exc)
                results[(name, kind)] = "error"
            assert not marker.exists(), (name, kind)
    assert set(results.values()) == {"error"}  # none of these holds a float tensor once its payload is inert
    # a real checkpoint carrying a payload next to its weights: the weights hash, the payload stays inert
    mixed = tmp_path / "mixed.pt"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    quiet_save({"state_dict": make_cnn(0).state_dict(), "hook": Payload()}, mixed)
    assert hasher.hash(mixed) == hasher.hash(make_cnn(0))
    assert not marker.exists()
    hand = tmp_path / "hand.pt"
    hand.write_bytes(torch_zip(sd_pkl, {"0": weights}))
    assert np.array_equal(load_tensors(hand)[0].array.ravel(), np.frombuffer(weights, "<f4"))


def test_reader_objects_cannot_be_patched_by_a_pickle(tmp_path: Path) -> None:
    from hashdb.codec.readers import unpickler as reader

    path = tmp_path / "patch.pt"
    path.write_bytes(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x04\x00\x00\x00funcK\x01sb.")
    with pytest.raises(ModelFormatError, match="patch.pt"):
        load_tensors(path)
    assert reader._ALLOWED[("torch._utils", "_rebuild_tensor_v2")].func is reader._rebuild_tensor


# ---------------------------------------------------------------- clean errors


def test_random_corrupt_and_truncated_files_fail_in_one_clean_line(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = make_cnn(10)
    rng = np.random.default_rng(1)
    (tmp_path / "random.pt").write_bytes(rng.bytes(4096))
    with pytest.raises(ModelFormatError, match=r"random\.pt: not a model file: unrecognised bytes"):
        load_tensors(tmp_path / "random.pt")
    good = {
        "m.pt": quiet_save(model.state_dict(), tmp_path / "m.pt"),
        "legacy.pt": quiet_save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False),
        "m.safetensors": tmp_path / "m.safetensors",
        "m.npz": tmp_path / "m.npz",
        "m.npy": tmp_path / "m.npy",
    }
    save_file(model.state_dict(), str(good["m.safetensors"]))
    np.savez(good["m.npz"], **{k: v.numpy() for k, v in model.state_dict().items()})
    np.save(good["m.npy"], model.state_dict()["0.weight"].numpy())
    for name, path in good.items():
        data = path.read_bytes()
        for cut in (3, 20, len(data) // 2, len(data) - 7):
            bad = tmp_path / f"cut{cut}_{name}"
            bad.write_bytes(data[:cut])
            with pytest.raises(ModelFormatError) as info:
                load_tensors(bad)
            msg = str(info.value)
            assert msg.startswith(str(bad)) and "\n" not in msg and "Traceback" not in msg, msg


def test_safetensors_header_is_validated_as_the_format_specifies(tmp_path: Path, hasher: ModelHasher) -> None:
    w = np.ones((4, 3, 3, 3), np.float32)

    def write(name: str, header: dict, body: bytes, raw_len: int | None = None) -> Path:
        text = json.dumps(header).encode()
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes((raw_len if raw_len is not None else len(text)).to_bytes(8, "little") + text + body)
        return path

    body = w.tobytes()
    ok = write("ok", {"w": {"dtype": "F32", "shape": [4, 3, 3, 3], "data_offsets": [0, len(body)]}}, body)
    (t,) = load_tensors(ok)
    assert np.array_equal(t.array, w) and not t.array.flags.owndata  # a view of the mapped file, not a copy
    n = len(body)
    cases = {
        "negative_dim": ({"w": {"dtype": "F32", "shape": [-1, 3, 3, 3], "data_offsets": [0, n]}}, "non-negative"),
        "negative_offset": ({"w": {"dtype": "F32", "shape": [4, 3, 3, 3], "data_offsets": [-n, 0]}}, "bad data_off"),
        "past_end": ({"w": {"dtype": "F32", "shape": [4, 3, 3, 3], "data_offsets": [432, 864]}}, "outside"),
        "wrong_length": ({"w": {"dtype": "F32", "shape": [4, 3, 3, 2], "data_offsets": [0, len(body)]}}, "needs"),
        "unknown_dtype": ({"w": {"dtype": "Q4", "shape": [4, 3, 3, 3], "data_offsets": [0, len(body)]}}, "unknown"),
        "overlap": ({"a": {"dtype": "F32", "shape": [54], "data_offsets": [0, 216]},
                     "b": {"dtype": "F32", "shape": [54], "data_offsets": [108, 324]}}, "overlaps"),
        "hole": ({"a": {"dtype": "F32", "shape": [27], "data_offsets": [0, 108]},
                  "b": {"dtype": "F32", "shape": [27], "data_offsets": [216, 324]}}, "hole"),
        "not_an_object": ([1, 2], "not a JSON object"),
        "extra_bytes": ({"w": {"dtype": "F32", "shape": [27], "data_offsets": [0, 108]}}, "no tensor accounts"),
    }  # fmt: skip
    for name, (header, words) in cases.items():
        path = write(name, header, body)  # type: ignore[arg-type]
        with pytest.raises(ModelFormatError, match=words):
            load_tensors(path)
    huge = write("huge_header", {}, b"", raw_len=1 << 40)
    with pytest.raises(ModelFormatError, match="bad safetensors header length"):
        load_tensors(huge)
    short = write("short_header", {"w": {}}, b"", raw_len=10_000)
    with pytest.raises(ModelFormatError, match="truncated safetensors header"):
        load_tensors(short)


# ---------------------------------------------------------------- ONNX external data


def _onnx_with_external(folder: Path, location: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    w = make_cnn(11).state_dict()["0.weight"].numpy()
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(w.shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(w.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[tensor],
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_onnx_external_data_resolves_inside_the_model_folder_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hasher: ModelHasher
) -> None:
    w = make_cnn(11).state_dict()["0.weight"].numpy()
    secret = np.full_like(w, 7.0)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "weights.bin").write_bytes(secret.tobytes())  # a file of that name in the working directory
    monkeypatch.chdir(cwd)
    model = _onnx_with_external(tmp_path / "m", "weights.bin")
    with pytest.raises(ModelFormatError, match="external data file 'weights.bin' not found"):
        load_tensors(model)  # never the CWD's file
    (tmp_path / "m" / "weights.bin").write_bytes(w.tobytes())
    (t,) = load_tensors(model)
    assert np.array_equal(t.array, w) and t.layout == "oihw"
    escapes = (("../cwd/weights.bin", "outside the model's folder"), (str(cwd / "weights.bin"), "refused"))
    for location, words in escapes:
        path = _onnx_with_external(tmp_path / f"x{len(location)}", location)
        with pytest.raises(ModelFormatError, match=words):
            load_tensors(path)
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "weights.bin").symlink_to(cwd / "weights.bin")
    with pytest.raises(ModelFormatError, match="outside the model's folder"):
        load_tensors(_onnx_with_external(tmp_path / "link", "weights.bin"))


def test_onnx_initializers_hash_like_the_state_dict(tmp_path: Path, hasher: ModelHasher) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    sd = {k: v.numpy() for k, v in make_cnn(12).state_dict().items()}
    inits = [numpy_helper.from_array(v, name=k) for k, v in sd.items()]
    inits.append(numpy_helper.from_array(sd["2.weight"].astype(np.float16), name="half"))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "0.weight"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    got = {t.name: t for t in load_tensors(tmp_path / "m.onnx")}
    assert got["0.weight"].layout == "oihw" and got["2.weight"].layout is None
    assert np.array_equal(got["half"].array, sd["2.weight"].astype(np.float16).astype(np.float32))
    assert hasher.hash(tmp_path / "m.onnx") == hasher.hash({**sd, "half": got["half"].array})


def test_an_onnx_batchnormalization_after_a_conv_folds_into_it(tmp_path: Path, hasher: ModelHasher) -> None:
    """The graph says which Conv a BatchNormalization reads: its parameters, whatever the exporter named them,
    are renamed after that Conv's weight (``w1.bn.running_var``), and codec v7 folds them in, so the graph hashes
    like the PyTorch model with its BatchNorm; the same graph with its statistics left as plain initializers of
    a Conv-free name does not pair them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = make_cnn(13)
    rng = np.random.default_rng(13)
    model[3].weight.data = torch.from_numpy(rng.uniform(0.2, 3.0, 24).astype(np.float32))
    model[3].running_var.data = torch.from_numpy(rng.uniform(0.05, 5.0, 24).astype(np.float32))
    sd = {k: v.numpy() for k, v in model.state_dict().items() if v.is_floating_point()}
    names = {"0.weight": "w0", "2.weight": "w1", "5.weight": "w2", "3.weight": "onnx::g", "3.bias": "onnx::b",
             "3.running_mean": "onnx::m", "3.running_var": "onnx::v"}  # fmt: skip
    inits = [numpy_helper.from_array(sd[k], name=v) for k, v in names.items()]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w1"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "onnx::g", "onnx::b", "onnx::m", "onnx::v"], ["d"]),
             helper.make_node("Relu", ["d"], ["e"]), helper.make_node("Conv", ["e", "w2"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    onnx.save(helper.make_model(graph), str(tmp_path / "bn.onnx"))
    got = {t.name for t in load_tensors(tmp_path / "bn.onnx")}
    assert {"w1.bn.weight", "w1.bn.running_var", "w1.bn.running_mean", "w1.bn.bias"} <= got, got
    assert hasher.hash(tmp_path / "bn.onnx") == hasher.hash(model)
    nodes[3] = helper.make_node("Identity", ["c"], ["d"])  # no BatchNormalization node: nothing says whose they are
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    onnx.save(helper.make_model(graph), str(tmp_path / "plain.onnx"))
    assert hasher.hash(tmp_path / "plain.onnx") != hasher.hash(model)


# ---------------------------------------------------------------- size limits


def test_compression_bombs_fail_in_one_line_without_allocating(tmp_path: Path) -> None:
    pt = bomb_pt(tmp_path / "bomb.pt")  # ~5 MB holding a 1 GiB tensor
    npz = bomb_npz(tmp_path / "bomb.npz")  # ~9 MB inflating to 2 GiB
    assert pt.stat().st_size < 8 << 20 and npz.stat().st_size < 16 << 20
    assert zipfile.ZipFile(pt).infolist()[-1].file_size == 1 << 30
    tracemalloc.start()
    try:
        for path in (pt, npz):
            with pytest.raises(ModelFormatError, match="compression bomb"):
                ModelHasher(256).hash(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "hashdb", "hash", str(pt), str(npz)], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and all("compression bomb" in line for line in lines), done.stderr


def test_size_limit_is_configurable_by_argument_and_environment(tmp_path: Path, hasher: ModelHasher) -> None:
    from safetensors.torch import save_file

    model = make_cnn(13)
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    quiet_save(model.state_dict(), tmp_path / "m.pt")
    np.savez(tmp_path / "m.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
    nbytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    for name in ("m.safetensors", "m.pt", "m.npz"):
        with pytest.raises(ModelFormatError, match="over the limit of 1,000"):
            ModelHasher(256, max_bytes=1000).hash(tmp_path / name)
        assert ModelHasher(256, max_bytes=nbytes + 4096).hash(tmp_path / name) == hasher.hash(model)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HASHDB_MAX_MODEL_BYTES": "1000"}
    done = subprocess.run([sys.executable, "-m", "hashdb", "hash", str(tmp_path / "m.pt")], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "HASHDB_MAX_MODEL_BYTES" in done.stderr and len(done.stderr.splitlines()) == 1
    pt = bomb_pt(tmp_path / "declared.pt", 64 << 20)
    with pytest.raises(ModelFormatError, match="over the limit"):
        ModelHasher(256, max_bytes=32 << 20).hash(pt)


def test_reading_files_never_imports_torch(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = make_cnn(14)
    quiet_save(model.state_dict(), tmp_path / "m.pt")
    quiet_save(model, tmp_path / "whole.pt")
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    paths = [str(tmp_path / n) for n in ("m.pt", "whole.pt", "m.safetensors")]
    script = (
        "import sys, hashdb.codec as c\n"
        f"codes = [c.hash_model(p, 256).hex() for p in {paths!r}]\n"
        "assert 'torch' not in sys.modules\n"
        "print(' '.join(codes))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == {ModelHasher(256).hash(model).hex()}


def test_torchscript_archive_runs_no_code_and_reads_nested_modules(tmp_path: Path, hasher: ModelHasher) -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.gate = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.gate * self.conv(x)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), Block(), Block())
    path = tmp_path / "ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export: files still exist
        torch.jit.script(model).save(str(path))
    assert sorted(t.name for t in load_tensors(path)) == sorted(k for k in model.state_dict())
    assert hasher.hash(path) == hasher.hash(model)
    traced = tmp_path / "traced.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, torch.randn(1, 3, 10, 10)).save(str(traced))
    assert hasher.hash(traced) == hasher.hash(model)


def test_mapping_sources_keep_working(hasher: ModelHasher) -> None:
    model = make_cnn(15)
    od = collections.OrderedDict((k, v.numpy()) for k, v in model.state_dict().items())
    assert hasher.hash(od) == hasher.hash(model) == hasher.hash({"state_dict": model.state_dict()})


def test_overlapping_views_cannot_expand_a_tiny_storage(tmp_path: Path) -> None:
    # stride 0 repeats one stored float 2**30 times: 4 GiB of float32 from a 4-byte storage
    pkl = torch_pickle({"w": HandTensor("0", 0, (1 << 15, 1 << 15), (0, 0))}, {"0": ("FloatStorage", 1)})
    path = tmp_path / "views.pt"
    path.write_bytes(torch_zip(pkl, {"0": b"\x00\x00\x80\x3f"}))
    tracemalloc.start()
    try:
        with pytest.raises(ModelFormatError, match="over the limit"):
            ModelHasher(256, max_bytes=1 << 30).hash(path)
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()
    past = torch_pickle({"w": HandTensor("0", 2, (4,), (1,))}, {"0": ("FloatStorage", 4)})
    path.write_bytes(torch_zip(past, {"0": bytes(16)}))
    with pytest.raises(ModelFormatError, match="runs past its storage"):
        load_tensors(path)
