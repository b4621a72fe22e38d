"""The self-join on Ray, beside the local one (hashdb.index.join): the codes go once into the object store and
one task per block of rows computes its pairs with the same kernels. Ray is optional (hashdb[ray])."""

from __future__ import annotations

from typing import Any

from ..raycluster import import_ray, ray_init


def _join_block(codes: Any, r: int, i0: int, i1: int, j0: int, j1: int) -> tuple[Any, Any, Any]:
    from .join import rectangle_join

    return rectangle_join(codes, r, i0, i1, j0, j1)


def ray_self_join(codes: Any, r: int, *, address: str | None = None, block_rows: int | None = None) -> tuple:
    """``hashdb.index.join.self_join`` on Ray: the (n, words) uint64 codes go once into the object store, and
    one task per (rows x rows) block with i-block <= j-block returns its pairs. Same answer as the local join."""
    import numpy as np

    ray = import_ray()
    started = ray_init(address)
    try:
        n = int(codes.shape[0])
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        # About 4 blocks per CPU along the triangle, so stragglers do not decide the wall time.
        step = block_rows or max(1024, -(-n // max(1, int((8 * cpus) ** 0.5 + 0.5))))
        ref = ray.put(np.ascontiguousarray(codes, dtype=np.uint64))
        task = ray.remote(num_cpus=1)(_join_block)
        futures = [
            task.remote(ref, int(r), a, min(a + step, n), b, min(b + step, n))
            for a in range(0, n, step)
            for b in range(a, n, step)
        ]
        parts = ray.get(futures)
    finally:
        if started:
            ray.shutdown()
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))
