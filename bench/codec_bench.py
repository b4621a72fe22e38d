"""Codec benchmark: how well ModelHasher codes separate modified copies from distinct models, and how fast.

    nice -n 10 python3 bench/codec_bench.py                      # full library (bench/zoo/), writes "codec"
    python3 bench/codec_bench.py --quick                         # small library smoke run, prints only
    python3 bench/codec_bench.py --hasher-kwargs '{"fraction": 0.3}' --no-write

Everything runs on ONE thread (set before numpy/torch load), so timings are single-core numbers.
Function API for sweeps: ``evaluate(hasher, library)`` or ``evaluate_many({name: hasher}, library)``
(one pass materializes each library model once and hashes it with every hasher) -> metrics dicts.

Definitions (docs/codec_bench.md):
- light copies: the modification classes the copy_radius targets apply to (Entry.light); heavy: 60-70 %
  pruning, int4; distillation (no weights shared) is reported on its own.
- distinct pairs: (original q, any library model not derived from q), including q's same-architecture peers.
- precision@r: over all originals as queries, TP = light copies of q within r, FP = distinct models within r
  (heavy copies and distillations of q count neither way).
- mAP: each original ranks every other library model by Hamming distance; relevant = its non-distillation
  copies (mAP_light: light copies, heavy ones left out of the ranking), its distillations left out of the
  ranking. Ties are broken pessimistically (irrelevant models first within a distance).
- a failed hash (exception) counts as a miss: distance bits + 1 to everything.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Protocol  # noqa: E402

import numpy as np  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `bench` and `hashdb` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Hasher(Protocol):
    bits: int

    @property
    def copy_radius(self) -> int: ...

    def hash(self, source: Any) -> bytes: ...


# ------------------------------------------------------------------------------------------ baselines


def _conv_weights(source: Mapping[str, Any]) -> list[np.ndarray]:
    """Convolution kernels (ndim >= 3) of a state_dict, in order, as float32 arrays."""
    out = []
    for v in source.values():
        if hasattr(v, "detach"):
            if not v.is_floating_point() or v.ndim < 3:
                continue
            out.append(v.detach().float().numpy().ravel())
        elif isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.ndim >= 3:
            out.append(v.astype(np.float32).ravel())
    return out


class RandomProjectionHasher:
    """Baseline: all conv weights flattened in order, averaged into ``chunks`` equal pieces (any model ->
    same length), projected by a seeded Gaussian matrix, sign bits."""

    def __init__(self, bits: int = 256, chunks: int = 4096, seed: int = 0, radius_fraction: float = 0.18) -> None:
        self.bits = bits
        self.chunks = chunks
        self.radius_fraction = radius_fraction
        self._proj = np.random.default_rng(seed).standard_normal((chunks, bits)).astype(np.float32)

    @property
    def copy_radius(self) -> int:
        return int(round(self.radius_fraction * self.bits))

    def hash(self, source: Any) -> bytes:
        v = np.concatenate(_conv_weights(source if isinstance(source, Mapping) else source.state_dict()))
        edges = np.linspace(0, len(v), self.chunks + 1).astype(np.int64)
        sums = np.add.reduceat(v.astype(np.float64), edges[:-1])
        feat = (sums / np.maximum(np.diff(edges), 1)).astype(np.float32)
        return np.packbits(feat @ self._proj > 0).tobytes()


class SegmentStatsHasher:
    """Baseline: flattened conv weights cut into bits/2 segments; per segment mean and std, each bit says
    whether the statistic is above its median across segments (balanced bits)."""

    def __init__(self, bits: int = 256, radius_fraction: float = 0.18) -> None:
        self.bits = bits
        self.radius_fraction = radius_fraction

    @property
    def copy_radius(self) -> int:
        return int(round(self.radius_fraction * self.bits))

    def hash(self, source: Any) -> bytes:
        v = np.concatenate(_conv_weights(source if isinstance(source, Mapping) else source.state_dict()))
        segs = np.array_split(v.astype(np.float64), self.bits // 2)
        mean = np.array([s.mean() for s in segs])
        std = np.array([s.std() for s in segs])
        bits = np.concatenate([mean > np.median(mean), std > np.median(std)])
        return np.packbits(bits).tobytes()


# ---------------------------------------------------------------------------------------------- hashing


@dataclass
class HashRun:
    """Codes of every library entry under one hasher: bool matrix (N, bits), ok mask, seconds, parameters."""

    name: str
    bits: int
    radius: int
    codes: np.ndarray
    ok: np.ndarray
    seconds: np.ndarray
    params: np.ndarray
    errors: dict[str, str] = field(default_factory=dict)
    rel_change: np.ndarray | None = None  # ||w' - w|| / ||w|| over same-named weights (original: 0)
    accuracy: np.ndarray | None = None  # test accuracy on the model's own task (NaN when not measured)
    # hashers with ModelHasher.suspect: each entry's kernel family and (layer name, code) list, for `decided`
    families: dict[int, str | None] = field(default_factory=dict)
    layers: dict[int, list[tuple[str, bytes]]] = field(default_factory=dict)
    config: dict[str, Any] | None = None


def relative_change(original: Mapping[str, Any], copy: Mapping[str, Any]) -> float:
    """||w' - w|| / ||w|| over the conv/linear weights (ndim >= 2) present with the same name and shape in
    both: how far a modification moved the raw weights (permutation and rescaling move them a lot while
    keeping the function; keys a modification removed, e.g. folded BN, are skipped)."""
    num = den = 0.0
    for k, w in original.items():
        c = copy.get(k)
        if c is None or w.ndim < 2 or not w.is_floating_point() or c.shape != w.shape:
            continue
        w32, c32 = w.detach().float(), c.detach().float()
        num += float((c32 - w32).pow(2).sum())
        den += float(w32.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else float("nan")


ACCURACY_IMAGES = 300  # test images per model for --accuracy (enough to tell a working copy from a broken one)


def model_accuracy(model: Any, data: str) -> float:
    """Accuracy of ``model`` (evaluated in float32) on the first ACCURACY_IMAGES test images of ``data``."""
    import torch

    from bench import zoo

    x, y = zoo.dataset(data, "test")
    with torch.no_grad():
        out = model.float().eval()(x[:ACCURACY_IMAGES])
    return float((out.argmax(1) == y[:ACCURACY_IMAGES]).float().mean())


def hash_all(
    hashers: Mapping[str, Hasher], library: Any, verbose: bool = False, accuracy: bool = False
) -> dict[str, HashRun]:
    """Materialize each library entry once and hash its state_dict with every hasher (only hash() is timed);
    with ``accuracy`` also measure each model's test accuracy on its own task (after hashing)."""
    n = len(library.entries)
    runs = {
        name: HashRun(
            name, h.bits, h.copy_radius, np.zeros((n, h.bits), bool), np.zeros(n, bool), np.zeros(n), np.zeros(n)
        )
        for name, h in hashers.items()
    }
    rel = np.zeros(n)
    acc = np.full(n, np.nan)
    for run in runs.values():
        run.rel_change = rel
        run.accuracy = acc
    t0 = time.perf_counter()
    for i, e in enumerate(library.entries):
        model = library.model(e)
        sd = model.state_dict()
        n_params = sum(v.numel() for v in sd.values() if v.is_floating_point())
        if e.original is not None:
            rel[i] = relative_change(library.state_dict(e.original), sd)
        for name, h in hashers.items():
            run = runs[name]
            run.params[i] = n_params
            t = time.perf_counter()
            try:
                if hasattr(h, "suspect"):  # one pass gives the code, the layer codes and the family
                    found = h.suspect(sd)
                    code = found.code
                    run.families[i] = found.family
                    run.layers[i] = found.layers
                    run.config = h.config
                else:
                    code = h.hash(sd)
            except Exception as exc:  # a failure is a measured outcome (a miss), not a crash of the bench
                run.errors[e.key] = f"{type(exc).__name__}: {exc}"
                continue
            run.seconds[i] = time.perf_counter() - t
            run.codes[i] = np.unpackbits(np.frombuffer(code, np.uint8))[: h.bits].astype(bool)
            run.ok[i] = True
        if accuracy and e.original is not None:
            acc[i] = model_accuracy(model, getattr(model, "zoo_data", e.data))
        elif accuracy:
            acc[i] = model_accuracy(model, e.data)
        if verbose and (i % 250 == 0 or i == n - 1):
            print(f"  [{time.perf_counter() - t0:7.1f} s] hashed {i + 1}/{n}", flush=True)
    return runs


