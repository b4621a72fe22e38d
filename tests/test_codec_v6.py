"""Codec v6 (chain-sketch-6; the default v7 adds channel importance to it, tests/test_codec_v7.py): v5 with the
soft threshold taken from the balanced layer's shape (``shrink`` x its RMS weight, 1 / sqrt(fan-in): balancing
gives every filter unit energy) instead of a percentile of its weights. Same invariances, no pass over the layer
to find the threshold; v5 stays selectable with its codes and its fit. The pruning and invariance tests of
tests/test_codec_v5.py run on v6 (and v7) too."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hashdb.codec import ModelHasher
from hashdb.codec.chain import balanced, rms_threshold, shrink_small
from hashdb.codec.hasher import CHAIN_V4, CHAIN_V5, CHAIN_V6, LEGACY_CODEC
from hashdb.errors import InvalidArgument
from tests.test_codec_v5 import _model


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 30), st.sampled_from([1, 9]), st.floats(0.05, 3.9), st.integers(0, 2**31))
def test_the_rms_threshold_is_a_number_of_the_shape(out: int, cin: int, k: int, shrink: float, seed: int) -> None:
    """sign(w) max(|w| - t, 0) with t = shrink / sqrt(cin x k): the threshold does not depend on the weights, so
    zeroing any of the weights at or under it (magnitude pruning of any share, up to t) changes nothing, and a
    permutation only permutes."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((out, cin, k)).astype(np.float32)
    s = shrink_small(b, shrink, by_rms=True)
    t = np.float32(rms_threshold(b.shape, shrink))
    np.testing.assert_array_equal(s, b - np.clip(b, -t, t))
    if shrink < 1:  # unit-energy filters: each keeps its largest weight, whatever the shape
        unit = b / np.linalg.norm(b.reshape(out, -1), axis=1)[:, None, None]
        assert np.abs(shrink_small(unit, shrink, by_rms=True)).reshape(out, -1).max(axis=1).min() > 0
    assert s.dtype == b.dtype and not np.shares_memory(s, b)
    pruned = np.where(np.abs(b) <= t, np.float32(0), b)
    np.testing.assert_array_equal(shrink_small(pruned, shrink, by_rms=True), s)
    rows, cols = rng.permutation(out), rng.permutation(cin)
    np.testing.assert_array_equal(shrink_small(b[rows][:, cols], shrink, by_rms=True), s[rows][:, cols])


