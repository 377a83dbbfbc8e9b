"""Certified ``lambda_max`` of a symmetric positive semidefinite matrix by one Cholesky
factorization: a dense matrix, or a block-banded one stored as its band.

A Cholesky of ``t I - G`` that runs to completion proves ``lambda_max(G) <= t`` once the rounding
of the factorization is covered: the computed factor satisfies ``L L^T = B + E`` with
``|E| <= gamma_{n+1} |L| |L^T|`` (Demmel 1989; Higham, Accuracy and Stability of Numerical
Algorithms, Thm 10.3). The bound holds for every order in which the sums
``b_ij - sum_k l_ik l_jk`` are accumulated, so it covers LAPACK's blocked ``potrf`` and the
block-banded factorization below (the same sums, grouped by blocks; the entries outside the band
are exact zeros of L). The estimate ``t`` comes from Lanczos (from below); a miss only costs a
retry with a larger step.

- :func:`cholesky_certifies` / :func:`cholesky_max_eig`: a dense ``G`` (its lower triangle);
  :func:`certified_max_eig`: the tries of larger ``t``, for either.
- :func:`banded_cholesky_certifies`: ``G`` with ``N x N`` blocks of
  size m of which only ``|i - j| <= b`` are nonzero, stored as ``band[i, d] = G_{i, i-d}``. The
  factor keeps the band, so the work is about ``N m^3 (1/3 + b + b (b + 1))`` flops instead of
  ``(N m)^3 / 3``: the Gram matrix of a zero-padded conv, ordered by its first spatial axis, is
  banded (outputs more than ``(k - 1) d / s`` rows apart read no common input).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "cholesky_margin",
    "cholesky_certifies",
    "cholesky_max_eig",
    "lanczos_estimate",
    "banded_cholesky_certifies",
    "certified_max_eig",
    "band_work",
]

_U = 2.0**-53  # unit roundoff of float64


def _gamma(m: int) -> float:
    return m * _U / (1 - m * _U)


def cholesky_margin(n: int, t: float, diag_sum: float, diag_max: float, delta: float) -> float:
    """The shift ``c``: factoring ``B = fl((t - c) I - G)`` proves ``lambda_max(G') <= t``.

    ``||E||_2 <= gamma_{n+1} ||L||_F^2 <= gamma_{n+1} tr(B) / (1 - gamma_{n+1})`` and ``B >= -||E||
    I``, so ``t I - G' >= (c - ||E|| - ||D|| - u |t| - delta) I`` where D is the rounding of the
    diagonal ``t - c - G_ii`` and ``delta >= ||G' - G||_2``. ``c`` covers those terms, ``||E||``
    ten times. ``diag_sum`` / ``diag_max``: the sum and the largest of ``|G_ii|``.
    """
    tr = 1.01 * (n * abs(t) + diag_sum)
    g = _gamma(n + 1)
    return delta + 10 * g * tr / (1 - g) + 4 * _U * (abs(t) + diag_max) + n * 1e-300


def cholesky_certifies(
    G: torch.Tensor, t: float, delta: float = 0.0, overwrite: bool = False
) -> bool:
    """Whether a float64 Cholesky proves ``lambda_max(G') <= t`` for every symmetric ``G'`` with
    ``||G' - G||_2 <= delta`` (``G``: (n, n) float64 symmetric, e.g. a computed Gram matrix).

    Factors ``B = fl((t - c) I - G)`` with ``c`` of :func:`cholesky_margin`. Only G's lower
    triangle is read (LAPACK's potrf), so G may be symmetric up to rounding, or hold anything
    above its diagonal. ``overwrite``: factor in G's own storage (G is lost; saves a copy).
    """
    G = G.to(torch.float64)
    n = G.shape[-1]
    if n == 0:
        return t >= 0
    diag = G.diagonal().abs()
    c = cholesky_margin(n, t, float(diag.sum()), float(diag.max()), delta)
    B = G.neg_() if overwrite else -G
    B.diagonal().add_(t - c)
    info = torch.zeros((), dtype=torch.int32)
    torch.linalg.cholesky_ex(B, out=(B, info))  # in place: no second n x n buffer
    return bool(info == 0) and bool(torch.isfinite(B.diagonal()).all())


def lanczos_estimate(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor) -> float:
    """A Lanczos estimate of lambda_max from below (float32 products: only an estimate), to be
    certified by a Cholesky. ``v0``: the start vector, in the shape ``matvec`` takes."""
    from lipgan.analysis.iteration import lanczos_extreme

    # one Krylov space of 40: within ~2e-4 of lambda_max on the dcgan28 convs (a restart costs
    # more than the Cholesky it would save); a miss only costs a retry at the next step
    lam, _ = lanczos_extreme(matvec, v0, n_iter=40, tol=1e-7, krylov=40)
    return max(lam, 0.0)


def certified_max_eig(
    build: Callable[[], torch.Tensor],
    certifies: Callable[[torch.Tensor, float, float], bool],
    estimate: float,
    delta: float = 0.0,
    steps: Sequence[float] = (1e-3, 1e-2, 1e-1),
) -> float | None:
    """The first ``t = estimate (1 + step) + 2 delta`` that ``certifies(build(), t, delta)``, else
    None. ``build`` makes the matrix afresh for each try, so ``certifies`` may overwrite it."""
    floor = 2 * delta + 1e-300
    for step in steps:
        t = max(estimate, 0.0) * (1 + step) + floor
        if certifies(build(), t, delta):
            return t
    return None


def cholesky_max_eig(
    G: torch.Tensor,
    delta: float = 0.0,
    steps: Sequence[float] = (1e-3, 1e-2, 1e-1),
    seed: int = 0,
    estimate: float | None = None,
) -> float | None:
    """Certified ``t >= lambda_max(G')`` for every symmetric ``G'`` within ``delta`` of ``G``.

    An estimate ``lam`` of ``lambda_max(G)`` (``estimate``, else Lanczos on G in float32), then
    the first ``t = lam (1 + step) + 2 delta`` that :func:`cholesky_certifies`; None when none
    does. G: (n, n) float64 symmetric (with ``estimate`` given, only its lower triangle is read).
    """
    G = G.to(torch.float64)
    n = G.shape[-1]
    if n == 0:
        return 0.0
    if estimate is None:
        G32 = G.to(torch.float32)  # symmetric up to rounding: fine for an estimate
        gen = torch.Generator().manual_seed(seed)
        v0 = torch.randn(n, generator=gen, dtype=torch.float64).float()
        estimate = lanczos_estimate(lambda v: G32 @ v, v0)
    return certified_max_eig(lambda: G, cholesky_certifies, estimate, delta, steps)


def band_work(n_blocks: int, width: int, m: int) -> float:
    """Flops of :func:`banded_cholesky_certifies`: ``n_blocks`` blocks of size m, band ``width``."""
    total = 0.0
    for k in range(n_blocks):
        nb = min(width, n_blocks - 1 - k)
        total += m**3 * (1 / 3 + nb + nb * (nb + 1))
    return total


def banded_cholesky_certifies(
    band: torch.Tensor, t: float, delta: float = 0.0, overwrite: bool = False
) -> bool:
    """:func:`cholesky_certifies` for a block-banded ``G``: ``band`` (N, b + 1, m, m) float64 with
    ``band[i, d] = G_{i, i-d}`` (``d <= i``; the blocks above the diagonal are their transposes,
    the diagonal blocks are read in their lower triangle only, entries ``d > i`` are ignored).

    A right-looking block Cholesky of ``(t - c) I - G`` that keeps the band: per block row k the
    diagonal block's factor, the panel below it by one triangular solve, and the update of the
    trailing blocks in the band. ``c``: :func:`cholesky_margin` of the whole ``n = N m``.
    ``overwrite``: factor in the band's own storage.
    """
    N, w, m, _ = band.shape
    b = w - 1
    n = N * m
    if n == 0:
        return t >= 0
    diag = torch.stack([band[k, 0].diagonal() for k in range(N)]).abs()
    c = cholesky_margin(n, t, float(diag.sum()), float(diag.max()), delta)
    A = band.neg_() if overwrite else band.neg()
    for k in range(N):
        A[k, 0].diagonal().add_(t - c)
    for k in range(N):
        L, info = torch.linalg.cholesky_ex(A[k, 0])
        if info != 0 or not bool(torch.isfinite(L.diagonal()).all()):
            return False
        nb = min(b, N - 1 - k)
        if nb == 0:
            continue
        panel = torch.cat([A[k + d, d] for d in range(1, nb + 1)])  # the blocks below (k, k)
        P = torch.linalg.solve_triangular(L.mT, panel, upper=True, left=False).view(nb, m, m)
        for di in range(1, nb + 1):
            for dj in range(1, di + 1):  # block (k + di, k + dj) of the trailing matrix
                A[k + di, di - dj].addmm_(P[di - 1], P[dj - 1].mT, alpha=-1)
    return True
