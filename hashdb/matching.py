"""Matches of one suspect: whole-model copies and partial ones (the suspect shares layers with a stored model).

A whole match is a stored model whose model code lies within the query radius of the suspect's code. A partial
match is a stored model some of whose layers are twins of the suspect's layers (layer codes within the layer
screening radius, paired one-to-one, closest first) even though the two model codes are far apart: a stolen
backbone inside a bigger model with new layers and a new head. Every match carries how likely it is to be
chance: ``fmr`` per pair and ``expected_false`` = fmr x the models in the database, from the codec's fitted
null (hashdb/codec/null.py: the model-level fit for whole matches, "k of n layers" for partial ones); the
verdict ``copy`` means expected_false <= 0.01. One rule for the library, the server and the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from .codes import Code, to_bytes
from .errors import KeyNotFound

if TYPE_CHECKING:
    from .codec.null import MatchRates


class LayerTwin(NamedTuple):
    """A suspect layer and the stored layer whose code lies ``distance`` bits from it."""

    suspect: str
    stored: str
    distance: int


class ModelMatch(NamedTuple):
    """One stored model that matches the suspect. ``kind``: 'whole' (its model code is within the query's
    radius or k nearest) or 'partial' (only layers match); ``distance``: the model codes' distance (None when
    the stored code was not compared, never for 'whole'); ``layers``: the layer twins found (empty when the
    suspect or the stored model has no layer codes); ``fmr``/``expected_false``/``verdict``/``calibrated``:
    the rates of the evidence that made the kind (None without a codec config)."""

    key: str
    kind: str
    distance: int | None
    layers: list[LayerTwin]
    fmr: float | None
    expected_false: float | None
    verdict: str | None
    calibrated: bool

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of ``hashdb query --json``: key, kind, distance, layers, fmr, expected_false, verdict."""
        out: dict[str, Any] = {"key": self.key, "kind": self.kind, "distance": self.distance,
                               "layers": [{"suspect_layer": t.suspect, "stored_layer": t.stored,
                                           "distance": t.distance} for t in self.layers],
                               "verdict": self.verdict}  # fmt: skip
        if self.fmr is not None:
            out["fmr"] = self.fmr
            out["expected_false"] = self.expected_false
            if not self.calibrated:
                out["calibrated"] = False
        return out


def one_to_one(hits: list[tuple[int, str, int]]) -> list[tuple[int, str, int]]:
    """One-to-one pairs among (suspect layer index, stored layer name, distance) hits, closest first: how a
    query pairs layer twins (the benches pair them the same way)."""
    used_suspect: set[int] = set()
    used_stored: set[str] = set()
    out = []
    for i, name, d in sorted(hits, key=lambda h: (h[2], h[0], h[1])):
        if i not in used_suspect and name not in used_stored:
            used_suspect.add(i)
            used_stored.add(name)
            out.append((i, name, d))
    return out


def layer_twins(db: Any, layers: Sequence[tuple[str, Code]], radius: int) -> dict[str, list[LayerTwin]]:
    """Per stored model, the one-to-one twins of the suspect's ``layers`` within ``radius`` (layer codes)."""
    if not layers:
        return {}
    found = db.layer_radius_many([code for _, code in layers], radius)
    hits: dict[str, list[tuple[int, str, int]]] = {}
    for i, matches in enumerate(found):
        for key, name, d in matches:
            hits.setdefault(key, []).append((i, name, int(d)))
    names = [name for name, _ in layers]
    return {key: [LayerTwin(names[i], name, d) for i, name, d in one_to_one(h)] for key, h in hits.items()}


