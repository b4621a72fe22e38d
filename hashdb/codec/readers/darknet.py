"""Darknet ``.weights`` (YOLO) with the ``.cfg`` beside it that says how the flat float buffer splits.

The ``.weights`` file: int32 major, minor, revision, then the images seen (uint64 when major*10+minor >= 2,
else uint32), then float32 values layer by layer in ``.cfg`` order (darknet's ``load_weights``):
[convolutional] biases (filters), when ``batch_normalize=1`` BN scales, rolling means and rolling variances
(filters each), then the kernel (filters x channels/groups x size x size: OIHW); [connected] biases
(output), the matrix (output x inputs; inputs x output when the header's major or minor is over 1000,
darknet's "transposed" flag), then BN scales/means/variances when ``batch_normalize=1``;
[batchnorm] scales/means/variances (channels each). Layers with weights that are not read here
([deconvolutional], [local], recurrent layers, weighted [shortcut]) are refused by name.

The input channels of each layer come from the chain the ``.cfg`` describes: [net] channels/height/width,
then [route] (concatenated layers, ``groups``), [shortcut], [maxpool], [avgpool], [upsample], [reorg]...
The cfg is found beside the weights: the same stem with ``.cfg``, else the folder's only ``.cfg``. Every
layer's size is computed before anything is read, and the whole plan is checked against the file size.
A file that ends on a layer boundary before the cfg's end (a backbone such as ``darknet53.conv.74``)
yields the layers it holds.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ...errors import ModelFormatError
from . import NamedTensor, check_size

MAX_CFG_BYTES = 4 << 20
_WEIGHTED_UNREAD = {"deconvolutional", "deconv", "local", "rnn", "lstm", "gru", "crnn", "conv_lstm", "convlstm"}
_PASS_THROUGH = {
    "yolo", "region", "detection", "gaussian_yolo", "softmax", "dropout", "cost", "activation", "contrastive",
    "scale_channels", "sam", "empty", "silence", "normalization", "logistic", "l2norm", "crop",
}  # fmt: skip


def cfg_path(weights: Path) -> Path:
    """The ``.cfg`` of a ``.weights`` file: its stem + ``.cfg``, else the folder's only ``.cfg``."""
    same = weights.with_suffix(".cfg")
    if same.is_file():
        return same
    try:
        cfgs = sorted(p for p in weights.parent.iterdir() if p.suffix.lower() == ".cfg" and p.is_file())
    except OSError:
        cfgs = []
    if len(cfgs) == 1:
        return cfgs[0]
    found = f"{len(cfgs)} .cfg files beside it" if cfgs else "none beside it"
    raise ModelFormatError(f"{weights}: a Darknet .weights file needs its .cfg ({same.name}; {found})")


def parse_cfg(path: Path) -> list[tuple[str, dict[str, str]]]:
    """The sections of a darknet ``.cfg`` in order: (type, options); comments and blank lines skipped."""
    if path.stat().st_size > MAX_CFG_BYTES:
        raise ModelFormatError(f"{path}: Darknet cfg over {MAX_CFG_BYTES:,} bytes")
    sections: list[tuple[str, dict[str, str]]] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ModelFormatError(f"{path}: line {number}: bad section header {line[:40]!r}")
            sections.append((line[1:-1].strip().lower(), {}))
        elif "=" in line and sections:
            key, value = line.split("=", 1)
            sections[-1][1][key.strip().lower()] = value.strip()
        else:
            raise ModelFormatError(f"{path}: line {number}: expected [section] or key=value, got {line[:40]!r}")
    if not sections or sections[0][0] not in ("net", "network"):
        raise ModelFormatError(f"{path}: a Darknet cfg starts with a [net] section")
    return sections


def _int(cfg: Path, index: int, options: dict[str, str], key: str, default: int | None = None) -> int:
    value = options.get(key)
    if value is None:
        if default is None:
            raise ModelFormatError(f"{cfg}: layer {index} has no {key}=")
        return default
    try:
        return int(value)
    except ValueError:
        raise ModelFormatError(f"{cfg}: layer {index}: {key}={value[:20]!r} is not an integer") from None


# One read: (tensor name, number of floats, shape to return, layout)
Plan = list[tuple[str, int, tuple[int, ...], str | None]]


