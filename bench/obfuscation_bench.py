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
from hashdb.codec.hasher import CHAIN_V3, CHAIN_V4, CHAIN_V5, CHAIN_V6, CODEC_VERSION, LEGACY_CODEC  # noqa: E402


def conv_names(sd: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 4]


def near_identity(sd: dict[str, np.ndarray], seed: int, noise: float = 0.01, k: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = dict(sd)
    for name in conv_names(sd):
        c = sd[name].shape[0]
        w = np.zeros((c, c, k, k), np.float32)
        w[np.arange(c), np.arange(c), k // 2, k // 2] = 1.0
        w += noise * rng.standard_normal(w.shape).astype(np.float32)
        out[name[: -len("weight")] + "x.weight"] = w  # sorts right after the layer it follows
    return out


def split_conv(sd: dict[str, np.ndarray], seed: int, grouped: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Split every conv but the ``grouped`` ones (mixing a depthwise conv's rows would change its function)."""
    rng = np.random.default_rng(seed)
    out = dict(sd)
    for name in conv_names(sd):
        if name in grouped:
            continue
        w = sd[name]
        c = w.shape[0]
        a = np.eye(c) + 0.5 * rng.standard_normal((c, c)) / np.sqrt(c)  # well conditioned
        out[name] = np.einsum("po,oikl->pikl", np.linalg.inv(a), w).astype(np.float32)
        out[name[: -len("weight")] + "x.weight"] = a.astype(np.float32)[:, :, None, None]
    return out


def pass_statistics(sd: dict[str, np.ndarray]) -> list[tuple[str, bool, float, float]]:
    """(layer, forms a permutation, median dominance, share) of every square or depthwise odd-kernel layer, as
    chain.channel_pass measures them on the balanced layer (its thresholds: PASS_DOMINANCE, PASS_SHARE)."""
    from hashdb.codec.chain import plan_chain, sinkhorn_balance
    from hashdb.codec.load import load_tensors
    from hashdb.codec.select import conv_layer, conv_plan, kernel_shape

    tensors = load_tensors(sd)
    plan = conv_plan(tensors)
    shapes = []
    for i, read in plan:
        arr = tensors[i].array
        out, cin = (arr.shape[-1], arr.shape[-2]) if read == "hwio" else arr.shape[:2]
        shapes.append((tensors[i].name, int(out), int(cin), tuple(int(k) for k in kernel_shape(arr, read)) or (1,)))
    rows = []
    for layer in plan_chain(shapes):
        i, read = plan[layer.index]
        w = conv_layer(tensors[i].array, read)
        b = sinkhorn_balance(w.reshape(w.shape[0], w.shape[1], -1), layer.groups)
        out, in_g, k = b.shape
        if not all(d % 2 for d in layer.kshape) or not (
            (layer.groups == 1 and out == in_g) or (layer.groups == out and in_g == 1)
        ):
            continue
        centre = int(np.ravel_multi_index(tuple(d // 2 for d in layer.kshape), layer.kshape))
        src = np.abs(b[:, :, centre]).argmax(axis=1) if in_g > 1 else np.zeros(out, int)
        flat = src * k + centre
        a = np.abs(b.reshape(out, -1)).astype(np.float64)
        top = a[np.arange(out), flat].copy()
        a[np.arange(out), flat] = 0
        rows.append(
            (
                layer.name,
                in_g == 1 or len(set(src.tolist())) == out,
                float(np.median(top / np.maximum(a.max(axis=1), 1e-300))),
                float((top**2).sum() / (b**2).sum()),
            )
        )
    return rows


def measure(cache: Path) -> str:
    """The pass-through statistics over every trained model of the null library found in ``cache``."""
    from safetensors.numpy import load_file

    stats = [r for f in sorted(cache.glob("*.safetensors")) for r in pass_statistics(load_file(str(f)))]
    files = len(list(cache.glob("*.safetensors")))
    if not stats:
        return f"no square or depthwise layers in {files} models under {cache}"
    return (f"{files} null-library models, {len(stats)} square/depthwise layers: {sum(r[1] for r in stats)} form a "
            f"permutation at the centre tap (depthwise: always); median dominance max "
            f"{max(r[2] for r in stats):.3f}, share max {max(r[3] for r in stats):.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--groups", nargs="*", default=["plain-w32", "plain-w64", "vgg-w32", "vgg-w64", "resnet-w32", "mobilenet-w32"]
    )
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--bits", type=int, default=512)
    ap.add_argument("--no-results", action="store_true")
    ap.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="read the null library's trained models from this folder (only those present; none trained)",
    )
    ap.add_argument(
        "--measure",
        action="store_true",
        help="only print the near-identity statistics of the null library's trained layers",
    )
    args = ap.parse_args(argv)
    if args.cache is not None:
        null.CACHE = args.cache  # only seeds whose file exists are used below, so nothing is written there
    if args.measure:
        print(measure(null.CACHE))
        return
    torch.set_num_threads(1)
    hashers = {
        f"v7 ({CODEC_VERSION})": ModelHasher(args.bits),
        f"v6 ({CHAIN_V6})": ModelHasher(args.bits, codec=CHAIN_V6),
        f"v5 ({CHAIN_V5})": ModelHasher(args.bits, codec=CHAIN_V5),
        f"v4 ({CHAIN_V4})": ModelHasher(args.bits, codec=CHAIN_V4),
        f"v3 ({CHAIN_V3})": ModelHasher(args.bits, codec=CHAIN_V3),
        "v2 (nts-dihedral-2)": ModelHasher(args.bits, codec=LEGACY_CODEC),
    }
    lines = [
        "## Obfuscations: inserted near-identity layers and split convolutions (bench/obfuscation_bench.py)\n",
        f"`python3 bench/obfuscation_bench.py {' '.join(argv or sys.argv[1:])}`; {machine_line()}; "
        f"{args.bits} bits, {args.seeds} null-library models per group.\n",
        "| codec | group | copy radius | near-identity 3x3, 1 %: median / max | near-identity 1x1, 1 %: median / max "
        "| split conv: median / max | independent pairs: min |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, h in hashers.items():
        for g in args.groups:
            seeds = [s for s in range(args.seeds) if null.cache_path(g, s).exists()]
            models = [null.trained(g, s) for s in seeds]
            sds = [{k: v.numpy() for k, v in m.state_dict().items()} for m in models]
            convs = [(n, mod) for n, mod in models[0].named_modules() if isinstance(mod, torch.nn.Conv2d)]
            grouped = frozenset(f"{n}.weight" for n, mod in convs if mod.groups > 1)
            codes = [h.hash_bits(sd) for sd in sds]
            pairs = list(enumerate(zip(sds, codes, strict=True)))
            ni = [int((h.hash_bits(near_identity(sd, 7 + i)) != c).sum()) for i, (sd, c) in pairs]
            n1 = [int((h.hash_bits(near_identity(sd, 7 + i, k=1)) != c).sum()) for i, (sd, c) in pairs]
            sc = [int((h.hash_bits(split_conv(sd, 7 + i, grouped)) != c).sum()) for i, (sd, c) in pairs]
            ind = min(int((a != b).sum()) for i, a in enumerate(codes) for b in codes[i + 1 :])
            cells = [f"{int(np.median(v))} / {max(v)}" for v in (ni, n1, sc)]
            lines.append(f"| {label} | {g} | {h.copy_radius} | {' | '.join(cells)} | {ind} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_results:
        write_section("obfuscation", text)


if __name__ == "__main__":
    main()
