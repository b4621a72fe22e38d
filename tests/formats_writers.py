"""Test writers for the TensorFlow, Paddle inference and Core ML formats, built from their specifications
(no TensorFlow, paddle or coremltools): a protobuf wire-format encoder, LevelDB/TensorFlow SSTables and
TensorBundle checkpoints, Paddle ProgramDesc + combined LoDTensor params, Core ML NeuralNetwork and ML Program
specs with their weight blob files."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------- protobuf wire format


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def f_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def f_bytes(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return varint(number << 3 | 2) + varint(len(data)) + data


def f_fixed32(number: int, value: int) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<I", value)


def f_float(number: int, value: float) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<f", value)


def f_packed_floats(number: int, values: np.ndarray) -> bytes:
    return f_bytes(number, np.asarray(values, dtype="<f4").tobytes())


def f_map(number: int, key: str, value: bytes) -> bytes:
    """One entry of a map<string, Message> field (a repeated message of key = 1, value = 2)."""
    return f_bytes(number, f_bytes(1, key) + f_bytes(2, value))


# ---------------------------------------------------------------- crc32c (Castagnoli), masked as LevelDB does

_CRC32C = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------- SSTable + TensorBundle

TABLE_MAGIC = 0xDB4775248B80FB57


def _block(entries: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    out = bytearray()
    restarts = []
    prev = b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        prev = key
    restarts = restarts or [0]
    return bytes(out) + b"".join(struct.pack("<I", r) for r in restarts) + struct.pack("<I", len(restarts))


def sstable(entries: list[tuple[bytes, bytes]], block_size: int = 4096, restart_interval: int = 16,
            compression: int = 0) -> bytes:  # fmt: skip
    """A LevelDB-format table of sorted (key, value) entries, as TensorFlow's table builder writes it."""
    out = bytearray()

    def put(block: bytes) -> bytes:
        handle = varint(len(out)) + varint(len(block))
        trailer = bytes([compression])
        out.extend(block + trailer + struct.pack("<I", masked_crc(block + trailer)))
        return handle

    index: list[tuple[bytes, bytes]] = []
    pending: list[tuple[bytes, bytes]] = []
    size = 0
    for key, value in entries:
        pending.append((key, value))
        size += len(key) + len(value) + 3
        if size >= block_size:
            index.append((key, put(_block(pending, restart_interval))))
            pending, size = [], 0
    if pending or not index:
        index.append((pending[-1][0] + b"\xff" if pending else b"", put(_block(pending, restart_interval))))
    meta = put(_block([], restart_interval))
    handle = put(_block(index, 1))
    footer = meta + handle
    return bytes(out) + footer + bytes(40 - len(footer)) + struct.pack("<Q", TABLE_MAGIC)


TF_DTYPES = {np.dtype("float32"): 1, np.dtype("float64"): 2, np.dtype("float16"): 19, np.dtype("int64"): 9}
DT_BFLOAT16, DT_STRING = 14, 7


def bundle_entry(dtype: int, shape: tuple[int, ...], shard: int, offset: int, size: int, crc: int = 0,
                 slices: bool = False) -> bytes:  # fmt: skip
    dims = b"".join(f_bytes(2, f_varint(1, d)) for d in shape)
    out = f_varint(1, dtype) + f_bytes(2, dims)
    if shard:
        out += f_varint(3, shard)
    if offset:
        out += f_varint(4, offset)
    out += f_varint(5, size) + f_fixed32(6, crc)
    if slices:
        out += f_bytes(7, f_bytes(1, f_bytes(1, f_varint(1, 0) + f_varint(2, 1))))
    return out


def tf_checkpoint(prefix: Path, tensors: dict[str, np.ndarray | bytes], num_shards: int = 1,
                  bf16: frozenset[str] = frozenset(), **table: int) -> Path:  # fmt: skip
    """``PREFIX.index`` + ``PREFIX.data-0000k-of-0000n``: tensors dealt round-robin over the shards in key order;
    a bytes value is a DT_STRING entry (the object graph), names in ``bf16`` are stored as bfloat16 (truncated)."""
    datas = [bytearray() for _ in range(num_shards)]
    entries = []
    for i, key in enumerate(sorted(tensors)):
        value = tensors[key]
        shard = i % num_shards
        data = datas[shard]
        if isinstance(value, bytes):
            raw, dtype, shape = varint(len(value)) + value, DT_STRING, ()
        elif key in bf16:
            raw = (np.ascontiguousarray(value, "<f4").view("<u4") >> 16).astype("<u2").tobytes()
            dtype, shape = DT_BFLOAT16, value.shape
        else:
            raw, dtype, shape = np.ascontiguousarray(value).tobytes(), TF_DTYPES[value.dtype], value.shape
        crc = masked_crc(raw) if len(raw) < 4096 else 0
        entries.append((key.encode(), bundle_entry(dtype, shape, shard, len(data), len(raw), crc)))
        data += raw
    header = f_varint(1, num_shards) + f_bytes(3, f_varint(1, 1))
    index = prefix.with_name(prefix.name + ".index")
    index.write_bytes(sstable([(b"", header), *entries], **table))
    for k, data in enumerate(datas):
        prefix.with_name(f"{prefix.name}.data-{k:05d}-of-{num_shards:05d}").write_bytes(bytes(data))
    return index


