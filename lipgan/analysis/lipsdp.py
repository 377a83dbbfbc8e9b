"""LipSDP-Neuron (Fazlyab et al. 2019) for one hidden layer ``x -> W1 phi(W0 x + b)``.

Two solvers: :func:`lipsdp_neuron`, a deterministic first-order method on the Schur complement
(any feasible multiplier T certifies, so every value it returns is a certified upper bound), and
:func:`lipsdp_neuron_cvxpy`, the SDP solved by an interior-point / splitting solver through cvxpy
(the reference). The first-order method stops on iteration counts and a relative tolerance only,
never on a clock: the same weights and options give the same number on any machine and under any
load.
"""

from __future__ import annotations

import math

import torch

from lipgan.errors import LipganError

__all__ = ["lipsdp_neuron", "lipsdp_neuron_cvxpy"]


def lipsdp_neuron(
    W0: torch.Tensor,
    W1: torch.Tensor,
    slope: tuple[float, float] = (0.0, 1.0),
    max_iter: int = 300,
    tol: float = 1e-7,
    lr: float = 0.05,
    line_iter: int = 30,
    time_limit: float | None = None,
) -> tuple[float, torch.Tensor]:
    """LipSDP-Neuron bound of ``x -> W1 phi(W0 x + b)`` (phi's slopes in [a, b]), first-order.

    For diagonal T >= 0 with ``B = 2T - W1^T W1 > 0``, the LMI of Fazlyab et al. (2019) holds for
    ``rho(T) = lambda_max(W0^T Q W0)``, ``Q = (a+b)^2 T B^{-1} T - 2ab T`` (Schur complement), and
    then ``L <= sqrt(rho(T))`` for *any* such T. First a golden-section search over T = tau I
    (``line_iter`` steps; rho is unimodal along that line), then Adam on log T for at most
    ``max_iter`` steps, stopping after 50 steps without a relative gain of ``tol``; the best
    certified value is kept. Shapes: W0 (h, n), W1 (o, h). Returns ``(L, T)``.

    ``time_limit`` is accepted for compatibility and ignored: the result depends on the weights
    and the options only.
    """
    del time_limit  # deterministic: iteration counts, not wall-clock budgets
    a, b = slope
    W0 = W0.detach().double()
    W1 = W1.detach().double()
    lam, P = torch.linalg.eigh(W0 @ W0.t())
    keep = lam > lam.max() * 1e-13
    E = P[:, keep] * lam[keep].sqrt()  # E E^T = W0 W0^T: the (h, r) factor
    G1 = W1.t() @ W1
    h = W0.shape[0]

    def rho(t: torch.Tensor) -> torch.Tensor:
        T = torch.exp(t)
        B = 2 * torch.diag(T) - G1
        Lc, info = torch.linalg.cholesky_ex(B)
        if int(info) != 0:
            return torch.tensor(math.inf, dtype=torch.float64)
        X = torch.cholesky_solve(T[:, None] * E, Lc)  # B^{-1} T E
        Mq = (a + b) ** 2 * (E.t() * T) @ X - 2 * a * b * (E.t() * T) @ E
        Mq = 0.5 * (Mq + Mq.t())
        return torch.linalg.eigvalsh(Mq)[-1].clamp_min(0)

    # T = tau I: with G1 = Qg diag(g) Qg^T the matrix is explicit in tau (tau = ||W1||^2 already
    # certifies the product of the norms), so a golden-section search finds the best tau
    g, Qg = torch.linalg.eigh(G1)
    Eh = Qg.t() @ E
    EtE = E.t() @ E
    gmax = max(float(g[-1]), 1e-12)

    def rho_tau(log_tau: float) -> float:
        tau = math.exp(log_tau)
        Mq = (a + b) ** 2 * tau**2 * (Eh.t() / (2 * tau - g)) @ Eh - 2 * a * b * tau * EtE
        return float(torch.linalg.eigvalsh(0.5 * (Mq + Mq.t()))[-1].clamp_min(0))

    lo_, hi_ = math.log(gmax / 2) + 1e-6, math.log(gmax * 100)
    phi = (math.sqrt(5) - 1) / 2
    c1, c2 = hi_ - phi * (hi_ - lo_), lo_ + phi * (hi_ - lo_)
    f1, f2 = rho_tau(c1), rho_tau(c2)
    for _ in range(line_iter):
        if f1 < f2:
            hi_, c2, f2 = c2, c1, f1
            c1 = hi_ - phi * (hi_ - lo_)
            f1 = rho_tau(c1)
        else:
            lo_, c1, f1 = c1, c2, f2
            c2 = lo_ + phi * (hi_ - lo_)
            f2 = rho_tau(c2)
    best_log = c1 if f1 < f2 else c2
    best_t = torch.full((h,), best_log, dtype=torch.float64)
    with torch.no_grad():
        best_r = float(rho(best_t))
    theta = best_t.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    stall = 0
    for _ in range(max_iter):
        r = rho(theta)
        if not torch.isfinite(r):  # left the feasible set: back to the best point, smaller steps
            with torch.no_grad():
                theta.copy_(best_t)
            for grp in opt.param_groups:
                grp["lr"] *= 0.5
            continue
        rv = float(r.detach())
        if rv < best_r * (1 - tol):
            best_r, best_t, stall = rv, theta.detach().clone(), 0
        else:
            stall += 1
            if stall > 50:
                break
        opt.zero_grad()
        torch.log(r).backward()
        opt.step()
    with torch.no_grad():
        final = float(rho(best_t))  # recomputed: the returned T certifies this value
    return math.sqrt(final), torch.exp(best_t)


