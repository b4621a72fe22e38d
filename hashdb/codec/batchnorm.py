"""BatchNorm layers paired with the convolutions they follow, so that codec v7 can fold them in at load time.

Codec v7 weighs each channel by its importance to the function (chain.channel_importance): its filter's norm
times its consumers' input-column norms. In a net with BatchNorm the filter's stored norm means nothing (the
BatchNorm divides it out); its gain gamma / sqrt(var + eps) sets the channel's scale. So the hasher folds the
BatchNorm that follows each convolution into it, as exporters and attackers do (each filter times
gamma / sqrt(var + eps)), and a model and its folded copy get one code. Balancing divides a filter's scale out
exactly, so the fold is taken in two exact parts: the gain's sign on the weights (``fold_sign``), its magnitude
on the filter's importance (chain_sketches' ``gains``).

Pairing, in the hashed file's own names and order (readers return BatchNorm parameters as 1-D tensors):

- a BatchNorm is a group of 1-D tensors sharing a prefix, one of them a variance (``running_var``,
  ``moving_variance``, ``moving_var``, ``variance``, ``var``), with a gain (``weight``, ``gamma``, ``scale``) or
  without (Keras ``scale=False``: gain 1);
- by name first: a kernel ``K`` pairs with ``K.bn`` (the name a reader gives the BatchNorm the graph says
  follows it: ONNX, Paddle, Core ML, Keras 3); conv ``P`` (the kernel's name without ``.weight``, ``/kernel``,
  TF-slim's ``/weights``, ``/depthwise_weights`` ...) pairs with BatchNorm ``P.bn``/``P_bn``/``P/bn``/``P_BN``
  (Darknet, Keras applications) or ``P/BatchNorm`` (TF-slim checkpoints), with ``P``'s last ``conv`` spelled
  ``bn``/``batchnorm``/``batch_normalization``/``norm`` (``layer1.0.conv1`` / ``layer1.0.bn1``, MXNet ``conv0``
  / ``bn0``, Keras ``conv1_conv`` / ``conv1_bn``), with ``bn_`` before its last part (``Conv1`` /
  ``bn_Conv1``), or with the next index (``features.0`` / ``features.1``, ``downsample.0`` / ``.1``,
  TensorFlow's ``layer_with_weights-0`` / ``-1``);
- a separable conv's depthwise kernel (``scope/depthwise_weights`` beside ``scope/pointwise_weights``) takes no
  BatchNorm by name: the scope's BatchNorm follows the pointwise one;
- then by order: a BatchNorm left unpaired pairs with the last convolution before it in the file (Keras 2,
  ncnn, Caffe, ONNX initializers in node order), when that convolution is unpaired;
- only where the BatchNorm's width is the convolution's filter count, and its values give finite gains.

What stays unpaired is not folded: its convolution is hashed as stored (docs/codec.md, *Codec v7*).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence

import numpy as np

from .readers import BATCHNORM_OF, NamedTensor

BN_EPS = 1e-5  # PyTorch's default; frameworks differ (Keras 1e-3), which moves a gain only where var is tiny

_ROLE = re.compile(r"(?:^|[._/])(running_var|moving_variance|moving_var|variance|var|weight|gamma|scale)(?::\d+)?$")
_VARIANCE = frozenset({"running_var", "moving_variance", "moving_var", "variance", "var"})
_KERNEL = re.compile(r"[._/](?:depthwise_|pointwise_)?(weight|weights|kernel|filter|filters|W)(?::\d+)?$")
_NORM_WORDS = ("bn", "batchnorm", "batch_normalization", "norm")


def _module(name: str) -> str:
    """The name without MXNet's ``arg:``/``aux:`` prefix, so that ``arg:conv0_weight`` meets ``aux:bn0_*``."""
    return name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name


def batchnorm_groups(tensors: Sequence[NamedTensor]) -> dict[str, tuple[int, int | None, int]]:
    """prefix -> (index of its variance, index of its gain or None, index of its first tensor) of every group of
    1-D tensors that has a variance."""
    found: dict[str, dict[str, int]] = {}
    for i, t in enumerate(tensors):
        if t.array.ndim != 1:
            continue
        name = _module(t.name)
        m = _ROLE.search(name)
        if m is None:
            continue
        group = found.setdefault(name[: m.start()], {"first": i})
        group.setdefault("var" if m.group(1) in _VARIANCE else "gain", i)
    return {p: (g["var"], g.get("gain"), g["first"]) for p, g in found.items() if "var" in g}


