"""Copy clusters: HashDB.pairs / clusters and the self-join kernels equal brute force on random and planted data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashdb import HashDB, InvalidArgument
from hashdb.codes import bytes_to_words, hamming
from hashdb.index import join


def brute_pairs(records: dict[str, bytes], r: int) -> list[tuple[str, str, int]]:
    out = []
    for a, b in itertools.combinations(sorted(records), 2):
        d = hamming(records[a], records[b])
        if d <= r:
            out.append((a, b, d))
    return sorted(out, key=lambda p: (p[2], p[0], p[1]))


def brute_components(records: dict[str, bytes], r: int) -> list[set[str]]:
    """Components of two or more keys, by growing each from a seed (no union-find, unlike the code under test)."""
    left = set(records)
    out = []
    while left:
        seed = min(left)
        group, frontier = {seed}, [seed]
        while frontier:
            k = frontier.pop()
            near = {o for o in left - group if hamming(records[k], records[o]) <= r}
            group |= near
            frontier.extend(near)
        left -= group
        if len(group) > 1:
            out.append(group)
    return out


def planted(n_clusters: int, size: int, noise: int, bits: int, seed: int, extra: int = 0) -> np.ndarray:
    """Clusters of near copies (each copy flips up to ``noise`` bits of its original) plus unrelated codes."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_clusters):
        base = rng.integers(0, 2, bits).astype(bool)
        for _ in range(size):
            copy = base.copy()
            copy[rng.choice(bits, rng.integers(0, noise + 1), replace=False)] ^= True
            rows.append(copy)
    rows.extend(rng.integers(0, 2, (extra, bits)).astype(bool))
    return np.packbits(np.asarray(rows).reshape(-1, bits), axis=1)


def brute_rows(codes: np.ndarray, r: int) -> set[tuple[int, int, int]]:
    out = set()
    for i in range(len(codes)):
        d = np.unpackbits(codes[i] ^ codes[i + 1 :], axis=1).sum(axis=1)
        out.update((i, i + 1 + int(k), int(d[k])) for k in np.flatnonzero(d <= r))
    return out


