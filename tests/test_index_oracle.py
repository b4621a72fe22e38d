"""MemoryIndex equals a brute-force oracle, for every structure and the planner, through random histories."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashdb.index import MemoryIndex, base

STRUCTURES = (None, "scan", "mih", "bktree")


class Oracle:
    """The specification: a dict of id -> code bytes and pure-numpy popcounts."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.codes: dict[int, np.ndarray] = {}

    def distances(self, query: np.ndarray) -> dict[int, int]:
        if not self.codes:
            return {}
        ids = list(self.codes)
        mat = np.stack([self.codes[i] for i in ids])
        xor = (mat ^ query[None, :]).view(np.uint8)
        d = np.unpackbits(xor, axis=1).sum(axis=1)
        return dict(zip(ids, d.tolist(), strict=True))

    def radius(self, query: np.ndarray, r: int) -> dict[int, int]:
        return {i: d for i, d in self.distances(query).items() if d <= r}

    def knn(self, query: np.ndarray, k: int) -> dict[int, int]:
        dist = self.distances(query)
        if len(dist) <= k:
            return dist
        kth = sorted(dist.values())[k - 1]
        return {i: d for i, d in dist.items() if d <= kth}


def as_dict(result: tuple[np.ndarray, np.ndarray]) -> dict[int, int]:
    ids, dists = result
    assert ids.dtype == np.int64 and dists.dtype == np.int32
    assert ids.shape == dists.shape
    out = dict(zip(ids.tolist(), dists.tolist(), strict=True))
    assert len(out) == ids.size, "an id was returned twice"
    return out