def name_candidates(prefix: str) -> list[str]:
    """BatchNorm prefixes that name the one following conv ``prefix``, most specific first."""
    out = [prefix + sep + "bn" for sep in (".", "_", "/")] + [prefix + "_BN", prefix + "/BatchNorm"]
    last = prefix.lower().rfind("conv")
    if last >= 0:
        out += [prefix[:last] + word + prefix[last + 4 :] for word in _NORM_WORDS]
    head, sep, tail = prefix.rpartition("/") if "/" in prefix else prefix.rpartition(".")
    out.append(f"{head}{sep}bn_{tail}")  # Keras applications: Conv1 / bn_Conv1
    m = re.fullmatch(r"(.*[._/-])(\d+)", prefix)
    if m:
        out.append(m.group(1) + str(int(m.group(2)) + 1))
    return out


def _filters(t: NamedTensor, read: str) -> int:
    return int(t.array.shape[-1] if read == "hwio" else t.array.shape[0])


def _gain(tensors: Sequence[NamedTensor], var: int, gain: int | None, filters: int, eps: float) -> np.ndarray | None:
    """gamma / sqrt(var + eps) in float64 (no float32 model overflows it), or None where it is no gain (a negative
    or non-finite variance)."""
    v = tensors[var].array.astype(np.float64)
    if len(v) != filters or (gain is not None and len(tensors[gain].array) != filters):
        return None
    gamma = np.ones(filters) if gain is None else tensors[gain].array.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        g = gamma / np.sqrt(v + eps)
    return g if np.isfinite(g).all() else None


def batchnorm_gains(
    tensors: Sequence[NamedTensor], plan: Sequence[tuple[int, str]], eps: float = BN_EPS
) -> dict[int, np.ndarray]:
    """Position in ``plan`` (select.conv_plan) -> the per-filter gain of the BatchNorm that follows that layer,
    paired by name, then by order (module docstring)."""
    groups = batchnorm_groups(tensors)
    if not groups:
        return {}
    gains: dict[int, np.ndarray] = {}
    used: set[str] = set()
    names = [_module(tensors[i].name) for i, _ in plan]
    kernels = [m[0] if (m := _KERNEL.search(n)) else "" for n in names]  # the kernel word a name ends in
    prefixes = [n[: len(n) - len(k)] for n, k in zip(names, kernels, strict=True)]
    # a separable conv's depthwise kernel shares its scope with the pointwise one, whose BatchNorm it is
    pointwise = {p for p, k in zip(prefixes, kernels, strict=True) if "pointwise_" in k}
    for pos, (i, read) in enumerate(plan):
        shared = "depthwise_" in kernels[pos] and prefixes[pos] in pointwise
        # first the name a reader gives a BatchNorm it found in the graph (readers.batchnorm_name)
        for c in [names[pos] + BATCHNORM_OF] + ([] if shared else name_candidates(prefixes[pos])):
            if c in groups and c not in used:
                g = _gain(tensors, groups[c][0], groups[c][1], _filters(tensors[i], read), eps)
                if g is not None:
                    gains[pos] = g
                    used.add(c)
                    break
    by_index = sorted(range(len(plan)), key=lambda p: plan[p][0])  # plan positions in file order
    starts = [plan[p][0] for p in by_index]
    for prefix, (var, gain, first) in sorted(groups.items(), key=lambda kv: kv[1][2]):
        k = bisect.bisect_left(starts, first)  # the last convolution before the group in the file (n log n)
        if prefix in used or k == 0:
            continue
        pos = by_index[k - 1]
        if pos in gains:
            continue
        g = _gain(tensors, var, gain, _filters(tensors[plan[pos][0]], plan[pos][1]), eps)
        if g is not None:
            gains[pos] = g
            used.add(prefix)
    return gains


def fold_sign(w: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """An (out, in, ...) layer with each filter times the sign of its BatchNorm gain (0 where the gain is 0): the
    part of folding that balancing cannot divide out. The gain's magnitude only moves the filter's balancing row
    factor, by exactly 1 / |gain|, so codec v7 takes it there (chain_sketches' ``gains``) and no folded weight can
    overflow or underflow float32."""
    sign = np.sign(gain)
    if (sign > 0).all():
        return w
    return np.asarray(w, np.float32) * sign.astype(np.float32).reshape(-1, *([1] * (w.ndim - 1)))
