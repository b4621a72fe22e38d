"""Modifications: ``fn(model, strength, seed, **options) -> nn.Module``, a new model, the input untouched.

Function-preserving ones (channel permutation, positive rescaling, BatchNorm folding) are exact up to float
rounding; tests/test_zoo.py checks the outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .data import dataset
from .nets import ARCHS, ZooNet, make_model
from .training import train


def _clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


def weight_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear):
            yield name, m


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) & 0x7FFFFFFF)


def finetune(
    model: nn.Module,
    strength: float,
    seed: int,
    *,
    steps: int = 120,
    opt: str = "sgd",
    data: str | None = None,
    masked: bool = False,
) -> nn.Module:
    """Continue training on the same task: ``strength`` is the learning rate (1e-4..1e-2), SGD or Adam.
    ``masked``: weights that are exactly zero stay zero (the recovery fine-tune after pruning)."""
    m = _clone(model)
    x, y = dataset(data or getattr(model, "zoo_data", "digits"))
    return train(m, x, y, steps, float(strength), seed=seed, opt=opt, keep_zeros=masked)


def transfer(model: nn.Module, strength: float, seed: int, *, steps: int = 150, task: str | None = None) -> nn.Module:
    """Re-initialize the final layer and train the whole net on another task (Adam, lr ``strength``)."""
    m = _clone(model)
    own = getattr(model, "zoo_data", "digits")
    task = task or ("digits_perm" if own != "digits_perm" else "synth")
    if own == "synth" and task == "synth":
        task = "digits"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m.head.reset_parameters()
    x, y = dataset(task)
    train(m, x, y, steps, float(strength), seed=seed, opt="adam")
    m.zoo_data = task
    return m


def distill(
    model: nn.Module, strength: float, seed: int, *, student: str | None = None, steps: int | None = None
) -> nn.Module:
    """Knowledge distillation: a freshly initialized ``student`` trained on the model's soft labels
    (temperature ``strength``) over its training inputs. A HARD case: no weights are shared."""
    arch = student or getattr(model, "arch", "plain")
    data = getattr(model, "zoo_data", "digits")
    x, y = dataset(data)
    with torch.no_grad():
        soft = model.eval()(x)
    s = make_model(arch, 50_000 + seed)
    lr = ARCHS[arch][3]
    train(s, x, y, steps or ARCHS[arch][2], lr, seed=seed, soft=soft, temperature=float(strength))
    s.zoo_data = data
    return s


def prune_magnitude(model: nn.Module, strength: float, seed: int = 0) -> nn.Module:
    """Unstructured magnitude pruning: zero the ``strength`` fraction of smallest |w| in every conv/linear weight."""
    m = _clone(model)
    with torch.no_grad():
        for _, mod in weight_modules(m):
            w = mod.weight
            k = int(float(strength) * w.numel())
            if k > 0:  # exactly k zeros: everything below the k-th smallest |w|, then ties in index order
                a = w.abs().flatten()
                thr = torch.kthvalue(a, k).values
                below = a < thr
                ties = torch.nonzero(a == thr).flatten()[: k - int(below.sum())]
                below[ties] = True
                w.view(-1)[below] = 0.0
    return m


def prune_filters(model: nn.Module, strength: float, seed: int = 0) -> nn.Module:
    """Structured pruning: zero the ``strength`` fraction of lowest-L2 output filters of every conv (and the
    bias / following BatchNorm affine of those channels). Shapes are kept (zeroing, not removal)."""
    m = _clone(model)
    bn_of = dict(m.bn_pairs()) if isinstance(m, ZooNet) else {}
    with torch.no_grad():
        for name, mod in weight_modules(m):
            if isinstance(mod, nn.Linear):
                continue
            w = mod.weight
            k = int(float(strength) * w.shape[0])
            if k == 0:
                continue
            drop = torch.argsort(w.flatten(1).norm(dim=1), stable=True)[:k]
            w[drop] = 0.0
            if mod.bias is not None:
                mod.bias[drop] = 0.0
            if name in bn_of:
                bn = m.get_submodule(bn_of[name])
                bn.weight[drop] = 0.0
                bn.bias[drop] = 0.0
    return m


def quantize(model: nn.Module, strength: float = 8, seed: int = 0, *, per_channel: bool = False) -> nn.Module:
    """Symmetric int-``strength`` quantization round trip of every conv/linear weight (per tensor or per
    output channel); biases and BatchNorm stay float, as in common int8 deployments."""
    m = _clone(model)
    qmax = 2 ** (int(strength) - 1) - 1
    with torch.no_grad():
        for _, mod in weight_modules(m):
            w = mod.weight
            amax = w.abs().flatten(1).amax(dim=1) if per_channel else w.abs().max().expand(w.shape[0])
            scale = (amax / qmax).clamp_min(1e-12).reshape(-1, *([1] * (w.ndim - 1)))
            w.copy_(torch.clamp(torch.round(w / scale), -qmax, qmax) * scale)
    return m


def cast(model: nn.Module, strength: str = "fp16", seed: int = 0) -> nn.Module:
    """Cast every parameter and buffer to fp16 or bf16 (the copy stays in that dtype, as published)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[str(strength)]
    return _clone(model).to(dtype)


