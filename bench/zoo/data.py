"""The zoo's tasks: scikit-learn's bundled digits (two splits, permuted labels) and a seeded synthetic task."""

from __future__ import annotations

import numpy as np
import torch


def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten smooth random 8x8 prototypes, each sample shifted by up to 1 pixel plus noise: a different task."""
    rng = np.random.default_rng(1000 + seed)
    proto = rng.random((10, 10, 10)).astype(np.float32)
    k = np.array([0.25, 0.5, 0.25], dtype=np.float32)  # smooth so that convolutions find structure
    proto = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 1, proto)
    proto = np.apply_along_axis(lambda r: np.convolve(r, k, mode="same"), 2, proto)
    proto = (proto - proto.min()) / (proto.max() - proto.min())
    y = rng.integers(0, 10, n)
    dx, dy = rng.integers(0, 3, n), rng.integers(0, 3, n)
    x = np.stack([proto[c, a : a + 8, b : b + 8] for c, a, b in zip(y, dx, dy, strict=True)])
    x = x + 0.15 * rng.standard_normal(x.shape).astype(np.float32)
    return x.astype(np.float32)[:, None], y.astype(np.int64)


def _shift_augment(x: np.ndarray, seed: int) -> np.ndarray:
    """Random +-1 pixel shifts (zero fill), one per image."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(x)
    for i in range(len(x)):
        dy, dx = rng.integers(-1, 2, 2)
        src = x[i, 0, max(0, -dy) : 8 - max(0, dy), max(0, -dx) : 8 - max(0, dx)]
        out[i, 0, max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
    return out


DATASETS = ("digits", "digits_b", "synth", "digits_perm")


def dataset(name: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of one task: 'digits' (75 % split A), 'digits_b' (another 75 % split, shift-augmented),
    'synth' (synthetic prototypes), 'digits_perm' (digits split A with permuted labels, a transfer task)."""
    if name not in DATASETS or split not in ("train", "test"):
        raise ValueError(f"unknown dataset {name!r}/{split!r}")
    if name == "synth":
        x, y = _synthetic(1800, 0)
        sel = slice(0, 1350) if split == "train" else slice(1350, None)
        return torch.from_numpy(x[sel]), torch.from_numpy(y[sel])
    x, y = _digits_raw()
    order = np.random.default_rng(1 if name == "digits_b" else 0).permutation(len(x))
    cut = int(0.75 * len(x))
    idx = order[:cut] if split == "train" else order[cut:]
    x, y = x[idx], y[idx]
    if name == "digits_b" and split == "train":
        x = np.concatenate([x, _shift_augment(x, 7)])
        y = np.concatenate([y, y])
    if name == "digits_perm":
        y = np.random.default_rng(5).permutation(10)[y]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
