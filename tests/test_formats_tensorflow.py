"""TensorFlow checkpoints and SavedModel folders: TensorBundles written by tests/formats_writers.py from the
SSTable and BundleEntryProto specifications (no TensorFlow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hashdb.codec import ModelHasher, load_tensors
from hashdb.codec.load import load_file, sniff_format
from hashdb.codec.units import find_units
from hashdb.errors import ModelFormatError
from tests.formats_fixtures import make_cnn
from tests.formats_writers import bundle_entry, f_bytes, f_varint, keras_names, sstable, tf_checkpoint


@pytest.fixture(scope="module")
def hasher() -> ModelHasher:
    return ModelHasher(bits=256, include_linear=True)


def numpy_sd(seed: int) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in make_cnn(seed).state_dict().items() if v.is_floating_point()}


def test_object_based_checkpoint_reads_the_model_in_torch_layout(tmp_path: Path, hasher: ModelHasher) -> None:
    sd = numpy_sd(0)
    index = tf_checkpoint(tmp_path / "ckpt-1", keras_names(sd), block_size=256)  # many blocks and restarts
    tensors = {t.name: t for t in load_tensors(index)}
    assert not any("OPTIMIZER" in n or "optimizer" in n or "save_counter" in n for n in tensors)
    assert len(tensors) == len(sd)
    layers = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in sd))
    for name in (n for n in sd if sd[n].ndim == 4):
        got = tensors[f"layer_with_weights-{layers.index(name.rsplit('.', 1)[0])}/kernel"]
        assert got.layout == "oihw", name
        np.testing.assert_array_equal(got.array, sd[name])
    code = hasher.hash(make_cnn(0))
    assert hasher.hash(index) == code
    assert hasher.hash(tmp_path / "ckpt-1.data-00000-of-00001") == code  # named by its data shard
    assert hasher.hash(tmp_path) == code  # a folder holding one checkpoint: one unit (its .index)


def test_name_based_checkpoint_with_slots_shards_depthwise_and_half_types(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    conv = rng.standard_normal((3, 3, 8, 16)).astype(np.float32)  # HWIO
    depthwise = rng.standard_normal((5, 5, 16, 2)).astype(np.float32)  # H W C M
    dense = rng.standard_normal((32, 10)).astype(np.float32)
    half = rng.standard_normal((1, 1, 32, 16)).astype(np.float16)
    tensors = {
        "conv1/weights": conv, "conv1/weights/Adam": conv + 1, "conv1/weights/Adam_1": conv + 2,
        "conv1/biases": rng.standard_normal(16).astype(np.float32), "global_step": np.array(9, np.int64),
        "dw/depthwise_weights": depthwise, "dw/depthwise_weights/Momentum": depthwise,
        "fc/kernel": dense, "pw/kernel": half, "bf/kernel": conv.astype(np.float64),
        "beta1_power": np.array(0.9, np.float32),
    }  # fmt: skip
    index = tf_checkpoint(tmp_path / "model.ckpt-100", tensors, num_shards=3, bf16=frozenset({"conv1/biases"}))
    got = {t.name: t for t in load_file(index)}
    assert sorted(got) == ["beta1_power", "bf/kernel", "conv1/biases", "conv1/weights", "dw/depthwise_weights",
                           "fc/kernel", "pw/kernel"]  # fmt: skip
    np.testing.assert_array_equal(got["conv1/weights"].array, conv.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(got["bf/kernel"].array, conv.transpose(3, 2, 0, 1))
    want_dw = depthwise.transpose(2, 3, 0, 1).reshape(32, 1, 5, 5)  # out channel c * M + m, as Keras/torch
    np.testing.assert_array_equal(got["dw/depthwise_weights"].array, want_dw)
    np.testing.assert_array_equal(got["fc/kernel"].array, dense.T)
    np.testing.assert_array_equal(got["pw/kernel"].array, half.astype(np.float32).transpose(3, 2, 0, 1))
    bf16 = (tensors["conv1/biases"].view(np.uint32) & 0xFFFF0000).view(np.float32)  # type: ignore[union-attr]
    np.testing.assert_array_equal(got["conv1/biases"].array, bf16)
    assert {got[n].layout for n in ("conv1/weights", "dw/depthwise_weights", "fc/kernel")} == {"oihw"}
    assert got["conv1/biases"].layout is None


def test_savedmodel_and_checkpoint_folders_are_one_unit_each(tmp_path: Path, hasher: ModelHasher) -> None:
    sd = numpy_sd(2)
    saved = tmp_path / "zoo" / "resnet_savedmodel"
    (saved / "variables").mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"\x08\x01graph, not read")
    (saved / "fingerprint.pb").write_bytes(b"\x08\x02")
    tf_checkpoint(saved / "variables" / "variables", keras_names(sd, optimizer=False))
    train = tmp_path / "zoo" / "train"
    train.mkdir()
    for step in (1, 2):
        tf_checkpoint(train / f"ckpt-{step}", keras_names(numpy_sd(2 + step)))
    (train / "checkpoint").write_text(
        'model_checkpoint_path: "/elsewhere/train/ckpt-2"\nall_model_checkpoint_paths: "ckpt-1"\n'
    )
    pair = tmp_path / "zoo" / "pair"
    pair.mkdir()
    tf_checkpoint(pair / "a", keras_names(numpy_sd(5)))
    tf_checkpoint(pair / "b", keras_names(numpy_sd(6)))
    (pair / "faiss.index").write_bytes(b"IxFI" + bytes(100))  # another .index: not a model
    units = [(u.key.split("zoo/", 1)[1], u.path) for u in find_units(tmp_path / "zoo")]
    assert [k for k, _ in units] == ["pair/a.index", "pair/b.index", "resnet_savedmodel", "train"]
    assert hasher.hash(saved) == hasher.hash(saved / "saved_model.pb") == hasher.hash(make_cnn(2))
    assert hasher.hash(train) == hasher.hash(make_cnn(4))  # the checkpoint the state file names
    assert hasher.hash(pair / "b.index") == hasher.hash(make_cnn(6))
    assert sniff_format(pair / "faiss.index") is None


def test_a_folder_whose_weights_link_outside_it_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tf_checkpoint(elsewhere / "variables", keras_names(numpy_sd(2), optimizer=False))
    saved = tmp_path / "saved"
    (saved / "variables").mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"\x08\x01graph, not read")
    for name in ("variables.index", "variables.data-00000-of-00001"):
        (saved / "variables" / name).symlink_to(elsewhere / name)
    with pytest.raises(ModelFormatError, match="outside the model folder"):
        load_tensors(saved)


def _index(tmp_path: Path, entries: list[tuple[bytes, bytes]], data: bytes = bytes(64)) -> Path:
    header = f_varint(1, 1)
    (tmp_path / "m.data-00000-of-00001").write_bytes(data)
    path = tmp_path / "m.index"
    path.write_bytes(sstable([(b"", header), *entries]))
    return path


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (bundle_entry(1, (2, 3, 3, 3), 0, 0, 216), r"lies past the end of m.data-00000-of-00001"),
        (bundle_entry(1, (4, 4), 0, 0, 60), r"'w/kernel': 60 bytes do not hold a \(4, 4\) tensor"),
        (bundle_entry(1, (4,), 2, 0, 16), r"'w/kernel': shard 2 / offset 0 out of range"),
        (bundle_entry(1, (4,), 0, 0, 16, slices=True), r"'w/kernel' is partitioned \(sliced\)"),
        (bundle_entry(1, (2**30, 2**30), 0, 0, 2**62), r"declares .* bytes of tensors, over the limit"),
        (f_bytes(2, b"\x12\x05\x08"), r"not a readable TensorFlow checkpoint index \(field 2 claims"),
    ],
)
def test_bad_entries_are_one_line_errors(tmp_path: Path, entry: bytes, message: str) -> None:
    path = _index(tmp_path, [(b"w/kernel", entry)])
    with pytest.raises(ModelFormatError, match=rf"^{path}: .*{message}") as info:
        load_file(path, 1 << 30)
    assert "\n" not in str(info.value)


def test_broken_tables_and_missing_shards_are_one_line_errors(tmp_path: Path) -> None:
    path = _index(tmp_path, [(b"w/kernel", bundle_entry(1, (4,), 0, 0, 16))])
    assert load_file(path)[0].array.shape == (4,)
    blob = path.read_bytes()
    cases = {
        "snappy": (sstable([(b"", f_varint(1, 1))], compression=1), "snappy-compressed table blocks"),
        "truncated": (blob[:-30] + blob[-8:], "not a readable TensorFlow checkpoint index"),
        "no header": (sstable([(b"w", bundle_entry(1, (4,), 0, 0, 16))]), "no bundle header entry"),
    }
    for name, (data, message) in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.index"
        bad.write_bytes(data)
        with pytest.raises(ModelFormatError, match=f"^{bad}: .*{message}"):
            load_file(bad)
    (tmp_path / "m.data-00000-of-00001").unlink()
    with pytest.raises(ModelFormatError, match=f"^{path}: data shard m.data-00000-of-00001 is missing$"):
        load_file(path)


def test_sstable_reader_reads_what_leveldb_itself_writes(tmp_path: Path) -> None:
    """Cross-check of the table layer against LevelDB's own table builder (plyvel): small blocks and restart
    intervals so keys are prefix-compressed across many blocks. LevelDB's keys carry an 8-byte sequence tag
    (TensorFlow's do not); a snappy table is refused in one line."""
    import plyvel

    from hashdb.codec.readers.tensorflow import is_table, table_entries

    rng = np.random.default_rng(5)
    items = {f"model/layer_with_weights-{i:03d}/kernel/.ATTRIBUTES/VARIABLE_VALUE".encode():
             rng.bytes(int(rng.integers(0, 60))) for i in range(300)}  # fmt: skip
    for name, compression in (("plain", None), ("snappy", "snappy")):
        db = plyvel.DB(str(tmp_path / name), create_if_missing=True, compression=compression, block_size=256,
                       block_restart_interval=4)  # fmt: skip
        for key, value in items.items():
            db.put(key, value * 20 if compression else value)
        db.compact_range()
        db.close()
    tables = sorted((tmp_path / "plain").glob("*.ldb"))
    assert tables and all(is_table(t) for t in tables)
    got = {bytes(k[:-8]): bytes(v) for t in tables for k, v in table_entries(memoryview(t.read_bytes()))}
    assert got == items
    snappy = sorted((tmp_path / "snappy").glob("*.ldb"))[0]
    index = tmp_path / "snappy.index"
    index.write_bytes(snappy.read_bytes())
    with pytest.raises(ModelFormatError, match=f"^{index}: .*snappy-compressed table blocks are not supported"):
        load_file(index)


def test_an_index_naming_one_block_many_times_is_refused(tmp_path: Path) -> None:
    """Blocks of a table never overlap: an index whose handles name more bytes than the file holds (one block
    repeated, to make the reader parse it over and over) is refused before it is parsed again."""
    from tests.formats_writers import TABLE_MAGIC, _block, masked_crc, varint

    data = _block([(b"", f_varint(1, 1))] + [(b"w%05d" % i, bundle_entry(1, (1,), 0, 0, 4)) for i in range(50)], 16)
    trailer = b"\x00" + masked_crc(data + b"\x00").to_bytes(4, "little")
    handle = varint(0) + varint(len(data))
    index = _block([(b"k%06d" % i, handle) for i in range(2000)], 16)
    blob = data + trailer
    index_handle = varint(len(blob)) + varint(len(index))
    blob += index + b"\x00" + masked_crc(index + b"\x00").to_bytes(4, "little")
    footer = varint(0) + varint(0) + index_handle
    path = tmp_path / "m.index"
    path.write_bytes(blob + footer + bytes(40 - len(footer)) + TABLE_MAGIC.to_bytes(8, "little"))
    (tmp_path / "m.data-00000-of-00001").write_bytes(bytes(4))
    with pytest.raises(ModelFormatError, match="names more block bytes than the table holds"):
        load_file(path)


def test_a_tf_slim_batchnorm_folds_into_the_conv_it_is_scoped_under(tmp_path: Path, hasher: ModelHasher) -> None:
    """TF-slim checkpoints keep a conv's BatchNorm under its scope (``net/conv2/weights``,
    ``net/conv2/BatchNorm/moving_variance``; slim's default has no gamma): codec v7 folds it in, so the checkpoint
    hashes like the PyTorch model with that BatchNorm. The same statistics under another scope are not that conv's."""
    import torch

    model = make_cnn(9)
    rng = np.random.default_rng(9)
    bn = model[3]
    bn.running_mean.data = torch.from_numpy(rng.normal(0, 1, 24).astype(np.float32))
    bn.running_var.data = torch.from_numpy(rng.uniform(0.05, 5.0, 24).astype(np.float32))
    bn.bias.data = torch.from_numpy(rng.normal(0, 1, 24).astype(np.float32))
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    tensors: dict[str, np.ndarray | bytes] = {
        f"net/conv{i}/weights": sd[f"{k}.weight"].transpose(2, 3, 1, 0) for i, k in enumerate(("0", "2", "5"), 1)
    }
    norm = {"beta": sd["3.bias"], "moving_mean": sd["3.running_mean"], "moving_variance": sd["3.running_var"]}
    scoped = {f"net/conv2/BatchNorm/{k}": v for k, v in norm.items()}
    index = tf_checkpoint(tmp_path / "slim.ckpt", {**tensors, **scoped})
    assert hasher.hash(index) == hasher.hash(model)
    elsewhere = {f"net/head/BatchNorm/{k}": v for k, v in norm.items()}
    other = tf_checkpoint(tmp_path / "other.ckpt", {**tensors, **elsewhere})
    assert hasher.hash(other) != hasher.hash(model)


def test_a_separable_convs_batchnorm_goes_to_its_pointwise_kernel(tmp_path: Path) -> None:
    """TF-slim keeps a separable conv's two kernels and its BatchNorm in one scope (``sep/depthwise_weights``,
    ``sep/pointwise_weights``, ``sep/BatchNorm``); the BatchNorm follows the pointwise kernel, even where the
    depthwise one has as many channels. A depthwise-only scope keeps its own."""
    from hashdb.codec.batchnorm import batchnorm_gains
    from hashdb.codec.select import conv_plan

    rng = np.random.default_rng(10)
    norm = {"moving_mean": rng.normal(0, 1, 16), "moving_variance": rng.uniform(0.5, 2.0, 16)}
    tensors = {"net/stem/weights": rng.standard_normal((3, 3, 3, 16)),
               "net/sep/depthwise_weights": rng.standard_normal((3, 3, 16, 1)),
               "net/sep/pointwise_weights": rng.standard_normal((1, 1, 16, 16)),
               "net/dw/depthwise_weights": rng.standard_normal((3, 3, 16, 1)),
               **{f"net/sep/BatchNorm/{k}": v for k, v in norm.items()},
               **{f"net/dw/BatchNorm/{k}": 2 * v for k, v in norm.items()}}  # fmt: skip
    index = tf_checkpoint(tmp_path / "sep.ckpt", {k: v.astype(np.float32) for k, v in tensors.items()})
    loaded = load_file(index)
    plan = conv_plan(loaded)
    gains = {loaded[plan[pos][0]].name: g for pos, g in batchnorm_gains(loaded, plan).items()}
    assert sorted(gains) == ["net/dw/depthwise_weights", "net/sep/pointwise_weights"], sorted(gains)
    np.testing.assert_allclose(gains["net/sep/pointwise_weights"], 1 / np.sqrt(norm["moving_variance"] + 1e-5))
