"""Important weights: which tensors are convolutions, how to make them invariant, which kernels matter.

Steps, each a pure function over numpy arrays:

1. ``conv_layers``: pick convolution kernels (4-D conv2d, 3-D conv1d, 5-D conv3d; 2-D linear on request)
   and bring them to (out, in, k) with k the flattened spatial positions. Names and storage order are not
   used for anything but error messages.
2. ``balance``: remove every positive per-output-filter and per-input-channel scale. With N[o, i] the norm
   of kernel (o, i), the log-norms are double-centred (a two-way additive model solved in closed form), and
   each kernel is multiplied by exp(-row effect - column effect). A ReLU network's function-preserving
   rescaling (row o of layer l times a, column o of layer l+1 divided by a), a per-layer scale and BatchNorm
   folding (a row scaling) all leave the balanced layer unchanged, and a channel permutation only permutes
   it. This holds across float32's whole range: kernel norms whose squares would overflow or underflow
   float32 are summed in float64, and scales float32 cannot hold are applied in float64 (``kernel_sq_norms``,
   ``_balance``), so a rescaling by 1e30 or 1e-30 gives the code of the unscaled model. Balanced values are
   rounded to float32 so that such transformations give (nearly always bit-) identical values.
3. ``important_kernels``: magnitude-prune each balanced layer ourselves (compression theory: the small
   weights carry little of the function) and re-balance, so that pruning attacks remove what we ignore.
4. ``kernel_pools``: pool the non-zero balanced kernels of all layers by kernel size (an order-free
   multiset, so layer order and names cannot matter).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..errors import ModelFormatError
from .readers import NamedTensor

MAX_KERNEL = 15  # largest spatial kernel extent we believe in when telling OIHW from HWIO


def _spatial_ok(dims: Sequence[int]) -> bool:
    return all(1 <= d <= MAX_KERNEL for d in dims)


def guess_layout(shape: Sequence[int]) -> str | None:
    """'oihw' (kernel dims last, torch/ONNX), 'hwio' (kernel dims first, Keras/TF), 'both' or None."""
    nd = len(shape)
    if nd < 3:
        return None
    ks = nd - 2
    last, first = shape[2:], shape[:ks]
    oihw, hwio = _spatial_ok(last), _spatial_ok(first)
    if nd == 3 and hwio and shape[0] == 1 and not oihw:
        hwio = False  # (1, N, D) is a batch-1 embedding table, not a width-1 Keras conv1d
    if oihw and hwio:
        # Square kernels are the common case; then prefer the reading whose kernel is smaller than the channels.
        sq_oihw, sq_hwio = len(set(last)) == 1, len(set(first)) == 1
        if sq_oihw != sq_hwio:
            return "oihw" if sq_oihw else "hwio"
        k_oihw, k_hwio = int(np.prod(last)), int(np.prod(first))
        if k_oihw != k_hwio:
            return "oihw" if k_oihw < k_hwio else "hwio"
        return "both"
    if oihw:
        return "oihw"
    if hwio:
        return "hwio"
    return _guess_long(shape)


MAX_LONG_KERNEL = 1 << 16  # taps of the longest kernel read when no reading fits MAX_KERNEL (1x512 pitch nets)


def _guess_long(shape: Sequence[int]) -> str | None:
    """Readings of a tensor whose kernel is longer than MAX_KERNEL in either layout (audio and pitch nets have
    1-D kernels of 64..1024 taps): 'both' when each reading has a kernel of at most MAX_LONG_KERNEL taps (the
    model's majority decides), else the one that has, else None. A tensor (1, N, D) is an embedding table, not
    a conv with one output."""
    ks = len(shape) - 2
    readings = {
        "oihw": (shape[0], shape[2:]),
        "hwio": (shape[-1], shape[:ks]),
    }
    if len(shape) == 3 and shape[0] == 1:
        del readings["hwio"]  # (1, N, D): a batch-1 embedding table, as in guess_layout
    fits = [name for name, (out, k) in readings.items() if out >= 2 and 1 <= int(np.prod(k)) <= MAX_LONG_KERNEL]
    if len(fits) == 2:
        return "both"
    return fits[0] if fits else None


def _long_oihw(shape: Sequence[int]) -> bool:
    """A 3-D shape whose OIHW reading is a conv1d of at least 2 filters with a long (over MAX_KERNEL) kernel."""
    return len(shape) == 3 and shape[0] >= 2 and MAX_KERNEL < shape[2] <= MAX_LONG_KERNEL


def conv_layers(tensors: Sequence[NamedTensor], layout: str = "auto", include_linear: bool = False) -> list[np.ndarray]:
    """Convolution (and optionally linear) weights as float32 arrays (out, in, *kernel shape), in source order.

    1-D tensors (biases, BatchNorm statistics) and scalars are dropped. A tensor whose file stated its layout
    (``NamedTensor.layout == 'oihw'``: the reader transposed it) is taken as it is. For the others ``layout``
    is 'auto', 'oihw' or 'hwio'; 'auto' reads each unambiguous tensor by its shape and ambiguous ones
    (3x3x3x3) by the majority.
    """
    return [conv_layer(tensors[i].array, read) for i, read in conv_plan(tensors, layout, include_linear)]


def conv_plan(
    tensors: Sequence[NamedTensor], layout: str = "auto", include_linear: bool = False
) -> list[tuple[int, str]]:
    """What ``conv_layers`` takes, without making any array: (index into ``tensors``, 'oihw' | 'hwio') in
    source order; ``conv_layer(tensors[i].array, read)`` makes the layer (a transposed copy for 'hwio'), so a
    caller can make, use and drop the layers one at a time."""
    if layout not in ("auto", "oihw", "hwio"):
        raise ValueError(f"layout must be 'auto', 'oihw' or 'hwio', got {layout!r}")
    stated = [t.layout == "oihw" and t.array.ndim >= 3 for t in tensors]
    guesses = ["stated" if known else guess_layout(t.array.shape) for t, known in zip(tensors, stated, strict=True)]
    # A 3-D tensor read HWIO by its short kernel whose OIHW reading is a long 1-D kernel, e.g. (8, 1, 512): a
    # torch conv1d of 8 filters of 512 taps as much as a Keras one of 512 filters of 8 taps. The model's other
    # tensors decide; only a model of nothing but such tensors is read by their short kernels.
    weak = [g == "hwio" and _long_oihw(t.array.shape) for t, g in zip(tensors, guesses, strict=True)]
    if layout == "auto":
        n_oihw, n_hwio = guesses.count("oihw"), guesses.count("hwio") - sum(weak)
        if n_oihw + n_hwio == 0:
            n_hwio = sum(weak)
        majority = "hwio" if n_hwio > n_oihw else "oihw"
    out: list[tuple[int, str]] = []
    for i, ((_, arr, _), guess) in enumerate(zip(tensors, guesses, strict=True)):
        if guess == "stated":
            out.append((i, "oihw"))
            continue
        if arr.ndim == 2 and include_linear:
            if min(arr.shape) >= 2:  # orientation is irrelevant: balancing and pooling treat rows and columns alike
                out.append((i, "oihw"))
            continue
        if guess is None:
            continue
        read = layout if layout != "auto" else (majority if guess == "both" or weak[i] else guess)
        if layout != "auto" and guess not in (read, "both") and not weak[i]:
            continue  # a tensor that cannot be a kernel in the forced layout
        out.append((i, read))
    return out


def conv_layer(arr: np.ndarray, read: str) -> np.ndarray:
    """One layer of ``conv_plan``: ``arr`` itself for 'oihw', an (out, in, ...) contiguous copy for 'hwio'."""
    if read != "hwio":
        return arr
    ks = arr.ndim - 2
    return np.ascontiguousarray(np.moveaxis(arr, (ks + 1, ks), (0, 1)))  # (..., in, out) -> (out, in, ...)


def kernel_shape(arr: np.ndarray, read: str) -> tuple[int, ...]:
    """The kernel shape ``conv_layer(arr, read)`` will have (its dims after (out, in)), without making it."""
    return tuple(arr.shape[: arr.ndim - 2] if read == "hwio" else arr.shape[2:])


# Kernel norms are summed in float32 (fast, and the values every existing code was made with) unless a squared
# norm leaves the range where float32 sums are accurate: over it the squares overflow (a kernel of values
# 1e20), under it they underflow (values 1e-23 square to 0, and the kernel would pass for pruned). Those
# kernels are summed again in float64, where the square of any finite float32 is a normal number.
_SQ_MIN = 2.0**-100  # squared norms below this (~8e-31) may have lost bits to float32 underflow
_F32_TINY = float(np.finfo(np.float32).tiny)


# The largest float32 squared norm the balancing takes as it is (codec.chain._block_factors works in float32 where
# every squared norm lies in [_SQ_MIN, _SQ_MAX32))
_SQ_MAX32 = 1e37


def kernel_sq_norms(w: np.ndarray, float32_ok: bool = False) -> np.ndarray:
    """Squared norms of the kernels of an (out, in, k) float32 layer as float64 (out, in), accurate for any
    finite float32 values: a function-preserving rescaling by 1e30 or 1e-30 gives the rescaled norms.
    ``float32_ok``: return the float32 sums themselves (the same numbers, not widened) when every one lies in
    [_SQ_MIN, _SQ_MAX32), where float32 holds them exactly as float64 would (any trained layer without zero
    kernels); the float64 array otherwise."""
    with np.errstate(over="ignore", under="ignore"):
        if w.shape[2] == 1:  # one tap: the square itself (what the sum of one product is, bit for bit)
            sq32 = np.square(w[:, :, 0])
        else:
            sq32 = np.einsum("oik,oik->oi", w, w)
    if float32_ok and sq32.size and _SQ_MIN <= float(sq32.min()) and float(sq32.max()) < _SQ_MAX32:
        return sq32
    sq = sq32.astype(np.float64)
    redo = ~(sq >= _SQ_MIN) | ~np.isfinite(sq)  # includes exact zeros, which float64 keeps at zero
    if redo.any():
        w64 = w[redo].astype(np.float64)
        sq[redo] = np.einsum("nk,nk->n", w64, w64)
    return sq


def _balance(w: np.ndarray, sweeps: int, inplace: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(balanced float32 layer without all-zero rows/columns, its kernels' non-zero mask); ``inplace`` lets
    it scale ``w`` itself when no row or column had to be removed."""
    norms = np.sqrt(kernel_sq_norms(w))
    rows = norms.max(axis=1) > 0
    cols = norms.max(axis=0) > 0
    if not rows.all() or not cols.all():
        w, norms = w[rows][:, cols], norms[rows][:, cols]
    mask = norms > 0
    if w.size == 0:
        return np.zeros((0, 0, w.shape[2]), dtype=np.float32), mask
    # The (out, in) temporaries are reused in place (a layer of 3x3 kernels has 2/9 of its bytes in each
    # float64 one); every value is computed by the same operation on the same operands as a fresh array.
    logn = np.where(mask, norms, 1.0)
    del norms
    np.log(logn, out=logn)
    if mask.all():
        row = logn.mean(axis=1)
        logn -= row[:, None]
        col = logn.mean(axis=0)
    else:
        row = np.zeros(w.shape[0])
        col = np.zeros(w.shape[1])
        cnt_r = mask.sum(axis=1)
        cnt_c = mask.sum(axis=0)
        logn[~mask] = 0.0
        tmp = np.empty_like(logn)
        for _ in range(sweeps):  # alternating masked means; converges in a few sweeps on pruning patterns
            np.multiply(mask, col[None, :], out=tmp)
            row = np.subtract(logn, tmp, out=tmp).sum(axis=1) / cnt_r
            np.multiply(mask, row[:, None], out=tmp)
            new_col = np.subtract(logn, tmp, out=tmp).sum(axis=0) / cnt_c
            done = np.abs(new_col - col).max() < 1e-9
            col = new_col
            if done:
                break
        del tmp
    del logn
    # log-norms of finite float32 kernels lie within about +-104, so these exponentials are finite in float64
    scale64 = np.exp(-row)[:, None] * np.exp(-col)[None, :]
    with np.errstate(over="ignore"):  # checked just below
        scale = scale64.astype(np.float32)
    if not (np.isfinite(scale).all() and scale.min() >= _F32_TINY):
        # The scale of a kernel is about 1 / its norm, which float32 cannot hold for norms near the ends of its
        # range (1/1e-40 overflows); the product itself is about 1, so form it in float64 and round once.
        return (w * scale64[:, :, None]).astype(np.float32), mask
    del scale64
    if inplace and w.flags.writeable and w.dtype == np.float32:
        w *= scale[:, :, None]
        return w, mask
    return w * scale[:, :, None], mask


def balance(w: np.ndarray, sweeps: int = 30) -> np.ndarray:
    """Divide out every per-row and per-column positive scale of a (out, in, k) layer.

    All-zero filters and input channels (structured pruning leaves them) are removed first. Kernel log-norms
    are double-centred; with pruned (all-zero) kernels inside, the masked additive model is fitted by a few
    alternating sweeps. Returns float32 values.
    """
    return _balance(w, sweeps)[0]


PRUNE_RULES = ("relative", "quantile")
Pool = tuple[tuple[int, ...], list[np.ndarray]]  # (kernel shape, blocks of (n_i, prod(kernel shape)) kernels)


def important_kernels(w: np.ndarray, prune: float, rule: str = "relative") -> np.ndarray:
    """Balance an (out, in, *kernel shape) layer, magnitude-prune it ourselves, balance the survivors again,
    and return its non-zero kernels as an (n, k) float32 array, k = prod(kernel shape).

    Compression theory says the small weights do not matter; dropping them here means an attacker's
    magnitude pruning removes (nearly) nothing we look at. Rule 'quantile' drops the fraction ``prune`` of
    the layer's smallest |w|; rule 'relative' drops |w| <= prune / 0.9 * (90th percentile of |w|), which is
    the fraction ``prune`` of a uniform (freshly initialized) layer, and which an attacker's pruning of up
    to ~90 % of the weights does not move. Re-balancing on the survivors makes the balancing itself
    independent of the small weights.
    """
    b, mask = _balance(w.reshape(w.shape[0], w.shape[1], -1), 30)
    if prune > 0 and b.size:
        b = np.ascontiguousarray(b)  # pruned and compacted in place below, through flat views
        values = b.reshape(-1)
        if rule == "quantile":
            n_cut = int(prune * values.size)
            thr = _kth_abs(values, n_cut - 1) if n_cut > 0 else -1.0
        else:  # relative to the 90th percentile, which pruning the small weights does not move
            i90 = min(values.size - 1, int(0.9 * values.size))
            thr = prune / 0.9 * _kth_abs(values, i90)
        for s in range(0, values.size, _CHUNK):
            part = values[s : s + _CHUNK]
            part *= np.abs(part) > thr
        del values, part
        b, mask = _balance(b, 30, inplace=True)
    flat = b.reshape(-1, b.shape[2])
    if mask.all():
        return flat
    if not flat.flags.c_contiguous or not flat.flags.writeable:
        return flat[mask.ravel()]
    # Compact the kept rows to the front in place, in chunks: row j takes row idx[j] >= j, and a chunk only
    # overwrites rows that no later chunk reads. The result is a prefix view of b: no second layer-sized array.
    idx = np.flatnonzero(mask.ravel())
    rows = max(1, _CHUNK // max(1, flat.shape[1]))
    for j in range(0, len(idx), rows):
        src = idx[j : j + rows]
        flat[j : j + len(src)] = flat[src]
    return flat[: len(idx)]


_CHUNK = 1 << 18  # values per temporary in the chunked passes of important_kernels


def _kth_abs(values: np.ndarray, k: int) -> np.floating:
    """``np.partition(np.abs(values), k)[k]`` of a flat finite float32 array, with chunk-sized temporaries
    instead of a copy of the whole layer: |x| of a float32 orders like its bit pattern, so a histogram of the
    top 16 bits finds the bucket holding rank ``k`` and only that bucket's values are partitioned."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    for s in range(0, values.size, _CHUNK):
        counts += np.bincount(np.abs(values[s : s + _CHUNK]).view(np.uint32) >> 16, minlength=1 << 16)
    cum = np.cumsum(counts)
    bucket = int(np.searchsorted(cum, k, side="right"))  # the first bucket with more than k values at or below it
    below = int(cum[bucket - 1]) if bucket else 0
    picked = []
    for s in range(0, values.size, _CHUNK):
        a = np.abs(values[s : s + _CHUNK])
        picked.append(a[(a.view(np.uint32) >> 16) == bucket])
    inside = np.concatenate(picked)
    return np.partition(inside, k - below)[k - below]


def kernel_pools(layers: Sequence[tuple[tuple[int, ...], np.ndarray]]) -> list[Pool]:
    """Group (kernel shape, (n, k) kernels) per layer by kernel shape, ordered by (size, shape).

    A pool is an unordered multiset (everything computed from it is a symmetric function of its rows), so
    neither layer order, tensor names nor channel order can matter.
    """
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for kshape, v in layers:
        if len(v):
            by_shape.setdefault(tuple(kshape), []).append(v)
    if not by_shape:
        raise ModelFormatError("no non-zero convolution kernels")
    return [(ks, by_shape[ks]) for ks in sorted(by_shape, key=lambda ks: (int(np.prod(ks)), ks))]


def cap_pool(blocks: Sequence[np.ndarray], max_kernels: int) -> list[np.ndarray]:  # blocks of one pool
    """Keep the ``max_kernels`` largest-norm kernels of a pool (all kernels tied with the last one too).

    Selecting by a threshold, not by position, keeps the choice independent of storage order. Only large
    models hit the cap; it bounds the cost of the moment computation (about 2,500 flops per kernel).
    """
    n = sum(len(b) for b in blocks)
    if n <= max_kernels:
        return list(blocks)
    norms = [np.einsum("nk,nk->n", b, b) for b in blocks]
    allnorms = np.concatenate(norms)
    thr = np.partition(allnorms, n - max_kernels)[n - max_kernels]
    return [b[nb >= thr] for b, nb in zip(blocks, norms, strict=True)]


def capped_pools(layers: Iterable[tuple[tuple[int, ...], np.ndarray]], max_kernels: int) -> list[Pool]:
    """``cap_pool`` of every pool of ``kernel_pools(layers)``, the same arrays, in one pass over ``layers``
    (an iterable: each layer's kernels can be made, taken and dropped in turn) that keeps only about
    ``max_kernels`` kernels of each pool alive, not every layer's.

    After each layer a pool over the cap keeps its kernels with norm >= its ``max_kernels``-th largest norm so
    far. That drops no kernel the final cap keeps: one dropped had ``max_kernels`` larger ones in the pool, so
    the whole model's threshold is above it. The kept rows keep their order and their norms (computed once on
    the layer's block, as ``cap_pool`` does), and the final cut uses the same threshold as ``cap_pool``.
    """
    by_shape: dict[tuple[int, ...], tuple[list[np.ndarray], list[np.ndarray]]] = {}
    seen: dict[tuple[int, ...], int] = {}
    for kshape, v in layers:
        if not len(v):
            continue
        ks = tuple(kshape)
        blocks, norms = by_shape.setdefault(ks, ([], []))
        blocks.append(v)
        norms.append(np.einsum("nk,nk->n", v, v))
        seen[ks] = seen.get(ks, 0) + len(v)
        if seen[ks] > max_kernels:
            _cut(blocks, norms, max_kernels)
        del v
    if not by_shape:
        raise ModelFormatError("no non-zero convolution kernels")
    return [(ks, by_shape[ks][0]) for ks in sorted(by_shape, key=lambda ks: (int(np.prod(ks)), ks))]


def _cut(blocks: list[np.ndarray], norms: list[np.ndarray], max_kernels: int) -> None:
    """Keep, in place, the kernels of ``blocks`` with norm >= the ``max_kernels``-th largest of ``norms``."""
    n = sum(len(nb) for nb in norms)
    if n <= max_kernels:
        return
    thr = np.partition(np.concatenate(norms), n - max_kernels)[n - max_kernels]
    for j, (b, nb) in enumerate(zip(blocks, norms, strict=True)):
        keep = nb >= thr
        if not keep.all():
            blocks[j], norms[j] = b[keep], nb[keep]
