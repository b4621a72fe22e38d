"""Function-preserving obfuscations against codec v3 (and v2): inserted near-identity layers, split convolutions.

    python3 bench/obfuscation_bench.py            # null library models (bench/null.py) -> section obfuscation

Both keep the network's function (up to the noise) and defeat weight hashes that look at layers one by one
(Neural Structural Obfuscation, USENIX Security 2023):
- *near-identity*: after every conv layer a C->C 3x3 conv whose centre tap is the identity plus 1 % Gaussian
  noise on every weight (a ReLU after it changes nothing for the non-negative activations it receives);
- *split conv*: every 3x3 conv W becomes a 3x3 conv A^-1 W followed by a 1x1 conv A (A a random well-conditioned
  C x C matrix), with nothing between them.
Names are chosen so that the inserted layers sort right after the layer they follow (as an exporter names them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import null  # noqa: E402
from bench._results import machine_line, write_section  # noqa: E402
from hashdb.codec import ModelHasher  # noqa: E402
from hashdb.codec.hasher import LEGACY_CODEC  # noqa: E402


def conv_names(sd: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 4]


def near_identity(sd: dict[str, np.ndarray], seed: int, noise: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = dict(sd)
    for name in conv_names(sd):
        c = sd[name].shape[0]
        w = np.zeros((c, c, 3, 3), np.float32)
        w[np.arange(c), np.arange(c), 1, 1] = 1.0
        w += noise * rng.standard_normal(w.shape).astype(np.float32)
        out[name[: -len("weight")] + "x.weight"] = w  # sorts right after the layer it follows
    return out


def split_conv(sd: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = dict(sd)
    for name in conv_names(sd):
        w = sd[name]
        c = w.shape[0]
        a = np.eye(c) + 0.5 * rng.standard_normal((c, c)) / np.sqrt(c)  # well conditioned
        out[name] = np.einsum("po,oikl->pikl", np.linalg.inv(a), w).astype(np.float32)
        out[name[: -len("weight")] + "x.weight"] = a.astype(np.float32)[:, :, None, None]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", nargs="*", default=["plain-w32", "plain-w64", "vgg-w32", "vgg-w64"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--bits", type=int, default=512)
    ap.add_argument("--no-results", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    hashers = {"v3 (chain-sketch-3)": ModelHasher(args.bits),
               "v2 (nts-dihedral-2)": ModelHasher(args.bits, codec=LEGACY_CODEC)}
    lines = [
        "## Obfuscations: inserted near-identity layers and split convolutions (bench/obfuscation_bench.py)\n",
        f"`python3 bench/obfuscation_bench.py {' '.join(argv or sys.argv[1:])}`; {machine_line()}; "
        f"{args.bits} bits, {args.seeds} null-library models per group.\n",
        "| codec | group | copy radius | near-identity 1 %: median / max | split conv: median / max | "
        "independent pairs: min |",
        "|---|---|---|---|---|---|",
    ]
    for label, h in hashers.items():
        for g in args.groups:
            seeds = [s for s in range(args.seeds) if null.cache_path(g, s).exists()]
            sds = [{k: v.numpy() for k, v in null.trained(g, s).state_dict().items()} for s in seeds]
            codes = [h.hash_bits(sd) for sd in sds]
            pairs = list(enumerate(zip(sds, codes, strict=True)))
            ni = [int((h.hash_bits(near_identity(sd, 7 + i)) != c).sum()) for i, (sd, c) in pairs]
            sc = [int((h.hash_bits(split_conv(sd, 7 + i)) != c).sum()) for i, (sd, c) in pairs]
            ind = min(int((a != b).sum()) for i, a in enumerate(codes) for b in codes[i + 1 :])
            lines.append(f"| {label} | {g} | {h.copy_radius} | {int(np.median(ni))} / {max(ni)} | "
                         f"{int(np.median(sc))} / {max(sc)} | {ind} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if not args.no_results:
        write_section("obfuscation", text)


if __name__ == "__main__":
    main()
