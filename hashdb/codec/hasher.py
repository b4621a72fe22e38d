"""ModelHasher: one configured pipeline load -> select -> nts -> encode, and the files front end."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from .. import DEFAULT_BITS
from ..codes import check_bits
from ..errors import InvalidArgument, ModelFormatError
from .batchnorm import batchnorm_gains, fold_sign
from .chain import ChainConfig, chain_sketches
from .encode import ENCODINGS, encode
from .load import load_tensors
from .nts import CONTRASTS, FEATURES, projection_statistics
from .null import null_radius_fraction
from .readers import positive_int_from_env
from .select import PRUNE_RULES, Pool, capped_pools, conv_layer, conv_plan, important_kernels, kernel_shape

CODEC_VERSION = "chain-sketch-7"  # the default codec: chain.py (canonical descriptors, Fourier sketches)
CHAIN_V6 = "chain-sketch-6"  # codec v6: v7 without its channel importance, kept to query and extend its databases
CHAIN_V5 = "chain-sketch-5"  # codec v5: v6 with its threshold from a percentile, kept to query and extend its databases
CHAIN_V4 = "chain-sketch-4"  # codec v4: v5 without its soft threshold, kept to query and extend its databases
CHAIN_V3 = "chain-sketch-3"  # codec v3: chain.py as first shipped, kept to query and extend databases made with it
LEGACY_CODEC = "nts-dihedral-2"  # codec v2 (pooled-kernel statistics), kept to query databases made with it
CHAIN_CODECS = (CODEC_VERSION, CHAIN_V6, CHAIN_V5, CHAIN_V4, CHAIN_V3)
CODECS = (CODEC_VERSION, CHAIN_V6, CHAIN_V5, CHAIN_V4, CHAIN_V3, LEGACY_CODEC)
DEPTH_CODECS = (CODEC_VERSION, CHAIN_V6, CHAIN_V5, CHAIN_V4)  # the codecs with depth weights (``decay``)
SHRINK_CODECS = (CODEC_VERSION, CHAIN_V6, CHAIN_V5)  # the codecs with a soft threshold (``shrink``)
IMPORTANCE_CODECS = (CODEC_VERSION,)  # the codecs that weigh channels by importance (``importance``)

# Each chain codec's fixed choices (chain.ChainConfig) and its tunables' defaults. v4 (docs/codec.md, "Codec v4"):
# filters centred, float32 balancing with fewer sweeps, descriptors as matrix products, a wider descriptor. v5
# ("Codec v5"): v4 with each balanced layer soft-thresholded (``shrink``), so magnitude pruning keeps the code. v6
# ("Codec v6"): the threshold a multiple of the balanced layer's RMS weight, a number of its shape (no pass to find it).
# v7 ("Codec v7"): v6 with each channel weighed by its importance to the function (``importance``), BatchNorm folded.
CHAIN_FIXED: dict[str, dict[str, Any]] = {
    CODEC_VERSION: {"centre": True, "sweeps": 6, "single": True, "shrink_by_rms": True},
    CHAIN_V6: {"centre": True, "sweeps": 6, "single": True, "shrink_by_rms": True},
    CHAIN_V5: {"centre": True, "sweeps": 6, "single": True},
    CHAIN_V4: {"centre": True, "sweeps": 6, "single": True},
    CHAIN_V3: {},
}
# shrink < 1: v6's threshold is shrink / sqrt(fan-in), and a filter of unit energy has a weight of at least that
# size, so every live filter keeps a weight (at 1 or more whole layers could vanish, and every code with them);
# v5's is a fraction of a percentile of |w|
SHRINK_LIMIT = 1.0
CHAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    CODEC_VERSION: {"dim": 96, "omega": 2.0, "ridge": 0.3, "decay": 0.75, "shrink": 0.6, "importance": 0.75},
    CHAIN_V6: {"dim": 96, "omega": 2.0, "ridge": 0.3, "decay": 0.75, "shrink": 0.6},
    CHAIN_V5: {"dim": 96, "omega": 2.0, "ridge": 0.3, "decay": 0.75, "shrink": 0.35},
    CHAIN_V4: {"dim": 96, "omega": 2.0, "ridge": 0.3, "decay": 0.75, "shrink": 0.0},
    CHAIN_V3: {"dim": 32, "omega": 2.0, "ridge": 0.3, "decay": 0.0, "shrink": 0.0},
}

# The most convolution layers a chain codec hashes (HASHDB_MAX_LAYERS overrides): each costs ~2 ms however small
# (its 96 x 96 whitening), so a 1 MB file of 12,000 tiny layers took half a minute (found by fuzzing). The deepest
# published CNNs have about 1,000 (ResNet-1001).
DEFAULT_MAX_LAYERS = 10_000
# Layers with fewer filters than this get no code of their own (hash_with_layers): their codes are too alike
# across independently trained models to index (bench/null_bench.py, section null, layer codes).
LAYER_MIN_FILTERS = 16

# copy_radius / bits that maximizes min(precision, recall) of light copies vs distinct models on the zoo, per
# code length (bench/codec_sweep.py report; docs/codec.md); other lengths interpolate in log2(bits).
RADIUS_FRACTIONS = {64: 0.20, 128: 0.266, 256: 0.305, 512: 0.315, 1024: 0.325, 2048: 0.33}


def radius_fraction_for(bits: int) -> float:
    """The measured copy-radius fraction for ``bits``, linear in log2(bits) between measured lengths."""
    xs = np.log2(sorted(RADIUS_FRACTIONS))
    ys = [RADIUS_FRACTIONS[b] for b in sorted(RADIUS_FRACTIONS)]
    return float(np.interp(np.log2(bits), xs, ys))


LayerShape = tuple[str, int, int, tuple[int, ...]]  # (name, filters, inputs per group, kernel shape)


class Suspect(NamedTuple):
    """What a query needs of one model: its code, its layers' codes, its kernel family (ModelHasher.suspect)."""

    code: bytes
    layers: list[tuple[str, bytes]]
    family: str | None


