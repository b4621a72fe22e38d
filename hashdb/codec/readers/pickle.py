"""Pickle-based checkpoints: torch zip and legacy checkpoints, whole pickled ``nn.Module`` objects, training
checkpoints, TorchScript archives and PaddlePaddle ``.pdparams``.

Every pickle goes through the restricted unpickler of ``unpickler.py`` (nothing from the file is imported or
called). Its result is walked for tensors: a module's ``_parameters``/``_buffers`` and ``_modules``
recursively with dotted names, nested dicts, lists and tuples.

Storages of a zip checkpoint stored uncompressed are memory-mapped by offset; compressed ones are inflated
only after their declared size passed ``check_size``.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelFormatError
from . import NESTED_CHECKPOINT_KEYS, NamedTensor, check_expansion, check_size, check_zip_members, float32_or_none
from .unpickler import NUMPY_KINDS, TORCH_DTYPES, NDArrayRef, Refused, StorageRef, Stub, TensorRef, Token, unpickle

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_PICKLE_BYTES = 1 << 30  # a data.pkl holding names and offsets; 1 GiB is far beyond any real one
_MAX_DEPTH = 1000  # nesting walked for tensors

# ---------------------------------------------------------------- walking the unpickled object for tensors

_SKIP_KEYS = frozenset({"optimizer", "optimizer_state_dict", "optim", "optimizer_states", "scheduler",
                        "lr_scheduler", "lr_schedulers", "scaler", "amp", "callbacks", "loops"})  # fmt: skip
_MODULE_FIELDS = ("_parameters", "_buffers", "_modules")


def _is_module(obj: Any) -> bool:
    if not isinstance(obj, Stub):
        return False
    state = obj.__dict__["_stub"]["state"]
    return isinstance(state, dict) and any(isinstance(state.get(f), dict) for f in _MODULE_FIELDS)


def _tensor_like(obj: Any) -> bool:
    return isinstance(obj, TensorRef | NDArrayRef) or (isinstance(obj, np.ndarray) and obj.dtype.kind in NUMPY_KINDS)


def _children(obj: Any) -> list[tuple[str, Any]] | None:
    """(name, child) pairs of a container or a stub, None for a leaf."""
    if isinstance(obj, dict):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, list | tuple):
        return [(str(i), v) for i, v in enumerate(obj)]
    if isinstance(obj, Stub):
        record = obj.__dict__["_stub"]
        state = record["state"]
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
            state = {**(state[0] if isinstance(state[0], dict) else {}), **state[1]}
        out: list[tuple[str, Any]] = []
        if isinstance(state, dict):
            if _is_module(obj):  # an nn.Module's __dict__: what state_dict() would hold
                for field in _MODULE_FIELDS:
                    inner = state.get(field)
                    if isinstance(inner, dict):
                        out.extend((str(k), v) for k, v in inner.items())
                return out
            out.extend((str(k), v) for k, v in state.items())
        elif state is not None:
            out.append(("state", state))
        out.extend((str(k), v) for k, v in record["items"].items())
        out.extend((str(i), v) for i, v in enumerate(record["list"]))
        if not out and record["args"]:
            out.extend((str(i), v) for i, v in enumerate(record["args"]))
        return out
    return None


def walk_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, tensor) for every tensor reachable from ``obj``, depth first, each object once."""
    seen: set[int] = set()
    stack: list[tuple[str, Any, int]] = [(prefix, obj, 0)]
    while stack:
        name, node, depth = stack.pop()
        if _tensor_like(node):
            yield name, node
            continue
        if id(node) in seen or depth > _MAX_DEPTH:
            continue
        seen.add(id(node))
        children = _children(node)
        if children:
            for key, child in reversed(children):
                stack.append((f"{name}.{key}" if name else key, child, depth + 1))


