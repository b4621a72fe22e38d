"""Flax/JAX .msgpack checkpoints: written here the way flax.serialization.to_bytes writes them.

flax's format (flax/serialization.py, restated): ``msgpack.packb(state_dict, default=ext, strict_types=True)``
where every array becomes ``ExtType(1, msgpack.packb((shape, dtype.name, arr.tobytes("C"))))``, a numpy
scalar ``ExtType(3, msgpack.packb((dtype.name, bytes)))``, and arrays over 1 GiB a map
``{"__msgpack_chunked_array__": True, "shape": {"0": d0, ...}, "chunks": {"0": flat part, ...}}``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashdb.codec import ModelHasher, load_tensors
from hashdb.codec.readers import flax
from hashdb.errors import ModelFormatError

ROOT = Path(__file__).resolve().parents[1]


def flax_bytes(tree: dict) -> bytes:
    def ext(obj: object) -> msgpack.ExtType:
        if isinstance(obj, np.ndarray):
            return msgpack.ExtType(1, msgpack.packb((list(obj.shape), obj.dtype.name, obj.tobytes("C"))))
        if isinstance(obj, np.generic):
            return msgpack.ExtType(3, msgpack.packb((obj.dtype.name, obj.tobytes())))
        raise TypeError(type(obj))

    return msgpack.packb(tree, default=ext, strict_types=True)


def torch_layout(seed: int) -> dict[str, np.ndarray]:
    """Weights of a small CNN in torch layout: conv 3->16, depthwise 16x2 -> 32, conv 32->32, linear 32->10."""
    rng = np.random.default_rng(seed)
    return {
        "c0.weight": rng.normal(size=(16, 3, 3, 3)).astype(np.float32),
        "c0.bias": rng.normal(size=16).astype(np.float32),
        "dw.weight": rng.normal(size=(32, 1, 3, 3)).astype(np.float32),
        "c2.weight": rng.normal(size=(32, 32, 3, 3)).astype(np.float32),
        "fc.weight": rng.normal(size=(10, 32)).astype(np.float32),
    }


def flax_params(sd: dict[str, np.ndarray]) -> dict:
    """The same weights as flax stores them: Conv kernels HWIO (a depthwise Conv with feature_group_count=C is
    (kh, kw, 1, C*M)), Dense kernels (in, out)."""
    hwio = (2, 3, 1, 0)
    return {
        "Conv_0": {"kernel": sd["c0.weight"].transpose(hwio), "bias": sd["c0.bias"]},
        "Conv_1": {"kernel": sd["dw.weight"].transpose(hwio)},
        "Conv_2": {"kernel": sd["c2.weight"].transpose(hwio)},
        "Dense_0": {"kernel": sd["fc.weight"].T.copy(), "bias": np.zeros(10, np.float32)},
    }


def in_order(sd: dict) -> dict:
    """The state_dict with names that carry torch's order (module registration, i.e. execution order): codec v3
    chains layers by their names' natural order (docs/codec.md), and these fixtures' short names (c0, dw, c2)
    do not sort in it, while the flax and Keras files name their layers in order."""
    return {f"{i:03d}.{k}": v for i, (k, v) in enumerate(sd.items())}


@pytest.fixture(scope="module")
def hasher() -> ModelHasher:
    return ModelHasher(bits=256, include_linear=True)


def hamming(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


def write(tmp_path: Path, tree: dict, name: str = "model.msgpack") -> Path:
    p = tmp_path / name
    p.write_bytes(flax_bytes(tree))
    return p


def test_flax_checkpoint_reads_as_torch_layout_and_gives_the_state_dict_code(tmp_path: Path, hasher) -> None:
    sd = torch_layout(0)
    p = write(tmp_path, {"params": flax_params(sd)})
    got = {t.name: t for t in load_tensors(p)}
    np.testing.assert_array_equal(got["params/Conv_0/kernel"].array, sd["c0.weight"])
    np.testing.assert_array_equal(got["params/Conv_1/kernel"].array, sd["dw.weight"])
    np.testing.assert_array_equal(got["params/Dense_0/kernel"].array, sd["fc.weight"])
    assert got["params/Conv_0/kernel"].layout == "oihw" and got["params/Conv_0/bias"].layout is None
    assert hasher.hash(p) == hasher.hash(in_order(sd))


def test_train_state_hashes_its_params_not_the_optimizer_moments(tmp_path: Path, hasher) -> None:
    sd = torch_layout(1)
    params = flax_params(sd)
    moments = {k: {n: (v * 0.01 + 1).astype(np.float32) for n, v in layer.items()} for k, layer in params.items()}
    state = {
        "step": np.int32(7),
        "params": params,
        "opt_state": {"0": {"count": np.int32(7), "mu": moments, "nu": moments}, "1": {}},
    }
    p = write(tmp_path, state)
    names = [t.name for t in load_tensors(p)]
    assert names and all(n.startswith("params/") for n in names)
    assert hasher.hash(p) == hasher.hash(in_order(sd))
    # Without a top-level "params" the tree is read whole, except an opt_state subtree.
    bare = write(tmp_path, {**params, "opt_state": {"mu": moments}}, "bare.msgpack")
    assert not any("opt_state" in t.name for t in load_tensors(bare))
    assert hasher.hash(bare) == hasher.hash(in_order(sd))


def test_half_precision_and_chunked_arrays(tmp_path: Path, hasher) -> None:
    sd = torch_layout(2)
    params = flax_params(sd)
    params["Conv_2"]["kernel"] = params["Conv_2"]["kernel"].astype(np.float16)
    bf16 = params["Conv_0"]["kernel"].view(np.uint32) >> 16  # bfloat16 = the top half of a float32
    flat = params["Conv_1"]["kernel"].reshape(-1)
    chunked = {
        "__msgpack_chunked_array__": True,
        "shape": {str(i): d for i, d in enumerate(params["Conv_1"]["kernel"].shape)},
        "chunks": {"0": flat[:100], "1": flat[100:200], "2": flat[200:]},
    }
    # bfloat16 has no numpy dtype: its ext object is written by hand with the name jax gives it.
    bf_ext = msgpack.ExtType(1, msgpack.packb((list(bf16.shape), "bfloat16", bf16.astype("<u2").tobytes())))
    tree = {"params": {**params, "Conv_0": {"kernel": bf_ext}, "Conv_1": {"kernel": chunked}}}
    p = tmp_path / "half.msgpack"
    p.write_bytes(flax_bytes(tree))
    expected = dict(sd)
    expected["c2.weight"] = sd["c2.weight"].astype(np.float16).astype(np.float32)
    expected["c0.weight"] = (bf16.astype(np.uint32) << 16).view(np.float32).transpose(3, 2, 0, 1)
    got = {t.name: t.array for t in load_tensors(p)}
    np.testing.assert_array_equal(got["params/Conv_1/kernel"], sd["dw.weight"])
    np.testing.assert_array_equal(got["params/Conv_0/kernel"], expected["c0.weight"])
    assert hasher.hash(p) == hasher.hash(in_order(expected))


def test_kernel_rule_by_module_name(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tree = {
        "params": {
            "stem_conv": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32)},
            "MultiHeadAttention_0": {"query": {"kernel": rng.normal(size=(64, 8, 8)).astype(np.float32)}},
            "Block_0": {"kernel": rng.normal(size=(3, 3, 8, 8)).astype(np.float32)},
        }
    }
    got = {t.name: t for t in load_tensors(write(tmp_path, tree))}
    stem = got["params/stem_conv/kernel"]
    assert stem.layout == "oihw" and stem.array.shape == (8, 4, 3, 3)
    assert got["params/MultiHeadAttention_0/query/kernel"].layout is None  # not a conv module: left to the guess
    assert got["params/Block_0/kernel"].layout is None


def test_modified_copy_is_within_copy_radius_and_other_models_are_not(tmp_path: Path) -> None:
    hasher = ModelHasher(bits=256)
    sd = torch_layout(4)
    rng = np.random.default_rng(5)
    noisy = {k: (v + 0.02 * v.std() * rng.normal(size=v.shape)).astype(np.float32) for k, v in sd.items()}
    a = hasher.hash(write(tmp_path, {"params": flax_params(sd)}, "a.msgpack"))
    b = hasher.hash(write(tmp_path, {"params": flax_params(noisy)}, "b.msgpack"))
    c = hasher.hash(write(tmp_path, {"params": flax_params(torch_layout(99))}, "c.msgpack"))
    assert hamming(a, b) <= hasher.copy_radius < hamming(a, c)


def test_bad_files_give_one_clean_line(tmp_path: Path) -> None:
    good = flax_bytes({"params": flax_params(torch_layout(6))})
    cases = {
        "truncated.msgpack": good[: len(good) // 2],
        "trailing.msgpack": good + b"\xc0",
        "empty.msgpack": b"",
        "list.msgpack": msgpack.packb([1, 2, 3]),
        "badshape.msgpack": msgpack.packb({"k": msgpack.ExtType(1, msgpack.packb(([4, 4], "float32", b"\0" * 8)))}),
        "dtype.msgpack": msgpack.packb({"k": msgpack.ExtType(1, msgpack.packb(([1], "object", b"\0" * 8)))}),
        "ext.msgpack": msgpack.packb({"k": msgpack.ExtType(9, b"")}),
    }
    for name, raw in cases.items():
        p = tmp_path / name
        p.write_bytes(raw)
        with pytest.raises(ModelFormatError) as err:
            load_tensors(p)
        msg = str(err.value)
        assert msg.startswith(str(p)) and "\n" not in msg and "Traceback" not in msg, msg
    p = write(tmp_path, {"params": flax_params(torch_layout(6))}, "big.msgpack")
    with pytest.raises(ModelFormatError, match="over the limit"):
        flax.read(p, max_bytes=1000)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bytes_raise_only_model_format_error(tmp_path: Path, data: st.DataObject) -> None:
    good = flax_bytes({"params": {"Conv_0": {"kernel": np.ones((3, 3, 2, 4), np.float32)}}, "step": np.int32(1)})
    if data.draw(st.booleans()):
        raw = bytearray(good)
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        raw = bytes(raw[: data.draw(st.integers(1, len(raw)))])
    else:
        raw = data.draw(st.binary(min_size=1, max_size=300))
    p = tmp_path / "fuzz.msgpack"
    p.write_bytes(raw)
    try:
        out = flax.read(p, max_bytes=1 << 20)
    except ModelFormatError as exc:
        assert str(exc).startswith(str(p)) and "\n" not in str(exc)
    else:
        assert all(t.array.dtype == np.float32 for t in out)


def test_importing_hashdb_imports_no_optional_format_package() -> None:
    code = (
        "import sys, hashdb, hashdb.codec, hashdb.codec.load, hashdb.codec.readers; "
        "bad = {'h5py', 'keras', 'flatbuffers', 'ai_edge_litert', 'torch', 'numba'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
