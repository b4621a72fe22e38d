"""One self-contained HTML page of evidence: the verdict in words, plots, and the JSON they were drawn from.

``suspect_report(db, suspect)`` gathers the evidence for a suspect model against a database (its matches,
each verified with ``compare`` where the stored model's file is readable, and their derivation tree);
``html_page(doc)`` renders that, or a ``compare`` result, as one HTML string that needs no network: the plots
are PNGs drawn by matplotlib (the ``report`` extra) and inlined as base64, the JSON sits in a
``<script type="application/json" id="evidence">`` block.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .compare import DEFAULT_PERMUTATIONS, compare
from .lineage import derivation_tree, hamming, model_file
from .nulldist import distance_null, false_match_rate

NEAREST = 3  # matches shown when none is within the copy radius: the nearest ones, to show how far they are


def suspect_report(
    db: Any, suspect: Any, *, radius: int | None = None, n_perm: int = DEFAULT_PERMUTATIONS
) -> dict[str, Any]:
    """The evidence for ``suspect`` (a model source) against ``db`` (a HashDB): its matches within
    ``radius`` (default: the database's copy radius), or its nearest ones when none is that close, each
    with its code distance and false-match rate, a ``compare`` result where the stored file is readable,
    and the derivation tree of the suspect and its matches."""
    from ..codec.hasher import ModelHasher
    from ..codec.radius import decision_radius

    hasher = ModelHasher.from_config(db.codec) if db.codec else ModelHasher(db.bits)  # the database's codec
    code, layers, family = hasher.suspect(suspect)
    stored = decision_radius(db.codec, len(db), family)
    r = int(radius if radius is not None else stored if isinstance(stored, int) else hasher.copy_radius)
    found = db.find_matches(code, layers, radius=r, family=family)  # a bare-code database: whole matches only
    within = bool(found)
    if not found and len(db):
        found = db.find_matches(code, knn=NEAREST, family=family)
    suspect_label = str(suspect) if isinstance(suspect, str | os.PathLike) else "suspect"
    matches, codes, files = [], {suspect_label: code}, {suspect_label: suspect}
    for m in found:
        stored_code, meta = db.get(m.key)
        path = model_file(m.key, meta)
        distance = m.distance if m.distance is not None else hamming(stored_code, code)
        fmr = m.fmr if m.fmr is not None else false_match_rate(int(distance), db.bits, db.codec)
        match: dict[str, Any] = {"key": m.key, "kind": m.kind, "distance": int(distance), "fmr": fmr, "file": path,
                                 "layers": m.as_dict()["layers"]}  # fmt: skip
        match["expected_false"] = m.expected_false if m.expected_false is not None else fmr * len(db)
        if path is not None:
            match["compare"] = compare(suspect, path, n_perm=n_perm, bits=None)
        matches.append(match)
        if m.key != suspect_label:
            codes[m.key], files[m.key] = stored_code, path
    tree = derivation_tree(codes, files) if len(codes) > 1 else None
    doc = {
        "kind": "suspect", "suspect": suspect_label, "database": str(db.path), "models": len(db), "bits": db.bits,
        "radius": r, "within_radius": within, "matches": matches, "tree": tree,
    }  # fmt: skip
    doc["verdict"] = suspect_verdict(doc)
    return doc


def suspect_verdict(doc: Mapping[str, Any]) -> dict[str, str]:
    """The call for a suspect and the evidence in words."""
    if not doc["within_radius"]:
        nearest = min((m["distance"] for m in doc["matches"]), default=None)
        far = f"; the nearest is {nearest} bits away" if nearest is not None else ""
        return {"call": "no match", "words": f"No stored model within {doc['radius']} bits of the suspect{far}."}
    parts, call = [], "match"
    for m in doc["matches"]:
        if m.get("kind") == "partial":
            twins = ", ".join(f"{t['suspect_layer']} = {t['stored_layer']} ({t['distance']} bits)" for t in m["layers"])
            line = (f"{m['key']}: shares {len(m['layers'])} layers with the suspect ({twins}; false-match rate "
                    f"{m['fmr']:.2g}, {m['expected_false']:.2g} expected by chance among {doc['models']} models), "
                    f"whole models {m['distance']} of {doc['bits']} bits apart")  # fmt: skip
        else:
            line = (f"{m['key']}: {m['distance']} of {doc['bits']} bits (false-match rate {m['fmr']:.2g}, "
                    f"{m['expected_false']:.2g} expected by chance among {doc['models']} models)")  # fmt: skip
        if "compare" in m:
            line += ". " + m["compare"]["verdict"]["words"]
            if m["compare"]["verdict"]["call"] != "no evidence":
                call = "copy"
        else:
            line += "; its file is not readable here, so it was not verified"
        parts.append(line)
    head = (f"{len(doc['matches'])} stored model{'s' if len(doc['matches']) != 1 else ''} within {doc['radius']} "
            "bits or sharing layers")  # fmt: skip
    head += ", verified as derived." if call == "copy" else "."
    return {"call": call, "words": head + " " + " ".join(parts)}


# --- plots -------------------------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 3.2) -> Any:
    from matplotlib.figure import Figure  # the `report` extra; Figure needs no pyplot state or GUI backend

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def plot_layer_similarity(named: list[tuple[str, Mapping[str, Any]]]) -> str:
    """Aligned weight correlation per matched layer, one line per compared pair."""
    fig = _figure()
    ax = fig.add_subplot()
    for name, result in named:
        corr = [x["correlation"] for x in result["layers"]]
        ax.plot(range(1, len(corr) + 1), corr, marker="o", label=name)
    ax.set_ylim(-0.1, 1.05)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("matched layer (in the first model's order)")
    ax.set_ylabel("aligned weight correlation")
    ax.axhline(0, color="grey", lw=0.5)
    if named:
        ax.legend(fontsize="small")
    ax.set_title("Per-layer similarity")
    return _png(fig, "per-layer similarity")


def plot_distance_null(bits: int, distances: list[tuple[str, int]], radius: int | None) -> str:
    """The null distribution of code distances with each observed distance and its false-match rate."""
    fig = _figure()
    ax = fig.add_subplot()
    pmf = distance_null(bits)
    ax.plot(np.arange(bits + 1), pmf, color="black", lw=1, label="independent models (null)")
    if radius is not None:
        ax.axvspan(0, radius, color="tab:red", alpha=0.1, label=f"copy radius {radius}")
    for name, d in distances:
        ax.axvline(d, color="tab:blue", lw=1.5)
        ax.annotate(f"{name}\nd={d}, fmr={false_match_rate(d, bits):.1e}", (d, float(pmf.max()) * 0.8),
                    fontsize="x-small", rotation=90, ha="right", va="top")  # fmt: skip
    ax.set_xlabel(f"Hamming distance of {bits}-bit codes")
    ax.set_ylabel("probability")
    ax.legend(fontsize="small", loc="upper left")
    ax.set_title("Where the distance falls on the null")
    return _png(fig, "distance on the null distribution")


def plot_permutation_null(test: Mapping[str, Any]) -> str:
    """The permutation test's null counts with the observed statistic marked."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.bar(test["null"]["values"], test["null"]["counts"], color="grey", label=f"{test['n_perm']} permutations")
    ax.axvline(test["observed"], color="tab:red", label=f"observed {test['observed']} (p = {test['p_value']:.3g})")
    ax.set_xlabel(test["statistic"])
    ax.set_ylabel("permutations")
    ax.legend(fontsize="small")
    ax.set_title("Exact permutation test")
    return _png(fig, "permutation null")


def plot_weight_difference(hist: Mapping[str, Any], name: str) -> str:
    """Histogram of the aligned pair's weight differences."""
    fig = _figure()
    ax = fig.add_subplot()
    edges = np.asarray(hist["edges"], dtype=np.float64)
    if len(edges) > 1:
        ax.stairs(hist["counts"], edges, fill=True, color="tab:blue")
    ax.set_xlabel(f"aligned weight difference ({hist.get('unit', '')})")
    ax.set_ylabel("weights")
    ax.set_title(f"Weight difference, {name}")
    return _png(fig, "weight difference histogram")


def plot_tree(tree: Mapping[str, Any]) -> str:
    """The derivation tree, root on top, each model below its parent, edges labelled with code distances."""
    children: dict[str, list[tuple[str, int]]] = {}
    for parent, child, d in tree["edges"]:
        children.setdefault(parent, []).append((child, d))
    place: dict[str, tuple[float, int]] = {}
    column = [0]

    def lay_out(key: str, depth: int) -> float:
        kids = children.get(key, [])
        if not kids:
            place[key] = (float(column[0]), depth)
            column[0] += 1
        else:
            xs = [lay_out(child, depth + 1) for child, _ in kids]
            place[key] = (sum(xs) / len(xs), depth)
        return place[key][0]

    lay_out(tree["root"], 0)
    depth = max(d for _, d in place.values())
    fig = _figure(7.0, 1.2 + 1.1 * depth)
    ax = fig.add_subplot()
    for parent, child, d in tree["edges"]:
        (x0, y0), (x1, y1) = place[parent], place[child]
        ax.annotate("", (x1, -y1), (x0, -y0), arrowprops={"arrowstyle": "->", "color": "grey"})
        ax.text((x0 + x1) / 2, -(y0 + y1) / 2, str(d), fontsize="x-small", color="grey")
    for key, (x, y) in place.items():
        label = os.path.basename(key.rstrip("/")) or key
        color = "tab:red" if key == tree["root"] else "tab:blue"
        ax.text(x, -y, label, ha="center", va="center", fontsize="small",
                bbox={"boxstyle": "round", "fc": "white", "ec": color})  # fmt: skip
    ax.set_xlim(-0.7, max(column[0] - 0.3, 0.7))
    ax.set_ylim(-depth - 0.5, 0.5)
    ax.set_axis_off()
    ax.set_title(f"Derivation tree (root: {tree['rooted_by']})")
    return _png(fig, "derivation tree")


# --- the page ----------------------------------------------------------------------------------------------


def _finite(obj: Any) -> Any:
    """JSON has no NaN or infinity: those become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def embedded_json(doc: Mapping[str, Any]) -> str:
    """``doc`` as JSON that is safe inside a <script> element (no '<', '>' or '&' left to end it early)."""
    text = json.dumps(_finite(doc), allow_nan=False, indent=1)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
.verdict { font-size: 1.25rem; padding: 0.8rem 1rem; border-left: 0.4rem solid #c33; background: #fbeaea; }
.verdict.quiet { border-color: #39c; background: #eaf4fb; }
table { border-collapse: collapse; font-size: 0.9rem; }
td, th { padding: 0.2rem 0.6rem; border-bottom: 1px solid #ddd; }
figure { margin: 1rem 0; } img { max-width: 100%; }
details pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; font-size: 0.8rem; }
"""


def _layer_table(result: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(x['layer_a'])}</td><td>{html.escape(x['layer_b'])}</td>"
        f"<td>{'x'.join(str(s) for s in x['shape'])}</td><td>{x['correlation']:.3f}</td>"
        f"<td>{x['relative_change']:.3f}</td><td>{x['cosine']:.3f}</td>"
        f"<td>{'' if x['units_in_place'] is None else x['units_in_place']}/{x['units']}</td></tr>"
        for x in result["layers"]
    )
    head = ("<tr><th>layer of a</th><th>layer of b</th><th>shape</th><th>correlation</th><th>relative change</th>"
            "<th>cosine</th><th>units in place</th></tr>")  # fmt: skip
    return f"<table>{head}{rows}</table>"