@pytest.mark.parametrize(
    ("shape", "groups"),
    [((48, 32, 9), 1), ((48, 8, 9), 4), ((32, 1, 9), 32), ((40, 24, 1), 1), ((256, 128, 9), 1)],
    ids=["dense", "grouped", "depthwise", "1x1", "multi-block"],
)
def test_the_threshold_is_each_live_filters_rms_weight(shape: tuple[int, int, int], groups: int) -> None:
    """After balancing every live filter has unit energy, so 1 / sqrt(inputs per group x taps) is each live
    filter's RMS weight (what makes the threshold a multiple of it, for any trained or random layer), dense,
    grouped or depthwise, with dead filters and dead inputs; and thresholding the balanced layer with its factors
    packed (into a reused work array, a block of rows at a time) gives the same numbers as the formed layer."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(shape) * np.exp(rng.normal(0, 1, (shape[0], 1, 1)))).astype(np.float32)
    w[[3, 7]] = 0  # dead filters
    if shape[1] > 1:
        w[:, [2]] = 0  # a dead input in every group
    bal = balanced(w, groups, 6)
    b = bal.array()
    live = np.abs(b).reshape(len(b), -1).max(axis=1) > 0
    assert live.sum() == shape[0] - 2
    rms = np.sqrt((b[live].astype(np.float64) ** 2).mean(axis=(1, 2)))
    np.testing.assert_allclose(rms, rms_threshold(b.shape, 1.0), rtol=1e-4)
    work = np.full(b.shape, np.nan, np.float32)
    s = shrink_small(bal, 0.6, out=work, by_rms=True)
    assert s is work
    np.testing.assert_allclose(s, shrink_small(b, 0.6, by_rms=True), rtol=1e-6, atol=1e-7)
    assert not s[~live].any() and np.count_nonzero(s) < np.count_nonzero(b)


def test_v5_stays_selectable_and_shrink_means_a_multiple_of_the_rms_in_v6() -> None:
    """v6 and v5 differ only in the threshold: without one (shrink 0) both are v4 bit for bit. Configs
    round-trip; v6's shrink is a multiple of the RMS weight (0.6), v5's of a percentile (0.35), both under 1;
    both fits ship (calibrated, the targets met at 512 bits) and another shrink is uncalibrated."""
    from hashdb.codec.null import null_fit

    sd = _model(5)
    v5, v6 = ModelHasher(512, codec=CHAIN_V5), ModelHasher(512, codec=CHAIN_V6)
    assert v6.config["codec"] == CHAIN_V6 == "chain-sketch-6" and v6.config["shrink"] == 0.6
    assert v5.config["codec"] == CHAIN_V5 and v5.config["shrink"] == 0.35
    assert v6.chain.shrink_by_rms and not v5.chain.shrink_by_rms
    percentile = ModelHasher(512, codec=CHAIN_V6)
    percentile.chain = dataclasses.replace(percentile.chain, shrink_by_rms=False)
    assert percentile.hash(sd) != v6.hash(sd)  # the RMS rule is what the default hashes with
    for h in (v5, v6):
        assert ModelHasher.from_config(h.config).config == h.config
    assert v6.hash(sd) != v5.hash(sd)
    v4 = ModelHasher(512, codec=CHAIN_V4).hash(sd)
    assert ModelHasher(512, codec=CHAIN_V6, shrink=0.0).hash(sd) == ModelHasher(512, codec=CHAIN_V5, shrink=0.0).hash(
        sd) == v4
    assert ModelHasher(512, codec=CHAIN_V6, shrink=0.9).config["shrink"] == 0.9
    for codec in (CHAIN_V6, CHAIN_V5):  # at 1 or more a whole layer could be thresholded away
        with pytest.raises(InvalidArgument, match="shrink"):
            ModelHasher(512, codec=codec, shrink=1.0)
    for codec in (CHAIN_V4, LEGACY_CODEC):  # codecs without a threshold take no shrink, not even v6's default
        with pytest.raises(InvalidArgument, match="shrink"):
            ModelHasher(256, codec=codec, shrink=0.6)
    for h in (v5, v6):
        fit = null_fit(h.config)
        assert fit.calibrated and fit.p >= 0.48 and fit.dof >= 0.75 * 512
    assert not null_fit({**v6.config, "shrink": 0.35}).calibrated


def test_channel_weights_of_one_change_nothing_and_weigh_each_channels_term() -> None:
    """Per-channel weights (codec v7's importance; tests/test_codec_v7.py): weights of 1 give the unweighted sketch
    bit for bit; a common factor cancels; a channel of weight 0 adds nothing to its layer's sketch."""
    from hashdb.codec.chain import frequencies, sketch_and_propagate

    rng = np.random.default_rng(2)
    d = rng.standard_normal((40, 96))
    freq = frequencies(96, 256, 2.0).astype(np.float32)
    plain, handed = sketch_and_propagate(d, freq, 0.3, True)
    ones, handed1 = sketch_and_propagate(d, freq, 0.3, True, np.ones(40))
    np.testing.assert_array_equal(ones, plain)
    np.testing.assert_array_equal(handed1, handed)
    w = rng.uniform(0.1, 1.0, 40)
    np.testing.assert_allclose(sketch_and_propagate(d, freq, 0.3, True, 3 * w)[0],
                               sketch_and_propagate(d, freq, 0.3, True, w)[0], rtol=1e-5, atol=1e-6)  # fmt: skip
    w[7] = 0.0
    weighted = sketch_and_propagate(d, freq, 0.3, True, w)[0]
    w[7] = 1e-3
    assert np.abs(sketch_and_propagate(d, freq, 0.3, True, w)[0] - weighted).max() < 1e-2
