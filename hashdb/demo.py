"""End-to-end demo: train small CNNs, publish modified copies, and find every copy with hashdb.

Run ``hashdb demo``. It trains a handful of models on scikit-learn's bundled digits (synthetic digits-like
data if scikit-learn is absent), writes them to disk as a model thief would publish them (fine-tuned,
pruned, quantized, permuted, cast; saved as a state_dict, a whole pickled nn.Module, a TorchScript archive, a
legacy checkpoint or a sharded Hugging Face style folder), hashes the folder of originals and every suspect
with ModelHasher, stores the originals' codes in a HashDB, and asks the database which original each suspect
copies.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from . import DEFAULT_BITS


def _digits() -> tuple[np.ndarray, np.ndarray, str]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # keep the demo runnable with the core dependencies alone
        rng = np.random.default_rng(0)
        prototypes = rng.random((10, 8, 8))
        y = rng.integers(0, 10, 1800)
        x = prototypes[y] + 0.3 * rng.standard_normal((1800, 8, 8))
        return x.astype(np.float32)[:, None], y, "synthetic digits"
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    return x, data.target, "scikit-learn load_digits"


def _build(arch: str) -> Any:
    from torch import nn

    if arch == "plain":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(64, 10),
        )  # fmt: skip
    if arch == "bn":
        return nn.Sequential(
            nn.Conv2d(1, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
            nn.Conv2d(24, 48, 3, padding=1, bias=False), nn.BatchNorm2d(48), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(48, 48, 3, padding=1, bias=False), nn.BatchNorm2d(48), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10),
        )  # fmt: skip
    raise ValueError(f"unknown demo architecture {arch!r}")


def _train(model: Any, x: Any, y: Any, epochs: int, lr: float, seed: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


def _accuracy(model: Any, x: Any, y: Any) -> float:
    import torch

    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _copies(model: Any, x: Any, y: Any, seed: int) -> dict[str, Any]:
    """The modifications a thief makes: each returns a new model, the original untouched."""
    import copy

    import torch
    from torch import nn

    out: dict[str, Any] = {}
    out["fine-tuned"] = _train(copy.deepcopy(model), x, y, epochs=1, lr=3e-4, seed=seed + 1000)

    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for p in pruned.parameters():
            if p.dim() > 1:
                cut = p.abs().flatten().kthvalue(max(1, int(0.3 * p.numel()))).values
                p[p.abs() <= cut] = 0.0
    out["pruned 30%"] = pruned

    quant = copy.deepcopy(model)
    with torch.no_grad():
        for p in quant.parameters():
            scale = p.abs().max() / 127.0
            if scale > 0:
                p.copy_(torch.round(p / scale).clamp(-127, 127) * scale)
    out["int8 round trip"] = quant

    out["fp16 cast"] = copy.deepcopy(model).half().float()

    # Permute the hidden channels of the first conv and, consistently, the inputs of whatever follows.
    permuted = copy.deepcopy(model)
    layers = list(permuted)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    first, second = convs[0], convs[1]
    perm = torch.randperm(layers[first].out_channels, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layers[first].weight.copy_(layers[first].weight[perm])
        if layers[first].bias is not None:
            layers[first].bias.copy_(layers[first].bias[perm])
        for m in layers[first + 1 : second]:
            if isinstance(m, nn.BatchNorm2d):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(m, name).copy_(getattr(m, name)[perm])
        layers[second].weight.copy_(layers[second].weight[:, perm])
    out["channels permuted"] = permuted
    # A stolen backbone: the convolutions inside a bigger model (eight new layers, a new head), every layer
    # trained on. Its whole code moves with the new layers; its layers' codes give it away.
    backbone = [copy.deepcopy(m) for m in model if not isinstance(m, nn.AdaptiveAvgPool2d | nn.Flatten | nn.Linear)]
    width = [m for m in backbone if isinstance(m, nn.Conv2d)][-1].out_channels
    torch.manual_seed(seed + 2000)
    extra: list[Any] = []
    for i in range(8):
        extra += [nn.Conv2d(width if i == 0 else 64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    thief = nn.Sequential(*backbone, *extra, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    out["stolen backbone"] = _train(thief, x, y, epochs=3, lr=2e-3, seed=seed + 2000)
    return out


# How copies are published, in turn: every one is read by hashdb's own restricted unpickler (nothing runs).
PUBLISH_STYLES = ("state_dict", "whole nn.Module", "TorchScript", "legacy .pt", "HF folder, 2 shards")


def _publish(model: Any, base: Path, style: str, example: Any) -> Path:
    """Save ``model`` the way ``style`` names; returns the file or folder written."""
    import json

    import torch

    if style == "state_dict":
        torch.save(model.state_dict(), path := base.with_suffix(".pt"))
    elif style == "whole nn.Module":
        torch.save(model, path := base.with_suffix(".pt"))
    elif style == "TorchScript":
        with warnings.catch_warnings():  # torch deprecates tracing, but TorchScript files are still published
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.trace(model.eval(), example).save(str(path := base.with_suffix(".pt")))
    elif style == "legacy .pt":
        torch.save(model.state_dict(), path := base.with_suffix(".pt"), _use_new_zipfile_serialization=False)
    elif style == "HF folder, 2 shards":
        path = base
        path.mkdir()
        state = model.state_dict()
        names = list(state)
        half = len(names) // 2
        weight_map = {}
        for n, part in enumerate((names[:half], names[half:]), 1):
            shard = f"pytorch_model-0000{n}-of-00002.bin"
            torch.save({k: state[k] for k in part}, path / shard)
            weight_map.update(dict.fromkeys(part, shard))
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (path / "config.json").write_text(json.dumps({"model_type": "demo-cnn"}))
    else:
        raise ValueError(f"unknown publishing style {style!r}")
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit status 0 when every copy is found and no unrelated model is flagged."""
    parser = argparse.ArgumentParser(prog="hashdb demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="keep the models and the database in DIR (default: a temporary folder, removed)")
    parser.add_argument("--bits", type=int, default=DEFAULT_BITS)
    parser.add_argument("--seeds", type=int, default=3, help="originals per architecture")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    try:
        import torch
    except ImportError:
        sys.stderr.write("hashdb: error: the demo trains models with the optional 'torch' package: "
                         "pip install hashdb[torch]\n")  # fmt: skip
        return 2
    torch.set_num_threads(1)
    if args.dir:
        return _run(args, Path(args.dir))
    workdir = Path(tempfile.mkdtemp(prefix="hashdb-demo-"))
    try:
        return _run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"removed {workdir} (keep the models and the database with --dir DIR)")


