"""Model file readers: one module per format, each turning a file into named float32 tensors.

The contract every reader module keeps (see docs/codec.md for the table of formats):

- ``read(path: Path, max_bytes: int) -> list[NamedTensor]`` (a module may export several such functions,
  e.g. ``keras.read_h5`` and ``keras.read_keras``); the registry in ``hashdb.codec.load`` picks the reader
  by the file's leading bytes first and its suffix second.
- Nothing from the file is executed; optional dependencies are imported inside ``read`` and a missing one
  raises ``ModelFormatError("needs the optional 'h5py' package: pip install hashdb[keras]")``.
- Every failure is a ``ModelFormatError`` whose message starts with the path and says what is wrong in
  hashdb's words (never a library's traceback text).
- Sizes are checked from headers before anything is allocated (``check_size``): a file may not declare
  or inflate to more than ``max_bytes`` of tensor data.
- Where the format states the layout, the reader transposes the kernel to (out, in, *spatial) and marks it
  ``layout="oihw"``; ``layout=None`` leaves the shape-based guess in ``select.conv_layers`` to decide.
- Quantized tensors are dequantized and pruning reparametrizations resolved before they are returned;
  integer/bool tensors that are not weights (masks, counters) are not returned.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from ...errors import ModelFormatError

# Default bound on the tensor bytes one model file may declare or inflate to; ModelHasher(max_bytes=...) and
# HASHDB_MAX_MODEL_BYTES override it. 8 GiB holds a 2B-parameter float32 model.
DEFAULT_MAX_BYTES = 8 << 30


class NamedTensor(NamedTuple):
    name: str
    array: np.ndarray  # float32
    layout: str | None = None  # "oihw" when the file stated the layout and the reader transposed to it


def check_size(path: Path | str, declared_bytes: int, max_bytes: int) -> None:
    """Refuse a file whose tensors would take more than ``max_bytes`` once read (checked before allocating)."""
    if declared_bytes > max_bytes:
        raise ModelFormatError(
            f"{path}: declares {declared_bytes:,} bytes of tensors, over the limit of {max_bytes:,} "
            f"(raise it with HASHDB_MAX_MODEL_BYTES or ModelHasher(max_bytes=...))"
        )
