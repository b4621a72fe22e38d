"""Keras weights: HDF5 ``.h5``/``.hdf5`` (Keras 2 and legacy Keras 3 ``model.save``/``save_weights``), Keras 3
``.weights.h5`` and Keras 3 ``.keras`` archives (a zip holding ``config.json`` and ``model.weights.h5``).

Keras stores every convolution kernel with the spatial dims first: Conv1D/2D/3D kernels are
``(*k, in/groups, out)``, transposed convolutions ``(*k, out, in)``, depthwise kernels ``(*k, C, M)`` and Dense
kernels ``(in, out)``. Which array is which kernel comes from the layer's class, read from the model config
(``config.json``, or the ``model_config`` attribute of a legacy file) and, where there is none, from the names
Keras gives groups and weights (``depthwise_conv2d_1``, ``depthwise_kernel``). Kernels are returned as
``(out, in, *k)`` with ``layout="oihw"``: depthwise as ``(C*M, 1, *k)`` (torch's grouped layout), Dense as
``(out, in)``. Other float arrays (BatchNorm, biases, unknown layers) are returned unchanged with
``layout=None``. The config is parsed as JSON only: no layer, lambda or custom object is ever built.

Needs the optional ``h5py`` package (``pip install hashdb[keras]``); Keras itself is never imported.
"""

from __future__ import annotations

import io
import math
import re
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelFormatError
from . import (
    MAX_JSON_BYTES,
    NamedTensor,
    batchnorm_name,
    check_expansion,
    check_inflation,
    check_size,
    parse_json,
)

# Keras layer classes whose kernels we read: class -> {weight: kind}. A weight is its Keras 3 variable index
# (``vars/0``) or its Keras 2 / legacy weight name. kind: 'conv' (*k, in, out), 'depthwise' (*k, C, M),
# 'dense' (in, out); 'kernel' (a kernel of an unknown layer) is 'dense' when 2-D, else 'conv'.
_Kinds = dict[int | str, str]  # weight index or name -> kind
_CONV: _Kinds = {0: "conv", "kernel": "conv"}
_DEPTHWISE: _Kinds = {0: "depthwise", "kernel": "depthwise", "depthwise_kernel": "depthwise"}
_SEPARABLE: _Kinds = {0: "depthwise", 1: "conv", "depthwise_kernel": "depthwise", "pointwise_kernel": "conv"}
_LAYER_KERNELS: dict[str, _Kinds] = {
    "Conv1D": _CONV, "Conv2D": _CONV, "Conv3D": _CONV,
    "Convolution1D": _CONV, "Convolution2D": _CONV, "Convolution3D": _CONV,
    "Conv1DTranspose": _CONV, "Conv2DTranspose": _CONV, "Conv3DTranspose": _CONV,
    "DepthwiseConv1D": _DEPTHWISE, "DepthwiseConv2D": _DEPTHWISE,
    "SeparableConv1D": _SEPARABLE, "SeparableConv2D": _SEPARABLE,
    "Dense": {0: "dense", "kernel": "dense"},
}  # fmt: skip
# Keras names a layer (Keras 2, default names) or its weights group (Keras 3) by its class in snake case.


def _snake(cls: str) -> str:
    """Keras' snake-case rule: a capitalized word starts a new part, as does a capital after a lowercase
    letter ('DepthwiseConv2D' -> 'depthwise_conv2d', 'Conv2DTranspose' -> 'conv2d_transpose')."""
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", cls)).lower()


_SNAKE_CLASSES = {_snake(c): c for c in _LAYER_KERNELS}
_COPY_CHUNK = 1 << 20


def read_h5(path: Path, max_bytes: int) -> list[NamedTensor]:
    """Tensors of a Keras HDF5 file: legacy ``model_weights/<layer>/...``, ``save_weights`` files of Keras 2
    (``<layer>/<layer>/kernel:0``) and Keras 3 ``.weights.h5`` files (``layers/<class>/vars/<i>``)."""
    h5py = _h5py(path)
    with _open_h5(h5py, path, path) as f:
        return _read_h5_file(h5py, f, path, max_bytes, config=None)


