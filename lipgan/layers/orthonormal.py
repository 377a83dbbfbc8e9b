"""Björck orthonormalization (Anil, Lucas & Grosse 2019, "Sorting out Lipschitz function
approximation"): weights made orthonormal by Björck & Bowie iterations."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from lipgan.errors import LipganError


def _safe_scale(weight: torch.Tensor) -> torch.Tensor:
    """An upper bound on sigma(W): min(||W||_F, sqrt(||W||_1 ||W||_inf)).

    Dividing by it puts every singular value in (0, 1]; the order-1 Björck map
    s -> (1 + b) s - b s^3 (b = 1/2) is increasing on [0, 1] and fixes 1, so every iterate keeps
    its singular values in (0, 1]: the layer is at most 1-Lipschitz after any number of steps.
    """
    fro = weight.norm()
    one = weight.abs().sum(0).max()
    inf = weight.abs().sum(1).max()
    return torch.minimum(fro, (one * inf).sqrt()).clamp_min(1e-12)


def bjorck_orthonormalize(weight: torch.Tensor, iters: int = 20, beta: float = 0.5) -> torch.Tensor:
    """Björck & Bowie (1971) order-1 iteration ``W <- (1 + beta) W - beta W W^T W``.

    ``weight``: ``(m, n)``; returns the nearest (semi-)orthonormal matrix's approximation, all
    singular values in (0, 1] and tending to 1. Differentiable. Works on the smaller Gram
    matrix (``m x m`` or ``n x n``).
    """
    w = weight / _safe_scale(weight)
    rows = w.shape[0] <= w.shape[1]
    for _ in range(iters):
        if rows:
            w = (1 + beta) * w - beta * (w @ w.t()) @ w
        else:
            w = (1 + beta) * w - beta * w @ (w.t() @ w)
    return w


class BjorckOrthonormal(nn.Module):
    """Parametrization ``W -> bjorck_orthonormalize(W)`` for a Linear weight ``(out, in)``.

    Defaults beta 0.5, 20 iterations, order 1: Anil et al.'s LNets ``BjorckLinear``. The same
    number of iterations runs in train and eval mode, so the critic is one function.
    """

    def __init__(self, iters: int = 20, beta: float = 0.5) -> None:
        super().__init__()
        if iters < 1:
            raise LipganError("Björck needs at least one iteration")
        if not 0 < beta <= 0.5:
            raise LipganError("Björck beta must lie in (0, 0.5] for the iteration to converge")
        self.iters = iters
        self.beta = beta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=weight.device.type, enabled=False):
            w = bjorck_orthonormalize(weight.float(), self.iters, self.beta)
        return w.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"iters={self.iters}, beta={self.beta}"


class BjorckLinear(nn.Linear):
    """A Linear layer whose weight is Björck-orthonormalized at every use: ``||W||_2 <= 1``.

    ``x (..., in) -> x W^T + b`` with ``W`` (semi-)orthonormal, so the layer is 1-Lipschitz and
    (for ``out >= in``) preserves gradient norms.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        iters: int = 20,
        beta: float = 0.5,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        # orthogonal init: the iteration starts at its fixed point (LNets does the same)
        nn.init.orthogonal_(self.weight)
        parametrize.register_parametrization(self, "weight", BjorckOrthonormal(iters, beta))
