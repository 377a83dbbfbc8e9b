"""L-smoothness and strong convexity: extreme Hessian eigenvalues by Hessian-vector products.

A twice-differentiable loss is L-smooth on a convex set when its Hessian's eigenvalues stay at
most L there, and mu-strongly convex when they stay at least mu > 0; then for all x, y
``f(x) + g^T (y - x) + mu/2 ||y - x||^2 <= f(y) <= f(x) + g^T (y - x) + L/2 ||y - x||^2``
(g = grad f(x)). We compute the extreme eigenvalues at a point without forming the Hessian:
``H v = grad_w <grad_w f, v>`` (Pearlmutter 1994), with restarted Lanczos (default) or power
iteration, and check the two quadratic bounds at sampled points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lipgan.analysis.iteration import lanczos_extreme, power_extreme
from lipgan.errors import LipganError

__all__ = [
    "hvp_operator",
    "hessian_extremes",
    "param_hessian_extremes",
    "input_hessian_extremes",
    "check_quadratic_bounds",
]


def hvp_operator(
    loss: torch.Tensor, wrt: Sequence[torch.Tensor]
) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, torch.Tensor]:
    """The Hessian-vector product of a scalar ``loss`` w.r.t. the tensors ``wrt``, on one flat
    vector of their total size n. Returns ``(hvp, n, grad)``; the graph of the gradient is built
    once and reused by every product."""
    wrt = list(wrt)
    grads = torch.autograd.grad(loss, wrt, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    n = flat.numel()

    def hvp(v: torch.Tensor) -> torch.Tensor:
        v = v.reshape(-1).to(flat.dtype)
        hv = torch.autograd.grad(flat, wrt, grad_outputs=v, retain_graph=True, allow_unused=True)
        return torch.cat(
            [(h if h is not None else torch.zeros_like(w)).reshape(-1) for h, w in zip(hv, wrt)]
        ).detach()

    return hvp, n, flat.detach()


def hessian_extremes(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    method: str = "lanczos",
    n_iter: int = 200,
    tol: float = 1e-10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, float]:
    """Largest (``L``) and smallest (``mu``) eigenvalue of a symmetric operator given by ``hvp``.

    ``method``: "lanczos" (restarted, fully reorthogonalized, stopping at breakdown relative to
    the operator's scale: Ritz values lie inside the spectrum, and an exhausted Krylov space of a
    rank-deficient Hessian gives its zero eigenvalue, not noise) or "power" (power iteration
    for the largest magnitude lambda_1, then on ``H - lambda_1 I`` for the other end).
    Returns {"L", "mu", "condition" (L / mu when mu > 0, else inf)}.
    """
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    if method == "lanczos":
        big, _ = lanczos_extreme(hvp, v0, n_iter=n_iter, tol=tol, which="largest")
        small, _ = lanczos_extreme(hvp, v0, n_iter=n_iter, tol=tol, which="smallest")
    elif method == "power":
        lam1, _ = power_extreme(hvp, v0.clone(), n_iter, tol)
        other, _ = power_extreme(hvp, v0.clone(), n_iter, tol, shift=lam1)
        big, small = (lam1, lam1 + other) if lam1 >= 0 else (lam1 + other, lam1)
        if big < small:
            big, small = small, big
    else:
        raise LipganError(f"unknown method {method!r}; use 'lanczos' or 'power'")
    cond = big / small if small > 0 else math.inf
    return {"L": float(big), "mu": float(small), "condition": cond}


def param_hessian_extremes(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    **kw,
) -> dict[str, float]:
    """Extreme Hessian eigenvalues of ``loss_fn(model(x), y)`` w.r.t. the model's parameters
    (trainable ones), at the current weights. Keyword options as :func:`hessian_extremes`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LipganError("the model has no trainable parameters")
    loss = loss_fn(model(x), y)
    hvp, n, _ = hvp_operator(loss, params)
    return hessian_extremes(hvp, n, dtype=params[0].dtype, **kw)


def input_hessian_extremes(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, **kw
) -> dict[str, float]:
    """Extreme Hessian eigenvalues of the scalar ``f(x)`` w.r.t. the input x (any shape)."""
    xx = x.detach().clone().requires_grad_(True)
    hvp, n, _ = hvp_operator(f(xx), [xx])
    return hessian_extremes(hvp, n, dtype=x.dtype, **kw)


def check_quadratic_bounds(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    L: float,
    mu: float,
    n_points: int = 200,
    radius: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Check ``f(x) + g.(y-x) + mu/2 |y-x|^2 <= f(y) <= f(x) + g.(y-x) + L/2 |y-x|^2`` at points y
    drawn uniformly in directions with distances up to ``radius`` around x (any shape, f scalar).

    Returns the shares of points where the upper and lower bounds hold (relative tolerance 1e-9)
    and the worst violation of each (0 when none).
    """
    xx = x.detach().clone().requires_grad_(True)
    fx = f(xx)
    (gx,) = torch.autograd.grad(fx, xx)
    fx, gx = float(fx.detach()), gx.detach()
    gen = torch.Generator().manual_seed(seed)
    up_ok = lo_ok = 0
    up_worst = lo_worst = 0.0
    with torch.no_grad():
        for _ in range(n_points):
            d = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
            d = d / d.norm() * radius * float(torch.rand((), generator=gen))
            fy = float(f(x + d))
            lin = fx + float((gx * d).sum())
            q = float(d.square().sum()) / 2
            tol = 1e-9 * max(1.0, abs(fy), abs(lin), abs(L * q), abs(mu * q))
            up_v = fy - (lin + L * q)
            lo_v = (lin + mu * q) - fy
            up_ok += up_v <= tol
            lo_ok += lo_v <= tol
            up_worst = max(up_worst, up_v if up_v > tol else 0.0)
            lo_worst = max(lo_worst, lo_v if lo_v > tol else 0.0)
    return {
        "upper_share": up_ok / n_points,
        "lower_share": lo_ok / n_points,
        "upper_worst": up_worst,
        "lower_worst": lo_worst,
    }
