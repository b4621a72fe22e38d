"""Stolen backbones: victims, backbone thefts inside bigger models, independent models, and what per-layer codes
find among them.

    python3 -m bench.backbone train           # the library (resumes; cached under bench/cache/backbone/)
    python3 bench/backbone.py                 # trains what is missing, measures, rewrites section backbone

The library (4 architectures of bench/null.py at base width 32: plain, vgg, resnet, mobilenet; digits task):

- victims: seeds 0-5 of each architecture, the null library's own models (bench/null.py, its cache);
- thefts of every victim: its whole conv backbone inside a bigger model (two new 3x3 convs of 128 filters
  after it, a new head) trained on a new task (relabelled digits or the synthetic prototypes): ``frozen``
  (only the new parts trained, the backbone in eval mode), ``finetuned`` (every layer trained, Adam 1e-3) and
  ``permuted`` (the victim's hidden channels permuted first, the backbone under another name prefix,
  then every layer trained as ``finetuned``) and ``deep`` (as ``finetuned`` with four new convs of 64
  filters: more new layers than stolen ones);
- independents: the victims' architectures at seeds 6-11 (null library models), and the bigger models trained
  from scratch (``scratch``, seeds 100-105) on the thefts' tasks.

Measured: per (suspect, stored victim) pair the whole-model code distance and the layer-level picture from
``ModelHasher.hash_with_layers`` (layer twins paired one-to-one, closest first); the layer-level null (every
layer pair of independent pairs) by number of filters; the radius that separates thefts from independents;
``hashdb.evidence.compare`` p-values of independent same-architecture pairs and of thefts; and, when
hashdb/matching.py exists, the end-to-end query (a HashDB of victims and independents, every theft and
independent queried with its layer codes).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import null  # noqa: E402
from bench._results import machine_line, write_section  # noqa: E402
from bench.zoo.nets import MobileNet, ResNet, SeqNet, ZooNet  # noqa: E402

RECIPE = "b1"  # bump when a theft, a task or a training recipe changes: part of every cache name
CACHE = Path(__file__).resolve().parent / "cache" / "backbone"
ARCHS = ("plain", "vgg", "resnet", "mobilenet")
WIDTH = 32
VICTIM_SEEDS = range(6)
SAME_ARCH_SEEDS = range(6, 12)  # independents of the victims' own architectures
SCRATCH_SEEDS = range(100, 106)  # the bigger models trained from scratch
THEFTS = ("frozen", "finetuned", "permuted", "deep")
NECK = 128  # filters of the thief's two new convs
DEEP_NECK = 64  # filters of the four new convs of a ``deep`` theft (narrower: training time on two cores)
TASKS = ("digits_perm", "synth")  # the thefts' new tasks (bench/zoo/data.py), alternating by seed
STEPS = 300
LR_NEW = 3e-3  # new parts and models from scratch (the null library's recipe)
LR_FINETUNE = 1e-3
BITS = (256, 512, 768)
# A theft of victim s against the victim of another architecture at the same seed s: null.make seeds every
# architecture alike, so both first convs (1 -> 32 channels, 3x3) started from the very same weights, and
# were trained on the same data in the same order: related by their init, though no weight was stolen.
SHARED_INIT = "same seed, other architecture (shared first-layer init)"
RADII = (40, 50, 60, 70, 80, 90, 100, 110, 120)  # at 256 bits; times bits / 256 at longer codes


def group(arch: str) -> str:
    return f"{arch}-w{WIDTH}"


def trunk(net: ZooNet, x: torch.Tensor) -> torch.Tensor:
    """The victim's conv backbone: everything before its global pool and head, spatial maps out."""
    if isinstance(net, ResNet):
        return net.layers(F.relu(net.stem_bn(net.stem(net.up(x)))))
    if isinstance(net, SeqNet | MobileNet):
        return net.features(x)
    raise TypeError(f"no trunk for {type(net).__name__}")