def kernel_family(kernel_shapes: Sequence[tuple[int, ...]]) -> str | None:
    """'2d' when every kernel with more than one tap spans exactly two dimensions (3x3, 5x5; not 7x1), else
    None: the null library measured 2-D models apart from the rest (codec.null.null_fit)."""
    spans = {sum(k > 1 for k in ks) for ks in kernel_shapes} - {0}
    return "2d" if spans == {2} else None


class ModelHasher:
    """Perceptual hash of a CNN's weights: copies land within ``copy_radius`` bits of each other, independently
    trained models (even of the same architecture) about half the bits apart.

    ``bits``: code length, a multiple of 64 in 64..2048. ``codec``: 'chain-sketch-7' (the default,
    hashdb/codec/chain.py: channel descriptors propagated from the input in canonical coordinates, summed
    through random Fourier features, each channel weighed by its importance to the function; independent bits for
    independently trained models, docs/codec.md), 'chain-sketch-6' (the same with every channel weighed alike),
    'chain-sketch-5' (v6 with its soft threshold found from a percentile of the weights),
    'chain-sketch-4' (without a soft threshold) and 'chain-sketch-3' (the first version: 32-dimensional
    descriptors, uncentred filters, float64 balancing), all kept so that databases made with them keep their
    codes, or 'nts-dihedral-2' (pooled-kernel statistics; kept so that
    databases made with it can still be queried). Shared tunables: ``layout`` ('auto' | 'oihw' | 'hwio'),
    ``include_linear``, ``radius_fraction`` (copy_radius / bits; default from the codec's fitted null).
    Chain codec tunables: ``dim`` (descriptor dimension: v4-v7 96, v3 32), ``omega`` (Fourier frequency:
    higher is more distinctive, lower more tolerant of fine-tuning; 2), ``ridge`` (whitening regularisation; 0.3);
    v4-v7: ``decay`` (a layer's sketch counts (1 + max(depth, 1))^-decay in the model's code; 0.75); v5-v7:
    ``shrink`` (each balanced layer soft-thresholded; v6 and v7: at shrink x each live filter's RMS weight,
    1 / sqrt(fan-in), 0.6; v5: at shrink x the layer's 90th percentile of |w|, 0.35; both in [0, 1)); v7:
    ``importance`` (each channel weighs (1 / (a_i b_i)) ** importance, chain.channel_importance, BatchNorm folded
    in at load time, codec.batchnorm; 0.75, in [0, 2]; 0 is v6).
    Codec v2 tunables: ``prune``, ``prune_rule``, ``features``, ``encoding``, ``contrast``, ``max_kernels``.

    ``hash`` / ``hash_bits`` give the code; ``features`` the real values it binarizes (sign); ``layer_sketches``
    (chain codecs) each layer's part of them. ``ModelHasher.from_config(db.codec)`` rebuilds the hasher a database was
    made with. ``max_bytes`` is the tensor bytes one model file may declare or inflate to (default
    HASHDB_MAX_MODEL_BYTES, else 8 GiB; not part of the code's config).
    """

    def __init__(
        self,
        bits: int = DEFAULT_BITS,
        *,
        codec: str = CODEC_VERSION,
        layout: str = "auto",
        include_linear: bool = False,
        radius_fraction: float | None = None,
        max_bytes: int | None = None,
        dim: int | None = None,
        omega: float | None = None,
        ridge: float | None = None,
        decay: float | None = None,
        shrink: float | None = None,
        importance: float | None = None,
        prune: float = 0.5,
        prune_rule: str = "relative",
        features: Sequence[str] = ("skew", "kurt"),
        encoding: str = "sign",
        contrast: str = "dihedral",
        max_kernels: int = 1 << 17,
    ) -> None:
        self.bits = check_bits(bits)
        if codec not in CODECS:
            raise InvalidArgument(f"codec must be one of {CODECS}, got {codec!r}")
        self.codec = codec
        if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0):
            raise InvalidArgument(f"max_bytes must be a positive int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        if layout not in ("auto", "oihw", "hwio"):
            raise InvalidArgument(f"layout must be 'auto', 'oihw' or 'hwio', got {layout!r}")
        self.layout = layout
        self.include_linear = bool(include_linear)
        # every tunable is checked whichever codec uses it: a typo is an error, not silently ignored
        chain_defaults = CHAIN_DEFAULTS.get(codec, CHAIN_DEFAULTS[CODEC_VERSION])
        own = CHAIN_DEFAULTS.get(codec, {})  # the codec's own chain settings (none for v2): what it may be given
        dim = chain_defaults["dim"] if dim is None else dim
        omega = chain_defaults["omega"] if omega is None else omega
        ridge = chain_defaults["ridge"] if ridge is None else ridge
        if decay is not None and codec not in DEPTH_CODECS and decay != own.get("decay"):
            raise InvalidArgument(f"decay is a setting of {', '.join(DEPTH_CODECS)}; codec {codec} has none")
        decay = chain_defaults.get("decay", 0.0) if decay is None else decay
        if not (isinstance(decay, int | float) and not isinstance(decay, bool) and 0.0 <= decay <= 4.0):
            raise InvalidArgument(f"decay must be in [0, 4], got {decay!r}")
        if shrink is not None and codec not in SHRINK_CODECS and shrink != own.get("shrink"):
            raise InvalidArgument(f"shrink is a setting of {', '.join(SHRINK_CODECS)}; codec {codec} has none")
        shrink = chain_defaults.get("shrink", 0.0) if shrink is None else shrink
        if not (isinstance(shrink, int | float) and not isinstance(shrink, bool) and 0.0 <= shrink < SHRINK_LIMIT):
            raise InvalidArgument(f"shrink must be in [0, {SHRINK_LIMIT:g}), got {shrink!r}")
        if importance is not None and codec not in IMPORTANCE_CODECS and importance != own.get("importance"):
            raise InvalidArgument(f"importance is a setting of {', '.join(IMPORTANCE_CODECS)}; codec {codec} has none")
        importance = chain_defaults.get("importance", 0.0) if importance is None else importance
        if not (isinstance(importance, int | float) and not isinstance(importance, bool) and 0.0 <= importance <= 2.0):
            raise InvalidArgument(f"importance must be in [0, 2], got {importance!r}")
        if not isinstance(dim, int) or isinstance(dim, bool) or not 4 <= dim <= 256:
            raise InvalidArgument(f"dim must be an int in 4..256, got {dim!r}")
        if not (isinstance(omega, int | float) and 0.0 < omega <= 100.0):
            raise InvalidArgument(f"omega must be in (0, 100], got {omega!r}")
        if not (isinstance(ridge, int | float) and 0.0 < ridge <= 10.0):
            raise InvalidArgument(f"ridge must be in (0, 10], got {ridge!r}")
        if not (isinstance(prune, int | float) and 0.0 <= prune < 1.0):
            raise InvalidArgument(f"prune must be in [0, 1), got {prune!r}")
        features = tuple(features)
        if not features or any(f not in FEATURES for f in features) or len(set(features)) != len(features):
            raise InvalidArgument(f"features must be distinct names from {FEATURES}, got {features!r}")
        if encoding not in ENCODINGS:
            raise InvalidArgument(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if not isinstance(max_kernels, int) or max_kernels < 64:
            raise InvalidArgument(f"max_kernels must be an int >= 64, got {max_kernels!r}")
        if contrast not in CONTRASTS:
            raise InvalidArgument(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
        if prune_rule not in PRUNE_RULES:
            raise InvalidArgument(f"prune_rule must be one of {PRUNE_RULES}, got {prune_rule!r}")
        self.max_kernels = max_kernels
        self.contrast = contrast
        self.prune = float(prune)
        self.prune_rule = prune_rule
        self.encoding = encoding
        self.chain = ChainConfig(dim=dim, omega=float(omega), ridge=float(ridge), decay=float(decay),
                                 shrink=float(shrink), importance=float(importance), **CHAIN_FIXED.get(codec, {}))
        if codec in CHAIN_CODECS:
            self.feature_names: tuple[str, ...] = ("sketch",)
            self.directions = self.bits
            default_fraction = null_radius_fraction(self.config_without_radius())
        else:
            self.feature_names = features  # the statistic of each column of features()
            self.directions = -(-self.bits // len(features))
            default_fraction = radius_fraction_for(self.bits)
        self.radius_fraction = default_fraction if radius_fraction is None else float(radius_fraction)
        if not 0.0 <= self.radius_fraction < 0.5:
            raise InvalidArgument(f"radius_fraction must be in [0, 0.5), got {radius_fraction!r}")

    @classmethod
    def from_config(cls, config: dict[str, Any], max_bytes: int | None = None) -> ModelHasher:
        """The hasher a stored ``config`` (``ModelHasher.config``, e.g. a database's ``codec``) describes."""
        if not isinstance(config, dict) or config.get("codec") not in CODECS:
            known = ", ".join(CODECS)
            raise InvalidArgument(f"unknown codec {config.get('codec') if isinstance(config, dict) else config!r}: "
                                  f"this hashdb makes {known}")
        kw = {k: v for k, v in config.items() if k not in ("bits", "copy_radius", "directions")}
        try:
            return cls(config["bits"], max_bytes=max_bytes, **kw)
        except TypeError as exc:
            raise InvalidArgument(f"codec config has an unknown setting: {exc}") from None

    @property
    def copy_radius(self) -> int:
        """Hamming radius for 'this is a copy' at this code length. Codec v3: the largest distance whose
        false-match rate per pair (the codec's fitted null, hashdb/codec/null.json) is at most 1e-12."""
        return int(round(self.radius_fraction * self.bits))

    def config_without_radius(self) -> dict[str, Any]:
        if self.codec in CHAIN_CODECS:
            return {
                "codec": self.codec,
                "bits": self.bits,
                "layout": self.layout,
                "include_linear": self.include_linear,
                "dim": self.chain.dim,
                "omega": self.chain.omega,
                "ridge": self.chain.ridge,
                **({"decay": self.chain.decay} if self.codec in DEPTH_CODECS else {}),
                **({"shrink": self.chain.shrink} if self.codec in SHRINK_CODECS else {}),
                **({"importance": self.chain.importance} if self.codec in IMPORTANCE_CODECS else {}),
            }
        return {
            "codec": self.codec,
            "bits": self.bits,
            "layout": self.layout,
            "prune": self.prune,
            "prune_rule": self.prune_rule,
            "include_linear": self.include_linear,
            "features": list(self.feature_names),
            "encoding": self.encoding,
            "contrast": self.contrast,
            "directions": self.directions,
            "max_kernels": self.max_kernels,
        }

    @property
    def config(self) -> dict[str, Any]:
        """Every tunable and the codec version; JSON/msgpack-serializable, stored in a database's meta."""
        return {**self.config_without_radius(), "radius_fraction": self.radius_fraction,
                "copy_radius": self.copy_radius}

    def __repr__(self) -> str:
        return f"ModelHasher({', '.join(f'{k}={v!r}' for k, v in self.config.items() if k != 'codec')})"

    def hash(self, source: Any) -> bytes:
        """The code of one model (module, state_dict, mapping of arrays, a model file or a one-model folder)."""
        return np.packbits(self.hash_bits(source)).tobytes()

    def hash_bits(self, source: Any) -> np.ndarray:
        """The code as a bool vector of length ``bits`` (bit i is the i-th packbits bit)."""
        if self.codec in CHAIN_CODECS:
            return self.features(source)[:, 0] > 0
        return encode(self.features(source), self.bits, self.encoding, names=self.feature_names)

    def features(self, source: Any) -> np.ndarray:
        """The real values the code binarizes, float64, one row per direction, one column per feature name
        (codec v3: one column, the summed layer sketches, bit = value > 0; v2: normal test statistics, ``hash_bits``
        is encode.encode of them). For benchmarks and tuning: the same pipeline as ``hash``."""
        if self.codec in CHAIN_CODECS:
            return np.sum([s for _, s in self.layer_sketches(source)], axis=0)[:, None]
        where = _where(source)
        pools = self.pools(source)
        try:
            with _one_blas_thread():
                return projection_statistics(pools, self.directions, self.feature_names, contrast=self.contrast)
        except (ModelFormatError, ValueError) as exc:
            raise ModelFormatError(f"{where}: {exc}") from None

    def layer_sketches(self, source: Any) -> list[tuple[str, np.ndarray]]:
        """Codec v3: (tensor name, float64 sketch of ``bits`` values) per convolution layer, in chain order
        (producers before consumers); the model's features are their sum, a layer's own code their sign."""
        if self.codec not in CHAIN_CODECS:
            raise InvalidArgument(f"layer sketches need a chain codec {CHAIN_CODECS}, this hasher is {self.codec!r}")
        return self._sketches(source)[0]

    def _sketches(self, source: Any) -> tuple[list[tuple[str, np.ndarray]], list[LayerShape]]:
        """layer_sketches() and each layer's (name, filters, inputs per group, kernel shape)."""
        where = _where(source)
        tensors, plan = self._plan(source, where)
        limit = max_layers_from_env()
        if len(plan) > limit:
            raise ModelFormatError(f"{where}: {len(plan):,} convolution layers, more than the {limit:,} hashdb hashes "
                                   "(HASHDB_MAX_LAYERS sets another limit)")  # fmt: skip
        shapes = []
        for i, read in plan:
            arr = tensors[i].array
            ks = kernel_shape(arr, read)
            out, cin = (arr.shape[-1], arr.shape[-2]) if read == "hwio" else arr.shape[:2]
            shapes.append((tensors[i].name, int(out), int(cin), tuple(int(k) for k in ks) or (1,)))
        # codec v7 weighs filters by their norms, which a BatchNorm after them sets: fold it in (codec.batchnorm)
        gains = batchnorm_gains(tensors, plan) if self.chain.importance > 0 else {}
        arrays: list[np.ndarray | None] = [t.array for t in tensors]
        del tensors  # each layer's array is dropped once its descriptors are made

        def make_layer(j: int) -> np.ndarray:
            i, read = plan[j]
            w = conv_layer(arrays[i], read)  # type: ignore[arg-type]
            arrays[i] = None
            return fold_sign(w, gains[j]) if j in gains else w

        try:
            with _one_blas_thread():
                return chain_sketches(shapes, make_layer, self.bits, self.chain, gains=gains), shapes
        except (ModelFormatError, ValueError) as exc:
            raise ModelFormatError(f"{where}: {exc}") from None

    def hash_with_layers(self, source: Any) -> tuple[bytes, list[tuple[str, bytes]]]:
        """The model's code and, from the same pass, each layer's own code (sign of its sketch) as
        (tensor name, code bytes), in chain order: what a database stores to find partial copies (a stolen
        backbone inside a bigger model). Layers whose codes carry too little identity to index (fewer than
        ``LAYER_MIN_FILTERS`` filters, measured on the null library: bench/layer_null.py) get no code of their
        own but still count in the model's code. Codec v2 has no per-layer pieces: its layer list is empty."""
        found = self.suspect(source)
        return found.code, found.layers

    def suspect(self, source: Any) -> Suspect:
        """hash_with_layers() and the model's kernel family: '2d' when every kernel with more than one tap
        spans two dimensions (the family whose null the codec fits apart: codec.null.null_fit), else None."""
        if self.codec not in CHAIN_CODECS:
            return Suspect(self.hash(source), [], None)
        sketches, shapes = self._sketches(source)
        total = np.sum([s for _, s in sketches], axis=0)
        code = np.packbits(total > 0).tobytes()
        filters = {name: out for name, out, _, _ in shapes}
        layers = [(name, np.packbits(s > 0).tobytes()) for name, s in sketches if filters[name] >= LAYER_MIN_FILTERS]
        return Suspect(code, layers, kernel_family([ks for _, _, _, ks in shapes]))

    def _plan(self, source: Any, where: str) -> tuple[list, list[tuple[int, str]]]:
        """The source's tensors and the convolution plan over them (select.conv_plan), NaN/inf refused."""
        tensors = load_tensors(source, max_bytes=self.max_bytes)
        plan = conv_plan(tensors, layout=self.layout, include_linear=self.include_linear)
        if not plan:
            raise ModelFormatError(f"{where}: no convolution weights found ({len(tensors)} tensors)")
        bad = sum(not _finite(tensors[i].array) for i, _ in plan)
        if bad:  # NaN/inf would silently poison every statistic
            raise ModelFormatError(f"{where}: {bad} convolution weight tensor(s) hold NaN or infinite values")
        return tensors, plan

    def pools(self, source: Any) -> list[Pool]:
        """Codec v2: the capped kernel pools of one model (load -> select): what ``features`` projects."""
        where = _where(source)
        tensors, plan = self._plan(source, where)
        shapes = [kernel_shape(tensors[i].array, read) for i, read in plan]
        if any(int(np.prod(ks)) > 1 for ks in shapes):  # 1x1 kernels have no direction to project on: skip them
            plan = [p for p, ks in zip(plan, shapes, strict=True) if int(np.prod(ks)) > 1]
        arrays: list[np.ndarray | None] = [t.array for t in tensors]
        del tensors  # each layer's array is dropped once its important kernels are taken

        def kernels() -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
            for i, read in plan:
                w = conv_layer(arrays[i], read)  # type: ignore[arg-type]
                arrays[i] = None
                yield w.shape[2:], important_kernels(w, self.prune, self.prune_rule)
                del w

        try:
            with _one_blas_thread():
                return capped_pools(kernels(), self.max_kernels)
        except (ModelFormatError, ValueError) as exc:
            raise ModelFormatError(f"{where}: {exc}") from None


def _finite(a: np.ndarray) -> bool:
    """Whether every value of ``a`` is finite: its smallest and largest are (NaN propagates through both), two
    reductions and no array of flags."""
    if a.size == 0 or not np.issubdtype(a.dtype, np.inexact):
        return True
    if not np.issubdtype(a.dtype, np.floating):  # complex: no order to reduce by
        return bool(np.isfinite(a).all())
    return bool(np.isfinite(a.min()) and np.isfinite(a.max()))


def _where(source: Any) -> str:
    return os.fspath(source) if isinstance(source, str | os.PathLike) else type(source).__name__


_blas_controller: tuple[int, Any] = (-1, None)  # (len(sys.modules) when made, threadpoolctl controller)


def _one_blas_thread() -> Any:
    """A context running the process's BLAS libraries on one thread. Hashing is many small products: BLAS
    threads there only contend (40 models: 23.9 s with OpenBLAS's default threads on a loaded 2-core
    machine, 5.05 s with one); parallel hashing is the job of worker processes. Making a controller costs
    about 2 ms, so it is remade only when modules were imported since (e.g. scipy bringing its own BLAS)."""
    global _blas_controller
    n_modules, controller = _blas_controller
    if controller is None or n_modules != len(sys.modules):
        from threadpoolctl import ThreadpoolController

        controller = ThreadpoolController()
        _blas_controller = (len(sys.modules), controller)
    return controller.limit(limits=1, user_api="blas")


def hash_model(source: Any, bits: int = DEFAULT_BITS, **kwargs: Any) -> bytes:
    """Shorthand for ``ModelHasher(bits, **kwargs).hash(source)``."""
    return ModelHasher(bits, **kwargs).hash(source)


def hash_files(
    paths: Iterable[str | os.PathLike], bits: int = DEFAULT_BITS, **kwargs: Any
) -> list[tuple[str, bytes | ModelFormatError]]:
    """Hash each file, and each model unit of each folder (keys by hashdb.codec.units.unit_key: the normalized
    path, or ORG/NAME@REV for a Hugging Face cache snapshot); a bad unit yields its ModelFormatError (naming
    the file) and the others still hash."""
    from .units import expand

    hasher = ModelHasher(bits, **kwargs)
    out: list[tuple[str, bytes | ModelFormatError]] = []
    for p in paths:
        units, problems = expand([p])  # hashdb.codec.units: the one way paths become model units
        out.extend((problem.key, problem.error) for problem in problems)
        for unit in units:
            try:
                out.append((unit.key, hasher.hash(unit.path)))
            except ModelFormatError as exc:
                out.append((unit.key, exc))
    return out


def max_layers_from_env() -> int:
    """HASHDB_MAX_LAYERS when set (a positive integer), else DEFAULT_MAX_LAYERS."""
    return positive_int_from_env("HASHDB_MAX_LAYERS", DEFAULT_MAX_LAYERS, "layers")
