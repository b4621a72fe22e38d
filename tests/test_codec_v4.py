"""Codec v4 (chain-sketch-4): its faster pieces compute what v3's did, its invariances hold, v3 stays
selectable. The invariance and copy tests of tests/test_codec.py and tests/test_codec_v3.py run on the default
codec, v5, which is v4 with a soft threshold (tests/test_codec_v5.py): v4's pieces are v5's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hashdb.codec import ModelHasher, chain
from hashdb.codec.chain import (
    Balanced,
    balanced,
    channel_pass,
    descriptors,
    descriptors_gemm,
    sinkhorn_balance,
    tap_maps,
    whiten,
)
from hashdb.codec.hasher import CHAIN_V3, CHAIN_V4
from hashdb.errors import InvalidArgument


@given(st.integers(0, 2**31), st.integers(1, 3), st.booleans())
@settings(max_examples=25, deadline=None)
def test_single_precision_balancing_divides_out_scales_and_commutes_with_permutations(
    seed: int, groups: int, depthwise: bool
) -> None:
    rng = np.random.default_rng(seed)
    if depthwise:
        out, in_g, groups = 4 * groups, 1, 4 * groups
    else:
        out, in_g = 4 * groups, int(rng.integers(1, 6))
    w = rng.standard_normal((out, in_g, 9)).astype(np.float32)
    w[rng.random((out, in_g)) < 0.2] = 0.0  # pruned kernels
    rows = np.exp(rng.uniform(-15, 15, out))
    cols = np.exp(rng.uniform(-15, 15, in_g * groups)).reshape(groups, in_g)
    scaled = (w * rows[:, None, None] * cols[np.arange(out) // (out // groups)][:, :, None]).astype(np.float32)
    a = sinkhorn_balance(w, groups, sweeps=6, single=True)
    np.testing.assert_allclose(sinkhorn_balance(scaled, groups, sweeps=6, single=True), a, rtol=1e-4, atol=1e-6)
    perm = np.concatenate([g * (out // groups) + rng.permutation(out // groups) for g in range(groups)])
    np.testing.assert_allclose(sinkhorn_balance(w[perm], groups, 6, True), a[perm], rtol=1e-4, atol=1e-6)
    # the same balancing as the float64 path with as many sweeps, to float32's precision
    np.testing.assert_allclose(a, sinkhorn_balance(w, groups, sweeps=6), rtol=1e-3, atol=1e-6)
    live = (a != 0).any(axis=2).any(axis=1)
    np.testing.assert_allclose(np.einsum("oik,oik->o", a, a)[live], 1.0, rtol=1e-4)


def test_single_precision_balancing_of_extreme_norms_falls_back_to_float64() -> None:
    """Weights near float32's range ends (a function-preserving rescaling by 1e30 is legal) balance as the
    moderate ones do: the float32 shortcut is taken only where every number fits."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 6, 9)).astype(np.float32)
    big = (w * np.float32(1e30)).astype(np.float32)
    tiny = (w * np.float32(1e-30)).astype(np.float32)
    a = sinkhorn_balance(w, 1, 6, True)
    for x in (big, tiny):
        b = sinkhorn_balance(x, 1, 6, True)
        assert np.isfinite(b).all()
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("out", "in_g", "k", "groups"), [(12, 7, 9, 1), (12, 3, 3, 2), (10, 1, 9, 10),
                                                          (20, 1, 5, 10), (6, 40, 512, 1)])  # fmt: skip