class Thief(nn.Module):
    """A bigger model around a backbone: ``<prefix>.*`` (the backbone, its old head dropped), ``neck`` (``depth``
    3x3 convs of ``width`` filters), global average pool, a new ``head``. ``frozen``: only neck and head train and
    the backbone stays in eval mode (its BatchNorm statistics untouched), as a feature extractor is reused."""

    def __init__(
        self, backbone: ZooNet, prefix: str = "backbone", frozen: bool = False, depth: int = 2, width: int = NECK
    ) -> None:
        super().__init__()
        del backbone.head
        self.prefix = prefix
        self.frozen = frozen
        self.add_module(prefix, backbone)
        with torch.no_grad():
            cout = trunk(backbone.eval(), torch.zeros(1, 1, 8, 8)).shape[1]
        convs: list[nn.Module] = []
        for k in range(depth):
            convs += [nn.Conv2d(cout if k == 0 else width, width, 3, padding=1), nn.ReLU()]
        self.neck = nn.Sequential(*convs)
        self.head = nn.Linear(width, 10)
        if frozen:
            for p in backbone.parameters():
                p.requires_grad_(False)

    @property
    def backbone_net(self) -> ZooNet:
        return self.get_submodule(self.prefix)  # type: ignore[return-value]

    def train(self, mode: bool = True) -> Thief:
        super().train(mode)
        if self.frozen:
            self.backbone_net.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(trunk(self.backbone_net, x)).mean(dim=(2, 3)))


@dataclass(frozen=True)
class Entry:
    """One model of the library. ``kind``: victim | independent | scratch | one of THEFTS; ``seed``: the
    victim's seed for a theft, else the model's own."""

    kind: str
    arch: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.arch}/s{self.seed}"

    @property
    def theft(self) -> bool:
        return self.kind in THEFTS

    @property
    def victim_key(self) -> str | None:
        return f"victim/{self.arch}/s{self.seed}" if self.theft else None

    @property
    def task(self) -> str:
        return "digits" if self.kind in ("victim", "independent") else TASKS[self.seed % 2]

    @property
    def path(self) -> Path:
        if self.kind in ("victim", "independent"):
            return null.cache_path(group(self.arch), self.seed)
        digest = hashlib.sha1(f"{RECIPE}|{self.key}".encode()).hexdigest()[:12]
        return CACHE / f"{RECIPE}-{self.kind}-{self.arch}-s{self.seed}-{digest}.safetensors"


def library() -> list[Entry]:
    out = [Entry("victim", a, s) for a in ARCHS for s in VICTIM_SEEDS]
    out += [Entry(k, a, s) for k in THEFTS for a in ARCHS for s in VICTIM_SEEDS]
    out += [Entry("independent", a, s) for a in ARCHS for s in SAME_ARCH_SEEDS]
    out += [Entry("scratch", a, s) for a in ARCHS for s in SCRATCH_SEEDS]
    return out


def build(e: Entry) -> nn.Module:
    """Train ``e`` (its victim from the null library's cache, else trained there first)."""
    from bench.zoo import modify
    from bench.zoo.data import dataset
    from bench.zoo.training import train

    if e.kind in ("victim", "independent"):
        return null.trained(group(e.arch), e.seed)
    x, y = dataset(e.task)
    kind_index = ("frozen", "finetuned", "permuted", "scratch", "deep").index(e.kind)
    train_seed = 7919 * e.seed + 104729 * (kind_index + 1)
    victim = null.make(group(e.arch), e.seed) if e.kind == "scratch" else null.trained(group(e.arch), e.seed)
    with torch.random.fork_rng():  # the new layers' init: seeded per model
        torch.manual_seed(train_seed)
        if e.kind == "scratch":
            return train(Thief(victim), x, y, STEPS, LR_NEW, seed=train_seed)
        if e.kind == "frozen":
            return train(Thief(victim, frozen=True), x, y, STEPS, LR_NEW, seed=train_seed)
        if e.kind == "finetuned":
            return train(Thief(victim), x, y, STEPS, LR_FINETUNE, seed=train_seed)
        if e.kind == "deep":
            return train(Thief(victim, depth=4, width=DEEP_NECK), x, y, STEPS, LR_FINETUNE, seed=train_seed)
        permuted = modify.permute_channels(victim, 1.0, train_seed)
        return train(Thief(permuted, prefix="encoder"), x, y, STEPS, LR_FINETUNE, seed=train_seed)


