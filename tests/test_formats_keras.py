"""Keras files written by Keras 3 itself (torch backend) and Keras 2 files written with h5py in its layout."""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashdb.codec import ModelHasher, hash_files, load_tensors
from hashdb.codec.readers import keras as keras_reader
from hashdb.errors import ModelFormatError

# Keras' torch backend calls np.array(tensor) the pre-numpy-2 way; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:keras.*")


def torch_layout(seed: int) -> dict[str, np.ndarray]:
    """The model's weights in torch layout (OIHW, depthwise (C*M, 1, kh, kw), linear (out, in))."""
    rng = np.random.default_rng(seed)
    return {
        "c0.weight": rng.normal(size=(16, 3, 3, 3)).astype(np.float32),
        "dw.weight": rng.normal(size=(32, 1, 3, 3)).astype(np.float32),  # 16 channels x depth multiplier 2
        "sep.depthwise": rng.normal(size=(32, 1, 3, 3)).astype(np.float32),
        "sep.pointwise": rng.normal(size=(24, 32, 1, 1)).astype(np.float32),
        "inner.weight": rng.normal(size=(24, 24, 3, 3)).astype(np.float32),
        "fc.weight": rng.normal(size=(10, 24)).astype(np.float32),
    }


def hwio(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def keras_depthwise(w: np.ndarray, channels: int) -> np.ndarray:
    """(C*M, 1, kh, kw) -> Keras' (kh, kw, C, M); output channel c*M + m in both."""
    cm, _, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(channels, cm // channels, kh, kw).transpose(2, 3, 0, 1))


def in_order(sd: dict) -> dict:
    """The state_dict with names that carry torch's order (module registration, i.e. execution order): codec v3
    chains layers by their names' natural order (docs/codec.md), and these fixtures' short names (c0, dw, c2)
    do not sort in it, while the flax and Keras files name their layers in order."""
    return {f"{i:03d}.{k}": v for i, (k, v) in enumerate(sd.items())}


@pytest.fixture(scope="module")
def keras() -> Any:
    os.environ["KERAS_BACKEND"] = "torch"  # the test suite has torch; TensorFlow and JAX are not installed
    import keras

    return keras


def build(keras: Any, sd: dict[str, np.ndarray]) -> Any:
    """A functional model with a nested Sequential block, holding the weights of ``sd``."""
    L = keras.layers
    inp = keras.Input((14, 14, 3))
    x = L.Conv2D(16, 3, name="c0")(inp)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)
    x = L.BatchNormalization(name="bn")(x)
    x = L.SeparableConv2D(24, 3, name="sep")(x)
    x = keras.Sequential([L.Conv2D(24, 3, name="inner")], name="block")(x)
    out = L.Dense(10, name="fc")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    get = model.get_layer
    get("c0").set_weights([hwio(sd["c0.weight"]), np.zeros(16, np.float32)])
    get("dw").set_weights([keras_depthwise(sd["dw.weight"], 16), np.zeros(32, np.float32)])
    sep = [keras_depthwise(sd["sep.depthwise"], 32), hwio(sd["sep.pointwise"]), np.zeros(24, np.float32)]
    get("sep").set_weights(sep)
    get("block").get_layer("inner").set_weights([hwio(sd["inner.weight"]), np.zeros(24, np.float32)])
    get("fc").set_weights([np.ascontiguousarray(sd["fc.weight"].T), np.zeros(10, np.float32)])
    return model


@pytest.fixture(scope="module")
def saved(keras: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same model saved as .keras, legacy .h5 and .weights.h5, plus a noisy copy and another model."""
    d = tmp_path_factory.mktemp("keras")
    sd = torch_layout(0)
    model = build(keras, sd)
    out = {"keras": d / "m.keras", "h5": d / "m.h5", "weights": d / "m.weights.h5"}
    model.save(out["keras"])
    model.save(out["h5"])
    model.save_weights(out["weights"])
    rng = np.random.default_rng(1)
    noisy = {k: (v + 0.02 * v.std() * rng.normal(size=v.shape)).astype(np.float32) for k, v in sd.items()}
    out["noisy"], out["other"] = d / "noisy.keras", d / "other.keras"
    build(keras, noisy).save(out["noisy"])
    build(keras, torch_layout(77)).save(out["other"])
    return out


@pytest.fixture(scope="module")
def hasher() -> ModelHasher:
    return ModelHasher(bits=256, include_linear=True)


def hamming(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


def by_kind(tensors: list) -> dict[tuple[int, ...], list[np.ndarray]]:
    out: dict[tuple[int, ...], list[np.ndarray]] = {}
    for t in tensors:
        if t.array.ndim >= 2:
            assert t.layout == "oihw", t.name
            out.setdefault(t.array.shape, []).append(t.array)
    return out


@pytest.mark.parametrize("kind", ["keras", "h5", "weights"])
def test_keras_files_read_as_torch_layout_and_give_the_state_dict_code(saved, hasher, kind: str) -> None:
    sd = torch_layout(0)
    got = by_kind(load_tensors(saved[kind]))
    expected = by_kind([keras_reader.NamedTensor(k, v, "oihw") for k, v in sd.items()])
    assert got.keys() == expected.keys()
    for shape, arrays in expected.items():  # same arrays, whatever the order the file keeps them in
        assert sorted(a.tobytes() for a in got[shape]) == sorted(a.tobytes() for a in arrays), shape
    if kind == "h5":  # legacy .h5 keeps the layers' own names, which sort in execution order here
        assert hasher.hash(saved[kind]) == hasher.hash(in_order(sd))
    else:
        # Keras 3 names variables by layer class (conv2d, dense, sequential/layers/conv2d), which do not sort in
        # execution order: codec v3 chains them otherwise than the torch model (docs/codec.md, limits), but both
        # Keras 3 forms of one model give one code
        assert hasher.hash(saved[kind]) == hasher.hash(saved["keras"])


def test_modified_copy_is_within_copy_radius_and_another_model_is_not(saved, hasher) -> None:
    a, b, c = (hasher.hash(saved[k]) for k in ("keras", "noisy", "other"))
    assert hamming(a, b) <= hasher.copy_radius < hamming(a, c)


def test_deflated_keras_archive_reads_through_a_bounded_temporary_file(saved, hasher, tmp_path: Path) -> None:
    p = tmp_path / "deflated.keras"
    with zipfile.ZipFile(saved["keras"]) as src, zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert zipfile.ZipFile(p).getinfo("model.weights.h5").compress_type == zipfile.ZIP_DEFLATED
    assert hasher.hash(p) == hasher.hash(saved["keras"])
    with pytest.raises(ModelFormatError, match="over the limit"):
        keras_reader.read_keras(p, max_bytes=1000)
    with pytest.raises(ModelFormatError, match="over the limit"):
        keras_reader.read_keras(saved["keras"], max_bytes=1000)


def keras2_file(path: Path, sd: dict[str, np.ndarray], with_config: bool) -> Path:
    """A Keras 2 file: ``model.save`` layout (``model_weights`` + ``model_config``) or ``save_weights`` layout
    (layer groups at the root), weights named ``<layer>/<weight>:0``."""
    layers = [  # (layer name, class, [(weight name, Keras-layout array)])
        ("stem", "Conv2D", [("kernel", hwio(sd["c0.weight"])), ("bias", np.zeros(16, np.float32))]),
        ("depthwise_conv2d", "DepthwiseConv2D", [("depthwise_kernel", keras_depthwise(sd["dw.weight"], 16))]),
        ("separable_conv2d", "SeparableConv2D", [("depthwise_kernel", keras_depthwise(sd["sep.depthwise"], 32)),
                                                 ("pointwise_kernel", hwio(sd["sep.pointwise"]))]),
        ("conv2d_1", "Conv2D", [("kernel", hwio(sd["inner.weight"]))]),
        ("logits", "Dense", [("kernel", np.ascontiguousarray(sd["fc.weight"].T))]),
    ]  # fmt: skip
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if with_config else f
        if with_config:
            config = {"class_name": "Functional", "config": {"name": "model", "layers": [
                {"class_name": cls, "config": {"name": name}, "name": name} for name, cls, _ in layers]}}  # fmt: skip
            f.attrs["model_config"] = json.dumps(config)
        root.attrs["layer_names"] = np.array([name.encode() for name, _, _ in layers])
        for name, _, weights in layers:
            g = root.create_group(name)
            g.attrs["weight_names"] = np.array([f"{name}/{w}:0".encode() for w, _ in weights])
            for w, arr in weights:
                g.create_dataset(f"{name}/{w}:0", data=arr)
    return path


@pytest.mark.parametrize("with_config", [True, False])
def test_keras2_layouts_give_the_state_dict_code(tmp_path: Path, hasher, with_config: bool) -> None:
    sd = torch_layout(2)
    p = keras2_file(tmp_path / "k2.h5", sd, with_config)
    got = {t.name: t for t in load_tensors(p)}
    np.testing.assert_array_equal(got["stem/stem/kernel:0"].array, sd["c0.weight"])
    np.testing.assert_array_equal(got["depthwise_conv2d/depthwise_conv2d/depthwise_kernel:0"].array, sd["dw.weight"])
    np.testing.assert_array_equal(got["logits/logits/kernel:0"].array, sd["fc.weight"])
    assert hasher.hash(p) == hasher.hash(in_order(sd))


def test_config_class_decides_what_a_kernel_is(tmp_path: Path) -> None:
    """Keras 3 names a depthwise kernel plain 'kernel'; only the config says the layer 'features' is depthwise."""
    rng = np.random.default_rng(3)
    dw = rng.normal(size=(3, 3, 8, 2)).astype(np.float32)
    p = tmp_path / "cfg.h5"
    with h5py.File(p, "w") as f:
        f.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": {"layers": [
            {"class_name": "DepthwiseConv2D", "config": {"name": "features"}}]}})  # fmt: skip
        g = f.create_group("model_weights")
        g.attrs["layer_names"] = np.array([b"features"])
        g.create_group("features").attrs["weight_names"] = np.array([b"sequential/features/kernel"])
        g["features"].create_dataset("sequential/features/kernel", data=dw)
    (t,) = load_tensors(p)
    assert t.layout == "oihw" and t.array.shape == (16, 1, 3, 3)
    np.testing.assert_array_equal(t.array[2 * 5 + 1, 0], dw[:, :, 5, 1])  # channel c=5, multiplier m=1


def test_references_to_other_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "raw.bin").write_bytes(np.ones(36, np.float32).tobytes())
    p = tmp_path / "external.h5"
    with h5py.File(p, "w") as f:
        f.attrs["layer_names"] = np.array([b"conv2d"])
        g = f.create_group("conv2d")
        g.create_dataset("conv2d/kernel:0", shape=(3, 3, 2, 2), dtype="<f4", external=[("raw.bin", 0, 144)])
    with pytest.raises(ModelFormatError, match="stores its data in another file"):
        load_tensors(p)
    q = tmp_path / "link.h5"
    with h5py.File(q, "w") as f:
        f.attrs["layer_names"] = np.array([b"conv2d"])
        f.create_group("conv2d")["kernel:0"] = h5py.ExternalLink(str(p), "/conv2d/conv2d/kernel:0")
    with pytest.raises(ModelFormatError, match="external link"):
        load_tensors(q)
    r = tmp_path / "rootlink.h5"
    with h5py.File(r, "w") as f:
        f["model_weights"] = h5py.ExternalLink(str(p), "/")
    with pytest.raises(ModelFormatError, match="external link 'model_weights'"):
        load_tensors(r)


def test_bad_files_give_one_clean_line_and_others_still_hash(saved, tmp_path: Path) -> None:
    h5 = saved["h5"].read_bytes()
    zipped = saved["keras"].read_bytes()
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_dataset("x", data=np.ones((3, 3, 3, 3), np.float32))
    no_weights = io.BytesIO()
    with zipfile.ZipFile(no_weights, "w") as z:
        z.writestr("config.json", "{}")
    cases = {
        "truncated.h5": h5[: len(h5) // 2],
        "header.h5": h5[:8],
        "truncated.keras": zipped[: len(zipped) // 2],
        "noweights.keras": no_weights.getvalue(),
        "notzip.keras": b"PK\x03\x04" + b"\0" * 100,
    }
    paths = []
    for name, raw in cases.items():
        p = tmp_path / name
        p.write_bytes(raw)
        paths.append(p)
    paths.append(plain)
    results = hash_files([*paths, saved["keras"]])
    for (name, result), p in zip(results, paths, strict=False):
        assert isinstance(result, ModelFormatError), name
        msg = str(result)
        assert msg.startswith(str(p)) and "\n" not in msg and "Traceback" not in msg and "\x1b" not in msg, msg
    assert isinstance(results[-1][1], bytes)
    assert "without Keras weights" in str(results[-2][1])


def test_missing_h5py_names_the_extra(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ImportError
    for kind in ("h5", "keras"):
        with pytest.raises(ModelFormatError) as err:
            load_tensors(saved[kind])
        assert str(err.value) == f"{saved[kind]}: needs the optional 'h5py' package: pip install hashdb[keras]"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bytes_raise_only_model_format_error(saved, tmp_path: Path, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["weights", "keras"]))
    raw = bytearray(saved[kind].read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(1, len(raw)))]
    p = tmp_path / ("fuzz.keras" if kind == "keras" else "fuzz.h5")
    p.write_bytes(bytes(raw))
    try:
        out = keras_reader.read_keras(p, 1 << 24) if kind == "keras" else keras_reader.read_h5(p, 1 << 24)
    except ModelFormatError as exc:
        assert str(exc).startswith(str(p)) and "\n" not in str(exc)
    else:
        assert all(t.array.dtype == np.float32 for t in out)


@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_a_batchnorm_after_a_conv_folds_into_it(keras: Any, tmp_path: Path, kind: str) -> None:
    """Codec v7 folds each BatchNorm into the convolution it reads (hashdb/codec/batchnorm.py): in a .keras
    archive the model config says which (Keras 3 stores a BatchNorm's variables by index, apart from its conv),
    in a legacy .h5 the layers' order. The model with trained-looking BatchNorm statistics and the same model with
    them folded into its kernels give one code; a .weights.h5 holds no graph, and these names (c0, bn0) do not say
    which conv a BatchNorm follows, so there they stay apart."""
    L = keras.layers
    rng = np.random.default_rng(4)
    k0, k1 = rng.standard_normal((3, 3, 3, 16)), rng.standard_normal((3, 3, 16, 24))
    gamma, beta = rng.uniform(0.2, 3.0, 16), rng.normal(0, 1, 16)
    mean, var = rng.normal(0, 1, 16), rng.uniform(0.05, 5.0, 16)

    def net(folded: bool) -> Any:
        inp = keras.Input((12, 12, 3))
        x = L.Conv2D(16, 3, name="c0", use_bias=folded)(inp)
        if not folded:
            x = L.BatchNormalization(name="bn0", epsilon=1e-5)(x)
        x = L.Conv2D(24, 3, name="c1")(L.ReLU()(x))
        model = keras.Model(inp, x)
        g = gamma / np.sqrt(var + 1e-5)
        if folded:
            model.get_layer("c0").set_weights([(k0 * g).astype(np.float32), (beta - mean * g).astype(np.float32)])
        else:
            model.get_layer("c0").set_weights([k0.astype(np.float32)])
            model.get_layer("bn0").set_weights([a.astype(np.float32) for a in (gamma, beta, mean, var)])
        model.get_layer("c1").set_weights([k1.astype(np.float32), np.zeros(24, np.float32)])
        return model

    h = ModelHasher(256)
    paths = {}
    for folded in (False, True):
        paths[folded] = tmp_path / f"{folded}.{kind}"
        net(folded).save(paths[folded])
    assert h.hash(paths[False]) == h.hash(paths[True])
    if kind == "keras":
        names = [t.name for t in load_tensors(paths[False])]
        assert any(n.endswith(".bn.moving_variance") for n in names), names
        weights_only = tmp_path / "bn.weights.h5"
        net(False).save_weights(weights_only)
        assert h.hash(weights_only) != h.hash(paths[True])


def test_a_weights_only_keras3_file_pairs_batchnorms_by_their_names(keras: Any, tmp_path: Path) -> None:
    """Without a config a Keras 3 .weights.h5 says neither which layer a BatchNormalization reads nor which of its
    variables is which: the count says the roles (4, or 3 with scale=False: beta, mean, variance) and the layers'
    names the pairs (``x_0_conv``/``x_0_bn``; two branches, written conv, conv, bn, bn), and the file hashes like its
    folded twin. Default names (``conv2d_1``/``batch_normalization_1``) say nothing, and the file's order is no
    guide (HDF5 packs small datasets apart from large ones): those BatchNorms stay unpaired."""
    L = keras.layers
    rng = np.random.default_rng(5)
    kernels = [rng.standard_normal(shape) for shape in ((3, 3, 3, 16), (1, 1, 3, 16), (3, 3, 16, 8))]
    norms = [[rng.uniform(0.2, 3.0, 16), rng.normal(0, 1, 16), rng.normal(0, 1, 16), rng.uniform(0.05, 5.0, 16)]
             for _ in range(2)]  # fmt: skip

    def net(folded: bool, names: bool, scale: bool = True) -> Any:
        inp = keras.Input((10, 10, 3))
        convs = [L.Conv2D(16, k.shape[0], padding="same", name=f"x_{i}_conv" if names else None, use_bias=folded)
                 for i, k in enumerate(kernels[:2])]  # fmt: skip
        bns = [L.BatchNormalization(epsilon=1e-5, scale=scale, name=f"x_{i}_bn" if names else None)
               for i in range(2)]  # fmt: skip
        outs = [c(inp) for c in convs]  # both convs come before either BatchNorm in the model's layers
        x = L.Add()(outs if folded else [bn(o) for bn, o in zip(bns, outs, strict=True)])
        head = L.Conv2D(8, 3)
        model = keras.Model(inp, head(L.ReLU()(x)))
        for conv, k, (gamma, beta, mean, var) in zip(convs, kernels[:2], norms, strict=True):
            g = (gamma if scale else 1.0) / np.sqrt(var + 1e-5)
            if folded:
                conv.set_weights([(k * g).astype(np.float32), (beta - mean * g).astype(np.float32)])
            else:
                conv.set_weights([k.astype(np.float32)])
        if not folded:
            for bn, (gamma, beta, mean, var) in zip(bns, norms, strict=True):
                bn.set_weights([a.astype(np.float32) for a in ([gamma] if scale else []) + [beta, mean, var]])
        head.set_weights([kernels[2].astype(np.float32), np.zeros(8, np.float32)])
        return model

    h = ModelHasher(256)
    for names, scale in ((True, True), (True, False), (False, True)):
        paths = [tmp_path / f"{names}{scale}{folded}.weights.h5" for folded in (False, True)]
        for path, folded in zip(paths, (False, True), strict=True):
            net(folded, names, scale).save_weights(path)
        renamed = [t.name for t in load_tensors(paths[0]) if ".bn." in t.name]
        want = (8 if scale else 4) if names else 0  # 3 variables: the first, beta or gamma, unnamed
        assert len(renamed) == want, renamed
        assert (h.hash(paths[0]) == h.hash(paths[1])) == names, (names, scale)


def test_a_batchnorm_the_config_puts_after_an_activation_is_no_convolutions(keras: Any, tmp_path: Path) -> None:
    """conv -> ReLU -> BatchNorm does not fold into the conv: a .keras file's config says what the BatchNorm reads,
    and without the config (.weights.h5) its name (``c0_bn``, as a conv ``c0_conv`` would have it) is not trusted
    over the config where there is one; in a transposed convolution's file nothing is folded either."""
    L = keras.layers
    inp = keras.Input((8, 8, 3))
    x = L.BatchNormalization(name="c0_bn")(L.ReLU()(L.Conv2D(6, 3, name="c0_conv")(inp)))
    model = keras.Model(inp, L.Conv2D(4, 3, name="c1")(x))
    model.save(tmp_path / "post.keras")
    assert not [t.name for t in load_tensors(tmp_path / "post.keras") if ".bn." in t.name]
    inp = keras.Input((8, 8, 6))
    x = L.BatchNormalization(name="up_bn")(L.Conv2DTranspose(6, 3, name="up_conv")(inp))
    model = keras.Model(inp, L.Conv2D(4, 3, name="c1")(x))
    model.save(tmp_path / "up.keras")
    model.save_weights(tmp_path / "up.weights.h5")
    for path in (tmp_path / "up.keras", tmp_path / "up.weights.h5"):
        assert not [t.name for t in load_tensors(path) if ".bn." in t.name], path


def test_a_weights_only_batchnorm_group_of_odd_variables_is_left_alone(tmp_path: Path) -> None:
    """A BatchNormalization group with a variable that is not 1-D, or of another width, or missing an index, is
    not a BatchNorm to name: none of its variables gets a role (a 2-D fourth variable must not make the others
    read as a 3-variable group)."""
    rng = np.random.default_rng(6)
    cases = {"two_d": [(16,), (16,), (16,), (16, 2)], "widths": [(16,), (16,), (8,), (16,)], "gap": [(16,), (16,)],
             "good": [(16,)] * 4}  # fmt: skip
    for case, shapes in cases.items():
        path = tmp_path / f"{case}.weights.h5"
        with h5py.File(path, "w") as f:
            conv = f.create_group("layers/conv2d/vars")
            conv.attrs["name"] = "x_conv"
            conv.create_dataset("0", data=rng.standard_normal((3, 3, 3, 16)).astype(np.float32))
            bn = f.create_group("layers/batch_normalization/vars")
            bn.attrs["name"] = "x_bn"
            for i, shape in enumerate(shapes):
                values = rng.uniform(0.1, 1, shape).astype(np.float32)
                bn.create_dataset(str(i if case != "gap" else 2 * i), data=values)
        renamed = [t.name for t in keras_reader.read_h5(path, 1 << 24) if ".bn." in t.name]
        assert len(renamed) == (4 if case == "good" else 0), (case, renamed)


def test_an_hdf5_file_not_as_long_as_its_superblock_says_is_refused_before_hdf5_reads_it(tmp_path: Path) -> None:
    """Bytes inserted or removed shift every HDF5 address after them, and HDF5 then allocates whatever size it
    finds there (found by fuzzing: 200 bytes repeated in a 46 KB Keras file took 12 GB and a minute). Such a file
    is refused from its superblock's end-of-file address, in one line; the file as written (with or without a
    user block before the superblock, and inside a .keras archive) is read."""
    sd = torch_layout(3)
    good = keras2_file(tmp_path / "good.h5", sd, with_config=True)
    blob = good.read_bytes()
    middle = len(blob) // 2
    cases = {"inserted": blob[:middle] + blob[middle : middle + 200] + blob[middle:],
             "removed": blob[:middle] + blob[middle + 200 :], "appended": blob + b"\0" * 16}  # fmt: skip
    for name, raw in cases.items():
        bad = tmp_path / f"{name}.h5"
        bad.write_bytes(raw)
        want = rf"^{bad}: damaged HDF5 file: {len(raw):,} bytes where its superblock says {len(blob):,} \(bytes"
        with pytest.raises(ModelFormatError, match=want):
            load_tensors(bad)
    expected = {t.name: t.array for t in load_tensors(good)}
    prepended = tmp_path / "prepended.h5"  # 512 bytes put in front: HDF5 finds the superblock there and moves
    prepended.write_bytes(b"\0" * 512 + blob)  # every address with it, as the check does
    got = {t.name: t.array for t in load_tensors(prepended)}
    assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
    for name, options in (("userblock", {"userblock_size": 512}), ("latest", {"libver": "latest"})):
        copy = tmp_path / f"{name}.h5"  # a user block before the superblock; a version 3 superblock
        with h5py.File(good, "r") as src, h5py.File(copy, "w", **options) as dst:
            for key in src:
                src.copy(src[key], dst, name=key)
            dst.attrs.update(src.attrs)
        head = copy.read_bytes()
        assert head[512:520] == b"\x89HDF\r\n\x1a\n" if name == "userblock" else head[8] == 3
        got = {t.name: t.array for t in load_tensors(copy)}
        assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got), name
        (tmp_path / f"{name}-cut.h5").write_bytes(head[:-100])
        with pytest.raises(ModelFormatError, match=f"bytes where its superblock says {len(head):,}"):
            load_tensors(tmp_path / f"{name}-cut.h5")
