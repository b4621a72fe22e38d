"""The model zoo's modifications do what they claim: function-preserving ones keep outputs, pruning hits
its sparsity, and the small library carries consistent labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import zoo

ALL_ARCHS = [a for a in zoo.ARCHS if a != "widevgg"]  # the 10M net is covered by the library build, not here


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.nn.Module]:
    """One briefly trained model per architecture (BN statistics away from their init values)."""
    torch.manual_seed(0)
    x, y = zoo.dataset("digits")
    out = {}
    for arch in ALL_ARCHS:
        m = zoo.make_model(arch, 3)
        zoo.train(m, x[:256], y[:256], 15, zoo.ARCHS[arch][3], seed=1)
        out[arch] = m.eval()
    return out


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return zoo.dataset("digits", "test")[0][:128]


def _same_function(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-5 * float(ya.abs().max()))


def _changed_weights(a: torch.nn.Module, b: torch.nn.Module) -> int:
    sa, sb = a.state_dict(), b.state_dict()
    return sum(not torch.equal(sa[k], sb[k]) for k in sa if k in sb and sa[k].shape == sb[k].shape)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_channel_permutation_keeps_the_function_and_changes_weights(trained, probe, arch, seed) -> None:
    m = trained[arch]
    p = zoo.permute_channels(m, 1.0, seed)
    _same_function(m, p, probe)
    assert _changed_weights(m, p) > 0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_positive_rescaling_keeps_the_function(trained, probe, arch, per_channel) -> None:
    m = trained[arch]
    r = zoo.rescale(m, 1.5, 7, per_channel=per_channel)
    _same_function(m, r, probe)
    w0 = m.get_submodule(m.channel_groups()[0].out[0]).weight
    w1 = r.get_submodule(r.channel_groups()[0].out[0]).weight
    ratio = (w1.flatten(1).norm(dim=1) / w0.flatten(1).norm(dim=1)).detach()
    assert float(ratio.max() / ratio.min()) > (1.05 if per_channel else 0.0)
    assert float((ratio - 1).abs().max()) > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in ALL_ARCHS if zoo.ARCHS[a][1]])
def test_batchnorm_folding_keeps_the_function_and_removes_bn(trained, probe, arch) -> None:
    m = trained[arch]
    f = zoo.fold_batchnorm(m)
    _same_function(m, f, probe)
    assert not any("running_var" in k for k in f.state_dict())
    assert any("running_var" in k for k in m.state_dict())


@pytest.mark.slow
def test_modifications_leave_the_original_untouched(trained) -> None:
    m = trained["resnet"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for fn, s in [(zoo.permute_channels, 1.0), (zoo.rescale, 1.0), (zoo.fold_batchnorm, 1.0),
                  (zoo.prune_magnitude, 0.5), (zoo.prune_filters, 0.3), (zoo.gaussian_noise, 0.1),
                  (zoo.quantize, 8), (zoo.cast, "bf16")]:  # fmt: skip
        fn(m, s, 3)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.7])
def test_magnitude_pruning_reaches_the_asked_sparsity(trained, fraction) -> None:
    p = zoo.prune_magnitude(trained["vgg"], fraction)
    for _, mod in zoo.weight_modules(p):
        w = mod.weight
        assert int((w == 0).sum()) == int(fraction * w.numel())


@pytest.mark.slow
def test_pruning_an_already_pruned_model_still_hits_the_sparsity_exactly(trained) -> None:
    """Ties at zero: pruning 50 % of a 30 %-pruned model zeroes exactly 50 %, not more."""
    p = zoo.prune_magnitude(zoo.prune_magnitude(trained["resnet"], 0.3), 0.5)
    for _, mod in zoo.weight_modules(p):
        assert int((mod.weight == 0).sum()) == int(0.5 * mod.weight.numel())


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_filter_pruning_zeroes_the_lowest_norm_filters(trained, fraction) -> None:
    m = trained["mobilenet"]
    p = zoo.prune_filters(m, fraction)
    for (name, mod), (_, orig) in zip(zoo.weight_modules(p), zoo.weight_modules(m), strict=True):
        if isinstance(mod, torch.nn.Linear):
            continue
        dead = mod.weight.flatten(1).abs().sum(1) == 0
        assert int(dead.sum()) == int(fraction * mod.weight.shape[0]), name
        norms = orig.weight.detach().flatten(1).norm(dim=1)
        if dead.any() and (~dead).any():
            assert float(norms[dead].max()) <= float(norms[~dead].min())


@pytest.mark.slow
def test_quantization_uses_at_most_255_levels_per_channel(trained) -> None:
    q = zoo.quantize(trained["plain"], 8, per_channel=True)
    for _, mod in zoo.weight_modules(q):
        for row in mod.weight.flatten(1):
            assert len(torch.unique(row)) <= 255


@pytest.mark.slow
def test_small_library_labels_are_consistent(tmp_path: Path) -> None:
    lib = zoo.small_library(tmp_path)  # its model cache in pytest's folder, not a temporary one left behind
    originals = {e.key for e in lib.originals}
    assert len(originals) == sum(n for _, n in zoo.SMALL_ORIGINALS)
    assert {e.arch for e in lib.originals} == {a for a, _ in zoo.SMALL_ORIGINALS}
    for e in lib.entries:
        if e.original is None:
            assert e.mclass == "original" and not e.steps
        else:
            assert e.original in originals and e.steps and e.mclass != "original"
            assert lib[e.original].arch == e.arch
    classes = set(lib.counts())
    assert {"prune_magnitude", "quantize", "cast", "permute", "fold_bn", "combo"} <= classes
    # a permuted copy materializes to the same function as its original
    perm = next(e for e in lib.entries if e.mclass == "permute")
    x = zoo.dataset("digits", "test")[0][:64]
    _same_function(lib.model(perm.original), lib.model(perm), x)
    heavy = [e for e in lib.entries if e.mclass == "prune_magnitude" and e.strength in ("60%", "70%")]
    assert heavy and not any(e.light for e in heavy)


def test_a_recovery_fine_tune_keeps_the_pruning_mask_and_an_ordinary_one_does_not() -> None:
    pruned = zoo.prune_magnitude(zoo.make_model("plain", 0), 0.5)
    before = {k: v for k, v in pruned.state_dict().items() if v.is_floating_point()}
    zeros = {k: v == 0 for k, v in before.items()}
    assert sum(int(z.sum()) for z in zeros.values()) > 0
    for masked in (True, False):
        tuned = zoo.MODIFICATIONS["finetune"](pruned, 1e-2, 0, steps=3, opt="sgd", masked=masked).state_dict()
        kept = all(bool((tuned[k][z] == 0).all()) for k, z in zeros.items())
        assert kept == masked and any(not torch.equal(tuned[k], v) for k, v in before.items())
    plan = [e for e in zoo.library_plan() if e.mclass == "prune_recover"]
    assert plan and all(e.steps[-1][0] == "finetune" and dict(e.steps[-1][3])["masked"] for e in plan)
    assert {e.strength.split(" + ")[0] for e in plan if not e.light} == {"magnitude 70%"}  # light as pruning alone


def test_library_plan_is_reproducible_and_every_copy_names_a_real_original() -> None:
    entries = zoo.library_plan()
    assert entries == zoo.library_plan()  # seeded: the same recipes, hence the same cache keys, every run
    by_key = {e.key: e for e in entries}
    assert len(by_key) == len(entries)
    for e in entries:
        assert all(st[0] in zoo.MODIFICATIONS for st in e.steps), e.key
        if e.original is not None:
            o = by_key[e.original]
            assert o.original is None and (o.arch, o.data, o.seed) == (e.arch, e.data, e.seed), e.key
            assert e.steps and e.key.startswith(o.key + "/")


def test_a_smaller_plan_is_a_prefix_of_a_larger_one_so_the_cache_carries_over() -> None:
    full = zoo.library_plan()
    small = zoo.library_plan(n_min=len(full) - 400)
    assert small == full[: len(small)]
    lib_small, lib_full = zoo.Library(small, zoo.DEFAULT_CACHE), zoo.Library(full, zoo.DEFAULT_CACHE)
    trained = {k for e in small for k in lib_small.trained_keys(e)}
    assert trained <= {k for e in full for k in lib_full.trained_keys(e)}
    names = {zoo.cache_name(k) for e in full for k in lib_full.trained_keys(e)}
    assert len(names) == len({k for e in full for k in lib_full.trained_keys(e)})  # no two keys share a file


@pytest.mark.slow
def test_cached_originals_reload_exactly_and_is_cached_tells_the_truth(tmp_path) -> None:
    lib = zoo.small_library(tmp_path)
    orig = lib.originals[0]
    copy_ = next(e for e in lib.entries if e.original == orig.key)
    assert not lib.is_cached(orig) and not lib.is_cached(copy_)
    first = lib.state_dict(copy_)
    assert lib.is_cached(orig) and lib.is_cached(copy_)
    again = zoo.small_library(tmp_path).state_dict(copy_)  # a fresh library: the original comes from disk
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def _fake_run(codes: list[list[int]], bits: int, radius: int):
    import numpy as np

    from bench.codec_bench import HashRun

    c = np.array(codes, bool)
    n = len(c)
    return HashRun("fake", bits, radius, c, np.ones(n, bool), np.full(n, 1e-3), np.full(n, 1e5))


def test_bench_metrics_on_a_hand_made_library() -> None:
    """Originals a=00000000, b=11000000; copies a1=10000000 (light), ad=11100000 (distillation of a),
    b1=01000000 (light). From a: a1 and b1 at 1, b at 2 (ad left out). From b: a1, ad and b1 at 1."""
    import numpy as np

    from bench.codec_bench import _auc, metrics

    E = zoo.Entry
    entries = [
        E("a", "plain", "digits", 0, None, "original", "", True),
        E("b", "plain", "digits", 1, None, "original", "", True),
        E("a/1", "plain", "digits", 0, "a", "noise", "0.01", True, (zoo.step("noise", 0.01),)),
        E("a/d", "plain", "digits", 0, "a", "distill", "T=4", False, (zoo.step("distill", 4.0),)),
        E("b/1", "plain", "digits", 1, "b", "noise", "0.01", True, (zoo.step("noise", 0.01),)),
    ]
    lib = zoo.Library(entries, cache_dir=zoo.DEFAULT_CACHE)
    z = [0] * 8
    codes = [z, [1, 1, 0, 0, 0, 0, 0, 0], [1] + z[1:], [1, 1, 1] + z[3:], [0, 1] + z[2:]]
    m = metrics(_fake_run(codes, 8, 1), lib)
    assert m["recall_light"] == 1.0  # d(a, a1) = 1, d(b, b1) = 1 (codes differ in bit 0 only)
    assert m["false_positive_pairs"] == 3  # b1 near a; a1 and a's distillation near b
    assert m["precision_light"] == 2 / 5
    assert m["recall_distill"] == 0.0  # d(a, ad) = 3
    # pessimistic ties: a ranks a1 second (AP 1/2), b ranks b1 third behind a1 and ad (AP 1/3)
    assert abs(m["mAP"] - (1 / 2 + 1 / 3) / 2) < 1e-12
    assert abs(m["mAP_with_distill"] - (1 / 2 * (1 / 2 + 2 / 4) + 1 / 3) / 2) < 1e-12
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 20, 50).astype(float), rng.integers(5, 40, 70).astype(float)
    from sklearn.metrics import roc_auc_score

    want = roc_auc_score(np.r_[np.ones(50), np.zeros(70)], -np.r_[pos, neg])
    assert abs(_auc(pos, neg) - want) < 1e-12
