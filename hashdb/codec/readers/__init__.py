"""Model file readers: one module per format, each turning a file into named float32 tensors.

The contract every reader module keeps (see docs/codec.md for the table of formats):

- ``read(path: Path, max_bytes: int) -> list[NamedTensor]`` (a module may export several such functions,
  e.g. ``keras.read_h5`` and ``keras.read_keras``); the registry in ``hashdb.codec.load`` picks the reader
  by the file's leading bytes first and its suffix second.
- Nothing from the file is executed; optional dependencies are imported inside ``read`` and a missing one
  raises ``ModelFormatError("needs the optional 'h5py' package: pip install hashdb[keras]")``.
- Every failure is a ``ModelFormatError`` whose message starts with the path and says what is wrong in
  hashdb's words (never a library's traceback text).
- Sizes are checked from headers before anything is allocated (``check_size``): a file may not declare
  or inflate to more than ``max_bytes`` of tensor data.
- Where the format states the layout, the reader transposes the kernel to (out, in, *spatial) and marks it
  ``layout="oihw"``; ``layout=None`` leaves the shape-based guess in ``select.conv_layers`` to decide.
- Quantized tensors are dequantized and pruning reparametrizations resolved before they are returned;
  integer/bool tensors that are not weights (masks, counters) are not returned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ...errors import ModelFormatError

# Default bound on the tensor bytes one model file may declare or inflate to; ModelHasher(max_bytes=...) and
# HASHDB_MAX_MODEL_BYTES override it. 8 GiB holds a 2B-parameter float32 model.
DEFAULT_MAX_BYTES = 8 << 30


# A reader that finds in the graph which convolution a BatchNorm follows names the BatchNorm's parameters after
# that kernel, ``<kernel>.bn.<role>``; codec.batchnorm pairs ``<kernel>.bn`` with the kernel before any name rule
BATCHNORM_OF = ".bn"


def batchnorm_name(kernel: str, role: str) -> str:
    """The name of a BatchNorm parameter (``role``: running_var, gamma, ...) the graph says follows ``kernel``."""
    return f"{kernel}{BATCHNORM_OF}.{role}"


class NamedTensor(NamedTuple):
    name: str
    array: np.ndarray  # float32
    layout: str | None = None  # "oihw" when the file stated the layout and the reader transposed to it


def check_size(path: Path | str, declared_bytes: int, max_bytes: int) -> None:
    """Refuse a file whose tensors would take more than ``max_bytes`` once read (checked before allocating)."""
    if declared_bytes > max_bytes:
        raise ModelFormatError(
            f"{path}: declares {declared_bytes:,} bytes of tensors, over the limit of {max_bytes:,} "
            f"(raise it with HASHDB_MAX_MODEL_BYTES or ModelHasher(max_bytes=...))"
        )


# What a file's tensors may expand to, as a multiple of the bytes it actually stores: int8/float8 -> float32 is
# 4x, and one tied copy (an embedding reused as the output layer) doubles that. Aliases (one array referenced
# many times), stride-0 views, fill values and decompression filters all count in what is produced, so a small
# file cannot make a reader allocate gigabytes; the floor lets tiny files with tiny tensors through.
MAX_EXPANSION = 8
EXPANSION_FLOOR = 16 << 20


def check_expansion(path: Path | str, stored_bytes: int, produced_bytes: int, max_bytes: int) -> None:
    """Refuse a file whose tensors would take more than ``max_bytes``, or more than MAX_EXPANSION times the
    bytes it stores (checked before allocating)."""
    check_size(path, produced_bytes, max_bytes)
    if produced_bytes > MAX_EXPANSION * stored_bytes + EXPANSION_FLOOR:
        raise ModelFormatError(
            f"{path}: its tensors would take {produced_bytes:,} bytes from {stored_bytes:,} bytes stored "
            f"(over {MAX_EXPANSION}x: aliased, repeated or filled data)"
        )


# Deepest nesting of containers a reader accepts from a file (pickles, msgpack, JSON configs). Real files nest
# under 20 deep; CPython hashes nested tuples and Python code walks nested containers recursively, so a deep
# enough file crashes a process (a 300,000-deep tuple key segfaulted) or escapes as RecursionError.
MAX_NESTING = 200

# A JSON config or index a reader parses: what parsing costs in Python objects is bounded by its bytes and by
# the containers it opens (a 60 MB config of empty lists took 1.6 GB); the largest real ones (Keras
# applications' config.json, a 70B model's index.json) are a few MB with tens of thousands of containers.
MAX_JSON_BYTES = 16 << 20
MAX_JSON_CONTAINERS = 1 << 20


def nesting_depth(obj: object, limit: int = MAX_NESTING) -> int:
    """How deep dicts, lists and tuples nest in ``obj`` (iteratively; stops counting past ``limit``)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        stack.extend((child, depth) for child in children)
    return deepest


