"""Hostile model files (issue 17): deep nesting that crashed the interpreter, and small files that made a reader
allocate gigabytes. Each is refused in one line, in bounded time and memory (peak measured with tracemalloc,
which sees numpy's allocations; crashes checked in a child process, since a segfault would take pytest down).

The sizes a bomb would allocate are in each test's comment; PEAK_BOUND is what a refusal may cost."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from formats_fixtures import HandTensor, torch_pickle, torch_zip

from hashdb.codec.load import load_tensors
from hashdb.codec.readers.unpickler import MAX_NESTING
from hashdb.errors import ModelFormatError

PEAK_BOUND = 32 << 20
PEAKS: dict[str, int] = {}  # bomb class -> peak bytes of its refusal (README's reliability table)


# one level of nesting around a value: (opcodes before it, opcodes after it); "dict" is {1: value}
WRAPPERS = {"tuple1": (b"", b"\x85"), "tuple": (b"(", b"t"), "list": (b"(", b"l"), "frozenset": (b"(", b"\x91"),
            "dict": (b"(K\x01", b"d")}  # fmt: skip


def nested_pickle(kinds: list[str], as_key: bool = True) -> bytes:
    """A protocol-4 pickle of None wrapped in ``kinds`` (innermost first): {X: None} as a key, else [X]."""
    head = b"".join(WRAPPERS[k][0] for k in reversed(kinds))
    tail = b"".join(WRAPPERS[k][1] for k in kinds)
    return b"\x80\x04" + (b"}" if as_key else b"]") + head + b"N" + tail + (b"Ns." if as_key else b"a.")


def deep_pickle(depth: int) -> bytes:
    """The issue's payload: {X: None} with X a tuple nested ``depth`` deep, in protocol 2."""
    return b"\x80\x02})" + b"\x85" * depth + b"Ns."


