"""MNN ``.mnn`` models (Alibaba's mobile runtime): a flatbuffer, parsed with the table reader of tflite.py.

The schema fields used (MNN's schema/default/MNN.fbs and CNN.fbs; field slots in brackets): Net{oplists[3]},
Op{main_type[1]: ubyte, main[2]: OpParameter, name[3], type[5]: int}, OpParameter.Convolution2D = 9,
Convolution2D{common[0], weight[1]: [float], bias[2]: [float], quanParameter[3]: IDSTQuan, sparseParameter[5],
external[6]}, Convolution2DCommon{kernelX[2], kernelY[3], group[9], outputCount[10]}, IDSTQuan{buffer[0]:
[byte], alpha[1]: [float], type[2]: int, aMin[8]: int, shapeInt32[11]: bool}.

Read: the Convolution2D parameters of Convolution (op type 12), ConvolutionDepthwise (13), Deconvolution
(17) and DeconvolutionDepthwise (18) ops. Float weights of a convolution are ``(outputCount, in/group,
kernelY, kernelX)``, OIHW; of a deconvolution ``(in, out/group, kernelY, kernelX)``, torch's ConvTranspose
order (both checked against MNN's own converter: ONNX Conv and ConvTranspose weights come back unchanged).
The converter splits a grouped convolution into one op per group (``X__group__0``, ``X__group__1``...):
their kernels are joined back into one ``(out, in/group, ky, kx)`` kernel ``X``; it turns a Gemm/MatMul into
a 1x1 convolution named ``X__matmul_converted``: that one is returned as the ``(out, in)`` matrix it was.
Compressed weights (``IDSTQuan``) are decoded: type 3 is raw float16; type 1 is MNN's weight quantization
(``--weightQuantBits``): a header of the blob's dims (one byte count, then uint16 each, uint32 when
``shapeInt32``), a codebook of int8 values (one byte count, 0 meaning 256), then one index per weight of
ceil(log2(count)) bits, most significant bit first; the values are dequantized per output channel (a
contiguous block of weights), ``(q - aMin) * alpha[2o+1] + alpha[2o]`` when alpha holds two values per
channel (asymmetric, the converter's default) and ``q * alpha[o]`` when it holds one. This decoding was
checked against files written by MNN's converter (8-bit and 4-bit, asymmetric and symmetric: every weight
within half a step of the float file's). Sparse and externally stored weights and other quantization types
are refused with a one-line error; other ops (biases aside) are not read.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelFormatError
from . import NamedTensor, check_size, close_map, drop_mapped_pages
from .tflite import _Corrupt, _get, _Table, _Work

CONVOLUTION, CONVOLUTION_DEPTHWISE, DECONVOLUTION, DECONVOLUTION_DEPTHWISE = 12, 13, 17, 18
_CONV_OPS = (CONVOLUTION, CONVOLUTION_DEPTHWISE, DECONVOLUTION, DECONVOLUTION_DEPTHWISE)
CONVOLUTION_2D_PARAM = 9
FP16, QUANTIZED = 3, 1


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 8:
            raise ModelFormatError(f"{path}: truncated MNN file ({size} bytes)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _read_net(path, mm, max_bytes)
    except _Corrupt as exc:
        raise ModelFormatError(f"{path}: truncated or corrupt MNN flatbuffer ({exc})") from None
    except ModelFormatError:
        raise
    except (ValueError, TypeError, IndexError, OverflowError, MemoryError) as exc:
        raise ModelFormatError(f"{path}: corrupt MNN flatbuffer ({type(exc).__name__})") from None
    finally:
        close_map(mm)


def _read_net(path: Path, buf: Any, max_bytes: int) -> list[NamedTensor]:
    net = _Table(buf, _get(buf, "<I", 0), _Work(len(buf)))  # the same parse-work bound as TFLite
    planned: list[tuple[str, _Table, list[int]]] = []  # (name, parameters, [outputs, kernel y, kernel x, group])
    for i, op in enumerate(net.tables(3)):
        op_type = int(op.scalar(5, "<i", 0))
        if op_type not in _CONV_OPS:
            continue
        if int(op.scalar(1, "<B", 0)) != CONVOLUTION_2D_PARAM:
            continue
        conv = op.table(2)
        common = conv.table(0) if conv is not None else None
        if conv is None or common is None:
            raise ModelFormatError(f"{path}: convolution op {i} has no parameters")
        name = op.string(3) or f"op{i}"
        n, kx, ky = int(common.scalar(10, "<i", 0)), int(common.scalar(2, "<i", 1)), int(common.scalar(3, "<i", 1))
        if n <= 0 or kx <= 0 or ky <= 0:
            raise ModelFormatError(f"{path}: convolution {name!r}: {n} outputs of kernel {ky}x{kx}")
        group = int(common.scalar(9, "<i", 1)) if op_type in (DECONVOLUTION, DECONVOLUTION_DEPTHWISE) else 0
        if group < 0 or (group and n % group):
            raise ModelFormatError(f"{path}: deconvolution {name!r}: {n} outputs in {group} groups")
        planned.append((name, conv, [n, ky, kx, group]))
    check_size(path, sum(4 * _count(path, name, conv) for name, conv, _ in planned), max_bytes)
    out: list[NamedTensor] = []
    parts: dict[str, list[np.ndarray]] = {}  # a grouped conv the converter split into X__group__0, X__group__1...
    for name, conv, (n, ky, kx, group) in planned:
        flat = _weights(path, name, conv, n)
        drop_mapped_pages(buf)  # the weights are copied out
        if flat.size % (n * ky * kx):
            raise ModelFormatError(f"{path}: convolution {name!r}: {flat.size} weights for {n} outputs of {ky}x{kx}")
        bias = conv.numbers(2, "<f4").astype(np.float32)
        if group:  # deconvolution: (in, out/group, ky, kx), torch's ConvTranspose order
            out.append(NamedTensor(f"{name}.weight", flat.reshape(-1, n // group, ky, kx), "oihw"))
        elif name.endswith("__matmul_converted") and ky == kx == 1:  # a Linear/Gemm the converter made a 1x1 conv
            out.append(NamedTensor(f"{name}.weight", flat.reshape(n, -1)))
        elif "__group__" in name:
            parts.setdefault(name.rsplit("__group__", 1)[0], []).append(flat.reshape(n, -1, ky, kx))
            if bias.size:
                parts.setdefault(name.rsplit("__group__", 1)[0] + ".bias", []).append(bias)
            continue
        else:
            out.append(NamedTensor(f"{name}.weight", flat.reshape(n, -1, ky, kx), "oihw"))
        if bias.size:
            out.append(NamedTensor(f"{name}.bias", bias))
    for name, arrays in parts.items():
        if name.endswith(".bias"):
            out.append(NamedTensor(name, np.concatenate(arrays)))
        elif len({a.shape for a in arrays}) == 1:  # the groups' kernels back in one (out, in/group, ky, kx)
            out.append(NamedTensor(f"{name}.weight", np.concatenate(arrays), "oihw"))
        else:
            out.extend(NamedTensor(f"{name}__group__{k}.weight", a, "oihw") for k, a in enumerate(arrays))
    return out


def _count(path: Path, name: str, conv: _Table) -> int:
    """The number of weights a convolution declares (float vector, fp16 buffer or quantized blob's dims)."""
    if conv.table(5) is not None:
        raise ModelFormatError(f"{path}: convolution {name!r} has sparse weights (not supported)")
    if conv.vector(6, 8)[1]:
        raise ModelFormatError(f"{path}: convolution {name!r} keeps its weights in an external file (not supported)")
    quant = conv.table(3)
    if quant is None:
        return conv.vector(1, 4)[1]
    kind = int(quant.scalar(2, "<i", 0))
    start, nbytes = quant.vector(0, 1)
    if kind == FP16:
        return nbytes // 2
    if kind == QUANTIZED:
        if nbytes < 1:
            raise ModelFormatError(f"{path}: convolution {name!r}: empty quantized weight buffer")
        ndim, width = int(_get(quant.buf, "<B", start)), _dim_width(quant)
        if not 1 <= ndim <= 8 or 1 + width * ndim > nbytes:
            raise ModelFormatError(f"{path}: convolution {name!r}: quantized blob of {ndim} dims")
        fmt = "<I" if width == 4 else "<H"
        return math.prod(int(_get(quant.buf, fmt, start + 1 + width * k)) for k in range(ndim))
    raise ModelFormatError(f"{path}: convolution {name!r} uses MNN weight quantization type {kind} (not supported)")


def _dim_width(quant: _Table) -> int:
    return 4 if quant.scalar(11, "<B", 0) else 2


def _weights(path: Path, name: str, conv: _Table, n: int) -> np.ndarray:
    quant = conv.table(3)
    if quant is None:
        return conv.numbers(1, "<f4").astype(np.float32, copy=False)
    count = _count(path, name, conv)
    raw = quant.numbers(0, "u1")
    if int(quant.scalar(2, "<i", 0)) == FP16:
        return raw[: 2 * count].view("<f2").astype(np.float32)
    pos = 1 + _dim_width(quant) * int(raw[0])
    if pos >= raw.size:
        raise ModelFormatError(f"{path}: convolution {name!r}: quantized blob cut short")
    codes = int(raw[pos]) or 256
    pos += 1
    codebook = raw[pos : pos + codes].view(np.int8)
    pos += codes
    bits = max(1, math.ceil(math.log2(codes)))
    need = -(-bits * count // 8)
    if codebook.size != codes or pos + need > raw.size:
        raise ModelFormatError(f"{path}: convolution {name!r}: quantized blob of {count} weights cut short")
    index_bits = np.unpackbits(raw[pos : pos + need])[: bits * count].reshape(count, bits)
    index = index_bits.astype(np.int64) @ (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    if codes < 256 and index.size and int(index.max()) >= codes:
        raise ModelFormatError(f"{path}: convolution {name!r}: a weight index past its {codes}-value codebook")
    q = codebook[index].astype(np.float32).reshape(n, -1) if count % n == 0 else None
    alpha = quant.numbers(1, "<f4").astype(np.float32)
    if q is None or alpha.size not in (n, 2 * n):
        raise ModelFormatError(
            f"{path}: convolution {name!r}: {alpha.size} quantization scales for {n} outputs of {count} weights"
        )
    if alpha.size == 2 * n:
        low, scale = alpha[0::2, None], alpha[1::2, None]
        return ((q - np.float32(quant.scalar(8, "<i", 0))) * scale + low).astype(np.float32).reshape(-1)
    return (q * alpha[:, None]).astype(np.float32).reshape(-1)