def lipsdp_neuron_cvxpy(
    W0: torch.Tensor,
    W1: torch.Tensor,
    slope: tuple[float, float] = (0.0, 1.0),
    solver: str = "SCS",
    **solver_kwargs,
) -> float:
    """LipSDP-Neuron solved as an SDP with cvxpy (reference; slow for wide layers).

    Schur complement on the rho I block and ``W0 W0^T = R R^T`` (R of h columns) turn the
    (n+h)-sized LMI into ``[[W1^T W1 - 2T + ..., (a+b) T R], [(a+b) R^T T, -rho I]] <= 0`` of size
    2h (for a = 0; with a > 0 the -2ab W0^T T W0 term is kept through R as well). Returns sqrt(rho).
    """
    try:
        import cvxpy as cp
    except ImportError:
        raise LipganError("LipSDP with cvxpy needs cvxpy: pip install 'lipgan[sdp]'") from None
    import numpy as np

    a, b = slope
    W0n = W0.detach().double().numpy()
    W1n = W1.detach().double().numpy()
    h = W0n.shape[0]
    lam, P = np.linalg.eigh(W0n @ W0n.T)
    keep = lam > lam.max() * 1e-13
    R = P[:, keep] * np.sqrt(lam[keep])
    r = R.shape[1]
    t = cp.Variable(h, nonneg=True)
    rho = cp.Variable(nonneg=True)
    T = cp.diag(t)
    if a == 0:
        top = W1n.T @ W1n - 2 * T
        M = cp.bmat([[top, (a + b) * T @ R], [(a + b) * R.T @ T, -rho * np.eye(r)]])
    else:
        # x-space form restricted to range(W0^T): variables z = R^T-coordinates
        # [[-rho I - 2ab R^T T R, (a+b) R^T T], [(a+b) T R, W1^T W1 - 2T]] <= 0
        M = cp.bmat(
            [
                [-rho * np.eye(r) - 2 * a * b * R.T @ T @ R, (a + b) * R.T @ T],
                [(a + b) * T @ R, W1n.T @ W1n - 2 * T],
            ]
        )
    cons = [0.5 * (M + M.T) << 0]
    prob = cp.Problem(cp.Minimize(rho), cons)
    prob.solve(solver=solver, **solver_kwargs)
    if rho.value is None:
        raise LipganError(f"LipSDP: the solver {solver} returned no solution ({prob.status})")
    return math.sqrt(max(float(rho.value), 0.0))