# ---- kernels ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [64, 256, 512])
@pytest.mark.parametrize("r", [0, 2, 9, 30, 0.31])
def test_self_join_methods_equal_brute_force_on_planted_clusters(bits: int, r: float) -> None:
    r = int(r * bits) if r < 1 else int(r)
    packed = planted(12, 8, noise=bits // 8, bits=bits, seed=bits + r, extra=700)
    words = bytes_to_words(packed.tobytes(), bits).reshape(len(packed), bits // 64)
    expected = brute_rows(packed, r)
    methods = ["blocked", None] + (["mih"] if r + 1 <= bits // 2 else [])
    for method in methods:
        a, b, d = join.self_join(words, r, method)
        got = list(zip(a.tolist(), b.tolist(), d.tolist(), strict=True))
        assert len(set(got)) == len(got), f"{method}: a pair reported twice"
        assert set(got) == expected, method


def test_tiles_and_rectangles_cover_every_pair_once() -> None:
    codes = np.random.default_rng(1).integers(0, 2**63, (3 * join.BLOCK + 17, 4), dtype=np.uint64)
    full = join.self_join(codes, 256, "blocked")  # r = bits: every pair
    n = len(codes)
    assert len(full[0]) == n * (n - 1) // 2
    step = 300
    parts = [join.rectangle_join(codes, 120, a, min(a + step, n), b, min(b + step, n))
             for a in range(0, n, step) for b in range(a, n, step)]  # fmt: skip
    got = set(zip(*(np.concatenate([p[k] for p in parts]).tolist() for k in range(3)), strict=True))
    ref = set(zip(*(x.tolist() for x in join.self_join(codes, 120)), strict=True))
    assert got == ref and sum(len(p[0]) for p in parts) == len(ref)


def test_overflowing_tasks_are_rerun_without_losing_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(join, "TASK_CAP", 3)
    codes = np.zeros((600, 4), np.uint64)  # all equal: every pair within 0, every task overflows
    codes[::7, 0] = 1
    for method in ("blocked", "mih"):
        a, b, d = join.self_join(codes, 0, method)
        ref = brute_rows(np.frombuffer(codes.tobytes(), np.uint8).reshape(600, 32), 0)
        assert set(zip(a.tolist(), b.tolist(), d.tolist(), strict=True)) == ref and len(a) == len(ref)


def test_planner_prefers_mih_for_small_radius_and_tiles_at_the_copy_radius() -> None:
    codes = np.random.default_rng(2).integers(0, 2**63, (4000, 4), dtype=np.uint64)
    assert join.choose_method(codes, 8) == "mih"
    assert join.choose_method(codes, 78) == "blocked"


def test_components_label_each_node_with_its_smallest_member() -> None:
    label = join.components(7, np.array([5, 1, 3], np.int64), np.array([6, 3, 0], np.int64))
    assert label.tolist() == [0, 0, 2, 0, 4, 5, 5]


# ---- HashDB.pairs / clusters ------------------------------------------------------------------------------

KEYS = st.text(alphabet="abcdefgh", min_size=1, max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.dictionaries(KEYS, st.binary(min_size=8, max_size=8), min_size=0, max_size=30),
    near=st.lists(st.tuples(st.integers(0, 29), st.integers(0, 63)), max_size=20),
    deletes=st.lists(KEYS, max_size=8),
    r=st.integers(0, 64),
)
def test_pairs_and_clusters_equal_brute_force_after_deletes(tmp_path_factory, data, near, deletes, r) -> None:  # type: ignore[no-untyped-def]
    records = dict(data)
    keys = sorted(records)
    for i, bit in near:  # near copies: a key's code with one bit flipped, under a new key
        if keys:
            src = records[keys[i % len(keys)]]
            flipped = bytearray(src)
            flipped[bit // 8] ^= 1 << (bit % 8)
            records[f"copy{i}-{bit}"] = bytes(flipped)
    path = tmp_path_factory.mktemp("pairs") / "db"
    with HashDB(path, bits=64) as db:
        if records:
            db.insert_many(list(records), list(records.values()))
        db.refresh()  # the index exists before the deletes, so they go through its incremental path
        for k in deletes:
            db.delete(k)
            records.pop(k, None)
        assert db.pairs(r) == brute_pairs(records, r)
        clusters = db.clusters(r)
    assert sorted(map(set, (c.keys for c in clusters)), key=min) == sorted(brute_components(records, r), key=min)
    edges = brute_pairs(records, r)
    for c in clusters:
        assert c.keys == sorted(c.keys)
        assert c.edges == [e for e in edges if e[0] in c.keys]
    assert [len(c.keys) for c in clusters] == sorted((len(c.keys) for c in clusters), reverse=True)


def test_pairs_on_a_planted_256_bit_library_at_the_copy_radius(tmp_path) -> None:  # type: ignore[no-untyped-def]
    packed = planted(20, 5, noise=30, bits=256, seed=7, extra=400)
    records = {f"m{i:04d}": row.tobytes() for i, row in enumerate(packed)}
    with HashDB(tmp_path / "db", bits=256) as db:
        db.insert_many(list(records), list(records.values()))
        for r in (0, 16, 78):
            assert db.pairs(r) == brute_pairs(records, r)
        clusters = db.clusters(78)
    assert len(clusters) >= 20 and all(len(c.keys) >= 2 for c in clusters)


def test_pairs_rejects_a_negative_radius_and_an_unknown_engine(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with HashDB(tmp_path / "db", bits=64) as db:
        assert db.pairs(5) == [] and db.clusters(5) == []
        with pytest.raises(InvalidArgument):
            db.pairs(-1)
        with pytest.raises(InvalidArgument):
            db.pairs(3, engine="spark")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 90), seed=st.integers(0, 2**16), r=st.integers(0, 140), cut=st.tuples(*[st.floats(0, 1)] * 4))
def test_rectangle_join_equals_brute_force_on_any_rectangle(n: int, seed: int, r: int, cut: tuple) -> None:
    """The 256-bit kernel (rows four at a time, each counting only columns above itself) on rectangles with
    any alignment: exactly the brute-force pairs i < j inside it."""
    packed = planted(max(1, n // 6), 6, noise=90, bits=256, seed=seed)[:n]
    n = len(packed)
    words = bytes_to_words(packed.tobytes(), 256).reshape(n, 4)
    i0, i1 = sorted(int(c * n) for c in cut[:2])
    j0, j1 = sorted(int(c * n) for c in cut[2:])
    a, b, d = join.rectangle_join(words, r, i0, i1, j0, j1)
    got = list(zip(a.tolist(), b.tolist(), d.tolist(), strict=True))
    expected = {p for p in brute_rows(packed, r) if i0 <= p[0] < i1 and j0 <= p[1] < j1}
    assert len(set(got)) == len(got) and set(got) == expected