def zipped(pkl: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


def refused_peak(path: Path, match: str, read: Callable[[Path], object] = load_tensors) -> int:
    """Read ``path`` expecting a one-line ModelFormatError matching ``match``; the peak traced bytes."""
    tracemalloc.start()
    try:
        with pytest.raises(ModelFormatError, match=match) as info:
            read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    return peak


@pytest.mark.parametrize("kind", ["pickle", "zip"])
def test_a_300000_deep_tuple_key_is_refused_not_a_segfault(tmp_path: Path, repo: Path, kind: str) -> None:
    # CPython hashes a nested tuple recursively without a guard: this 300 KB file killed every process with SIGSEGV
    pkl = deep_pickle(300_000)
    path = tmp_path / "deep.pt"
    path.write_bytes(pkl if kind == "pickle" else zipped(pkl))
    run = subprocess.run([sys.executable, "-m", "hashdb", "hash", str(path)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)  # fmt: skip
    assert run.returncode > 0, f"exit {run.returncode}: {run.stderr[-300:]}"
    assert "nests objects over" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


@pytest.mark.parametrize("kind", [*WRAPPERS, "mixed"])
def test_nesting_is_bounded_whatever_the_container(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "n.pdparams"
    kinds = list(WRAPPERS) if kind == "mixed" else [kind]
    for depth, refused in ((MAX_NESTING - 5, False), (MAX_NESTING + 1, True), (20_000, True)):
        levels = (kinds * depth)[:depth]
        for as_key in (True, False):
            path.write_bytes(nested_pickle(levels, as_key))
            if refused:
                PEAKS["nesting"] = max(PEAKS.get("nesting", 0), refused_peak(path, "nests objects over"))
                continue
            try:
                load_tensors(path)
            except ModelFormatError as exc:  # unhashable keys and tensorless files may fail, never for depth
                assert "nests" not in str(exc)
    assert PEAKS["nesting"] < PEAK_BOUND


def test_a_huge_memo_index_is_refused_before_the_memo_grows(tmp_path: Path) -> None:
    # LONG_BINPUT 2**31-1 in a 9-byte pickle: the C unpickler sized its memo to 16 GiB (2.1 GB touched)
    path = tmp_path / "memo.pdparams"
    path.write_bytes(b"\x80\x02}r\xff\xff\xff\x7f.")
    PEAKS["memo index"] = refused_peak(path, "memo index")
    assert PEAKS["memo index"] < PEAK_BOUND


def test_one_array_aliased_through_the_memo_counts_every_time(tmp_path: Path) -> None:
    # one 1 MiB array referenced 400 times: 400 float32 copies (the 6 MB file made 3.3 GB)
    arr = np.ones(1 << 18, np.float32)
    path = tmp_path / "alias.pdparams"
    path.write_bytes(pickle.dumps({f"w{i}": arr for i in range(400)}, protocol=2))
    assert path.stat().st_size < 2 << 20
    PEAKS["memo aliases"] = refused_peak(path, "bytes stored")
    assert PEAKS["memo aliases"] < PEAK_BOUND + 2 * path.stat().st_size
    tied = tmp_path / "tied.pdparams"  # an embedding tied to the output layer is two references: still read
    tied.write_bytes(pickle.dumps({"embed": arr, "head": arr}, protocol=2))
    assert [t.name for t in load_tensors(tied)] == ["embed", "head"]


def test_a_stride_zero_view_cannot_make_gigabytes_under_the_size_limit(tmp_path: Path) -> None:
    # a 546-byte .pt: stride 0 over 4 floats made 5.3 GB and a code under the default 8 GiB limit
    n = 1 << 28
    pkl = torch_pickle({"w": HandTensor("0", 0, (n, 5), (0, 0))}, {"0": ("FloatStorage", 4)})
    path = tmp_path / "stride0.pt"
    path.write_bytes(torch_zip(pkl, {"0": bytes(16)}))
    PEAKS["stride 0"] = refused_peak(path, "bytes stored")
    assert PEAKS["stride 0"] < PEAK_BOUND


# ---------------------------------------------------------------- nested readers: msgpack, JSON, HDF5


def test_flax_state_dict_nested_past_the_recursion_limit_is_refused(tmp_path: Path) -> None:
    # maps nested 1,000 deep ({"a": {"a": ...}}, ~3 KB) escaped the reader as RecursionError
    path = tmp_path / "deep.msgpack"
    for depth, refused in ((MAX_NESTING - 5, False), (MAX_NESTING + 5, True), (1000, True)):
        path.write_bytes(b"\x81\xa1a" * depth + b"\xc0")
        if refused:
            PEAKS["nesting"] = max(PEAKS.get("nesting", 0), refused_peak(path, "nests over"))
        else:
            try:
                load_tensors(path)
            except ModelFormatError as exc:  # no weights in it: refused, but not for its depth
                assert "nests" not in str(exc)


def _keras_archive(path: Path, config: bytes, weights: bytes = b"") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", config)
        zf.writestr("model.weights.h5", weights)
    return path


def test_keras_config_json_bombs_are_refused_from_their_sizes(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    # 60 MB of empty lists deflated to ~60 KB made 1.63 GB of Python objects
    bomb = _keras_archive(tmp_path / "bomb.keras", b"[" + b"[]," * (20 << 20) + b"[]]")
    PEAKS["deflated config"] = refused_peak(bomb, "config.json")
    assert PEAKS["deflated config"] < PEAK_BOUND
    deep = _keras_archive(tmp_path / "deep.keras", b"[" * 5000 + b"]" * 5000)
    assert refused_peak(deep, "nests over") < PEAK_BOUND


def test_shard_index_nested_past_the_limit_is_one_clean_line(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 3000 + "]" * 3000 + "}")
    with pytest.raises(ModelFormatError, match="nests over") as info:
        load_tensors(folder)
    assert "\n" not in str(info.value)


def _h5_v3(path: Path, make: Callable[..., object]) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        make(f.create_group("layers/conv2d/vars"))
    return path


def test_hdf5_fill_values_and_filters_count_what_they_make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("h5py")
    import hashdb.codec.readers as readers
    from hashdb.codec.readers.keras import read_h5

    # an unallocated dataset reads as its fill value: an 8.7 KB file made 4.5 GB
    fill = _h5_v3(tmp_path / "fill.weights.h5",
                  lambda g: g.create_dataset("0", shape=(1 << 28,), dtype="<f4", fillvalue=1.0))  # fmt: skip
    assert fill.stat().st_size < 64 << 10
    PEAKS["HDF5 fill value"] = refused_peak(fill, "bytes stored", lambda p: read_h5(p, 8 << 30))
    assert PEAKS["HDF5 fill value"] < PEAK_BOUND
    # gzip inflating ~1000x (the file: 5.2 MB -> 5.3 GB, still running at 120 s)
    zeros = _h5_v3(tmp_path / "gzip.weights.h5", lambda g: g.create_dataset(
        "0", data=np.zeros(1 << 24, np.float32), chunks=(1 << 20,), compression="gzip"))  # fmt: skip
    PEAKS["HDF5 filter"] = refused_peak(zeros, "compression bomb", lambda p: read_h5(p, 8 << 30))
    assert PEAKS["HDF5 filter"] < PEAK_BOUND
    real = _h5_v3(
        tmp_path / "real.weights.h5",
        lambda g: g.create_dataset(  # real weights compress ~1.1x: read
            "0", data=np.random.default_rng(0).standard_normal((64, 3, 3, 3)).astype(np.float32), compression="gzip"
        ),
    )
    assert read_h5(real, 8 << 30)[0].array.size == 64 * 27
    pruned = np.random.default_rng(1).standard_normal((256, 256, 3, 3)).astype(np.float32)
    pruned[np.random.default_rng(2).random(pruned.shape) < 0.95] = 0  # 95% pruned: deflates ~15x, still read
    sparse = _h5_v3(tmp_path / "pruned.weights.h5", lambda g: g.create_dataset("0", data=pruned, compression="gzip"))
    assert sparse.stat().st_size * readers.MAX_EXPANSION < pruned.nbytes
    monkeypatch.setattr(readers, "EXPANSION_FLOOR", 0)  # no floor: the ratio alone decides
    assert read_h5(sparse, 8 << 30)[0].array.size == pruned.size


def test_huge_hdf5_attributes_are_refused_before_they_are_read(tmp_path: Path) -> None:
    import h5py

    from hashdb.codec.readers.keras import read_h5

    path = tmp_path / "attrs.h5"
    with h5py.File(path, "w", libver="latest") as f:  # the latest format stores large attributes densely
        f.attrs.create("layer_names", data=np.zeros(40 << 20, np.uint8))  # a 40 MB attribute (dense storage)
        f.create_dataset("conv2d/kernel:0", data=np.ones((3, 3, 2, 2), np.float32))
    with pytest.raises(ModelFormatError, match="implausibly large"):
        read_h5(path, 8 << 30)


# ---------------------------------------------------------------- TFLite: aliased tables


def aliased_tflite(weight: np.ndarray, op_copies: int, outputs: int, subgraph_copies: int) -> bytes:
    """A CONV_2D model whose one operator (with ``outputs`` outputs) is listed ``op_copies`` times in its
    subgraph, and whose one subgraph is listed ``subgraph_copies`` times in the model: flatbuffer offsets
    may point at one table any number of times, so the file stays small."""
    import flatbuffers

    b = flatbuffers.Builder(1024)

    def ints(values: list[int]) -> int:
        b.StartVector(4, len(values), 4)
        for v in reversed(values):
            b.PrependInt32(v)
        return b.EndVector()

    def same(table: int, n: int) -> int:
        b.StartVector(4, n, 4)
        for _ in range(n):
            b.PrependUOffsetTRelative(table)
        return b.EndVector()

    data = weight.astype("<f4").tobytes()
    b.StartVector(1, len(data), 16)
    b.head -= len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    vec = b.EndVector()
    buffers = []
    for with_data in (False, True):
        b.StartObject(3)
        if with_data:
            b.PrependUOffsetTRelativeSlot(0, vec, 0)
        buffers.append(b.EndObject())
    shape, name = ints(list(weight.shape)), b.CreateString("w")
    b.StartObject(11)
    b.PrependUOffsetTRelativeSlot(0, shape, 0)
    b.PrependUint32Slot(2, 1, 0)
    b.PrependUOffsetTRelativeSlot(3, name, 0)
    tensor = b.EndObject()
    vin, vout = ints([0, 0]), ints([0] * outputs)
    b.StartObject(14)
    b.PrependUOffsetTRelativeSlot(1, vin, 0)
    b.PrependUOffsetTRelativeSlot(2, vout, 0)
    op = b.EndObject()
    tensors, ops = same(tensor, 1), same(op, op_copies)
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(0, tensors, 0)
    b.PrependUOffsetTRelativeSlot(3, ops, 0)
    subgraph = b.EndObject()
    b.StartObject(4)
    b.PrependInt8Slot(0, 3, 0)  # deprecated_builtin_code CONV_2D
    b.PrependInt32Slot(3, 3, 0)
    code = b.EndObject()
    codes, subgraphs = same(code, 1), same(subgraph, subgraph_copies)
    b.StartVector(4, len(buffers), 4)
    for item in reversed(buffers):
        b.PrependUOffsetTRelative(item)
    vbuffers = b.EndVector()
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(1, codes, 0)
    b.PrependUOffsetTRelativeSlot(2, subgraphs, 0)
    b.PrependUOffsetTRelativeSlot(4, vbuffers, 0)
    b.Finish(b.EndObject(), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_tflite_parse_work_is_bounded_by_the_file_size(tmp_path: Path) -> None:
    import time

    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    plain = tmp_path / "plain.tflite"
    plain.write_bytes(aliased_tflite(weight, 1, 1, 1))
    assert load_tensors(plain)[0].array.shape == (4, 3, 3, 3)
    # one operator with 1,000 outputs listed 20,000 times: 20M steps from an ~85 KB file (38 s before)
    path = tmp_path / "quadratic.tflite"
    path.write_bytes(aliased_tflite(weight, 20_000, 1_000, 1))
    assert path.stat().st_size < 100_000
    start = time.perf_counter()
    refused_peak(path, "alias each other")
    assert time.perf_counter() - start < 10


def test_tflite_subgraphs_aliasing_one_buffer_count_every_time(tmp_path: Path) -> None:
    # 1,000 subgraphs sharing one 2.4 MB buffer: 2.4 GB of float32 (the file made 1.07 GB)
    weight = np.ones((256, 256, 3, 3), np.float32)
    path = tmp_path / "alias.tflite"
    path.write_bytes(aliased_tflite(weight, 1, 1, 1000))
    PEAKS["TFLite aliases"] = refused_peak(path, "bytes stored")
    assert PEAKS["TFLite aliases"] < PEAK_BOUND


def test_a_deflated_keras_weights_file_is_checked_before_it_is_inflated(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    from formats_fixtures import deflated_zeros, zip_bytes

    # a deflated model.weights.h5 inflated to a 1 GiB temporary file before anything checked it
    size = 256 << 20
    path = tmp_path / "weights_bomb.keras"
    path.write_bytes(zip_bytes([("config.json", b"{}", 2), ("model.weights.h5", deflated_zeros(size), size)]))
    assert path.stat().st_size < 2 << 20  # ~230x
    PEAKS["deflated weights"] = refused_peak(path, "compression bomb")
    assert PEAKS["deflated weights"] < PEAK_BOUND


def test_a_safetensors_header_field_nested_deep_is_one_clean_line(tmp_path: Path) -> None:
    # a dtype nested 900 deep decoded, then its repr in the error message raised RecursionError
    for depth in (150, 900):
        header = b'{"w": {"dtype": ' + b"[" * depth + b"]" * depth + b', "shape": [1], "data_offsets": [0, 4]}}'
        path = tmp_path / f"deep{depth}.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
        with pytest.raises(ModelFormatError, match="dtype a list|nests over") as info:
            load_tensors(path)
        assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_onnx_initializers_sharing_one_external_range_count_every_time(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    # 1,000 initializers naming the same 1 MiB of one external file: 1 GiB read from 1 MiB stored
    (tmp_path / "weights.bin").write_bytes(np.ones(1 << 18, np.float32).tobytes())
    inits = []
    for i in range(1000):
        tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[1 << 18])
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(1 << 20))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        inits.append(tensor)
    graph = helper.make_graph([], "g", [], [], initializer=inits)
    path = tmp_path / "alias.onnx"
    onnx.save(helper.make_model(graph), str(path))
    PEAKS["ONNX external aliases"] = refused_peak(path, "bytes stored")
    assert PEAKS["ONNX external aliases"] < PEAK_BOUND


def test_every_bomb_class_is_one_error_line_from_the_cli_under_a_memory_cap(tmp_path: Path) -> None:
    """The bombs together through `hashdb hash` in one process capped at 2 GiB of address space (RLIMIT_AS):
    none kills it, each is one error line naming its file, and the good file beside them still hashes."""
    import resource

    pytest.importorskip("h5py")
    arr = np.ones(1 << 18, np.float32)
    bombs = {
        "deep.pt": deep_pickle(300_000),
        "deep_zip.pt": zipped(deep_pickle(300_000)),
        "memo.pdparams": b"\x80\x02}r\xff\xff\xff\x7f.",
        "alias.pdparams": pickle.dumps({f"w{i}": arr for i in range(400)}, protocol=2),
        "stride0.pt": torch_zip(
            torch_pickle({"w": HandTensor("0", 0, (1 << 28, 5), (0, 0))}, {"0": ("FloatStorage", 4)}), {"0": bytes(16)}
        ),  # fmt: skip
        "alias.tflite": aliased_tflite(np.ones((256, 256, 3, 3), np.float32), 1, 1, 1000),
        "quadratic.tflite": aliased_tflite(np.ones((4, 3, 3, 3), np.float32), 20_000, 1_000, 1),
    }
    for name, blob in bombs.items():
        (tmp_path / name).write_bytes(blob)
    _h5_v3(tmp_path / "fill.weights.h5", lambda g: g.create_dataset("0", shape=(1 << 28,), dtype="<f4", fillvalue=1))
    _keras_archive(tmp_path / "config.keras", b"[" + b"[]," * (20 << 20) + b"[]]")
    names = [*bombs, "fill.weights.h5", "config.keras"]
    np.save(tmp_path / "good.npy", np.random.default_rng(0).standard_normal((16, 3, 3, 3)).astype(np.float32))

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    run = subprocess.run([sys.executable, "-m", "hashdb", "hash", *names, "good.npy"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300, preexec_fn=cap)  # fmt: skip
    assert run.returncode > 0, f"killed: {run.returncode} {run.stderr[-500:]}"
    errors = run.stderr.strip().splitlines()
    assert sorted(line.split(": ")[2] for line in errors) == sorted(names), run.stderr
    assert run.stdout.strip().endswith("good.npy") and len(run.stdout.strip().splitlines()) == 1


def test_what_a_file_puts_in_an_error_stays_on_one_line(tmp_path: Path) -> None:
    """A parser may quote a file's bytes in its error (the unpickler quotes a FLOAT opcode's line, newline
    included: found by fuzzing), and a file's name may hold a line break or a terminal's escape: a
    ModelFormatError is one line of printable text, those written as escapes."""
    quoted = tmp_path / "float.pt"
    quoted.write_bytes(b"\x80\x02Fx\n.")  # FLOAT with the text "x"
    named = tmp_path / "a\nb\x1b[31m.pt"
    named.write_bytes(b"\x80\x02junk")
    for path, shown in ((quoted, "'x\\n'"), (named, "a\\nb\\x1b[31m.pt")):
        with pytest.raises(ModelFormatError) as info:
            load_tensors(path)
        message = str(info.value)
        assert message.isprintable() and shown in message, message


def test_a_model_of_more_layers_than_the_limit_is_refused_before_any_is_hashed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each convolution layer costs the chain codec ~2 ms however small, so a 1 MB file of 12,000 tiny layers took
    half a minute (found by fuzzing). More than DEFAULT_MAX_LAYERS (HASHDB_MAX_LAYERS) are refused in one line,
    from the layers' shapes alone."""
    from hashdb.codec import ModelHasher
    from hashdb.codec.hasher import DEFAULT_MAX_LAYERS

    rng = np.random.default_rng(0)
    tiny = {f"l{i}.weight": rng.standard_normal((2, 2, 1, 1)).astype(np.float32) for i in range(DEFAULT_MAX_LAYERS + 1)}
    h = ModelHasher()
    with pytest.raises(ModelFormatError, match=rf"^dict: {DEFAULT_MAX_LAYERS + 1:,} convolution layers, more than"):
        h.hash(tiny)
    net = {f"c{i}.weight": rng.standard_normal((8, 3 if i == 0 else 8, 3, 3)).astype(np.float32) for i in range(4)}
    monkeypatch.setenv("HASHDB_MAX_LAYERS", "3")
    with pytest.raises(ModelFormatError, match=r"4 convolution layers, more than the 3 hashdb hashes"):
        h.hash(net)
    monkeypatch.setenv("HASHDB_MAX_LAYERS", "4")
    assert len(h.hash(net)) == h.bits // 8
    monkeypatch.setenv("HASHDB_MAX_LAYERS", "many")
    with pytest.raises(ModelFormatError, match=r"HASHDB_MAX_LAYERS must be a positive number of layers, got 'many'"):
        h.hash(net)