# ---------------------------------------------------------------------------------------------- metrics


def _distances(run: HashRun, q: int) -> np.ndarray:
    d = (run.codes ^ run.codes[q]).sum(1)
    d[~run.ok] = run.bits + 1
    if not run.ok[q]:
        d[:] = run.bits + 1
    return d


def _ap(d: np.ndarray, relevant: np.ndarray) -> float:
    """Average precision of ranking by d ascending, ties pessimistic (irrelevant first within a distance)."""
    if not relevant.any():
        return float("nan")
    order = np.lexsort((relevant.astype(np.int8), d))
    rel = relevant[order]
    hits = np.cumsum(rel)
    ranks = np.flatnonzero(rel) + 1
    return float(np.mean(hits[rel] / ranks))


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of 'smaller distance = copy'; ties count one half (Mann-Whitney)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    neg_sorted = np.sort(neg)
    less = len(neg) - np.searchsorted(neg_sorted, pos, side="right")  # negatives farther than the positive
    equal = np.searchsorted(neg_sorted, pos, side="right") - np.searchsorted(neg_sorted, pos, side="left")
    return float((less + 0.5 * equal).sum() / (len(pos) * len(neg)))


def _summary(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {"n": 0}
    return {
        "n": int(len(x)),
        "min": float(x.min()),
        "median": float(np.median(x)),
        "p95": float(np.percentile(x, 95)),
        "max": float(x.max()),
    }


WORKING_DROP = 0.10  # a copy "works" if its accuracy is at most 10 points below its original's


def _working_recall(
    run: HashRun, entries: list, orig_of: np.ndarray, light: np.ndarray, to_orig: np.ndarray, r: int
) -> dict[str, float]:
    """Recall at r over light copies that still work (accuracy measured, within WORKING_DROP of the original),
    and how many light copies are broken: a copy a thief would not publish tells little about the codec."""
    if run.accuracy is None or np.isnan(run.accuracy).all():
        return {}
    acc = run.accuracy
    has = light & (orig_of >= 0) & ~np.isnan(acc)
    base = np.where(orig_of >= 0, acc[np.maximum(orig_of, 0)], np.nan)
    working = has & (acc >= base - WORKING_DROP)
    return {
        "light_working": int(working.sum()),
        "light_broken": int((has & ~working).sum()),
        "recall_light_working": float((to_orig[working] <= r).mean()) if working.any() else float("nan"),
        "recall_light_broken": float((to_orig[has & ~working] <= r).mean()) if (has & ~working).any() else float("nan"),
    }


def _nanmedian(x: list[float]) -> float:
    a = np.asarray(x, float)
    return float(np.median(a[~np.isnan(a)])) if (~np.isnan(a)).any() else float("nan")


def _pct(x: np.ndarray) -> dict[str, float]:
    x = x.astype(float)
    return _summary(x) | {"p1": float(np.percentile(x, 1))} if len(x) else {"n": 0}


def metrics(run: HashRun, library: Any, radius: int | None = None) -> dict[str, Any]:
    """Every number of the benchmark for one HashRun (see the module docstring for definitions)."""
    r = run.radius if radius is None else int(radius)
    entries = library.entries
    index = {e.key: i for i, e in enumerate(entries)}
    orig_of = np.array([index[e.original] if e.original is not None else -1 for e in entries])
    light = np.array([e.light and e.original is not None and e.mclass != "distill" for e in entries])
    distill = np.array([e.mclass == "distill" for e in entries])
    copy = orig_of >= 0
    to_orig = np.full(len(entries), -1)
    queries = [i for i, e in enumerate(entries) if e.original is None]
    pos_light, pos_distill, negs, aps, aps_light, aps_distill = [], [], [], [], [], []
    arch = np.array([e.arch for e in entries])
    negs_same: list[np.ndarray] = []
    negs_other: list[np.ndarray] = []
    arch_pos: dict[str, list[np.ndarray]] = {}
    tp = fp = 0
    fp_originals = 0
    min_distinct_orig = run.bits + 1
    dist_hist = np.zeros(run.bits + 2, np.int64)  # distances of distinct pairs, for radius sweeps
    copy_hist = np.zeros(run.bits + 2, np.int64)  # distances of light copies to their original
    for q in queries:
        d = _distances(run, q)
        mine = orig_of == q
        to_orig[mine] = d[mine]
        distinct = ~mine
        distinct[q] = False
        pos_light.append(d[mine & light])
        pos_distill.append(d[mine & distill])
        negs.append(d[distinct])
        same_arch = distinct & (arch == arch[q])
        negs_same.append(d[same_arch])
        negs_other.append(d[distinct & ~same_arch])
        arch_pos.setdefault(entries[q].arch, []).append(d[mine & light])
        tp += int((d[mine & light] <= r).sum())
        fp += int((d[distinct] <= r).sum())
        others = np.array([j for j in queries if j != q])
        fp_originals += int((d[others] <= r).sum())
        min_distinct_orig = min(min_distinct_orig, int(d[others].min()))
        np.add.at(dist_hist, d[distinct], 1)
        np.add.at(copy_hist, d[mine & light], 1)
        keep = np.ones(len(d), bool)
        keep[q] = False
        aps.append(_ap(d[keep & ~(mine & distill)], (mine & ~distill)[keep & ~(mine & distill)]))
        sel = keep & ~(mine & ~light)
        aps_light.append(_ap(d[sel], (mine & light)[sel]))
        aps_distill.append(_ap(d[keep], mine[keep]))
    pos_l, pos_d, neg = np.concatenate(pos_light), np.concatenate(pos_distill), np.concatenate(negs)
    # the radius that maximizes min(precision, recall) on light copies, from the two histograms
    cum_tp, cum_fp = np.cumsum(copy_hist), np.cumsum(dist_hist)
    prec_r = np.where(cum_tp + cum_fp > 0, cum_tp / np.maximum(cum_tp + cum_fp, 1), 1.0)
    rec_r = cum_tp / max(len(pos_l), 1)
    best = int(np.argmax(np.minimum(prec_r, rec_r)[: run.bits + 1]))
    classes: dict[str, dict[str, Any]] = {}
    for i, e in enumerate(entries):
        if e.original is None:
            continue
        for key in (e.mclass, f"{e.mclass} | {e.strength}"):
            c = classes.setdefault(key, {"d": [], "light": e.light, "failed": 0, "rel": [], "acc": []})
            c["acc"].append(run.accuracy[i] if run.accuracy is not None else float("nan"))
            c["d"].append(to_orig[i])
            c["rel"].append(run.rel_change[i] if run.rel_change is not None else float("nan"))
            c["failed"] += int(not run.ok[i])
    per_class = {}
    for key, c in classes.items():
        d = np.array(c["d"])
        per_class[key] = {
            **_summary(d),
            "recall": float((d <= r).mean()),
            "light": c["light"],
            "failed": c["failed"],
            "rel_change_median": _nanmedian(c["rel"]),
            "accuracy_median": _nanmedian(c["acc"]),
        }
    ok_t = run.ok & (run.seconds > 0)
    return {
        "hasher": run.name,
        "bits": run.bits,
        "radius": r,
        "models": len(entries),
        "originals": len(queries),
        "failed": int((~run.ok).sum()),
        "recall_light": float((pos_l <= r).mean()) if len(pos_l) else float("nan"),
        **_working_recall(run, entries, orig_of, light, to_orig, r),
        "precision_light": tp / (tp + fp) if tp + fp else 1.0,
        "false_positive_pairs": fp,
        "false_positive_original_pairs": fp_originals // 2,
        "min_distance_distinct_originals": min_distinct_orig,
        "distinct_pair_distances": _summary(neg.astype(float)) | {"p1": float(np.percentile(neg, 1))},
        "distinct_same_arch": _pct(np.concatenate(negs_same)),
        "distinct_other_arch": _pct(np.concatenate(negs_other)),
        "per_arch": {
            a_: {"n": int(sum(len(x) for x in v)), "recall": float((np.concatenate(v) <= r).mean())}
            for a_, v in arch_pos.items()
        },
        "recall_distill": float((pos_d <= r).mean()) if len(pos_d) else float("nan"),
        "mAP": float(np.nanmean(aps)),
        "mAP_light": float(np.nanmean(aps_light)),
        "mAP_with_distill": float(np.nanmean(aps_distill)),
        "auc_light": _auc(pos_l.astype(float), neg.astype(float)),
        "auc_distill": _auc(pos_d.astype(float), neg.astype(float)),
        "best_radius": best,
        "best_radius_precision": float(prec_r[best]),
        "best_radius_recall": float(rec_r[best]),
        "hash_ms_median": float(np.median(run.seconds[ok_t]) * 1e3) if ok_t.any() else float("nan"),
        "hash_ms_per_mparam_median": float(np.median(run.seconds[ok_t] / (run.params[ok_t] / 1e6)) * 1e3)
        if ok_t.any()
        else float("nan"),
        "per_class": per_class,
        "errors": dict(list(run.errors.items())[:10]),
        "copy": int(copy.sum()),
        "originals_accuracy_median": _nanmedian([run.accuracy[q] for q in queries])
        if run.accuracy is not None
        else float("nan"),
    }


def decided_lines(results: Mapping[str, dict[str, Any]]) -> list[str]:
    """The `decided` measurement (light copies found as a query decides) of each hasher that has it."""
    out = []
    for name, m in results.items():
        dec = m.get("decided")
        if not dec:
            continue
        classes = ", ".join(f"{c} {v:.3f}" for c, v in dec["per_class"].items())
        out += [f"**As a query decides** ({name}; hashdb.matching's rule in a database of every zoo entry: whole code "
                f"within the decision radius for that size, {dec['radius_2d']} bits for 2-D suspects and "
                f"{dec['radius_other']} otherwise, or two layer twins with a 'copy' verdict): light-copy recall "
                f"{dec['recall_light']:.4f} of {dec['light']} ({dec['by_layers']} by layers only; {classes}); "
                + (f"over the {dec['working']} that still work (accuracy within {WORKING_DROP * 100:.0f} points of "
                   f"the original's) {dec['recall_working']:.4f}, over the {dec['broken']} broken ones "
                   f"{dec['recall_broken']:.4f}; " if "working" in dec else "")
                + f"entries of other originals reported as copies: {dec['false_flags']} over {dec['queries']} "
                f"queries (distilled students left out), {dec.get('false_same_seed', '?')} of them derived from an "
                f"original trained from the query's own seed (a shared initialisation); "
                f"{dec.get('false_originals', '?')} pairs of originals involved."
                + (" Working light copies missed, by class and strength: "
                   + ", ".join(f"{k} {v}" for k, v in dec["missed_working"].items()) + "; by architecture: "
                   + ", ".join(f"{k} {v}" for k, v in dec["missed_working_arch"].items()) + "."
                   if dec.get("missed_working") else ""), ""]  # fmt: skip
    return out


def decided(run: HashRun, library: Any) -> dict[str, Any] | None:
    """Light copies found as ``hashdb query`` decides: every zoo entry goes into a HashDB (model and layer codes,
    the hasher's config) and each original is queried with hashdb.matching.find_matches at its defaults (the
    decision radius for that many codes and the original's kernel family, or >= 2 layer twins with a 'copy'
    verdict). Recall: light copies reported as copies of their own original; false: entries derived from
    another original reported (distilled students left out: they share no weights). None for hashers without
    layer codes."""
    if run.config is None:
        return None
    import tempfile

    from hashdb import HashDB
    from hashdb.codec.radius import decision_radius
    from hashdb.matching import find_matches

    entries = library.entries
    n = len(entries)
    index = {e.key: i for i, e in enumerate(entries)}
    root = np.array([i if e.original is None else index[e.original] for i, e in enumerate(entries)])
    light = np.array([e.light and e.original is not None and e.mclass != "distill" for e in entries])
    distill = np.array([e.mclass == "distill" for e in entries])
    stored = [i for i in range(n) if run.ok[i]]
    found = np.zeros(n, bool)
    by_layers = np.zeros(n, bool)
    false_flags = 0
    same_seed = 0  # of them, entries of an original trained from the same seed (shared initialisation)
    false_pairs: set[tuple[int, int]] = set()  # (query, other original) pairs with a false flag
    queries = [i for i, e in enumerate(entries) if e.original is None and run.ok[i]]
    with tempfile.TemporaryDirectory() as tmp:
        db = HashDB(os.path.join(tmp, "db"), bits=run.bits, codec=run.config, durable=False)
        try:
            db.insert_many([entries[i].key for i in stored], [np.packbits(run.codes[i]).tobytes() for i in stored],
                           layers=[run.layers.get(i, []) for i in stored])  # fmt: skip
            for q in queries:
                code = np.packbits(run.codes[q]).tobytes()
                for m in find_matches(db, code, run.layers.get(q, []), family=run.families.get(q)):
                    j = index[m.key]
                    if m.verdict != "copy" or j == q:
                        continue
                    if root[j] == q:
                        found[j] = True
                        by_layers[j] = m.kind == "partial"
                    elif not distill[j]:
                        false_flags += 1
                        same_seed += entries[root[j]].seed == entries[q].seed
                        false_pairs.add((q, int(root[j])))
        finally:
            db.close()
    lights = light & run.ok
    working: dict[str, Any] = {}
    if run.accuracy is not None and not np.isnan(run.accuracy).all():  # --accuracy: copies that still work
        acc = run.accuracy
        ok_acc = lights & ~np.isnan(acc) & ~np.isnan(acc[root])
        works = ok_acc & (acc >= acc[root] - WORKING_DROP)
        missed: dict[str, int] = {}
        missed_arch: dict[str, int] = {}
        for j in np.flatnonzero(works & ~found):
            label = f"{entries[j].mclass} {entries[j].strength}"
            missed[label] = missed.get(label, 0) + 1
            missed_arch[entries[j].arch] = missed_arch.get(entries[j].arch, 0) + 1
        working = {"working": int(works.sum()), "broken": int((ok_acc & ~works).sum()),
                   "recall_working": float(found[works].mean()) if works.any() else float("nan"),
                   "recall_broken": float(found[ok_acc & ~works].mean()) if (ok_acc & ~works).any() else float("nan"),
                   "missed_working": dict(sorted(missed.items(), key=lambda kv: -kv[1])),
                   "missed_working_arch": dict(sorted(missed_arch.items(), key=lambda kv: -kv[1]))}
    mclass = np.array([e.mclass for e in entries])
    return {**working, "recall_light": float(found[lights].mean()) if lights.any() else float("nan"),
            "by_layers": int((found & by_layers & lights).sum()), "light": int(lights.sum()),
            "false_flags": false_flags, "queries": len(queries), "false_same_seed": same_seed,
            "false_originals": len(false_pairs),
            "radius_2d": decision_radius(run.config, n, "2d"), "radius_other": decision_radius(run.config, n, None),
            "per_class": {c: float(found[lights & (mclass == c)].mean()) for c in sorted(set(mclass[lights]))}}


def truncated(run: HashRun, bits: int) -> HashRun:
    """A chain codec's run at a shorter length from its codes at a longer one: each feature does not depend on the
    code length, so the first ``bits`` bits of a code (and of each layer code) are the shorter code, bit for bit
    (checked in tests/test_codec_v4.py). The radius and config are that length's."""
    from hashdb.codec import ModelHasher

    if run.config is None or bits > run.bits or bits % 8:
        raise ValueError(f"cannot cut a {run.bits}-bit run without a codec config to {bits} bits")
    stored = {k: v for k, v in run.config.items() if k != "radius_fraction"}
    config = ModelHasher.from_config(stored | {"bits": bits}).config
    return HashRun(run.name, bits, config["copy_radius"], run.codes[:, :bits], run.ok, run.seconds, run.params,
                   run.errors, run.rel_change, run.accuracy, run.families,
                   {i: [(name, code[: bits // 8]) for name, code in layers] for i, layers in run.layers.items()},
                   config)  # fmt: skip


def lengths_table(run: HashRun, library: Any, lengths: list[int]) -> list[str]:
    """One row per code length: whole codes at the conservative copy radius, and light copies found as a query
    decides (decided), the weak classes on their own."""
    rows = []
    for bits in lengths:
        cut = truncated(run, bits)
        m, dec = metrics(cut, library), decided(cut, library)
        assert dec is not None
        per = dec["per_class"]
        rows.append(
            f"| {bits} | {cut.radius} | {m['recall_light']:.4f} | {m['precision_light']:.4f} | {m['mAP']:.4f} | "
            f"{dec['radius_2d']} / {dec['radius_other']} | {dec['recall_light']:.4f} | "
            f"{dec.get('recall_working', float('nan')):.4f} | {dec.get('recall_broken', float('nan')):.4f} | "
            f"{dec['by_layers']} | {per.get('transfer', float('nan')):.3f} | "
            f"{per.get('prune_magnitude', float('nan')):.3f} | {per.get('prune_filters', float('nan')):.3f} | "
            f"{per.get('prune_recover', float('nan')):.3f} | "
            f"{per.get('combo', float('nan')):.3f} | {dec['false_flags']} ({dec['false_same_seed']} same seed; "
            f"{dec['false_originals']} pairs of originals) |"
        )
    return [
        "| bits | copy radius | recall light at it (whole code) | precision light | mAP | decision radius 2-D / other "
        "| as a query decides: light | working | broken | by layers only | transfer | magnitude pruning | "
        "filter pruning | pruning + recovery | combinations | other originals' entries reported (same seed; pairs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def evaluate_many(
    hashers: Mapping[str, Hasher],
    library: Any,
    radius: int | None = None,
    verbose: bool = False,
    accuracy: bool = False,
) -> dict[str, dict[str, Any]]:
    """Metrics for several hashers over one materialization pass of ``library``."""
    runs = hash_all(hashers, library, verbose=verbose, accuracy=accuracy)
    return {name: metrics(run, library, radius) | {"decided": decided(run, library)} for name, run in runs.items()}


def evaluate(hasher: Hasher, library: Any, radius: int | None = None) -> dict[str, Any]:
    """Metrics of one hasher on ``library`` (a bench.zoo.Library) at ``radius`` (default hasher.copy_radius)."""
    return evaluate_many({"hasher": hasher}, library, radius)["hasher"]


# ------------------------------------------------------------------------------------- big-model timing


def resnet50_state_dict(seed: int = 0) -> dict[str, Any]:
    """Random tensors with ResNet-50's shapes (25.6M parameters, bottleneck blocks, BN, fc), in memory."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5

    def bn(name: str, c: int) -> None:
        sd[f"{name}.weight"], sd[f"{name}.bias"] = torch.ones(c), torch.zeros(c)
        sd[f"{name}.running_mean"], sd[f"{name}.running_var"] = torch.zeros(c), torch.ones(c)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(0)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for li, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            conv(f"{p}.conv1", width, cin, 1)
            bn(f"{p}.bn1", width)
            conv(f"{p}.conv2", width, width, 3)
            bn(f"{p}.bn2", width)
            conv(f"{p}.conv3", width * 4, width, 1)
            bn(f"{p}.bn3", width * 4)
            if b == 0:
                conv(f"{p}.downsample.0", width * 4, cin, 1)
                bn(f"{p}.downsample.1", width * 4)
            cin = width * 4
    sd["fc.weight"] = torch.randn(1000, 2048, generator=g) * 0.01
    sd["fc.bias"] = torch.zeros(1000)
    return sd


def mobilenet_v2_state_dict(seed: int = 0) -> dict[str, Any]:
    """Random tensors with MobileNetV2's shapes (2.2M convolution parameters: inverted residual blocks, a 1x1
    expansion, a 3x3 depthwise and a 1x1 projection each; BN, classifier), in memory. 97 % of its convolution
    parameters are in 1x1 layers, which codec v2 never read: the family where v2 is cheapest and the chain
    codecs, which read every layer and pay per channel and per layer, dearest."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Any] = {}

    def conv_bn(name: str, cout: int, cin_per_group: int, k: int) -> None:
        scale = (2.0 / (cin_per_group * k * k)) ** 0.5
        sd[f"{name}.0.weight"] = torch.randn(cout, cin_per_group, k, k, generator=g) * scale
        sd[f"{name}.1.weight"], sd[f"{name}.1.bias"] = torch.ones(cout), torch.zeros(cout)
        sd[f"{name}.1.running_mean"], sd[f"{name}.1.running_var"] = torch.zeros(cout), torch.ones(cout)

    conv_bn("features.0", 32, 3, 3)
    cin, i = 32, 1
    for t, c, n in [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]:
        for _ in range(n):
            hidden, j = cin * t, 0
            if t != 1:
                conv_bn(f"features.{i}.conv.{j}", hidden, cin, 1)
                j += 1
            conv_bn(f"features.{i}.conv.{j}", hidden, 1, 3)
            conv_bn(f"features.{i}.conv.{j + 1}", c, hidden, 1)
            cin, i = c, i + 1
    conv_bn(f"features.{i}", 1280, cin, 1)
    sd["classifier.1.weight"] = torch.randn(1000, 1280, generator=g) * 0.01
    sd["classifier.1.bias"] = torch.zeros(1000)
    return sd


def time_big(hasher: Hasher, repeats: int = 3) -> dict[str, float]:
    """Median seconds to hash a ResNet-50-sized state_dict (after one warm-up) on one thread."""
    import torch

    torch.set_num_threads(1)
    sd = resnet50_state_dict()
    n = sum(v.numel() for v in sd.values() if v.is_floating_point())
    hasher.hash(sd)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        hasher.hash(sd)
        times.append(time.perf_counter() - t)
    return {"params": float(n), "seconds": float(np.median(times))}


# --------------------------------------------------------------------------------------------- reporting


def _f(x: float, nd: int = 3) -> str:
    return "nan" if x != x else f"{x:.{nd}f}"


def _mpm(x: Mapping[str, float]) -> str:
    return f"{x['min']:.0f} / {x['p1']:.0f} / {x['median']:.0f}" if x.get("n") else "-"


def arch_table(results: Mapping[str, dict[str, Any]]) -> str:
    names = list(results)
    archs = list(results[names[0]]["per_arch"])
    head = (
        "| architecture | light copies | "
        + " | ".join(f"{n} recall" for n in names)
        + " |\n|"
        + "---|" * (2 + len(names))
    )
    rows = [
        f"| {a} | {results[names[0]]['per_arch'][a]['n']} | "
        + " | ".join(f"{results[n]['per_arch'][a]['recall']:.3f}" for n in names)
        + " |"
        for a in archs
    ]
    return head + "\n" + "\n".join(rows)


def summary_table(results: Mapping[str, dict[str, Any]], big: Mapping[str, dict[str, float]]) -> str:
    head = (
        "| hasher | r | failed | recall light | precision light | mAP | mAP light | mAP +distill | AUC light | "
        "AUC distill | recall distill | best r (P/R) | min d distinct originals | ms/model | ms/Mparam | "
        "25.6M model s |\n|" + "---|" * 16
    )
    rows = []
    for name, m in results.items():
        b = big.get(name, {})
        rows.append(
            f"| {name} | {m['radius']} | {m['failed']} | {_f(m['recall_light'], 4)} | {_f(m['precision_light'], 4)} | "
            f"{_f(m['mAP'], 4)} | {_f(m['mAP_light'], 4)} | {_f(m['mAP_with_distill'], 4)} | "
            f"{_f(m['auc_light'], 4)} | {_f(m['auc_distill'], 3)} | {_f(m['recall_distill'], 3)} | "
            f"{m['best_radius']} ({_f(m['best_radius_precision'], 3)}/{_f(m['best_radius_recall'], 3)}) | "
            f"{m['min_distance_distinct_originals']} | {_f(m['hash_ms_median'], 2)} | "
            f"{_f(m['hash_ms_per_mparam_median'], 1)} | {_f(b.get('seconds', float('nan')), 3)} |"
        )
    return head + "\n" + "\n".join(rows)


def class_table(m: Mapping[str, Any], detail: bool = True) -> str:
    """Distance to the original per modification class (and strength): n, min/median/p95/max, recall@r."""
    head = (
        f"| class | strength | light | n | failed | min | median | p95 | max | recall@{m['radius']} | "
        "median weight change | median accuracy |\n|" + "---|" * 12
    )
    rows = []
    for key in sorted(m["per_class"]):
        c = m["per_class"][key]
        if detail and "|" not in key:
            continue
        cls, _, strength = key.partition(" | ")
        rows.append(
            f"| {cls} | {strength or 'all'} | {'yes' if c['light'] else 'no'} | {c['n']} | {c['failed']} | "
            f"{c['min']:.0f} | {c['median']:.0f} | {c['p95']:.0f} | {c['max']:.0f} | {c['recall']:.3f} | "
            f"{_f(c['rel_change_median'], 3)} | {_f(c['accuracy_median'], 3)} |"
        )
    return head + "\n" + "\n".join(rows)


def recall_by_class_table(results: Mapping[str, dict[str, Any]]) -> str:
    names = list(results)
    first = results[names[0]]
    classes = sorted(k for k in first["per_class"] if "|" not in k)
    head = "| class | n | " + " | ".join(f"{n} median d / recall" for n in names) + " |\n|" + "---|" * (2 + len(names))
    rows = []
    for c in classes:
        cells = [
            f"{results[n]['per_class'][c]['median']:.0f} / {results[n]['per_class'][c]['recall']:.3f}" for n in names
        ]
        rows.append(f"| {c} | {first['per_class'][c]['n']} | " + " | ".join(cells) + " |")
    return head + "\n" + "\n".join(rows)


def composition_table(library: Any) -> str:
    rows: dict[str, list[int]] = {}
    for e in library.entries:
        r = rows.setdefault(e.mclass, [0, 0])
        r[0] += 1
        r[1] += int(e.light and e.original is not None and e.mclass != "distill")
    archs: dict[str, int] = {}
    for e in library.originals:
        archs[f"{e.arch}/{e.data}"] = archs.get(f"{e.arch}/{e.data}", 0) + 1
    body = "| class | models | of which light |\n|---|---|---|\n"
    body += "\n".join(f"| {k} | {v[0]} | {v[1]} |" for k, v in sorted(rows.items()))
    body += f"\n| total | {len(library.entries)} | {sum(v[1] for v in rows.values())} |\n\n"
    body += "originals (architecture/training data: count): " + ", ".join(f"{k}: {v}" for k, v in sorted(archs.items()))
    return body


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Codec benchmark on the bench.zoo model library")
    ap.add_argument("--quick", action="store_true", help="small library smoke run (prints only unless --write)")
    ap.add_argument("--bits", type=int, default=None, help="code length (default: hashdb.DEFAULT_BITS)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="also score the ModelHasher at these code lengths (hashed once at the longest; section "
                         "'codec_lengths')")  # fmt: skip
    ap.add_argument("--hasher-kwargs", default="{}", help="JSON dict of ModelHasher tunables")
    ap.add_argument("--radius", type=int, default=None, help="Hamming radius (default: the hasher's copy_radius)")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--n-min", type=int, default=3565)
    ap.add_argument("--cache", default=None, help="zoo cache directory (default bench/cache/zoo)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the 25.6M-parameter timing (median)")
    ap.add_argument("--accuracy", action="store_true", help="also measure each copy's test accuracy (slower)")
    ap.add_argument("--json", default=None, help="also dump every metric to this JSON file")
    ap.add_argument("--write", action="store_true", help="write the 'codec' section even with --quick")
    ap.add_argument("--no-write", action="store_true", help="never write bench/RESULTS.md")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from bench import zoo
    from bench._results import machine_line, write_section
    from hashdb import DEFAULT_BITS

    args.bits = args.bits or DEFAULT_BITS
    lengths = sorted(set(args.lengths or []) | ({args.bits} if args.lengths else set()))
    kwargs = json.loads(args.hasher_kwargs)
    hashers: dict[str, Hasher] = {}
    try:
        from hashdb.codec import ModelHasher

        hashers["ModelHasher"] = ModelHasher(max(lengths) if lengths else args.bits, **kwargs)
    except ImportError as exc:
        print(f"hashdb.codec unavailable ({exc}); baselines only", file=sys.stderr)
    if not args.no_baselines or not hashers:
        hashers["segment mean/std"] = SegmentStatsHasher(args.bits)
        hashers["random projection"] = RandomProjectionHasher(args.bits)

    t0 = time.perf_counter()
    if args.quick:
        library = zoo.small_library()
    else:
        library = zoo.build_library(args.n_min, cache_dir=args.cache or zoo.DEFAULT_CACHE, verbose=True)
    t_lib = time.perf_counter() - t0
    print(f"library: {len(library)} models ({t_lib:.1f} s to build/load)", flush=True)
    t0 = time.perf_counter()
    runs = hash_all(hashers, library, verbose=True, accuracy=args.accuracy)
    t_hash = time.perf_counter() - t0
    full = runs.get("ModelHasher")
    if lengths and full is not None:  # hashed at the longest length: score the default one here
        runs["ModelHasher"] = truncated(full, args.bits)
        hashers["ModelHasher"] = ModelHasher(args.bits, **kwargs)
    results = {name: metrics(run, library, args.radius) | {"decided": decided(run, library)}
               for name, run in runs.items()}  # fmt: skip
    big = {name: time_big(h, 1 if args.quick else args.repeats) for name, h in hashers.items()}

    main_name = next(iter(hashers))
    config = getattr(hashers[main_name], "config", kwargs)
    cmd = "python3 bench/codec_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = [
        "## Codec: copy detection on the model zoo",
        "",
        f"`nice -n 10 {cmd.strip()}`",
        "",
        machine_line() + "; one thread (OMP/MKL/NUMBA/torch threads = 1)",
        "",
        f"{main_name} config: `{json.dumps(config)}`. Library built/loaded in {t_lib:.0f} s, materialized and "
        f"hashed by {len(hashers)} hashers in {t_hash:.0f} s. Definitions: docs/codec_bench.md. "
        f"Big model: random ResNet-50 shapes, {big[main_name]['params'] / 1e6:.1f}M parameters, median of "
        f"{1 if args.quick else args.repeats} after a warm-up."
        + (
            f" Median test accuracy of the originals on their own task: "
            f"{results[main_name]['originals_accuracy_median']:.3f} (first {ACCURACY_IMAGES} test images)."
            + " Light copies that still work (accuracy at most "
            f"{WORKING_DROP * 100:.0f} points below the original's): "
            + ", ".join(
                f"{n}: {m.get('light_working', 0)} working "
                f"(recall {_f(m.get('recall_light_working', float('nan')), 4)}) / {m.get('light_broken', 0)} "
                f"broken (recall {_f(m.get('recall_light_broken', float('nan')), 4)})"
                for n, m in results.items()
            )
            + "."
            if args.accuracy
            else ""
        ),
        "",
        summary_table(results, big),
        "",
        *decided_lines(results),
        "### Recall at each hasher's radius and median distance to the original, per modification class",
        "",
        recall_by_class_table(results),
        "",
        "### Recall of light copies at each hasher's radius, per architecture",
        "",
        arch_table(results),
        "",
        f"### {main_name}: distance to the original per class and strength",
        "",
        class_table(results[main_name]),
        "",
        "### Distinct pairs (original vs every model not derived from it)",
        "",
        "| hasher | pairs | min | p1 | median | max | false-positive pairs at r | of which original-original | "
        "same arch: min / p1 / median | other arch: min / p1 / median |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {n} | {m['distinct_pair_distances']['n']} | {m['distinct_pair_distances']['min']:.0f} | "
            f"{m['distinct_pair_distances']['p1']:.0f} | {m['distinct_pair_distances']['median']:.0f} | "
            f"{m['distinct_pair_distances']['max']:.0f} | {m['false_positive_pairs']} | "
            f"{m['false_positive_original_pairs']} | {_mpm(m['distinct_same_arch'])} | "
            f"{_mpm(m['distinct_other_arch'])} |"
            for n, m in results.items()
        ],
        "",
        "### Library composition",
        "",
        composition_table(library),
    ]
    errors = {n: m["errors"] for n, m in results.items() if m["errors"]}
    if errors:
        body += ["", "Hash failures (first few): " + json.dumps(errors)[:1500]]
    text = "\n".join(body)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "big": big}, indent=1, default=str))
    if (not args.quick or args.write) and not args.no_write:
        write_section("codec", text)
        print("\nwrote section 'codec' of bench/RESULTS.md")
    if lengths and full is not None:
        text = "\n".join([
            "## Codec: the zoo at each code length (bench/codec_bench.py --lengths)",
            "",
            f"`nice -n 10 {cmd.strip()}`; {machine_line()}",
            "",
            f"The ModelHasher (`{hashers['ModelHasher'].config['codec']}`) hashed every zoo entry once at "
            f"{max(lengths)} bits; each shorter code is the first bits of that one, bit for bit (model and layer "
            "codes). Whole-code columns at the conservative copy radius of each length; 'as a query decides' puts "
            "every entry into a HashDB and queries each original with hashdb.matching.find_matches (the decision "
            "radius for that many codes and the suspect's kernel family, or two layer twins). Working / broken: light "
            f"copies whose accuracy is within {WORKING_DROP * 100:.0f} points of the original's, or not "
            "(`--accuracy`). Other originals' entries: copies of another original reported as copies; 'same seed' "
            "when that original was trained from the query's own seed (the zoo seeds every architecture alike, so "
            "they share first-layer initialisations).",
            "",
            *lengths_table(full, library, lengths),
        ])
        print("\n" + text)
        if (not args.quick or args.write) and not args.no_write:
            write_section("codec_lengths", text)
            print("\nwrote section 'codec_lengths' of bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