def gaussian_noise(model: nn.Module, strength: float, seed: int) -> nn.Module:
    """Add N(0, (strength * std(w))^2) to every conv/linear weight and bias."""
    m = _clone(model)
    g = _gen(seed)
    with torch.no_grad():
        for _, mod in weight_modules(m):
            for p in (mod.weight, mod.bias):
                if p is not None and p.numel() > 1:
                    p.add_(float(strength) * p.std() * torch.randn(p.shape, generator=g))
    return m


def _group_tensors(m: nn.Module, names: tuple[str, ...]) -> list[torch.Tensor]:
    out = []
    for n in names:
        mod = m.get_submodule(n)
        out += [t for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)) if t.ndim >= 1]
    return out


def permute_channels(model: nn.Module, strength: float = 1.0, seed: int = 0) -> nn.Module:
    """Permute the channels of a ``strength`` fraction of the channel groups (at least one): producer
    output channels, BatchNorm, depthwise pass-throughs and consumer input channels alike. Same function."""
    m = _clone(model)
    groups = m.channel_groups()
    g = _gen(seed)
    pick = torch.randperm(len(groups), generator=g)[: max(1, round(float(strength) * len(groups)))]
    with torch.no_grad():
        for gi in sorted(pick.tolist()):
            grp = groups[gi]
            width = m.get_submodule(grp.out[0]).weight.shape[0]
            perm = torch.randperm(width, generator=g)
            for t in _group_tensors(m, grp.out + ((grp.bn,) if grp.bn else ()) + grp.through):
                t.copy_(t[perm])
            for n in grp.into:
                w = m.get_submodule(n).weight
                w.copy_(w[:, perm])
    return m


def rescale(model: nn.Module, strength: float, seed: int, *, per_channel: bool = True) -> nn.Module:
    """Positive rescaling that leaves a ReLU net's function unchanged: channel j of every group is multiplied
    by c_j = exp(U(-strength, strength)) (one c per group if not ``per_channel``). Without BN the consumer's
    input channel j is divided by c_j; with BN the BN running statistics absorb it (mean*c, var*c^2)."""
    m = _clone(model)
    g = _gen(seed)
    s = float(strength)
    with torch.no_grad():
        for grp in m.channel_groups():
            width = m.get_submodule(grp.out[0]).weight.shape[0]
            u = torch.rand(width if per_channel else 1, generator=g) * 2 - 1
            c = torch.exp(s * u).expand(width)
            for n in grp.out:
                mod = m.get_submodule(n)
                mod.weight.mul_(c.reshape(-1, *([1] * (mod.weight.ndim - 1))))
                if mod.bias is not None:
                    mod.bias.mul_(c)
            if grp.bn is not None:
                bn = m.get_submodule(grp.bn)
                bn.running_mean.mul_(c)
                bn.running_var.mul_(c * c)
                # (var*c^2 + eps) vs c^2 (var + eps): scale eps away so the function is exact
                bn.running_var.add_(bn.eps * (c * c - 1))
            else:
                assert not grp.through, "depthwise pass-through without BN cannot absorb a rescaling"
                for n in grp.into:
                    w = m.get_submodule(n).weight
                    w.div_(c.reshape(1, -1, *([1] * (w.ndim - 2))))
    return m


def fold_batchnorm(model: nn.Module, strength: float = 1.0, seed: int = 0) -> nn.Module:
    """Fold every BatchNorm into the conv before it (new weight and bias); the BN becomes Identity, so its
    keys vanish from the state_dict, as in an exported inference graph."""
    m = _clone(model)
    with torch.no_grad():
        for conv_name, bn_name in m.bn_pairs():
            conv, bn = m.get_submodule(conv_name), m.get_submodule(bn_name)
            inv = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            new = nn.Conv2d(
                conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, bias=True,
            )  # fmt: skip
            new.weight.copy_(conv.weight * inv.reshape(-1, 1, 1, 1))
            b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            new.bias.copy_(bn.bias + (b - bn.running_mean) * inv)
            for name, mod in ((conv_name, new), (bn_name, nn.Identity())):
                parent, _, child = name.rpartition(".")
                setattr(m.get_submodule(parent) if parent else m, child, mod)
    m.bn_pairs = lambda: []  # type: ignore[method-assign]
    return m


# Every modification by name; TRAINED ones are cached on disk, the others recomputed when materialized.
MODIFICATIONS: dict[str, Callable[..., nn.Module]] = {
    "finetune": finetune,
    "transfer": transfer,
    "prune_magnitude": prune_magnitude,
    "prune_filters": prune_filters,
    "quantize": quantize,
    "cast": cast,
    "noise": gaussian_noise,
    "permute": permute_channels,
    "rescale": rescale,
    "fold_bn": fold_batchnorm,
    "distill": distill,
}
TRAINED = frozenset({"finetune", "transfer", "distill"})