def _weights_root(obj: Any) -> Any:
    """The part of a checkpoint that holds the model: itself, or the first nested model entry."""
    items = _children(obj) if isinstance(obj, dict | Stub) else None
    if not items or _is_module(obj):
        return obj
    if any(_tensor_like(v) for _, v in items):
        return obj  # a state_dict
    named = dict(items)
    for key in NESTED_CHECKPOINT_KEYS:
        inner = named.get(key)
        if inner is not None and any(True for _ in walk_tensors(inner)):
            return inner
    return {k: v for k, v in items if k not in _SKIP_KEYS}


def _stored_and_produced(refs: list[tuple[str, Any]]) -> tuple[int, int]:
    """Bytes the tensors' distinct storages and arrays hold, and float32 bytes the tensors expand to."""
    stored: dict[int, int] = {}
    produced = 0
    for _, ref in refs:
        if isinstance(ref, TensorRef):
            data = ref.storage.data
            stored[id(ref.storage)] = data.nbytes if data is not None else 0
            produced += 4 * math.prod(ref.size)
        else:
            raw = ref.array if isinstance(ref, NDArrayRef) else ref
            if raw is not None:
                stored[id(raw)] = raw.nbytes
                produced += 4 * raw.size
    return sum(stored.values()), produced


def tensors_of(obj: Any, where: str, max_bytes: int) -> list[NamedTensor]:
    """The float tensors of an unpickled checkpoint as float32 arrays. What they expand to is bounded before
    any is built, by ``max_bytes`` and by the bytes the storages hold (check_expansion): views may overlap
    (stride 0 repeats one value any number of times) and the memo lets one array be referenced many times."""
    refs = list(walk_tensors(_weights_root(obj)))
    check_expansion(where, *_stored_and_produced(refs), max_bytes)
    out: list[NamedTensor] = []
    for name, ref in refs:
        try:
            if isinstance(ref, TensorRef):
                arr = ref.float32()
            else:
                raw = ref.array if isinstance(ref, NDArrayRef) else ref
                arr = float32_or_none(raw) if raw is not None else None
        except ValueError as exc:
            raise ModelFormatError(f"{where}: tensor {name}: {exc}") from None
        if arr is not None and arr.size:
            out.append(NamedTensor(name, arr))
    return out


# ---------------------------------------------------------------- file formats


def _zip_member_data(path: Path, f: Any, info: zipfile.ZipInfo) -> np.ndarray:
    """A stored member mapped from the file by its offset; a compressed one read (size checked before)."""
    if info.compress_type == zipfile.ZIP_STORED and info.file_size:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"bad local header of {info.filename}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if start + info.file_size > path.stat().st_size:
            raise ValueError(f"{info.filename} runs past the end of the file")
        return np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(info.file_size,))
    return None  # type: ignore[return-value]