def read_keras(path: Path, max_bytes: int) -> list[NamedTensor]:
    """Tensors of a Keras 3 ``.keras`` archive; its ``model.weights.h5`` is read in place when stored
    uncompressed (as Keras writes it), else inflated into a bounded temporary file."""
    h5py = _h5py(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelFormatError(f"{path}: not a readable .keras archive ({_reason(exc)})") from None
    with archive:
        names = set(archive.namelist())
        if "model.weights.h5" not in names:
            raise ModelFormatError(f"{path}: .keras archive without model.weights.h5")
        config = None
        if "config.json" in names:
            info = archive.getinfo("config.json")
            if info.file_size > MAX_JSON_BYTES:
                raise ModelFormatError(f"{path}: config.json of {info.file_size:,} bytes is implausibly large")
            check_inflation(path, "config.json", info.compress_size, info.file_size)
            try:
                config = parse_json(_read_member(archive, info, MAX_JSON_BYTES), "config.json")
            except ModelFormatError:
                raise
            except Exception as exc:  # bad JSON, nesting too deep, a corrupt zip member
                raise ModelFormatError(f"{path}: unreadable config.json in .keras archive ({_reason(exc)})") from None
        info = archive.getinfo("model.weights.h5")
        with _member_file(path, archive, info, max_bytes) as fileobj, _open_h5(h5py, fileobj, path) as f:
            return _read_h5_file(h5py, f, path, max_bytes, config=config)


# ---------------------------------------------------------------- opening


def _h5py(path: Path) -> Any:
    try:
        import h5py
    except ImportError:
        raise ModelFormatError(f"{path}: needs the optional 'h5py' package: pip install hashdb[keras]") from None
    return h5py


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _stored_end(f: Any) -> tuple[int, int] | None:
    """(where the HDF5 superblock says the file ends, the file's size), or None where no superblock is found at
    the offsets HDF5 looks at (0, 512, 1024, 2048, ...: after a user block) or its fields do not fit."""
    size = f.seek(0, io.SEEK_END)
    at = 0
    while at + 64 <= size:
        f.seek(at)
        head = f.read(64)
        if head[:8] == _HDF5_SIGNATURE:
            version = head[8]
            if version in (0, 1):
                width, fields = head[13], 24 + 4 * version  # then base, free space, end of file, driver addresses
            elif version in (2, 3):
                width, fields = head[9], 12  # then base, superblock extension, end of file, root group addresses
            else:
                return None
            if width not in (2, 4, 8) or fields + 3 * width > len(head):
                return None
            # the end-of-file address, the third address after the fixed fields: absolute, user block included
            # (HDF5's own truncation check reads it so: "the stored EOA being absolute offset"); a superblock
            # found past its base address (bytes put in front of a file) moves it, as HDF5 moves every address
            base = int.from_bytes(head[fields : fields + width], "little")
            end = int.from_bytes(head[fields + 2 * width : fields + 3 * width], "little")
            return end + at - base, size
        at = 512 if at == 0 else 2 * at
    return None


@contextmanager
def _open_h5(h5py: Any, source: Any, path: Path) -> Iterator[Any]:
    """The HDF5 file, after a check HDF5 makes only in part (it refuses a file shorter than its superblock says,
    not a longer one): that it is exactly as long. Bytes inserted or removed shift every address after them, and
    HDF5 then allocates whatever size it finds there (found by fuzzing: 200 bytes repeated in a 46 KB Keras file
    made it take 12 GB and a minute). Bytes appended to a whole file are refused too: they cannot be told apart."""
    try:
        if isinstance(source, str | Path):
            with open(source, "rb") as raw:
                ends = _stored_end(raw)
        else:
            ends = _stored_end(source)
            source.seek(0)
    except OSError:
        ends = None
    if ends is not None and ends[0] != ends[1]:
        raise ModelFormatError(
            f"{path}: damaged HDF5 file: {ends[1]:,} bytes where its superblock says {ends[0]:,} (bytes inserted, "
            "removed, cut off or appended)"
        )
    try:
        f = h5py.File(source, "r")
    except Exception:  # h5py raises OSError with HDF5's internal wording for every bad file
        raise ModelFormatError(f"{path}: not a readable HDF5 file (truncated or corrupt)") from None
    try:
        yield f
    finally:
        f.close()


class _Window(io.RawIOBase):
    """Read-only file object over bytes [start, start + size) of another file: a stored zip member in place."""

    def __init__(self, fileobj: Any, start: int, size: int) -> None:
        self._f, self._start, self._size, self._pos = fileobj, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    with archive.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise ModelFormatError(f"{info.filename}: member inflates past {limit:,} bytes")
    return data


@contextmanager
def _member_file(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int) -> Iterator[Any]:
    if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise ModelFormatError(f"{path}: corrupt .keras archive (bad local header of model.weights.h5)")
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            if start + info.file_size > f.seek(0, io.SEEK_END):
                raise ModelFormatError(f"{path}: truncated .keras archive")
            yield io.BufferedReader(_Window(f, start, info.file_size), buffer_size=1 << 16)
        return
    # Compressed member: inflate into an anonymous temporary file, never more than the tensor bound allows
    # (plus room for HDF5's own metadata), nor more than a plausible ratio of its compressed bytes.
    check_inflation(path, info.filename, info.compress_size, info.file_size)
    limit = max_bytes + (64 << 20)
    with tempfile.TemporaryFile() as tmp:
        try:
            with archive.open(info) as member:
                total = 0
                while chunk := member.read(_COPY_CHUNK):
                    total += len(chunk)
                    if total > limit:
                        check_size(path, total, max_bytes)
                    tmp.write(chunk)
        except ModelFormatError:
            raise
        except Exception as exc:  # BadZipFile, zlib.error, an unsupported compression method, EOFError
            raise ModelFormatError(f"{path}: corrupt .keras archive ({_reason(exc)})") from None
        tmp.seek(0)
        yield tmp


# ---------------------------------------------------------------- the HDF5 layouts


def _read_h5_file(h5py: Any, f: Any, path: Path, max_bytes: int, config: Any) -> list[NamedTensor]:
    try:
        model_weights = _hard_group(h5py, f, "model_weights")
        if model_weights is not None:
            config = config if config is not None else _json_attr(_attr(f, "model_config"))
            entries = _legacy_entries(h5py, model_weights, _config_classes(config))
        elif "layer_names" in f.attrs:
            config = config if config is not None else _json_attr(_attr(f, "model_config"))
            entries = _legacy_entries(h5py, f, _config_classes(config))
        elif "layers" in f or "vars" in f:
            entries, layer_of = _v3_entries(h5py, f, _config_classes(config))
            entries = _v3_batchnorms(entries, layer_of, config)
        else:
            raise ModelFormatError(f"{path}: HDF5 file without Keras weights (no model_weights, layers or layer_names)")
        # What reading makes, against what the file stores: an unallocated dataset reads as its fill value
        # and a filtered one inflates, so a few KB could make gigabytes (check_expansion).
        declared, stored = 0, 0
        for name, ds, _ in entries:
            raw = math.prod(ds.shape or ()) * ds.dtype.itemsize
            on_disk = ds.id.get_storage_size()
            declared += math.prod(ds.shape or ()) * max(4, ds.dtype.itemsize)
            if ds.id.get_create_plist().get_nfilters():  # compressed: the compression-bomb rule, as for zips
                check_inflation(path, f"dataset {name}", on_disk, raw)
                on_disk = raw
            stored += min(on_disk, raw)
        check_expansion(path, stored, declared, max_bytes)
        out: list[NamedTensor] = []
        for name, ds, kind in entries:
            arr = ds[()]
            if arr.dtype.kind != "f" or arr.size == 0:
                continue
            out.append(_to_tensor(name, np.asarray(arr, dtype=np.float32), kind))
        return out
    except ModelFormatError as exc:
        if str(exc).startswith(f"{path}: "):
            raise
        raise ModelFormatError(f"{path}: {exc}") from None
    except Exception as exc:  # a corrupt object table or data chunk inside an HDF5 file that opened
        raise ModelFormatError(f"{path}: corrupt Keras HDF5 file ({_reason(exc)})") from None


def _to_tensor(name: str, arr: np.ndarray, kind: str | None) -> NamedTensor:
    if kind == "kernel":  # a Keras 'kernel' of a layer whose class is unknown: Dense when 2-D, else a conv
        kind = "dense" if arr.ndim == 2 else "conv"
    if kind == "dense" and arr.ndim == 2:
        return NamedTensor(name, np.ascontiguousarray(arr.T), "oihw")
    if kind == "conv" and arr.ndim >= 3:
        ks = arr.ndim - 2
        return NamedTensor(name, np.ascontiguousarray(np.moveaxis(arr, (ks + 1, ks), (0, 1))), "oihw")
    if kind == "depthwise" and arr.ndim >= 3:
        ks = arr.ndim - 2
        c, m = arr.shape[ks], arr.shape[ks + 1]
        w = np.moveaxis(arr, (ks, ks + 1), (0, 1)).reshape(c * m, 1, *arr.shape[:ks])  # out channel = c * M + m
        return NamedTensor(name, np.ascontiguousarray(w), "oihw")
    return NamedTensor(name, arr, None)


def _json_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    try:
        return parse_json(value, "model_config")
    except ValueError:  # not JSON, or too large or deep: read the file without a config
        return None


def _attr(obj: Any, name: str) -> Any:
    """An attribute of an HDF5 object, refused before it is read when it stores more than a config may."""
    if name not in obj.attrs:
        return None
    try:
        stored = obj.attrs.get_id(name).get_storage_size()
    except RuntimeError:  # h5py reports a size of 0 (an empty attribute) as an error
        stored = 0
    if stored > MAX_JSON_BYTES:
        raise ModelFormatError(f"attribute {name!r} of {stored:,} bytes is implausibly large")
    return obj.attrs.get(name)


def _config_classes(config: Any) -> dict[str, str | None]:
    """Layer name -> class name over a model config's nested layers (None where a name is used twice)."""
    classes: dict[str, str | None] = {}
    stack, seen = [config], 0
    while stack and seen < 1_000_000:
        node = stack.pop()
        seen += 1
        if isinstance(node, dict):
            cls, cfg = node.get("class_name"), node.get("config")
            name = cfg.get("name") if isinstance(cfg, dict) else None
            if isinstance(cls, str) and isinstance(name, str):
                classes[name] = cls if classes.get(name, cls) == cls else None
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return classes


def _class_from_name(name: str) -> str | None:
    """The layer class Keras' default naming implies: 'depthwise_conv2d_3' -> 'DepthwiseConv2D'."""
    return _SNAKE_CLASSES.get(re.sub(r"_\d+$", "", name.lower()))


def _attr_strings(value: Any) -> list[str]:
    if value is None:
        return []
    # only strings and numbers: str() of a nested (variable-length) element would repr untrusted nesting
    items = np.asarray(value).ravel() if not isinstance(value, str | bytes) else [value]
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in items
            if isinstance(v, str | bytes | int | float | np.number)]  # fmt: skip