def keras_names(sd: dict[str, np.ndarray], optimizer: bool = True) -> dict[str, np.ndarray | bytes]:
    """A torch-layout state dict as Keras' object-based checkpoint stores it: conv ``weight`` (O, I, H, W) ->
    ``layer_with_weights-N/kernel`` HWIO, biases and BatchNorm as they are, with Adam slots, the optimizer's
    iteration counter, ``save_counter`` and the object graph beside them."""
    out: dict[str, np.ndarray | bytes] = {"_CHECKPOINTABLE_OBJECT_GRAPH": b"\x0a\x00object graph proto"}
    layers: dict[str, int] = {}
    attr = "/.ATTRIBUTES/VARIABLE_VALUE"
    for name, value in sd.items():
        layer, leaf = name.rsplit(".", 1)
        n = layers.setdefault(layer, len(layers))
        if leaf == "weight" and value.ndim == 4:
            tf_name, tf_value = f"layer_with_weights-{n}/kernel", value.transpose(2, 3, 1, 0)
        else:
            tf_name, tf_value = f"layer_with_weights-{n}/{leaf}", value
        out[tf_name + attr] = np.ascontiguousarray(tf_value)
        if optimizer and value.dtype.kind == "f":
            for slot in ("m", "v"):
                out[f"{tf_name}/.OPTIMIZER_SLOT/optimizer/{slot}{attr}"] = np.ascontiguousarray(tf_value) * 0.5 + 1
    if optimizer:
        out["optimizer/iter" + attr] = np.array(7, dtype=np.int64)
        out["optimizer/learning_rate" + attr] = np.array(0.001, dtype=np.float32)
    out["save_counter" + attr] = np.array(1, dtype=np.int64)
    return out


def tensor_bytes(shape: tuple[int, ...], dtype: str = "<f4") -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


# ---------------------------------------------------------------- Paddle inference (framework.proto, save_combine)

PADDLE_DTYPES = {np.dtype("float32"): 5, np.dtype("float64"): 6, np.dtype("float16"): 4, np.dtype("int64"): 3,
                 np.dtype("int32"): 2}  # fmt: skip
LOD_TENSOR, FEED_MINIBATCH, FETCH_LIST = 7, 9, 10


def _tensor_desc(dtype: int, dims: tuple[int, ...]) -> bytes:
    return f_varint(1, dtype) + b"".join(f_varint(2, d) for d in dims)  # proto2: repeated int64 unpacked


def _var_desc(name: str, vtype: int, persistable: bool, dtype: int = 5, dims: tuple[int, ...] = ()) -> bytes:
    var_type = f_varint(1, vtype)
    if vtype == LOD_TENSOR:
        var_type += f_bytes(3, f_bytes(1, _tensor_desc(dtype, dims)) + f_varint(2, 0))
    return f_bytes(1, name) + f_bytes(2, var_type) + f_varint(3, int(persistable))


def _op_desc(op_type: str, inputs: dict[str, list[str]], outputs: dict[str, list[str]]) -> bytes:
    def slots(number: int, items: dict[str, list[str]]) -> bytes:
        return b"".join(f_bytes(number, f_bytes(1, k) + b"".join(f_bytes(2, a) for a in v)) for k, v in items.items())

    return slots(1, inputs) + slots(2, outputs) + f_bytes(3, op_type)


def lod_tensor(arr: np.ndarray, lod: list[list[int]] | None = None) -> bytes:
    out = struct.pack("<IQ", 0, len(lod or []))
    for level in lod or []:
        data = np.asarray(level, "<u8").tobytes()
        out += struct.pack("<Q", len(data)) + data
    desc = _tensor_desc(PADDLE_DTYPES[arr.dtype], arr.shape)
    return out + struct.pack("<Ii", 0, len(desc)) + desc + np.ascontiguousarray(arr).tobytes()


def paddle_inference(prefix: Path, params: dict[str, np.ndarray], conv_filters: list[str]) -> Path:
    """``PREFIX.pdmodel`` (feed -> conv2d per filter -> fetch, plus every param as a persistable var, in a
    shuffled order as programs list them) and ``PREFIX.pdiparams`` (save_combine: sorted by name)."""
    names = sorted(params)
    shuffled = names[1::2] + names[::2]
    vars_ = [_var_desc("feed", FEED_MINIBATCH, True), _var_desc("fetch", FETCH_LIST, True),
             _var_desc("x", LOD_TENSOR, False, 5, (-1, 3, 32, 32))]  # fmt: skip
    vars_ += [_var_desc(n, LOD_TENSOR, True, PADDLE_DTYPES[params[n].dtype], params[n].shape) for n in shuffled]
    ops = [_op_desc("feed", {"X": ["feed"]}, {"Out": ["x"]})]
    current = "x"
    for i, f in enumerate(conv_filters):
        ops.append(_op_desc("conv2d", {"Input": [current], "Filter": [f]}, {"Output": [f"conv{i}.out"]}))
        current = f"conv{i}.out"
    ops.append(_op_desc("fetch", {"X": [current]}, {"Out": ["fetch"]}))
    block = f_varint(1, 0) + f_varint(2, 0xFFFFFFFFFFFFFFFF) + b"".join(f_bytes(3, v) for v in vars_)
    block += b"".join(f_bytes(4, o) for o in ops)
    prefix.with_name(prefix.name + ".pdmodel").write_bytes(f_bytes(1, block) + f_bytes(4, f_varint(1, 2005000)))
    path = prefix.with_name(prefix.name + ".pdiparams")
    path.write_bytes(b"".join(lod_tensor(params[n]) for n in names))
    return path