def read_zip(path: Path, max_bytes: int) -> list[NamedTensor]:
    """A torch zip checkpoint or a TorchScript archive: ``*/data.pkl`` plus ``*/data/KEY`` storages."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        infos = zf.infolist()
        pkls = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
        if not pkls:
            raise ModelFormatError(f"{path}: a zip archive without data.pkl (not a torch checkpoint)")
        pkl = min(pkls, key=lambda i: i.filename.count("/"))
        root = pkl.filename[: -len("data.pkl")]
        members = {i.filename[len(root) + len("data/") :]: i for i in infos if i.filename.startswith(root + "data/")}
        check_zip_members(path, [*members.values(), pkl], max_bytes)
        if pkl.file_size > min(_MAX_PICKLE_BYTES, max_bytes):
            raise ModelFormatError(f"{path}: data.pkl declares {pkl.file_size:,} bytes")
        storages: dict[str, StorageRef] = {}

        def storage(pid: Any) -> StorageRef:
            if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
                raise Refused("unknown persistent id")
            _, stype, key, _location, numel = pid[:5]
            if not isinstance(stype, Token) or stype.kind not in ("storage", "dtype") or not isinstance(key, str):
                raise Refused("malformed storage reference")
            if key not in storages:
                storages[key] = StorageRef(key, stype.name, numel if isinstance(numel, int) else 0)
            return storages[key]

        obj = unpickle(io.BytesIO(zf.read(pkl)), storage)
        for key, st in storages.items():
            info = members.get(key)
            if info is None:
                raise ModelFormatError(f"{path}: storage {key} is missing from the archive")
            data = _zip_member_data(path, f, info)
            if data is None:
                data = np.frombuffer(zf.read(info), dtype=np.uint8)
            st.attach(data)
        return tensors_of(obj, str(path), max_bytes)


def read_legacy(path: Path, max_bytes: int) -> list[NamedTensor]:
    """A pre-1.6 torch checkpoint (magic number, protocol, sys info, the object, storage keys, raw storages),
    or any plain pickle (PaddlePaddle ``.pdparams``: a dict of numpy arrays)."""
    size = path.stat().st_size
    check_size(path, size, max_bytes)
    mapped = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    storages: dict[str, StorageRef] = {}

    def storage(pid: Any) -> StorageRef:
        if not isinstance(pid, tuple) or not pid:
            raise Refused("unknown persistent id")
        if pid[0] == "module":  # ("module", class, source file, source): the class (a stub), its source ignored
            if len(pid) > 1 and isinstance(pid[1], type) and issubclass(pid[1], Stub):
                return pid[1]  # type: ignore[return-value]
            raise Refused("malformed module reference")
        if pid[0] != "storage" or len(pid) < 5:
            raise Refused("unknown persistent id")
        _, stype, key, _location, numel = pid[:5]
        if not isinstance(stype, Token) or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise Refused("malformed storage reference")
        if key not in storages:
            storages[key] = StorageRef(key, stype.name, numel)
        return storages[key]

    with open(path, "rb") as stream:  # the C unpickler leaves the file just past each pickle it read
        first = unpickle(stream, storage)
        if not (isinstance(first, int) and first == _TORCH_MAGIC):  # a plain pickle: paddle, a bare dict
            return tensors_of(first, str(path), max_bytes)
        if unpickle(stream, storage) != 1001:
            raise ModelFormatError(f"{path}: unsupported legacy torch protocol version")
        unpickle(stream, storage)  # sys info
        obj = unpickle(stream, storage)
        keys = unpickle(stream, storage)
        pos = stream.tell()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ModelFormatError(f"{path}: malformed legacy storage key list")
    for key in keys:
        if pos + 8 > size:
            raise ModelFormatError(f"{path}: truncated legacy storage {key}")
        (numel,) = struct.unpack("<q", mapped[pos : pos + 8].tobytes())
        st = storages.get(key)
        itemsize = np.dtype(TORCH_DTYPES[st.dtype][0]).itemsize if st is not None else 1
        nbytes = numel * itemsize
        if numel < 0 or pos + 8 + nbytes > size:
            raise ModelFormatError(f"{path}: legacy storage {key} runs past the end of the file")
        if st is not None:
            st.attach(mapped[pos + 8 : pos + 8 + nbytes])
        pos += 8 + nbytes
    return tensors_of(obj, str(path), max_bytes)


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    """Any pickle-based checkpoint: zip (torch >= 1.6, TorchScript) or a plain/legacy pickle stream."""
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        if head == b"PK\x03\x04":
            return read_zip(path, max_bytes)
        if head[:1] != b"\x80":
            raise ModelFormatError(f"{path}: not a model file: unrecognised bytes")
        return read_legacy(path, max_bytes)
    except (zipfile.BadZipFile, zlib.error) as exc:
        raise ModelFormatError(f"{path}: corrupt zip checkpoint ({str(exc)[:120]})") from None
    except (ValueError, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError) as exc:
        raise ModelFormatError(f"{path}: cannot read checkpoint: {exc}") from None
