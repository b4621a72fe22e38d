"""A library of small trained CNNs and their modified copies, for measuring and tuning the codec.

No downloads: originals are trained on scikit-learn's bundled ``load_digits`` (8x8, 10 classes) and on a
seeded synthetic 10-class image task. Every model takes an ``(N, 1, 8, 8)`` batch; architectures that want a
bigger picture upsample inside ``forward`` (no parameters), the 1-D net reads the image as a length-64 signal.

Public API::

    from bench.zoo import ARCHS, make_model, train_original, MODIFICATIONS, build_library, small_library
    lib = build_library()                  # >= 3,565 entries, trained parts cached under bench/cache/zoo/
    for e in lib.entries:                  # Entry: key, arch, original (None for originals), mclass, strength, light
        sd = lib.state_dict(e)             # materialized on demand (cheap modifications are not stored)
    lib.is_cached(e)                       # True when materializing trains nothing (cache_key / cache_name)

Modules, one concern each: data (tasks), nets (architectures, ARCHS, make_model), training, modify (every
modification, MODIFICATIONS), library (Entry, Library, the cache), plan (which entries: library_plan,
build_library, small_library); ``python -m bench.zoo`` builds the full library.
"""

from __future__ import annotations

from .data import DATASETS, dataset
from .library import DEFAULT_CACHE, RECIPE, Entry, Library, Step, cache_key, cache_name, step
from .modify import (
    MODIFICATIONS,
    TRAINED,
    cast,
    distill,
    finetune,
    fold_batchnorm,
    gaussian_noise,
    permute_channels,
    prune_filters,
    prune_magnitude,
    quantize,
    rescale,
    transfer,
    weight_modules,
)
from .nets import ARCHS, ChannelGroup, ZooNet, make_model, n_params
from .plan import ORIGINALS, SMALL_ORIGINALS, SmallLibrary, build_library, library_plan, small_library
from .training import accuracy, train, train_original

__all__ = [
    "ARCHS", "DATASETS", "DEFAULT_CACHE", "MODIFICATIONS", "ORIGINALS", "RECIPE", "SMALL_ORIGINALS", "TRAINED",
    "ChannelGroup", "Entry", "Library", "SmallLibrary", "Step", "ZooNet", "accuracy", "build_library",
    "cache_key", "cache_name", "cast", "dataset", "distill", "finetune", "fold_batchnorm", "gaussian_noise",
    "library_plan", "make_model", "n_params", "permute_channels", "prune_filters", "prune_magnitude",
    "quantize", "rescale", "small_library", "step", "train", "train_original", "transfer", "weight_modules",
]  # fmt: skip