def _name(key: str) -> str:
    """An original's name from its key (the path `add` stored it under)."""
    return Path(key).stem


def _run(args: argparse.Namespace, workdir: Path) -> int:
    import torch

    from .codec import ModelHasher
    from .db import HashDB
    from .errors import ModelFormatError

    models_dir = workdir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    x_np, y_np, source = _digits()
    x, y = torch.from_numpy(x_np), torch.from_numpy(np.asarray(y_np, dtype=np.int64))
    test = torch.arange(len(x)) % 5 == 0
    print(f"hashdb demo in {workdir}  (data: {source}, {len(x)} images)")

    hasher = ModelHasher(bits=args.bits)
    t0 = time.perf_counter()
    originals_dir = models_dir / "originals"
    originals_dir.mkdir(exist_ok=True)
    originals: dict[str, Path] = {}
    suspects: list[tuple[str, str, str, Path, float]] = []  # (true original, modification, style, path, accuracy)
    for k, arch in enumerate(("plain", "bn")):
        # Every original its own seed: two architectures grown from one seed share their first layer's
        # initialisation, a relation a weight hash sees (docs/codec.md, *Shared initialisation*), and the demo's
        # originals stand for independently trained models.
        for seed in range(k * args.seeds, (k + 1) * args.seeds):
            torch.manual_seed(seed)
            model = _train(_build(arch), x[~test], y[~test], epochs=8, lr=3e-3, seed=seed)
            name = f"{arch}-seed{seed}"
            path = originals_dir / f"{name}.pt"
            torch.save(model.state_dict(), path)
            originals[name] = path
            for n, (mod, copy_model) in enumerate(_copies(model, x[~test], y[~test], seed).items()):
                style = PUBLISH_STYLES[(n + seed + len(originals)) % len(PUBLISH_STYLES)]
                base = models_dir / f"{name}--{mod.replace(' ', '_').replace('%', 'pct')}"
                acc = _accuracy(copy_model, x[test], y[test])
                suspects.append((name, mod, style, _publish(copy_model, base, style, x[:1]), acc))
            print(f"  trained {name:14s} test accuracy {_accuracy(model, x[test], y[test]):.3f}")
    print(f"trained {len(originals)} originals and {len(suspects)} copies in {time.perf_counter() - t0:.1f} s")

    from .codec.radius import decision_radius

    db_path = workdir / "db"
    found = 0
    with HashDB(str(db_path), bits=args.bits, codec=hasher.config) as db:
        t0 = time.perf_counter()
        outcomes = list(db.add_models([originals_dir], workers=1))  # what `hashdb add` does: codes and layer codes
        failed = [str(o.error) for o in outcomes if o.error is not None]
        if failed:
            raise ModelFormatError("; ".join(failed))
        keys = [o.key for o in outcomes]
        # a copy is a match that fewer than 0.01 independent models would reach by chance in this database
        radius = int(decision_radius(hasher.config, len(db), "2d") or hasher.copy_radius)  # the demo's CNNs are 2-D
        print(f"hashed the folder {originals_dir.name}/ and stored {len(db)} originals in "
              f"{time.perf_counter() - t0:.2f} s; decision radius {radius} (expected false matches <= 0.01)")
        print()
        header = f"{'suspect (true original / modification)':40s} {'published as':19s} {'acc':>5s}  "
        print(header + f"{'nearest original':16s} {'dist':>4s} {'fmr':>8s}  verdict")
        for true, mod, style, path, acc in suspects:
            suspect = hasher.suspect(path)  # code, layer codes and kernel family: what `hashdb query` asks with
            nearest_key, dist = db.knn(suspect.code, 1)[0]
            nearest = _name(nearest_key)
            matches = db.find_matches(suspect.code, suspect.layers, family=suspect.family)
            copies = [m for m in matches if m.verdict == "copy"]
            hit = [_name(m.key) for m in copies]
            ok = hit == [true]
            found += ok
            partial = bool(copies) and copies[0].kind == "partial"
            how = f" (partial: {len(copies[0].layers)} layers)" if partial else ""
            verdict = "copy of " + ", ".join(hit) + how if hit else "no match"
            flag = "" if ok else "   <-- WRONG"
            fmr = f"{copies[0].fmr:8.1e}" if copies and copies[0].fmr is not None else " " * 8
            print(f"{true + ' / ' + mod:40s} {style:19s} {acc:5.3f}  {nearest:16s} {dist:4d} {fmr}  {verdict}{flag}")
        distinct = [
            db.knn(db.get(k)[0], 2)[1][1] for k in keys
        ]  # distance from each original to its nearest *other* original
        layer_codes = db.layer_count()
    print()
    print(f"found {found}/{len(suspects)} copies (decision radius {radius}, {layer_codes} layer codes stored); "
          f"nearest distinct originals are {min(distinct)}..{max(distinct)} bits apart (of {args.bits})")
    if args.dir:
        print(f"models in {models_dir}, database in {db_path} (try: hashdb query {db_path} {suspects[0][3]})")
    return 0 if found == len(suspects) else 1


if __name__ == "__main__":
    sys.exit(main())
