"""Perceptual hashing of CNN weights: lightly modified copies of a model get nearby codes.

``ModelHasher(bits).hash(source)`` -> ``bytes`` of length bits/8. The pipeline (docs/codec.md): load the
tensors (load.py); keep the convolution kernels, balance each layer so that any positive per-filter,
per-channel or per-layer scale cancels, drop the small balanced weights and pool the kernels of each kernel
shape into one order-free multiset (select.py); project every pool on fixed pseudo-random directions and take
normal test statistics of the projections, each contrasted with its rotated/reflected twin (nts.py);
binarize their signs (encode.py). ``ModelHasher.features`` gives the statistics before binarization.
Importing this package does not import torch, nor the hasher until one of its names is asked for: a query by
code needs only ``radius`` and ``null`` (the hasher's modules cost a fresh ``hashdb query`` about 10 ms).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .hasher import CODEC_VERSION, ModelHasher, hash_files, hash_model
    from .load import load_tensors
    from .radius import copy_radius_of

__all__ = ["CODEC_VERSION", "ModelHasher", "copy_radius_of", "hash_files", "hash_model", "load_tensors"]
_HOME = {"CODEC_VERSION": "hasher", "ModelHasher": "hasher", "hash_files": "hasher", "hash_model": "hasher",
         "load_tensors": "load", "copy_radius_of": "radius"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value
