"""The iterations behind lipgan's operator norms and Hessian extremes.

- :func:`lanczos_extreme`: restarted Lanczos with full reorthogonalization for an extreme
  eigenpair of a symmetric operator; it stops at *breakdown*, judged against the operator's scale
  (the largest ``||M v_j||`` seen so far), not against the current diagonal entry, so a Krylov
  space that has exhausted a rank-deficient operator is recognised as invariant and T keeps
  representing the operator (Paige 1971; Golub & Van Loan, Matrix Computations, sec. 10.1).
- :func:`power_extreme`: plain power iteration (the eigenvalue of largest magnitude).
- :func:`top_singular_value`: the attained value ``||A y|| / ||y|| <= ||A||`` of a batched linear
  map by Lanczos on the smaller of ``A^T A`` and ``A A^T``.
- :func:`gram_iteration_bound`: certified upper bounds of spectral norms by Gram iteration
  (Delattre et al. 2023), squaring on the smaller side.
- :func:`symmetric_max_eig`: the largest eigenvalue of a dense symmetric matrix with a margin
  that covers the rounding of a backward-stable eigensolver, so it can serve as a certified bound.
- :func:`cholesky_max_eig` (from :mod:`lipgan.analysis.certify`): a certified ``lambda_max``
  within ``1e-3`` of the truth for a dense symmetric matrix: Lanczos from below, then one
  Cholesky of ``t I - G`` with a rounding margin (about 4x cheaper than an eigensolver).

Every stopping rule is an iteration count or a tolerance: results depend on the inputs only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lipgan.errors import LipganError

__all__ = [
    "lanczos_extreme",
    "power_extreme",
    "top_singular_value",
    "gram_iteration_bound",
    "symmetric_max_eig",
    "dense_operator_norm",
    "cholesky_certifies",
    "cholesky_max_eig",
    "BREAKDOWN",
]

#: relative size of a Lanczos beta (against the running estimate of ||M||) taken as breakdown:
#: after full reorthogonalization the rounding left in w is ~1e-15 ||M||, far below this.
BREAKDOWN = 1e-10

#: a symmetric (or any linear) operator given by its product with a vector
MatVec = Callable[[torch.Tensor], torch.Tensor]


def lanczos_extreme(
    matvec: MatVec,
    v0: torch.Tensor,
    n_iter: int = 300,
    tol: float = 1e-10,
    which: str = "largest",
    krylov: int = 60,
) -> tuple[float, torch.Tensor]:
    """Extreme eigenpair of a symmetric operator M by restarted Lanczos (full reorthogonalization).

    ``matvec(x)``: x of v0's shape -> M x, same shape; ``v0``: start vector (any shape).
    Builds Krylov spaces of up to ``krylov`` vectors, restarts from the best Ritz vector, and stops
    when the Ritz residual ``||M y - theta y|| <= tol * scale`` (scale = the largest ``||M v_j||``
    seen, an estimate of ||M|| from below), after ``n_iter`` products, or at breakdown
    (``beta_j <= BREAKDOWN * scale``: the space is invariant and its Ritz values are eigenvalues).
    Ritz values lie inside the spectrum: ``"largest"`` approaches lambda_max from below.
    Returns ``(theta, y)`` with y a unit vector of v0's shape.
    """
    if which not in ("largest", "smallest"):
        raise LipganError(f"which must be 'largest' or 'smallest', got {which!r}")
    shape = v0.shape
    y = v0.detach().reshape(-1).clone()
    norm0 = float(y.norm())
    if not math.isfinite(norm0) or norm0 == 0.0:
        raise LipganError("lanczos_extreme: the start vector is zero or not finite")
    y = y / norm0
    used = 0
    theta = float("nan")
    scale = 0.0
    # breakdown relative to the rounding of y's dtype too: float32 leaves ~1e-7 ||M|| in w
    eps = torch.finfo(y.dtype).eps if y.is_floating_point() else 0.0
    breakdown = max(BREAKDOWN, 100 * eps)
    while used < n_iter:
        # no Krylov space is larger than the space itself: its next vector would be rounding
        m = max(1, min(krylov, n_iter - used, y.numel()))
        V = [y]
        alphas: list[float] = []
        betas: list[float] = []
        broke = False
        for j in range(m):
            w = matvec(V[j].reshape(shape)).detach().reshape(-1).to(y.dtype)
            used += 1
            scale = max(scale, float(w.norm()))
            a = float(w @ V[j])
            alphas.append(a)
            Q = torch.stack(V)
            for _ in range(2):  # twice: once is not enough in floating point
                w = w - Q.t() @ (Q @ w)
            b = float(w.norm())
            betas.append(b)
            if b <= breakdown * scale:
                broke = True
                break
            if j == m - 1:
                break
            V.append(w / b)
        k = len(alphas)
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if k > 1:
            off = torch.tensor(betas[: k - 1], dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        idx = -1 if which == "largest" else 0
        theta = float(evals[idx])
        s = evecs[:, idx].to(y.dtype)
        y = (torch.stack(V[:k]).t() @ s).reshape(-1)
        y = y / y.norm().clamp_min(1e-300)
        if scale == 0.0:  # M v0 = 0: M may be the zero operator; theta = 0 is attained
            break
        residual = 0.0 if broke else abs(betas[k - 1] * float(s[-1]))
        if broke or residual <= tol * scale:
            break
    return theta, y.reshape(shape)


def power_extreme(
    matvec: MatVec,
    v: torch.Tensor,
    n_iter: int,
    tol: float,
    shift: float = 0.0,
) -> tuple[float, torch.Tensor]:
    """Power iteration on ``M - shift I``: its eigenvalue of largest magnitude and the vector.

    Stops when the Rayleigh quotient changes by at most ``tol`` relatively, or after ``n_iter``
    products. ``v``: a flat start vector.
    """
    v = v / v.norm()
    lam = 0.0
    for _ in range(n_iter):
        w = matvec(v) - shift * v
        new = float(v @ w)
        nw = w.norm()
        if float(nw) == 0:
            return 0.0, v
        v = w / nw
        if abs(new - lam) <= tol * max(abs(new), 1e-30):
            lam = new
            break
        lam = new
    return lam, v


def top_singular_value(
    f: Callable[[torch.Tensor], torch.Tensor],
    in_shape: Sequence[int],
    n_iter: int = 300,
    tol: float = 1e-9,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    krylov: int = 40,
) -> tuple[float, torch.Tensor]:
    """An attained value ``||A y|| / ||y||`` (<= ||A||, and close to it) of a linear map.

    ``f``: the map on batched inputs ``(B, *in_shape) -> (B, ...)``, linear (no bias). Lanczos on
    the smaller of ``A^T A`` (input side) and ``A A^T`` (output side; ``A^T`` by a vector-Jacobian
    product), so a rank-deficient operator with few outputs runs on those. Deterministic (seeded).
    Returns ``(sigma, x)`` with x the input-space unit vector (shape ``(1, *in_shape)``) it attains.
    """
    shape = (1, *(int(s) for s in in_shape))
    x0 = torch.zeros(shape, dtype=dtype)
    with torch.enable_grad():
        out, vjp_fn = torch.func.vjp(f, x0)
    n_in, n_out = x0.numel(), out.numel()
    gen = torch.Generator().manual_seed(seed)

    def adj(y: torch.Tensor) -> torch.Tensor:
        return vjp_fn(y.reshape(out.shape).to(dtype))[0]

    with torch.no_grad():
        if n_in == 0 or n_out == 0:
            return 0.0, x0
        if n_out < n_in:
            y0 = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
            _, y = lanczos_extreme(lambda v: f(adj(v)), y0, n_iter, tol, "largest", krylov)
            x = adj(y)
        else:
            v0 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            _, x = lanczos_extreme(lambda v: adj(f(v)), v0, n_iter, tol, "largest", krylov)
        nx = float(x.norm())
        if nx == 0.0:
            return 0.0, x0
        x = x / nx
        return float(f(x).norm()), x.detach()


def gram_iteration_bound(mats: torch.Tensor, n_iter: int = 10, prune: bool = False) -> torch.Tensor:
    """Upper bounds of the spectral norms of a batch of matrices (..., m, n) by Gram iteration.

    ``G_0 = W``, ``G_1 = W W^H`` (the smaller side: min(m, n) x min(m, n)), ``G_{t+1} = G_t^2``:
    ``sigma(W)^(2^t) = sigma(G_t) <= ||G_t||_F``, so ``sigma(W) <= ||G_t||_F^(1/2^t)``, which
    decreases to sigma (Delattre et al. 2023); also
    ``sigma(W) >= (||G_t||_F / sqrt(rank))^(1/2^t)``.
    Each step is rescaled, the scale kept in logs, so nothing overflows. With ``prune`` only the
    batch maximum is wanted: matrices whose upper bound falls below another's lower bound stop
    iterating (their entry keeps its last, still valid, bound). Returns shape (...,), float64.
    """
    G = mats.to(torch.complex128 if mats.is_complex() else torch.float64)
    if G.shape[-2] > G.shape[-1]:
        G = G.mT.conj()  # same singular values; G G^H is then the smaller Gram matrix
    batch = G.shape[:-2]
    G = G.reshape(-1, *G.shape[-2:])
    rank = min(G.shape[-2:])
    log_scale = torch.zeros(G.shape[0], dtype=torch.float64, device=G.device)
    result = torch.empty(G.shape[0], dtype=torch.float64, device=G.device)
    alive = torch.arange(G.shape[0], device=G.device)
    for t in range(n_iter + 1):
        r = torch.linalg.matrix_norm(G, ord="fro").clamp_min(1e-300)
        upper = (log_scale + torch.log(r)) / (2.0**t)
        result[alive] = torch.exp(upper)
        if t == n_iter:
            break
        if prune and G.shape[0] > 1:
            lower = (log_scale + torch.log(r) - 0.5 * math.log(rank)) / (2.0**t)
            keep = upper >= lower.max()
            G, log_scale, r, alive = G[keep], log_scale[keep], r[keep], alive[keep]
        G = G / r[:, None, None].to(G.dtype)
        log_scale = 2.0 * (log_scale + torch.log(r))
        G = G @ G.mT.conj()  # (m, n) -> (m, m) at the first step, square afterwards
    return result.reshape(batch)


def symmetric_max_eig(G: torch.Tensor) -> float:
    """Certified upper bound of lambda_max of a dense symmetric (Hermitian) matrix ``G`` (n, n).

    A backward-stable eigensolver returns the exact eigenvalues of ``G + E`` with
    ``||E|| <= p(n) u ||G||``; the margin ``n * 1e-14 * ||G||_F`` (u = 1.1e-16, and p(n) = 100 n is
    generous) covers that, and the rounding in forming G, for float64 input.
    """
    G = G.to(torch.complex128 if G.is_complex() else torch.float64)
    n = G.shape[-1]
    if n == 0:
        return 0.0
    lam = float(torch.linalg.eigvalsh(G).amax())
    fro = float(torch.linalg.matrix_norm(G, ord="fro"))
    return lam + max(n, 1) * 1e-14 * fro


def dense_operator_norm(
    f: Callable[[torch.Tensor], torch.Tensor],
    in_shape: Sequence[int],
    max_entries: int = 2**21,
    dtype: torch.dtype = torch.float64,
) -> float | None:
    """Certified ``||A||_2`` of a batched linear map from its dense matrix, or None when too big.

    The matrix is built on the smaller side (``A`` on the input basis, or ``A^T`` on the output
    basis by one vector-Jacobian product over a batch), then ``lambda_max`` of the smaller Gram
    matrix (``min(n_in, n_out)`` square) with :func:`symmetric_max_eig`'s rounding margin.
    None when ``n_in * n_out > max_entries``.
    """
    shape = tuple(int(s) for s in in_shape)
    n_in = math.prod(shape)
    with torch.no_grad():
        n_out = f(torch.zeros((1, *shape), dtype=dtype)).numel()
    if n_in == 0 or n_out == 0:
        return 0.0
    if n_in * n_out > max_entries:
        return None
    if n_in <= n_out:
        with torch.no_grad():
            M = f(torch.eye(n_in, dtype=dtype).reshape(n_in, *shape)).reshape(n_in, -1)
    else:
        x0 = torch.zeros((n_out, *shape), dtype=dtype)
        with torch.enable_grad():
            out, vjp_fn = torch.func.vjp(f, x0)
        eye = torch.eye(n_out, dtype=dtype).reshape(out.shape)
        with torch.no_grad():
            M = vjp_fn(eye)[0].reshape(n_out, -1)
    G = M @ M.t()
    return math.sqrt(max(symmetric_max_eig(G), 0.0))


# the Cholesky certificates live in lipgan.analysis.certify (these names stay importable here)
from lipgan.analysis.certify import cholesky_certifies, cholesky_max_eig  # noqa: E402
