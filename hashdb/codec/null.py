"""The codec's fitted null: how close independently trained models land, as a false-match rate per pair.

Daugman's method (Proc. IEEE 2006): the fractional Hamming distance x = d / bits between the codes of two
independently trained models (bench/null_bench.py: same architecture, same data, other seeds, several widths)
is fitted by a binomial with N effective degrees of freedom and mean p, where N = p(1 - p) / sd^2. The
false-match rate at distance d is the binomial's lower tail at x, P(Binomial(N, p) / N <= d / bits), extended
to non-integer N through the regularised incomplete beta function. The fit ships as data (null.json) with the
codec version: per code length, the most conservative group of the null library (lowest p, lowest N), so the
reported rate is never below what any measured architecture showed.

A verdict is database-size aware, as biometric identification is: a match against a database of n codes is
expected to be a chance match ``fmr * n`` times (``expected_false``); ``copy`` means expected_false <= 0.01.
"""

from __future__ import annotations

import json
import math
from functools import cache
from typing import Any, NamedTuple

COPY_EXPECTED_FALSE = 0.01  # the verdict 'copy' means at most this many chance matches expected in the database
COPY_RADIUS_FMR = 1e-12  # copy_radius: the largest distance whose per-pair false-match rate is at most this


class NullFit(NamedTuple):
    """Binomial fit of independent models' distances at one code length: mean fraction ``p``, ``dof``."""

    p: float
    dof: float
    calibrated: bool  # False: the codec config was not measured; a conservative stand-in is used


# For a config the null library did not measure (v2 included): as correlated as the worst group measured
# under v2 (bench/RESULTS.md, section null: mean fraction 0.385, dof 0.06 x bits for conv1d), so that
# uncalibrated codes are never reported as rarer than they may be.
_UNCALIBRATED = (0.38, 0.06)


@cache
def _table() -> dict[str, Any]:
    from importlib import resources  # imports tempfile and more: only when a fit is first needed

    return json.loads(resources.files(__package__).joinpath("null.json").read_text())


# What a fit depends on: the sketch's geometry. Which tensors are read (layout, include_linear) is not part of
# it: linear layers of independent models are as independent as their convs (not separately measured).
FIT_KEYS = ("codec", "dim", "omega", "ridge", "decay", "shrink", "importance")


