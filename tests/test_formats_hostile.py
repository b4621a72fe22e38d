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
