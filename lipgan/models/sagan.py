"""``sagan28``: a small self-attention GAN for 28x28 images.

After Zhang et al. (2019), "Self-Attention Generative Adversarial Networks": the ``dcgan28``
layout with one self-attention block at 14x14 in both networks and batch normalization in the
generator. SAGAN's spectral normalization of both networks, hinge loss and two learning rates are
the trainer's ``sagan`` preset (``lipgan.gan.PRESETS``), not part of the architecture, so the same
network can be trained with any Lipschitz method.

Dot-product attention is not globally Lipschitz (Kim et al. 2021), so a critic with this block has
no finite product bound even when every linear layer is normalized.
"""

from __future__ import annotations

import torch
from torch import nn

from lipgan.models import register
from lipgan.models.gan28 import Critic, Crop, Generator, _deconv


class SelfAttention(nn.Module):
    """``y = x + gamma * V softmax(Q^T K)^T`` over the ``H*W`` positions; shapes ``(B, C, H, W)``.

    ``Q, K`` are 1x1 convolutions to ``C // 8`` channels, ``V`` to ``C``; ``gamma`` starts at 0 so
    the block starts as the identity, as in SAGAN. Plain matmul + softmax (no fused attention
    kernel) so a gradient penalty's double backward works through it.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(1, channels // 8)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2)  # (B, C', N)
        k = self.key(x).flatten(2)  # (B, C', N)
        v = self.value(x).flatten(2)  # (B, C, N)
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, N, N), rows sum to 1
        out = (v @ attn.transpose(1, 2)).view(b, c, h, w)
        return x + self.gamma * out


@register("generator", "sagan28")
def generator(width: int = 64, z_dim: int = 128, channels: int = 1) -> Generator:
    """``(B, z_dim) -> (B, channels, 28, 28)`` with self-attention at 14x14."""
    d = int(width)
    return Generator(
        nn.Linear(z_dim, 4 * 4 * 4 * d),
        nn.Unflatten(1, (4 * d, 4, 4)),
        nn.BatchNorm2d(4 * d),
        nn.ReLU(),
        _deconv(4 * d, 2 * d),  # 4 -> 8
        Crop(7),
        nn.BatchNorm2d(2 * d),
        nn.ReLU(),
        _deconv(2 * d, d),  # 7 -> 14
        nn.BatchNorm2d(d),
        nn.ReLU(),
        SelfAttention(d),
        _deconv(d, channels),  # 14 -> 28
        nn.Tanh(),
        z_dim=z_dim,
    )


@register("critic", "sagan28")
def critic(width: int = 64, channels: int = 1) -> Critic:
    """``(B, channels, 28, 28) -> (B,)`` with self-attention at 14x14; LeakyReLU(0.1) as SAGAN."""
    d = int(width)
    return Critic(
        nn.Conv2d(channels, d, 5, stride=2, padding=2),  # 28 -> 14
        nn.LeakyReLU(0.1),
        SelfAttention(d),
        nn.Conv2d(d, 2 * d, 5, stride=2, padding=2),  # 14 -> 7
        nn.LeakyReLU(0.1),
        nn.Conv2d(2 * d, 4 * d, 5, stride=2, padding=2),  # 7 -> 4
        nn.LeakyReLU(0.1),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4 * d, 1),
    )
