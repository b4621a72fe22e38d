"""The zoo's architectures: every net takes an (N, 1, 8, 8) batch and lists its channel groups and (conv, BN)
pairs, which the function-preserving modifications use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that can be permuted (or positively rescaled) together without changing the function.

    ``out``: modules whose output channels (dim 0 of weight and bias) form the group; ``bn``: the BatchNorm
    right after them (absorbs a rescaling through its running statistics); ``through``: per-channel modules
    after the BN (depthwise conv and its BN: permuted along dim 0, untouched by rescaling); ``into``:
    consumers whose input channels (dim 1) are the group.
    """

    out: tuple[str, ...]
    bn: str | None
    into: tuple[str, ...]
    through: tuple[str, ...] = ()


class ZooNet(nn.Module):
    """Base: ``head`` is the final Linear; subclasses list channel groups and (conv, bn) pairs."""

    arch: str = ""
    head: nn.Linear

    def channel_groups(self) -> list[ChannelGroup]:
        raise NotImplementedError

    def bn_pairs(self) -> list[tuple[str, str]]:
        return []


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, bn: bool = True) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=not bn)
    return [conv, nn.BatchNorm2d(cout), nn.ReLU()] if bn else [conv, nn.ReLU()]


class Up(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


class SeqNet(ZooNet):
    """A stack of conv(+BN)+ReLU (+pool) layers in ``features``, global average pool, ``head``.

    ``spec`` items: an int (conv 3x3 to that width), 'M' (max pool 2). BN nets use bias-free convs.
    """

    def __init__(self, arch: str, spec: list, bn: bool, size: int, width_in: int = 1, dim: int = 2) -> None:
        super().__init__()
        self.arch = arch
        self.dim = dim
        layers: list[nn.Module] = [Up(size)] if (dim == 2 and size != 8) else []
        cin = width_in
        for item in spec:
            if item == "M":
                layers.append(nn.MaxPool2d(2) if dim == 2 else nn.MaxPool1d(2))
                continue
            k, cout = item if isinstance(item, tuple) else (3, item)
            if dim == 2:
                layers += _cbr(cin, cout, k, bn=bn)
            else:
                layers += [nn.Conv1d(cin, cout, k, padding=k // 2), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim == 1:  # image rows as 8 input channels, columns as the signal
            x = x.reshape(x.shape[0], x.shape[-2], x.shape[-1])
        h = self.features(x)
        return self.head(h.mean(dim=tuple(range(2, h.ndim))))

    def _convs(self) -> list[tuple[str, str | None]]:
        mods = list(self.features.named_children())
        out = []
        for i, (name, m) in enumerate(mods):
            if isinstance(m, nn.Conv1d | nn.Conv2d):
                nxt = mods[i + 1][1] if i + 1 < len(mods) else None
                bn = f"features.{mods[i + 1][0]}" if isinstance(nxt, nn.BatchNorm2d) else None
                out.append((f"features.{name}", bn))
        return out

    def channel_groups(self) -> list[ChannelGroup]:
        convs = self._convs()
        consumers = [c for c, _ in convs[1:]] + ["head"]
        return [ChannelGroup((c,), bn, (nxt,)) for (c, bn), nxt in zip(convs, consumers, strict=True)]

    def bn_pairs(self) -> list[tuple[str, str]]:
        return [(c, bn) for c, bn in self._convs() if bn is not None]


class Block(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus identity or 1x1 conv-BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if (stride != 1 or cin != cout)
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (self.down(x) if self.down is not None else x))


class ResNet(ZooNet):
    def __init__(self, arch: str, widths: tuple[int, ...], blocks: int, size: int) -> None:
        super().__init__()
        self.arch = arch
        self.up = Up(size)
        self.stem = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(Block(cin, w, 2 if (i > 0 and b == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem_bn(self.stem(self.up(x))))
        h = self.layers(h)
        return self.head(h.mean(dim=(2, 3)))

    def channel_groups(self) -> list[ChannelGroup]:
        # Inside each block the conv1 -> bn1 -> conv2 channels are private; the residual stream is left alone.
        return [
            ChannelGroup((f"layers.{i}.conv1",), f"layers.{i}.bn1", (f"layers.{i}.conv2",))
            for i in range(len(self.layers))
        ]

    def bn_pairs(self) -> list[tuple[str, str]]:
        pairs = [("stem", "stem_bn")]
        for i, blk in enumerate(self.layers):
            pairs += [(f"layers.{i}.conv1", f"layers.{i}.bn1"), (f"layers.{i}.conv2", f"layers.{i}.bn2")]
            if blk.down is not None:
                pairs.append((f"layers.{i}.down.0", f"layers.{i}.down.1"))
        return pairs


class MobileNet(ZooNet):
    """Stem conv-BN-ReLU, then depthwise 3x3-BN-ReLU + pointwise 1x1-BN-ReLU blocks (``features``)."""

    def __init__(self, arch: str, widths: tuple[tuple[int, int], ...], size: int) -> None:
        super().__init__()
        self.arch = arch
        c0 = widths[0][0]
        layers: list[nn.Module] = [Up(size), *_cbr(1, c0)]
        cin = c0
        for cout, stride in widths[1:]:
            layers += _cbr(cin, cin, 3, stride, groups=cin) + _cbr(cin, cout, 1)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    def _convs(self) -> list[tuple[str, str, bool]]:
        mods = list(self.features.named_children())
        return [
            (f"features.{n}", f"features.{mods[i + 1][0]}", m.groups > 1)
            for i, (n, m) in enumerate(mods)
            if isinstance(m, nn.Conv2d)
        ]

    def channel_groups(self) -> list[ChannelGroup]:
        convs = self._convs()
        groups = []
        for j, (c, bn, dw) in enumerate(convs):
            if dw:
                continue
            rest = convs[j + 1 :]
            if not rest:
                groups.append(ChannelGroup((c,), bn, ("head",)))
            else:  # next is depthwise (permuted along), then the pointwise consumer
                (d, dbn, _), (p, _, _) = rest[0], rest[1]
                groups.append(ChannelGroup((c,), bn, (p,), through=(d, dbn)))
        return groups

    def bn_pairs(self) -> list[tuple[str, str]]:
        return [(c, bn) for c, bn, _ in self._convs()]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# name -> (constructor, has BatchNorm, training steps for an original, learning rate)
ARCHS: dict[str, tuple[Callable[[], ZooNet], bool, int, float]] = {
    "plain": (lambda: SeqNet("plain", [16, 32, "M", 64], bn=False, size=16), False, 500, 3e-3),
    "vgg": (lambda: SeqNet("vgg", [32, 32, "M", 64, 64, "M", 128], bn=False, size=16), False, 500, 2e-3),
    "resnet": (lambda: ResNet("resnet", (16, 32, 64), 1, size=16), True, 400, 3e-3),
    "mobilenet": (
        lambda: MobileNet("mobilenet", ((32, 1), (64, 1), (128, 2), (128, 1), (256, 2)), size=16),
        True,
        400,
        3e-3,
    ),
    "conv1d": (lambda: SeqNet("conv1d", [32, 64, 64], bn=False, size=8, width_in=8, dim=1), False, 500, 3e-3),
    # ~10.9M parameters; native 8x8 input keeps it trainable on one core (BN, VGG-style).
    "widevgg": (
        lambda: SeqNet("widevgg", [64, 128, "M", 256, 512, "M", 512, 512, 512, 512], bn=True, size=8),
        True,
        150,
        1e-3,
    ),  # fmt: skip
}


def make_model(arch: str, seed: int) -> ZooNet:
    """A freshly initialized model of ``arch`` (torch's default init under ``seed``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHS)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ARCHS[arch][0]()