def _hard_group(h5py: Any, parent: Any, name: str) -> Any:
    """``parent[name]`` when it is a group reached by a hard link (never following a link to another file)."""
    if "/" in name or name in (".", ".."):
        return None
    link = parent.get(name, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise ModelFormatError(f"external link {name!r} to another file")
    if not isinstance(link, h5py.HardLink):
        return None
    obj = parent[name]
    return obj if isinstance(obj, h5py.Group) else None


def _datasets(h5py: Any, group: Any) -> list[tuple[str, Any]]:
    """Datasets under ``group`` reached through hard links only, in name order; external links, external
    storage and virtual datasets (which read other files) are refused."""
    links: list[tuple[str, Any]] = []
    group.visititems_links(lambda name, link: links.append((name, link)))  # raising inside h5py's visit breaks it
    found: list[tuple[str, Any]] = []
    for name, link in links:
        if isinstance(link, h5py.ExternalLink):
            raise ModelFormatError(f"external link {name!r} to another file")
        if isinstance(link, h5py.HardLink):
            obj = group[name]
            if isinstance(obj, h5py.Dataset):
                if obj.is_virtual or obj.external:
                    raise ModelFormatError(f"dataset {name!r} stores its data in another file")
                found.append((name, obj))
    return found


def _legacy_entries(h5py: Any, root: Any, classes: dict[str, str | None]) -> list[tuple[str, Any, str | None]]:
    """Keras 2 / legacy layout: ``<layer>`` groups listed in the ``layer_names`` attribute, each holding its
    weights under the paths of its ``weight_names`` attribute (``conv2d/kernel:0``)."""
    entries: list[tuple[str, Any, str | None]] = []
    layer_names = _attr_strings(_attr(root, "layer_names")) or list(root.keys())
    for layer in layer_names:
        group = _hard_group(h5py, root, layer)
        if group is None:
            continue
        cls = classes.get(layer) or _class_from_name(layer)
        datasets = dict(_datasets(h5py, group))
        order = [w for w in _attr_strings(_attr(group, "weight_names")) if w in datasets]
        order += [w for w in datasets if w not in order]
        for wname in order:
            base = wname.rsplit("/", 1)[-1].split(":", 1)[0]
            kinds = _LAYER_KERNELS.get(cls or "", {})
            kind = kinds.get(base)
            if kind is None and cls not in _LAYER_KERNELS:  # a nested model's weights: their own layer names tell
                parts = wname.split("/")
                inner = classes.get(parts[-2]) or _class_from_name(parts[-2]) if len(parts) >= 2 else None
                kind = _LAYER_KERNELS.get(inner or "", {}).get(base)
                if kind is None and base in ("kernel", "depthwise_kernel", "pointwise_kernel"):
                    kind = {"kernel": "kernel", "depthwise_kernel": "depthwise", "pointwise_kernel": "conv"}[base]
            entries.append((f"{layer}/{wname}", datasets[wname], kind))
    return entries


def _v3_entries(
    h5py: Any, root: Any, classes: dict[str, str | None]
) -> tuple[list[tuple[str, Any, str | None]], dict[str, str]]:
    """Keras 3 layout: ``.../layers/<class in snake case>[_N]/vars/<i>``, the ``vars`` group carrying the
    layer's name as an attribute. Also each such dataset's layer name (``_v3_batchnorms`` pairs by it)."""
    entries: list[tuple[str, Any, str | None]] = []
    layer_of: dict[str, str] = {}
    for name, ds in _datasets(h5py, root):
        parts = name.split("/")
        kind = None
        if len(parts) >= 3 and parts[-2] == "vars" and parts[-1].isdigit():
            layer_name = _attr(root[name].parent, "name")
            layer_name = layer_name.decode() if isinstance(layer_name, bytes) else layer_name
            if isinstance(layer_name, str):
                layer_of[name] = layer_name
            cls = classes.get(layer_name) if isinstance(layer_name, str) else None
            cls = cls or _class_from_name(parts[-3])
            kind = _LAYER_KERNELS.get(cls or "", {}).get(int(parts[-1]))
        entries.append((name, ds, kind))
    return entries, layer_of


def _inbound(layer: dict) -> str | None:
    """The name of the layer a functional model's layer reads (its first input), Keras 3 or Keras 2 form."""
    stack: list[Any] = [layer.get("inbound_nodes")]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            history = node.get("keras_history")
            if isinstance(history, list) and history and isinstance(history[0], str):
                return history[0]
            stack.extend(node.values())
        elif isinstance(node, list):
            if node and isinstance(node[0], str):  # Keras 2: [layer name, node index, tensor index, kwargs]
                return node[0]
            stack.extend(node)
    return None


def _config_batchnorms(config: Any) -> dict[str, tuple[str, bool, bool]]:
    """BatchNormalization layer name -> (the layer it reads, scale, center), from a model config: a functional
    model's inbound nodes, or the layer before it in a Sequential."""
    found: dict[str, tuple[str, bool, bool]] = {}
    stack, seen = [config], 0
    while stack and seen < 1_000_000:
        node = stack.pop()
        seen += 1
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        stack.extend(node.values())
        cfg = node.get("config")
        layers = cfg.get("layers") if isinstance(cfg, dict) else None
        if not isinstance(layers, list):
            continue
        previous = None
        for layer in layers:
            lcfg = layer.get("config") if isinstance(layer, dict) else None
            name = lcfg.get("name") if isinstance(lcfg, dict) else None
            if not isinstance(name, str) or not isinstance(lcfg, dict):
                continue
            source = _inbound(layer) if node.get("class_name") != "Sequential" else previous
            if layer.get("class_name") == "BatchNormalization" and isinstance(source, str):
                found[name] = (source, lcfg.get("scale", True) is not False, lcfg.get("center", True) is not False)
            previous = name
    return found


def _v3_batchnorms(
    entries: list[tuple[str, Any, str | None]], layer_of: dict[str, str], config: Any
) -> list[tuple[str, Any, str | None]]:
    """Keras 3 stores a BatchNormalization's variables by index (``vars/0``..``vars/3``) under a group named
    by class, apart from the convolution it follows. Renamed by role after the kernel of the layer it reads
    (``<kernel>.bn.gamma``, ``<kernel>.bn.moving_variance``), so that codec v7 folds it into that convolution
    (hashdb/codec/batchnorm.py). The model config says which layer that is and which variables it has. Without
    one (a ``.weights.h5``), a BatchNorm is paired only where the layers' own names say so (``x_conv``/``x_bn``,
    ``conv1``/``bn1``: batchnorm's name rules), its variables' roles from their count (4: gamma, beta, mean,
    variance; 2: mean, variance; 3: the first, gamma or beta, is left unnamed, so only the variance is folded).
    Not by the file's order: HDF5 packs small datasets together, so data offsets do not follow the order Keras
    wrote them in, and Keras writes parallel branches conv, conv, bn, bn anyway (measured: order pairing put 16 of
    InceptionV3's 94 BatchNorms on another convolution). A transposed convolution's kernel is (k, out, in): no
    BatchNorm is folded into it."""
    norms = _config_batchnorms(config)
    kernel_of: dict[str, str] = {}  # a layer's kernel that sets its outputs (a separable conv's pointwise one)
    width: dict[str, int] = {}  # a kernel's output channels
    for name, ds, kind in entries:
        if kind is None or name not in layer_of or "transpose" in name.rsplit("/", 3)[-3].lower():
            continue
        if kind != "depthwise" or layer_of[name] not in kernel_of:
            kernel_of[layer_of[name]] = name
        shape = tuple(ds.shape or ())
        if len(shape) >= 2:
            width[name] = shape[-2] * shape[-1] if kind == "depthwise" else shape[-1]
    renamed: dict[str, str] = {}
    for name, _, _ in entries:  # the config's BatchNorms: roles and source from the config
        norm = norms.get(layer_of.get(name, ""))
        if norm is not None and norm[0] in kernel_of:
            source, scale, center = norm
            roles = ["gamma"] * scale + ["beta"] * center + ["moving_mean", "moving_variance"]
            index = int(name.rsplit("/", 1)[1])
            if index < len(roles):
                renamed[name] = batchnorm_name(kernel_of[source], roles[index])
    # the rest by name; a BatchNorm the config names but that reads no convolution (one after an activation) is
    # no conv's
    taken = {kernel_of[source] for source, _, _ in norms.values() if source in kernel_of}
    from ..batchnorm import name_candidates

    by_candidate: dict[str, str] = {}  # a BatchNorm layer name that a conv's layer name implies -> that kernel
    for layer, layer_kernel in kernel_of.items():
        for c in name_candidates(layer):
            by_candidate.setdefault(c, layer_kernel)
    for variables in _unnamed_batchnorms(entries, layer_of, set(norms)).values():
        kernel = by_candidate.get(layer_of[variables[0][0]])
        if kernel is None or kernel in taken or width.get(kernel) != variables[0][1].shape[0]:
            continue
        taken.add(kernel)
        for (name, _), role in zip(variables, _BN_ROLES[len(variables)], strict=True):
            if role is not None:
                renamed[name] = batchnorm_name(kernel, role)
    return [(renamed.get(name, name), ds, kind) for name, ds, kind in entries]


# a Keras 3 BatchNormalization's variables by their count: gamma if scale, beta if center, then the statistics
_BN_ROLES: dict[int, tuple[str | None, ...]] = {
    4: ("gamma", "beta", "moving_mean", "moving_variance"),
    3: (None, "moving_mean", "moving_variance"),  # gamma or beta: which, only the config says
    2: ("moving_mean", "moving_variance"),
}


def _unnamed_batchnorms(
    entries: list[tuple[str, Any, str | None]], layer_of: dict[str, str], known: set[str]
) -> dict[str, list[tuple[str, Any]]]:
    """The variables, in index order, of each Keras 3 BatchNormalization layer (by its group's name,
    ``batch_normalization[_N]``) that the config does not name (``known``): group path -> [(dataset name,
    dataset)]. Only groups of 2-4 variables numbered 0.. that are all 1-D and of one width."""
    groups: dict[str, dict[int, tuple[str, Any]]] = {}
    for name, ds, _ in entries:
        parts = name.split("/")
        if len(parts) < 3 or parts[-2] != "vars" or not parts[-1].isdigit() or layer_of.get(name, "") in known:
            continue
        if name in layer_of and re.sub(r"_\d+$", "", parts[-3].lower()) == "batch_normalization":
            groups.setdefault(name.rsplit("/", 1)[0], {})[int(parts[-1])] = (name, ds)
    out: dict[str, list[tuple[str, Any]]] = {}
    for group, found in groups.items():
        variables = [found[i] for i in sorted(found)]
        shapes = {tuple(ds.shape or ()) for _, ds in variables}
        if len(found) in _BN_ROLES and sorted(found) == list(range(len(found))) and len(shapes) == 1:
            if len(next(iter(shapes))) == 1:
                out[group] = variables
    return out