def _compare_body(result: Mapping[str, Any]) -> tuple[str, list[str]]:
    name = f"{os.path.basename(result['a'])} vs {os.path.basename(result['b'])}"
    plots = [plot_layer_similarity([(name, result)]), plot_permutation_null(result["test"])]
    if "code" in result:
        plots.append(plot_distance_null(result["code"]["bits"], [(name, result["code"]["distance"])],
                                        result["code"]["copy_radius"]))  # fmt: skip
    plots.append(plot_weight_difference(result["weight_difference"], name))
    return f"<h2>Matched layers</h2>{_layer_table(result)}", plots


def html_page(doc: Mapping[str, Any]) -> str:
    """The self-contained HTML page of a ``compare`` result or a ``suspect_report`` document."""
    if doc.get("kind") == "suspect":
        title = f"hashdb report: {doc['suspect']}"
        sections, plots = [], []
        compared = [(m["key"], m["compare"]) for m in doc["matches"] if "compare" in m]
        rows = "".join(
            f"<tr><td>{html.escape(m['key'])}</td><td>{m['distance']}</td><td>{m['fmr']:.2g}</td>"
            f"<td>{m['expected_false']:.2g}</td>"
            f"<td>{html.escape(m['compare']['verdict']['call']) if 'compare' in m else 'not verified'}</td></tr>"
            for m in doc["matches"]
        )
        sections.append("<h2>Matches</h2><table><tr><th>stored model</th><th>distance</th><th>fmr</th>"
                        f"<th>expected false</th><th>verification</th></tr>{rows}</table>")  # fmt: skip
        if compared:
            plots.append(plot_layer_similarity([(os.path.basename(k), r) for k, r in compared]))
        plots.append(plot_distance_null(doc["bits"], [(os.path.basename(m["key"]), m["distance"])
                                                      for m in doc["matches"]], doc["radius"]))  # fmt: skip
        if compared:
            plots.append(plot_weight_difference(compared[0][1]["weight_difference"], os.path.basename(compared[0][0])))
        if doc.get("tree"):
            plots.append(plot_tree(doc["tree"]))
            note = doc["tree"].get("note")
            if note:
                sections.append(f"<p>{html.escape(note)}</p>")
    else:
        title = f"hashdb compare: {doc['a']} vs {doc['b']}"
        body, plots = _compare_body(doc)
        sections = [body]
    verdict = doc["verdict"]
    quiet = " quiet" if verdict["call"] in ("no evidence", "no match") else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p class=\"verdict{quiet}\" id=\"verdict\"><strong>{html.escape(verdict['call'])}</strong>: "
        f"{html.escape(verdict['words'])}</p>"
        + "".join(sections)
        + "<h2>Plots</h2>" + "".join(plots)
        + "<h2>Data</h2><details><summary>The JSON this page was made from</summary><pre id=\"evidence-text\">"
        + html.escape(json.dumps(_finite(doc), indent=1, allow_nan=False))
        + "</pre></details>"
        + f'<script type="application/json" id="evidence">{embedded_json(doc)}</script>'
        + "</body></html>\n"
    )


def write_page(path: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    """Write ``html_page(doc)`` to ``path`` (through a temporary file, so a failed write leaves no half page)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(html_page(doc), encoding="utf-8")
    os.replace(tmp, target)


__all__ = ["suspect_report", "suspect_verdict", "html_page", "write_page", "embedded_json", "hamming"]
