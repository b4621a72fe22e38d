"""Any model source -> a list of NamedTensor (name, float32 array, stated layout).

Sources: a torch ``nn.Module``, a state_dict or any mapping of name -> tensor/array (also a full checkpoint
holding one under "state_dict"/"model"), a model file, or a folder that is one model (Hugging Face layout:
sharded weights with their ``*.index.json``, or a ``config.json`` beside ``model.safetensors`` /
``pytorch_model.bin``, or a snapshot of the Hugging Face cache). Files are read by the modules of
``hashdb.codec.readers`` (see docs/codec.md for the table of formats); the format is told by the file's
leading bytes first and its suffix second. Nothing from a file is executed: pickles go through our own
restricted unpickler.

Pruning reparametrizations (``X_orig`` and ``X_mask`` of torch.nn.utils.prune) are resolved to ``X`` here,
for every source, so masks are never hashed.

torch is imported only when the source is a torch object: every file format is read with numpy alone.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFormatError, shown
from .readers import (
    MAX_JSON_BYTES,
    NESTED_CHECKPOINT_KEYS,
    NamedTensor,
    float32_or_none,
    max_bytes_from_env,
    parse_json,
)

Tensors = list[NamedTensor]


def load_tensors(source: Any, max_bytes: int | None = None) -> Tensors:
    """Return the floating-point tensors of ``source`` as NamedTensors, in source order.

    ``max_bytes`` bounds the tensor bytes a file (or a folder's shards together) may declare or inflate to
    (default: HASHDB_MAX_MODEL_BYTES, else readers.DEFAULT_MAX_BYTES). Raises ModelFormatError (naming the
    file for paths) when the source cannot be read or holds no tensor.
    """
    if isinstance(source, str | os.PathLike):
        limit = max_bytes_from_env() if max_bytes is None else max_bytes
        path = Path(source)
        tensors = load_folder(path, limit) if path.is_dir() else load_file(path, limit)
        if not tensors:
            raise ModelFormatError(f"{source}: no floating-point tensors found")
        return resolve_pruning(tensors)
    tensors = _from_object(source, where=type(source).__name__)
    if not tensors:
        raise ModelFormatError(f"{type(source).__name__} holds no floating-point tensors")
    return resolve_pruning(tensors)


def resolve_pruning(tensors: Tensors) -> Tensors:
    """``X_orig`` * ``X_mask`` becomes ``X`` (torch.nn.utils.prune before prune.remove); masks are dropped."""
    by_name = {t.name: t for t in tensors}
    out: Tensors = []
    for t in tensors:
        if t.name.endswith("_mask") and t.name[: -len("_mask")] + "_orig" in by_name:
            continue
        if t.name.endswith("_orig"):
            mask = by_name.get(t.name[: -len("_orig")] + "_mask")
            if mask is not None and mask.array.shape == t.array.shape:
                out.append(NamedTensor(t.name[: -len("_orig")], t.array * mask.array, t.layout))
                continue
        out.append(t)
    return out


# Formats read by a module of hashdb.codec.readers: format -> (module, function); imported on first use.
_READER_MODULES: dict[str, tuple[str, str]] = {
    "torch": ("pickle", "read"),
    "pdparams": ("pickle", "read"),
    "safetensors": ("safetensors", "read"),
    "npz": ("numpy", "read"),
    "npy": ("numpy", "read"),
    "onnx": ("onnx", "read"),
    "keras_h5": ("keras", "read_h5"),
    "keras": ("keras", "read_keras"),
    "tflite": ("tflite", "read"),
    "flax": ("flax", "read"),
    "tf_bundle": ("tensorflow", "read"),
    "paddle_inference": ("paddle", "read"),
    "coreml": ("coreml", "read"),
    "caffe": ("caffe", "read"),
    "darknet": ("darknet", "read"),
    "ncnn": ("ncnn", "read"),
    "openvino": ("openvino", "read"),
    "mxnet": ("mxnet", "read"),
    "mnn": ("mnn", "read"),
}
_SUFFIX_FORMATS: dict[str, str] = {
    ".safetensors": "safetensors", ".npz": "npz", ".npy": "npy", ".onnx": "onnx", ".pdparams": "pdparams",
    ".pt": "torch", ".pth": "torch", ".bin": "torch", ".ckpt": "torch", ".tar": "torch",
    ".h5": "keras_h5", ".hdf5": "keras_h5", ".keras": "keras", ".tflite": "tflite", ".msgpack": "flax",
    ".pdiparams": "paddle_inference", ".pdmodel": "paddle_inference", ".mlmodel": "coreml",
    ".caffemodel": "caffe", ".weights": "darknet", ".cfg": "darknet", ".param": "ncnn", ".xml": "openvino",
    ".params": "mxnet", ".mnn": "mnn",
}  # fmt: skip
MXNET_MAGIC = (0x112).to_bytes(8, "little")  # NDArray list files (mx.nd.save, Gluon export)


def paired_graph(path: Path) -> str | None:
    """The format of a raw ``.bin`` that is the weights half of an OpenVINO (``.xml``) or ncnn (``.param``) pair."""
    if path.with_suffix(".xml").is_file():
        return "openvino"
    if path.with_suffix(".param").is_file():
        return "ncnn"
    return None


def sniff_format(path: Path) -> str | None:
    """The format of ``path`` by its leading bytes first and its suffix second; None when neither tells."""
    with open(path, "rb") as f:
        head = f.read(16)
    suffix = path.suffix.lower()
    if suffix == ".index" or ".data-" in path.name or path.name.startswith("saved_model.pb"):
        # a TensorFlow bundle (an SSTable, told by its footer's magic), named by its index, a shard or its SavedModel
        from .readers.tensorflow import index_of, is_table

        if is_table(index_of(path)):
            return "tf_bundle"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "keras_h5"
    if head[4:8] == b"TFL3":
        return "tflite"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04"):  # zip: torch, TorchScript, .keras and .npz are all zip archives
        return {".keras": "keras", ".npz": "npz"}.get(suffix, "torch")
    if head.startswith(b"7767517"):
        return "ncnn"
    if head.startswith(MXNET_MAGIC):
        return "mxnet"
    if suffix == ".bin" and (paired := paired_graph(path)):
        return paired
    if len(head) >= 9 and head[8:9] == b"{" and suffix == ".safetensors":
        return "safetensors"
    if head[:1] == b"\x80" and suffix not in (".onnx", ".msgpack", ".tflite"):  # a pickle (legacy torch, paddle)
        return "pdparams" if suffix == ".pdparams" else "torch"
    return _SUFFIX_FORMATS.get(suffix)


def load_file(path: Path, max_bytes: int | None = None) -> Tensors:
    """Read one model file by its format; every failure becomes a ModelFormatError naming the file."""
    limit = max_bytes_from_env() if max_bytes is None else max_bytes
    if path.is_dir():
        raise ModelFormatError(f"{path}: is a directory, not a model file")
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        fmt = sniff_format(path)
        if fmt in _READER_MODULES:
            module, function = _READER_MODULES[fmt]
            reader = getattr(importlib.import_module(f".readers.{module}", __package__), function)
            return reader(path, limit)
    except ModelFormatError:
        raise
    except ModuleNotFoundError as exc:
        raise ModelFormatError(f"{path}: reading {suffix} files is not available in this build ({exc.name})") from None
    except MemoryError:
        raise ModelFormatError(f"{path}: out of memory reading the model") from None
    except Exception as exc:  # any parser failure on a bad file is a format error, not a crash
        raise ModelFormatError(f"{path}: cannot read {suffix} model ({type(exc).__name__}: {exc})") from exc
    raise ModelFormatError(
        f"{path}: unknown model file type {suffix!r} (want .pt, .pth, .bin, .safetensors, .npz, .npy, .onnx, ...)"
    )


# Weight files of a Hugging Face folder without an index, by preference (safetensors when both ship).
_HF_SINGLE = ("model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors",
              "diffusion_pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin", "model.pt",
              "pytorch_model.pt", "flax_model.msgpack", "tf_model.h5", "model.onnx")  # fmt: skip


def _check_inside(shard: Path, folder: Path) -> None:
    """Refuse a shard that is (a symlink to) a file outside the model folder: reading it would hash, and its
    errors quote, a file the folder does not hold. A Hugging Face cache snapshot's links into its repo's
    blobs/ folder stay inside (the repo folder is the bound there)."""
    from .units import _hf_cache_repo

    bound = folder.resolve()
    if _hf_cache_repo(folder.absolute()) is not None:
        bound = bound.parent.parent  # models--ORG--NAME/ holds snapshots/REV and blobs/
    target = shard.resolve()
    if target != bound and bound not in target.parents:
        raise ModelFormatError(f"{folder}: shard {shard.name} links to a file outside the model folder")


def folder_weight_files(folder: Path) -> list[Path]:
    """The weight files of a one-model folder: the shards its index names, or its single weight file."""
    from .units import format_folder_weights, is_regular_file

    special = format_folder_weights(folder)  # SavedModel, TF checkpoint folder, .mlpackage, Paddle inference
    if special is not None:
        for file in special:  # a SavedModel's variables index linked from elsewhere is no file this folder holds
            _check_inside(file, folder)
        return special
    # Only regular files: a FIFO would block the read forever and a symlink to /dev/zero never end it.
    indexes = sorted((p for p in folder.glob("*.index.json") if is_regular_file(p)),
                     key=lambda p: (".safetensors." not in p.name, p.name))  # fmt: skip
    for index in indexes:
        try:
            with open(index, "rb") as f:  # never more than a JSON document may hold (a file still growing)
                data = f.read(MAX_JSON_BYTES + 1)
            weight_map = parse_json(data, "shard index").get("weight_map")
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelFormatError(f"{index}: unreadable shard index ({exc})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFormatError(f"{index}: shard index has no weight_map")
        shards: list[Path] = []
        for name in dict.fromkeys(weight_map.values()):
            rel = os.path.normpath(str(name)) if isinstance(name, str) else ""
            if not rel or os.path.isabs(rel) or rel.startswith(".."):
                raise ModelFormatError(f"{index}: shard {shown(name)} lies outside the folder")
            shards.append(folder / rel)
        missing = [s.name for s in shards if not is_regular_file(s)]
        if missing:
            raise ModelFormatError(f"{index}: missing shard(s) {', '.join(missing[:3])}")
        for shard in shards:
            _check_inside(shard, folder)
        return shards
    for name in _HF_SINGLE:
        if is_regular_file(folder / name):
            _check_inside(folder / name, folder)
            return [folder / name]
    from .units import MODEL_SUFFIXES

    files = sorted(p for p in folder.iterdir() if is_regular_file(p) and p.suffix.lower() in MODEL_SUFFIXES)
    for file in files:
        _check_inside(file, folder)
    if files:
        suffix = files[0].suffix.lower()  # unindexed shards of one format: model-00001-of-00002.safetensors ...
        return [p for p in files if p.suffix.lower() == suffix]
    return []


def load_folder(folder: Path, max_bytes: int | None = None) -> Tensors:
    """The tensors of a folder that is one model (its shards together, under one size budget)."""
    from .units import find_units

    limit = max_bytes_from_env() if max_bytes is None else max_bytes
    units = find_units(folder)
    if not units:
        raise ModelFormatError(f"{folder}: no model files found in the folder")
    if len(units) > 1:
        raise ModelFormatError(f"{folder}: holds {len(units)} models; hash them one by one (hash_files)")
    unit = units[0].path
    if unit.is_file():
        return load_file(unit, limit)
    files = folder_weight_files(unit)
    if not files:
        raise ModelFormatError(f"{folder}: no weight files found in the model folder")
    out: Tensors = []
    used = 0
    for shard in files:
        tensors = load_file(shard, limit - used)
        used += sum(t.array.nbytes for t in tensors)
        out.extend(tensors)
    return out


def _float32(arr: Any) -> np.ndarray | None:
    """A float32 copy of a floating numpy array, None for integer/bool/object arrays (step counters, masks)."""
    return float32_or_none(np.asarray(arr))


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _tensor_to_numpy(t: Any) -> np.ndarray | None:
    if t.is_quantized:
        t = t.dequantize()
    if not t.is_floating_point() or t.numel() == 0:
        return None
    return t.detach().to(device="cpu").float().contiguous().numpy().copy()


def _from_object(obj: Any, where: str) -> Tensors:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        kind = type(obj).__name__
        raise ModelFormatError(f"{where}: expected a model, a state_dict or a mapping of tensors, got {kind}")
    tensors = _flat_tensors(obj)
    if tensors:
        return tensors
    for key in NESTED_CHECKPOINT_KEYS:  # a full checkpoint: {"epoch": 3, "state_dict": {...}, "optimizer": {...}}
        inner = obj.get(key)
        if torch is not None and isinstance(inner, torch.nn.Module):
            inner = inner.state_dict()
        if isinstance(inner, Mapping):
            tensors = _flat_tensors(inner)
            if tensors:
                return tensors
    return []


def _flat_tensors(mapping: Mapping) -> Tensors:
    out: Tensors = []
    for name, value in mapping.items():
        if _is_torch_tensor(value):
            arr = _tensor_to_numpy(value)
        elif isinstance(value, np.ndarray):
            arr = _float32(value)
        else:
            continue
        if arr is not None:
            out.append(NamedTensor(str(name), arr))
    return out