def test_matrix_product_descriptors_equal_the_tap_by_tap_sum(monkeypatch, out, in_g, k, groups) -> None:
    monkeypatch.setattr(chain, "DESCRIPTOR_CHUNK", 5 * k * 8)  # several input-channel slices per product
    rng = np.random.default_rng(out * in_g + k)
    m = 8
    w = rng.standard_normal((out, in_g, k)).astype(np.float32)
    inputs = rng.standard_normal((in_g * groups, m))
    maps = tap_maps((k,), m)
    np.testing.assert_allclose(descriptors_gemm(w, inputs, groups, maps), descriptors(w, inputs, groups, maps),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    centred = w - w.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(descriptors_gemm(w, inputs, groups, maps, centre=True),
                               descriptors(centred, inputs, groups, maps), rtol=1e-4, atol=1e-5)  # fmt: skip


@given(st.integers(0, 2**31), st.sampled_from([(1,), (3, 3), (1, 7)]), st.booleans(), st.booleans())
@settings(max_examples=25, deadline=None)
def test_balancing_factors_folded_into_the_descriptors_give_the_formed_layers_descriptors(
    seed: int, kshape: tuple[int, ...], centre: bool, dead: bool
) -> None:
    """A dense layer's balancing stays a row and a column factor (``Balanced``); its descriptors, tap slices
    and pass-through test match those of the formed layer, with dead rows and columns and several slices."""
    rng = np.random.default_rng(seed)
    k = int(np.prod(kshape))
    out, in_g, m = int(rng.integers(2, 12)), int(rng.integers(2, 12)), 8
    w = (rng.standard_normal((out, in_g, k)) * np.exp(rng.uniform(-3, 3, (out, 1, 1)))).astype(np.float32)
    if dead:  # a pruned filter and a pruned input channel
        w[int(rng.integers(out))] = 0.0
        w[:, int(rng.integers(in_g))] = 0.0
    lazy = balanced(w, 1, 6)
    assert lazy.row is not None and lazy.col is not None
    formed = lazy.array()
    np.testing.assert_allclose(formed, sinkhorn_balance(w, 1, 6, True), rtol=1e-6)
    for s in range(k):
        np.testing.assert_allclose(lazy.tap(s), formed[:, :, s], rtol=1e-6)
    inputs = rng.standard_normal((in_g, m))
    maps = tap_maps(kshape, m)
    chunk = chain.DESCRIPTOR_CHUNK
    try:
        chain.DESCRIPTOR_CHUNK = 2 * k * (m + 1)  # several input-channel slices per product
        folded = descriptors_gemm(lazy, inputs, 1, maps, centre)
    finally:
        chain.DESCRIPTOR_CHUNK = chunk
    np.testing.assert_allclose(folded, descriptors_gemm(formed, inputs, 1, maps, centre), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.linalg.norm(folded, axis=1) > 0, np.abs(formed).sum(axis=(1, 2)) > 0)
    near_identity = 0.01 * rng.standard_normal((out, out, k)).astype(np.float32)
    near_identity[:, :, k // 2] += np.eye(out, dtype=np.float32)[rng.permutation(out)]
    assert channel_pass(balanced(near_identity, 1, 6), 1, kshape) is not None
    for layer in (near_identity, w[:, :out] if in_g >= out else w[:in_g]):
        assert _same_pass(balanced(layer, 1, 6), kshape)


def _same_pass(lazy: Balanced, kshape: tuple[int, ...]) -> bool:
    a, b = channel_pass(lazy, 1, kshape), channel_pass(Balanced(lazy.array()), 1, kshape)
    if a is None or b is None:
        return a is b
    return bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))


def test_single_precision_whitening_is_the_same_whitening() -> None:
    d = np.random.default_rng(2).standard_normal((300, 24)) @ np.diag(np.linspace(0.1, 3, 24))
    np.testing.assert_allclose(whiten(d, 0.3, single=True), whiten(d, 0.3), rtol=1e-3, atol=1e-4)