def same_fit(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two codec configs share one fitted null: every FIT_KEYS setting equal (one neither has: equal)."""
    return all(a.get(k) == b.get(k) for k in FIT_KEYS)


def _fit_at(by_bits: dict[str, Any], bits: int) -> NullFit:
    """The fit of one length from a table of measured lengths."""
    if str(bits) in by_bits:
        fit = by_bits[str(bits)]
        return NullFit(float(fit["p"]), float(fit["dof"]), True)
    # other lengths: shorter ones take the dof fraction of the nearest measured length (dof / bits falls with
    # length, so that is conservative); longer ones keep the longest measured length's dof, never more
    # (extrapolating the fraction up would claim rates the null library never showed)
    near = min(by_bits, key=lambda b: abs(math.log2(int(b)) - math.log2(bits)))
    fit = by_bits[near]
    return NullFit(float(fit["p"]), float(fit["dof"]) * min(1.0, bits / int(near)), True)


def _entry(config: dict[str, Any]) -> dict[str, Any] | None:
    for entry in _table().get("fits", []):
        if same_fit(entry["config"], config):
            return entry
    return None


def null_fit(config: dict[str, Any], family: str | None = None) -> NullFit:
    """The fitted null of a codec ``config`` (ModelHasher.config or a database's stored codec). ``family``
    (ModelHasher.suspect: '2d' when every kernel of the suspect is two-dimensional) selects the fit of that
    kind of model, measured against its own kind and every other; None or an unmeasured family: the most
    conservative fit over everything measured."""
    bits = int(config.get("bits", 256))
    entry = _entry(config)
    if entry is not None:
        families = entry.get("families", {})
        if family is not None and family in families:
            return _fit_at(families[family]["by_bits"], bits)
        return _fit_at(entry["by_bits"], bits)
    p, frac = _UNCALIBRATED
    return NullFit(p, frac * bits, False)


def false_match_rate(distance: float, bits: int, fit: NullFit) -> float:
    """P(an independently trained model's code lands within ``distance`` of a given code), per pair."""
    if distance < 0:
        return 0.0
    x = min(distance / bits, 1.0)
    n = fit.dof
    k = x * n  # successes out of n at the same fraction
    if k >= n:
        return 1.0
    # P(Binomial(n, p) <= k) = I_{1-p}(n - k, k + 1), the regularised incomplete beta
    return _betainc(n - k, k + 1.0, 1.0 - fit.p)


def expected_false(distance: float, bits: int, n_codes: int, fit: NullFit) -> float:
    """How many of ``n_codes`` independent models are expected within ``distance`` by chance."""
    return false_match_rate(distance, bits, fit) * max(int(n_codes), 0)


def verdict(expected: float) -> str:
    return "copy" if expected <= COPY_EXPECTED_FALSE else "not a copy"


class MatchRates(NamedTuple):
    """How likely a match is chance: per pair (``fmr``), in the whole database (``expected_false``), and the
    verdict that follows (``copy`` when expected_false <= 0.01; a codec without a fitted null keeps its fixed
    copy radius for the verdict and says ``calibrated`` False)."""

    fmr: float
    expected_false: float
    verdict: str
    calibrated: bool


def match_rates(config: dict[str, Any] | None, distance: int, n_codes: int,
                family: str | None = None) -> MatchRates | None:  # fmt: skip
    """The rates of one match at ``distance`` in a database of ``n_codes`` codes made with codec ``config``
    (a database's ``codec``), for a suspect of kernel ``family`` (None: unknown, the conservative fit); None
    for a database of bare codes (no codec recorded)."""
    if not isinstance(config, dict) or not isinstance(config.get("bits"), int):
        return None
    bits = int(config["bits"])
    fit = null_fit(config, family)
    fmr = false_match_rate(distance, bits, fit)
    expected = fmr * max(int(n_codes), 0)
    if fit.calibrated:
        return MatchRates(fmr, expected, verdict(expected), True)
    radius = config.get("copy_radius")
    within = isinstance(radius, int) and distance <= radius
    return MatchRates(fmr, expected, "copy" if within else "not a copy", False)


# ---- layers: partial copies (a stolen backbone inside a bigger model) ---------------------------------------

LAYER_SCREEN_FMR = 1e-4  # layer codes within the distance of this per-pair rate are candidates of a partial copy
# A partial copy needs this many layer twins: one layer alone is also what a shared initialization leaves (two
# models trained from the same seeded first layer kept it 37-85 bits apart of 256: bench/backbone.py), and a
# stolen backbone is more than one layer.
MIN_PARTIAL_TWINS = 2


def layer_null_fit(config: dict[str, Any], family: str | None = None) -> NullFit:
    """The fitted null of single layers' codes (hasher.hash_with_layers): independently trained models' layer
    pairs, every eligible layer against every other, the most conservative group measured; for a suspect of
    kernel ``family`` (hasher.suspect) that family's fit (its groups, and its layers against every other
    group's), else the one over everything."""
    entry = _entry(config)
    if entry is not None and "layers" in entry:
        families = entry["layers"].get("families", {})
        chosen = families[family] if family is not None and family in families else entry["layers"]
        return _fit_at(chosen["by_bits"], int(config.get("bits", 256)))
    p, frac = _UNCALIBRATED
    return NullFit(p, frac * int(config.get("bits", 256)), False)


def layer_screen_radius(config: dict[str, Any], family: str | None = None) -> int:
    """The layer-code distance within which a stored layer is a candidate twin of a suspect's layer."""
    bits = int(config.get("bits", 256))
    return max(largest_distance(bits, layer_null_fit(config, family), LAYER_SCREEN_FMR), 0)


def layers_false_match_rate(distances: list[int], n_suspect: int, n_stored: int, bits: int, fit: NullFit,
                            at_least: int = 1) -> float:  # fmt: skip
    """P(an independently trained model shows layer twins this close): ``distances`` are the matched layer
    pairs' code distances (one-to-one), among ``n_suspect`` x ``n_stored`` possible pairs.

    For the j closest matches, "at least j of the pairs within the j-th distance" has probability at most
    b_j = C(pairs, j) fmr(d_j)^j (a union bound over which pairs; pairs of independent models taken as
    independent, which the null library checks: bench/layer_null.py). The best j >= ``at_least`` is taken and
    paid for with fixed weights, b_j x j^2 pi^2 / 6 (the weights 6 / (pi^2 j^2) sum to at most 1, so the minimum
    is a valid bound whatever number of twins the data shows). ``at_least`` = 2 asks how rare two or more
    twins this close are: one very close layer then cannot make a chance second one look like evidence."""
    ds = sorted(int(d) for d in distances)
    if len(ds) < max(at_least, 1):
        return 1.0
    pairs = max(n_suspect, len(ds)) * max(n_stored, len(ds))  # a count below the twins found is a caller's slip
    best = math.inf  # log of the smallest weighted bound
    for j, d in enumerate(ds, start=1):
        if j < at_least:
            continue
        rate = false_match_rate(d, bits, fit)
        if rate <= 0.0:
            return 0.0
        log_bound = (math.lgamma(pairs + 1) - math.lgamma(j + 1) - math.lgamma(pairs - j + 1) + j * math.log(rate)
                     + math.log(j * j * math.pi**2 / 6))  # fmt: skip
        best = min(best, log_bound)
    return min(1.0, math.exp(best))


def partial_false_match_rate(distances: list[int], n_suspect: int, n_stored: int, bits: int, fit: NullFit) -> float:
    """The rate a partial match reports: of MIN_PARTIAL_TWINS or more twins this close when it has that many
    (the closest alone does not count), else of its one twin."""
    at_least = MIN_PARTIAL_TWINS if len(distances) >= MIN_PARTIAL_TWINS else 1
    return layers_false_match_rate(distances, n_suspect, n_stored, bits, fit, at_least)


def layer_match_rates(config: dict[str, Any] | None, distances: list[int], n_suspect: int, n_stored: int,
                      n_codes: int, family: str | None = None) -> MatchRates | None:  # fmt: skip
    """match_rates() of a partial match: ``distances`` of the matched layer pairs, the two models' numbers of
    layer codes, ``n_codes`` models in the database. ``copy`` needs MIN_PARTIAL_TWINS twins, and the rate is then
    that of so many twins this close (the closest alone does not count). None without a codec config."""
    if not isinstance(config, dict) or not isinstance(config.get("bits"), int):
        return None
    fit = layer_null_fit(config, family)
    fmr = partial_false_match_rate(distances, n_suspect, n_stored, int(config["bits"]), fit)
    expected = fmr * max(int(n_codes), 0)
    called = verdict(expected) if len(distances) >= MIN_PARTIAL_TWINS else "not a copy"  # one twin: shown only
    return MatchRates(fmr, expected, called, fit.calibrated)


def largest_distance(bits: int, fit: NullFit, max_rate: float) -> int:
    """The largest distance whose per-pair false-match rate is at most ``max_rate`` (-1 if none)."""
    lo, hi = -1, bits  # invariant: rate(lo) <= max_rate (lo = -1 stands for 'none'), rate(hi) > max_rate or hi = bits
    if false_match_rate(bits, bits, fit) <= max_rate:
        return bits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if false_match_rate(mid, bits, fit) <= max_rate:
            lo = mid
        else:
            hi = mid
    return lo


def null_radius_fraction(config: dict[str, Any]) -> float:
    """copy_radius / bits for a codec config: the largest distance at false-match rate <= 1e-12 per pair."""
    bits = int(config["bits"])
    return max(largest_distance(bits, null_fit(config), COPY_RADIUS_FMR), 0) / bits


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by Lentz's continued fraction (a, b > 0, 0 <= x <= 1)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mean: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a
