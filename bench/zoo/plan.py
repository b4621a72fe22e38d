"""Which models the library holds: originals per architecture, the copies made of each, filler copies up to
the paper's library size, and the small library the test suite uses."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import dataset
from .library import DEFAULT_CACHE, Entry, Library, Step, step
from .modify import TRAINED
from .nets import ARCHS, make_model
from .training import train

# Originals: (arch, number of seeds, data per seed index). Mostly digits split A; a few trained on other data.
ORIGINALS: tuple[tuple[str, int], ...] = (
    ("plain", 8), ("vgg", 6), ("resnet", 6), ("mobilenet", 6), ("conv1d", 4), ("widevgg", 3),
)  # fmt: skip


def _data_for(seed: int) -> str:
    return {3: "synth", 5: "digits_b", 7: "digits_b"}.get(seed, "digits")


def _copy_plan(arch: str, big: bool, rng: np.random.Generator) -> list[tuple[str, str, bool, tuple[Step, ...]]]:
    """(mclass, strength label, light, steps) of every copy made of one original."""
    has_bn = ARCHS[arch][1]
    plan: list[tuple[str, str, bool, tuple[Step, ...]]] = []

    def add(mclass: str, label: str, light: bool, *steps: Step) -> None:
        plan.append((mclass, label, light, tuple(steps)))

    def s() -> int:
        return int(rng.integers(1 << 30))

    ft = [("sgd", 1e-3, 60), ("sgd", 1e-2, 60), ("sgd", 1e-2, 150), ("adam", 1e-4, 60), ("adam", 1e-4, 150),
          ("adam", 1e-3, 60), ("adam", 1e-3, 150), ("sgd", 3e-3, 120)]  # fmt: skip
    if big:  # the 10M net: fewer, shorter fine-tunes (each step costs ~100x a small net's)
        ft = [("sgd", 1e-3, 30), ("sgd", 1e-2, 30), ("adam", 1e-4, 30), ("adam", 1e-3, 30)]
    for opt, lr, n in ft:
        add("finetune", f"{opt} lr={lr:g} steps={n}", True, step("finetune", lr, s(), steps=n, opt=opt))
    for lr, n in [(1e-3, 30)] if big else [(1e-3, 150), (3e-4, 150)]:
        add("transfer", f"adam lr={lr:g} steps={n}", True, step("transfer", lr, s(), steps=n))
    for p in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
        add("prune_magnitude", f"{p:.0%}", p <= 0.5, step("prune_magnitude", p))
    for p in (0.1, 0.2, 0.3, 0.4, 0.5):
        add("prune_filters", f"{p:.0%}", True, step("prune_filters", p))
    add("quantize", "int8 per-tensor", True, step("quantize", 8, per_channel=False))
    add("quantize", "int8 per-channel", True, step("quantize", 8, per_channel=True))
    add("quantize", "int4 per-channel", False, step("quantize", 4, per_channel=True))
    add("cast", "fp16", True, step("cast", "fp16"))
    add("cast", "bf16", True, step("cast", "bf16"))
    for sig in (0.01, 0.02, 0.05, 0.1):
        for _ in range(4):
            add("noise", f"{sig:g}", True, step("noise", sig, s()))
    if has_bn:
        add("fold_bn", "all", True, step("fold_bn", 1.0))
    for frac in (0.5, 1.0):
        for _ in range(4):
            add("permute", f"{frac:.0%} of groups", True, step("permute", frac, s()))
    for sc in (0.5, 1.5):
        for _ in range(3):
            add("rescale", f"per-channel e^U(-{sc:g},{sc:g})", True, step("rescale", sc, s(), per_channel=True))
            add("rescale", f"per-layer e^U(-{sc:g},{sc:g})", True, step("rescale", sc, s(), per_channel=False))
    # combinations
    for p in (0.3, 0.5):
        add("combo", f"prune {p:.0%} + int8", True, step("prune_magnitude", p), step("quantize", 8, per_channel=True))
    ft0 = plan[0][3][0]
    add("combo", "finetune + prune 30%", True, ft0, step("prune_magnitude", 0.3))
    add("combo", "finetune + int8", True, ft0, step("quantize", 8))
    for _ in range(3):
        add("combo", "permute + rescale + noise 0.02", True,
            step("permute", 1.0, s()), step("rescale", 1.0, s()), step("noise", 0.02, s()))  # fmt: skip
    add("combo", "filter prune 30% + fp16", True, step("prune_filters", 0.3), step("cast", "fp16"))
    if has_bn:
        add("combo", "permute + fold BN + int8", True, step("permute", 1.0, s()), step("fold_bn", 1.0),
            step("quantize", 8, per_channel=True))  # fmt: skip
    # distillation (hard): same architecture and a different small one
    other = {"plain": "vgg", "vgg": "plain", "resnet": "mobilenet", "mobilenet": "resnet", "conv1d": "plain",
             "widevgg": "vgg"}[arch]  # fmt: skip
    student_same = "vgg" if big else arch
    add("distill", f"T=4 student={student_same}", False, step("distill", 4.0, s(), student=student_same))
    add("distill", f"T=4 student={other}", False, step("distill", 4.0, s(), student=other))
    # pruning as a thief prunes: then a recovery fine-tune that keeps the mask (the pruning copies above have
    # none, and most of the heavier ones are broken); light as pruning alone is (magnitude up to 50 %). Seeded
    # apart from ``rng``, so that adding them changed no other copy's seed (nor any cache key).
    n = 30 if big else 100
    for j, (kind, p) in enumerate((("prune_filters", 0.3), ("prune_filters", 0.5), ("prune_magnitude", 0.5),
                                   ("prune_magnitude", 0.7))):  # fmt: skip
        recover = step("finetune", 1e-3, 9000 + j, steps=n, opt="adam", masked=True)
        light = kind == "prune_filters" or p <= 0.5
        add("prune_recover", f"{kind.split('_')[1]} {p:.0%} + adam lr=0.001 steps={n}", light, step(kind, p), recover)
    return plan


# Filler modifications (seeded, cheap) used to reach n_min: each call yields one more copy.
def _filler(rng: np.random.Generator) -> tuple[str, str, bool, tuple[Step, ...]]:
    kind = int(rng.integers(4))
    s = int(rng.integers(1 << 30))
    if kind == 0:
        sig = float(rng.choice([0.01, 0.02, 0.05, 0.1]))
        return ("noise", f"{sig:g}", True, (step("noise", sig, s),))
    if kind == 1:
        return ("permute", "100% of groups", True, (step("permute", 1.0, s),))
    if kind == 2:
        return ("rescale", "per-channel e^U(-1,1)", True, (step("rescale", 1.0, s, per_channel=True),))
    p = float(rng.choice([0.2, 0.3, 0.4]))
    return ("combo", f"permute + prune {p:.0%} + noise 0.01", True,
            (step("permute", 1.0, s), step("prune_magnitude", p), step("noise", 0.01, s + 1)))  # fmt: skip


def library_plan(
    n_min: int = 3565, seed: int = 0, originals: tuple[tuple[str, int], ...] = ORIGINALS, copies: bool = True
) -> list[Entry]:
    """The entries (labels and recipes) without training anything."""
    rng = np.random.default_rng(seed)
    entries: list[Entry] = []
    origs: list[Entry] = []
    for arch, n in originals:
        for sd in range(n):
            data = _data_for(sd)
            e = Entry(f"{arch}-s{sd}-{data}", arch, data, sd, None, "original", "", True)
            origs.append(e)
    entries += origs
    if not copies:
        return entries
    for o in origs:
        for i, (mclass, label, light, steps) in enumerate(_copy_plan(o.arch, o.arch == "widevgg", rng)):
            entries.append(Entry(f"{o.key}/{mclass}-{i}", o.arch, o.data, o.seed, o.key, mclass, label, light, steps))
    i = 0
    while len(entries) < n_min:
        o = origs[i % len(origs)]
        mclass, label, light, steps = _filler(rng)
        entries.append(Entry(f"{o.key}/x{i}-{mclass}", o.arch, o.data, o.seed, o.key, mclass, label, light, steps))
        i += 1
    return entries


def build_library(
    n_min: int = 3565,
    seed: int = 0,
    cache_dir: str | Path = DEFAULT_CACHE,
    originals: tuple[tuple[str, int], ...] = ORIGINALS,
    threads: int = 1,
    verbose: bool = False,
) -> Library:
    """Plan >= ``n_min`` entries and train (or load from cache) every trained part: originals, fine-tunes,
    transfers and distillations. Cheap copies are materialized on demand by ``Library.model``."""
    torch.set_num_threads(threads)
    lib = Library(library_plan(n_min, seed, originals), Path(cache_dir))
    t0 = time.perf_counter()
    trained = [e for e in lib.entries if e.original is None or any(s[0] in TRAINED for s in e.steps)]
    for j, e in enumerate(trained):
        m = lib.model(e)
        del m
        if verbose and (j % 20 == 0 or j == len(trained) - 1):
            print(f"  [{time.perf_counter() - t0:7.1f} s] trained/loaded {j + 1}/{len(trained)}: {e.key}", flush=True)
    return lib


SMALL_ORIGINALS: tuple[tuple[str, int], ...] = (("plain", 2), ("resnet", 1), ("mobilenet", 1))


def small_library(cache_dir: str | Path | None = None, seed: int = 0) -> Library:
    """A few seconds to build: tiny training recipes, the cheap modification classes only (no training of
    copies), two plain nets plus one ResNet and one MobileNet. For the test suite."""
    import tempfile

    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="zoo-small-"))
    rng = np.random.default_rng(seed)
    entries: list[Entry] = []
    for arch, n in SMALL_ORIGINALS:
        for sd in range(n):
            o = Entry(f"small-{arch}-s{sd}", arch, "digits", sd, None, "original", "", True)
            entries.append(o)
            for mclass, label, light, steps in _copy_plan(arch, False, rng):
                trained_copy = any(s[0] in TRAINED for s in steps)
                if trained_copy or (mclass in ("noise", "rescale", "permute") and rng.random() < 0.5):
                    continue
                entries.append(
                    Entry(f"{o.key}/{mclass}-{len(entries)}", arch, "digits", sd, o.key, mclass, label, light, steps)
                )
    return SmallLibrary(entries, cache)


class SmallLibrary(Library):
    """The small library's originals: 40 Adam steps on 512 digits instead of the full recipe."""

    def train_original(self, e: Entry) -> nn.Module:
        m = make_model(e.arch, e.seed)
        x, y = dataset("digits")
        train(m, x[:512], y[:512], 40, ARCHS[e.arch][3], seed=e.seed)
        m.zoo_data = "digits"  # type: ignore[assignment]
        return m
