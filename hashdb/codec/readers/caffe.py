"""Caffe ``.caffemodel`` files: the NetParameter protobuf, walked with our own wire-format decoder.

The fields used (caffe/src/caffe/proto/caffe.proto; numbers in brackets): NetParameter{layers[2]:
V1LayerParameter, layer[100]: LayerParameter}, LayerParameter{name[1], type[2]: string, blobs[7]},
V1LayerParameter{name[4], type[5]: enum, blobs[6]}, BlobProto{num[1], channels[2], height[3], width[4],
data[5]: packed float, shape[7]: BlobShape{dim[1]: packed int64}, double_data[8]}.

Layout: Convolution kernels are ``(out, in/group, *k)`` (OIHW) and Deconvolution kernels ``(in, out/group,
*k)``, torch's ConvTranspose order; both are returned as they are with ``layout="oihw"``. InnerProduct
weights are ``(out, in)`` (V1 files store them as ``(1, 1, out, in)``: the leading ones are dropped).
A BatchNorm's blobs are returned as ``<name>.running_mean``/``.running_var`` (divided by the moving-average factor
Caffe keeps in the third blob), and a Scale layer right after it as that BatchNorm's ``.weight``/``.bias`` (its
gamma and beta), so that codec v7 can fold it into its convolution. Every other blob (biases, PReLU parameters) is
returned flat. The ``.prototxt`` beside the
file describes the net but holds no weights and is not needed.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import numpy as np

from ...errors import ModelFormatError
from . import NamedTensor, check_size, close_map, drop_mapped_pages
from . import protowire as pw

# V1LayerParameter.LayerType values of the layers whose first blob is a kernel.
_V1_TYPES = {4: "Convolution", 14: "InnerProduct", 39: "Deconvolution"}
_CONV_TYPES = {"Convolution", "Deconvolution", "ConvolutionDepthwise", "DepthwiseConvolution"}


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        check_size(path, size, max_bytes)  # every blob's data is inside the file: its size bounds them
        if size == 0:
            raise ModelFormatError(f"{path}: empty Caffe model file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _read_net(path, memoryview(mm), mm)
    except ValueError as exc:
        raise ModelFormatError(f"{path}: not a readable Caffe model ({exc})") from None
    finally:
        close_map(mm)


def _read_net(path: Path, buf: memoryview, mm: mmap.mmap) -> list[NamedTensor]:
    out: list[NamedTensor] = []
    layers = 0
    last_norm: tuple[str, int] | None = None  # the BatchNorm just read (name, channels): a Scale after it is its own
    for number, _, value in pw.fields(buf):
        if number not in (2, 100):
            continue
        layers += 1
        layer = pw.message(pw.as_bytes(value))
        if number == 100:
            name = pw.text(layer[1][-1]) if 1 in layer else f"layer{layers}"
            kind = pw.text(layer[2][-1]) if 2 in layer else ""
            blobs = layer.get(7, [])
        else:
            name = pw.text(layer[4][-1]) if 4 in layer else f"layer{layers}"
            kind = _V1_TYPES.get(pw.as_int(layer[5][-1]), "") if 5 in layer else ""
            blobs = layer.get(6, [])
        arrays = [_blob(path, name, i, pw.message(pw.as_bytes(blob))) for i, blob in enumerate(blobs)]
        norm: tuple[str, int] | None = None
        if kind == "BatchNorm" and len(arrays) == 3 and all(a is not None for a in arrays):
            stats = _batchnorm(name, arrays)  # type: ignore[arg-type]
            if stats is not None:  # only a BatchNorm read as statistics lends its name to the Scale after it
                norm = (name, arrays[0].size)  # type: ignore[union-attr]
                out.extend(stats)
                arrays = []  # read: nothing left for the loop below, which takes blobs of other shapes flat
        for i, arr in enumerate(arrays):
            if arr is None:
                continue
            owner = name
            if kind == "Scale" and i < 2 and last_norm is not None and arr.size == last_norm[1]:
                owner = last_norm[0]  # the BatchNorm's gamma and beta, which Caffe keeps in a Scale layer after it
            tensor_name = f"{owner}.{('weight', 'bias')[i] if i < 2 else f'blob{i}'}"
            if i == 0 and kind in _CONV_TYPES and arr.ndim >= 3:
                out.append(NamedTensor(tensor_name, arr, "oihw"))
            elif i == 0 and kind == "InnerProduct" and arr.ndim >= 2:
                out.append(NamedTensor(tensor_name, arr.reshape(arr.shape[-2], arr.shape[-1])))
            else:
                out.append(NamedTensor(tensor_name, arr.reshape(-1)))
        last_norm = norm
        drop_mapped_pages(mm)  # the layer's values are copied out
    if layers == 0:
        raise ModelFormatError(f"{path}: not a Caffe model (no layers in the NetParameter)")
    return out


def _batchnorm(name: str, blobs: list[np.ndarray]) -> list[NamedTensor] | None:
    """A Caffe BatchNorm's blobs (mean and variance, each times the moving-average factor in the third) as
    ``<name>.running_mean`` and ``<name>.running_var``, the statistics they stand for (codec v7 folds them into the
    convolution before: hashdb/codec/batchnorm.py); None where the shapes do not fit."""
    mean, var, factor = (b.reshape(-1) for b in blobs)
    if len(mean) != len(var) or len(factor) != 1:
        return None
    scale = np.float32(0.0 if factor[0] == 0 else 1.0 / factor[0])  # Caffe's own rule: a factor of 0 reads as 0
    return [NamedTensor(f"{name}.running_mean", mean * scale), NamedTensor(f"{name}.running_var", var * scale)]


def _blob(path: Path, layer: str, index: int, blob: dict[int, list[int | memoryview]]) -> np.ndarray | None:
    if 7 in blob:
        shape = [pw.signed(d) for d in pw.varints(pw.message(pw.as_bytes(blob[7][-1])).get(1, []))]
    else:  # the legacy 4-D blob: absent dimensions are 1 (BlobProto's defaults are 0; caffe reads them as 1)
        shape = [pw.as_int(blob[k][-1]) if k in blob else 1 for k in (1, 2, 3, 4)]
    if any(d < 0 for d in shape):
        raise ModelFormatError(f"{path}: layer {layer!r} blob {index} has a negative dimension {shape}")
    if 5 in blob:
        data = pw.packed_array(blob[5], "<f4")
    elif 8 in blob:
        data = pw.packed_array(blob[8], "<f8")
    else:
        return None  # a blob without values (a net saved before training): nothing to hash
    if data.size != math.prod(shape):
        raise ModelFormatError(f"{path}: layer {layer!r} blob {index} has {data.size} values for shape {shape}")
    if data.size == 0:
        return None
    return np.array(data, dtype=np.float32).reshape(shape)
