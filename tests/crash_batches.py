"""The write sequence of tests/test_crash.py, a pure function of the batch number (shared with its writers)."""

from __future__ import annotations

import numpy as np

BITS = 64


def size(i: int) -> int:
    return 1 + i * 37 % 60


Layers = list[tuple[str, bytes]]


def batch(i: int) -> tuple[str, list[str], np.ndarray | None, list[dict | None] | None, list[Layers | None] | None]:
    """The i-th write of the sequence, a pure function of i: ("put", keys, codes, metas, layers) or
    ("delete", keys)."""
    rng = np.random.default_rng(1000 + i)
    if i % 3 == 2:  # delete the batch before last (keeps the database small), and a key that never existed
        keys = [f"b{i - 2:05d}-{j:03d}" for j in range(size(i - 2))] + [f"never-{i}"]
        return "delete", keys, None, None, None
    keys = [f"b{i:05d}-{j:03d}" for j in range(size(i))]
    if i >= 3:  # and replace a few keys of an earlier surviving batch (new code, meta and layers dropped or replaced)
        keys += [f"b{i - 3 - i % 3:05d}-{j:03d}" for j in range(min(5, size(i - 3 - i % 3)))]
    codes = rng.integers(0, 256, (len(keys), BITS // 8), dtype=np.uint8)
    metas = [{"b": i, "j": j} if j % 3 == 0 else None for j in range(len(keys))]
    layer_codes = rng.integers(0, 256, (len(keys), 3, BITS // 8), dtype=np.uint8)
    layers: list[Layers | None] = [
        None if (i + j) % 4 == 0 else [(f"conv{p}", layer_codes[j, p].tobytes()) for p in range((i + j) % 4)]
        for j in range(len(keys))
    ]
    return "put", keys, codes, metas, layers


def apply(state: dict[str, tuple[bytes, dict | None, Layers]], i: int) -> None:
    op, keys, codes, metas, layers = batch(i)
    if op == "delete":
        for k in keys:
            state.pop(k, None)
    else:
        assert codes is not None and metas is not None and layers is not None
        for k, c, m, ls in zip(keys, codes, metas, layers, strict=True):
            state[k] = (c.tobytes(), m, ls or [])
