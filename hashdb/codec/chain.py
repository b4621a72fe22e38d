"""The chain codecs (v3-v7): canonical channel descriptors propagated from the input, and random Fourier sketches.

Why: statistics of pooled kernels (codec v2) describe the architecture and the training data; by the law of
large numbers independently trained models of one architecture converge to the same statistics, more so the
wider they are. Identity lives in the specific weights and in how layers connect. So:

1. **Chain** (``plan_chain``): each convolution's input channels are some earlier layer's output channels.
   Layers are ordered with the data roots first (a layer whose input width no layer produces, or <= 4
   channels: the data's own channels, which nobody can permute), then by natural order of tensor names;
   a layer's producer is the nearest earlier layer whose output width equals its input width (grouped and
   depthwise convolutions: a multiple). Storage order and name spelling beyond their order do not matter.
2. **Balance** (``sinkhorn_balance``): every positive per-output and per-input-channel scale (a ReLU net's
   function-preserving rescaling, BatchNorm folding, a per-layer scale) is divided out by scaling the
   squared kernel-norm matrix to unit row sums (Sinkhorn-Knopp); a channel permutation only permutes the
   result. Energy-weighted, so tiny weights (pruned, near-identity padding) cannot dominate.
3. **Descriptors** (``descriptors``): channel i of the producer has a unit vector d_i in R^m, in coordinates
   fixed by the data (the data roots' input channels get fixed vectors). Output channel o of a layer gets
   d_o = normalize(sum_{i, s} W[o, i, s] P_s d_i), with P_s a fixed random m x m map per kernel tap (the
   centre tap's is the identity, so 1x1 and identity layers pass descriptors through). It is invariant to the
   producer's channel order and scale, and equivariant to the layer's own output order: canonical.
4. **Sketch** (``sketch_and_propagate``): a layer's descriptor set is whitened (its own mean and covariance) and
   summed through K random Fourier features sin(omega <g_k, x>). The expected value of an odd feature is ~0
   for any distribution of descriptors (symmetry, and the decay of the characteristic function), so the sum is
   a random walk over the model's own channels, not a law-of-large-numbers mean: independent models get
   independent sketches at any width, while a copy, whose descriptors moved by a small angle, keeps its
   phases.
5. **Pass-through** (``channel_pass``): a layer that is a channel permutation plus small noise after balancing
   (an inserted near-identity layer) gets no sketch; its consumers read its producer's descriptors, permuted.
   A near-identity square 1x1 is placed right after the layer it follows in name order (taking over that
   layer's consumers) and composed into it (a split conv W -> A^-1 W, A hashes as W).
6. **Code**: the layer sketches are summed (each normalised by sqrt of its channel count) and bit k is the
   sign of feature k.

Codec v4 (``chain-sketch-4``, ChainConfig(centre=True, sweeps=6, single=True), dim 96) is the same pipeline with
each filter centred before its descriptors are made, descriptors of dimension 96 (v3: 32), and the arithmetic
made cheap enough to pay for them: balancing keeps each block's scale as a row factor times a column factor and
sweeps in float32 (6 sweeps after the exact double centring), descriptors are one matrix product per group (a dense
layer's balancing folded into it, the balanced layer never formed), and whitening, phases (64 features at a time)
and sines run in float32; each layer's sketch counts (1 + max(depth, 1))^-0.75 in the model's code (deep layers
carry every earlier layer's change). Measured in docs/codec.md ("Codec v4").

Codec v5 (``chain-sketch-5``, v4 with ``shrink`` 0.35) soft-thresholds each layer's balanced weights before its
descriptors are made (``shrink_small``): every |w| loses 0.35 x the layer's 90th percentile of |w|, and what is
smaller becomes 0. The weights that magnitude pruning removes then count for (almost) nothing in the original as
in the copy, so a pruned copy keeps its code. Continuous in the weights, unlike zeroing them (``prune``), so a
fine-tune still moves the code a little. Measured in docs/codec.md ("Codec v5").

Codec v6 (``chain-sketch-6``) is v5 with the threshold taken from the shape instead of the weights: 0.6 x each
live filter's RMS weight, 1 / sqrt(fan-in) since balancing gives every filter unit energy (``rms_threshold``). The
same codes' quality for about a seventh less hashing time: no percentile to find, each layer formed once. Measured
in docs/codec.md ("Codec v6").

Codec v7 (``chain-sketch-7``, the default) is v6 with each channel weighed by its importance to the function
(``channel_importance``, to the power ``importance`` 0.75) in its layer's sketch and on the descriptor it hands
on: 1 / (a_i b_i), a_i its filter's balancing row factor and b_i its consumers' balancing column factors, which a
function-preserving rescaling leaves unchanged. BatchNorm is folded in at load time (codec.batchnorm), so a
filter's norm means what it means to the function. A filter prune removes the least important filters, which
then weigh least. Each layer's consumers are made and balanced ahead of it (once; they are reused at their
turn); pass-through layers are looked through, and a split conv's consumers read as composed. Measured in
docs/codec.md ("Codec v7").
"""

from __future__ import annotations

import collections
import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ModelFormatError


