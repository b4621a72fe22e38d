"""Test writers for the CNN formats of GitHub and mobile apps, each built from the format's specification:
Caffe NetParameter protobufs, Darknet .cfg + .weights, ncnn .param + .bin, OpenVINO IR .xml + .bin and MXNet
.params (+ -symbol.json). Each takes a list of layers of numpy arrays in torch's layout."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from formats_writers import varint  # the one protobuf varint writer of the tests

# A layer: (kind, weight in torch layout, bias or None); kind "conv" (O, I/g, kh, kw) or "linear" (out, in).
Layer = tuple[str, np.ndarray, np.ndarray | None]


def torch_layers(state_dict: dict[str, np.ndarray]) -> list[Layer]:
    """The conv / linear layers of a state_dict, in order: ``X.weight`` with ``X.bias`` when present."""
    out: list[Layer] = []
    for name, value in state_dict.items():
        if name.endswith(".weight") and value.ndim in (2, 4):
            kind = "conv" if value.ndim == 4 else "linear"
            out.append((kind, value, state_dict.get(name[: -len("weight")] + "bias")))
    return out


# ---- protobuf (Caffe) ----


def pb_len(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def pb_int(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value)


def caffe_blob(arr: np.ndarray, legacy: bool = False, double: bool = False) -> bytes:
    if legacy:  # num, channels, height, width: a 2-D InnerProduct weight is (1, 1, out, in)
        dims = [1] * (4 - arr.ndim) + list(arr.shape)
        head = b"".join(pb_int(f, d) for f, d in zip((1, 2, 3, 4), dims, strict=True))
    else:
        head = pb_len(7, pb_len(1, b"".join(varint(d) for d in arr.shape)))
    if double:
        return head + pb_len(8, np.ascontiguousarray(arr, "<f8").tobytes())
    return head + pb_len(5, np.ascontiguousarray(arr, "<f4").tobytes())


def caffe_model(
    layers: list[Layer], v1: bool = False, double: bool = False, norms: dict[int, list[np.ndarray]] | None = None
) -> bytes:
    """A NetParameter: a ``layer`` (or V1 ``layers``) per conv/linear with its weight and bias blobs, plus a
    data layer without blobs and a BatchNorm-like layer with three flat blobs. ``norms``: conv index -> (mean, var,
    moving-average factor, gamma, beta), written as Caffe does, a BatchNorm (mean and var times the factor) and a
    Scale layer (gamma, beta) after it."""
    out = pb_len(1, b"net")
    data_layer = pb_len(1, b"data") + pb_len(2, b"Input")
    out += pb_len(100, data_layer) if not v1 else pb_len(2, pb_len(4, b"data") + pb_int(5, 5))
    for i, (kind, w, b) in enumerate(layers):
        blobs = [w] + ([b] if b is not None else [])
        if v1:
            body = pb_len(4, f"l{i}".encode()) + pb_int(5, 4 if kind == "conv" else 14)
            body += b"".join(pb_len(6, caffe_blob(x, legacy=True, double=double)) for x in blobs)
            out += pb_len(2, body)
        else:
            body = pb_len(1, f"l{i}".encode()) + pb_len(2, b"Convolution" if kind == "conv" else b"InnerProduct")
            body += b"".join(pb_len(7, caffe_blob(x, double=double)) for x in blobs)
            out += pb_len(100, body)
        if kind == "conv" and not v1:
            n = w.shape[0]
            stats = [np.linspace(-1, 1, n, dtype=np.float32), np.ones(n, np.float32), np.ones(1, np.float32)]
            scale = None
            if norms is not None and i in norms:
                mean, var, factor, gamma, beta = norms[i]
                stats, scale = [mean * factor[0], var * factor[0], factor], [gamma, beta]
            body = pb_len(1, f"bn{i}".encode()) + pb_len(2, b"BatchNorm")
            out += pb_len(100, body + b"".join(pb_len(7, caffe_blob(x)) for x in stats))
            if scale is not None:
                body = pb_len(1, f"scale{i}".encode()) + pb_len(2, b"Scale")
                out += pb_len(100, body + b"".join(pb_len(7, caffe_blob(x)) for x in scale))
    return out


# ---- Darknet ----


def darknet_files(folder: Path, layers: list[Layer], stem: str = "yolo", bn: bool = True,
                  height: int = 16, major_minor: tuple[int, int] = (0, 2)) -> Path:  # fmt: skip
    """``stem.cfg`` + ``stem.weights`` for a chain of convolutions (then [connected] layers); the second conv
    has batch_normalize=1, with a [maxpool], a [route] back to it and a [shortcut] in between."""
    channels = layers[0][1].shape[1]
    cfg = [f"[net]\nchannels={channels}\nheight={height}\nwidth={height}\n"]
    floats: list[np.ndarray] = []
    first_linear = True
    for i, (kind, w, b) in enumerate(layers):
        n = w.shape[0]
        bias = b if b is not None else np.zeros(n, np.float32)
        if kind == "conv":
            use_bn = bn and i == 1
            cfg.append(f"[convolutional]\n{'batch_normalize=1' if use_bn else ''}\nfilters={n}\nsize={w.shape[2]}\n"
                       f"stride=1\npad=0\nactivation=leaky\n# a comment\n")  # fmt: skip
            floats.append(bias)
            if use_bn:
                floats += [np.full(n, 1.5, np.float32), np.linspace(-1, 1, n, dtype=np.float32), np.ones(n, np.float32)]
            floats.append(w)
            if i == 1:  # layers that carry no weights but move the channel chain
                cfg.append("[maxpool]\nsize=1\nstride=1\n[route]\nlayers=-2\n[shortcut]\nfrom=-3\nactivation=linear\n")
        else:
            if first_linear:
                cfg.append("[avgpool]\n")
                first_linear = False
            cfg.append(f"[connected]\noutput={n}\nactivation=linear\n")
            floats += [bias, w]
    (folder / f"{stem}.cfg").write_text("\n".join(cfg))
    major, minor = major_minor
    wide_seen = major * 10 + minor >= 2 and major < 1000 and minor < 1000  # darknet's own test
    seen = struct.pack("<Q", 12345) if wide_seen else struct.pack("<I", 12345)
    body = b"".join(np.ascontiguousarray(x, "<f4").tobytes() for x in floats)
    path = folder / f"{stem}.weights"
    path.write_bytes(struct.pack("<iii", major, minor, 0) + seen + body)
    return path


# ---- ncnn ----

NCNN_FP16, NCNN_INT8 = 0x01306B47, 0x000D4B38


def _ncnn_tagged(arr: np.ndarray, storage: str) -> bytes:
    flat = np.ascontiguousarray(arr).reshape(-1)
    if storage == "fp16":
        data = flat.astype("<f2").tobytes()
        return struct.pack("<I", NCNN_FP16) + data + b"\0" * (-len(data) % 4)
    if storage == "int8":
        data = flat.astype("i1").tobytes()
        return struct.pack("<I", NCNN_INT8) + data + b"\0" * (-len(data) % 4)
    if storage == "table":  # a 256-value codebook and one uint8 index per value
        table = np.linspace(flat.min(), flat.max(), 256, dtype=np.float32)
        index = np.abs(flat[:, None] - table[None, :]).argmin(axis=1).astype(np.uint8).tobytes()
        return struct.pack("<I", 0x01010101) + table.tobytes() + index + b"\0" * (-len(index) % 4)
    return struct.pack("<I", 0) + flat.astype("<f4").tobytes()


def ncnn_files(folder: Path, layers: list[Layer], stem: str = "model", storage: str = "fp32",
               depthwise: np.ndarray | None = None) -> tuple[Path, Path]:  # fmt: skip
    """``stem.param`` + ``stem.bin``: Input, then a Convolution (+ a BatchNorm after the first) or InnerProduct
    per layer, an optional ConvolutionDepthWise; ``storage`` fp32/fp16/table, or int8 (the int8 kernels are
    ``round(w * scale)`` with per-output scales, written with their scales)."""
    lines: list[str] = []
    blob = "data"
    body = bytearray()
    lines.append(
        f"Input data 0 1 {blob} 0={layers[0][1].shape[-1]} 1={layers[0][1].shape[-1]} 2={layers[0][1].shape[1]}"
    )
    for i, (kind, w, b) in enumerate(layers):
        n = w.shape[0]
        out = f"b{i}"
        if kind == "conv":
            params = f"0={n} 1={w.shape[3]} 11={w.shape[2]} 5={int(b is not None)} 6={w.size}"
            typ = "Convolution"
        else:
            params = f"0={n} 1={int(b is not None)} 2={w.size}"
            typ = "InnerProduct"
        if storage == "int8":
            scales = (127 / np.maximum(np.abs(w.reshape(n, -1)).max(axis=1), 1e-8)).astype(np.float32)
            q = np.round(w.reshape(n, -1) * scales[:, None]).astype(np.int8)
            body += _ncnn_tagged(q, "int8")
            params += " 8=1"
        else:
            body += _ncnn_tagged(w, storage)
        if b is not None:
            body += np.ascontiguousarray(b, "<f4").tobytes()
        if storage == "int8":
            body += scales.tobytes() + np.float32(1.0).tobytes()
        lines.append(f"{typ} l{i} 1 1 {blob} {out} {params}")
        blob = out
        if i == 0 and kind == "conv":
            lines.append(f"BatchNorm bn{i} 1 1 {blob} {blob}_bn 0={n}")
            body += np.ones(4 * n, "<f4").tobytes()
            blob = f"{blob}_bn"
            lines.append(f"ReLU relu{i} 1 1 {blob} {blob}_r")
            blob = f"{blob}_r"
    if depthwise is not None:
        c = depthwise.shape[0]
        lines.append(f"ConvolutionDepthWise dw 1 1 {blob} dw_out 0={c} 1={depthwise.shape[3]} 5=0 "
                     f"6={depthwise.size} 7={c} -23310=2,1.0,0.5")  # fmt: skip
        body += _ncnn_tagged(depthwise, storage if storage != "int8" else "fp32")
        blob = "dw_out"
    param = folder / f"{stem}.param"
    param.write_text(f"7767517\n{len(lines)} {len(lines) + 1}\n" + "\n".join(lines) + "\n")
    (folder / f"{stem}.bin").write_bytes(bytes(body))
    return param, folder / f"{stem}.bin"


# ---- OpenVINO IR ----


def openvino_files(folder: Path, layers: list[Layer], stem: str = "model", storage: str = "f32",
                   group_conv: np.ndarray | None = None, extra: str = "") -> tuple[Path, Path]:  # fmt: skip
    """``stem.xml`` + ``stem.bin`` (IR v11). ``storage``: f32 constants; f16 constants behind Convert; u8
    behind Convert -> Subtract(zero point) -> Multiply(per-output scale), as NNCF compresses weights; fq:
    f32 behind a FakeQuantize over the weights' range.
    ``group_conv`` (G, O/G, I/G, kh, kw) adds a GroupConvolution; ``extra`` is pasted before <layers>."""
    xml_layers: list[str] = []
    edges: list[tuple[int, int, int, int]] = []
    binary = bytearray()
    next_id = [0]

    def dims(shape: tuple[int, ...]) -> str:
        return "".join(f"<dim>{d}</dim>" for d in shape)

    def add(kind: str, name: str, data: str, in_shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]) -> int:
        lid = next_id[0]
        next_id[0] += 1
        ins = "".join(f'<port id="{p}">{dims(s)}</port>' for p, s in enumerate(in_shapes))
        xml_layers.append(
            f'<layer id="{lid}" name="{name}" type="{kind}" version="opset1"><data {data}/>'
            + (f"<input>{ins}</input>" if in_shapes else "")
            + f'<output><port id="{len(in_shapes)}" precision="FP32">{dims(out_shape)}</port></output></layer>'
        )
        return lid

    def const(name: str, arr: np.ndarray, element: str) -> int:
        raw = np.ascontiguousarray(arr).tobytes()
        offset = len(binary)
        binary.extend(raw)
        shape = ",".join(str(d) for d in arr.shape)
        return add("Const", name, f'element_type="{element}" shape="{shape}" offset="{offset}" size="{len(raw)}"',
                   [], arr.shape)  # fmt: skip

    def weight(name: str, w: np.ndarray) -> int:
        if storage == "f16":
            c = const(name, w.astype("<f2"), "f16")
            lid = add("Convert", f"{name}/convert", 'destination_type="f32"', [w.shape], w.shape)
            edges.append((c, 0, lid, 0))
            return lid
        if storage == "u8":
            n = w.shape[0]
            rows = w.reshape(n, -1)
            lo, hi = rows.min(axis=1), rows.max(axis=1)
            scale = ((hi - lo) / 255).astype(np.float32)
            scale[scale == 0] = 1
            zero = np.round(-lo / scale).astype(np.float32)
            q = np.clip(np.round(rows / scale[:, None] + zero[:, None]), 0, 255).astype(np.uint8).reshape(w.shape)
            bshape = (n,) + (1,) * (w.ndim - 1)
            c = const(name, q, "u8")
            cv = add("Convert", f"{name}/convert", 'destination_type="f32"', [w.shape], w.shape)
            z = const(f"{name}/zero_point", zero.reshape(bshape), "f32")
            sub = add("Subtract", f"{name}/sub", 'auto_broadcast="numpy"', [w.shape, bshape], w.shape)
            s = const(f"{name}/scale", scale.reshape(bshape), "f32")
            mul = add("Multiply", f"{name}/mul", 'auto_broadcast="numpy"', [w.shape, bshape], w.shape)
            edges.extend([(c, 0, cv, 0), (cv, 1, sub, 0), (z, 0, sub, 1), (sub, 2, mul, 0), (s, 0, mul, 1)])
            return mul
        if storage == "fq":  # float weights behind a FakeQuantize with constant scalar ranges (POT, NNCF)
            c = const(name, w.astype("<f4"), "f32")
            lo, hi = float(w.min()), float(w.max())
            ranges = [const(f"{name}/{k}", np.full((1,) * w.ndim, v, "<f4"), "f32")
                      for k, v in (("il", lo), ("ih", hi), ("ol", lo), ("oh", hi))]  # fmt: skip
            one = (1,) * w.ndim
            fq = add("FakeQuantize", f"{name}/fq", 'levels="255" auto_broadcast="numpy"', [w.shape] + [one] * 4,
                     w.shape)  # fmt: skip
            edges.extend([(c, 0, fq, 0)] + [(r, 0, fq, k + 1) for k, r in enumerate(ranges)])
            return fq
        return const(name, w.astype("<f4"), "f32")

    def out_port(lid: int) -> int:
        return 0 if 'type="Const"' in xml_layers[lid] else xml_layers[lid].count("<port id=") - 1

    x_shape = (1, layers[0][1].shape[1], 16, 16)
    prev = add("Parameter", "x", f'shape="{",".join(map(str, x_shape))}" element_type="f32"', [], x_shape)
    for i, (kind, w, _) in enumerate(layers):
        wid = weight(f"l{i}.weight", w)
        if kind == "conv":
            op = add("Convolution", f"l{i}", 'strides="1,1" dilations="1,1" pads_begin="0,0" pads_end="0,0" '
                     'auto_pad="explicit"', [x_shape, w.shape], x_shape)  # fmt: skip
        else:
            op = add("MatMul", f"l{i}", 'transpose_a="false" transpose_b="true"', [x_shape, w.shape], x_shape)
        edges.extend([(prev, out_port(prev), op, 0), (wid, out_port(wid), op, 1)])
        prev = op
    if group_conv is not None:
        wid = weight("group.weight", group_conv)
        op = add("GroupConvolution", "group", 'strides="1,1" dilations="1,1" pads_begin="0,0" pads_end="0,0"',
                 [x_shape, group_conv.shape], x_shape)  # fmt: skip
        edges.extend([(prev, out_port(prev), op, 0), (wid, out_port(wid), op, 1)])
        prev = op
    res = add("Result", "out", "", [x_shape], x_shape)
    edges.append((prev, out_port(prev), res, 0))
    edge_xml = "".join(f'<edge from-layer="{a}" from-port="{b}" to-layer="{c}" to-port="{d}"/>' for a, b, c, d in edges)
    text = (f'<?xml version="1.0"?>\n{extra}<net name="m" version="11"><layers>{"".join(xml_layers)}</layers>'
            f"<edges>{edge_xml}</edges><rt_info/></net>\n")  # fmt: skip
    xml = folder / f"{stem}.xml"
    xml.write_text(text)
    (folder / f"{stem}.bin").write_bytes(bytes(binary))
    return xml, folder / f"{stem}.bin"


# ---- MXNet ----


def mxnet_params(named: dict[str, np.ndarray], version: int = 2) -> bytes:
    """``mx.nd.save`` bytes of named arrays (float32/float16/float64/int32), as NDArray v2 (or v1/legacy 0)."""
    flags = {np.dtype("<f4"): 0, np.dtype("<f8"): 1, np.dtype("<f2"): 2, np.dtype("<i4"): 4}
    out = bytearray(struct.pack("<QQQ", 0x112, 0, len(named)))
    for arr in named.values():
        if version == 2:
            out += struct.pack("<Ii", 0xF993FAC9, 0) + struct.pack(f"<i{arr.ndim}q", arr.ndim, *arr.shape)
        elif version == 1:
            out += struct.pack("<I", 0xF993FAC8) + struct.pack(f"<i{arr.ndim}q", arr.ndim, *arr.shape)
        else:
            out += struct.pack(f"<I{arr.ndim}I", arr.ndim, *arr.shape)
        out += struct.pack("<iii", 1, 0, flags[arr.dtype]) + np.ascontiguousarray(arr).tobytes()
    out += struct.pack("<Q", len(named))
    for name in named:
        raw = name.encode()
        out += struct.pack("<Q", len(raw)) + raw
    return bytes(out)


def mxnet_files(folder: Path, layers: list[Layer], prefix: str = "net", version: int = 2,
                channels_last: bool = False) -> Path:  # fmt: skip
    """``prefix-symbol.json`` + ``prefix-0000.params`` (Gluon export naming: arg:convN_weight, aux: BN stats)."""
    named: dict[str, np.ndarray] = {}
    nodes = [{"op": "null", "name": "data", "inputs": []}]
    for i, (kind, w, b) in enumerate(layers):
        name = f"conv{i}" if kind == "conv" else f"dense{i}"
        stored = np.moveaxis(w, 1, -1) if channels_last and kind == "conv" else w
        named[f"arg:{name}_weight"] = np.ascontiguousarray(stored, "<f4")
        if b is not None:
            named[f"arg:{name}_bias"] = np.ascontiguousarray(b, "<f4")
        attrs = {"kernel": str(tuple(w.shape[2:])), "num_filter": str(w.shape[0])}
        if channels_last:
            attrs["layout"] = "NHWC"
        nodes.append({"op": "Convolution" if kind == "conv" else "FullyConnected", "name": name, "attrs": attrs,
                      "inputs": [[len(nodes) - 1, 0, 0]]})  # fmt: skip
    named["aux:bn0_moving_mean"] = np.zeros(layers[0][1].shape[0], "<f4")
    named["aux:step"] = np.array([3], "<i4")
    (folder / f"{prefix}-symbol.json").write_text(json.dumps({"nodes": nodes, "heads": [[len(nodes) - 1, 0, 0]]}))
    path = folder / f"{prefix}-0000.params"
    path.write_bytes(mxnet_params(named, version))
    return path


# ---- MNN ----


def mnn_quantized_blob(w: np.ndarray, bits: int = 8) -> tuple[bytes, np.ndarray]:
    """MNN's weight-quantization blob of ``w`` (out, ...) and its alpha: per output channel (min, scale),
    codes ``q`` in [-2^(bits-1), 2^(bits-1)) with w ~ (q - aMin) * scale + min; the blob holds the dims (one
    byte count, uint16 each), a codebook of every code (a count byte, 0 for 256), then each weight's index
    into the codebook in ``bits`` bits, most significant first."""
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    lo, hi = rows.min(axis=1), rows.max(axis=1)
    steps = (1 << bits) - 1
    scale = np.where(hi > lo, (hi - lo) / steps, 1.0)
    index = np.clip(np.round((rows - lo[:, None]) / scale[:, None]), 0, steps).astype(np.int64)  # = q - aMin
    codebook = np.arange(-(1 << (bits - 1)), 1 << (bits - 1), dtype=np.int8)
    dims = [rows.shape[0], rows.shape[1]]
    head = bytes([len(dims)]) + struct.pack(f"<{len(dims)}H", *dims) + bytes([len(codebook) & 0xFF])
    bitstream = ((index.reshape(-1, 1) >> np.arange(bits - 1, -1, -1)) & 1).astype(np.uint8).reshape(-1)
    alpha = np.stack([lo, scale], axis=1).astype(np.float32).reshape(-1)
    return head + codebook.tobytes() + np.packbits(bitstream).tobytes(), alpha


def mnn_model(layers: list[Layer], storage: str = "f32", split_groups: int = 0) -> bytes:
    """An MNN Net flatbuffer: an Input op, then a Convolution op (type 12, Convolution2D parameters) per conv
    layer and a 1x1 ``__matmul_converted`` Convolution per linear layer, as MNN's converter writes them.
    ``storage``: f32 weight vectors, fp16 (IDSTQuan type 3) or q8/q4 (IDSTQuan type 1, asymmetric).
    ``split_groups`` > 1 writes the first conv as that many ``__group__`` ops, each with its slice of outputs."""
    import flatbuffers

    b = flatbuffers.Builder(1024)

    def floats(values: np.ndarray) -> int:
        data = np.ascontiguousarray(values, "<f4").reshape(-1)
        b.StartVector(4, len(data), 4)
        for v in data[::-1]:
            b.PrependFloat32(float(v))
        return b.EndVector()

    def bytes_vector(data: bytes) -> int:
        b.StartVector(1, len(data), 1)
        for v in data[::-1]:
            b.PrependByte(v)
        return b.EndVector()

    def conv_op(name: str, w: np.ndarray, bias: np.ndarray | None, op_type: int = 12) -> int:
        n = w.shape[0]
        k = w.shape[2:] if w.ndim == 4 else (1, 1)
        weight = bias_vec = quant = 0
        if storage == "f32":
            weight = floats(w)
        elif storage == "fp16":
            buf = bytes_vector(np.ascontiguousarray(w, "<f2").tobytes())
            b.StartObject(14)
            b.PrependUOffsetTRelativeSlot(0, buf, 0)
            b.PrependInt32Slot(2, 3, 0)
            quant = b.EndObject()
        else:
            bits = int(storage[1:])
            blob, alpha = mnn_quantized_blob(w, bits)
            buf, alpha_vec = bytes_vector(blob), floats(alpha)
            b.StartObject(14)
            b.PrependUOffsetTRelativeSlot(0, buf, 0)
            b.PrependUOffsetTRelativeSlot(1, alpha_vec, 0)
            b.PrependInt32Slot(2, 1, 0)
            b.PrependInt32Slot(7, bits, 0)
            b.PrependInt32Slot(8, -(1 << (bits - 1)), 0)
            quant = b.EndObject()
        if bias is not None:
            bias_vec = floats(bias)
        b.StartObject(17)  # Convolution2DCommon
        b.PrependInt32Slot(2, int(k[1]), 1)
        b.PrependInt32Slot(3, int(k[0]), 1)
        b.PrependInt32Slot(10, n, 0)
        b.PrependInt32Slot(11, int(w.shape[1]), 0)
        common = b.EndObject()
        b.StartObject(7)  # Convolution2D
        b.PrependUOffsetTRelativeSlot(0, common, 0)
        if weight:
            b.PrependUOffsetTRelativeSlot(1, weight, 0)
        if bias_vec:
            b.PrependUOffsetTRelativeSlot(2, bias_vec, 0)
        if quant:
            b.PrependUOffsetTRelativeSlot(3, quant, 0)
        param = b.EndObject()
        op_name = b.CreateString(name)
        b.StartObject(7)  # Op
        b.PrependUint8Slot(1, 9, 0)  # main_type: OpParameter.Convolution2D
        b.PrependUOffsetTRelativeSlot(2, param, 0)
        b.PrependUOffsetTRelativeSlot(3, op_name, 0)
        b.PrependInt32Slot(5, op_type, 0)
        return b.EndObject()

    ops = []
    input_name = b.CreateString("x")
    b.StartObject(7)
    b.PrependUOffsetTRelativeSlot(3, input_name, 0)
    b.PrependInt32Slot(5, 34, 0)  # OpType.Input, no parameters
    ops.append(b.EndObject())
    for i, (kind, w, bias) in enumerate(layers):
        if kind == "conv" and i == 0 and split_groups > 1:
            step = w.shape[0] // split_groups
            for g in range(split_groups):
                part_bias = bias[g * step : (g + 1) * step] if bias is not None else None
                ops.append(conv_op(f"l{i}__group__{g}", w[g * step : (g + 1) * step], part_bias))
        elif kind == "conv":
            ops.append(conv_op(f"l{i}", w, bias))
        else:
            ops.append(conv_op(f"l{i}__matmul_converted", w.reshape(*w.shape, 1, 1), bias))
    b.StartVector(4, len(ops), 4)
    for op in reversed(ops):
        b.PrependUOffsetTRelative(op)
    oplist = b.EndVector()
    biz = b.CreateString("hashdb-test")
    b.StartObject(12)  # Net
    b.PrependUOffsetTRelativeSlot(0, biz, 0)
    b.PrependUOffsetTRelativeSlot(3, oplist, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())