def find_matches(
    db: Any,
    code: Code,
    layers: Sequence[tuple[str, Code]] | None = None,
    *,
    radius: int | None = None,
    knn: int | None = None,
    layer_radius: int | None = None,
    family: str | None = None,
) -> list[ModelMatch]:
    """Every whole match (model codes within ``radius``, or the ``knn`` nearest; default: the database's
    decision radius) and every partial match (layer twins within ``layer_radius``, default the codec's layer
    screening radius) of a suspect with model code ``code``, layer codes ``layers`` (hasher.suspect; None or []
    asks for whole matches only) and kernel ``family`` (hasher.suspect; None: unknown, the conservative null).
    ``db`` is a HashDB or a server connection. Partial matches that are not copies are listed only when
    ``layer_radius`` is given (by default a stored model sharing one chance layer is no answer). Sorted: copies
    first, then by expected_false, whole before partial, then by distance and key."""
    from .codec.null import MIN_PARTIAL_TWINS, layer_screen_radius, match_rates
    from .codec.radius import decision_radius

    code = to_bytes(code, db.bits)
    layers = [(name, to_bytes(c, db.bits)) for name, c in layers or ()]
    config = db.codec
    n_codes = len(db)
    if radius is None and knn is None:
        radius = decision_radius(config, n_codes, family)
        if radius is None:
            raise ValueError("the database stores no codec configuration: give radius or knn")
    whole = db.radius(code, radius) if knn is None else db.knn(code, knn)
    listed = {key for key, _ in whole}
    every_partial = layer_radius is not None
    twins: dict[str, list[LayerTwin]] = {}
    stored_layers: dict[str, int] = {}
    if layers and isinstance(config, dict) and db.layer_count() > 0:
        r = layer_screen_radius(config, family) if layer_radius is None else int(layer_radius)
        twins = layer_twins(db, layers, r)
        for key in twins:
            if not (every_partial or key in listed or len(twins[key]) >= MIN_PARTIAL_TWINS):
                continue  # one twin alone is never a copy: no round trip for it
            try:
                stored_layers[key] = len(db.layers(key))
            except KeyNotFound:  # deleted between the two reads: its twins go with it
                stored_layers[key] = 0
    out: list[ModelMatch] = []
    for key, d in whole:
        rates = match_rates(config, int(d), n_codes, family)
        twins_of = twins.get(key, [])
        partial = _partial_rates(config, twins_of, len(layers), stored_layers.get(key, 0), n_codes, family)
        if (rates is None or rates.verdict != "copy") and partial is not None and partial.verdict == "copy":
            out.append(_match(key, "partial", int(d), twins_of, partial))
        else:
            out.append(_match(key, "whole", int(d), twins_of, rates))
    for key, twins_of in twins.items():
        if key in listed:
            continue
        partial = _partial_rates(config, twins_of, len(layers), stored_layers.get(key, 0), n_codes, family)
        if partial is None or (partial.verdict != "copy" and not every_partial):
            continue
        out.append(_match(key, "partial", _distance(db, key, code), twins_of, partial))
    out.sort(key=lambda m: (m.verdict != "copy", m.expected_false if m.expected_false is not None else 0.0,
                            m.kind != "whole", m.distance if m.distance is not None else math.inf, m.key))  # fmt: skip
    if knn is not None:  # knn asks for model codes; partial matches come on top only when they are copies
        out = [m for m in out if m.kind == "whole" or m.verdict == "copy"]
    return out


def _match(key: str, kind: str, distance: int | None, twins: list[LayerTwin], rates: MatchRates | None) -> ModelMatch:
    """A ModelMatch carrying the rates of the evidence that made its kind (none for a bare-code database)."""
    if rates is None:
        return ModelMatch(key, kind, distance, twins, None, None, None, True)
    return ModelMatch(key, kind, distance, twins, rates.fmr, rates.expected_false, rates.verdict, rates.calibrated)


def _partial_rates(config: Any, twins: list[LayerTwin], n_suspect: int, n_stored: int, n_codes: int,
                   family: str | None) -> MatchRates | None:  # fmt: skip
    """layer_match_rates() of a stored model's twins; None without twins or stored layer codes."""
    if not twins or not n_stored:
        return None
    from .codec.null import layer_match_rates

    return layer_match_rates(config, [t.distance for t in twins], n_suspect, n_stored, n_codes, family)


def _distance(db: Any, key: str, code: bytes) -> int | None:
    """The model codes' distance of a stored key (None when it was deleted meanwhile)."""
    try:
        stored, _ = db.get(key)
    except KeyNotFound:
        return None
    return (int.from_bytes(stored, "big") ^ int.from_bytes(code, "big")).bit_count()


__all__ = ["LayerTwin", "ModelMatch", "find_matches", "layer_twins", "one_to_one"]
