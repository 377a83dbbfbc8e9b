"""GAN objectives and optimizers: the tables a method preset names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Loss:
    """A GAN objective as two functions of per-sample scores ``(B,)`` -> scalar."""

    critic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    generator: Callable[[torch.Tensor], torch.Tensor]


LOSSES: dict[str, Loss] = {
    # WGAN (Arjovsky et al. 2017): L_D = E[D(fake)] - E[D(real)] = -W, L_G = -E[D(fake)].
    "wasserstein": Loss(
        critic=lambda r, f: f.mean() - r.mean(),
        generator=lambda f: -f.mean(),
    ),
    # Hinge (Lim & Ye 2017; SAGAN): L_D = E[max(0, 1 - D(real))] + E[max(0, 1 + D(fake))].
    "hinge": Loss(
        critic=lambda r, f: F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean(),
        generator=lambda f: -f.mean(),
    ),
    # Non-saturating GAN (Goodfellow et al. 2014) on logits: -log sigmoid(x) = softplus(-x).
    "ns": Loss(
        critic=lambda r, f: F.softplus(-r).mean() + F.softplus(f).mean(),
        generator=lambda f: F.softplus(-f).mean(),
    ),
}



def _adam(params, lr, b1, b2, wd):
    return torch.optim.Adam(params, lr=lr, betas=(b1, b2), weight_decay=wd)


def _rmsprop(params, lr, b1, b2, wd):
    return torch.optim.RMSprop(params, lr=lr, momentum=b1, alpha=b2, weight_decay=wd)


OPTIMIZERS = {"adam": _adam, "rmsprop": _rmsprop}
