"""ModelHasher: one configured pipeline load -> select -> nts -> encode, and the files front end."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..codes import check_bits
from ..errors import InvalidArgument, ModelFormatError
from .encode import ENCODINGS, encode
from .load import load_tensors
from .nts import FEATURES, segment_statistics
from .select import balance, conv_layers, important_kernels

CODEC_VERSION = "nts-1"

# Copy radius as a fraction of the code length, measured on the zoo (docs/codec.md, bench/codec_sweep.py).
COPY_RADIUS_FRACTION = 0.18

MIN_SEGMENT = 8  # D'Agostino's skewness test needs n >= 8


class ModelHasher:
    """Perceptual hash of a CNN's weights: near copies land within ``copy_radius`` bits of each other.

    ``bits``: code length, a multiple of 64 in 64..2048. Tunables (keyword arguments; defaults are the
    measured choices, see docs/codec.md): ``layout`` ('auto' | 'oihw' | 'hwio'), ``fraction`` of kernels kept
    as important, ``include_linear``, ``features`` (normal test statistics per segment), ``encoding``
    ('median' | 'sign' | 'pairs'), ``segments`` (None: bits / len(features)), ``pair_span``.
    """

    def __init__(
        self,
        bits: int = 256,
        *,
        layout: str = "auto",
        fraction: float = 0.5,
        include_linear: bool = False,
        features: Sequence[str] = ("skew", "kurt"),
        encoding: str = "pairs",
        segments: int | None = None,
        pair_span: int = 4,
        radius_fraction: float | None = None,
    ) -> None:
        self.bits = check_bits(bits)
        if layout not in ("auto", "oihw", "hwio"):
            raise InvalidArgument(f"layout must be 'auto', 'oihw' or 'hwio', got {layout!r}")
        if not (isinstance(fraction, int | float) and 0.0 < fraction <= 1.0):
            raise InvalidArgument(f"fraction must be in (0, 1], got {fraction!r}")
        features = tuple(features)
        if not features or any(f not in FEATURES for f in features):
            raise InvalidArgument(f"features must be a non-empty subset of {FEATURES}, got {features!r}")
        if encoding not in ENCODINGS:
            raise InvalidArgument(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        n_seg = segments if segments is not None else -(-self.bits // len(features))
        if not isinstance(n_seg, int) or n_seg < 2:
            raise InvalidArgument(f"segments must be an int >= 2, got {segments!r}")
        if encoding != "pairs" and n_seg * len(features) < self.bits:
            raise InvalidArgument(f"{n_seg} segments x {len(features)} features give fewer than {self.bits} bits")
        if not isinstance(pair_span, int) or pair_span < 1:
            raise InvalidArgument(f"pair_span must be an int >= 1, got {pair_span!r}")
        self.layout = layout
        self.fraction = float(fraction)
        self.include_linear = bool(include_linear)
        self.features = features
        self.encoding = encoding
        self.segments = n_seg
        self.pair_span = pair_span
        self.radius_fraction = COPY_RADIUS_FRACTION if radius_fraction is None else float(radius_fraction)

    @property
    def copy_radius(self) -> int:
        """Recommended Hamming radius for 'this is a copy' at this code length (measured, docs/codec.md)."""
        return int(round(self.radius_fraction * self.bits))

    @property
    def config(self) -> dict[str, Any]:
        """Every tunable and the codec version; JSON/msgpack-serializable, stored in a database's meta."""
        return {
            "codec": CODEC_VERSION,
            "bits": self.bits,
            "layout": self.layout,
            "fraction": self.fraction,
            "include_linear": self.include_linear,
            "features": list(self.features),
            "encoding": self.encoding,
            "segments": self.segments,
            "pair_span": self.pair_span,
            "copy_radius": self.copy_radius,
        }

    def __repr__(self) -> str:
        return f"ModelHasher({', '.join(f'{k}={v!r}' for k, v in self.config.items() if k != 'codec')})"

    def hash(self, source: Any) -> bytes:
        """The code of one model (module, state_dict, mapping of arrays, or a model file path)."""
        return np.packbits(self.hash_bits(source)).tobytes()

    def hash_bits(self, source: Any) -> np.ndarray:
        """The code as a bool vector of length ``bits`` (bit i is the i-th packbits bit)."""
        where = os.fspath(source) if isinstance(source, str | os.PathLike) else type(source).__name__
        tensors = load_tensors(source)
        layers = conv_layers(tensors, layout=self.layout, include_linear=self.include_linear)
        if not layers:
            raise ModelFormatError(f"{where}: no convolution weights found ({len(tensors)} tensors)")
        try:
            values, _ = important_kernels([balance(w) for w in layers], self.fraction)
        except ModelFormatError as exc:
            raise ModelFormatError(f"{where}: {exc}") from None
        n_seg = self.segments
        if len(values) < MIN_SEGMENT * n_seg:
            if self.encoding != "pairs":
                raise ModelFormatError(
                    f"{where}: {len(values)} important conv weights are too few for a {self.bits}-bit code"
                )
            n_seg = len(values) // MIN_SEGMENT  # pairs encoding gets its bits from any number of segments
            if n_seg < 2:
                raise ModelFormatError(f"{where}: only {len(values)} important conv weights")
        stats = segment_statistics(values, n_seg, self.features)
        return encode(stats, self.bits, self.encoding, self.pair_span)


def hash_model(source: Any, bits: int = 256, **kwargs: Any) -> bytes:
    """Shorthand for ``ModelHasher(bits, **kwargs).hash(source)``."""
    return ModelHasher(bits, **kwargs).hash(source)


def hash_files(
    paths: Iterable[str | os.PathLike], bits: int = 256, **kwargs: Any
) -> list[tuple[str, bytes | ModelFormatError]]:
    """Hash each file; a bad file yields its ModelFormatError (naming the file) and the others still hash."""
    hasher = ModelHasher(bits, **kwargs)
    out: list[tuple[str, bytes | ModelFormatError]] = []
    for p in paths:
        name = os.fspath(p)
        try:
            out.append((name, hasher.hash(name)))
        except ModelFormatError as exc:
            out.append((name, exc))
    return out
