"""Attained lower bounds of the Lipschitz constant of any differentiable module.

Every value here is attained by the model itself (a Jacobian norm at a point, or a quotient
``||f(x1) - f(x2)|| / ||x1 - x2||`` of a pair), so it can never exceed the true constant:

- ``jacobian``: max over inputs of ``||J_f(x)||_2``: Lanczos on ``J^T J`` by jvp/vjp (the exact SVD
  of J when the output is small), with gradient/hill-climbing ascent of the point from restarts;
- ``pairs``: max quotient over data pairs, pairs along the top singular direction, and pairs
  found by L2 PGD (:func:`lipgan.sensitivity.pgd_l2`, the project's one PGD).

Nothing here assumes a chain: ``f`` is any module mapping ``(B, *input_shape)`` to ``(B, ...)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lipgan import norms

__all__ = ["jacobian_norm", "lower_bounds"]


def jacobian_norm(
    f: Callable, x: torch.Tensor, v: torch.Tensor | None = None, n_iter: int = 30
) -> tuple[float, torch.Tensor]:
    """||J_f(x)||_2 at one input x (shape as f takes it without batch) by Lanczos on J^T J.

    ``f`` maps a batch ``(B, *x.shape)`` to ``(B, ...)``. Returns ``(sigma, v)``: ``sigma =
    ||J v||`` with v the unit top right singular vector estimate, so sigma never exceeds the true
    norm (a valid lower bound of the Lipschitz constant).
    """

    def g(z):
        return f(z.unsqueeze(0)).reshape(-1)

    with torch.no_grad():
        n_out = g(x).numel()
    if n_out <= 64:
        # few outputs: the whole Jacobian from one batched backward, then its exact norm
        xs = x.detach().unsqueeze(0).repeat(n_out, *([1] * x.dim())).requires_grad_(True)
        y = f(xs).reshape(n_out, -1)
        if not y.requires_grad:  # the output does not depend on the input
            return 0.0, torch.zeros_like(x)
        (J,) = torch.autograd.grad(y, xs, torch.eye(n_out, dtype=y.dtype), allow_unused=True)
        if J is None:
            return 0.0, torch.zeros_like(x)
        J = J.reshape(n_out, -1)
        _, S, Vh = torch.linalg.svd(J, full_matrices=False)
        return float(S[0]), Vh[0].reshape(x.shape).detach()

    _, vjp_fn = torch.func.vjp(g, x)

    def jtj(u):
        _, ju = torch.func.jvp(g, (x,), (u,))
        return vjp_fn(ju)[0]

    if v is None:
        v = torch.randn_like(x)
    _, v = norms.lanczos_extreme(jtj, v, n_iter=n_iter, tol=1e-12, krylov=min(n_iter, 30))
    _, jv = torch.func.jvp(g, (x,), (v,))
    return float((jv.norm() / v.norm()).detach()), v.detach()


def lower_bounds(
    model: nn.Module,
    x: torch.Tensor,
    restarts: int = 8,
    steps: int = 20,
    seed: int = 0,
    _prepared: bool = False,
) -> dict[str, float]:
    """Attained lower bounds ``{"jacobian": ..., "pairs": ...}`` of the L2 Lipschitz constant.

    ``jacobian`` = max ||J_f(x)||_2 over inputs ascended from ``restarts`` points of the batch x;
    ``pairs`` = max ||f(x1) - f(x2)|| / ||x1 - x2|| over data pairs, pairs along the top singular
    direction, and pairs from L2 PGD. x: (B, *input_shape). ``model``: any differentiable module
    (analysed as a float64 eval-mode copy unless ``_prepared``).
    """
    from lipgan.analysis.report import prepare
    from lipgan.sensitivity import pgd_l2

    m = model if _prepared else prepare(model)
    x = x.detach().to("cpu", torch.float64)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    scale = float(x.std()) if n > 1 and float(x.std()) > 0 else 1.0

    def f(z):
        return m(z).reshape(z.shape[0], -1)

    best_j, best_x, best_v = 0.0, x[0] if n else None, None
    for r in range(min(restarts, n) if n else 0):
        xr = x[r].clone()
        val, v = jacobian_norm(f, xr)
        for _ in range(steps):
            # ascend ||J(x) v||: the gradient (zero a.e. for ReLU nets, absent for linear maps)
            # plus a random step, kept only when the Jacobian norm grows
            xx = xr.clone().requires_grad_(True)
            _, jv = torch.func.jvp(lambda z: f(z.unsqueeze(0)).reshape(-1), (xx,), (v,))
            gr = None
            if jv.requires_grad:
                (gr,) = torch.autograd.grad(jv.norm(), xx, allow_unused=True)
            step = torch.randn(xr.shape, generator=g, dtype=torch.float64) * 0.1 * scale
            if gr is not None and float(gr.norm()) > 0:
                step = step + 0.1 * scale * math.sqrt(xr.numel()) * gr / gr.norm()
            cand = xr + step
            cval, cv = jacobian_norm(f, cand, v, n_iter=10)
            if cval > val:
                xr, val, v = cand, cval, cv
        val, v = jacobian_norm(f, xr, v, n_iter=40)
        if val > best_j or best_v is None:
            best_j, best_x, best_v = max(val, best_j), xr, v
    best_p = 0.0
    with torch.no_grad():
        if n > 1:
            perm = torch.randperm(n, generator=g)
            d = f(x) - f(x[perm])
            dx = (x - x[perm]).reshape(n, -1).norm(dim=1)
            ok = dx > 0
            if ok.any():
                best_p = float((d.norm(dim=1)[ok] / dx[ok]).max())
        if best_v is not None and float(best_v.norm()) > 0:
            for h in (1e-2, 1e-4):
                dxv = h * best_v / best_v.norm()
                q = float((f((best_x + dxv)[None]) - f(best_x[None])).norm() / dxv.norm())
                best_p = max(best_p, q)
    if n and steps > 0:
        # L2 PGD on ||f(x + d) - f(x)|| at two radii; the quotient of each pair it finds
        k = min(restarts, n)
        x1 = x[:k]
        with torch.no_grad():
            y1 = f(x1)
        radius = scale * math.sqrt(x1[0].numel())
        for eps in (0.05 * radius, 0.5 * radius):

            def change(y, y1=y1):
                return (y.reshape(y.shape[0], -1) - y1).norm(dim=1)

            try:
                d = pgd_l2(f, x1, eps, change, steps=steps, generator=g)
            except RuntimeError:  # no gradient (a constant or parameter-free piece): no ascent
                continue
            with torch.no_grad():
                dn = d.reshape(k, -1).norm(dim=1)
                q = change(f(x1 + d))[dn > 0] / dn[dn > 0]
                if q.numel():
                    best_p = max(best_p, float(q.max()))
    return {"jacobian": best_j, "pairs": best_p}
