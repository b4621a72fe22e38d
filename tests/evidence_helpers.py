"""Small trained CNNs for the evidence tests (tests/test_evidence.py, tests/test_report.py), trained once per
process: an original, its fine-tune, a fine-tune of that, independent models, a backbone theft."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.zoo.data import dataset
from bench.zoo.training import train

WIDTH = 16


def make_cnn(seed: int, width: int = WIDTH) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
    )  # fmt: skip


def numpy_sd(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()}


@functools.cache
def trained(name: str) -> dict[str, np.ndarray]:
    """State dicts by name: 'original', 'finetune' (of the original), 'finetune2' (of the fine-tune),
    'independent<seed>' (own init and data order), 'thief' (the original's three convs inside a bigger
    model: an inserted conv of the same shape as the last one, a new 5-class head, fine-tuned end to end)."""
    torch.set_num_threads(1)
    x, y = dataset("digits")
    if name == "original":
        return numpy_sd(train(make_cnn(0), x, y, 120, 1e-2, 0))
    if name in ("finetune", "finetune2"):
        parent = "original" if name == "finetune" else "finetune"
        model = make_cnn(0)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in trained(parent).items()})
        return numpy_sd(train(model, x, y, 80, 2e-3, 1 if name == "finetune" else 2))
    if name.startswith("independent"):
        seed = int(name[len("independent"):])
        return numpy_sd(train(make_cnn(seed), x, y, 120, 1e-2, seed))
    if name == "thief":
        victim = make_cnn(0)
        victim.load_state_dict({k: torch.from_numpy(v) for k, v in trained("original").items()})
        torch.manual_seed(99)
        model = nn.Sequential(
            *[copy.deepcopy(m) for m in list(victim)[:6]],
            nn.Conv2d(2 * WIDTH, 2 * WIDTH, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * WIDTH, 5),
        )  # fmt: skip
        return numpy_sd(train(model, x, y % 5, 60, 2e-3, 3))
    raise KeyError(name)


def save(name: str, folder: Path, filename: str | None = None) -> Path:
    """Write a trained state dict as .npz (read by hashdb with numpy alone)."""
    path = folder / (filename or f"{name}.npz")
    np.savez(path, **trained(name))
    return path
