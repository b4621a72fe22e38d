"""Time of `hashdb compare` on two 25M-parameter models, and the p-values of independent pairs.

    python3 bench/compare_bench.py              # timing table and the p-value histogram; writes bench/RESULTS.md
    python3 bench/compare_bench.py --no-null    # timing only

Timing: a VGG-style CNN of about 25M parameters (random weights: the cost does not depend on training)
against a fine-tuned stand-in (the same weights plus 5 % noise), a copy with every hidden unit permuted, and
an independent draw; each with and without hashing both models (--bits). The p-value check trains small CNNs
on the digits task with different seeds (tests/evidence_helpers.py recipe) and compares every pair: under
the hypothesis of independence the p-values should be uniform.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._results import machine_line, write_section  # noqa: E402
from hashdb.evidence import compare  # noqa: E402

# (out, in) of the 3x3 convs; 14 layers of up to 512 channels and a 512x1000 head: about 25M parameters
WIDTHS = [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256), (256, 256),
          (512, 256), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]  # fmt: skip


def big_model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sd = {}
    for n, (o, i) in enumerate(WIDTHS):
        sd[f"features.{n}.weight"] = (rng.standard_normal((o, i, 3, 3)) / np.sqrt(9 * i)).astype(np.float32)
        sd[f"features.{n}.bias"] = np.zeros(o, np.float32)
    sd["classifier.weight"] = (rng.standard_normal((1000, 512 * 4 * 4)) / np.sqrt(512 * 16)).astype(np.float32)
    return sd


def finetuned(sd: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + 0.05 * v.std() * rng.standard_normal(v.shape)).astype(np.float32) for k, v in sd.items()}


def permuted(sd: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out, previous = dict(sd), None
    for n in range(len(WIDTHS)):
        perm = rng.permutation(WIDTHS[n][0])
        w = sd[f"features.{n}.weight"][perm]
        out[f"features.{n}.weight"] = w if previous is None else w[:, previous]
        out[f"features.{n}.bias"] = sd[f"features.{n}.bias"][perm]
        previous = perm
    head = sd["classifier.weight"].reshape(1000, 512, 16)[:, previous].reshape(1000, -1)
    out["classifier.weight"] = np.ascontiguousarray(head)
    return out


def timing(bits: int, repeat: int, extra_pairs: int) -> list[str]:
    a = big_model(0)
    params = sum(v.size for v in a.values())
    rows = [f"model: VGG-style, {params / 1e6:.1f}M parameters, {len(WIDTHS) + 1} weight layers", "",
            f"| pair | codes hashed | seconds (best of {repeat}) | verdict | p-value | aligned correlation |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for name, b in (("fine-tuned (+5% noise)", finetuned(a, 1)), ("every unit permuted", permuted(a, 2)),
                    ("independent", big_model(3))):  # fmt: skip
        for hashed in (None, bits):
            best, result = np.inf, None
            for _ in range(repeat):
                start = time.perf_counter()
                result = compare(a, b, bits=hashed)
                best = min(best, time.perf_counter() - start)
            assert result is not None
            rows.append(f"| {name} | {f'yes, {bits} bits' if hashed else 'no'} | {best:.2f} | "
                        f"{result['verdict']['call']} | {result['test']['p_value']:.3g} | "
                        f"{result['aligned_correlation']:.3f} |")  # fmt: skip
            print(rows[-1], flush=True)
    # one independent pair is one draw of a 1 % test: more pairs of the same size show where it fell
    ps = [compare(big_model(10 + k), big_model(110 + k), bits=None)["test"]["p_value"] for k in range(extra_pairs)]
    rows.append(f"\nmore independent pairs of this size ({extra_pairs}, seeds 10+k vs 110+k): p = "
                + ", ".join(f"{p:.3g}" for p in ps))
    return rows


def _histogram_rows(ps: list[float], what: str) -> list[str]:
    counts, edges = np.histogram(ps, bins=10, range=(0, 1))
    rows = [f"p-values of {what}; a uniform law puts 10 % in each bin (the statistic is a count, so the exact "
            "test is conservative: at most, not exactly, a share a of pairs has p <= a)", "",
            "| p in | pairs | share |", "|---|---|---|"]  # fmt: skip
    for c, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
        rows.append(f"| [{lo:.1f}, {hi:.1f}) | {c} | {c / len(ps):.0%} {'#' * int(c)} |")
    arr = np.array(ps)
    rows.append(f"\nsmallest p: {arr.min():.3g}; share <= 0.05: {np.mean(arr <= 0.05):.1%}; "
                f"share <= 0.01: {np.mean(arr <= 0.01):.1%}")
    return rows


# a small VGG-style stack (12 convs of 8-64 channels and a head): random-init pairs are cheap and many
SMALL = [(8, 3), (8, 8), (16, 8), (16, 16), (32, 16), (32, 32), (32, 32), (32, 32), (64, 32), (64, 64), (64, 64),
         (64, 64)]  # fmt: skip


def small_random(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sd = {f"f.{n}.weight": rng.standard_normal((o, i, 3, 3)).astype(np.float32) for n, (o, i) in enumerate(SMALL)}
    sd["head.weight"] = rng.standard_normal((10, 64 * 16)).astype(np.float32)
    return sd


def null_pvalues(seeds: int, random_pairs: int) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from evidence_helpers import trained

    models = [trained(f"independent{s}") for s in range(1, seeds + 1)]
    ps = [compare(models[i], models[j], bits=None)["test"]["p_value"]
          for i in range(seeds) for j in range(i + 1, seeds)]  # fmt: skip
    what = f"{len(ps)} pairs of {seeds} independently trained CNNs (3 convs of 16-32 channels, digits; 999 perms)"
    rows = _histogram_rows(ps, what)
    ps = [compare(small_random(2 * s), small_random(2 * s + 1), bits=None, n_perm=199)["test"]["p_value"]
          for s in range(random_pairs)]  # fmt: skip
    what = f"{random_pairs} pairs of independent random-init 13-layer CNNs (8-64 channels; 199 permutations)"
    return rows + [""] + _histogram_rows(ps, what)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=10, help="independent CNNs for the p-value check")
    parser.add_argument("--big-pairs", type=int, default=8, help="more independent 25M pairs for their p-values")
    parser.add_argument("--random-pairs", type=int, default=300, help="random-init pairs for the p-value check")
    parser.add_argument("--no-null", action="store_true", help="skip the p-value check (it trains CNNs)")
    args = parser.parse_args()
    body = ["## compare: a pair verified (bench/compare_bench.py)", "",
            f"`python3 bench/compare_bench.py{' --no-null' if args.no_null else ''}`; {machine_line()}", ""]
    body += timing(args.bits, args.repeat, args.big_pairs)
    if not args.no_null:
        body += ["", *null_pvalues(args.seeds, args.random_pairs)]
    print("\n".join(body))
    write_section("compare", "\n".join(body))


if __name__ == "__main__":
    main()