def test_v3_stays_selectable_and_its_databases_keep_it() -> None:
    rng = np.random.default_rng(3)
    sd = {"a.weight": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
          "b.weight": rng.standard_normal((32, 16, 3, 3)).astype(np.float32)}  # fmt: skip
    v3, v4 = ModelHasher(256, codec=CHAIN_V3), ModelHasher(256, codec=CHAIN_V4)
    assert v4.config["codec"] == CHAIN_V4 and v3.config["codec"] == CHAIN_V3
    assert v3.config["dim"] == 32 and v4.config["dim"] == 96
    again = ModelHasher.from_config(v3.config)
    assert again.config == v3.config and again.hash(sd) == v3.hash(sd)
    assert v3.hash(sd) != v4.hash(sd)
    assert len(v3.suspect(sd).layers) == len(v4.suspect(sd).layers) == 2


def test_depth_weights_change_the_model_code_but_never_a_layer_code() -> None:
    """v4 weighs a layer's sketch by (1 + max(depth, 1))^-decay in the model's code (deep layers carry every earlier
    layer's change: transfer learning moves them most); each layer's own code is its sketch's sign, so it is
    the same at any decay. decay is v4's: v3 refuses it, and configs round-trip it."""
    rng = np.random.default_rng(5)
    sd = {f"f.{i}.weight": rng.standard_normal((24, 3 if i == 0 else 24, 3, 3)).astype(np.float32) for i in range(6)}
    flat, deep = ModelHasher(256, decay=0.0), ModelHasher(256)
    a, b = flat.suspect(sd), deep.suspect(sd)
    assert a.layers == b.layers and a.code != b.code
    sketches = deep.layer_sketches(sd)
    plain = dict(flat.layer_sketches(sd))
    for depth, (name, s) in enumerate(sketches):  # a plain chain: depth is the position
        np.testing.assert_allclose(s, plain[name] * (1.0 + max(depth, 1)) ** -0.75, rtol=1e-12)
    np.testing.assert_allclose(deep.features(sd)[:, 0], np.sum([s for _, s in sketches], axis=0), rtol=1e-12)
    assert ModelHasher.from_config(deep.config).config == deep.config and deep.config["decay"] == 0.75
    assert "decay" not in ModelHasher(256, codec=CHAIN_V3).config
    with pytest.raises(InvalidArgument, match="decay"):
        ModelHasher(256, codec=CHAIN_V3, decay=0.75)
    with pytest.raises(InvalidArgument, match="decay"):
        ModelHasher(256, decay=-1)


def test_the_shipped_fit_is_the_v4_configs_own_and_another_decay_is_uncalibrated() -> None:
    from hashdb.codec.null import null_fit

    config = ModelHasher(256, codec=CHAIN_V4).config
    fit = null_fit(config)
    assert fit.calibrated and fit.p >= 0.48 and fit.dof >= 0.75 * 256  # the codec's targets at its default length
    other = null_fit({**config, "decay": 0.5})  # a fit holds for the settings it was measured with only
    assert not other.calibrated and other.dof < fit.dof


def test_a_longer_code_extends_a_shorter_one_for_the_model_and_every_layer() -> None:
    """Each feature is the same whatever the code length (phases in fixed blocks of 64), so a shorter code is the
    first bits of the 1024-bit one, model code and layer codes alike: bench/codec_bench.py --lengths scores every
    length from one hashing pass on this, and a database can be re-cut to a shorter length without re-hashing."""
    rng = np.random.default_rng(7)
    shapes = {"stem": (12, 3, 3, 3), "block.dw": (12, 1, 3, 3), "block.pw": (24, 12, 1, 1), "head": (32, 24, 3, 3)}
    sd = {f"{name}.weight": rng.standard_normal(shape) for name, shape in shapes.items()}
    found = {bits: ModelHasher(bits).suspect(sd) for bits in (64, 192, 256, 512, 1024)}
    longest = found[1024]
    assert len(longest.layers) >= 2  # the layers wide enough for a code of their own
    for bits in (64, 192, 256, 512):
        assert found[bits].code == longest.code[: bits // 8]
        assert found[bits].layers == [(name, code[: bits // 8]) for name, code in longest.layers]
    assert ModelHasher(1024, codec="chain-sketch-3").hash(sd)[:32] == ModelHasher(256, codec="chain-sketch-3").hash(sd)
