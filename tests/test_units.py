"""Folders as models: Hugging Face layouts hash as one model, exactly like the unsharded checkpoint; a folder
of many models yields one entry per model with stable keys; a bad unit is named and the others still hash."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from formats_fixtures import make_cnn

from hashdb.cli import main
from hashdb.codec import ModelHasher, hash_files
from hashdb.codec.load import load_tensors
from hashdb.codec.units import find_units, unit_key
from hashdb.db import HashDB
from hashdb.errors import ModelFormatError


@pytest.fixture(scope="module")
def hasher() -> ModelHasher:
    return ModelHasher(256)


def _shards(sd: dict, n: int) -> list[dict]:
    keys = list(sd)
    return [{k: sd[k] for k in keys[i::n]} for i in range(n)]


def hf_safetensors(folder: Path, model: torch.nn.Module, n: int = 2) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "cnn"}))
    weight_map = {}
    for i, shard in enumerate(_shards(model.state_dict(), n), 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(folder / name))
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def hf_bin(folder: Path, model: torch.nn.Module, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    weight_map = {}
    for i, shard in enumerate(_shards(model.state_dict(), n), 1):
        name = f"pytorch_model-{i:05d}-of-{n:05d}.bin"
        torch.save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def hf_cache(root: Path, repo: str, rev: str, model: torch.nn.Module) -> Path:
    """The Hugging Face cache layout: snapshots/REV/* are relative symlinks into blobs/."""
    from safetensors.torch import save_file

    base = root / ("models--" + repo.replace("/", "--"))
    (base / "blobs").mkdir(parents=True)
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    save_file(model.state_dict(), str(base / "blobs" / "aa11"))
    (base / "blobs" / "bb22").write_text(json.dumps({"model_type": "cnn"}))
    (snap / "model.safetensors").symlink_to("../../blobs/aa11")
    (snap / "config.json").symlink_to("../../blobs/bb22")
    return snap


def test_sharded_folders_hash_exactly_like_the_unsharded_checkpoint(tmp_path: Path, hasher: ModelHasher) -> None:
    from safetensors.torch import save_file

    model = make_cnn(20)
    code = hasher.hash(model)
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text("{}")
    save_file(model.state_dict(), str(single / "model.safetensors"))
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "config.json").write_text("{}")
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    folders = [hf_safetensors(tmp_path / "st", model), hf_bin(tmp_path / "bin", model), single, binary,
               hf_cache(tmp_path / "cache", "org/net", "abc123", model)]  # fmt: skip
    for folder in folders:
        assert [u.path for u in find_units(folder)] == [folder], folder
        names = sorted(t.name for t in load_tensors(folder))
        assert names == sorted(k for k, v in model.state_dict().items() if v.is_floating_point()), folder
        assert hasher.hash(folder) == code, folder
        assert hasher.hash(str(folder)) == code


def test_a_folder_of_models_yields_one_keyed_entry_per_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hasher: ModelHasher
) -> None:
    zoo = tmp_path / "zoo"
    (zoo / "sub").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(make_cnn(21).state_dict(), zoo / "a.pt")
        torch.save(make_cnn(22), zoo / "sub" / "whole.pth")
    np.savez(zoo / "sub" / "c.npz", **{k: v.numpy() for k, v in make_cnn(23).state_dict().items()})
    hf_safetensors(zoo / "hf" / "bert-ish", make_cnn(24))
    hf_cache(zoo / "cache", "acme/resnet", "r1", make_cnn(25))
    (zoo / "README.md").write_text("not a model")
    (zoo / "bad.pt").write_bytes(b"\x01\x02 not a model " * 16)  # random bytes could start like a pickle
    (zoo / ".hidden").mkdir()
    torch.save(make_cnn(26).state_dict(), zoo / ".hidden" / "skip.pt")
    monkeypatch.chdir(tmp_path)
    keys = [u.key for u in find_units("zoo")]
    assert keys == ["zoo/a.pt", "zoo/bad.pt", "acme/resnet@r1", "zoo/hf/bert-ish", "zoo/sub/c.npz",
                    "zoo/sub/whole.pth"]  # fmt: skip
    assert [u.key for u in find_units(zoo)] == keys == [u.key for u in find_units("./zoo/")]
    results = dict(hash_files(["zoo"], bits=256))
    assert list(results) == keys
    bad = results.pop("zoo/bad.pt")
    assert isinstance(bad, ModelFormatError) and "bad.pt: not a model file: unrecognised bytes" in str(bad)
    expected = {
        "zoo/a.pt": 21,
        "acme/resnet@r1": 25,
        "zoo/hf/bert-ish": 24,
        "zoo/sub/c.npz": 23,
        "zoo/sub/whole.pth": 22,
    }
    assert results == {k: hasher.hash(make_cnn(seed)) for k, seed in expected.items()}
    with pytest.raises(ModelFormatError, match="holds 6 models"):
        load_tensors(zoo)
    assert unit_key(tmp_path / "zoo" / "a.pt") == "zoo/a.pt" == unit_key("./zoo/../zoo/a.pt")


def test_hashdb_add_and_hash_take_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    zoo = tmp_path / "zoo"
    hf_safetensors(zoo / "m1", make_cnn(30))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(make_cnn(31), zoo / "m2.pt")
    (zoo / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    monkeypatch.chdir(tmp_path)
    assert main(["add", "db", "--bits", "256", "zoo"]) == 2  # one bad unit: named, the others stored
    out, err = capsys.readouterr()
    assert "zoo/broken.safetensors" in err and "1 of 3" in err
    with HashDB("db", bits=None) as db:
        assert sorted(db.keys()) == ["zoo/m1", "zoo/m2.pt"]
        assert db.get("zoo/m1")[0] == ModelHasher(db.bits).hash(make_cnn(30))
    assert main(["hash", "--json", "zoo/m1", "zoo/m2.pt"]) == 0
    docs = [json.loads(line) for line in capsys.readouterr()[0].splitlines()]
    assert [d["path"] for d in docs] == ["zoo/m1", "zoo/m2.pt"]
    (tmp_path / "empty").mkdir()
    assert main(["hash", "empty"]) == 2
    assert "no model files found" in capsys.readouterr()[1]


def test_shard_index_cannot_point_outside_its_folder(tmp_path: Path) -> None:
    model = make_cnn(32)
    folder = hf_safetensors(tmp_path / "m", model)
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"] = dict.fromkeys(doc["weight_map"], "../outside.safetensors")
    index.write_text(json.dumps(doc))
    with pytest.raises(ModelFormatError, match="outside the folder"):
        load_tensors(folder)
    doc["weight_map"] = dict.fromkeys(doc["weight_map"], "model-00009-of-00009.safetensors")
    index.write_text(json.dumps(doc))
    with pytest.raises(ModelFormatError, match="missing shard"):
        load_tensors(folder)
    index.write_text("{not json")
    with pytest.raises(ModelFormatError, match="unreadable shard index"):
        load_tensors(folder)


def test_shards_share_one_size_budget(tmp_path: Path) -> None:
    model = make_cnn(33)
    folder = hf_safetensors(tmp_path / "m", model, n=2)
    total = sum(v.numel() * 4 for v in model.state_dict().values() if v.is_floating_point())
    assert ModelHasher(256, max_bytes=total + 1024).hash(folder) == ModelHasher(256).hash(model)
    with pytest.raises(ModelFormatError, match="over the limit"):
        ModelHasher(256, max_bytes=total * 3 // 4).hash(folder)  # each shard fits alone, both do not


def test_raw_bin_data_beside_an_onnx_model_is_not_a_unit(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(np.ones(64, np.float32).tobytes())  # ONNX external data
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(make_cnn(34).state_dict(), tmp_path / "ckpt.bin")
    assert [u.path.name for u in find_units(tmp_path)] == ["ckpt.bin", "model.onnx"]
