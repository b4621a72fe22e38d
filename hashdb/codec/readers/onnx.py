"""ONNX models: the graph's initializers (needs the optional ``onnx`` package: pip install hashdb[onnx]).

Conv weights (an initializer that is input 1 of a Conv node) are OIHW by the ONNX spec and are marked so.
External data is resolved against the model file's own folder only: an absolute location, one that
leaves the folder (``..``, a symlink out) or a missing file is refused; the current directory is never
looked at. Its declared length is size-checked before it is mapped.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelFormatError
from . import NamedTensor, bf16_to_float32, check_expansion, check_size, float8_table, float32_or_none

# TensorProto.DataType -> (numpy dtype of the stored bytes, decoding)
_TYPES: dict[int, tuple[str, str]] = {
    1: ("<f4", "float"), 10: ("<f2", "float"), 11: ("<f8", "float"), 16: ("<u2", "bf16"),
    17: ("u1", "e4m3fn"), 19: ("u1", "e5m2"),
}  # fmt: skip


def _external(path: Path, init: Any, folder: Path, max_bytes: int) -> np.ndarray | None:
    info = {e.key: e.value for e in init.external_data}
    location = info.get("location", "")
    if not location or os.path.isabs(location) or "\x00" in location:
        raise ModelFormatError(f"{path}: initializer {init.name!r}: external data location {location!r} refused")
    target = (folder / location).resolve()
    if not target.is_relative_to(folder):
        raise ModelFormatError(
            f"{path}: initializer {init.name!r}: external data {location!r} lies outside the model's folder"
        )
    if not target.is_file():
        raise ModelFormatError(f"{path}: initializer {init.name!r}: external data file {location!r} not found")
    if init.data_type not in _TYPES:
        return None
    np_dtype, _ = _TYPES[init.data_type]
    shape = tuple(int(d) for d in init.dims)
    if any(d < 0 for d in shape):
        raise ModelFormatError(f"{path}: initializer {init.name!r}: negative dimension")
    nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
    check_size(path, nbytes, max_bytes)
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info.get("length", str(nbytes)) or nbytes)
    except ValueError:
        raise ModelFormatError(f"{path}: initializer {init.name!r}: bad external data offset/length") from None
    if offset < 0 or length != nbytes or offset + nbytes > target.stat().st_size:
        raise ModelFormatError(f"{path}: initializer {init.name!r}: external data range does not fit {location!r}")
    if nbytes == 0:
        return np.zeros(shape, dtype=np_dtype)
    return np.asarray(np.memmap(target, dtype=np_dtype, mode="r", offset=offset, shape=shape))


def _decode(raw: np.ndarray, data_type: int) -> np.ndarray | None:
    decode = _TYPES[data_type][1]
    if decode == "float":
        return float32_or_none(raw)
    if decode == "bf16":
        return bf16_to_float32(raw)
    return float8_table(decode)[raw]


def _check_expansion(path: Path, model: Any, folder: Path, max_bytes: int) -> None:
    """What the float initializers make against the bytes stored (check_expansion): many initializers may
    name one range of one external file, and each would be read again."""
    import onnx

    produced = 0
    ranges: dict[str, dict[int, int]] = {}  # external location -> offset -> length
    for init in model.graph.initializer:
        if init.data_type not in _TYPES or any(int(d) < 0 for d in init.dims):
            continue  # skipped, or refused with its own message when read
        produced += 4 * math.prod(int(d) for d in init.dims)
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            try:
                offset, length = int(info.get("offset", "0") or 0), int(info.get("length", "0") or 0)
            except ValueError:
                continue  # refused when read
            at = ranges.setdefault(info.get("location", ""), {})
            at[offset] = max(at.get(offset, 0), length)
    stored = path.stat().st_size
    for location, lengths in ranges.items():
        try:  # only its size: where it may be read from is checked (and refused) when it is read
            target = folder / location
            size = target.stat().st_size if location and target.is_file() else 0
        except (OSError, ValueError):  # a NUL or an over-long name
            size = 0
        stored += min(sum(lengths.values()), size)  # overlapping ranges never count past the file
    check_expansion(path, stored, produced, max_bytes)


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ModelFormatError(f"{path}: needs the optional 'onnx' package: pip install hashdb[onnx]") from None
    check_size(path, path.stat().st_size, max_bytes)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not a valid ModelProto
        raise ModelFormatError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    folder = path.resolve().parent
    _check_expansion(path, model, folder, max_bytes)
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1}
    out: list[NamedTensor] = []
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raw = _external(path, init, folder, max_bytes)
            arr = None if raw is None else _decode(raw, init.data_type)
        elif init.data_type in _TYPES:
            shape = tuple(int(d) for d in init.dims)
            if any(d < 0 for d in shape):
                raise ModelFormatError(f"{path}: initializer {init.name!r}: negative dimension")
            try:
                if init.raw_data:
                    raw = np.frombuffer(init.raw_data, dtype=_TYPES[init.data_type][0]).reshape(shape)
                    arr = _decode(raw, init.data_type)
                else:  # values in the typed fields (float_data, int32_data for fp16/bf16): onnx decodes them
                    arr = np.asarray(numpy_helper.to_array(init)).astype(np.float32)
            except (ValueError, TypeError) as exc:
                raise ModelFormatError(f"{path}: initializer {init.name!r}: {str(exc)[:120]}") from None
        else:
            continue
        if arr is not None and arr.size:
            layout = "oihw" if init.name in conv_weights and arr.ndim >= 3 else None
            out.append(NamedTensor(init.name, np.ascontiguousarray(arr, dtype=np.float32), layout))
    return out