def make_codes(rng: np.random.Generator, n: int, words: int, clustered: bool) -> np.ndarray:
    """Uniform codes, or codes a few bit flips away from a handful of centres (so substring buckets
    collide and exact duplicates occur)."""
    if not clustered:
        return rng.integers(0, 2**64, size=(n, words), dtype=np.uint64)
    centres = rng.integers(0, 2**64, size=(max(1, n // 16), words), dtype=np.uint64)
    codes = centres[rng.integers(0, centres.shape[0], n)].copy()
    flips = rng.integers(0, 4, n)
    for row in range(n):
        for bit in rng.integers(0, words * 64, flips[row]):
            codes[row, bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    return codes


def near(rng: np.random.Generator, code: np.ndarray, flips: int) -> np.ndarray:
    q = code.copy()
    for bit in rng.choice(code.size * 64, size=min(flips, code.size * 64), replace=False):
        q[bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    return q


@contextmanager
def small_compaction_thresholds() -> Iterator[None]:
    """Make deltas and tombstones trigger rebuilds after a handful of changes, so small tests see them."""
    saved = base.PENDING_MIN, base.PENDING_FRACTION, base.TOMBSTONE_FRACTION
    base.PENDING_MIN, base.PENDING_FRACTION, base.TOMBSTONE_FRACTION = 3, 4, 3
    try:
        yield
    finally:
        base.PENDING_MIN, base.PENDING_FRACTION, base.TOMBSTONE_FRACTION = saved


def check_queries(index: MemoryIndex, oracle: Oracle, rng: np.random.Generator) -> None:
    words = index.words
    queries = [rng.integers(0, 2**64, size=words, dtype=np.uint64)]
    if oracle.codes:
        some = list(oracle.codes)[int(rng.integers(0, len(oracle.codes)))]
        queries += [oracle.codes[some].copy(), near(rng, oracle.codes[some], int(rng.integers(1, 12)))]
    radii = sorted({0, int(rng.integers(0, 24)), int(rng.integers(0, index.bits // 3)), index.bits})
    for q in queries:
        for force in STRUCTURES:
            for r in radii:
                assert as_dict(index.radius(q, r, force=force)) == oracle.radius(q, r), (force, r)
            k = int(rng.integers(1, 12))
            assert as_dict(index.knn(q, k, force=force)) == oracle.knn(q, k), (force, k)
    for force in STRUCTURES:
        many = index.radius_many(np.stack(queries), radii[1], force=force)
        assert [as_dict(res) for res in many] == [oracle.radius(q, radii[1]) for q in queries], force


operation = st.sampled_from(["bulk_load", "add", "replace", "remove", "remove_absent"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bits=st.sampled_from([64, 128, 256, 512]),
    clustered=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    ops=st.lists(st.tuples(operation, st.integers(0, 60)), min_size=1, max_size=8),
    compact_often=st.booleans(),
)
def test_radius_and_knn_equal_bruteforce_through_random_histories(
    bits: int, clustered: bool, seed: int, ops: list[tuple[str, int]], compact_often: bool
) -> None:
    rng = np.random.default_rng(seed)
    index, oracle = MemoryIndex(bits), Oracle(bits)
    words = bits // 64
    with small_compaction_thresholds() if compact_often else _nothing():
        for op, size in ops:
            if op == "bulk_load":
                ids = rng.choice(4 * size + 1, size=size, replace=False).astype(np.int64)
                codes = make_codes(rng, size, words, clustered)
                index.bulk_load(ids, codes)
                oracle.codes = {int(i): c for i, c in zip(ids, codes, strict=True)}
            elif op in ("add", "replace"):
                if op == "replace" and oracle.codes:
                    ids = rng.choice(np.array(list(oracle.codes)), size=min(size, len(oracle.codes)), replace=False)
                else:
                    ids = rng.integers(0, 300, size)
                codes = make_codes(rng, ids.size, words, clustered)
                index.add(ids, codes)
                for i, c in zip(ids.tolist(), codes, strict=True):  # last occurrence wins
                    oracle.codes[i] = c
            else:
                present = np.array(list(oracle.codes), dtype=np.int64)
                ids = rng.integers(300, 600, size) if op == "remove_absent" or not present.size else rng.choice(
                    present, size=min(size, present.size), replace=False
                )
                index.remove(ids)
                for i in ids.tolist():
                    oracle.codes.pop(i, None)
            assert len(index) == len(oracle.codes)
            for i in list(oracle.codes)[:5]:
                assert i in index
            check_queries(index, oracle, rng)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@pytest.mark.parametrize("force", STRUCTURES)
def test_duplicate_codes_are_all_returned_and_knn_keeps_every_tie(force: str | None) -> None:
    rng = np.random.default_rng(7)
    code = rng.integers(0, 2**64, size=2, dtype=np.uint64)
    other = rng.integers(0, 2**64, size=(50, 2), dtype=np.uint64)
    codes = np.vstack([np.repeat(code[None], 30, axis=0), other])
    index = MemoryIndex(128)
    index.bulk_load(np.arange(80), codes)
    ids, dists = index.radius(code, 0, force=force)
    assert sorted(ids.tolist()) == list(range(30)) and not dists.any()
    ids, dists = index.knn(code, 3, force=force)  # 30 codes tie at distance 0: all come back
    assert sorted(ids.tolist()) == list(range(30))


@pytest.mark.parametrize("bits", [64, 256, 2048])
def test_mih_and_bktree_exact_on_a_larger_set_with_planted_neighbours(bits: int) -> None:
    rng = np.random.default_rng(bits)
    n, words = 20_000, bits // 64
    codes = rng.integers(0, 2**64, size=(n, words), dtype=np.uint64)
    query = rng.integers(0, 2**64, size=words, dtype=np.uint64)
    planted = rng.choice(n, 20, replace=False)
    for j, row in enumerate(planted):
        codes[row] = near(rng, query, j + 1)
    index, oracle = MemoryIndex(bits), Oracle(bits)
    index.bulk_load(np.arange(n), codes)
    oracle.codes = dict(enumerate(codes))
    for r in (0, 3, 8, 16, 20):
        expected = oracle.radius(query, r)
        assert len(expected) >= min(r, 20)
        for force in STRUCTURES:
            assert as_dict(index.radius(query, r, force=force)) == expected, (force, r)
    for k in (1, 5, 20, 25):
        expected = oracle.knn(query, k)
        for force in STRUCTURES:
            assert as_dict(index.knn(query, k, force=force)) == expected, (force, k)
