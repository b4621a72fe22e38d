"""What the per-layer evidence says about originals that share an initialisation.

    python3 -m bench.zoo                    # the zoo (bench/zoo), cached
    python3 bench/shared_init.py            # table -> bench/RESULTS.md section shared_init

The zoo seeds every architecture alike, so two originals of different architectures trained from one seed
start from the same first-layer weights where their first layers have one shape. At 512 bits the codec sees
that (docs/codec.md, *Shared initialisation*): such pairs are the closest distinct originals, and their copies
are the only other originals' entries a query reports on the zoo. This benchmark hashes every original, takes
the ``--pairs`` closest pairs of originals of different architectures trained from one seed, and runs
``hashdb.evidence.compare`` on each: its verdict, and which layers it matched (units in place, aligned weight
correlation). The closest pair of originals trained from different seeds is given for scale.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import zoo  # noqa: E402
from bench._results import publish  # noqa: E402
from hashdb import DEFAULT_BITS  # noqa: E402
from hashdb.codec import ModelHasher  # noqa: E402
from hashdb.evidence import compare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10, help="closest same-seed pairs of architectures to compare")
    ap.add_argument("--bits", type=int, default=None, help="code length (default: hashdb.DEFAULT_BITS)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    bits = args.bits or DEFAULT_BITS
    torch.set_num_threads(1)
    lib = zoo.Library(zoo.library_plan(copies=False), zoo.DEFAULT_CACHE)
    models = {o.key: lib.arrays(o) for o in lib.originals}
    hasher = ModelHasher(bits)
    codes = {k: np.unpackbits(np.frombuffer(hasher.hash(sd), np.uint8)) for k, sd in models.items()}
    pairs = sorted(
        (int(np.count_nonzero(codes[a.key] != codes[b.key])), a.seed == b.seed, a.key, b.key)
        for a, b in itertools.combinations(lib.originals, 2)
        if a.arch != b.arch
    )
    same = [p for p in pairs if p[1]]
    other = [p for p in pairs if not p[1]]
    rows = [
        "| pair (a vs b) | code distance | verdict | layers of a matched | matched layers: units in place / units, "
        "aligned correlation |",
        "|---|---|---|---|---|",
    ]
    calls: list[str] = []
    for d, _, ka, kb in same[: args.pairs]:
        r = compare(models[ka], models[kb], bits=None)
        calls.append(r["verdict"]["call"])
        layers = "; ".join(
            f"{x['layer_a']}: {x['units_in_place'] if x['units_in_place'] is not None else '-'} / {x['units']}, "
            f"{x['correlation']:.2f}"
            for x in r["layers"]
        )
        rows.append(f"| {ka} vs {kb} | {d} | {r['verdict']['call']} | {len(r['layers'])} of {r['layers_a']} | "
                    f"{layers} |")  # fmt: skip
    derived = calls.count("derived")
    title = "Shared initialisation: the per-layer evidence for originals grown from one seed"
    publish("shared_init", title, "bench/shared_init.py", [
        f"{len(lib.originals)} zoo originals hashed at {bits} bits (`{hasher.codec}`). Pairs of originals of different "
        f"architectures: {len(same)} trained from one seed (closest {same[0][0]}, median "
        f"{int(np.median([p[0] for p in same]))}), {len(other)} from different seeds (closest {other[0][0]}, median "
        f"{int(np.median([p[0] for p in other]))}). The {len(calls)} closest same-seed pairs, compared "
        f"(`hashdb.evidence.compare`): {derived} called 'derived', {len(calls) - derived} 'no evidence'.",
        "",
        *rows,
    ], write=not args.no_write)  # fmt: skip


if __name__ == "__main__":
    main()
