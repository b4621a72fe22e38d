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


def paddle_inference(
    prefix: Path, params: dict[str, np.ndarray], conv_filters: list[str],
    norms: dict[str, dict[str, str]] | None = None,
) -> Path:  # fmt: skip
    """``PREFIX.pdmodel`` (feed -> conv2d per filter -> fetch, plus every param as a persistable var, in a
    shuffled order as programs list them) and ``PREFIX.pdiparams`` (save_combine: sorted by name). ``norms``:
    filter -> a batch_norm op after its conv2d, by its inputs (Scale, Bias, Mean, Variance -> param names)."""
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
        if norms is not None and f in norms:
            inputs = {"X": [current], **{part: [name] for part, name in norms[f].items()}}
            ops.append(_op_desc("batch_norm", inputs, {"Y": [f"bn{i}.out"]}))
            current = f"bn{i}.out"
    ops.append(_op_desc("fetch", {"X": [current]}, {"Out": ["fetch"]}))
    block = f_varint(1, 0) + f_varint(2, 0xFFFFFFFFFFFFFFFF) + b"".join(f_bytes(3, v) for v in vars_)
    block += b"".join(f_bytes(4, o) for o in ops)
    prefix.with_name(prefix.name + ".pdmodel").write_bytes(f_bytes(1, block) + f_bytes(4, f_varint(1, 2005000)))
    path = prefix.with_name(prefix.name + ".pdiparams")
    path.write_bytes(b"".join(lod_tensor(params[n]) for n in names))
    return path


# ---------------------------------------------------------------- Core ML (Model.proto, NeuralNetwork.proto, MIL.proto)


def pack_bits(q: np.ndarray, nbits: int) -> bytes:
    """n-bit values packed most significant bit first, as coremltools packs quantized NeuralNetwork weights."""
    q = np.asarray(q, dtype=np.int64).ravel()
    bits = (q[:, None] >> np.arange(nbits - 1, -1, -1)) & 1
    return np.packbits(bits.astype(np.uint8).ravel()).tobytes()


def wp_float(arr: np.ndarray) -> bytes:
    return f_packed_floats(1, np.ravel(arr))


def wp_half(arr: np.ndarray) -> bytes:
    return f_bytes(2, np.ravel(arr).astype("<f2").tobytes())


def wp_linear(q: np.ndarray, nbits: int, scale: np.ndarray, bias: np.ndarray) -> bytes:
    params = f_bytes(101, f_packed_floats(1, scale) + f_packed_floats(2, bias))
    return f_bytes(30, pack_bits(q, nbits)) + f_bytes(40, f_varint(1, nbits) + params)


def wp_lut(q: np.ndarray, nbits: int, table: np.ndarray) -> bytes:
    params = f_bytes(102, f_packed_floats(1, table))
    return f_bytes(30, pack_bits(q, nbits)) + f_bytes(40, f_varint(1, nbits) + params)


def nn_conv(name: str, out_ch: int, k_ch: int, kernel: tuple[int, int], weights: bytes, bias: bytes | None,
            deconv: bool = False) -> bytes:  # fmt: skip
    conv = f_varint(1, out_ch) + f_varint(2, k_ch) + f_varint(10, 1) + (f_varint(60, 1) if deconv else b"")
    conv += f_bytes(20, varint(kernel[0]) + varint(kernel[1]))
    conv += f_varint(70, int(bias is not None)) + f_bytes(90, weights) + (f_bytes(91, bias) if bias else b"")
    return f_bytes(1, name) + f_bytes(2, name + "_in") + f_bytes(3, name + "_out") + f_bytes(100, conv)


def nn_inner_product(name: str, n_in: int, n_out: int, weights: bytes) -> bytes:
    fc = f_varint(1, n_in) + f_varint(2, n_out) + f_bytes(20, weights)
    return f_bytes(1, name) + f_bytes(2, name + "_in") + f_bytes(3, name + "_out") + f_bytes(140, fc)


def nn_relu(name: str) -> bytes:
    return f_bytes(1, name) + f_bytes(2, name + "_in") + f_bytes(3, name + "_out") + f_bytes(130, f_bytes(10, b""))


def nn_batchnorm(name: str, source: str, params: list[np.ndarray], run_time: bool = False) -> bytes:
    """A NeuralNetwork ``batchnorm`` layer (160) reading blob ``source``: gamma, beta, mean, variance (fields
    15-18); ``run_time`` sets computeMeanVar (statistics computed at run time)."""
    bn = f_varint(1, len(params[0])) + f_varint(5, int(run_time)) + f_float(10, 1e-5)
    bn += b"".join(f_bytes(number, wp_float(p)) for number, p in zip((15, 16, 17, 18), params, strict=True))
    return f_bytes(1, name) + f_bytes(2, source) + f_bytes(3, name + "_out") + f_bytes(160, bn)


