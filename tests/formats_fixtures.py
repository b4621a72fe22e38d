"""Fixtures shared by the format tests: small real torch models saved every way, and hand-built zips."""

from __future__ import annotations

import collections
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


def make_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 24, 3), nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 24, 3),
    )  # fmt: skip


def perturbed(model: nn.Module, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """A light copy: every float tensor plus relative Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (v + scale * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
        for k, v in model.state_dict().items()
    }


def zip_bytes(members: list[tuple[str, bytes, int]], prefixes: dict[str, bytes] | None = None) -> bytes:
    """A zip archive of (name, member bytes as stored, uncompressed size): stored when the sizes agree, else
    the bytes are a raw deflate stream of ``prefixes[name]`` followed by zeros up to the size (its CRC
    computed without materializing the zeros)."""
    out = bytearray()
    central = bytearray()
    for name, data, size in members:
        method = 0 if len(data) == size else 8
        prefix = (prefixes or {}).get(name, b"")
        crc = zlib.crc32(data) if method == 0 else crc32_zeros(zlib.crc32(prefix), size - len(prefix))
        raw_name = name.encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data), size, len(raw_name), 0)
        out += raw_name + data
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(data), size, len(raw_name),
            0, 0, 0, 0, 0, offset,
        )  # fmt: skip
        central += raw_name
    n = len(members)
    return bytes(out + central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(central), len(out), 0))


_CHUNK = 1 << 24


def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def crc32_zeros(crc: int, n: int) -> int:
    """zlib.crc32(bytes(n), crc) in O(log n): the CRC register's update by zero bits is linear over GF(2),
    so n zero bytes are the matrix of one zero bit raised to the 8n-th power (zlib's crc32_combine)."""
    op = [0xEDB88320] + [1 << k for k in range(31)]  # one zero bit
    for _ in range(3):
        op = [_gf2_times(op, row) for row in op]  # one zero byte
    state = crc ^ 0xFFFFFFFF
    while n:
        if n & 1:
            state = _gf2_times(op, state)
        n >>= 1
        op = [_gf2_times(op, row) for row in op]
    return state ^ 0xFFFFFFFF


def deflated_zeros(size: int, prefix: bytes = b"") -> bytes:
    """A raw deflate stream of ``prefix`` + zero bytes totalling ``size``, built without compressing it all:
    after a full flush deflate forgets its history, so every 16 MiB chunk of zeros compresses identically."""
    c = zlib.compressobj(1, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    body = size - len(prefix)
    chunk = c.compress(bytes(_CHUNK)) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.compress(bytes(body % _CHUNK)) + c.flush()
    return head + chunk * (body // _CHUNK) + tail


class _StorageMark:
    pass


def torch_pickle(obj_builder, storages: dict[str, tuple[str, int]]) -> bytes:
    """data.pkl bytes as torch.save writes them, for hand-built tensors (see bomb_pt)."""

    class P(pickle.Pickler):
        def persistent_id(self, obj):  # noqa: ANN001, ANN202
            if isinstance(obj, tuple) and obj and obj[0] == "__storage__":
                stype, numel = storages[obj[1]]
                return ("storage", getattr(torch, stype), obj[1], "cpu", numel)
            return None

    import io

    buf = io.BytesIO()
    P(buf, protocol=2).dump(obj_builder)
    return buf.getvalue()


class HandTensor:
    """Pickles as torch._utils._rebuild_tensor_v2 of a storage reference, with any arguments."""

    def __init__(self, key: str, offset: object, size: object, stride: object) -> None:
        self.args = (("__storage__", key), offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self) -> tuple:
        return (torch._utils._rebuild_tensor_v2, self.args)


def torch_zip(pkl: bytes, storages: dict[str, bytes], compressed: dict[str, int] | None = None) -> bytes:
    """A torch zip checkpoint 'archive/' of a data.pkl and stored (or, for ``compressed``, deflated-zero) storages."""
    members = [("archive/data.pkl", pkl, len(pkl)), ("archive/version", b"3\n", 2)]
    for key, data in storages.items():
        members.append((f"archive/data/{key}", data, len(data)))
    for key, size in (compressed or {}).items():
        members.append((f"archive/data/{key}", deflated_zeros(size), size))
    return zip_bytes(members)


def bomb_pt(path: Path, nbytes: int = 1 << 30) -> Path:
    """A small .pt whose one float32 tensor inflates to ``nbytes`` (the issue's 6 MB -> 1 GiB file)."""
    n = nbytes // 4
    pkl = torch_pickle({"w": HandTensor("0", 0, (n,), (1,))}, {"0": ("FloatStorage", n)})
    path.write_bytes(torch_zip(pkl, {}, {"0": nbytes}))
    return path


def bomb_npz(path: Path, nbytes: int = 2 << 30) -> Path:
    """A small .npz whose one member inflates to ``nbytes`` of float32 zeros."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros(0, np.float32))
    header["shape"] = ((nbytes - 128) // 4,)
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    prefix = buf.getvalue()
    size = len(prefix) + header["shape"][0] * 4
    path.write_bytes(zip_bytes([("w.npy", deflated_zeros(size, prefix), size)], {"w.npy": prefix}))
    return path
