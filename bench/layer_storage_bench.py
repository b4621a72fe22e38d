"""Bytes on disk per model and per layer code: the same models stored without and with per-layer codes.

    nice -n 10 python3 bench/layer_storage_bench.py                    # 20,000 models x 20 layers, 512 bits
    python3 bench/layer_storage_bench.py --models 2000 --layers 10     # quick look

Models go in with insert_many in chunks (as ``hashdb add`` writes them), layer names like the tensor names of
a torchvision CNN. Prints, for each database: the LMDB file's high-water mark (``stats()["map_used"]``: what
the data file grows to), the pages the tables hold now (live bytes, per table), and the bytes per model and
per layer code they give. Prints only; the numbers go into bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hashdb import DEFAULT_BITS  # noqa: E402


def table_bytes(db: object) -> dict[str, int]:
    """Bytes of the pages each table holds (branch + leaf + overflow pages), live data only."""
    from hashdb.store import ALL_TABLES

    store = db._store  # type: ignore[attr-defined]
    out = {}
    with store.read() as txn:
        for name in ALL_TABLES:
            handle = store.env.open_db(name.encode(), txn=txn, create=False)
            st = txn.stat(handle)
            out[name] = int(st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * int(st["psize"])
    return out


def build(path: str, n: int, layers: int, bits: int, chunk: int, seed: int) -> dict[str, object]:
    from hashdb import HashDB

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with HashDB(path, bits=bits, durable=False) as db:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            keys = [f"zoo/model-{i:08d}.safetensors" for i in range(start, start + m)]
            codes = rng.integers(0, 256, (m, bits // 8), dtype=np.uint8)
            per_model = None
            if layers:
                lc = rng.integers(0, 256, (m, layers, bits // 8), dtype=np.uint8)
                names = [f"features.{3 * j}.conv.weight" for j in range(layers)]
                per_model = [[(names[j], lc[i, j].tobytes()) for j in range(layers)] for i in range(m)]
            db.insert_many(keys, codes, layers=per_model)
        # One more small write: compaction drops the log entries of the last chunk (the newest is always kept).
        db.insert("zoo/last", bytes(bits // 8), layers=[("fc.weight", bytes(bits // 8))] if layers else None)
        seconds = time.perf_counter() - t0
        stats = db.stats()
        tables = table_bytes(db)
    return {"models": stats["count"], "layers": stats["layers"], "map_used": stats["map_used"],
            "file": os.path.getsize(os.path.join(path, "data.mdb")), "tables": tables,
            "live": sum(tables.values()), "seconds": round(seconds, 2)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=20_000)
    ap.add_argument("--layers", type=int, default=20, help="layer codes per model")
    ap.add_argument("--bits", type=int, default=DEFAULT_BITS)
    ap.add_argument("--chunk", type=int, default=1000, help="models per insert_many")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hashdb-layer-bytes-") as d:
        plain = build(os.path.join(d, "plain"), args.models, 0, args.bits, args.chunk, seed=1)
        both = build(os.path.join(d, "layers"), args.models, args.layers, args.bits, args.chunk, seed=1)
    n, n_layers = plain["models"], both["layers"]
    assert isinstance(n, int) and isinstance(n_layers, int) and n_layers
    report = {
        "command": " ".join(["python3", "bench/layer_storage_bench.py", *sys.argv[1:]]),
        "cores": os.cpu_count(),
        "models_only": plain,
        "with_layers": both,
        "bytes_per_model_file": round(plain["map_used"] / n, 1),  # type: ignore[operator]
        "bytes_per_model_live": round(plain["live"] / n, 1),  # type: ignore[operator]
        "bytes_per_layer_file": round((both["map_used"] - plain["map_used"]) / n_layers, 1),  # type: ignore[operator]
        "bytes_per_layer_live": round((both["live"] - plain["live"]) / n_layers, 1),  # type: ignore[operator]
    }
    print(json.dumps(report, indent=1))
    from bench._results import machine_line, write_section

    # bytes per layer code in the in-memory index and its file: 64 beside the code itself (measured at 256 bits:
    # 37.5 MB / 400k layer codes = 96 B, of which the code is 32)
    per_layer_index = 64 + args.bits // 8
    total = n * report["bytes_per_model_file"] + n_layers * report["bytes_per_layer_file"]  # type: ignore[operator]
    scale = 1e7 / n
    write_section("layer_storage", "\n".join([
        "## Layer codes on disk (bench/layer_storage_bench.py)\n",
        f"`{report['command']}`; {machine_line()}. Random codes, {args.models:,} models, {args.layers} layer codes "
        "each "
        f"(names like torchvision tensor names), {args.bits} bits, insert_many in chunks of {args.chunk}.\n",
        "| database | data file high-water | live pages | bytes per model | bytes per layer code |",
        "|---|---|---|---|---|",
        f"| models only | {plain['map_used'] / 1e6:.2f} MB | {plain['live'] / 1e6:.2f} MB "
        f"| {report['bytes_per_model_file']} ({report['bytes_per_model_live']} live) | - |",
        f"| with layers | {both['map_used'] / 1e6:.2f} MB | {both['live'] / 1e6:.2f} MB | - "
        f"| {report['bytes_per_layer_file']} ({report['bytes_per_layer_live']} live) |",
        "",
        f"At 10M models x {args.layers} layers: about {total * scale / 1e9:.0f} GB of LMDB, and about "
        f"{1e7 * args.layers * per_layer_index / 1e9:.0f} GB for the layer index in memory (and its file): "
        "the disk fits one host; the layer index's memory is the limit at that scale.",
    ]))  # fmt: skip


if __name__ == "__main__":
    main()