def coreml_nn(path: Path, layers: list[bytes], kind: int = 500) -> Path:
    """A NeuralNetwork ``.mlmodel`` (``kind`` 500 neuralNetwork, 403 classifier, 303 regressor)."""
    description = f_bytes(1, f_bytes(1, "input")) + f_bytes(10, f_bytes(1, "output"))
    path.write_bytes(f_varint(1, 4) + f_bytes(2, description) + f_bytes(kind, b"".join(f_bytes(1, x) for x in layers)))
    return path


MIL_FLOAT16, MIL_FLOAT32, MIL_INT8, MIL_UINT8, MIL_INT32 = 10, 11, 21, 31, 23
_MIL_NP = {np.dtype("float16"): MIL_FLOAT16, np.dtype("float32"): MIL_FLOAT32, np.dtype("int8"): MIL_INT8,
           np.dtype("uint8"): MIL_UINT8, np.dtype("int32"): MIL_INT32}  # fmt: skip
_BLOB_TYPES = {np.dtype("float16"): 1, np.dtype("float32"): 2, np.dtype("uint8"): 3, np.dtype("int8"): 4}


def mil_tensor_type(dtype: int, shape: tuple[int, ...]) -> bytes:
    dims = b"".join(f_bytes(3, f_bytes(1, f_varint(1, d))) for d in shape)
    return f_bytes(1, f_varint(1, dtype) + f_varint(2, len(shape)) + dims)


def mil_blob_value(arr: np.ndarray, file_name: str, offset: int) -> bytes:
    blob = f_bytes(1, file_name) + f_varint(2, offset)
    return f_bytes(2, mil_tensor_type(_MIL_NP[arr.dtype], arr.shape)) + f_bytes(5, blob)


def mil_immediate(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr)
    if arr.dtype == np.float32:
        tensor = f_bytes(1, f_packed_floats(1, arr.ravel()))
    elif arr.dtype == np.int32:
        tensor = f_bytes(2, f_bytes(1, b"".join(varint(int(v)) for v in arr.ravel())))
    else:
        tensor = f_bytes(7, f_bytes(1, arr.tobytes()))
    return f_bytes(2, mil_tensor_type(_MIL_NP[arr.dtype], arr.shape)) + f_bytes(3, f_bytes(1, tensor))


def mil_op(op_type: str, output: str, inputs: dict[str, str] | None = None, attrs: dict[str, bytes] | None = None,
           out_type: bytes = b"") -> bytes:  # fmt: skip
    out = f_bytes(1, op_type)
    for key, name in (inputs or {}).items():
        out += f_map(2, key, f_bytes(1, f_bytes(1, name)))
    out += f_bytes(3, f_bytes(1, output) + (f_bytes(2, out_type) if out_type else b""))
    string_value = f_bytes(2, mil_tensor_type(2, ())) + f_bytes(3, f_bytes(1, f_bytes(4, f_bytes(1, output))))
    for key, value in {"name": string_value, **(attrs or {})}.items():
        out += f_map(5, key, value)
    return out


class BlobWriter:
    """A BlobStorage v2 weight file: 64-byte header, then per blob a 64-byte metadata record and 64-aligned data."""

    def __init__(self) -> None:
        self.data = bytearray(64)
        self.count = 0

    def add(self, arr: np.ndarray) -> int:
        offset = len(self.data)
        raw = np.ascontiguousarray(arr).tobytes()
        data_offset = offset + 64
        meta = struct.pack("<IIQQQ", 0xDEADBEEF, _BLOB_TYPES[arr.dtype], len(raw), data_offset, 0)
        self.data += meta.ljust(64, b"\x00") + raw
        self.data += bytes(-len(self.data) % 64)
        self.count += 1
        return offset

    def bytes(self) -> bytes:
        return struct.pack("<II", self.count, 2) + bytes(self.data[8:])


def mlpackage(folder: Path, ops: list[bytes]) -> Path:
    """``folder`` (a ``.mlpackage``): Manifest.json, Data/com.apple.CoreML/model.mlmodel holding an ML Program of
    ``ops`` in function main; the caller writes weights/weight.bin beside the spec."""
    spec_dir = folder / "Data" / "com.apple.CoreML"
    (spec_dir / "weights").mkdir(parents=True, exist_ok=True)
    (folder / "Manifest.json").write_text('{"fileFormatVersion": "1.0.0", "rootModelIdentifier": "x"}')
    block = f_bytes(1, f_bytes(1, "x")) + b"".join(f_bytes(3, op) for op in ops)
    function = f_bytes(2, "CoreML5") + f_map(3, "CoreML5", block)
    program = f_varint(1, 1) + f_map(2, "main", function)
    spec = spec_dir / "model.mlmodel"
    spec.write_bytes(f_varint(1, 6) + f_bytes(2, f_bytes(1, f_bytes(1, "x"))) + f_bytes(502, program))
    return spec
