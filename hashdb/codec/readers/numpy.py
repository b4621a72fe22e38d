"""NumPy ``.npy`` and ``.npz`` files, never with ``allow_pickle``.

Each array's header (shape, dtype, order) is parsed first and its size checked (``check_size``) before a
byte of data is read: a 2 MB ``.npz`` declaring 2 GiB is refused without inflating it. ``.npy`` files and
members of an ``.npz`` stored uncompressed are memory-mapped; deflated members are inflated to exactly their
declared size.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np

from ...errors import ModelFormatError
from . import NamedTensor, check_size, check_zip_members, float32_or_none

_MAX_HEADER = 1 << 20


def _header(f: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, header length in bytes) of the .npy stream at ``f``."""
    fmt = np.lib.format
    try:
        major, _minor = fmt.read_magic(f)
        if major == 1:
            shape, fortran, dtype = fmt.read_array_header_1_0(f, max_header_size=_MAX_HEADER)
        elif major in (2, 3):
            shape, fortran, dtype = fmt.read_array_header_2_0(f, max_header_size=_MAX_HEADER)
        else:
            raise ValueError(f"unsupported .npy version {major}")
    except (zipfile.BadZipFile, zlib.error):
        raise
    except Exception as exc:  # numpy parses the header with its own literal evaluator: any failure is a bad header
        raise ModelFormatError(f"{where}: bad .npy header ({type(exc).__name__})") from None
    if dtype.hasobject:
        raise ModelFormatError(f"{where}: holds Python objects (would need unpickling), refused")
    if not all(type(d) is int and d >= 0 for d in shape):  # numpy's own check lets True and False through
        raise ModelFormatError(f"{where}: bad .npy header (shape {shape!r})")
    return shape, fortran, dtype, f.tell()


def read_npy(path: Path, max_bytes: int) -> list[NamedTensor]:
    with open(path, "rb") as f:
        shape, fortran, dtype, offset = _header(f, str(path))
    nbytes = math.prod(shape) * dtype.itemsize
    check_size(path, nbytes, max_bytes)
    if offset + nbytes > path.stat().st_size:
        raise ModelFormatError(f"{path}: truncated .npy data ({nbytes:,} bytes declared)")
    if nbytes == 0 or dtype.kind != "f":
        return []
    arr = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    out = float32_or_none(np.asarray(arr))
    return [] if out is None else [NamedTensor(path.stem, out)]


def read_npz(path: Path, max_bytes: int) -> list[NamedTensor]:
    with open(path, "rb") as raw, zipfile.ZipFile(raw) as zf:
        infos = [i for i in zf.infolist() if not i.filename.endswith("/")]  # (is_dir fails on an empty name)
        check_zip_members(path, infos, max_bytes)
        out: list[NamedTensor] = []
        for info in infos:
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            where = f"{path}: member {info.filename}"
            with zf.open(info) as member:
                shape, fortran, dtype, offset = _header(member, where)
                nbytes = math.prod(shape) * dtype.itemsize
                check_size(where, nbytes, max_bytes)
                if offset + nbytes > info.file_size:
                    raise ModelFormatError(f"{where}: truncated ({nbytes:,} bytes declared)")
                if dtype.kind != "f" or nbytes == 0:
                    continue
                data = member.read(nbytes)  # inflates exactly the declared bytes (stored members: a read)
            if len(data) != nbytes:
                raise ModelFormatError(f"{where}: truncated data")
            arr = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
            arr32 = float32_or_none(arr)
            if arr32 is not None:
                out.append(NamedTensor(name, arr32))
        return out


def read(path: Path, max_bytes: int) -> list[NamedTensor]:
    try:
        with open(path, "rb") as f:
            head = f.read(6)
        if head == b"\x93NUMPY":
            return read_npy(path, max_bytes)
        return read_npz(path, max_bytes)
    except (zipfile.BadZipFile, zlib.error) as exc:
        raise ModelFormatError(f"{path}: corrupt .npz archive ({str(exc)[:120]})") from None
    except (zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, ValueError) as exc:
        raise ModelFormatError(f"{path}: cannot read numpy file ({type(exc).__name__}: {str(exc)[:120]})") from None
