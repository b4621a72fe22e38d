"""Any model source -> a list of (name, float32 ndarray).

Sources: a torch ``nn.Module``, a state_dict or any mapping of name -> tensor/array (also a full checkpoint
holding one under "state_dict"/"model"), or a path to ``.pt``/``.pth``/``.bin`` (torch.load with
``weights_only=True``), ``.safetensors`` (read here with numpy: the format is a JSON header plus raw
little-endian buffers, so neither torch nor the safetensors package is needed), ``.npz``
(``allow_pickle=False``) or ``.onnx`` (initializers, needs the optional onnx package).

torch is imported only when the source is a torch object or a torch file: hashing an ``.npz`` or a mapping
of numpy arrays never imports it.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFormatError
from .readers import DEFAULT_MAX_BYTES, NamedTensor

Tensors = list[NamedTensor]

# Keys under which training scripts nest the weights inside a full checkpoint, most specific first.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")

_SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}  # fmt: skip


def load_tensors(source: Any) -> Tensors:
    """Return the floating-point tensors of ``source`` as (name, float32 array) pairs, in source order.

    Raises ModelFormatError (naming the file for paths) when the source cannot be read or holds no tensor.
    """
    if isinstance(source, str | os.PathLike):
        tensors = load_file(Path(source))
        if not tensors:
            raise ModelFormatError(f"{source}: no floating-point tensors found")
        return tensors
    tensors = _from_object(source, where=type(source).__name__)
    if not tensors:
        raise ModelFormatError(f"{type(source).__name__} holds no floating-point tensors")
    return tensors


# Formats read by a module of hashdb.codec.readers: format -> (module, function); imported on first use.
_READER_MODULES: dict[str, tuple[str, str]] = {
    "keras_h5": ("keras", "read_h5"),
    "keras": ("keras", "read_keras"),
    "tflite": ("tflite", "read"),
    "flax": ("flax", "read"),
}
_SUFFIX_FORMATS: dict[str, str] = {
    ".safetensors": "safetensors", ".npz": "npz", ".onnx": "onnx",
    ".pt": "torch", ".pth": "torch", ".bin": "torch", ".ckpt": "torch", ".tar": "torch",
    ".h5": "keras_h5", ".hdf5": "keras_h5", ".keras": "keras", ".tflite": "tflite", ".msgpack": "flax",
}  # fmt: skip


def sniff_format(path: Path) -> str | None:
    """The format of ``path`` by its leading bytes first and its suffix second; None when neither tells."""
    with open(path, "rb") as f:
        head = f.read(16)
    suffix = path.suffix.lower()
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "keras_h5"
    if head[4:8] == b"TFL3":
        return "tflite"
    if head.startswith(b"PK\x03\x04"):  # zip: torch, TorchScript, .keras and .npz are all zip archives
        return {".keras": "keras", ".npz": "npz"}.get(suffix, "torch")
    if len(head) >= 9 and head[8:9] == b"{" and suffix == ".safetensors":
        return "safetensors"
    return _SUFFIX_FORMATS.get(suffix)


def load_file(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Tensors:
    """Read one model file by its format; every failure becomes a ModelFormatError naming the file."""
    if path.is_dir():
        raise ModelFormatError(f"{path}: is a directory, not a model file")
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        fmt = sniff_format(path)
        if fmt in _READER_MODULES:
            import importlib

            module, function = _READER_MODULES[fmt]
            reader = getattr(importlib.import_module(f".readers.{module}", __package__), function)
            return reader(path, max_bytes)
        if fmt == "safetensors":
            return _read_safetensors(path)
        if fmt == "npz":
            return _read_npz(path)
        if fmt == "onnx":
            return _read_onnx(path)
        if fmt == "torch":
            return _read_torch(path)
    except ModelFormatError:
        raise
    except Exception as exc:  # any parser failure on a bad file is a format error, not a crash
        raise ModelFormatError(f"{path}: cannot read {suffix} model ({type(exc).__name__}: {exc})") from exc
    raise ModelFormatError(f"{path}: unknown model file type {suffix!r} (want .pt, .pth, .safetensors, .npz, .onnx)")


def _read_torch(path: Path) -> Tensors:
    import pickle

    try:
        import torch
    except ImportError:
        raise ModelFormatError(f"{path}: needs the optional 'torch' package: pip install hashdb[torch]") from None

    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": noise for a caller hashing many files
            warnings.filterwarnings("ignore", module=r"torch(\.|$)")
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise ModelFormatError(
            f"{path}: checkpoint needs arbitrary unpickling, refused (only weights_only=True files are read; "
            f"save a state_dict instead): {str(exc).splitlines()[0][:200]}"
        ) from exc
    return _from_object(obj, where=str(path))


def _read_npz(path: Path) -> Tensors:
    with np.load(path, allow_pickle=False) as data:
        return [NamedTensor(name, arr) for name in data.files if (arr := _float32(data[name])) is not None]


def _read_onnx(path: Path) -> Tensors:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise ModelFormatError(f"{path}: reading .onnx needs the optional 'onnx' package") from exc
    model = onnx.load(str(path), load_external_data=False)
    out: Tensors = []
    for init in model.graph.initializer:
        arr = _float32(numpy_helper.to_array(init))
        if arr is not None:
            out.append(NamedTensor(init.name, arr))
    return out


def _read_safetensors(path: Path) -> Tensors:
    raw = path.read_bytes()
    if len(raw) < 8:
        raise ModelFormatError(f"{path}: truncated safetensors file")
    header_len = int.from_bytes(raw[:8], "little")
    if header_len <= 0 or 8 + header_len > len(raw):
        raise ModelFormatError(f"{path}: bad safetensors header length {header_len}")
    header = json.loads(raw[8 : 8 + header_len])
    body = memoryview(raw)[8 + header_len :]
    out: Tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":  # bf16 is the top half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        arr32 = _float32(arr)
        if arr32 is not None:
            out.append(NamedTensor(name, arr32))
    return out


def _float32(arr: Any) -> np.ndarray | None:
    """A float32 copy of a floating numpy array, None for integer/bool/object arrays (step counters, masks)."""
    arr = np.asarray(arr)
    if arr.dtype.kind != "f" or arr.size == 0:
        return None
    return np.ascontiguousarray(arr, dtype=np.float32)


def _is_torch_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _tensor_to_numpy(t: Any) -> np.ndarray | None:
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
    for key in _NESTED_KEYS:  # a full checkpoint: {"epoch": 3, "state_dict": {...}, "optimizer": {...}}
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
