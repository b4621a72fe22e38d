"""Perceptual hashing of CNN weights: lightly modified copies of a model get nearby codes.

``ModelHasher(bits).hash(source)`` -> ``bytes`` of length bits/8. The pipeline (docs/codec.md): load the
tensors (load.py), keep the convolution kernels and make them invariant to channel permutation and positive
rescaling (select.py), rank kernels by importance and cut them into segments, compute normal test statistics
per segment (nts.py), binarize (encode.py). Importing this package does not import torch.
"""

from __future__ import annotations

from .hasher import CODEC_VERSION, ModelHasher, hash_files, hash_model
from .load import load_tensors

__all__ = ["CODEC_VERSION", "ModelHasher", "hash_files", "hash_model", "load_tensors"]