def natural_key(name: str) -> tuple:
    """Sort key reading digit runs as numbers: features.2 < features.10, conv2d_2 < conv2d_10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)


@dataclass(frozen=True)
class ChainLayer:
    """One layer of the chain: ``index`` into the plan, its (out, in per group, kernel shape), its producer
    (another ChainLayer's position in the chain order, or None for a data root) and its group count."""

    index: int
    name: str
    out: int
    in_per_group: int
    kshape: tuple[int, ...]
    producer: int | None
    groups: int


DATA_CHANNELS = 4  # a layer reading at most this many channels reads the data (grey, RGB, RGBA): canonical


def plan_chain(layers: Sequence[tuple[str, int, int, tuple[int, ...]]]) -> list[ChainLayer]:
    """Order (name, out, in per group, kernel shape) layers and find each one's producer.

    Returns the layers in processing order (every producer before its consumers) with ``index`` their position
    in ``layers``. Only names and shapes are used, never storage order. Data roots: the first layer (natural
    name order) reading at most 4 channels (grey, RGB, RGBA: later such layers are depthwise or grouped
    convolutions when some layer can feed them), and any layer whose input width no layer produces.
    """
    widths = collections.Counter(out for _, out, _, _ in layers)  # output width -> how many layers have it

    def fed(j: int, exactly: bool = False) -> bool:  # another layer's output could be this layer's input
        _, out, in_g, _ = layers[j]
        return any(
            n > (o == out) and (_exact_groups(o, out, in_g) or (not exactly and _multiple_groups(o, out, in_g)))
            for o, n in widths.items()
        )  # (a width ``out`` counts when a layer besides this one has it)

    by_name = sorted(range(len(layers)), key=lambda j: (natural_key(layers[j][0]), j))
    # layers reading at most 4 channels: the data root is one no layer can feed, else one no layer feeds
    # exactly (a narrow hidden layer or a grouped conv of 4 channels per group is fed), then by name
    small = sorted((j for j in by_name if layers[j][2] <= DATA_CHANNELS), key=lambda j: (fed(j), fed(j, True)))
    if not small:  # wider data (8 rows of a digit, 80 mel bands): the first layer no layer feeds exactly
        small = [j for j in by_name if not fed(j, True)]
    roots = set(small[:1]) | {j for j in range(len(layers)) if not fed(j)}
    order = sorted(range(len(layers)), key=lambda j: (j not in roots, natural_key(layers[j][0]), j))

    # Each layer takes the first candidate producer that closes no cycle, so the producers form a forest.
    producer_of: dict[int, tuple[int | None, int]] = {}
    consumed: set[int] = set()  # layers some layer took as its producer: only these can close a cycle

    def ancestors(q: int | None) -> Iterator[int]:
        while q is not None:
            yield q
            q = producer_of.get(q, (None, 1))[0]

    for pos, j in enumerate(order):
        _, out, in_g, _ = layers[j]
        producer_of[j] = (None, 1)
        if j in roots:
            continue
        for producer, groups in _producers(out, in_g, order, pos, layers):
            # a layer no layer reads yet has no descendants: no walk up a chain as long as the model
            if j not in consumed or j not in ancestors(producer):
                producer_of[j] = (producer, groups)
                consumed.add(producer)
                break

    # Processing order: a producer found among later layers is placed before its consumer.
    result: list[ChainLayer] = []
    placed: dict[int, int] = {}

    for j in order:  # j after its unplaced producers, placed from the top (a loop: chains may be long)
        pending: list[int] = []
        q: int | None = j
        while q is not None and q not in placed:
            pending.append(q)
            q = producer_of[q][0]
        for q in reversed(pending):
            prod, groups = producer_of[q]
            name, out, in_g, ks = layers[q]
            placed[q] = len(result)
            result.append(ChainLayer(q, name, out, in_g, ks, None if prod is None else placed[prod], groups))
    return result


def _producers(
    out: int, in_g: int, order: Sequence[int], pos: int, layers: Sequence[tuple[str, int, int, tuple]]
) -> Iterator[tuple[int, int]]:
    """Candidate (producer, groups) for the layer at ``order[pos]`` in preference order: among earlier layers,
    then among later ones, the nearest whose width is this layer's input width (or, for a depthwise layer, its
    output width), then the nearest whose width is a multiple g of the input width that divides this layer's
    output (a grouped or channel-multiplier depthwise conv). The first that closes no cycle is taken: where
    names do not sort in execution order (c0, c2, dw), widths still tell which layer can feed which. Made as
    they are read: the nearest is nearly always the first, and lists of every other layer made planning
    quadratic in the layer count."""
    for candidates in (range(pos - 1, -1, -1), range(pos + 1, len(order))):
        for q in candidates:
            groups = _exact_groups(layers[order[q]][1], out, in_g)
            if groups:
                yield order[q], groups
        for q in candidates:
            groups = _multiple_groups(layers[order[q]][1], out, in_g)
            if groups:
                yield order[q], groups


def _exact_groups(width: int, out: int, in_g: int) -> int | None:
    """The groups of a layer reading ``in_g`` channels per group into ``out`` when a layer ``width`` wide feeds
    it exactly: 1 when ``width`` is its input width, ``out`` for a depthwise layer as wide as its producer."""
    if width == in_g:
        return 1
    if in_g == 1 and width == out > 1:
        return out
    return None


def _multiple_groups(width: int, out: int, in_g: int) -> int | None:
    """The groups g when ``width`` is a multiple g of the input width that divides ``out`` (a grouped or a
    channel-multiplier depthwise conv)."""
    if width != in_g and width % in_g == 0 and out % (width // in_g) == 0:
        return width // in_g
    return None


def sinkhorn_balance(w: np.ndarray, groups: int = 1, sweeps: int = 30, single: bool = False) -> np.ndarray:
    """Scale an (out, in per group, k) layer so that every output channel has unit energy and every input
    channel the same energy (Sinkhorn-Knopp on the squared kernel norms); all-zero rows and columns stay zero.
    Returns float32 (one layer-sized array: the scales are found on the (out, in) norm matrix in float64).

    Each group of a grouped convolution is its own block (its rows read only its input channels). The sweeps
    start from an exact closed-form cancellation of row and column scales (kernel log-norms double centred),
    and their number is fixed, so any positive row and column scaling of ``w`` and any permutation of rows and
    of input channels gives the same (permuted) result whether or not the sweeps have converged (pruned layers
    without total support converge slowly). The energy weighting is what keeps a near-identity layer near the
    identity: its tiny off-diagonal noise cannot be blown up to the diagonal's weight.

    ``single`` (codec v4) runs the sweeps in float32: they are matrix-vector passes over the (out, in) matrix, so
    memory-bound, and the scales they refine need no more than float32's precision.
    """
    from .select import kernel_sq_norms

    out, in_g, _ = w.shape
    rows_g = out // groups
    if single:
        return balanced(w, groups, sweeps).array()
    sq = kernel_sq_norms(np.ascontiguousarray(w, dtype=np.float32))  # float64, exact for any finite float32
    log_scale = np.full((out, in_g), -np.inf)
    for g in range(groups):
        rows = slice(g * rows_g, (g + 1) * rows_g)
        log_scale[rows] = _block_log_scale(sq[rows], sweeps)
    with np.errstate(under="ignore", over="ignore"):
        scale = np.exp(log_scale)  # 0 for dead rows/columns
    return _apply_scale(w, scale)


def _apply_scale(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``w`` (out, in, k) times its (out, in) float64 kernel scales, in float32; where a scale float32 cannot
    hold (norms near its range's ends) the product is formed in float64 and rounded once."""
    with np.errstate(under="ignore", over="ignore"):
        scale32 = scale.astype(np.float32)
    live = scale > 0
    if not (np.isfinite(scale32).all() and (scale32[live] >= np.finfo(np.float32).tiny).all()):
        return (w.astype(np.float64) * scale[:, :, None]).astype(np.float32)
    return w * scale32[:, :, None]


@dataclass(frozen=True)
class Balanced:
    """A balanced (out, in per group, k) layer: ``w`` itself, or (codec v4, dense layers) the raw weights ``w``
    times ``row[o] col[i]``, float64 factors that balancing found, kept apart so that the descriptors can fold them
    into their inputs (``descriptors_gemm``) and the layer-sized product is formed only where it is needed."""

    w: np.ndarray
    row: np.ndarray | None = None
    col: np.ndarray | None = None
    # a dense layer's (row, column) balancing factors, kept even where they were applied to ``w`` (extreme scales):
    # what codec v7's channel importance reads (``channel_importance``)
    factors: tuple[np.ndarray, np.ndarray] | None = None

    def array(self) -> np.ndarray:
        """The balanced layer, float32."""
        return self.w if self.row is None or self.col is None else _scaled(self.w, self.row, self.col)

    def tap(self, s: int) -> np.ndarray:
        """The (out, in per group) weights of kernel tap ``s``, balanced."""
        if self.row is None or self.col is None:
            return self.w[:, :, s]
        return _scaled(self.w[:, :, s : s + 1], self.row, self.col)[:, :, 0]


def balanced(w: np.ndarray, groups: int, sweeps: int) -> Balanced:
    """sinkhorn_balance for codec v4: the same balancing with each block's scale kept as a row factor times a
    column factor (the double centring and the sweeps are both such products), so no (out, in) matrix of
    logarithms and exponentials is formed; the sweeps run in float32. A dense layer's factors are kept apart
    (``Balanced``) when they are moderate numbers (any trained layer), so the balanced layer need not be formed.
    A depthwise layer's blocks are single kernels, each scaled to unit norm at once."""
    from .select import kernel_sq_norms

    out, in_g, _ = w.shape
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    if groups == 1:  # the common case: the product of the factors, never an (out, in) float64 matrix
        # float32 norms where they are the numbers float64 would hold (any trained layer), else float64
        a, b = _block_factors(kernel_sq_norms(w32, float32_ok=True), sweeps)
        live_a, live_b = a[a > 0], b[b > 0]
        if len(live_a) and len(live_b) and all(1e-15 < v.min() and v.max() < 1e15 for v in (live_a, live_b)):
            return Balanced(w32, a, b, (a, b))
        return Balanced(_scaled(w, a, b), factors=(a, b))
    sq = kernel_sq_norms(w32)  # float64, exact for any finite float32
    if in_g == 1:  # depthwise: one kernel per block, which balancing divides by its norm
        with np.errstate(divide="ignore"):
            return Balanced(_apply_scale(w, np.where(sq > 0, 1.0 / np.sqrt(np.where(sq > 0, sq, 1.0)), 0.0)))
    rows_g = out // groups
    scale = np.empty((out, in_g))
    for g in range(groups):
        rows = slice(g * rows_g, (g + 1) * rows_g)
        a, b = _block_factors(sq[rows], sweeps)
        scale[rows] = a[:, None] * b[None, :]
    return Balanced(_apply_scale(w, scale))


def _scaled(w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``w`` (out, in, k) times a[o] b[i], in float32 when every product is a normal float32 number."""
    factor = _float32_factors(a, b)
    if factor is not None:
        with np.errstate(under="ignore"):
            return w * factor
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        scale = a[:, None] * b[None, :]
        scale[~np.isfinite(scale)] = 0.0
        return (w.astype(np.float64) * scale[:, :, None]).astype(np.float32)


def _float32_factors(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """The (out, in, 1) float32 products a[o] b[i] that ``_scaled`` multiplies by, or None where one of them
    would not be a normal float32 number (then it works in float64)."""
    f32 = np.finfo(np.float32)
    pos_a, pos_b = a[a > 0], b[b > 0]
    if (
        len(pos_a) and len(pos_b) and np.isfinite(a).all() and np.isfinite(b).all()
        and pos_a.max() * pos_b.max() < f32.max and pos_a.min() * pos_b.min() > 4 * f32.tiny
        and pos_a.max() < f32.max and pos_b.max() < f32.max and pos_a.min() > f32.tiny and pos_b.min() > f32.tiny
    ):
        with np.errstate(under="ignore"):
            return (a.astype(np.float32)[:, None] * b.astype(np.float32)[None, :])[:, :, None]
    return None


def _masked_centres(values: np.ndarray, mask: np.ndarray, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column effects of a two-way additive fit to ``values`` over the ``mask``ed entries (alternating
    masked means, at most ``rounds``, until the columns move less than 1e-12; one round is exact when every live
    row meets every live column): the double centring that cancels row and column scales of log-norms."""
    cnt_r, cnt_c = np.maximum(mask.sum(axis=1), 1), np.maximum(mask.sum(axis=0), 1)
    row = np.zeros(values.shape[0])
    col = np.zeros(values.shape[1])
    for _ in range(rounds):
        row = ((values - col[None, :]) * mask).sum(axis=1) / cnt_r
        new_col = ((values - row[:, None]) * mask).sum(axis=0) / cnt_c
        done = np.abs(new_col - col).max() < 1e-12
        col = new_col
        if done:
            break
    return row, col


def _block_factors(sq: np.ndarray, sweeps: int) -> tuple[np.ndarray, np.ndarray]:
    """(row factors, column factors) of one block's kernel scales (``_block_log_scale``'s exp, as a product):
    the closed-form double centring of the log squared norms, then ``sweeps`` float32 Sinkhorn sweeps. Where
    every norm is a normal float32 number (any trained layer) the logarithms are float32 too. ``sq``: the
    squared norms, float64, or float32 (``kernel_sq_norms(float32_ok=True)``: then it is overwritten)."""
    lo, hi = float(sq.min()), float(sq.max())
    if hi <= 0:
        return np.zeros(sq.shape[0]), np.zeros(sq.shape[1])
    full = lo > 0
    if full:
        narrow = np.float32 if lo > 1e-37 and hi < 1e37 else np.float64
        sq_narrow = sq if sq.dtype == narrow else sq.astype(narrow)
        log_sq = np.log(sq_narrow)
        rows_live: np.ndarray = np.ones(sq.shape[0], bool)
        cols_live: np.ndarray = np.ones(sq.shape[1], bool)
        row = log_sq.mean(axis=1)
        col = log_sq.mean(axis=0) - row.mean()
        # squared norms after centring: sq / (exp(row) exp(col)), a product where float32 holds every step of it
        e = _centred(sq_narrow, row, col, lo, hi) if narrow is np.float32 else None
    else:
        mask = sq > 0
        log_sq = np.log(np.where(mask, sq, 1.0))
        rows_live, cols_live = np.asarray(mask.any(axis=1)), np.asarray(mask.any(axis=0))
        row, col = _masked_centres(log_sq, mask, 200)
        e = None
    if e is None:
        log_sq -= row[:, None]
        log_sq -= col[None, :]
        with np.errstate(over="ignore", under="ignore"):
            e = np.exp(log_sq, out=log_sq).astype(np.float32, copy=False)
        if not full:
            e[~mask] = 0
    r = np.ones(sq.shape[0], dtype=np.float32)
    c = np.ones(sq.shape[1], dtype=np.float32)
    col_target = np.float32(rows_live.sum() / cols_live.sum())
    for _ in range(sweeps):
        r = _reciprocal(np.float32(1), e @ c)
        c = _reciprocal(col_target, r @ e)
    r = _reciprocal(np.float32(1), e @ c)  # end on exact unit row energies
    row64, col64 = np.asarray(row, np.float64), np.asarray(col, np.float64)
    with np.errstate(over="ignore"):
        return np.exp(-row64 / 2) * np.sqrt(r.astype(np.float64)), np.exp(-col64 / 2) * np.sqrt(c.astype(np.float64))


def _reciprocal(top: np.floating, sums: np.ndarray) -> np.ndarray:
    """top / sums where sums > 0, else 0 (a dead row or column of a Sinkhorn sweep)."""
    if sums.size and sums.min() > 0:  # the common case: every row and column is live
        return top / sums
    return np.divide(top, sums, out=np.zeros_like(sums), where=sums > 0)


def _centred(sq: np.ndarray, row: np.ndarray, col: np.ndarray, lo: float, hi: float) -> np.ndarray | None:
    """float32 sq[o, i] exp(-row[o]) exp(-col[i]) for a block of float32 squared norms in [lo, hi] (all
    positive), computed in place as float32 products; None where a step of it could leave float32's normal
    range (the caller then takes exponentials of the centred logarithms)."""
    a, b = np.exp(-row.astype(np.float64)), np.exp(-col.astype(np.float64))
    a_lo, a_hi, b_lo, b_hi = float(a.min()), float(a.max()), float(b.min()), float(b.max())
    if not (1e-30 < a_lo and a_hi < 1e30 and 1e-30 < b_lo and b_hi < 1e30
            and 1e-30 < lo * a_lo * min(b_lo, 1.0) and hi * a_hi * max(b_hi, 1.0) < 1e30):  # fmt: skip
        return None
    sq *= a.astype(np.float32)[:, None]
    sq *= b.astype(np.float32)[None, :]
    return sq


def _block_log_scale(sq: np.ndarray, sweeps: int) -> np.ndarray:
    """log of the per-kernel scale of one group block from its squared norms: closed-form double centring of
    the log-norms (masked alternating means where kernels are zero), then ``sweeps`` Sinkhorn sweeps."""
    mask = sq > 0
    out = np.full(sq.shape, -np.inf)
    if not mask.any():
        return out
    logn = 0.5 * np.log(np.where(mask, sq, 1.0))
    rows_live, cols_live = mask.any(axis=1), mask.any(axis=0)
    row, col = _masked_centres(logn, mask, 1 if mask[rows_live][:, cols_live].all() else 200)
    e = np.where(mask, np.exp(2 * (logn - row[:, None] - col[None, :])), 0.0)  # squared norms after centring
    r = np.ones(sq.shape[0])
    c = np.ones(sq.shape[1])
    col_target = rows_live.sum() / cols_live.sum()
    for _ in range(sweeps):
        rs = e @ c
        r = np.divide(1.0, rs, out=np.zeros_like(rs), where=rs > 0)
        cs = r @ e
        c = np.divide(col_target, cs, out=np.zeros_like(cs), where=cs > 0)
    rs = e @ c  # end on exact unit row energies
    r = np.divide(1.0, rs, out=np.zeros_like(rs), where=rs > 0)
    with np.errstate(divide="ignore"):
        out[:] = -row[:, None] - col[None, :] + 0.5 * (np.log(r)[:, None] + np.log(c)[None, :])
    out[~mask] = np.where(np.isfinite(out[~mask]), out[~mask], -np.inf)
    return out


# A layer is a pass-through (``channel_pass``) when, after balancing, each output channel's centre-tap weight on
# one input channel (a permutation of them) is at least PASS_DOMINANCE times the channel's next largest weight
# (median over channels) and those weights hold at least PASS_SHARE of the layer's energy. Measured
# (bench/obfuscation_bench.py --measure, docs/codec.md): the 676 square and depthwise layers of 242 trained null
# library models have median dominance at most 1.36 and share at most 0.34 (1 of 535 dense ones forms a
# permutation, by chance at 16 channels); an
# inserted identity with 1 % noise has dominance 25-62 and share 0.52-1.0 (16..1024 channels, 1x1 and 3x3),
# one with 5 % noise dominance 5-12, the 1x1 half of the benchmark's split conv (I + 0.5 G / sqrt(C)) 3.6-19.
PASS_DOMINANCE = 3.0
PASS_SHARE = 0.5


def channel_pass(
    b: np.ndarray | Balanced, groups: int, kshape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray] | None:
    """(source input channel, sign) of every output channel when the balanced (out, in per group, k) layer is a
    signed channel permutation (a square dense layer) or a per-channel map (a depthwise layer) at its centre tap
    plus small noise, else None. Such a layer (an inserted near-identity layer, Neural Structural Obfuscation)
    carries no identity of its own: its consumers get its producer's descriptors, permuted as it permutes.
    Invariant to the positive scales and the permutations balancing already cancels. Costs one (out, in)
    pass for layers that are no permutation (every trained layer measured), one layer-sized pass otherwise."""
    layer = b if isinstance(b, Balanced) else Balanced(b)
    out, in_g, k = layer.w.shape
    if not all(d % 2 for d in kshape):
        return None  # an even kernel has no centre tap: no shift-free identity
    centre = int(np.ravel_multi_index(tuple(d // 2 for d in kshape), kshape))
    if groups == 1 and out == in_g > 1:
        src = np.abs(layer.tap(centre)).argmax(axis=1)
        if len(np.unique(src)) != out:
            return None
        flat = src * k + centre
    elif groups == out > 1 and in_g == 1:
        src = np.arange(out)
        flat = np.full(out, centre)
    else:
        return None
    rows = layer.array().reshape(out, -1)
    top = rows[np.arange(out), flat].astype(np.float64)
    rest = np.abs(rows)
    rest[np.arange(out), flat] = 0.0
    dominance = np.abs(top) / np.maximum(rest.max(axis=1).astype(np.float64), 1e-300)  # float32 has no 1e-300
    energy = float(np.einsum("ok,ok->", rows, rows, dtype=np.float64))
    if energy <= 0 or np.median(dominance) < PASS_DOMINANCE or float(top @ top) < PASS_SHARE * energy:
        return None
    return src, np.where(top < 0, -1.0, 1.0)


def prune_small(b: np.ndarray, prune: float) -> np.ndarray:
    """Zero the balanced weights with |w| <= prune / 0.9 x the layer's 90th percentile of |w| (the fraction
    ``prune`` of a uniform layer): an attacker's magnitude pruning then removes what is ignored anyway."""
    a = np.abs(b)
    thr = prune / 0.9 * np.partition(a.ravel(), int(0.9 * (a.size - 1)))[int(0.9 * (a.size - 1))]
    return np.where(a > thr, b, 0.0)


def shrink_small(
    b: Balanced | np.ndarray, shrink: float, out: np.ndarray | None = None, by_rms: bool = False
) -> np.ndarray:
    """Codecs v5 and v6: the balanced layer soft-thresholded, sign(w) max(|w| - t, 0). v5: t = ``shrink`` x the
    layer's 90th percentile of |w|. The percentile of a layer whose smallest half was zeroed is the original's, and the
    threshold scales with the layer, so every invariance of the balanced layer holds (a permutation permutes,
    a scale was divided out before). ``b``: the balanced layer, or a ``Balanced`` whose factors are folded in
    here. Written to ``out`` (a C-ordered array of the layer's shape and dtype that shares no memory with the
    layer), else to a new array: the only layer-sized array made. |w| is made in it a block of rows at a time
    and partitioned there to find the percentile; then each block is formed again and thresholded
    (w - clip(w, -t, t) is the soft threshold).

    ``by_rms`` (codec v6): t = ``shrink`` x each live filter's root-mean-square weight, which balancing fixes:
    every live filter has unit energy, so the RMS of its (inputs per group x taps) weights is 1 / sqrt(inputs per
    group x taps), a number of the shape alone (``rms_threshold``). No pass over the layer finds it, and each
    block is formed once. With ``shrink`` < 1 every live filter keeps at least its largest weight."""
    source = b.w if isinstance(b, Balanced) else b
    factor = None
    if isinstance(b, Balanced) and b.row is not None and b.col is not None:
        factor = _float32_factors(b.row, b.col)
        if factor is None:  # extreme factors: formed once in float64 (``_scaled``), then thresholded as it is
            source = _scaled(b.w, b.row, b.col)
    res = np.empty(source.shape, _balanced_dtype(b)) if out is None else out
    step = max(1, (1 << 16) // max(res[0].size, 1)) if len(res) else 1
    blocks = [slice(i, i + step) for i in range(0, len(res), step)]

    def form(rows: slice, dst: np.ndarray) -> np.ndarray:
        if factor is None:
            dst[...] = source[rows]
        else:
            with np.errstate(under="ignore"):
                np.multiply(source[rows], factor[rows], out=dst)
        return dst

    if by_rms:
        thr = res.dtype.type(rms_threshold(res.shape, shrink))
    else:
        for rows in blocks:
            np.abs(form(rows, res[rows]), out=res[rows])
        flat = res.reshape(-1)
        if flat.size == 0:
            return res
        k = int(0.9 * (flat.size - 1))
        flat.partition(k)
        thr = res.dtype.type(shrink) * flat[k]  # in the layer's dtype, whatever numpy's rules for mixed scalars
    formed = np.empty((min(step, len(res)), *res.shape[1:]), res.dtype)
    for rows in blocks:
        part = res[rows]
        block = form(rows, formed[: len(part)])
        np.clip(block, -thr, thr, out=part)
        np.subtract(block, part, out=part)
    return res


def rms_threshold(shape: tuple[int, ...], shrink: float) -> float:
    """Codec v6's soft threshold for a balanced (out, in per group, k) layer: ``shrink`` x each live filter's RMS
    weight, 1 / sqrt(in per group x k) (its filters have unit energy; dead rows and columns make the layer's own
    RMS differ). A Gaussian layer's 90th percentile of |w| is 1.645 x its RMS, so v6's 0.6 is about v5's 0.35
    (0.576) for such a layer; unlike a percentile it needs no pass over the weights."""
    return float(shrink) / float(np.sqrt(max(int(np.prod(shape[1:])), 1)))


def _balanced_dtype(b: Balanced | np.ndarray) -> np.dtype:
    """The dtype of the balanced layer ``b`` stands for (float32 where the factors are folded in)."""
    if isinstance(b, Balanced):
        return np.dtype(np.float32) if b.row is not None and b.col is not None else b.w.dtype
    return b.dtype


class Work:
    """Layer-sized work arrays that one hash reuses from layer to layer: a fresh large array costs page
    faults, which for a layer-sized array cost about as much as the arithmetic codec v5 does in it."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """A C-ordered array of ``shape`` in the storage kept for ``dtype`` (grown as needed), its content
        undefined."""
        n, key = int(np.prod(shape)), np.dtype(dtype).str
        have = self._arrays.get(key)
        if have is None or have.size < n:
            have = self._arrays[key] = np.empty(n, dtype)
        return have[:n].reshape(shape)


def tap_maps(kshape: tuple[int, ...], m: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed maps of descriptor space, one per kernel tap: signed permutations (orthogonal, O(m) each, so a
    1x512 kernel costs 512 x m numbers), the identity at the centre tap of odd kernels so that 1x1 and identity
    layers pass descriptors through; seeded by the kernel shape so every model uses the same ones. Returns
    (k, m) source indices and (k, m) signs: tap s maps d to signs[s] * d[index[s]]."""
    k = int(np.prod(kshape))
    rng = np.random.default_rng([0x43484149, m, len(kshape), *kshape])
    index = np.argsort(rng.random((k, m)), axis=1)
    signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(k, m))
    if all(d % 2 for d in kshape):
        centre = int(np.ravel_multi_index(tuple(d // 2 for d in kshape), kshape))
        index[centre] = np.arange(m)
        signs[centre] = 1.0
    return index, signs


def data_descriptors(channels: int, m: int) -> np.ndarray:
    """The fixed unit vectors of the data's input channels (channel c always gets the same vector)."""
    v = np.random.default_rng([0x44415441, m]).standard_normal((max(channels, 1), m))
    if channels > v.shape[0]:
        v = np.random.default_rng([0x44415441, m, channels]).standard_normal((channels, m))
    v = v[:channels]
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def descriptors(w: np.ndarray, inputs: np.ndarray, groups: int, maps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Output-channel descriptors (out, m) of a balanced (out, in per group, k) layer reading channels with
    descriptors ``inputs`` (in, m): d_o = normalize(sum_{i,s} w[o, i, s] P_s inputs[i]) with P_s tap s's
    signed permutation (``tap_maps``); zero rows stay 0."""
    out, in_g, k = w.shape
    m = inputs.shape[1]
    index, signs = maps
    x = inputs.astype(np.float32)
    rows_g = out // groups
    t = np.zeros((out, m), dtype=np.float32)
    # tap by tap: P_s applied to the inputs is (in, m), so the working set is O((in + out) m), never (in, k, m)
    for s in range(k):
        image = x[:, index[s]] * signs[s]
        if groups > 1 and in_g == 1:  # depthwise (channel multiplier rows_g): row o reads input o // rows_g
            t += w[:, 0, s][:, None] * image[np.arange(out) // rows_g]
        else:
            for g in range(groups):
                rows = slice(g * rows_g, (g + 1) * rows_g)
                t[rows] += w[rows, :, s] @ image[g * in_g : (g + 1) * in_g]
    t = t.astype(np.float64)
    norms = np.linalg.norm(t, axis=1, keepdims=True)
    return np.divide(t, norms, out=np.zeros_like(t), where=norms > 0)


DESCRIPTOR_CHUNK = 1 << 22  # codec v4: at most this many float32 numbers of tap images at once (16 MiB)


def descriptors_gemm(
    w: np.ndarray | Balanced,
    inputs: np.ndarray,
    groups: int,
    maps: tuple[np.ndarray, np.ndarray],
    centre: bool = False,
) -> np.ndarray:
    """Codec v4's ``descriptors``: the same sum as one matrix product per group, (out, in x k) weights times the
    (in x k, m) tap images of the inputs, float32 with a float64 result. The images are made a slice of input
    channels at a time, at most a quarter of the layer's size (or ``DESCRIPTOR_CHUNK`` numbers), so the working
    set stays below the layer's own. ``centre`` first subtracts each filter's mean weight (applied to the
    product, not to a copy of the layer): a component every filter of a layer shares says more about the
    architecture and the data than about the model (independent 1-D models agreed on it, docs/codec.md)."""
    if isinstance(w, Balanced):
        if w.row is not None and w.col is not None and groups == 1:
            return _descriptors_folded(w.w, w.row, w.col, inputs, maps, centre)
        w = w.array()
    out, in_g, k = w.shape
    m = inputs.shape[1]
    index, signs = maps
    x = inputs.astype(np.float32)
    rows_g = out // groups
    mean = None
    if centre:  # each filter's mean weight, summed in float64 (einsum: one pass, no cast of the layer)
        mean = (np.einsum("oj->o", w.reshape(out, -1), dtype=np.float64) / max(in_g * k, 1)).astype(np.float32)
    t = np.zeros((out, m), dtype=np.float32)
    if groups > 1 and in_g == 1:  # depthwise (channel multiplier rows_g): row o reads input o // rows_g
        src = x[np.arange(out) // rows_g]
        tap_total = np.zeros_like(t)
        for s in range(k):
            image = src[:, index[s]] * signs[s]
            t += w[:, 0, s][:, None] * image
            if mean is not None:
                tap_total += image
        if mean is not None:
            t -= mean[:, None] * tap_total
    else:
        step = max(1, min(DESCRIPTOR_CHUNK, w.size // 4) // max(k * m, 1))
        flat_index = index.ravel()
        for g in range(groups):
            rows = slice(g * rows_g, (g + 1) * rows_g)
            xg = x[g * in_g : (g + 1) * in_g]
            total = np.zeros(m, dtype=np.float32)
            for i0 in range(0, in_g, step):
                i1 = min(in_g, i0 + step)
                # (slice, k, m), C-ordered (a flat index gathers in that order): row i * k + s is P_s x_i
                gathered = xg[i0:i1][:, flat_index]
                gathered.reshape(i1 - i0, k, m)[...] *= signs
                images = gathered.reshape((i1 - i0) * k, m)
                t[rows] += w[rows, i0:i1, :].reshape(rows_g, (i1 - i0) * k) @ images
                if mean is not None:
                    total += images.sum(axis=0)
            if mean is not None:
                t[rows] -= mean[rows, None] * total[None, :]
    t64 = t.astype(np.float64)
    norms = np.linalg.norm(t64, axis=1, keepdims=True)
    return np.divide(t64, norms, out=np.zeros_like(t64), where=norms > 0)


def _descriptors_folded(
    w: np.ndarray, row: np.ndarray, col: np.ndarray, inputs: np.ndarray, maps: tuple[np.ndarray, np.ndarray],
    centre: bool,
) -> np.ndarray:
    """descriptors_gemm of the dense balanced layer w[o, i] row[o] col[i] (``Balanced``) without forming it.

    Each output descriptor is normalised, so the row factors only say which rows are dead; the column factors
    scale the inputs (an (in, m) product, not a layer-sized one). The images carry one more column, each input's
    factor, so the same matrix product also sums each filter's balanced weights (the mean ``centre`` takes
    away). The filter mean times the sum of the (unscaled) images is the mean times the sum over taps of
    P_s applied to the inputs' sum: the maps are linear."""
    out, in_g, k = w.shape
    m = inputs.shape[1]
    index, signs = maps
    x = inputs.astype(np.float32)
    scaled = x * col.astype(np.float32)[:, None]
    t = np.zeros((out, m + 1), dtype=np.float32)
    step = max(1, min(DESCRIPTOR_CHUNK, w.size // 4) // max(k * (m + 1), 1))
    images = np.empty((min(step, in_g), k, m + 1), dtype=np.float32)
    flat_index = index.ravel()
    for i0 in range(0, in_g, step):
        i1 = min(in_g, i0 + step)
        part = images[: i1 - i0]
        np.multiply(scaled[i0:i1][:, flat_index].reshape(i1 - i0, k, m), signs, out=part[:, :, :m])
        part[:, :, m] = col[i0:i1, None]
        t += w[:, i0:i1, :].reshape(out, (i1 - i0) * k) @ part.reshape((i1 - i0) * k, m + 1)
    d = t[:, :m]
    if centre:
        total = (x.sum(axis=0)[index] * signs).sum(axis=0)  # sum over taps s of P_s (sum of the inputs)
        d -= (t[:, m] / np.float32(in_g * k))[:, None] * total[None, :]
    d[row <= 0] = 0
    t64 = d.astype(np.float64)
    norms = np.linalg.norm(t64, axis=1, keepdims=True)
    return np.divide(t64, norms, out=np.zeros_like(t64), where=norms > 0)


def frequencies(m: int, features: int, omega: float) -> np.ndarray:
    """The fixed random Fourier frequencies: (m, features) unit directions scaled by ``omega``."""
    rng = np.random.default_rng([0x52464600, m])
    g = rng.standard_normal((features, m)).T  # drawn feature by feature: a longer code extends a shorter one
    g /= np.linalg.norm(g, axis=0, keepdims=True)
    return g * omega


@functools.lru_cache(maxsize=16)
def _shared_frequencies(m: int, features: int, omega: float, single: bool) -> np.ndarray:
    """``frequencies`` (float32 for ``single``) made once per process for every hash that uses them, read-only."""
    freq = frequencies(m, features, omega)
    freq = freq.astype(np.float32) if single else freq
    freq.flags.writeable = False
    return freq


def whiten(d: np.ndarray, ridge: float, single: bool = False) -> np.ndarray:
    """Centre a layer's live descriptors and whiten them with their own (ridge-regularised) covariance, C^-1/2:
    the whitening that moves them least, so a copy's small changes stay small (a Cholesky whitening, tried for
    v4, moved copies 20-30 % further). ``single`` (v4): float32 products and eigendecomposition."""
    x = d - d.mean(axis=0)
    if single:
        x32 = x.astype(np.float32)
        cov = (x32.T @ x32).astype(np.float64) / max(len(x), 1)
    else:
        cov = x.T @ x / max(len(x), 1)
    cov[np.diag_indices(len(cov))] += ridge * np.trace(cov) / len(cov)  # the ridge: a multiple of the identity
    if single:
        vals32, vecs32 = np.linalg.eigh(cov.astype(np.float32))
        root = (vecs32 / np.sqrt(np.maximum(vals32, np.float32(1e-30)))) @ vecs32.T
        return (x32 @ root.astype(np.float32)).astype(np.float64)
    vals, vecs = np.linalg.eigh(cov)
    inv_sqrt = (vecs / np.sqrt(np.maximum(vals, 1e-300))) @ vecs.T
    return x @ inv_sqrt


# codec v4 computes its float32 phases PHASE_BLOCK features at a time: a matrix product's rounding may depend on
# how many columns it computes at once, and a fixed block makes feature k the same number at every code length
# (code lengths are multiples of 64), so a longer code extends a shorter one bit for bit
PHASE_BLOCK = 64


def sketch_and_propagate(
    d: np.ndarray, freq: np.ndarray, ridge: float, single: bool = False, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(the layer's sketch, the descriptors it hands on) from one whitening of its live descriptors.

    Sketch: sum_o sin(<x_o, freq_k>) / sqrt(#channels) over the whitened descriptors, scaled so that every
    projection has unit variance. Odd features: their expectation is zero for any distribution that is
    symmetric about its mean, and nearly so for skewed ones at this frequency (measured: bits of independent
    models agree 0.50 per layer where cosines agreed up to 0.63 on deep VGG layers).
    Handed on: the same whitened descriptors renormalised. Without it deep descriptors collapse towards a few
    shared directions as normalised linear maps compose (bits of independent models' deep layers agreed: dof
    0.13-0.22 x bits).
    ``single`` (codec v4) takes the phases, the sines and their sum in float32 (the sketch is a sum of a few
    thousand sines: float32's error is far below a bit's margin). ``weights`` (one per channel; codec v7's
    importance, ``channel_importance``) weigh each channel's term, and the sum is divided by the root of the
    live weights' squares instead of the channel count."""
    live = np.abs(d).sum(axis=1) > 0
    if live.sum() < 2:
        return np.zeros(freq.shape[1]), d
    every = bool(live.all())  # the common case: no copies to take out and put back
    x = whiten(d if every else d[live], ridge, single)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if every and norms.min() > 0:
        handed = x / norms
    else:
        handed = np.zeros_like(d)
        handed[live] = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    x *= np.sqrt(x.shape[1] / max(float(np.einsum("om,om->", x, x)) / len(x), 1e-300))
    if single:  # float32 phases and sines, a fixed block of features at a time (see PHASE_BLOCK)
        x32, f32 = x.astype(np.float32), np.asarray(freq, np.float32)
        if weights is None:
            ones = np.ones(len(x32), dtype=np.float32)
        else:
            ones = (weights if every else weights[live]).astype(np.float32)
        sketch = np.empty(f32.shape[1])
        phases = np.empty((len(x32), min(PHASE_BLOCK, f32.shape[1])), np.float32)  # one buffer for every block
        for k in range(0, f32.shape[1], PHASE_BLOCK):
            block = phases[:, : min(PHASE_BLOCK, f32.shape[1] - k)]
            np.matmul(x32, f32[:, k : k + PHASE_BLOCK], out=block)
            sketch[k : k + PHASE_BLOCK] = ones @ np.sin(block, out=block)
    else:
        sketch = np.sin(x @ freq).sum(axis=0) if weights is None else weights[live] @ np.sin(x @ freq)
    if weights is not None:
        return sketch / np.sqrt(max(float(weights[live] @ weights[live]), 1e-300)), handed
    return sketch / np.sqrt(live.sum()), handed


@dataclass(frozen=True)
class ChainConfig:
    dim: int = 32
    omega: float = 2.0
    ridge: float = 0.3
    prune: float = 0.0
    # v5 (chain-sketch-5): soft-threshold each balanced layer at shrink x its 90th percentile of |w| (shrink_small);
    # v6 (``shrink_by_rms``): at shrink x each live filter's RMS weight, which the balancing fixes (rms_threshold)
    shrink: float = 0.0
    shrink_by_rms: bool = False
    whiten_chain: bool = True
    # codec v4 (chain-sketch-4): filters centred, float32 balancing sweeps (fewer), matrix-product descriptors
    centre: bool = False
    sweeps: int = 30
    single: bool = False
    # v4: a layer's sketch counts (1 + max(depth, 1))^-decay in the model's code. Deep layers carry every earlier
    # layer's change (transfer learning moves them most); the data roots count as depth 1, not 0: a first layer
    # reads the data's few channels, and its filters are the most alike across independent models (per-layer
    # dof 0.48 x bits for a 12-filter grey first layer where its consumers had 0.96-1.33)
    decay: float = 0.0
    # v7 (chain-sketch-7): each channel weighs importance_i ** importance in its layer's sketch and on the descriptor
    # it hands on (``channel_importance``); 0 weighs every channel alike (v3-v6)
    importance: float = 0.0


def channel_importance(row: np.ndarray, inverse_sq_columns: np.ndarray, power: float) -> np.ndarray | None:
    """Codec v7's weight of each output channel of a dense layer: (1 / (a_i b_i)) ** ``power``, largest 1, with
    a_i the layer's balancing row factor of filter i and 1 / b_i ** 2 the mean over its consumers of their
    balancing column factors' inverse squares (``inverse_sq_columns``). A channel's importance to the function is
    its filter's norm times its consumers' input-column norms; balancing divides exactly those norms out, so
    1 / (a_i b_i) is that importance, and a function-preserving rescaling of channel i (a_i / c, b_i c) leaves it
    unchanged (up to one factor for the whole layer, which the largest-1 normalisation removes). Pruned channels
    (a zero filter or zero consumer columns) weigh 0. None when no channel has any weight."""
    inv_a = np.divide(1.0, row, out=np.zeros_like(row, dtype=np.float64), where=row > 0)
    v = inv_a * np.sqrt(np.maximum(inverse_sq_columns, 0.0))
    top = float(v.max()) if len(v) else 0.0
    if not np.isfinite(top) or top <= 0:
        return None
    return (v / top) ** power


def chain_sketches(
    shapes: Sequence[tuple[str, int, int, tuple[int, ...]]],
    make_layer: Callable[[int], np.ndarray],
    features: int,
    cfg: ChainConfig,
    gains: Mapping[int, np.ndarray] | None = None,
) -> list[tuple[str, np.ndarray]]:
    """(layer name, sketch) of every layer, in chain order. ``shapes`` are (name, out, in per group, kernel
    shape) and ``make_layer(index)`` makes layer ``index`` as an (out, in per group, *kernel) array; each
    layer is made, used and dropped in turn (codec v7 makes a layer's consumers ahead of it, each still once).
    Codec v7 (``cfg.importance``) weighs each output channel by ``channel_importance`` in its layer's sketch
    (``sketch_and_propagate``) and on the descriptor it hands to its consumers. ``gains`` (codec v7; by layer
    index): the magnitudes of the BatchNorm gains folded into each filter (codec.batchnorm), which multiply its
    importance as they would its norm."""
    chain = plan_chain(shapes)
    if not chain:
        raise ModelFormatError("no convolution weights found")
    made: dict[int, np.ndarray] = {}  # layers made ahead (square 1x1 layers, to place near-identity ones)
    work = Work()  # the thresholded layer of codecs v5 and v6: one array, reused by every layer

    def balance(w: np.ndarray, groups: int) -> Balanced:
        if cfg.single:
            return balanced(w, groups, cfg.sweeps)
        return Balanced(sinkhorn_balance(w, groups, cfg.sweeps))

    chain = _place_near_identity_1x1(chain, make_layer, made, balance)
    # Layers made and balanced ahead of their turn (codec v7 reads a layer's consumers' balancing before its
    # sketch): chain position -> (raw (out, in per group, k) weights, balanced, channel_pass). Each is used at its
    # turn as if made then, so at most a layer's consumers are held beside it.
    prepared: dict[int, tuple[np.ndarray, Balanced, tuple[np.ndarray, np.ndarray] | None]] = {}
    columns_seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def prepare(pos: int) -> tuple[np.ndarray, Balanced, tuple[np.ndarray, np.ndarray] | None]:
        if pos not in prepared:
            layer = chain[pos]
            w = made.pop(layer.index) if layer.index in made else make_layer(layer.index)
            w = w.reshape(w.shape[0], w.shape[1], -1)
            b = balance(w, layer.groups)
            prepared[pos] = (w, b, channel_pass(b, layer.groups, layer.kshape))
        return prepared[pos]

    def inverse_sq_columns(pos: int) -> tuple[np.ndarray, np.ndarray]:
        """(sum over the dense layers reading position ``pos``'s channels of 1 / column factor ** 2, how many
        such layers) per channel; a pass-through layer (``channel_pass``) is looked through to its consumers.
        Kept per position: a split conv's producer is sketched again once its 1x1 is composed into it.
        A run of pass-through layers is computed from its far end, each position from its consumers' entries,
        so no run is a recursion as deep as it is long (1,000 depthwise 1x1 layers passed Python's limit)."""
        if pos not in columns_seen:
            run, seen, stack = [], {pos}, [pos]
            while stack:
                p = stack.pop()
                run.append(p)
                for c in consumers.get(p, []):
                    if c not in seen and c not in columns_seen and prepare(c)[2] is not None:
                        seen.add(c)
                        stack.append(c)
            for p in sorted(run, reverse=True):  # consumers come after their producers in the chain
                columns_at(p)
        return columns_seen[pos]

    def columns_at(pos: int) -> None:
        """``inverse_sq_columns`` of ``pos``, kept in ``columns_seen``."""
        total, count = np.zeros(chain[pos].out), np.zeros(chain[pos].out)
        for c in consumers.get(pos, []):
            w_c, bc, through_c = prepare(c)
            if through_c is not None:
                sub_total, sub_count = inverse_sq_columns(c)
                if composable(pos):  # a near-identity 1x1 composed into ``pos`` (a split conv): its channel order
                    src = np.arange(len(sub_total))
                else:  # channel j of the pass-through is ``pos``'s channel src[j], times its filter's norm
                    src = through_c[0]
                    sub_total = sub_total * np.einsum("oik,oik->o", w_c, w_c, dtype=np.float64)
                np.add.at(total, src, sub_total)
                np.add.at(count, src, sub_count)
            elif chain[c].groups == 1 and bc.factors is not None and len(bc.factors[1]) == chain[pos].out:
                col = composed_columns(c) if composable(c) else None
                col = bc.factors[1] if col is None else col
                total += np.divide(1.0, col * col, out=np.zeros(len(col)), where=col > 0)
                count += 1
        columns_seen[pos] = (total, count)

    def composed_columns(c: int) -> np.ndarray | None:
        """The balancing column factors of layer ``c`` with the near-identity 1x1 after it composed in (a split
        conv: A^-1 W's columns are not W's), or None when its 1x1 is no near-identity."""
        one = consumers[c][0]
        w_one, _, through_one = prepare(one)
        if through_one is None:
            return None
        factors = balance(np.einsum("po,oik->pik", w_one[:, :, 0], prepare(c)[0]), 1).factors
        return None if factors is None else factors[1]

    def importance_of(pos: int, b: Balanced) -> np.ndarray | None:
        if cfg.importance <= 0 or b.factors is None:
            return None
        total, count = inverse_sq_columns(pos)
        if not count.any():
            return None
        mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        row = b.factors[0]
        # a BatchNorm paired with a split conv's first half scales the composed layer's rows, which it follows
        gain = None if gains is None else gains.get(chain[pos].index)
        if gain is not None and len(gain) == len(row):  # a filter times |g| has its row factor divided by |g|
            g = np.abs(gain.astype(np.float64))
            row = np.divide(row, g, out=np.zeros_like(row), where=g > 0)
        return channel_importance(row, mean, cfg.importance)

    freq = _shared_frequencies(cfg.dim, features, cfg.omega, cfg.single)
    desc: list[np.ndarray] = []
    depth: list[int] = []  # per chain position: layers with sketches between it and the data (v4's weights)
    out: list[tuple[str, np.ndarray]] = []
    sketch_at: dict[int, int] = {}  # chain position -> its entry in ``out``
    maps_cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
    consumers: dict[int, list[int]] = {}
    for pos, layer in enumerate(chain):
        if layer.producer is not None:
            consumers.setdefault(layer.producer, []).append(pos)
    # A dense layer whose only consumer is a square 1x1 layer keeps its raw weights until that consumer is made:
    # should the consumer be a near-identity (split-conv) 1x1, the two compose into one kernel.
    kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def composable(pos: int) -> bool:
        nxt = consumers.get(pos, [])
        if chain[pos].groups != 1 or len(nxt) != 1:
            return False
        c = chain[nxt[0]]
        return c.groups == 1 and c.out == c.in_per_group and int(np.prod(c.kshape)) == 1

    def sketch(pos: int, b: Balanced, inputs: np.ndarray) -> np.ndarray:
        """The layer's descriptors (as handed on) from its balanced (out, in per group, k) weights; adds its
        sketch, weighted by its depth (or replaces the one it had)."""
        layer = chain[pos]
        maps = maps_cache.get(layer.kshape)
        if maps is None:
            maps = maps_cache[layer.kshape] = tap_maps(layer.kshape, cfg.dim)
        weights = importance_of(pos, b)
        if cfg.prune > 0:
            b = balance(prune_small(b.array(), cfg.prune), layer.groups)
        if cfg.shrink > 0:
            work_array = work.array(b.w.shape, _balanced_dtype(b))
            b = Balanced(shrink_small(b, cfg.shrink, out=work_array, by_rms=cfg.shrink_by_rms))
        if cfg.single or cfg.centre:
            d = descriptors_gemm(b, inputs, layer.groups, maps, cfg.centre)
        else:  # v3's own arithmetic, so that its codes stay bit for bit
            d = descriptors(b.array(), inputs, layer.groups, maps)
        del b
        sk, handed = sketch_and_propagate(d, freq, cfg.ridge, cfg.single, weights)
        if weights is not None:
            handed = handed * weights[:, None]
        entry = (layer.name, sk * (1.0 + max(depth[pos], 1)) ** -cfg.decay if cfg.decay else sk)
        if pos in sketch_at:
            out[sketch_at[pos]] = entry
        else:
            sketch_at[pos] = len(out)
            out.append(entry)
        return handed if cfg.whiten_chain else d

    for pos, layer in enumerate(chain):
        w, b, through = prepare(pos)
        del prepared[pos]
        inputs = (
            data_descriptors(layer.in_per_group * layer.groups, cfg.dim)
            if layer.producer is None
            else desc[layer.producer]
        )
        if through is not None and layer.producer in kept:
            # a near-identity 1x1 A after a kernel W (a split conv W -> A^-1 W, A): hash A @ (A^-1 W) = W in the
            # producer's place. Exact with nothing between them; with a ReLU between, A's noise is all it adds.
            w_prev, inputs_prev = kept.pop(layer.producer)
            composed = np.einsum("po,oik->pik", w[:, :, 0], w_prev)
            del w, w_prev, b
            depth.append(depth[layer.producer])  # A is no layer of its own
            desc.append(sketch(layer.producer, balance(composed, 1), inputs_prev))
            continue
        if layer.producer is not None:
            kept.pop(layer.producer, None)
        if through is not None:  # a near-identity kxk layer: no sketch, its consumers read its producer's channels
            src, sign = through
            depth.append(-1 if layer.producer is None else depth[layer.producer])  # transparent: no depth either
            desc.append(inputs[src] * sign[:, None])
            continue
        if composable(pos):
            kept[pos] = (w, inputs)
        del w
        depth.append(0 if layer.producer is None else depth[layer.producer] + 1)
        desc.append(sketch(pos, b, inputs))
        del b
    return out


def _place_near_identity_1x1(
    chain: list[ChainLayer],
    make_layer: Callable[[int], np.ndarray],
    made: dict[int, np.ndarray],
    balance: Callable[[np.ndarray, int], np.ndarray | Balanced] = sinkhorn_balance,
) -> list[ChainLayer]:
    """The chain with each near-identity square 1x1 layer (``channel_pass``) placed right after the layer it
    follows in name order (``features.3`` -> ``features.3.x``; ``stem`` -> ``stem.x``), reading that layer and
    read by its consumers. The plan puts data roots first, so a 1x1 inserted after a root (a split stem) would
    otherwise sit at the end of the chain, with the root's consumers reading the root itself. Square 1x1
    layers are made here (kept in ``made`` for their turn); trained ones never pass (bench/obfuscation_bench.py
    --measure), so an ordinary model's chain is unchanged."""
    by_name = sorted(range(len(chain)), key=lambda p: (natural_key(chain[p].name), chain[p].index))
    moves: dict[int, int] = {}  # near-identity 1x1 position -> the position it follows
    for rank, pos in enumerate(by_name):
        x = chain[pos]
        if x.groups != 1 or x.out != x.in_per_group or int(np.prod(x.kshape)) != 1 or rank == 0:
            continue
        w = made[x.index] = make_layer(x.index)
        w = w.reshape(w.shape[0], w.shape[1], -1)
        if channel_pass(balance(w, 1), 1, x.kshape) is None:
            continue
        prev = by_name[rank - 1]
        if chain[prev].out == x.in_per_group and prev not in moves and prev not in moves.values():
            moves[pos] = prev
    if all(chain[one].producer == prev and _sole_consumer(chain, one, prev) for one, prev in moves.items()):
        return chain
    order = [p for p in range(len(chain)) if p not in moves]
    for one, prev in moves.items():
        order.insert(order.index(prev) + 1, one)
    producer: dict[int, int | None] = {p: chain[p].producer for p in range(len(chain))}
    for one, prev in moves.items():
        for p in range(len(chain)):
            if producer[p] == prev and p != one:
                producer[p] = one
        producer[one] = prev
    new_pos = {p: i for i, p in enumerate(order)}
    placed = {p: None if q is None else new_pos[q] for p, q in producer.items()}
    if any(q is not None and q > new_pos[p] for p, q in placed.items()):
        return chain  # the moves would put a consumer before its producer: keep the plan
    return [
        ChainLayer(chain[p].index, chain[p].name, chain[p].out, chain[p].in_per_group, chain[p].kshape, placed[p],
                   chain[p].groups)
        for p in order
    ]  # fmt: skip


def _sole_consumer(chain: list[ChainLayer], one: int, prev: int) -> bool:
    """Whether chain position ``one`` is the only layer reading position ``prev`` already."""
    return all(layer.producer != prev for p, layer in enumerate(chain) if p != one)
