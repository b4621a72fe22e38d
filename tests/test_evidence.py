"""hashdb.evidence: pair verification (alignment, exact p-value, direction), derivation trees, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from evidence_helpers import save, trained

from hashdb.cli import EXIT_ERROR, main
from hashdb.codec.hasher import ModelHasher
from hashdb.db import HashDB
from hashdb.errors import ModelFormatError
from hashdb.evidence import compare
from hashdb.evidence.align import Layer, model_layers
from hashdb.evidence.compare import _fixed_point_null, align_models, fixed_point_tail_bound
from hashdb.evidence.lineage import derivation_tree

pytestmark = pytest.mark.slow  # trains small CNNs (a few seconds, shared by the tests of this process)


def permuted_copy(sd: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """The same function with every hidden unit relabelled (conv outputs, their biases, the next inputs)."""
    rng = np.random.default_rng(seed)
    out = {k: v.copy() for k, v in sd.items()}
    previous = None
    for name in ("0", "2", "4"):
        perm = rng.permutation(out[f"{name}.weight"].shape[0])
        w = out[f"{name}.weight"][perm]
        out[f"{name}.weight"] = w if previous is None else w[:, previous]
        out[f"{name}.bias"] = out[f"{name}.bias"][perm]
        previous = perm
    out["8.weight"] = out["8.weight"][:, previous]
    return out


def test_finetuned_copy_gives_a_tiny_p_value_and_the_right_direction_both_ways():
    forward = compare(trained("original"), trained("finetune"), bits=None)
    assert forward["test"]["p_value"] == 1 / 1000  # the smallest p-value 999 permutations can give
    assert forward["test"]["p_value_bound"] < 1e-20
    assert forward["verdict"]["call"] == "derived"
    assert forward["aligned_correlation"] > 0.95
    assert forward["direction"]["derived"] == "b"
    backward = compare(trained("finetune"), trained("original"), bits=None)
    assert backward["direction"]["derived"] == "a"
    assert backward["direction"]["margin"] == pytest.approx(-forward["direction"]["margin"], rel=1e-6)


def test_a_grandchild_is_derived_from_its_grandparent():
    result = compare(trained("original"), trained("finetune2"), bits=None)
    assert result["verdict"]["call"] == "derived"
    assert result["direction"]["derived"] == "b"


@pytest.mark.parametrize("a, b", [("original", "independent1"), ("original", "independent2"),
                                  ("independent1", "independent3")])  # fmt: skip
def test_independently_trained_models_give_p_values_that_are_not_small(a, b):
    result = compare(trained(a), trained(b), bits=None)
    assert result["test"]["p_value"] > 0.05
    assert result["verdict"]["call"] == "no evidence"
    assert result["aligned_correlation"] < 0.6


def test_a_permuted_copy_aligns_exactly():
    sd = trained("finetune")
    result = compare(sd, permuted_copy(sd, seed=5), bits=None)
    for layer in result["layers"]:
        assert layer["correlation"] == pytest.approx(1.0, abs=1e-6)
        assert layer["relative_change"] == pytest.approx(0.0, abs=1e-6)
    assert result["verdict"]["call"] == "permuted copy"
    assert result["direction"]["derived"] == "undetermined"  # the same weights: no kurtosis margin


def test_a_backbone_inside_a_bigger_model_aligns_to_its_own_layers():
    # the thief has an extra conv of the same shape as the victim's last one, right after it, and a new head
    result = compare(trained("original"), trained("thief"), bits=None)
    assert [(x["layer_a"], x["layer_b"]) for x in result["layers"]] == [
        ("0.weight", "0.weight"), ("2.weight", "2.weight"), ("4.weight", "4.weight")]  # fmt: skip
    assert result["layers_b"] == 5 and result["layers_matched"] == 3
    assert result["verdict"]["call"] == "derived"
    assert all(x["correlation"] > 0.9 for x in result["layers"])


def test_matching_is_equivariant_so_the_permutation_null_is_exact():
    # Relabelling a's hidden units must relabel the matching and change nothing else: the null draws of the
    # test are fixed points of (random permutation o matching) only because of this.
    a, b = trained("original"), trained("independent1")
    relabelled = permuted_copy(a, seed=11)

    def layers(sd: dict[str, np.ndarray]) -> list[Layer]:
        return model_layers([type_(k, v) for k, v in sd.items()])

    from hashdb.codec.readers import NamedTensor as type_

    plain = align_models(layers(a), layers(b))
    moved = align_models(layers(relabelled), layers(b))
    rng = np.random.default_rng(11)
    for x, y, name in zip(plain, moved, ("0", "2", "4", "8"), strict=True):
        perm = rng.permutation(len(x.out_perm)) if name != "8" else np.arange(len(x.out_perm))
        assert np.array_equal(y.out_perm, x.out_perm[perm])


@pytest.mark.parametrize("groups", [
    {5: [np.arange(5)], 7: [np.arange(7)], 9: [np.arange(9)]},  # untied layers
    {6: [np.arange(6)] * 3, 4: [np.arange(4), np.arange(4)[::-1]]},  # layers sharing a permutation
])  # fmt: skip
def test_fixed_point_bound_is_above_the_monte_carlo_tail(groups):
    null = _fixed_point_null(groups, 200_000, np.random.default_rng(0))
    sizes = [len(g) for g in groups.values()]
    for observed in range(sum(sizes) + 1, int(null.max()) + 1):
        assert fixed_point_tail_bound(observed, sizes) >= float((null >= observed).mean())
    assert fixed_point_tail_bound(sum(sizes), sizes) == 1.0
    assert fixed_point_tail_bound(60, sizes) < 1e-6


def test_derivation_tree_roots_at_the_original(tmp_path):
    names = ["finetune2", "original", "finetune", "independent1"][:3]
    files = {n: str(save(n, tmp_path)) for n in names}
    codes = {n: bytes([i]) * 32 for i, n in enumerate(names)}  # distances: the tree's edges follow them
    tree = derivation_tree(codes, files)
    assert tree["rooted_by"] == "kurtosis" and tree["root"] == "original"
    assert len(tree["edges"]) == 2 and {c for _, c, _ in tree["edges"]} == {"finetune", "finetune2"}
    files["finetune"] = str(tmp_path / "gone.npz")
    fallback = derivation_tree(codes, files)
    assert fallback["rooted_by"] == "medoid" and fallback["unreadable"] == ["finetune"]
    assert "cannot be read" in fallback["note"]


def test_cli_compare_prints_json_and_refuses_a_bad_file_in_one_line(tmp_path, capsys):
    a, b = save("original", tmp_path), save("finetune", tmp_path)
    assert main(["compare", str(a), str(b), "--json", "--permutations", "99"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"]["call"] == "derived" and doc["test"]["n_perm"] == 99
    assert doc["code"]["distance"] <= doc["code"]["copy_radius"]
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a model")
    assert main(["compare", str(a), str(bad)]) == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.npz" in err and "Traceback" not in err


def test_a_model_without_layers_is_refused():
    with pytest.raises(ModelFormatError, match="no convolution or linear layers"):
        compare({"bias": np.ones(4, np.float32)}, trained("original"), bits=None)


def test_cli_clusters_tree_orders_a_cluster(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hasher = ModelHasher(256)
    with HashDB("db", bits=256) as db:
        db.set_codec(hasher.config)
        for name in ("original", "finetune", "finetune2", "independent1"):
            path = save(name, tmp_path)
            db.insert(path.name, hasher.hash(path), {"path": str(path)})
    assert main(["clusters", "db", "--tree", "--json"]) == 0
    clusters = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    family = [c for c in clusters if "original.npz" in c["keys"]]
    assert family and family[0]["tree"]["root"] == "original.npz"
    assert family[0]["tree"]["rooted_by"] == "kurtosis"
    assert main(["clusters", "db", "--tree"]) == 0
    assert "derivation tree, root = estimated original" in capsys.readouterr().out
    # a stored key stands for its file in compare
    with HashDB("db") as db:
        db.insert("victim", db.get("original.npz")[0], {"path": str(tmp_path / "original.npz")})
    assert main(["compare", "victim", "finetune2.npz", "--db", "db", "--json", "--permutations", "9"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"]["call"] == "derived"
    (tmp_path / "finetune.npz").unlink()
    assert main(["compare", "original.npz", "finetune.npz", "--db", "db"]) == EXIT_ERROR
    assert "not readable here" in capsys.readouterr().err


def test_pruned_filters_that_tie_are_not_counted_as_evidence():
    # Both models had the same filters structurally pruned: the zero filters tie and the solver would pair
    # them by position, which looks like "units kept in place" but is no evidence.
    a, b = dict(trained("original")), dict(trained("independent2"))
    for sd in (a, b):
        sd["2.weight"] = sd["2.weight"].copy()
        sd["2.weight"][:20] = 0.0
    result = compare(a, b, bits=None)
    layer = result["layers"][1]
    assert layer["layer_a"] == "2.weight" and layer["units_in_place"] <= 12
    assert result["test"]["p_value"] > 0.05 and result["verdict"]["call"] == "no evidence"


def test_layers_of_a_safetensors_file_come_in_natural_name_order(tmp_path) -> None:
    """safetensors stores names in string order (features.10 before features.2): the layers must still pair in
    the network's order, so that a deep sequential model's permuted copy is recognised."""
    from safetensors.numpy import save_file

    from hashdb.codec.load import load_tensors
    from hashdb.evidence.align import model_layers

    rng = np.random.default_rng(0)
    widths = [1] + [8 + i for i in range(12)]
    sd = {f"features.{2 * i}.weight": rng.standard_normal((b, a, 3, 3)).astype(np.float32)
          for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False))}  # fmt: skip
    save_file(sd, str(tmp_path / "deep.safetensors"))
    names = [layer.name for layer in model_layers(load_tensors(str(tmp_path / "deep.safetensors")))]
    assert names == list(sd)  # features.0, .2, ..., .22: not .0, .10, .12, ..., .2
    reordered = [layer.name for layer in model_layers(load_tensors({k: sd[k] for k in reversed(list(sd))}))]
    assert reordered == list(reversed(list(sd)))  # a source order that is not string order is kept
