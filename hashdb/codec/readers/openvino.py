"""OpenVINO IR: the ``.xml`` graph and the ``.bin`` of constants beside it (same stem).

The xml is parsed with the standard library after refusing any ``<!DOCTYPE``/``<!ENTITY`` (so no entity is
ever expanded). Each ``Const`` layer's ``<data element_type shape offset size>`` locates its bytes in the
``.bin``. The weight input (port 1) of Convolution, GroupConvolution, ConvolutionBackpropData,
GroupConvolutionBackpropData and MatMul is followed back through the ops that compressed-weight IRs put
between a constant and its consumer, and those are evaluated on the constant: Convert (f16/int -> f32),
Subtract and Multiply by constants (zero point, scale: NNCF/POT weight decompression), FakeQuantize with
constant ranges, Reshape/Squeeze/Unsqueeze (to the output port's dims) and Transpose (constant order). Any
other op on the path means the weight is computed at run time: it is not returned.

Layout: Convolution ``(O, I, *k)`` as is; GroupConvolution ``(G, O/G, I/G, *k)`` -> ``(O, I/G, *k)``
(torch's grouped layout); ConvolutionBackpropData ``(I, O, *k)`` is torch's ConvTranspose order, as is;
GroupConvolutionBackpropData ``(G, I/G, O/G, *k)`` -> ``(I, O/G, *k)``; MatMul weights to ``(out, in)``
by ``transpose_b``. Element types read: f32, f16, bf16, f64, i8, u8, i4, u4 (packed, low nibble first),
i16, u16, i32 (integers only through the decompression ops above).
"""

from __future__ import annotations

import math
import mmap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelFormatError
from . import NamedTensor, bf16_to_float32, check_size, close_map, drop_mapped_pages

MAX_XML_BYTES = 256 << 20
_TYPES = {"f32": "<f4", "f16": "<f2", "f64": "<f8", "bf16": "<u2", "i8": "i1", "u8": "u1", "i16": "<i2",
          "u16": "<u2", "i32": "<i4", "i4": "i4", "u4": "u4"}  # fmt: skip