def ensure(e: Entry) -> Path:
    """The model's file, trained and cached first if missing."""
    from safetensors.torch import save_file

    if e.path.exists():
        return e.path
    t0 = time.perf_counter()
    model = build(e)
    if not e.path.exists():  # null.trained writes its own cache
        e.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = e.path.with_suffix(f".tmp{os.getpid()}")
        meta = {"key": e.key, "task": e.task, "train_s": f"{time.perf_counter() - t0:.1f}"}
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
        tmp.rename(e.path)
    print(f"trained {e.key} ({e.task}) in {time.perf_counter() - t0:.1f} s", flush=True)
    return e.path


def _train_many(entries: list[Entry]) -> None:
    torch.set_num_threads(1)
    for e in entries:
        ensure(e)


def train_all(jobs: int = 1) -> None:
    # victims first: every theft reads its victim from the cache
    todo = [e for e in library() if not e.path.exists()]
    first = [e for e in todo if e.kind in ("victim", "independent")]
    rest = [e for e in todo if e not in first]
    for batch in (first, rest):
        if jobs <= 1 or len(batch) < 2:
            _train_many(batch)
            continue
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(jobs) as pool:
            pool.map(_train_many, [batch[i::jobs] for i in range(jobs)])


# ---- measurement ----------------------------------------------------------------------------------------


@dataclass
class Hashed:
    """One model's codes at the longest length (shorter lengths are prefixes: codec v3's features extend each
    other): the whole code, each layer's code (rows, chain order), names and filters of those layers."""

    entry: Entry
    code: np.ndarray
    layer_bits: np.ndarray
    names: list[str]
    filters: list[int]
    family: str | None  # hasher.suspect's kernel family where the hasher has it (what a query passes on)


def shares_init(a: Entry, b: Entry) -> bool:
    """Whether two models' first convs started from the same weights (null.make seeds every architecture alike;
    a theft's backbone is its victim's)."""
    return a.arch != b.arch and a.seed == b.seed and "scratch" not in (a.kind, b.kind)


def hash_library(entries: list[Entry], bits: int) -> dict[str, Hashed]:
    from safetensors import safe_open

    from hashdb.codec import ModelHasher

    hasher = ModelHasher(bits)
    out = {}
    for e in entries:
        family = None
        if hasattr(hasher, "suspect"):  # the query's own hashing: code, layer codes and kernel family
            code, layers, family = hasher.suspect(str(e.path))
        else:
            code, layers = hasher.hash_with_layers(str(e.path))
        with safe_open(str(e.path), "np") as f:
            filters = [int(f.get_slice(name).get_shape()[0]) for name, _ in layers]
        rows = np.array([np.unpackbits(np.frombuffer(c, np.uint8)) for _, c in layers], dtype=bool)
        out[e.key] = Hashed(e, np.unpackbits(np.frombuffer(code, np.uint8)).astype(bool), rows,
                            [n for n, _ in layers], filters, family)  # fmt: skip
    return out


def layer_distances(a: Hashed, b: Hashed, bits: int) -> np.ndarray:
    """Hamming distances between every layer of a (rows) and every layer of b (columns), first ``bits`` bits."""
    x, y = a.layer_bits[:, :bits].astype(np.int32), b.layer_bits[:, :bits].astype(np.int32)
    return x @ (1 - y).T + (1 - x) @ y.T


def bucket(filters: int) -> str:
    return "16-31" if filters < 32 else "32-63" if filters < 64 else "64-127" if filters < 128 else "128+"


@dataclass
class Pair:
    suspect: str
    stored: str
    positive: bool  # the suspect is a theft of this very victim
    klass: str  # the suspect's kind, or "theft of another victim"
    whole: int
    nearest: np.ndarray  # the twins' distances, ascending (one_to_one)
    matrix: np.ndarray


def one_to_one(m: np.ndarray) -> np.ndarray:
    """Distances of layer twins paired one-to-one, closest first (each suspect and each stored layer at most
    once: hashdb.matching's rule), ascending."""
    used_i: set[int] = set()
    used_j: set[int] = set()
    out = []
    for flat in np.argsort(m, axis=None, kind="stable"):
        i, j = divmod(int(flat), m.shape[1])
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            out.append(int(m[i, j]))
    return np.array(out)


