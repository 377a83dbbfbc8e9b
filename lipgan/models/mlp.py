"""``mlp``: the WGAN paper's fully connected generator and critic.

Arjovsky et al. (2017), official ``models/mlp.py``: four linear layers with ReLU between them,
512 hidden units in the paper's MLP experiments. Differences, on purpose: the critic returns one
score per sample ``(B,)`` instead of the batch mean (so a per-sample gradient penalty works), and
the generator ends in tanh because lipgan's pixels are in [-1, 1].
"""

from __future__ import annotations

from torch import nn

from lipgan.models import register
from lipgan.models.gan28 import Critic, Generator


def _stack(sizes: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return layers


@register("generator", "mlp")
def generator(
    width: int = 512, z_dim: int = 128, channels: int = 1, size: int = 28, depth: int = 4
) -> Generator:
    """``(B, z_dim) -> (B, channels, size, size)``: ``depth`` linear layers of ``width`` units."""
    sizes = [z_dim] + [int(width)] * (depth - 1) + [channels * size * size]
    return Generator(
        *_stack(sizes), nn.Tanh(), nn.Unflatten(1, (channels, size, size)), z_dim=z_dim
    )


@register("critic", "mlp")
def critic(width: int = 512, channels: int = 1, size: int = 28, depth: int = 4) -> Critic:
    """``(B, channels, size, size) -> (B,)``: ``depth`` linear layers, ReLU between them."""
    sizes = [channels * size * size] + [int(width)] * (depth - 1) + [1]
    return Critic(nn.Flatten(), *_stack(sizes))
