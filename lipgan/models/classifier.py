"""Small MNIST-sized classifiers for the generalization study and certified training.

Both are plain ``nn.Sequential`` stacks of Linear / Conv2d / activation / Flatten, so
:mod:`lipgan.lipschitz` can bound them layer by layer, and their last layer is always the
``nn.Linear`` head (the certified mode treats the head apart from the body).

- ``mlp``: 784 -> hidden... -> 10 with ReLU.
- ``cnn``: the "2C2F" network of Wong & Kolter (2018), also used by GloRo (Leino et al. 2021):
  conv 16 4x4 stride 2, conv 32 4x4 stride 2, dense 100, dense 10. Strided convolutions instead of
  pooling keep every layer a linear map whose operator norm lipgan can bound exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lipgan.errors import LipganError
from lipgan.layers import GroupSort
from lipgan.models import register


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "tanh":
        return nn.Tanh()
    if name in ("minmax", "groupsort"):
        # MinMax = GroupSort with pairs (Anil et al. 2019): 1-Lipschitz, gradient-norm preserving
        return GroupSort(2)
    raise LipganError(f"unknown activation {name!r}; use relu, tanh or minmax")


@register("classifier", "mlp")
def mlp(
    hidden: Sequence[int] = (256, 256),
    activation: str = "relu",
    in_features: int = 784,
    n_classes: int = 10,
) -> nn.Sequential:
    """``Flatten -> [Linear -> act] * len(hidden) -> Linear``.

    Input ``(B, 1, 28, 28)`` (or ``(B, 784)``), output ``(B, n_classes)`` logits.
    """
    if isinstance(hidden, int):
        hidden = (hidden,)
    hidden = [int(h) for h in hidden]
    if not hidden or any(h <= 0 for h in hidden):
        raise LipganError(f"hidden sizes must be positive integers, got {hidden}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), _activation(activation)]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


@register("classifier", "cnn")
def cnn(
    channels: Sequence[int] = (16, 32),
    dense: int = 100,
    activation: str = "relu",
    n_classes: int = 10,
) -> nn.Sequential:
    """2C2F (Wong & Kolter 2018): two 4x4 stride-2 convs, a dense layer, the head.

    Input ``(B, 1, 28, 28)`` -> ``(B, c0, 14, 14)`` -> ``(B, c1, 7, 7)`` -> ``(B, dense)`` ->
    ``(B, n_classes)``.
    """
    channels = [int(c) for c in channels]
    if len(channels) != 2 or any(c <= 0 for c in channels) or dense <= 0:
        raise LipganError(
            f"cnn takes two positive channel counts and a positive dense size, got "
            f"{channels}, {dense}"
        )
    c0, c1 = channels
    return nn.Sequential(
        nn.Conv2d(1, c0, 4, stride=2, padding=1),
        _activation(activation),
        nn.Conv2d(c0, c1, 4, stride=2, padding=1),
        _activation(activation),
        nn.Flatten(),
        nn.Linear(c1 * 7 * 7, dense),
        _activation(activation),
        nn.Linear(dense, n_classes),
    )