def pairs_at(hashed: dict[str, Hashed], bits: int) -> list[Pair]:
    victims = [h for h in hashed.values() if h.entry.kind == "victim"]
    suspects = [h for h in hashed.values() if h.entry.kind != "victim"]
    out = []
    for s in suspects:
        for v in victims:
            m = layer_distances(s, v, bits)
            positive = s.entry.victim_key == v.entry.key
            if positive or not s.entry.theft:
                klass = s.entry.kind
            elif shares_init(s.entry, v.entry):
                klass = SHARED_INIT
            else:
                klass = "theft of another victim"
            whole = int(np.count_nonzero(s.code[:bits] != v.code[:bits]))
            out.append(Pair(s.entry.key, v.entry.key, positive, klass, whole, one_to_one(m), m))
    return out


def _q(a: np.ndarray | list[int]) -> str:
    a = np.asarray(a)
    return f"{a.min()} / {int(np.median(a))} / {a.max()}"


def pair_tables(hashed: dict[str, Hashed], bits: int) -> list[str]:
    pairs = pairs_at(hashed, bits)
    scale = bits // 256
    radii = [r * scale for r in RADII]
    classes = [*THEFTS, "theft of another victim", "scratch", "independent", SHARED_INIT]
    lines = [f"### {bits} bits: suspects against stored victims\n",
             "Per pair: the whole-model distance; the layer twins (suspect and stored layers paired one-to-one, "
             "closest first, as hashdb.matching pairs them): d1 = the closest twin's distance, d2 = the second's. "
             "min / median / max over the pairs of each class.\n",
             "| suspect class | pairs | whole distance | d1 | d2 | twins within "
             f"{radii[len(radii) // 2]} (median of pairs) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for c in classes:
        ps = [p for p in pairs if p.klass == c and (p.positive or c not in THEFTS)]
        if not ps:
            continue
        mid = radii[len(radii) // 2]
        lines.append(f"| {c}{' (own victim)' if c in THEFTS else ''} | {len(ps)} | {_q([p.whole for p in ps])} "
                     f"| {_q([p.nearest[0] for p in ps])} | {_q([p.nearest[1] for p in ps])} "
                     f"| {int(np.median([(p.nearest <= mid).sum() for p in ps]))} of "
                     f"{int(np.median([len(p.nearest) for p in ps]))} |")  # fmt: skip
    pos = [p for p in pairs if p.positive]
    neg = [p for p in pairs if not p.positive and p.klass != SHARED_INIT]
    shared = [p for p in pairs if p.klass == SHARED_INIT]
    lines += ["", "Counts of pairs with at least k layer twins within r "
              "(thefts: of their own victim; negatives: every other pair, i.e. independents, bigger models from "
              f"scratch and thefts of other victims, except the {len(shared)} '{SHARED_INIT}' pairs, counted "
              "apart):\n",
              "| r | thefts k>=1 | thefts k>=2 | negatives k>=1 | negatives k>=2 | "
              + " | ".join(f"{t} k>=1" for t in THEFTS) + " | shared init k>=1 | shared init k>=2 |",
              "|---|---|---|---|---|" + "---|" * len(THEFTS) + "---|---|"]  # fmt: skip

    def share(ps: list[Pair], k: int, r: int) -> str:
        return f"{sum(int((p.nearest <= r).sum() >= k) for p in ps)}/{len(ps)}"

    by = {t: [p for p in pos if p.klass == t] for t in THEFTS}
    for r in radii:
        cells = [share(pos, 1, r), share(pos, 2, r), share(neg, 1, r), share(neg, 2, r)]
        cells += [share(by[t], 1, r) for t in THEFTS] + [share(shared, 1, r), share(shared, 2, r)]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    for k in (1, 2):
        worst_pos = max(int(p.nearest[k - 1]) for p in pos)
        best_neg = min(int(p.nearest[k - 1]) for p in neg)
        worst = max(pos, key=lambda p: p.nearest[k - 1])
        closest = min(neg, key=lambda p: p.nearest[k - 1])
        verdict = (f"any r in [{worst_pos}, {best_neg - 1}] separates them" if worst_pos < best_neg
                   else "no radius separates them")  # fmt: skip
        lines.append(f"\nk = {k}: every theft has {k} layer(s) within {worst_pos} of its victim (worst: "
                     f"{worst.suspect}); no negative pair has {k} within {best_neg - 1} (closest: {closest.suspect} vs "
                     f"{closest.stored}, {best_neg}): {verdict}.")  # fmt: skip
    worst_whole = max(p.whole for p in pos)
    best_whole = min(p.whole for p in neg)
    lines.append(
        f"\nWhole-model code alone: thefts up to {worst_whole}, negatives from {best_whole} "
        f"({'separable' if worst_whole < best_whole else 'not separable'})."
    )
    lines += ["", *layer_null(pairs, hashed, bits)]
    return lines


def layer_null(pairs: list[Pair], hashed: dict[str, Hashed], bits: int) -> list[str]:
    """The layer-level null: every layer pair of the negative pairs, fractional distance, by filters (the smaller
    of the two layers'); 128+ from the new convs of the bigger models trained from scratch (pairs of other
    seeds: the same seed means the same init of the new convs)."""
    from hashdb.codec.null import NullFit, false_match_rate

    by_bucket: dict[str, list[int]] = {}
    for p in pairs:
        if p.positive or p.klass == SHARED_INIT:
            continue
        fs, fv = hashed[p.suspect].filters, hashed[p.stored].filters
        for i, j in itertools.product(range(len(fs)), range(len(fv))):
            by_bucket.setdefault(bucket(min(fs[i], fv[j])), []).append(int(p.matrix[i, j]))
    scratch = [h for h in hashed.values() if h.entry.kind == "scratch"]
    for a, b in itertools.combinations(scratch, 2):
        if a.entry.seed == b.entry.seed:
            continue
        m = layer_distances(a, b, bits)
        for i, j in itertools.product(range(len(a.filters)), range(len(b.filters))):
            if min(a.filters[i], b.filters[j]) >= 128:
                by_bucket.setdefault("128+", []).append(int(m[i, j]))
    mins = np.array([p.nearest[0] for p in pairs if not p.positive and p.klass != SHARED_INIT])
    lines = [f"Layer-level null at {bits} bits: every layer pair of the negative pairs (shared-init pairs left "
             "out) by the smaller layer's number of filters; 128+: the new 128-filter convs of the bigger models "
             "from scratch, pairs of other seeds. Fractional distance p, sd, dof = p(1-p)/sd^2; the closest pair "
             "and how many pairs that close the binomial fit (p, dof) expects (n x fmr(min)): far below 1 means "
             "the tail is heavier than the fit.\n",
             "| filters | layer pairs | p | sd | dof | min distance | fit expects at or below min |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in ("16-31", "32-63", "64-127", "128+"):
        if name not in by_bucket:
            continue
        d = np.array(by_bucket[name])
        f = d / bits
        p, sd = float(f.mean()), float(f.std(ddof=1))
        dof = p * (1 - p) / sd**2
        expected = len(d) * false_match_rate(int(d.min()), bits, NullFit(p, dof, True))
        lines.append(f"| {name} | {len(d)} | {p:.4f} | {sd:.4f} | {dof:.0f} | {d.min()} | {expected:.2g} |")
    qs = np.percentile(mins, [0, 1, 5, 25, 50])
    lines.append(
        f"\nMinimum layer-pair distance per negative pair ({len(mins)} pairs): min {qs[0]:.0f}, 1st pct "
        f"{qs[1]:.0f}, 5th {qs[2]:.0f}, 25th {qs[3]:.0f}, median {qs[4]:.0f}."
    )
    return lines


# ---- p-values (hashdb.evidence.compare) -----------------------------------------------------------------


def _histogram(ps: list[float]) -> list[str]:
    counts, edges = np.histogram(ps, bins=10, range=(0, 1))
    rows = ["| p in | pairs | share |", "|---|---|---|"]
    for c, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
        rows.append(f"| [{lo:.1f}, {hi:.1f}) | {c} | {c / len(ps):.0%} {'#' * int(c)} |")
    arr = np.array(ps)
    # a valid p-value has P(p <= a) <= a at every level a (equality for a continuous statistic)
    levels = ", ".join(f"{a:g}: {np.mean(arr <= a):.1%}" for a in (0.01, 0.05, 0.1, 0.25, 0.5))
    rows.append(f"\n{len(ps)} pairs; smallest p: {arr.min():.3g}; mean {arr.mean():.3f} (uniform: 0.5); share of "
                f"pairs with p <= a (valid: at most a) at a = {levels}")  # fmt: skip
    return rows


def pvalues(entries: list[Entry], n_perm: int) -> list[str]:
    from hashdb.evidence import compare

    same_arch = [e for e in entries if e.kind in ("victim", "independent")]
    ps: list[float] = []
    by_arch: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for a, b in itertools.combinations(same_arch, 2):
        if a.arch != b.arch:
            continue
        p = compare(str(a.path), str(b.path), n_perm=n_perm, bits=None)["test"]["p_value"]
        ps.append(p)
        by_arch.setdefault(a.arch, []).append(p)
    lines = [f"### compare: p-values of independent pairs (hashdb.evidence.compare, {n_perm} permutations)\n",
             f"Every pair of the {len(same_arch) // len(ARCHS)} same-architecture models (victims and independents, "
             f"seeds 0-11) of each architecture, {time.perf_counter() - t0:.0f} s in all. Under independence the "
             "p-values should be uniform (the statistic is a count, so the exact test is conservative):\n",
             *_histogram(ps), "",
             "| architecture | pairs | smallest p | share <= 0.05 | mean |", "|---|---|---|---|---|"]  # fmt: skip
    for arch, xs in by_arch.items():
        arr = np.array(xs)
        lines.append(f"| {arch} | {len(arr)} | {arr.min():.3g} | {np.mean(arr <= 0.05):.1%} | {arr.mean():.3f} |")
    # bigger models from scratch against victims of their backbone's architecture: independent, other shapes
    scratch = [(s, v) for s in entries if s.kind == "scratch" for v in entries
               if v.kind == "victim" and v.arch == s.arch]  # fmt: skip
    ps2 = [compare(str(v.path), str(s.path), n_perm=n_perm, bits=None)["test"]["p_value"] for s, v in scratch]
    lines += [
        "",
        "Bigger models trained from scratch against every victim of their backbone's architecture "
        "(independent pairs of different shapes):\n",
        *_histogram(ps2),
        "",
    ]
    shared = [
        (a, b) for a, b in itertools.combinations([e for e in entries if e.kind == "victim"], 2) if a.seed == b.seed
    ]  # other architectures, the same seed: the same first-layer init
    ps3 = [compare(str(a.path), str(b.path), n_perm=n_perm, bits=None)["test"]["p_value"] for a, b in shared]
    lines += [
        f"Victims of other architectures at the same seed ({SHARED_INIT}; not independent by the test's "
        "own hypothesis, which assumes independent initialisations):\n",
        *_histogram(ps3),
        "",
    ]
    lines += ["Thefts against their own victims (compare(victim file, theft file)); the `natural order` rows "
              "give compare the same tensors ordered by natural name order (`features.2` before `features.10`) "
              "instead of the files' (safetensors sorts names as strings):\n",
              "| theft | tensors | pairs | p-values (max) | verdicts | aligned correlation min / median |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for kind in THEFTS:
        for order in ("file", "natural order"):
            results = []
            for e in entries:
                if e.kind == kind:
                    victim = Entry("victim", e.arch, e.seed)
                    a, b = (str(victim.path), str(e.path)) if order == "file" else (natural(victim), natural(e))
                    results.append(compare(a, b, n_perm=n_perm, bits=None))
            p = [r["test"]["p_value"] for r in results]
            calls: dict[str, int] = {}
            for r in results:
                calls[r["verdict"]["call"]] = calls.get(r["verdict"]["call"], 0) + 1
            corr = np.array([r["aligned_correlation"] for r in results])
            lines.append(f"| {kind} | {order} | {len(results)} | {max(p):.3g} | "
                         + ", ".join(f"{k} {v}" for k, v in sorted(calls.items()))
                         + f" | {corr.min():.3f} / {np.median(corr):.3f} |")  # fmt: skip
    return lines


def natural(e: Entry) -> dict[str, np.ndarray]:
    """The model's tensors as a dict in natural name order (numbers compared as numbers)."""
    import re

    from safetensors.numpy import load_file

    tensors = load_file(str(e.path))
    order = sorted(tensors, key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])
    return {k: tensors[k] for k in order}


# ---- end to end (hashdb/matching.py, when it exists) -----------------------------------------------------


def end_to_end(hashed: dict[str, Hashed], bits: int) -> list[str]:
    """A HashDB of the victims and the same-architecture independents (model and layer codes, the codec's
    config stored), each theft, bigger model from scratch and independent queried with find_matches."""
    import inspect

    from hashdb import HashDB
    from hashdb.codec import ModelHasher

    title = f"### End to end at {bits} bits (hashdb.matching.find_matches)\n"
    try:
        import hashdb.matching as matching
    except ImportError:
        matching = None
    here = Path(inspect.getfile(HashDB)).parent
    if matching is None or Path(inspect.getfile(matching)).parent != here:  # not an installed copy elsewhere
        return [title, "Not measured: hashdb/matching.py (find_matches) is not in this tree yet."]
    if "layers" not in inspect.signature(HashDB.insert).parameters:
        return [title, "Not measured: this tree's HashDB stores no layer codes yet (HashDB.insert(layers=))."]

    def pack(row: np.ndarray) -> bytes:
        return np.packbits(row[:bits]).tobytes()

    def layer_codes(h: Hashed) -> list[tuple[str, bytes]]:
        return [(n, pack(r)) for n, r in zip(h.names, h.layer_bits, strict=True)]

    def family(h: Hashed) -> dict[str, str | None]:
        return {"family": h.family} if "family" in inspect.signature(matching.find_matches).parameters else {}

    stored = [h for h in hashed.values() if h.entry.kind in ("victim", "independent")]
    queries = [h for h in hashed.values() if h.entry.kind != "victim"]
    rows: dict[str, list[int]] = {}
    flagged: list[str] = []
    found_kinds: dict[str, set[str]] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        db = HashDB(os.path.join(tmp, "db"), bits=bits, codec=ModelHasher(bits).config, durable=False)
        try:
            for h in stored:
                db.insert(h.entry.key, pack(h.code), layers=layer_codes(h))
            for q in queries:
                found = matching.find_matches(db, pack(q.code), layer_codes(q), **family(q))
                copies = {m.key: m for m in found if m.key != q.entry.key and m.verdict == "copy"}
                own = q.entry.victim_key
                stats = rows.setdefault(q.entry.kind, [0, 0, 0, 0, 0, 0])
                stats[0] += 1
                if own is not None and own in copies:
                    stats[1 if copies[own].kind == "whole" else 2] += 1
                    found_kinds.setdefault(q.entry.kind, set()).add(copies[own].kind)
                wrong = [k for k in copies if k != own and not shares_init(q.entry, hashed[k].entry)]
                stats[3] += len(wrong)
                stats[5] += sum(k != own and shares_init(q.entry, hashed[k].entry) for k in copies)
                stats[4] += sum(m.key != q.entry.key and m.key != own and m.verdict != "copy" for m in found)
                flagged += [f"{q.entry.key} -> {k} ({copies[k].kind}, {len(copies[k].layers)} layers, "
                            f"expected_false {copies[k].expected_false:.2g})" for k in wrong]  # fmt: skip
        finally:
            db.close()
    from hashdb.codec import null as codec_null

    config = ModelHasher(bits).config
    screen = ""
    if hasattr(codec_null, "layer_screen_radius") and hasattr(codec_null, "layer_null_fit"):
        fit = codec_null.layer_null_fit(config, "2d")  # every suspect here is a 2-D CNN: its family's fit
        screen = (
            f" Layer screening radius {codec_null.layer_screen_radius(config, '2d')} from the codec's layer null "
            f"of 2-D models (p {fit.p:.3g}, dof {fit.dof:.0f}, "
            f"{'fitted' if fit.calibrated else 'NOT fitted: the default'}); a partial copy needs "
            f"{getattr(codec_null, 'MIN_PARTIAL_TWINS', 1)} layer twins."
        )
    lines = [title, f"A HashDB of {len(stored)} models (the victims and their architectures' independents: model "
             f"code, layer codes, the codec's config); {len(queries)} suspects queried with their model and layer "
             f"codes at the defaults (decision radius, layer screening radius), {time.perf_counter() - t0:.1f} s. "
             "Found = the suspect's own victim reported with verdict copy; false flags = any other stored model "
             f"reported as copy (the suspect itself, when stored, is left out).{screen}\n",
             "| suspect class | queries | own victim found: whole | partial | false flags | other matches (not "
             f"copy) | {SHARED_INIT} reported as copy |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind, (n, whole, partial, wrong, other, shared) in rows.items():
        theft = kind in THEFTS
        lines.append(f"| {kind} | {n} | {whole if theft else '-'} | {partial if theft else '-'} | {wrong} | {other} "
                     f"| {shared} |")  # fmt: skip
    thefts = sum(rows.get(k, [0])[0] for k in THEFTS)
    hits = sum(rows.get(k, [0, 0, 0])[1] + rows.get(k, [0, 0, 0])[2] for k in THEFTS)
    wrong_total = sum(r[3] for r in rows.values())
    lines.append(f"\nRecall: {hits}/{thefts} thefts found; false flags: {wrong_total} over {len(queries)} queries.")
    if flagged:
        lines.append("\nFalse flags: " + "; ".join(flagged[:30]))
    return lines


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    entries = library()
    missing = [e for e in entries if not e.path.exists()]
    if missing:
        print(f"training {len(missing)} missing models first", flush=True)
        train_all(args.jobs)
    t0 = time.perf_counter()
    hashed = hash_library(entries, max(BITS))
    hash_s = time.perf_counter() - t0
    counts = {k: sum(e.kind == k for e in entries) for k in ("victim", *THEFTS, "independent", "scratch")}
    lines = ["## Stolen backbones: per-layer codes on a library of thefts (bench/backbone.py)\n",
             f"`python3 -m bench.backbone train` then `python3 bench/backbone.py`; {machine_line()}.\n",
             f"Library: {', '.join(f'{v} {k}' for k, v in counts.items())} models; architectures "
             f"{', '.join(group(a) for a in ARCHS)} (bench/null.py). Thefts put the victim's conv backbone under "
             "`backbone.` (`encoder.` with every hidden channel permuted for `permuted`) before new 3x3 convs "
             f"(two of {NECK} filters; four of {DEEP_NECK} for `deep`) and a new head, trained {STEPS} Adam steps "
             f"on relabelled digits or synthetic prototypes (frozen: new parts only, lr {LR_NEW:g}; finetuned, "
             f"permuted and deep: every layer, lr {LR_FINETUNE:g}). `scratch`: the bigger models (two new convs) "
             f"trained from scratch, lr {LR_NEW:g}; `independent`: the victims' architectures at other seeds. "
             f"Hashing all {len(entries)} at {max(BITS)} bits with layer codes: {hash_s:.1f} s (shorter codes are "
             "prefixes).\n"]  # fmt: skip
    for bits in BITS:
        lines += [*pair_tables(hashed, bits), ""]
    if not args.no_compare:
        lines += [*pvalues(entries, args.n_perm), ""]
    for bits in BITS:
        lines += [*end_to_end(hashed, bits), ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_results:
        write_section("backbone", text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python3 -m bench.backbone", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", nargs="?", choices=["train", "list", "measure"], default="measure")
    ap.add_argument("--jobs", type=int, default=1, help="training processes (one thread each)")
    ap.add_argument("--n-perm", type=int, default=999, help="compare's permutations")
    ap.add_argument("--no-compare", action="store_true", help="skip the compare p-values")
    ap.add_argument("--no-results", action="store_true", help="print only; leave bench/RESULTS.md as it is")
    args = ap.parse_args(argv)
    if args.command == "list":
        for e in library():
            print(e.key, e.task, "cached" if e.path.exists() else "-")
    elif args.command == "train":
        train_all(args.jobs)
    else:
        measure(args)


if __name__ == "__main__":
    main()
