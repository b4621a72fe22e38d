"""Verify one pair of models: aligned per-layer evidence, an exact p-value, and which one came first.

``compare(a, b)`` returns a JSON-ready dict (docs/evidence.md lists its fields):

- per matched layer: the aligned weight correlation, the cosine, the relative weight change
  ||Wa - s Wb|| / ||Wa|| after alignment and the best positive per-filter scale s, the share of hidden units
  whose partner kept its index, and both weight kurtoses;
- an exact p-value for "B was trained independently of A" (Zhu et al., "Independence Tests for Language
  Models", ICML 2025). Under that hypothesis A's hidden units are exchangeable (initialisation and SGD treat
  them alike), so A and A with its hidden units relabelled by a uniform random permutation are equally
  likely next to B. The statistic is the number of hidden units the filter matching pairs with the unit of
  the same index in B (the paper's matching statistic, counted instead of rank-correlated). Relabelling A
  relabels the matching (align.py is equivariant), so each null draw is the count of fixed points of
  (matching o random permutation) and costs no new assignment; one permutation per layer width, shared by
  the layers of that width, so units tied across layers (residual streams, depthwise convs) move together.
  p = (1 + #{null >= observed}) / (1 + n_perm) is valid for any n_perm; ``p_value_bound`` is a closed-form
  upper bound on the same test's p-value (``fixed_point_tail_bound``), which reaches below 1 / (1 + n_perm).
  What no permutation test can see: a copy whose units were relabelled at random is, by the same
  exchangeability, as likely as A itself; the aligned correlation is the evidence there.
- direction (MoTHer, ICLR 2025: fine-tuning raises weight kurtosis): the mean log ratio of B's to A's
  kurtosis over matched layers, with a band inside which it is reported as undetermined.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .. import DEFAULT_BITS
from ..codec.load import load_tensors
from ..errors import ModelFormatError
from .align import Layer, align_layers, input_order, match_filters, model_layers

DEFAULT_PERMUTATIONS = 999
# Mean log kurtosis ratio below which the direction is not called. Kurtosis of a trained layer varies by a few
# percent between layers; a few steps of fine-tuning move it by more (measured in tests/test_evidence.py).
DIRECTION_BAND = 0.005
DIRECTION_AGREEMENT = 2 / 3  # and at least this share of the matched layers must point the same way
P_SIGNIFICANT = 0.01  # the verdict's level for the exact test (both of its p-values together)
# Aligned weight correlation above which unrelabelled evidence is called a (permuted) copy; independently
# trained small CNNs align to 0.1-0.5 (tests/test_evidence.py).
CORRELATION_COPY = 0.8
HISTOGRAM_BINS = 60


def kurtosis(w: np.ndarray) -> float:
    """Pearson kurtosis E[(x - mean)^4] / var^2 of all the weights of a layer (3 for a Gaussian)."""
    x = w.reshape(-1)
    centred = x - np.float32(x.mean(dtype=np.float64))
    sq = centred * centred
    var = float(sq.mean(dtype=np.float64))
    return float((sq * sq).mean(dtype=np.float64)) / (var * var) if var > 0 else 0.0


def _layer_evidence(wa: np.ndarray, wb: np.ndarray) -> dict[str, float]:
    # float32 values, float64 sums: a 512x512x3x3 layer in milliseconds, errors far below the digits shown
    a, b = wa.reshape(len(wa), -1), wb.reshape(len(wb), -1)
    ab = np.einsum("ij,ij->i", a, b, dtype=np.float64)
    aa = np.einsum("ij,ij->i", a, a, dtype=np.float64)
    bb = np.einsum("ij,ij->i", b, b, dtype=np.float64)
    na, nb, n = math.sqrt(aa.sum()), math.sqrt(bb.sum()), a.size
    cosine = float(ab.sum() / (na * nb)) if na > 0 and nb > 0 else 0.0
    ma, mb = a.mean(dtype=np.float64), b.mean(dtype=np.float64)
    cov = ab.sum() / n - ma * mb
    va, vb = aa.sum() / n - ma * ma, bb.sum() / n - mb * mb
    correlation = float(cov / math.sqrt(va * vb)) if va > 0 and vb > 0 else 0.0
    # the positive scale per filter that brings b closest to a (a BatchNorm fold or a rescaling attack):
    # ||a - s b||^2 = aa - 2 s ab + s^2 bb, summed over filters
    scale = np.where(bb > 0, np.maximum(ab, 0.0) / np.where(bb > 0, bb, 1.0), 0.0)
    residual = float(np.maximum(aa - 2 * scale * ab + scale * scale * bb, 0.0).sum())
    change = math.sqrt(residual) / na if na > 0 else 0.0
    return {"correlation": correlation, "cosine": cosine, "relative_change": change}


def _fixed_point_null(groups: dict[int, list[np.ndarray]], n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """The statistic with a's hidden units relabelled, ``n_perm`` draws: one uniform permutation P per width
    n, shared by every layer of that width (``groups[n]``: their matchings), each layer counting the units i
    with matching[P[i]] == i (relabelling a by P turns matching m into m o P; -1 marks a unit never counted).

    One permutation per width, not per layer: units tied across layers (a residual stream, a depthwise conv
    and the conv before it) must move together, and every such tie joins layers of equal width. Moving equal
    widths together is still a symmetry of an untied chain, so the test stays exact either way.
    """
    total = np.zeros(n_perm, dtype=np.int64)
    for n in sorted(groups):
        draws = rng.permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1)
        for matching in groups[n]:
            total += (matching[draws] == np.arange(n)).sum(axis=1)
    return total


def fixed_point_tail_bound(observed: int, group_layers: list[int]) -> float:
    """An upper bound on P(statistic >= observed) under the null of ``_fixed_point_null``, whose groups hold
    ``group_layers[g]`` layers each.

    One layer's count F (fixed points of a uniform permutation composed with a fixed one) has
    E[(1 + u)^F] = sum_{r <= n} u^r / r! <= e^u. A group of k layers shares one permutation; by Hoelder,
    E[(1 + s)^(F_1 + ... + F_k)] <= max_l E[(1 + s)^(k F_l)] <= exp((1 + s)^k - 1). Groups are independent, so
    with x = log(1 + s): P(T >= t) <= exp(sum_g (e^(k_g x) - 1) - t x), minimised over x > 0 (convex in x).
    """
    ks = np.asarray([k for k in group_layers if k > 0], dtype=np.float64)
    if not len(ks) or observed <= ks.sum():  # the minimum is at x = 0 (bound 1) when t <= sum k_g
        return 1.0
    lo, hi = 0.0, math.log(observed) / ks.min() + 1.0  # the derivative sum k e^(kx) - t changes sign in between
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((ks * np.exp(ks * mid)).sum()) < observed:
            lo = mid
        else:
            hi = mid
    x = (lo + hi) / 2
    log_bound = float(np.expm1(ks * x).sum()) - observed * x
    return math.exp(log_bound) if log_bound > -745 else 0.0


def direction(kurtosis_a: list[float], kurtosis_b: list[float], band: float = DIRECTION_BAND) -> dict[str, Any]:
    """Which model was derived from the other, by the MoTHer rule (the child's weights have higher kurtosis)."""
    ratios = [math.log(kb / ka) for ka, kb in zip(kurtosis_a, kurtosis_b, strict=True) if ka > 0 and kb > 0]
    margin = float(np.mean(ratios)) if ratios else 0.0
    agreeing = float(np.mean([np.sign(r) == np.sign(margin) for r in ratios])) if ratios and margin else 0.0
    if abs(margin) > band and agreeing >= DIRECTION_AGREEMENT:
        derived = "b" if margin > 0 else "a"
    else:
        derived = "undetermined"
    return {"derived": derived, "margin": margin, "band": band, "layers_agreeing": agreeing}


def _label(source: Any, default: str) -> str:
    return str(source) if isinstance(source, str) or hasattr(source, "__fspath__") else default


def compare(
    a: Any,
    b: Any,
    *,
    n_perm: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
    bits: int | None = DEFAULT_BITS,
    layout: str = "auto",
) -> dict[str, Any]:
    """Align model ``b`` to model ``a`` and weigh the evidence that one was derived from the other.

    ``a`` and ``b`` are anything hashdb.codec.load.load_tensors reads (files, folders, state_dicts,
    modules). ``bits`` also hashes both with the default codec and reports the code distance (None skips
    it). Raises ModelFormatError when a model cannot be read or has no convolution or linear layer.
    """
    if n_perm < 1:
        raise ValueError(f"n_perm must be >= 1, got {n_perm}")
    label_a, label_b = _label(a, "a"), _label(b, "b")
    layers_a = _layers(a, label_a, layout)
    layers_b = _layers(b, label_b, layout)
    alignment = align_models(layers_a, layers_b)
    pairs = [(x.i, x.j) for x in alignment]

    per_layer: list[dict[str, Any]] = []
    units: list[int] = []
    groups: dict[int, list[np.ndarray]] = {}
    observed = 0
    diffs: list[np.ndarray] = []
    for i, j, out_perm, in_perm, fixed_outputs in alignment:
        la, lb = layers_a[i], layers_b[j]
        aligned = lb.weights[out_perm][:, in_perm]
        evidence = _layer_evidence(la.weights, aligned)
        # An all-zero filter of a (a structurally pruned unit) ties with every partner and the solver places it
        # by position, which no relabelling reproduces: it is marked -1 and never counts, here or in the null.
        counted = np.where(np.abs(la.weights).reshape(len(la.weights), -1).max(axis=1) > 0, out_perm, -1)
        kept = int((counted == np.arange(len(counted))).sum())
        if not fixed_outputs:
            units.append(len(out_perm))
            groups.setdefault(len(out_perm), []).append(counted)
            observed += kept
        per_layer.append({
            "layer_a": la.name, "layer_b": lb.name, "shape": [la.weights.shape[0], la.weights.shape[1], *la.kernel],
            **evidence,
            "units_in_place": kept if not fixed_outputs else None,
            "units": len(out_perm),
            "kurtosis_a": kurtosis(la.weights), "kurtosis_b": kurtosis(aligned),
        })  # fmt: skip
        diffs.append(_scaled_difference(la.weights, aligned))

    rng = np.random.default_rng(seed)
    null = _fixed_point_null(groups, n_perm, rng)
    p_value = (1 + int((null >= observed).sum())) / (1 + n_perm)
    sizes = [int(np.prod(layers_a[i].weights.shape)) for i, _ in pairs]
    mean_corr = float(np.average([x["correlation"] for x in per_layer], weights=sizes)) if pairs else 0.0
    mean_change = float(np.average([x["relative_change"] for x in per_layer], weights=sizes)) if pairs else 1.0
    lineage = direction([x["kurtosis_a"] for x in per_layer], [x["kurtosis_b"] for x in per_layer])
    lineage["parent"] = {"a": label_b, "b": label_a}.get(lineage["derived"])
    result: dict[str, Any] = {
        "a": label_a, "b": label_b,
        "layers_a": len(layers_a), "layers_b": len(layers_b), "layers_matched": len(pairs),
        "layers": per_layer,
        "aligned_correlation": mean_corr, "relative_change": mean_change,
        "test": {
            "hypothesis": "b was trained independently of a",
            "statistic": "hidden units whose matched partner kept its index",
            "observed": observed, "hidden_units": int(sum(units)), "hidden_layers": len(units),
            "permutation_groups": {str(n): len(g) for n, g in sorted(groups.items())},
            "n_perm": n_perm, "seed": seed,
            "p_value": p_value, "p_value_bound": fixed_point_tail_bound(observed, [len(g) for g in groups.values()]),
            "null": _counts(null),
        },
        "direction": lineage,
        "weight_difference": _histogram(diffs),
    }  # fmt: skip
    if bits is not None:
        result["code"] = _code_distance(a, b, bits)
    result["verdict"] = verdict(result)
    return result


class LayerMatch(NamedTuple):
    """Layer ``i`` of a matched to layer ``j`` of b; ``b[j][out_perm][:, in_perm]`` lines up with ``a[i]``."""

    i: int
    j: int
    out_perm: np.ndarray
    in_perm: np.ndarray
    fixed_outputs: bool  # a model's last layer: its outputs are classes, never permuted


def align_models(layers_a: list[Layer], layers_b: list[Layer]) -> list[LayerMatch]:
    """Layers aligned by ``align_layers``, filters by ``match_filters``, each input order inherited from the
    matched layer feeding it."""
    out: list[LayerMatch] = []
    previous: tuple[int, int, np.ndarray] | None = None  # (i, j, out_perm) of the last matched pair
    for i, j in align_layers(layers_a, layers_b):
        la, lb = layers_a[i], layers_b[j]
        in_perm = _inherited_order(i, j, la, previous)
        fixed_outputs = i == len(layers_a) - 1 or j == len(layers_b) - 1
        out_perm, in_perm = match_filters(la.weights, lb.weights, in_perm, fixed_outputs)
        out.append(LayerMatch(i, j, out_perm, in_perm, fixed_outputs))
        previous = (i, j, out_perm)
    return out


def _layers(source: Any, label: str, layout: str) -> list[Layer]:
    layers = model_layers(load_tensors(source), layout)
    if not layers:
        raise ModelFormatError(f"{label}: no convolution or linear layers to compare")
    return layers


def _inherited_order(i: int, j: int, la: Layer, previous: tuple[int, int, np.ndarray] | None) -> np.ndarray | None:
    """B's input order for pair (i, j): identity for both models' first layers (the data's channels),
    the matching of the pair just before when both layers directly follow it, else unknown."""
    in_n = la.weights.shape[1]
    if i == 0 and j == 0:
        return np.arange(in_n)
    if previous is None or previous[0] != i - 1 or previous[1] != j - 1:
        return None
    return input_order(previous[2], in_n)


def _scaled_difference(wa: np.ndarray, wb: np.ndarray, limit: int = 200_000) -> np.ndarray:
    """(a - s b) / sd(a) of an aligned pair, s the positive per-filter scale, subsampled to ``limit`` values."""
    rows = len(wa)
    if wa.size > limit:  # whole filters, evenly spaced: the histogram of a sample, not of every weight
        keep = np.unique(np.linspace(0, rows - 1, max(1, limit * rows // wa.size)).astype(np.int64))
        wa, wb = wa[keep], wb[keep]
    a = wa.astype(np.float64).reshape(len(wa), -1)
    b = wb.astype(np.float64).reshape(len(wb), -1)
    bb = (b * b).sum(axis=1)
    scale = np.where(bb > 0, np.maximum((a * b).sum(axis=1), 0.0) / np.where(bb > 0, bb, 1.0), 0.0)
    return ((a - scale[:, None] * b) / (a.std() or 1.0)).reshape(-1)


def _histogram(diffs: list[np.ndarray]) -> dict[str, Any]:
    values = np.concatenate(diffs) if diffs else np.zeros(0)
    if not values.size:
        return {"edges": [], "counts": []}
    span = float(np.quantile(np.abs(values), 0.995)) or 1e-6
    counts, edges = np.histogram(np.clip(values, -span, span), bins=HISTOGRAM_BINS, range=(-span, span))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "unit": "sd of a's weights"}


def _counts(null: np.ndarray) -> dict[str, list[int]]:
    values, counts = np.unique(null, return_counts=True)
    return {"values": [int(v) for v in values], "counts": [int(c) for c in counts]}


def _code_distance(a: Any, b: Any, bits: int) -> dict[str, Any]:
    from ..codec.hasher import ModelHasher
    from .nulldist import false_match_rate

    hasher = ModelHasher(bits)
    code_a, code_b = hasher.hash(a), hasher.hash(b)
    d = int(np.unpackbits(np.frombuffer(code_a, np.uint8) ^ np.frombuffer(code_b, np.uint8)).sum())
    return {"bits": bits, "distance": d, "copy_radius": hasher.copy_radius, "fmr": false_match_rate(d, bits)}


def verdict(result: dict[str, Any]) -> dict[str, str]:
    """The call and the evidence in words, from a ``compare`` result."""
    test, way = result["test"], result["direction"]
    p = min(test["p_value"], test["p_value_bound"])
    corr = result["aligned_correlation"]
    matched = f"{result['layers_matched']} of a's {result['layers_a']} layers matched in b"
    # Either p-value is valid alone; calling on either at half the level keeps the level (Bonferroni), and the
    # bound lets few permutations (or a huge observed count) still reach it.
    if min(test["p_value"], test["p_value_bound"]) <= P_SIGNIFICANT / 2:
        call = "derived"
        words = (f"Not independent: {test['observed']} of {test['hidden_units']} hidden units of b sit where a has "
                 f"their match (p = {test['p_value']:.3g} by {test['n_perm']} permutations, "
                 f"bound {test['p_value_bound']:.3g}). {matched}; aligned weight correlation {corr:.3f}.")  # fmt: skip
    elif corr >= CORRELATION_COPY:
        call = "permuted copy"
        words = (f"Copy with relabelled units: aligned weight correlation {corr:.3f} over {matched}; "
                 f"the exact test cannot see a copy whose units were permuted at random (p = {p:.3g}).")
    else:
        call = "no evidence"
        words = (f"No evidence against independent training (p = {test['p_value']:.3g}); {matched}; "
                 f"aligned weight correlation {corr:.3f}.")
    if call != "no evidence":
        if way["derived"] == "undetermined":
            words += f" Direction undetermined (kurtosis margin {way['margin']:+.3f}, band {way['band']})."
        else:
            name = result[way["derived"]]
            shown = way["derived"] if name == way["derived"] else f"{way['derived']} ({name})"
            words += (f" Derived model: {shown}, its weights' kurtosis higher by a margin of {way['margin']:+.3f} "
                      f"(band {way['band']}, {way['layers_agreeing']:.0%} of the layers agree).")
    return {"call": call, "words": words}