def parse_json(data: bytes | str, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON document of a model file (a config, a shard index, a safetensors header) with its size,
    containers and nesting bounded; ValueError (saying ``what`` is wrong) on anything else."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise ValueError(f"{what} of {len(raw):,} bytes is over the limit of {max_bytes:,}")
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_CONTAINERS:
        raise ValueError(f"{what} opens over {MAX_JSON_CONTAINERS:,} arrays and objects")
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise ValueError(f"{what} nests over {MAX_NESTING} deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} is not valid JSON ({str(exc)[:80]})") from None
    if nesting_depth(doc) > MAX_NESTING:
        raise ValueError(f"{what} nests over {MAX_NESTING} deep")
    return doc


# A compressed member may inflate to at most this many times its compressed size (beyond 1 MiB): float
# weights compress by 1.1-2x, heavily pruned ones by ~10x; a 1000x member is a compression bomb.
MAX_INFLATION = 100


def check_inflation(path: Path | str, member: str, compressed: int, declared: int) -> None:
    """Refuse a compressed member whose declared size is a compression bomb's, before inflating it."""
    if declared > (1 << 20) and declared > MAX_INFLATION * max(compressed, 1):
        raise ModelFormatError(
            f"{path}: {member} would inflate {compressed:,} bytes to {declared:,} "
            f"({declared // max(compressed, 1):,}x, over {MAX_INFLATION}x): refused as a compression bomb"
        )


def check_zip_members(path: Path | str, infos: list, max_bytes: int) -> None:
    """check_size over the members' declared sizes, then check_inflation of each compressed one."""
    check_size(path, sum(i.file_size for i in infos), max_bytes)
    for info in infos:
        if info.compress_type != 0:
            check_inflation(path, info.filename, info.compress_size, info.file_size)


def max_bytes_from_env() -> int:
    """HASHDB_MAX_MODEL_BYTES when set (a positive integer of bytes), else DEFAULT_MAX_BYTES."""
    return positive_int_from_env("HASHDB_MAX_MODEL_BYTES", DEFAULT_MAX_BYTES, "bytes")


def positive_int_from_env(name: str, default: int, unit: str) -> int:
    """The environment variable ``name`` when set (a positive integer, a number of ``unit``), else ``default``."""
    import os

    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise ModelFormatError(f"{name} must be a positive number of {unit}, got {text!r}")
    return value


# Keys under which training scripts nest the weights inside a full checkpoint, most specific first; shared by
# the in-memory loader (load.py) and the pickle reader.
NESTED_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params",
                          "model_ema", "ema")  # fmt: skip


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as uint16 -> float32 (bf16 is the top half of a float32)."""
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


_FLOAT8: dict[str, np.ndarray] = {}


def float8_table(kind: str) -> np.ndarray:
    """The 256 float32 values of a float8 format ('e4m3fn' or 'e5m2'), indexed by the stored byte."""
    if kind not in _FLOAT8:
        exp_bits, man_bits = {"e4m3fn": (4, 3), "e5m2": (5, 2)}[kind]
        bias = (1 << (exp_bits - 1)) - 1
        byte = np.arange(256, dtype=np.int64)
        sign = np.where(byte >> 7, -1.0, 1.0)
        exp = (byte >> man_bits) & ((1 << exp_bits) - 1)
        man = byte & ((1 << man_bits) - 1)
        normal = (1.0 + man / (1 << man_bits)) * np.exp2(exp - bias)
        subnormal = (man / (1 << man_bits)) * np.exp2(1 - bias)
        values = sign * np.where(exp == 0, subnormal, normal)
        top = (1 << exp_bits) - 1
        if kind == "e4m3fn":  # no infinities; only S.1111.111 is NaN
            values = np.where((exp == top) & (man == (1 << man_bits) - 1), np.nan, values)
        else:  # IEEE-like: exponent all ones is inf (mantissa 0) or NaN
            values = np.where(exp == top, np.where(man == 0, sign * np.inf, np.nan), values)
        _FLOAT8[kind] = values.astype(np.float32)
    return _FLOAT8[kind]


def float32_or_none(arr: np.ndarray) -> np.ndarray | None:
    """A contiguous float32 copy of a floating array; None for integer/bool arrays and empty ones."""
    if arr.dtype.kind != "f" or arr.size == 0:
        return None
    return np.ascontiguousarray(arr, dtype=np.float32)


def drop_mapped_pages(mm: object) -> None:
    """Let the kernel unmap the pages of a read-only file mapping already read (touched again, they are read
    back from the file): a reader that copies each tensor out of the map calls it after each one, so the
    process holds the arrays it returns and not the file's pages as well (peak ~1x the weights, not 2x)."""
    import mmap

    advise = getattr(mm, "madvise", None)
    if advise is not None and hasattr(mmap, "MADV_DONTNEED"):
        advise(mmap.MADV_DONTNEED)


def close_map(mm: Any) -> None:
    """Close a reader's memory map (None is fine); a view still referenced by an exception's traceback keeps
    it open (BufferError), and the garbage collector closes it then."""
    if mm is None:
        return
    try:
        mm.close()
    except BufferError:
        pass
