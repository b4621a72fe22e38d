"""Align two models: layers by shape and order, then filters within matched layers.

Steps, each a pure function over numpy arrays:

1. ``model_layers``: the convolution and linear weights of a model (hashdb.codec.select's plan), each as a
   float32 (out, in, k) array with k the flattened kernel positions.
2. ``align_layers``: a monotone alignment of the two layer sequences (dynamic programming, as a weighted
   longest common subsequence): only layers of the same (out, in, kernel) shape may pair, and among those,
   pairs whose weight distributions agree score higher. Extra layers on either side (a new head, inserted
   blocks) are skipped, so a backbone inside a bigger model pairs with its own part.
3. ``match_filters``: within a matched layer, a linear assignment of B's output filters to A's on the cosine
   of their weights (Git Re-Basin's weight matching), with B's input channels put in A's order by the
   permutation found for the layer feeding them. Where that permutation is unknown (the layer before is
   not matched, or the sizes do not chain), outputs and inputs are matched in turn from features that do
   not depend on the other side's order.

Every step is equivariant: relabelling A's hidden units relabels the matching the same way and changes
nothing else. The exact permutation test in ``compare`` rests on that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..codec.chain import natural_key
from ..codec.readers import NamedTensor
from ..codec.select import conv_layer, conv_plan


@dataclass(frozen=True)
class Layer:
    """One weight layer: its tensor name, kernel shape and weights as float32 (out, in, k)."""

    name: str
    kernel: tuple[int, ...]
    weights: np.ndarray

    @property
    def shape(self) -> tuple[int, int, tuple[int, ...]]:
        return (self.weights.shape[0], self.weights.shape[1], self.kernel)


def model_layers(tensors: list[NamedTensor], layout: str = "auto") -> list[Layer]:
    """Convolution and linear layers of a model in source order (hashdb.codec.select's choice of tensors), or in
    natural name order (``features.2`` before ``features.10``) when the source order is plain string order, as
    safetensors stores names: then it says nothing about the layers' order, and string order would put a deep
    layer between shallow ones."""
    plan = conv_plan(tensors, layout, include_linear=True)
    names = [tensors[i].name for i, _ in plan]
    if names == sorted(names):
        plan = sorted(plan, key=lambda p: natural_key(tensors[p[0]].name))
    layers = []
    for i, read in plan:
        w = conv_layer(tensors[i].array, read)
        kernel = tuple(int(d) for d in w.shape[2:])
        flat = np.ascontiguousarray(w, dtype=np.float32).reshape(w.shape[0], w.shape[1], -1)
        layers.append(Layer(tensors[i].name, kernel, flat))
    return layers


def _profile(w: np.ndarray) -> np.ndarray:
    """Standardized moments of the weights (mean/sd, E|z|, skewness, kurtosis / 3): a summary that no unit
    permutation or per-layer scale changes, in one pass of float32 arithmetic (sums in float64)."""
    flat = w.reshape(-1)
    mean = flat.mean(dtype=np.float64)
    centred = flat - np.float32(mean)
    sq = centred * centred
    var = float(sq.mean(dtype=np.float64))
    if var <= 0:
        return np.zeros(4)
    sd = math.sqrt(var)
    abs_mean = float(np.abs(centred).mean(dtype=np.float64)) / sd
    skew = float((sq * centred).mean(dtype=np.float64)) / sd**3
    kurt = float((sq * sq).mean(dtype=np.float64)) / var**2
    return np.array([mean / sd, abs_mean, skew, kurt / 3.0])


def align_layers(a: list[Layer], b: list[Layer]) -> list[tuple[int, int]]:
    """Pairs (index in a, index in b), increasing in both, that maximise the number of same-shape pairs and,
    among equally many, the agreement of their weight distributions (each pair scores 1 + a similarity in
    [0, 1], so one more pair always beats a better fit of fewer)."""
    n, m = len(a), len(b)
    profiles_a = [_profile(x.weights) for x in a]
    profiles_b = [_profile(x.weights) for x in b]
    score = np.full((n, m), -np.inf)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            if x.shape == y.shape:
                gap = np.linalg.norm(profiles_a[i] - profiles_b[j])
                scale = np.linalg.norm(profiles_a[i]) + np.linalg.norm(profiles_b[j])
                score[i, j] = 1.0 + max(0.0, 1.0 - float(gap / scale)) if scale > 0 else 1.0
    best = np.zeros((n + 1, m + 1))
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            best[i, j] = max(best[i - 1, j], best[i, j - 1], best[i - 1, j - 1] + score[i - 1, j - 1])
    pairs = []
    i, j = n, m
    while i > 0 and j > 0:
        if np.isfinite(score[i - 1, j - 1]) and best[i, j] == best[i - 1, j - 1] + score[i - 1, j - 1]:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif best[i, j] == best[i - 1, j]:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def _assign(similarity: np.ndarray) -> np.ndarray:
    """perm with perm[i] = the column matched to row i, maximising the summed similarity (square input)."""
    from scipy.optimize import linear_sum_assignment  # the `report` extra (scikit-learn also brings it)

    # The solver breaks near-ties by position, and on wide layers of unrelated models the optimum is nearly
    # flat: given in stored order it then favours pairing index i with index i (measured: 1.5 instead of 1
    # such pairs per 512-wide layer), which a relabelling of a would not reproduce. Rows are handed over in
    # an order made from their values, so relabelling a's units relabels the result exactly (the permutation
    # test's null rests on that).
    sim = np.asarray(similarity, dtype=np.float64)
    order = np.lexsort((sim.max(axis=1), sim.sum(axis=1)))
    rows, cols = linear_sum_assignment(sim[order], maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[order[rows]] = cols
    return perm


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (float32: the cosines only rank candidate partners)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))[:, None]
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _match_outputs(wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """Match B's output filters to A's on the cosine of their (out, in * k) rows; scale-free per filter."""
    return _assign(_unit_rows(wa.reshape(len(wa), -1)) @ _unit_rows(wb.reshape(len(wb), -1)).T)


def _sorted_rows(w: np.ndarray) -> np.ndarray:
    """Each filter's weights sorted: a filter's description that its input channels' order cannot change."""
    return np.sort(w.reshape(len(w), -1), axis=1)


def match_filters(
    wa: np.ndarray, wb: np.ndarray, in_perm: np.ndarray | None, fixed_outputs: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(out_perm, in_perm) putting B's layer in A's order: ``wb[out_perm][:, in_perm]`` lines up with ``wa``.

    ``in_perm`` is the known input order (from the matched layer feeding this one), or None when unknown;
    ``fixed_outputs`` keeps the outputs in place (a model's last layer: its outputs are classes, not units).
    """
    out_n, in_n = wa.shape[0], wa.shape[1]
    identity_out = np.arange(out_n)
    if in_perm is not None:
        out_perm = identity_out if fixed_outputs else _match_outputs(wa, wb[:, in_perm])
        return out_perm, in_perm
    out_perm = identity_out if fixed_outputs else _assign(_unit_rows(_sorted_rows(wa)) @ _unit_rows(_sorted_rows(wb)).T)
    for _ in range(2):  # inputs given outputs, then outputs given inputs: two rounds settle on small layers
        cols_a = wa.transpose(1, 0, 2).reshape(in_n, -1)
        cols_b = wb[out_perm].transpose(1, 0, 2).reshape(in_n, -1)
        in_perm = _assign(_unit_rows(cols_a) @ _unit_rows(cols_b).T)
        if not fixed_outputs:
            out_perm = _match_outputs(wa, wb[:, in_perm])
    assert in_perm is not None
    return out_perm, in_perm


def input_order(prev_out_perm: np.ndarray, in_n: int) -> np.ndarray | None:
    """The input permutation a layer inherits from the layer before it: the same permutation when its inputs
    are that layer's outputs, the permutation of channel blocks when they are those outputs flattened
    channel-major (a linear layer after a conv's (C, H, W) output); None when the sizes do not chain."""
    prev_n = len(prev_out_perm)
    if in_n == prev_n:
        return prev_out_perm
    if prev_n and in_n % prev_n == 0:
        block = in_n // prev_n
        return (prev_out_perm[:, None] * block + np.arange(block)[None, :]).reshape(-1)
    return None
