"""Perceptual hashing of CNN weights: lightly modified copies of a model get nearby codes.

``ModelHasher(bits).hash(source)`` -> ``bytes`` of length bits/8. The pipeline (docs/codec.md): load the
tensors (load.py); keep the convolution kernels, balance each layer so that any positive per-filter,
per-channel or per-layer scale cancels, drop the small balanced weights and pool the kernels of each kernel
shape into one order-free multiset (select.py); project every pool on fixed pseudo-random directions and take
normal test statistics of the projections, each contrasted with its rotated/reflected twin (nts.py);
binarize their signs (encode.py). ``ModelHasher.features`` gives the statistics before binarization.
Importing this package does not import torch.
"""

from __future__ import annotations

from .hasher import CODEC_VERSION, ModelHasher, hash_files, hash_model
from .load import load_tensors
from .radius import copy_radius_of

__all__ = ["CODEC_VERSION", "ModelHasher", "copy_radius_of", "hash_files", "hash_model", "load_tensors"]
