"""Which layers the Lipschitz methods constrain, and their weight as a matrix."""

from __future__ import annotations

import torch
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: layers whose ``weight`` the methods constrain
WEIGHT_LAYERS = (nn.Linear, *_CONV, *_CONV_T)


def weight_layers(module: nn.Module) -> list[nn.Module]:
    """Every Linear, Conv and ConvTranspose layer of ``module`` (``module`` itself included)."""
    return [m for m in module.modules() if isinstance(m, WEIGHT_LAYERS)]


def reshaped_weight(weight: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The kernel as the matrix SN-GAN normalizes: ``(c_out, c_in/groups * prod(k))``.

    ConvTranspose stores its kernel as ``(c_in, c_out/groups, *k)``; its output channels are the
    second dimension, as in torch's own spectral norm (``dim=1``).
    """
    if isinstance(layer, _CONV_T):
        weight = weight.transpose(0, 1)
    return weight.reshape(weight.shape[0], -1)


def _unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / x.norm().clamp_min(eps)
