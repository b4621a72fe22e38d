"""Codec v5 (chain-sketch-5): v4 with each balanced layer soft-thresholded (chain.shrink_small), so that what
magnitude pruning removes counts for nothing; v4 stays selectable with its codes and its fit. v6, the default
(tests/test_codec_v6.py), is v5 with its threshold taken from the shape; the pruning and invariance tests here
run on both."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hashdb.codec import ModelHasher
from hashdb.codec.chain import shrink_small
from hashdb.codec.hasher import CHAIN_V3, CHAIN_V4, CHAIN_V5, CHAIN_V6, CODEC_VERSION
from hashdb.errors import InvalidArgument


def _model(seed: int, widths: tuple[int, ...] = (3, 16, 32, 32, 48)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"features.{i}.weight": rng.standard_normal((o, c, 3, 3)).astype(np.float32)
            for i, (c, o) in enumerate(zip(widths[:-1], widths[1:], strict=True))}  # fmt: skip


def _magnitude_pruned(sd: dict[str, np.ndarray], share: float) -> dict[str, np.ndarray]:
    """Each layer's ``share`` of smallest |w| zeroed (the zoo's prune_magnitude)."""
    out = {}
    for name, w in sd.items():
        a = np.abs(w).ravel()
        cut = np.partition(a, int(share * a.size))[int(share * a.size)]
        out[name] = np.where(np.abs(w) < cut, 0, w).astype(w.dtype)
    return out


def _distance(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 30), st.sampled_from([1, 9]), st.floats(0.05, 0.9), st.integers(0, 2**31))
def test_the_soft_threshold_ignores_what_falls_below_it(out: int, cin: int, k: int, shrink: float, seed: int) -> None:
    """sign(w) max(|w| - t, 0), t = shrink x the 90th percentile of |w|: zeroing weights at or under t (what
    magnitude pruning does, up to the threshold) changes nothing; a permutation permutes; a scale scales."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((out, cin, k)).astype(np.float32)
    s = shrink_small(b, shrink)
    a = np.abs(b)
    t = np.float32(shrink) * np.float32(np.quantile(a, 0.9, method="lower"))
    np.testing.assert_allclose(s, np.sign(b) * np.maximum(a - t, 0), rtol=1e-6, atol=1e-7)
    assert s.dtype == b.dtype and not np.shares_memory(s, b)
    pruned = np.where(a <= t, np.float32(0), b)  # t < the 90th percentile, which therefore stays where it was
    np.testing.assert_array_equal(shrink_small(pruned, shrink), s)
    rows, cols = rng.permutation(out), rng.permutation(cin)
    np.testing.assert_array_equal(shrink_small(b[rows][:, cols], shrink), s[rows][:, cols])
    np.testing.assert_allclose(shrink_small(b * np.float32(8.0), shrink), s * 8.0, rtol=1e-6, atol=1e-6)


THRESHOLDED = pytest.mark.parametrize("codec", [CHAIN_V5, CHAIN_V6, CODEC_VERSION], ids=["v5", "v6", "v7"])


@THRESHOLDED
def test_magnitude_pruning_moves_thresholded_codes_far_less_than_v4_codes(codec: str) -> None:
    """The point of v5's soft threshold (v6's too): the same 30 % and 50 % magnitude prunes of five models land
    closer to their originals than under v4 (bench/pruning_bench.py and the zoo measure it on trained models)."""
    v4, v5 = ModelHasher(512, codec=CHAIN_V4), ModelHasher(512, codec=codec)
    for share in (0.3, 0.5):
        d4, d5 = [], []
        for seed in range(5):
            sd = _model(seed)
            cut = _magnitude_pruned(sd, share)
            d4.append(_distance(v4.hash(sd), v4.hash(cut)))
            d5.append(_distance(v5.hash(sd), v5.hash(cut)))
        assert np.median(d5) < 0.6 * np.median(d4), (share, d4, d5)
    independent = [_distance(v5.hash(_model(s)), v5.hash(_model(s + 10))) for s in range(5)]
    assert min(independent) > 200  # unrelated models stay about half the bits apart


@THRESHOLDED
def test_thresholded_codecs_keep_every_exact_invariance(codec: str) -> None:
    """Channel permutations and positive per-channel rescalings (the balanced layer divides them out before the
    threshold is taken) leave the v5 and v6 codes and layer codes as they are, bit for bit."""
    sd = _model(3)
    rng = np.random.default_rng(4)
    names = list(sd)
    moved = dict(sd)
    for i, name in enumerate(names[:-1]):  # permute and rescale layer i's outputs, and layer i+1's inputs
        p = rng.permutation(sd[name].shape[0])
        scale = np.exp(rng.uniform(-2, 2, len(p))).astype(np.float32)
        moved[name] = moved[name][p] * scale[:, None, None, None]
        moved[names[i + 1]] = moved[names[i + 1]][:, p] / scale[None, :, None, None]
    h = ModelHasher(512, codec=codec)
    assert h.suspect(moved) == h.suspect(sd)


def test_v4_stays_selectable_with_its_own_codes_and_shrink_is_v5s() -> None:
    """v4 is v5 without the threshold, bit for bit; its config round-trips without ``shrink``; v3 and v4
    refuse the setting; both fits ship (calibrated), and another shrink is uncalibrated."""
    from hashdb.codec.null import null_fit

    sd = _model(5)
    v4, v5 = ModelHasher(512, codec=CHAIN_V4), ModelHasher(512, codec=CHAIN_V5)
    assert v5.config["codec"] == CHAIN_V5 and v5.config["shrink"] == 0.35
    assert "shrink" not in v4.config and v4.config["decay"] == 0.75
    assert ModelHasher.from_config(v4.config).config == v4.config
    assert ModelHasher.from_config(v5.config).config == v5.config
    assert v4.hash(sd) == ModelHasher(512, codec=CHAIN_V5, shrink=0.0).hash(sd) != v5.hash(sd)
    for codec in (CHAIN_V4, CHAIN_V3):
        with pytest.raises(InvalidArgument, match="shrink"):
            ModelHasher(256, codec=codec, shrink=0.35)
    with pytest.raises(InvalidArgument, match="shrink"):
        ModelHasher(256, codec=CHAIN_V5, shrink=1.0)
    for h in (v4, v5):
        fit = null_fit(h.config)
        assert fit.calibrated and fit.p >= 0.48 and fit.dof >= 0.75 * 512  # the codec's targets at its length
    assert not null_fit({**v5.config, "shrink": 0.2}).calibrated
