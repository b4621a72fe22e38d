"""Order a group of related models into a derivation tree.

The tree's edges are a minimum spanning tree of the code distances (the closest relative is the likeliest
parent; MoTHer builds its trees the same way). Its root is the estimated original: by MoTHer's rule the
model whose weights have the lowest kurtosis, measured on the layers it shares with each other model
(summed log-kurtosis margins over all pairs). Where a model's file cannot be read any more, the root is the
medoid of the code distances instead, and the tree says so (``rooted_by``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..codec.load import load_tensors
from ..errors import HashDBError, ModelFormatError
from .align import Layer, align_layers, model_layers
from .compare import kurtosis


def hamming(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


def _spanning_tree(keys: list[str], dist: np.ndarray, root: int) -> list[tuple[str, str, int]]:
    """Prim's minimum spanning tree grown from ``root``: (parent, child, distance), parents first."""
    n = len(keys)
    inside = np.zeros(n, dtype=bool)
    inside[root] = True
    best = dist[root].astype(np.float64).copy()
    via = np.full(n, root)
    edges = []
    for _ in range(n - 1):
        candidates = np.where(inside, np.inf, best)
        child = int(np.argmin(candidates))  # ties: the lowest index, so the tree does not depend on luck
        edges.append((keys[int(via[child])], keys[child], int(dist[via[child], child])))
        inside[child] = True
        closer = ~inside & (dist[child] < best)
        best[closer] = dist[child][closer]
        via[closer] = child
    return edges


def _kurtosis_margins(layers: list[list[Layer]]) -> np.ndarray:
    """margin[i, j]: mean log(kurtosis of j / kurtosis of i) over the layers i and j share (> 0: j looks
    derived from i); 0 where they share none."""
    n = len(layers)
    margin = np.zeros((n, n))
    kurt = [[kurtosis(layer.weights) for layer in model] for model in layers]
    for i in range(n):
        for j in range(i + 1, n):
            pairs = align_layers(layers[i], layers[j])
            ratios = [math.log(kurt[j][b] / kurt[i][a]) for a, b in pairs if kurt[i][a] > 0 and kurt[j][b] > 0]
            if ratios:
                margin[i, j] = float(np.mean(ratios))
                margin[j, i] = -margin[i, j]
    return margin


def derivation_tree(codes: Mapping[str, bytes], files: Mapping[str, Any]) -> dict[str, Any]:
    """The derivation tree of the models ``codes`` (key -> code); ``files`` maps keys to a model source
    (a path, or any object load_tensors reads) or None.

    Returns {"root", "rooted_by": "kurtosis" | "medoid", "edges": [[parent, child, distance]],
    "unreadable": [keys], "scores": {key: summed kurtosis margin as parent}} and, for a medoid root, a
    "note" saying why.
    """
    keys = list(codes)
    if not keys:
        raise ValueError("derivation_tree needs at least one model")
    dist = np.array([[hamming(codes[a], codes[b]) for b in keys] for a in keys], dtype=np.int64)
    layers: list[list[Layer]] = []
    unreadable = []
    for key in keys:
        source = files.get(key)
        if isinstance(source, str | os.PathLike) and not os.path.exists(source):
            source = None
        try:
            found = model_layers(load_tensors(source)) if source is not None else []
        except (HashDBError, OSError):
            found = []
        if not found:
            unreadable.append(key)
        layers.append(found)
    tree: dict[str, Any] = {"unreadable": unreadable}
    if unreadable or len(keys) == 1:
        root = int(np.argmin(dist.sum(axis=1)))
        tree.update(rooted_by="medoid", scores={})
        if unreadable:
            tree["note"] = (f"{len(unreadable)} of {len(keys)} model files cannot be read: the root is the medoid "
                            "of the code distances, not the estimated original")  # fmt: skip
    else:
        scores = _kurtosis_margins(layers).sum(axis=1)
        root = int(np.argmax(scores))
        tree.update(rooted_by="kurtosis", scores={k: float(s) for k, s in zip(keys, scores, strict=True)})
    tree["root"] = keys[root]
    tree["edges"] = [list(edge) for edge in _spanning_tree(keys, dist, root)]
    return tree


def model_file(key: str, meta: Mapping[str, Any] | None) -> str | None:
    """Where a stored model's file is: its meta's "path", else its key (file-added models are keyed by path),
    when that names an existing file or folder."""
    for candidate in ((meta or {}).get("path"), key):
        if isinstance(candidate, str) and candidate and os.path.exists(candidate):
            return candidate
    return None


def stored_model_file(db: Any, key: str) -> str:
    """The readable file of stored model ``key`` of ``db`` (a HashDB); KeyNotFound if not stored,
    ModelFormatError if its file cannot be found any more."""
    _, meta = db.get(key)
    path = model_file(key, meta)
    if path is None:
        raise ModelFormatError(f"{key}: stored in {db.path}, but its model file is not readable here")
    return path


def cluster_tree(db: Any, keys: list[str]) -> dict[str, Any]:
    """``derivation_tree`` of stored models ``keys`` of ``db`` (a HashDB), reading the files the keys or their
    meta name."""
    codes, files = {}, {}
    for key in keys:
        code, meta = db.get(key)
        codes[key] = code
        files[key] = model_file(key, meta)
    return derivation_tree(codes, files)
