"""Training loops: originals from their ARCHS recipe, fine-tunes and distillation reuse ``train``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import dataset
from .nets import ARCHS, ZooNet, make_model


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    seed: int,
    opt: str = "adam",
    batch: int = 32,
    soft: torch.Tensor | None = None,
    temperature: float = 4.0,
    keep_zeros: bool = False,
) -> nn.Module:
    """Train in place for ``steps`` minibatch steps (cross-entropy, or KL to ``soft`` logits for distillation).
    ``keep_zeros``: every parameter entry that is exactly zero stays zero (a pruned model's recovery fine-tune
    keeps its pruning mask)."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    zeros = [p.detach() == 0 for p in params] if keep_zeros else []
    optim = torch.optim.Adam(params, lr=lr) if opt == "adam" else torch.optim.SGD(params, lr=lr, momentum=0.9)
    model.train()
    order = torch.randperm(len(x), generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch > len(x):
            order, pos = torch.randperm(len(x), generator=gen), 0
        idx = order[pos : pos + batch]
        pos += batch
        optim.zero_grad()
        out = model(x[idx])
        if soft is None:
            loss = F.cross_entropy(out, y[idx])
        else:
            t = temperature
            loss = F.kl_div(F.log_softmax(out / t, 1), F.softmax(soft[idx] / t, 1), reduction="batchmean") * t * t
        loss.backward()
        optim.step()
        if zeros:
            with torch.no_grad():
                for p, z in zip(params, zeros, strict=True):
                    p.masked_fill_(z, 0.0)
    model.eval()
    return model


def accuracy(model: nn.Module, data: str) -> float:
    x, y = dataset(data, "test")
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def train_original(arch: str, seed: int, data: str = "digits") -> ZooNet:
    """An independently trained original: own init seed, own data order, ``ARCHS[arch]`` recipe."""
    model = make_model(arch, seed)
    x, y = dataset(data)
    _, _, steps, lr = ARCHS[arch]
    train(model, x, y, steps, lr, seed=seed * 7919 + 1)
    model.zoo_data = data  # type: ignore[assignment]
    return model