_WEIGHT_OPS = {"Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "MatMul"}
_PASS_OPS = {"Convert", "Subtract", "Multiply", "FakeQuantize", "Reshape", "Squeeze", "Unsqueeze", "Transpose"}
MAX_DEPTH = 16


class _Graph:
    def __init__(self, path: Path, root: ET.Element, bin_buf: Any, bin_path: Path) -> None:
        self.path, self.bin, self.bin_path = path, bin_buf, bin_path
        self.layers: dict[str, ET.Element] = {}
        self.inputs: dict[str, list[str]] = {}  # layer id -> input port ids in document order
        for layer in root.iter("layer"):
            lid = layer.get("id", "")
            self.layers[lid] = layer
            port_block = layer.find("input")
            self.inputs[lid] = [p.get("id", "") for p in port_block.findall("port")] if port_block is not None else []
        self.cache: dict[str, np.ndarray | None] = {}  # values of one weight's chain (cleared after each weight)
        self.feeds: dict[tuple[str, str], str] = {}  # (to layer, to port) -> from layer
        for edge in root.iter("edge"):
            self.feeds[(edge.get("to-layer", ""), edge.get("to-port", ""))] = edge.get("from-layer", "")

    def source(self, lid: str, index: int) -> str | None:
        ports = self.inputs.get(lid, [])
        if index >= len(ports):
            return None
        return self.feeds.get((lid, ports[index]))

    def value(self, lid: str | None, depth: int = 0) -> np.ndarray | None:
        """The constant value out of layer ``lid`` as float32 (or the stored integers), None when not constant."""
        if lid is None or lid not in self.layers or depth > MAX_DEPTH:
            return None  # past MAX_DEPTH ops a value is not a stored weight's
        if lid not in self.cache:  # each layer evaluated once per weight, so a diamond-shaped chain stays linear
            self.cache[lid] = None  # a cycle reads as "not constant"
            self.cache[lid] = self._evaluate(lid, depth)
        return self.cache[lid]

    def weight(self, lid: str | None) -> np.ndarray | None:
        """The constant value feeding a weight input; the chain's intermediate arrays are freed after it."""
        try:
            return self.value(lid)
        finally:
            self.cache.clear()

    def _evaluate(self, lid: str, depth: int) -> np.ndarray | None:
        layer = self.layers[lid]
        kind = layer.get("type", "")
        if kind == "Const":
            return self._const(layer)
        if kind not in _PASS_OPS:
            return None
        x = self.value(self.source(lid, 0), depth + 1)
        if x is None:
            return None
        if kind == "Convert":
            return x.astype(np.float32)
        if kind in ("Subtract", "Multiply"):
            y = self.value(self.source(lid, 1), depth + 1)
            if y is None:
                return None
            x, y = x.astype(np.float32), y.astype(np.float32)
            with np.errstate(all="ignore"):  # a corrupt scale may overflow: the values are only hashed
                return np.subtract(x, y) if kind == "Subtract" else np.multiply(x, y)
        if kind == "FakeQuantize":
            ranges = [self.value(self.source(lid, i), depth + 1) for i in range(1, 5)]
            if any(r is None for r in ranges):
                return None
            return _fake_quantize(x.astype(np.float32), [np.asarray(r, np.float32) for r in ranges],
                                  int(_attr(self.path, layer, "levels", "256")))  # fmt: skip
        if kind == "Transpose":
            order = self.value(self.source(lid, 1), depth + 1)
            if order is None:
                return None
            return np.transpose(x, [int(a) for a in order.reshape(-1)])
        dims = _output_dims(layer)  # Reshape/Squeeze/Unsqueeze: the output port states the result's dims
        if dims is None:
            return None
        return x.reshape(dims)

    def _const(self, layer: ET.Element) -> np.ndarray:
        name = layer.get("name", layer.get("id", "?"))
        element = _attr(self.path, layer, "element_type")
        if element not in _TYPES:
            raise ModelFormatError(f"{self.path}: constant {name!r} of element type {element!r} is not supported")
        shape_text = _attr(self.path, layer, "shape")
        try:
            shape = [int(d) for d in shape_text.split(",") if d.strip()]
            offset, size = int(_attr(self.path, layer, "offset")), int(_attr(self.path, layer, "size"))
        except ValueError:
            raise ModelFormatError(f"{self.path}: constant {name!r} has a bad shape/offset/size") from None
        if any(d < 0 for d in shape) or offset < 0:
            raise ModelFormatError(f"{self.path}: constant {name!r} has a negative shape or offset")
        count = math.prod(shape)
        nbytes = (count + 1) // 2 if element in ("i4", "u4") else count * np.dtype(_TYPES[element]).itemsize
        if size != nbytes or offset + size > len(self.bin):
            raise ModelFormatError(
                f"{self.path}: constant {name!r} ({element} {shape}) claims bytes {offset}+{size} of "
                f"{self.bin_path.name} ({len(self.bin)} bytes): does not fit"
            )
        raw = np.frombuffer(self.bin, "u1", count=nbytes, offset=offset)
        if element in ("i4", "u4"):
            nibbles = np.empty(2 * nbytes, np.uint8)
            nibbles[0::2], nibbles[1::2] = raw & 15, raw >> 4
            values = nibbles[:count].astype(np.int8)
            if element == "i4":
                values = np.where(values > 7, values - 16, values).astype(np.int8)
            return values.reshape(shape)
        arr = raw.view(_TYPES[element]).reshape(shape)
        if element == "bf16":
            return bf16_to_float32(arr)
        return arr.astype(np.float32) if arr.dtype.kind == "f" else arr.copy()


def _attr(path: Path, layer: ET.Element, key: str, default: str | None = None) -> str:
    data = layer.find("data")
    value = data.get(key) if data is not None else None
    if value is None:
        if default is None:
            name = layer.get("name", layer.get("id", "?"))
            raise ModelFormatError(f"{path}: layer {name!r} ({layer.get('type')}) has no {key} attribute")
        return default
    return value


def _output_dims(layer: ET.Element) -> list[int] | None:
    out = layer.find("output")
    port = out.find("port") if out is not None else None
    if port is None:
        return None
    try:
        return [int((d.text or "").strip()) for d in port.findall("dim")]
    except ValueError:
        return None


def _fake_quantize(x: np.ndarray, ranges: list[np.ndarray], levels: int) -> np.ndarray:
    in_low, in_high, out_low, out_high = ranges
    if levels < 2:
        raise ValueError(f"FakeQuantize with {levels} levels")
    width = np.where(in_high == in_low, np.float32(1), in_high - in_low)
    with np.errstate(all="ignore"):
        q = np.round((x - in_low) / width * (levels - 1)) / (levels - 1) * (out_high - out_low) + out_low
    return np.where(x <= np.minimum(in_low, in_high), out_low, np.where(x > in_high, out_high, q)).astype(np.float32)


def _safe_xml(path: Path) -> ET.Element:
    size = path.stat().st_size
    if size > MAX_XML_BYTES:
        raise ModelFormatError(f"{path}: OpenVINO xml over {MAX_XML_BYTES:,} bytes")
    text = path.read_bytes()
    if b"<!DOCTYPE" in text.upper() or b"<!ENTITY" in text.upper():
        raise ModelFormatError(f"{path}: xml with a DOCTYPE/ENTITY declaration refused (entities are never expanded)")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ModelFormatError(f"{path}: not well-formed xml ({exc})") from None
    if root.tag != "net":
        raise ModelFormatError(f"{path}: not an OpenVINO IR (root element <{root.tag[:40]}>, want <net>)")
    version = root.get("version", "")
    if version.isdigit() and int(version) < 10:  # IR v7 and older keep <blobs> inside each layer
        raise ModelFormatError(f"{path}: OpenVINO IR version {version} is not read (versions 10 and 11 are)")
    return root


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    if path.suffix.lower() == ".bin":
        path = path.with_suffix(".xml")
    root = _safe_xml(path)
    bin_path = path.with_suffix(".bin")
    if not bin_path.is_file():
        raise ModelFormatError(f"{path}: its weights file {bin_path.name} is missing beside it")
    with open(bin_path, "rb") as f:
        size = f.seek(0, 2)
        check_size(bin_path, size, max_bytes)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    try:
        graph = _Graph(path, root, mm if mm is not None else b"", bin_path)
        check_size(path, _declared_bytes(graph), max_bytes)  # int8/int4 constants widen 4-8x to float32
        return _weights(path, graph)
    except (ValueError, TypeError, IndexError) as exc:  # shapes that do not broadcast or reshape: a bad IR
        raise ModelFormatError(f"{path}: inconsistent OpenVINO IR ({type(exc).__name__}: {str(exc)[:100]})") from None
    finally:
        close_map(mm)


def _declared_bytes(graph: _Graph) -> int:
    """The float32 bytes the graph's constants would take (what reading every weight could allocate)."""
    total = 0
    for layer in graph.layers.values():
        data = layer.find("data")
        if layer.get("type") == "Const" and data is not None:
            try:
                total += 4 * math.prod(max(int(d), 0) for d in data.get("shape", "").split(",") if d.strip())
            except ValueError:
                continue  # reported by name if the constant is ever read
    return total


def _weights(path: Path, graph: _Graph) -> list[NamedTensor]:
    out: list[NamedTensor] = []
    for lid, layer in graph.layers.items():
        kind = layer.get("type", "")
        if kind not in _WEIGHT_OPS:
            continue
        src = graph.source(lid, 1)
        w = graph.weight(src)
        drop_mapped_pages(graph.bin)  # the weight's values are copied out
        if w is None or w.size == 0:
            continue
        w = np.asarray(w, dtype=np.float32)
        name = graph.layers[src].get("name", src) if src is not None else lid
        if kind == "MatMul":
            if w.ndim != 2:
                continue
            transpose_b = _attr(path, layer, "transpose_b", "false").lower() == "true"
            out.append(NamedTensor(name, np.ascontiguousarray(w if transpose_b else w.T)))
            continue
        if kind.startswith("Group"):
            if w.ndim < 4:
                raise ModelFormatError(f"{path}: {kind} {layer.get('name')!r} has weights of shape {list(w.shape)}")
            # (G, O/G, I/G, *k) -> (O, I/G, *k); backprop-data (G, I/G, O/G, *k) -> (I, O/G, *k): torch's order
            w = w.reshape(w.shape[0] * w.shape[1], *w.shape[2:])
        if w.ndim >= 3:
            out.append(NamedTensor(name, np.ascontiguousarray(w), "oihw"))
    return out
