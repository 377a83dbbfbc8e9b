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

__all__ = ["lipsdp_neuron", "lipsdp_neuron_cvxpy", "lipsdp_dual_bound", "lipsdp_dual_ascent"]


def _top_eig(mv, v: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """Largest eigenpair of a symmetric PSD operator by Lanczos from ``v`` (warm start), with
    full reorthogonalization; stops at breakdown relative to the operator's scale."""
    n = v.numel()
    k = min(steps, n)
    Q = torch.zeros(n, k, dtype=torch.float64)
    alpha = torch.zeros(k, dtype=torch.float64)
    beta = torch.zeros(k, dtype=torch.float64)
    q = v / v.norm()
    m = 0
    scale = 0.0
    for j in range(k):
        Q[:, j] = q
        w = mv(q)
        alpha[j] = q @ w
        w = w - Q[:, : j + 1] @ (Q[:, : j + 1].t() @ w)  # full reorthogonalization
        m = j + 1
        bj = float(w.norm())
        scale = max(scale, abs(float(alpha[j])), bj)
        if j + 1 == k or bj <= 1e-12 * scale:
            break
        beta[j] = bj
        q = w / bj
    T = torch.diag(alpha[:m]) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
    w_, S = torch.linalg.eigh(T)
    return float(w_[-1]), Q[:, :m] @ S[:, -1]


def lipsdp_neuron(
    W0: torch.Tensor,
    W1: torch.Tensor,
    slope: tuple[float, float] = (0.0, 1.0),
    max_iter: int = 300,
    tol: float = 1e-6,
    lr: float = 0.05,
    line_iter: int = 25,
    krylov: int = 20,
    time_limit: float | None = None,
) -> tuple[float, torch.Tensor]:
    """LipSDP-Neuron bound of ``x -> W1 phi(W0 x + b)`` (phi's slopes in [a, b]), first-order.

    For diagonal T >= 0 with ``B = 2T - W1^T W1 > 0``, the LMI of Fazlyab et al. (2019) holds for
    ``rho(T) = lambda_max(E^T Q E)``, ``Q = (a+b)^2 T B^{-1} T - 2ab T``, ``E E^T = W0 W0^T``
    (Schur complement), and then ``L <= sqrt(rho(T))`` for *any* such T. First a golden-section
    search over T = tau I (``line_iter`` exact steps; rho is unimodal along that line), then at
    most ``max_iter`` Adam steps on log T with the analytic gradient of the top eigenvalue
    (``d rho / d t_i = (a+b)^2 (2 z_i u_i - 2 z_i^2) - 2ab u_i^2``, ``u = E v``,
    ``z = B^{-1} T u``, v from Lanczos warm-started at the last one), stopping after 40 steps
    without a relative gain of ``tol``. The returned value is the exact ``sqrt(rho)`` of the best
    T found (recomputed by a dense eigensolver), so it is certified whatever the iteration did.
    Shapes: W0 (h, n), W1 (o, h). Returns ``(L, T)``.

    Deterministic: it stops on counts and tolerances only (``time_limit`` is accepted for
    compatibility and ignored), so the same weights give the same number on any machine or load.
    """
    del time_limit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: threads only spin; and one thread, one summation
    try:
        return _lipsdp_neuron(W0, W1, slope, max_iter, tol, lr, line_iter, krylov)
    finally:
        torch.set_num_threads(threads)


def _lipsdp_neuron(W0, W1, slope, max_iter, tol, lr, line_iter, krylov):
    a, b = slope
    W0 = W0.detach().double()
    W1 = W1.detach().double()
    lam, P = torch.linalg.eigh(W0 @ W0.t())
    keep = lam > lam.max() * 1e-13
    E = P[:, keep] * lam[keep].sqrt()  # E E^T = W0 W0^T: the (h, r) factor
    G1 = W1.t() @ W1
    h, r = E.shape
    c2, c_ab = (a + b) ** 2, 2 * a * b

    U1 = W1.t()  # (h, o): G1 = U1 U1^T
    low_rank = 4 * U1.shape[1] <= h

    def factor(t: torch.Tensor):
        """What solves B z = T u for this t (None when B is not positive definite). With few
        outputs, Woodbury: B^{-1} = D^{-1} + D^{-1} U S^{-1} U^T D^{-1}, D = 2T,
        S = I - U^T D^{-1} U (o x o), and B > 0 iff S > 0."""
        if low_rank:
            S = torch.eye(U1.shape[1], dtype=torch.float64) - 0.5 * (U1.t() / t) @ U1
            Ls, info = torch.linalg.cholesky_ex(S)
        else:
            Ls, info = torch.linalg.cholesky_ex(2 * torch.diag(t) - G1)
        return None if int(info) != 0 else Ls

    def solve(t, Lc, u):
        """z = B^{-1} T u."""
        if low_rank:
            p = torch.cholesky_solve((U1.t() @ u)[:, None], Lc)[:, 0]
            return 0.5 * u + (U1 @ p) / (4 * t)
        return torch.cholesky_solve((t * u)[:, None], Lc)[:, 0]

    def matvec(t, Lc):
        def mv(v):
            u = E @ v
            return E.t() @ (c2 * t * solve(t, Lc, u) - c_ab * t * u)

        return mv

    def exact(t: torch.Tensor) -> float:
        Lc, info = torch.linalg.cholesky_ex(2 * torch.diag(t) - G1)
        if int(info) != 0:
            return math.inf
        X = torch.cholesky_solve(t[:, None] * E, Lc)  # B^{-1} T E
        M = c2 * (E.t() * t) @ X - c_ab * (E.t() * t) @ E
        return float(torch.linalg.eigvalsh(0.5 * (M + M.t()))[-1].clamp_min(0))

    # T = tau I: with G1 = Qg diag(g) Qg^T the matrix is explicit in tau (tau = ||W1||^2 already
    # certifies the product of the norms), so a golden-section search finds the best tau
    g, Qg = torch.linalg.eigh(G1)
    Eh = Qg.t() @ E
    EtE = E.t() @ E
    gmax = max(float(g[-1]), 1e-12)

    def rho_tau(log_tau: float) -> float:
        tau = math.exp(log_tau)
        Mq = c2 * tau**2 * (Eh.t() / (2 * tau - g)[None, :]) @ Eh - c_ab * tau * EtE
        return float(torch.linalg.eigvalsh(0.5 * (Mq + Mq.t()))[-1].clamp_min(0))

    lo_, hi_ = math.log(gmax / 2) + 1e-6, math.log(gmax * 100)
    phi = (math.sqrt(5) - 1) / 2
    x1, x2 = hi_ - phi * (hi_ - lo_), lo_ + phi * (hi_ - lo_)
    f1, f2 = rho_tau(x1), rho_tau(x2)
    for _ in range(line_iter):
        if f1 < f2:
            hi_, x2, f2 = x2, x1, f1
            x1 = hi_ - phi * (hi_ - lo_)
            f1 = rho_tau(x1)
        else:
            lo_, x1, f1 = x1, x2, f2
            x2 = lo_ + phi * (hi_ - lo_)
            f2 = rho_tau(x2)
    theta = torch.full((h,), x1 if f1 < f2 else x2, dtype=torch.float64)
    best_t, best_r = theta.clone(), min(f1, f2)
    # Adam on theta = log t with the analytic gradient of log lambda_max (own loop: no optimizer
    # state beyond two moments, and nothing that depends on time)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(r, generator=gen, dtype=torch.float64)
    m1 = torch.zeros(h, dtype=torch.float64)
    m2 = torch.zeros(h, dtype=torch.float64)
    beta1, beta2, step_lr = 0.9, 0.999, lr
    stall, k = 0, 0
    for _ in range(max_iter):
        t = torch.exp(theta)
        Lc = factor(t)
        if Lc is None:  # left the feasible set: back to the best point, smaller steps
            theta = best_t.clone()
            step_lr *= 0.5
            continue
        lam_v, v = _top_eig(matvec(t, Lc), v, krylov)
        if lam_v < best_r * (1 - tol):
            best_r, best_t, stall = lam_v, theta.clone(), 0
        else:
            stall += 1
            if stall > 40:
                break
        u = E @ v
        z = solve(t, Lc, u)
        grad = (c2 * (2 * z * u - 2 * z * z) - c_ab * u * u) * t / max(lam_v, 1e-300)
        k += 1
        m1 = beta1 * m1 + (1 - beta1) * grad
        m2 = beta2 * m2 + (1 - beta2) * grad * grad
        mh, vh = m1 / (1 - beta1**k), m2 / (1 - beta2**k)
        theta = theta - step_lr * mh / (vh.sqrt() + 1e-12)
    final = exact(torch.exp(best_t))  # the Ritz values were estimates: this one certifies
    line = min(f1, f2)
    if not final <= line:  # never worse than the certified line search
        best_t = torch.full((h,), x1 if f1 < f2 else x2, dtype=torch.float64)
        final = exact(torch.exp(best_t))
    return math.sqrt(final * (1 + 1e-12)), torch.exp(best_t)


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


def lipsdp_dual_bound(
    W0: torch.Tensor,
    W1: torch.Tensor,
    F1: torch.Tensor,
    F2: torch.Tensor,
    slope: tuple[float, float] = (0.0, 1.0),
) -> float:
    """A certified *lower* bound on the LipSDP-Neuron value from any dual point ``Z = F F^T``.

    Weak duality for ``min rho`` s.t. ``[[-2ab W0^T T W0 - rho I, (a+b) W0^T T], [(a+b) T W0,
    W1^T W1 - 2T]] <= 0``, ``T = diag(t) >= 0``: every ``Z = [F1; F2] [F1; F2]^T >= 0`` with
    ``||F1||_F = 1`` and, per hidden unit i, ``(a+b) <u_i, v_i> - ab |u_i|^2 - |v_i|^2 >= 0``
    (``u_i``, ``v_i`` the i-th rows of ``W0 F1`` and ``F2``: the coefficient of ``t_i`` in the
    Lagrangian) gives ``rho* >= ||W1 F2||_F^2``. The rows of F2 are first projected onto those
    constraints (``v_i`` into the ball of centre ``(a+b)/2 u_i``, radius ``(b-a)/2 |u_i|``) and F
    is normalized, so any F (e.g. from a solver's dual) yields a valid bound; the rounding of
    ``W0 F1`` shrinks each ball (``gamma_n |W0| |F1|``), that of the rest a 1e-9 relative margin.
    Shapes: W0 (h, n), W1 (o, h), F1 (n, k), F2 (h, k). Returns ``sqrt(rho_lower)``, a lower
    bound on the LipSDP value ``sqrt(rho*)``.
    """
    W0, W1 = W0.detach().double(), W1.detach().double()
    F1, F2 = F1.detach().double(), F2.detach().double()
    scale = float(F1.norm())
    if not math.isfinite(scale) or scale == 0.0:
        raise LipganError("lipsdp_dual_bound: F1 is zero or not finite")
    rho = float(_dual_value(W0, W1, F1, F2, slope)) * (1 - 1e-9)
    return math.sqrt(max(rho, 0.0))


def _dual_value(W0, W1, F1, F2, slope) -> torch.Tensor:
    """``||W1 V||_F^2`` for F normalized and F2 projected to V (differentiable in F1, F2)."""
    a, b = slope
    scale = F1.norm()
    F1, F2 = F1 / scale, F2 / scale
    U = W0 @ F1
    # |fl(W0 F1) - W0 F1| <= gamma_n |W0| |F1| (Higham, Thm 3.5): the row error e_i moves the
    # exact centre by |a+b|/2 e_i and the radius by |b-a|/2 e_i, so shrink the radius by both
    n = W0.shape[1]
    gam = 1.01 * n * 2.0**-53 / (1 - n * 2.0**-53)
    with torch.no_grad():
        err = gam * (W0.abs() @ F1.abs()).norm(dim=1, keepdim=True)
    centre = 0.5 * (a + b) * U
    radius = 0.5 * (b - a) * U.norm(dim=1, keepdim=True) * (1 - 1e-9)
    radius = radius - 0.5 * (abs(a + b) + abs(b - a)) * err
    off = F2 - centre
    dist = off.norm(dim=1, keepdim=True)
    shrink = torch.where(
        dist > radius, radius.clamp_min(0) / dist.clamp_min(1e-300), torch.ones_like(dist)
    )
    V = centre + off * shrink
    if a <= 0 <= b:  # v_i = 0 is always feasible: use it where rounding leaves no room
        V = torch.where(radius > 0, V, torch.zeros_like(V))
    elif bool((radius <= 0).any()):
        raise LipganError("lipsdp_dual_bound: F1 too close to the null space of W0 for a proof")
    return (W1 @ V).square().sum()


def lipsdp_dual_ascent(
    W0: torch.Tensor,
    W1: torch.Tensor,
    slope: tuple[float, float] = (0.0, 1.0),
    rank: int = 16,
    steps: int = 1500,
    lr: float = 0.02,
    seed: int = 0,
) -> float:
    """A certified lower bound on the LipSDP-Neuron value by ascent on the dual (reference only).

    Burer-Monteiro: ``Z = F F^T`` with F of ``rank`` columns, Adam on F for ``steps`` steps
    maximizing :func:`lipsdp_dual_bound`'s ``||W1 V||_F^2``; every F gives a valid lower bound
    (weak duality), so however the ascent ends, the best value seen is one. Independent of
    :func:`lipsdp_neuron` (primal side): together they bracket the SDP optimum.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small products: a second thread only spins
    try:
        return _dual_ascent(W0, W1, slope, rank, steps, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _dual_ascent(W0, W1, slope, rank, steps, lr, seed) -> float:
    W0d, W1d = W0.detach().double(), W1.detach().double()
    gen = torch.Generator().manual_seed(seed)
    h, n = W0d.shape
    # start near the top right singular vectors of W1 W0 (a rank-k slice of the linear bound)
    _, _, Vt = torch.linalg.svd(W1d @ W0d, full_matrices=False)
    k = min(rank, n)
    X = Vt[:k].t().clone() if Vt.shape[0] >= k else torch.randn(n, k, generator=gen)
    X = X + 1e-3 * torch.randn(n, k, generator=gen, dtype=torch.float64)
    F1 = X.clone().requires_grad_(True)
    F2 = (0.5 * (slope[0] + slope[1]) * (W0d @ X)).clone().requires_grad_(True)
    opt = torch.optim.Adam([F1, F2], lr=lr)
    best = 0.0
    for _ in range(steps):
        val = _dual_value(W0d, W1d, F1, F2, slope)
        best = max(best, lipsdp_dual_bound(W0d, W1d, F1, F2, slope))
        opt.zero_grad()
        (-val.log()).backward()
        opt.step()
    return max(best, lipsdp_dual_bound(W0d, W1d, F1, F2, slope))
