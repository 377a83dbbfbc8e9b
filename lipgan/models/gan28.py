"""``dcgan28``: the WGAN-GP paper's MNIST generator and critic, with a width knob.

Architecture of Gulrajani et al. (2017), official ``gan_mnist.py`` (DIM = 64):

- critic: 5x5 stride-2 convolutions 1 -> D -> 2D -> 4D (28 -> 14 -> 7 -> 4 pixels), LeakyReLU(0.2)
  after each, no normalization, then a linear map 4*4*4D -> 1;
- generator: z (128) -> linear 4*4*4D -> ReLU -> transposed convolutions 4D -> 2D (4 -> 8 pixels,
  cropped to 7 as in the official code) -> D (14) -> 1 (28).

The official generator ends in a sigmoid for pixels in [0, 1]; lipgan's data are in [-1, 1]
(``BatchSource(scale="tanh")``), so ours ends in tanh. The critic returns one score per sample,
shape ``(B,)``: nothing inside averages over the batch (the official WGAN critic did, which makes a
per-sample gradient penalty impossible; see ANCHORS.md).
"""

from __future__ import annotations

import torch
from torch import nn

from lipgan.errors import LipganError
from lipgan.models import register


class Critic(nn.Sequential):
    """A stack of layers ending in a ``(B, 1)`` linear map; returns the ``(B,)`` scores.

    Kept an ``nn.Sequential`` so per-layer tools (``lipgan.lipschitz``) can walk it in order.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B,)
        return super().forward(x).squeeze(1)


class Crop(nn.Module):
    """Keep the top-left ``size x size`` pixels (the official code's 8 -> 7 crop)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : self.size, : self.size]

    def extra_repr(self) -> str:
        return f"size={self.size}"


class Generator(nn.Sequential):
    """A stack mapping ``z`` ``(B, z_dim)`` to images ``(B, channels, 28, 28)`` in [-1, 1]."""

    def __init__(self, *layers: nn.Module, z_dim: int) -> None:
        super().__init__(*layers)
        self.z_dim = z_dim


def _deconv(c_in: int, c_out: int) -> nn.ConvTranspose2d:
    # kernel 5, stride 2, padding 2, output_padding 1 doubles the size exactly (n -> 2n), which is
    # TensorFlow's "SAME" transposed conv the official code used.
    return nn.ConvTranspose2d(c_in, c_out, 5, stride=2, padding=2, output_padding=1)


@register("generator", "dcgan28")
def generator(
    width: int = 64, z_dim: int = 128, channels: int = 1, norm: str = "none"
) -> Generator:
    """WGAN-GP MNIST generator: ``(B, z_dim) -> (B, channels, 28, 28)``.

    ``norm="batch"``: a batch norm before each hidden ReLU (BatchNorm1d on the linear layer's
    features, BatchNorm2d on the feature maps), as DCGAN's generator (Radford et al. 2016); the
    official WGAN-GP MNIST generator has none (``"none"``, the default).
    """
    if norm not in ("none", "batch"):
        raise LipganError(f"dcgan28 generator norm must be 'none' or 'batch', not {norm!r}")
    d = int(width)

    def bn(kind: type[nn.Module], n: int) -> list[nn.Module]:
        return [kind(n)] if norm == "batch" else []

    return Generator(
        nn.Linear(z_dim, 4 * 4 * 4 * d),
        *bn(nn.BatchNorm1d, 4 * 4 * 4 * d),
        nn.ReLU(),
        nn.Unflatten(1, (4 * d, 4, 4)),
        _deconv(4 * d, 2 * d),  # 4 -> 8
        *bn(nn.BatchNorm2d, 2 * d),
        nn.ReLU(),
        Crop(7),  # 8 -> 7, as the official code
        _deconv(2 * d, d),  # 7 -> 14
        *bn(nn.BatchNorm2d, d),
        nn.ReLU(),
        _deconv(d, channels),  # 14 -> 28
        nn.Tanh(),
        z_dim=z_dim,
    )


@register("critic", "dcgan28")
def critic(width: int = 64, channels: int = 1) -> Critic:
    """WGAN-GP MNIST critic: ``(B, channels, 28, 28) -> (B,)``, no normalization layers."""
    d = int(width)
    return Critic(
        nn.Conv2d(channels, d, 5, stride=2, padding=2),  # 28 -> 14
        nn.LeakyReLU(0.2),
        nn.Conv2d(d, 2 * d, 5, stride=2, padding=2),  # 14 -> 7
        nn.LeakyReLU(0.2),
        nn.Conv2d(2 * d, 4 * d, 5, stride=2, padding=2),  # 7 -> 4
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4 * d, 1),
    )
