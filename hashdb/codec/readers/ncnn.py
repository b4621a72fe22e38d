"""ncnn models: the ``.param`` text graph and the ``.bin`` of weights beside it (same stem).

``.param``: the magic line ``7767517``, then ``layer_count blob_count``, then one layer per line: ``Type Name
inputs outputs input_blobs... output_blobs... key=value...`` (a negative key ``-23300-k`` is an array:
``count,v1,v2...``). ``.bin``: each layer's weights in layer order, as ncnn's ``ModelBinFromDataReader``
reads them: a run read "with a tag" starts with a 4-byte flag (0: float32; 0x01306B47: float16;
0x000D4B38: int8; 0x0002C056: float32; any other non-zero flag: a 256-float table then one uint8 index per
value), each payload padded to 4 bytes; a run read "raw" is float32 without a flag.

Read: Convolution/ConvolutionDepthWise (+1D/3D) kernels ``(num_output, in/group, *k)`` (OIHW, marked),
Deconvolution kernels ``(num_output, in, *k)`` returned in torch's ConvTranspose order ``(in, out, *k)``,
InnerProduct ``(out, in)``, biases, BatchNorm/Scale/PReLU/norm parameters, Embed and MemoryData. int8
kernels are dequantized by their per-output (per-group for depthwise) scales: ``q / scale``. Layers that
carry weights hashdb does not read (recurrent, attention) are refused by name, and the ``.bin`` must be
consumed exactly: a byte left over means a layer read here was misunderstood, which is an error.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import numpy as np

from ...errors import ModelFormatError
from . import NamedTensor, check_size, close_map, drop_mapped_pages

MAGIC = "7767517"
MAX_PARAM_BYTES = 16 << 20
FP16_TAG, INT8_TAG, RAW_SCALED_TAG = 0x01306B47, 0x000D4B38, 0x0002C056
_UNREAD = {"LSTM", "GRU", "RNN", "MultiHeadAttention", "Gemm", "SDPA", "Convolution1DDepthWise_int8"}
Params = dict[int, list[float]]


def companion(path: Path, suffix: str) -> Path:
    other = path.with_suffix(suffix)
    if not other.is_file():
        raise ModelFormatError(f"{path}: its {suffix} file {other.name} is missing beside it")
    return other


def parse_param(path: Path) -> list[tuple[str, str, Params]]:
    """(type, name, params) per layer of a ``.param`` file."""
    if path.stat().st_size > MAX_PARAM_BYTES:
        raise ModelFormatError(f"{path}: ncnn param file over {MAX_PARAM_BYTES:,} bytes")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if not lines or lines[0] != MAGIC:
        raise ModelFormatError(f"{path}: not an ncnn param file (no {MAGIC} magic line)")
    try:
        layer_count = int(lines[1].split()[0]) if len(lines) > 1 else -1
    except ValueError:
        layer_count = -1
    if layer_count != len(lines) - 2:
        raise ModelFormatError(f"{path}: declares {layer_count} layers, has {len(lines) - 2} layer lines")
    layers = []
    for number, line in enumerate(lines[2:], 3):
        parts = line.split()
        try:
            n_in, n_out = int(parts[2]), int(parts[3])
            if n_in < 0 or n_out < 0 or len(parts) < 4 + n_in + n_out:
                raise ValueError
            params: Params = {}
            for item in parts[4 + n_in + n_out :]:
                key_text, value = item.split("=", 1)
                key = int(key_text)
                if key <= -23300:  # an array: count,v1,v2,...
                    values = [float(v) for v in value.split(",")]
                    params[-23300 - key] = values[1:]
                else:
                    values = [float(value)]
                    params[key] = values
                if not all(math.isfinite(v) and abs(v) < 2**62 for v in values):
                    raise ValueError
        except (ValueError, IndexError):
            raise ModelFormatError(f"{path}: line {number}: not an ncnn layer line: {line[:60]!r}") from None
        layers.append((parts[0], parts[1], params))
    return layers


class _Bin:
    """The ``.bin`` as a cursor over its bytes; every run is bounds-checked before it is sliced."""

    def __init__(self, path: Path, buf: memoryview) -> None:
        self.path, self.buf, self.pos = path, buf, 0

    def take(self, nbytes: int, what: str) -> memoryview:
        if nbytes < 0 or self.pos + nbytes > len(self.buf):
            raise ModelFormatError(f"{self.path}: ends inside {what} (truncated, or the .param does not match)")
        out = self.buf[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return out

    def raw(self, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(4 * count, what), "<f4").astype(np.float32)

    def tagged(self, count: int, what: str) -> tuple[np.ndarray, bool]:
        """A run read with its flag: (float32 values, True when they are int8 to be scaled)."""
        tag = int.from_bytes(self.take(4, what), "little")
        if tag == FP16_TAG:
            data = self.take((2 * count + 3) // 4 * 4, what)
            return np.frombuffer(data[: 2 * count], "<f2").astype(np.float32), False
        if tag == INT8_TAG:
            data = self.take((count + 3) // 4 * 4, what)
            return np.frombuffer(data[:count], "i1").astype(np.float32), True
        if tag in (0, RAW_SCALED_TAG):
            return self.raw(count, what), False
        table = np.frombuffer(self.take(1024, what), "<f4")
        index = np.frombuffer(self.take((count + 3) // 4 * 4, what)[:count], "u1")
        return table[index].astype(np.float32), False


def _p(params: Params, key: int, default: float = 0) -> int:
    return int(params.get(key, [default])[0])


def _size(path: Path, kind: str, params: Params) -> int:
    """The number of float32-or-smaller values a layer reads (for the size check before reading)."""
    if kind in ("Convolution", "ConvolutionDepthWise", "Convolution1D", "Convolution3D", "ConvolutionDepthWise1D",
                "ConvolutionDepthWise3D", "Deconvolution", "DeconvolutionDepthWise", "Deconvolution1D",
                "Deconvolution3D", "DeconvolutionDepthWise1D", "DeconvolutionDepthWise3D", "InnerProduct"):  # fmt: skip
        return _p(params, 6 if kind != "InnerProduct" else 2) + _p(params, 0)
    return 0


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    if path.suffix.lower() == ".bin":
        path = path.with_suffix(".param")
    layers = parse_param(path)
    bin_path = companion(path, ".bin")
    check_size(path, 4 * sum(_size(path, k, p) for k, _, p in layers), max_bytes)
    with open(bin_path, "rb") as f:
        size = f.seek(0, 2)
        check_size(bin_path, size, max_bytes)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    try:
        reader = _Bin(bin_path, memoryview(mm) if mm is not None else memoryview(b""))
        out: list[NamedTensor] = []
        for kind, name, params in layers:
            out.extend(_layer(path, reader, kind, name, params))
            if mm is not None:
                drop_mapped_pages(mm)  # the layer's values are copied out
        if reader.pos != size:
            raise ModelFormatError(
                f"{bin_path}: {size - reader.pos:,} bytes left after the last layer the .param describes "
                f"(the .param does not match, or a layer type carries weights hashdb does not read)"
            )
        return out
    finally:
        close_map(mm)


def _layer(path: Path, bin_: _Bin, kind: str, name: str, params: Params) -> list[NamedTensor]:
    if kind in _UNREAD:
        raise ModelFormatError(f"{path}: layer {name!r} of type {kind} carries weights hashdb does not read")
    base = kind.replace("DepthWise", "")
    if base.startswith(("Convolution", "Deconvolution")):
        return _conv(path, bin_, kind, name, params)
    if kind == "InnerProduct":
        n, size = _p(params, 0), _p(params, 2)
        if n <= 0 or size <= 0 or size % n:
            raise ModelFormatError(f"{path}: layer {name!r}: weight_data_size {size} for {n} outputs")
        weight, quantized = bin_.tagged(size, f"{name} weights")
        out = [NamedTensor(f"{name}.weight", weight.reshape(n, size // n))]
        if _p(params, 1):
            out.append(NamedTensor(f"{name}.bias", bin_.raw(n, f"{name} bias")))
        if _p(params, 8):
            scales = bin_.raw(n, f"{name} int8 scales")
            bin_.raw(1, f"{name} input scale")
            if quantized:
                out[0] = NamedTensor(f"{name}.weight", _descale(path, name, weight.reshape(n, -1), scales))
        return out
    if kind == "BatchNorm":
        c = _p(params, 0)
        return [NamedTensor(f"{name}.{part}", bin_.raw(c, f"{name} {part}"))
                for part in ("weight", "running_mean", "running_var", "bias")]  # fmt: skip
    if kind == "Scale":
        c = _p(params, 0)
        if c == -233:  # the scale is the layer's second input: no data
            return []
        out = [NamedTensor(f"{name}.weight", bin_.raw(c, f"{name} scale"))]
        if _p(params, 1):
            out.append(NamedTensor(f"{name}.bias", bin_.raw(c, f"{name} bias")))
        return out
    if kind == "PReLU":
        return [NamedTensor(f"{name}.weight", bin_.raw(_p(params, 0), f"{name} slopes"))]
    if kind in ("LayerNorm", "InstanceNorm", "GroupNorm"):
        c, affine = (_p(params, 1), _p(params, 3, 1)) if kind == "GroupNorm" else (_p(params, 0), _p(params, 2, 1))
        if not affine:
            return []
        return [NamedTensor(f"{name}.weight", bin_.raw(c, f"{name} gamma")),
                NamedTensor(f"{name}.bias", bin_.raw(c, f"{name} beta"))]  # fmt: skip
    if kind == "Embed":
        n, size = _p(params, 0), _p(params, 3)
        weight, _ = bin_.tagged(size, f"{name} weights")
        out = [NamedTensor(f"{name}.weight", weight)]
        if _p(params, 2):
            out.append(NamedTensor(f"{name}.bias", bin_.raw(n, f"{name} bias")))
        return out
    if kind == "MemoryData":
        dims = [_p(params, k) for k in (0, 1, 11, 2)]
        count = math.prod(d for d in dims if d) if any(dims) else 0
        return [NamedTensor(f"{name}.data", bin_.raw(count, f"{name} data"))] if count else []
    return []


def _conv(path: Path, bin_: _Bin, kind: str, name: str, params: Params) -> list[NamedTensor]:
    if _p(params, 19):  # dynamic_weight: the kernel is the layer's second input, nothing is in the .bin
        return []
    n, size = _p(params, 0), _p(params, 6)
    kw = _p(params, 1)
    kernel = [kw]
    if not kind.endswith("1D"):
        kernel = [_p(params, 11, kw), kw]
        if kind.endswith("3D"):
            kernel = [_p(params, 21, kw)] + kernel
    group = _p(params, 7, 1) if "DepthWise" in kind else 1
    k = math.prod(kernel)
    if n <= 0 or min(kernel) <= 0 or size <= 0 or group <= 0 or size % (n * k):  # each dim: two negatives multiply
        raise ModelFormatError(
            f"{path}: layer {name!r}: weight_data_size {size} does not fit {n} outputs of kernel {kernel}"
        )
    per = size // (n * k)  # input channels per group for a convolution (output channels per group: deconv)
    weight, quantized = bin_.tagged(size, f"{name} weights")
    weight = weight.reshape(n, per, *kernel)
    out = []
    bias = bin_.raw(n, f"{name} bias") if _p(params, 5) else None
    scale_term = _p(params, 8)
    if scale_term:
        per_channel = group if "DepthWise" in kind and scale_term in (1, 101) else n
        scales = bin_.raw(1 if scale_term in (2, 102) else per_channel, f"{name} int8 scales")
        bin_.raw(1, f"{name} input scale")
        if scale_term > 100:
            bin_.raw(1, f"{name} output scale")
        if quantized:
            rows = weight.reshape(len(scales), -1) if n % len(scales) == 0 else None
            if rows is None:
                raise ModelFormatError(f"{path}: layer {name!r}: {len(scales)} int8 scales for {n} outputs")
            weight = _descale(path, name, rows, scales).reshape(weight.shape)
    if kind.startswith("Deconvolution"):
        if group == 1:  # (out, in, *k) -> torch's ConvTranspose (in, out, *k)
            weight = np.ascontiguousarray(np.swapaxes(weight, 0, 1))
        else:  # (out, in/g, *k) grouped -> (in, out/g, *k): per group swap the two channel axes
            g_out, g_in = n // group, per
            weight = weight.reshape(group, g_out, g_in, *kernel).swapaxes(1, 2).reshape(group * g_in, g_out, *kernel)
    out.append(NamedTensor(f"{name}.weight", np.ascontiguousarray(weight, dtype=np.float32), "oihw"))
    if bias is not None:
        out.append(NamedTensor(f"{name}.bias", bias))
    return out


def _descale(path: Path, name: str, rows: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """ncnn's int8 scales multiply: q = round(w * scale), so w = q / scale (a zero scale is an empty row)."""
    if rows.shape[0] % len(scales):
        raise ModelFormatError(f"{path}: layer {name!r}: {len(scales)} int8 scales for {rows.shape[0]} rows")
    safe = np.where(scales == 0, np.float32(1), scales).astype(np.float32)
    per_row = np.repeat(safe, rows.shape[0] // len(scales))
    return (rows.reshape(rows.shape[0], -1) / per_row[:, None]).astype(np.float32).reshape(rows.shape)
