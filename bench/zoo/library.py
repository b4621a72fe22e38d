"""Library entries, how an entry is materialized, and the on-disk cache of its trained parts.

Trained parts (originals, fine-tunes, transfers, distillations) are stored as safetensors under
``cache_name(key)``; ``cache_key(original, steps)`` is the key of the model that ``steps`` make from
``original``. Cheap modifications are recomputed whenever an entry is materialized.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .modify import MODIFICATIONS, TRAINED
from .nets import make_model
from .training import train_original

RECIPE = "r1"  # bump when training data, architectures or recipes change: it is part of every cache key
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "cache" / "zoo"


Step = tuple[str, Any, int, tuple[tuple[str, Any], ...]]  # (modification, strength, seed, sorted options)


def step(name: str, strength: Any, seed: int = 0, **options: Any) -> Step:
    return (name, strength, seed, tuple(sorted(options.items())))


@dataclass(frozen=True)
class Entry:
    """One library model. ``original`` is the key of the original it derives from (None for originals);
    ``mclass`` its modification class, ``strength`` a readable label, ``light`` whether the codec targets
    (copy within copy_radius) apply; ``steps`` rebuild it from the original."""

    key: str
    arch: str
    data: str
    seed: int
    original: str | None
    mclass: str
    strength: str
    light: bool
    steps: tuple[Step, ...] = ()


@dataclass
class Library:
    entries: list[Entry]
    cache_dir: Path
    max_memo: int = 64
    _memo: OrderedDict = field(default_factory=OrderedDict)
    _by_key: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_key = {e.key: e for e in self.entries}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: str) -> Entry:
        return self._by_key[key]

    @property
    def originals(self) -> list[Entry]:
        return [e for e in self.entries if e.original is None]

    def first_copy(self, original: Entry, mclass: str, strength: str) -> Entry | None:
        """The first entry derived from ``original`` of class ``mclass`` whose strength starts with ``strength``."""
        return next((e for e in self.entries if e.original == original.key and e.mclass == mclass
                     and e.strength.startswith(strength)), None)  # fmt: skip

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.mclass] = out.get(e.mclass, 0) + 1
        return out

    def model(self, entry: Entry | str) -> nn.Module:
        """The entry's model (trained steps come from the cache, cheap ones are recomputed)."""
        e = self._by_key[entry] if isinstance(entry, str) else entry
        if e.original is None:
            return self._original(e)
        m = self._original(self._by_key[e.original])
        for i, st in enumerate(e.steps):
            m = _apply(m, st, self.cache_dir, e.original, e.steps[: i + 1])
        return m

    def subset(self, keep: Callable[[Entry], bool]) -> Library:
        """A library of the entries ``keep`` accepts plus the originals they derive from (same cache)."""
        chosen = [e for e in self.entries if keep(e)]
        needed = {e.original for e in chosen if e.original is not None}
        have = {e.key for e in chosen}
        extra = [e for e in self.entries if e.key in needed and e.key not in have]
        return type(self)(extra + chosen, self.cache_dir, self.max_memo)

    def state_dict(self, entry: Entry | str) -> dict[str, torch.Tensor]:
        return self.model(entry).state_dict()

    def arrays(self, entry: Entry | str) -> dict[str, np.ndarray]:
        """The entry's floating-point tensors as float32 numpy arrays, by name: what the benchmarks hash."""
        return {k: v.detach().float().numpy() for k, v in self.state_dict(entry).items() if v.is_floating_point()}

    def trained_keys(self, entry: Entry | str) -> list[str]:
        """Cache keys of the trained parts the entry is made from: its original, then each trained step."""
        e = self._by_key[entry] if isinstance(entry, str) else entry
        if e.original is None:
            return [e.key]
        steps = [cache_key(e.original, e.steps[: i + 1]) for i, st in enumerate(e.steps) if st[0] in TRAINED]
        return [e.original, *steps]

    def is_cached(self, entry: Entry | str) -> bool:
        """Whether materializing the entry trains nothing (every trained part is in the cache)."""
        return all((Path(self.cache_dir) / cache_name(k)).exists() for k in self.trained_keys(entry))

    def train_original(self, e: Entry) -> nn.Module:
        """Train an original (the full ARCHS recipe); a subclass may train differently (SmallLibrary)."""
        return train_original(e.arch, e.seed, e.data)

    def _original(self, e: Entry) -> nn.Module:
        if e.key in self._memo:
            self._memo.move_to_end(e.key)
            return self._memo[e.key]
        m = _cached(self.cache_dir, f"{e.key}", lambda: self.train_original(e), e.arch, e.data)
        self._memo[e.key] = m
        while len(self._memo) > self.max_memo:
            self._memo.popitem(last=False)
        return m


def cache_key(original: str, steps: tuple[Step, ...]) -> str:
    """The cache key of the model that ``steps`` make from the original ``original`` (an original's key is its
    entry key)."""
    return f"{original}|" + json.dumps(steps, default=str)


def cache_name(key: str) -> str:
    """The file name (under the cache folder) of the model cached under ``key``, for the current RECIPE."""
    digest = hashlib.sha1(f"{RECIPE}|{key}".encode()).hexdigest()[:16]
    return f"{RECIPE}-{digest}.safetensors"


def _cached(cache_dir: Path, key: str, make: Callable[[], nn.Module], arch: str, data: str) -> nn.Module:
    """Load ``key`` from the cache, or ``make()`` and store it (safetensors, with metadata)."""
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / cache_name(key)
    if path.exists():
        m = make_model(arch, 0)
        m.load_state_dict(load_file(str(path)))
        m.zoo_data = data
        return m.eval()
    t0 = time.perf_counter()
    m = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {"key": key, "arch": arch, "data": data, "train_s": f"{time.perf_counter() - t0:.2f}"}
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp), metadata=meta)
    tmp.rename(path)
    return m.eval()


def _apply(m: nn.Module, st: Step, cache_dir: Path, original: str, prefix: tuple[Step, ...]) -> nn.Module:
    name, strength, seed, options = st
    fn = MODIFICATIONS[name]
    if name not in TRAINED:
        return fn(m, strength, seed, **dict(options))
    key = cache_key(original, prefix)
    arch = dict(options).get("student", getattr(m, "arch", "")) if name == "distill" else m.arch
    data = getattr(m, "zoo_data", "digits")
    if name == "transfer":
        data = dict(options).get("task") or ("digits_perm" if data != "digits_perm" else "synth")
    return _cached(cache_dir, key, lambda: fn(m, strength, seed, **dict(options)), arch, data)
