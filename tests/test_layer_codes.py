"""Per-layer codes (ModelHasher.suspect / hash_with_layers), kernel families and the layer-level null."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hashdb.codec import ModelHasher
from hashdb.codec.hasher import LAYER_MIN_FILTERS, kernel_family
from hashdb.codec.null import (
    NullFit,
    false_match_rate,
    layer_match_rates,
    layer_null_fit,
    layer_screen_radius,
    layers_false_match_rate,
    match_rates,
    null_fit,
)
from hashdb.codec.radius import decision_radius


def sd_of(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()}


def backbone(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))


def bits_of(code: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(code, np.uint8))


def test_layer_codes_are_the_signs_of_the_layer_sketches_and_the_model_code_their_sum() -> None:
    sd = sd_of(backbone(0))
    h = ModelHasher(256)
    code, layers = h.hash_with_layers(sd)
    sketches = dict(h.layer_sketches(sd))
    assert code == h.hash(sd)
    assert [name for name, _ in layers] == ["0.weight", "2.weight", "4.weight"]  # 16 filters and more
    for name, layer_code in layers:
        assert np.array_equal(bits_of(layer_code), (sketches[name] > 0).astype(np.uint8))
    small = sd_of(nn.Sequential(nn.Conv2d(3, LAYER_MIN_FILTERS - 1, 3), nn.ReLU(), nn.Conv2d(15, 32, 3)))
    assert [name for name, _ in h.hash_with_layers(small)[1]] == ["2.weight"]  # too few filters: no own code


def test_layer_codes_keep_the_model_codes_invariances() -> None:
    sd = sd_of(backbone(1))
    h = ModelHasher(256)
    _, layers = h.hash_with_layers(sd)
    rng = np.random.default_rng(3)
    p0, p1 = rng.permutation(16), rng.permutation(32)
    moved = dict(sd)
    moved["0.weight"], moved["0.bias"] = sd["0.weight"][p0] * 2.5, sd["0.bias"][p0] * 2.5  # permute, rescale
    moved["2.weight"] = sd["2.weight"][p1][:, p0]
    moved["2.bias"] = sd["2.bias"][p1]
    moved["4.weight"] = sd["4.weight"][:, p1]
    renamed = {f"backbone.{k}": v for k, v in reversed(list(moved.items()))}  # another prefix, another order
    assert [c for _, c in h.hash_with_layers(renamed)[1]] == [c for _, c in layers]


def test_a_backbone_inside_a_bigger_model_keeps_its_layer_codes() -> None:
    victim = sd_of(backbone(2))
    torch.manual_seed(9)
    head = sd_of(nn.Sequential(nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3)))
    thief = {**{f"features.{k}": v for k, v in victim.items()}, **{f"head.{k}": v for k, v in head.items()}}
    h = ModelHasher(256)
    victim_code, victim_layers = h.hash_with_layers(victim)
    thief_code, thief_layers = h.hash_with_layers(thief)
    assert dict(thief_layers)["features.0.weight"] == dict(victim_layers)["0.weight"]
    assert dict(thief_layers)["features.2.weight"] == dict(victim_layers)["2.weight"]
    # the backbone's last layer now has consumers, whose input columns codec v7 reads for its channels'
    # importance: its layer code moves a little (0-8 of 256 or 512 bits over six seeds), far inside the layer
    # screening radius; every layer before it keeps its code bit for bit
    last = bits_of(dict(thief_layers)["features.4.weight"]) != bits_of(dict(victim_layers)["4.weight"])
    assert int(np.count_nonzero(last)) <= 16
    assert int(np.count_nonzero(bits_of(victim_code) != bits_of(thief_code))) > 0  # the whole code moved


def test_kernel_family_is_2d_only_when_every_spatial_kernel_is() -> None:
    assert kernel_family([(3, 3), (1, 1), (5, 5)]) == "2d"
    assert kernel_family([(3,), (5,)]) is None
    assert kernel_family([(3, 3), (1, 7), (7, 1)]) is None
    assert kernel_family([(3, 3, 3)]) is None
    assert kernel_family([(1, 1)]) is None
    h = ModelHasher(256)
    assert h.suspect(sd_of(backbone(0))).family == "2d"
    torch.manual_seed(0)
    conv1d = nn.Sequential(nn.Conv1d(8, 16, 3), nn.ReLU(), nn.Conv1d(16, 32, 3))
    assert h.suspect(sd_of(conv1d)).family is None


def test_a_family_fit_is_used_only_for_its_family_and_never_claims_more_than_measured() -> None:
    cfg = ModelHasher(512).config
    overall, two_d = null_fit(cfg), null_fit(cfg, "2d")
    assert two_d.calibrated and two_d.p >= overall.p and two_d.dof >= overall.dof
    assert null_fit(cfg, "3d") == overall and null_fit(cfg, None) == overall
    assert decision_radius(cfg, 1000, "2d") >= decision_radius(cfg, 1000)  # type: ignore[operator]
    d = decision_radius(cfg, 1000, "2d")
    assert d is not None
    rates = match_rates(cfg, d, 1000, "2d")
    assert rates is not None and rates.verdict == "copy"


def test_k_of_n_layers_rate_falls_with_more_and_closer_twins_and_is_a_bound() -> None:
    fit = NullFit(0.5, 256.0, True)
    weight = math.pi**2 / 6  # the weight of j = 1 (j^2 pi^2 / 6)
    one = layers_false_match_rate([60], 10, 10, 256, fit)
    assert one == pytest.approx(weight * 100 * false_match_rate(60, 256, fit), rel=1e-9)  # 100 pairs, one twin
    assert layers_false_match_rate([60, 60], 10, 10, 256, fit) < one
    assert layers_false_match_rate([30], 10, 10, 256, fit) < one
    assert layers_false_match_rate([60], 20, 20, 256, fit) > one  # more pairs to choose from: less rare
    assert layers_false_match_rate([], 10, 10, 256, fit) == 1.0
    assert layers_false_match_rate([128] * 5, 10, 10, 256, fit) == 1.0
    # the union bound C(pairs, j) fmr^j for j = 3 of 50 pairs, weighted by j^2 pi^2 / 6
    f = false_match_rate(70, 256, fit)
    assert layers_false_match_rate([50, 60, 70], 5, 10, 256, fit) <= 9 * weight * math.comb(50, 3) * f**3 * (1 + 1e-9)
    # two or more twins: one very close layer does not make a chance second one evidence
    close_then_far = layers_false_match_rate([5, 90], 20, 20, 256, fit, at_least=2)
    second = false_match_rate(90, 256, fit)
    assert close_then_far == pytest.approx(min(1.0, 4 * weight * math.comb(400, 2) * second**2))
    assert close_then_far > 1000 * layers_false_match_rate([5, 90], 20, 20, 256, fit)
    assert layers_false_match_rate([5], 20, 20, 256, fit, at_least=2) == 1.0
    assert layers_false_match_rate([5, 6], 0, 0, 256, fit) == layers_false_match_rate([5, 6], 2, 2, 256, fit)


def test_the_shipped_layer_null_is_calibrated_and_its_screening_radius_is_rare() -> None:
    cfg = ModelHasher(256).config
    fit = layer_null_fit(cfg)
    assert fit.calibrated and 0.4 < fit.p <= 0.5
    r = layer_screen_radius(cfg)
    assert 0 < r < 128 and false_match_rate(r, 256, fit) <= 1e-4
    rates = layer_match_rates(cfg, [r // 4] * 4, 10, 10, 1_000_000)
    assert rates is not None and rates.verdict == "copy" and rates.calibrated
    far = layer_match_rates(cfg, [r], 40, 40, 1_000_000)
    assert far is not None and far.verdict == "not a copy"
    # one twin alone is never a partial copy, however close (a shared seeded first layer looks like that)
    single = layer_match_rates(cfg, [0], 5, 5, 10)
    assert single is not None and single.fmr < 1e-6 and single.verdict == "not a copy"
    # a 2-D suspect's own fit: measured apart, never more conservative than the fit over everything
    two_d = layer_null_fit(cfg, "2d")
    assert two_d.calibrated and two_d.dof >= fit.dof and layer_screen_radius(cfg, "2d") >= r
    assert layer_null_fit(cfg, "3d") == fit