def plan(cfg: Path) -> Plan:
    """The float runs of the ``.weights`` file, layer by layer, as the cfg describes them."""
    sections = parse_cfg(cfg)
    net = sections[0][1]
    c = _int(cfg, -1, net, "channels", 3)
    h = _int(cfg, -1, net, "height", 0)
    w = _int(cfg, -1, net, "width", 0)
    shapes: list[tuple[int, int, int]] = []  # (c, h, w) out of each layer
    runs: Plan = []
    for i, (kind, opt) in enumerate(sections[1:]):
        name = f"{i}_{kind}"

        def get(key: str, default: int | None = None, i: int = i, opt: dict[str, str] = opt) -> int:
            return _int(cfg, i, opt, key, default)

        if kind in ("convolutional", "conv"):
            n, size, groups = get("filters", 1), get("size", 1), get("groups", 1)
            stride = get("stride", 1)
            pad = size // 2 if get("pad", 0) else get("padding", 0)
            if n <= 0 or size <= 0 or groups <= 0 or c % groups or stride <= 0:
                raise ModelFormatError(f"{cfg}: layer {i} (convolutional): filters={n} size={size} groups={groups} "
                                       f"on {c} input channels")  # fmt: skip
            if get("binary", 0):
                raise ModelFormatError(f"{cfg}: layer {i}: binary convolutions (bit-packed weights) are not read")
            runs.append((f"{name}.bias", n, (n,), None))
            if get("batch_normalize", 0):
                for part in ("bn.weight", "bn.running_mean", "bn.running_var"):
                    runs.append((f"{name}.{part}", n, (n,), None))
            runs.append((f"{name}.weight", n * (c // groups) * size * size, (n, c // groups, size, size), "oihw"))
            c, h, w = n, (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1
        elif kind in ("connected", "conn"):
            n, inputs = get("output", 1), c * h * w
            if n <= 0 or inputs <= 0:
                raise ModelFormatError(f"{cfg}: layer {i} (connected): output={n} on {inputs} inputs")
            runs.append((f"{name}.bias", n, (n,), None))
            runs.append((f"{name}.weight", n * inputs, (n, inputs), None))
            if get("batch_normalize", 0):
                for part in ("bn.weight", "bn.running_mean", "bn.running_var"):
                    runs.append((f"{name}.{part}", n, (n,), None))
            c, h, w = n, 1, 1
        elif kind == "batchnorm":
            for part in ("weight", "running_mean", "running_var"):
                runs.append((f"{name}.{part}", c, (c,), None))
        elif kind in ("maxpool", "max"):
            size = get("size", get("stride", 1))
            stride = get("stride", 1)
            padding = get("padding", size - 1)
            if stride <= 0:
                raise ModelFormatError(f"{cfg}: layer {i} (maxpool): stride={stride}")
            h, w = (h + padding - size) // stride + 1, (w + padding - size) // stride + 1
        elif kind in ("avgpool", "avg"):
            h, w = 1, 1
        elif kind == "upsample":
            stride = get("stride", 2)
            h, w = (h * stride, w * stride) if stride > 0 else (h // -stride, w // -stride)
        elif kind == "reorg":
            stride = get("stride", 1)
            if stride <= 0:
                raise ModelFormatError(f"{cfg}: layer {i} (reorg): stride={stride}")
            c, h, w = c * stride * stride, h // stride, w // stride
        elif kind in ("route", "shortcut"):
            key = "layers" if kind == "route" else "from"
            refs = []
            for part in opt.get(key, "").split(","):
                try:
                    ref = int(part)
                except ValueError:
                    raise ModelFormatError(f"{cfg}: layer {i} ({kind}): {key}={opt.get(key, '')[:40]!r}") from None
                ref = i + ref if ref < 0 else ref
                if not 0 <= ref < i:
                    raise ModelFormatError(f"{cfg}: layer {i} ({kind}) refers to layer {part.strip()}")
                refs.append(shapes[ref])
            if kind == "route":
                groups = get("groups", 1)
                if groups <= 0:
                    raise ModelFormatError(f"{cfg}: layer {i} (route): groups={groups}")
                c, h, w = sum(r[0] for r in refs) // groups, refs[0][1], refs[0][2]
            elif "weights_type" in opt and opt["weights_type"] != "none":
                raise ModelFormatError(f"{cfg}: layer {i}: a weighted [shortcut] is not read by hashdb")
        elif kind in _WEIGHTED_UNREAD:
            raise ModelFormatError(f"{cfg}: layer {i}: [{kind}] layers carry weights hashdb does not read")
        elif kind not in _PASS_THROUGH:
            raise ModelFormatError(f"{cfg}: layer {i}: unknown layer type [{kind}]")
        shapes.append((c, h, w))
    return runs


def _layer(run: tuple[str, int, tuple[int, ...], str | None]) -> str:
    return run[0].split(".", 1)[0]


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    if path.suffix.lower() == ".cfg":
        path = path.with_suffix(".weights")
    runs = plan(cfg_path(path))
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        head = f.read(12)
        if len(head) < 12:
            raise ModelFormatError(f"{path}: truncated Darknet weights header ({size} bytes)")
        major, minor, _ = struct.unpack("<iii", head)
        seen_bytes = 8 if (major * 10 + minor >= 2 and major < 1000 and minor < 1000) else 4
        transposed = major > 1000 or minor > 1000  # darknet's flag: [connected] matrices stored (inputs, outputs)
        start = 12 + seen_bytes
        available = (size - start) // 4
        if size < start or (size - start) % 4:
            raise ModelFormatError(f"{path}: Darknet weights of {size} bytes are not a header plus float32 values")
        needed, held = 0, 0
        for _, count, _, _ in runs:
            if needed >= available:
                break
            needed += count
            held += 1
        if needed == available and 0 < held < len(runs) and _layer(runs[held]) == _layer(runs[held - 1]):
            needed += runs[held][1]  # the file stops between two runs of one layer: a cut, not a backbone
            held += 1
        if needed != available:
            what = "ends inside layer" if needed > available else "holds more values than the cfg describes after"
            last = _layer(runs[held - 1]) if held else "the header"
            raise ModelFormatError(
                f"{path}: {what} {last} ({available:,} floats, the cfg accounts for {needed:,}): "
                f"the .cfg does not match these weights"
            )
        check_size(path, 4 * needed, max_bytes)
        f.seek(start)
        out: list[NamedTensor] = []
        for name, count, shape, layout in runs[:held]:
            arr = np.empty(count, dtype="<f4")
            if f.readinto(arr.data) != 4 * count:
                raise ModelFormatError(f"{path}: truncated while reading {name}")
            if transposed and "_connected." in name and name.endswith(".weight"):
                arr = np.ascontiguousarray(arr.reshape(shape[::-1]).T)
            out.append(NamedTensor(name, arr.reshape(shape).astype(np.float32, copy=False), layout))
    return out
