"""Certified ``lambda_max`` of a symmetric positive semidefinite matrix by one Cholesky
factorization: a dense matrix in float64, or a block-sparse one in float32.

A Cholesky of ``t I - G`` that runs to completion proves ``lambda_max(G) <= t`` once the rounding
of the factorization is covered: the computed factor satisfies ``L L^T = B + E`` with
``|E| <= gamma_h |L| |L^T|`` (Demmel 1989; Higham, Accuracy and Stability of Numerical
Algorithms, Thm 10.3), h the height of the summation trees, at most n + 1. The bound holds for
every order in which the sums ``b_ij - sum_k l_ik l_jk`` are accumulated, so it covers LAPACK's
blocked ``potrf`` and the block-sparse factorization below (the same sums, grouped by blocks; the
blocks outside the pattern are exact zeros of L). It assumes conventional BLAS (no Strassen, no
explicit inverses in the triangular solves), as Rump's verification of positive definiteness does.
The estimate ``t`` comes from Lanczos (from below); a miss only costs a retry with a larger step.

- :func:`cholesky_certifies` / :func:`cholesky_max_eig`: a dense ``G`` (its lower triangle), in
  float64 with the a-priori margin of :func:`cholesky_margin`;
  :func:`certified_max_eig`: the tries of larger ``t``, for either certificate.
- :func:`sparse_cholesky_bound`: ``G`` as blocks of a :class:`BlockPattern` (nodes of one size m,
  eliminated in the minimum-degree order of :func:`min_degree_pattern`), factored in float32 with
  the summation depth kept to ``2 m + N + 3`` and the margin ``gamma_h ||  |L| |L|^T ||`` bounded
  after the factorization: the Gram matrix of a zero-padded conv is block-sparse (positions more
  than ``(k - 1) d / s`` apart read no common input), and float32 BLAS 3 runs twice as fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "cholesky_margin",
    "cholesky_certifies",
    "cholesky_max_eig",
    "lanczos_estimate",
    "certified_max_eig",
    "dense_cholesky_bound",
    "BlockPattern",
    "min_degree_pattern",
    "sparse_cholesky_bound",
    "factor_margin",
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
    build: Callable[[], object],
    bound: Callable[[object, float, float], float | None],
    estimate: float,
    delta: float = 0.0,
    steps: Sequence[float] = (1e-3, 1e-2, 1e-1),
) -> float | None:
    """The first certified bound ``bound(build(), t, delta)`` (a float, or None when the
    factorization at ``t`` fails) over ``t = estimate (1 + step) + 2 delta``, else None.
    ``build`` makes the matrix afresh for each try, so ``bound`` may overwrite it."""
    floor = 2 * delta + 1e-300
    for step in steps:
        t = max(estimate, 0.0) * (1 + step) + floor
        out = bound(build(), t, delta)
        if out is not None:
            return out
    return None


def dense_cholesky_bound(
    G: torch.Tensor, t: float, delta: float = 0.0, overwrite: bool = False
) -> float | None:
    """:func:`cholesky_certifies` as a bound for :func:`certified_max_eig`: t, or None."""
    return t if cholesky_certifies(G, t, delta, overwrite) else None


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
    return certified_max_eig(lambda: G, dense_cholesky_bound, estimate, delta, steps)


_U32 = 2.0**-24  # unit roundoff of float32


@dataclass
class BlockPattern:
    """The block structure of a sparse Cholesky factor: ``N`` nodes (blocks of one size m) in
    elimination order, and per position k the later positions ``cols[k]`` whose block ``(r, k)``
    of L is nonzero (the graph's edges and their fill). ``slot[(r, k)]`` (``r >= k``) numbers the
    stored blocks, the diagonal ones included."""

    order: list[int]  # elimination position -> node
    cols: list[list[int]]
    slot: dict[tuple[int, int], int]

    @property
    def position(self) -> dict[int, int]:
        return {node: k for k, node in enumerate(self.order)}

    def work(self, m: int) -> float:
        """Flops of :func:`sparse_cholesky_bound` on blocks of size m."""
        return float(sum(m**3 * (1 / 3 + len(c) + len(c) * (len(c) + 1)) for c in self.cols))


def min_degree_pattern(adjacency: Sequence[set[int]]) -> BlockPattern:
    """:class:`BlockPattern` of a symmetric block graph (``adjacency[i]``: the nodes whose block
    with i is nonzero) under the minimum-degree order (ties by node index; George & Liu 1989):
    eliminating a node joins its remaining neighbours, the fill of the factor. The order only
    moves work around; every order gives the same certificate's soundness."""
    nb = [set(a) - {i} for i, a in enumerate(adjacency)]
    alive = set(range(len(nb)))
    order, reach = [], []
    while alive:
        v = min(alive, key=lambda u: (len(nb[u]), u))
        order.append(v)
        reach.append(nb[v])
        for a in nb[v]:
            nb[a] |= nb[v]
            nb[a] -= {a, v}
        alive.remove(v)
    pos = {node: k for k, node in enumerate(order)}
    cols = [sorted(pos[u] for u in r) for r in reach]
    slot: dict[tuple[int, int], int] = {}
    for k, rows in enumerate(cols):
        slot[(k, k)] = len(slot)
        for r in rows:
            slot[(r, k)] = len(slot)
    return BlockPattern(order, cols, slot)


def _abs_gram_radius(A: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, iters: int) -> float:
    """An upper bound of ``rho(|L| |L|^T)`` for the block-sparse L stored in A (float32 blocks,
    ``A[i] = |L[rows[i], cols[i]]|^T``): Collatz-Wielandt, ``max_i (M v)_i /
    v_i`` for the positive v of a few power steps from ones, with the float32 rounding of the
    nonnegative sums covered."""
    n_nodes = int(max(rows.max(), cols.max())) + 1
    m = A.shape[-1]

    def prod(x: torch.Tensor) -> torch.Tensor:  # |L| (|L|^T x), block i of A = |L[r, k]|^T
        y = torch.bmm(A, x[rows].unsqueeze(-1))[..., 0]
        y = torch.zeros_like(x).index_add_(0, cols, y)
        z = torch.bmm(A.mT, y[cols].unsqueeze(-1))[..., 0]
        return torch.zeros_like(x).index_add_(0, rows, z)

    v = torch.ones(n_nodes, m, dtype=A.dtype)
    for _ in range(iters):
        w = prod(v)
        v = w / w.max()
        v.clamp_min_(torch.finfo(A.dtype).tiny ** 0.5)  # positive, so the ratio below is a bound
    w = prod(v)
    depth = 2 * (n_nodes * m + 2)  # nonnegative terms: each rounded <= depth times
    return float((w / v).max()) * (1 + 2 * _U32) / (1 - _gamma32(depth))


def _gamma32(k: int) -> float:
    return k * _U32 / (1 - k * _U32)


def sparse_cholesky_bound(
    A: torch.Tensor,
    pattern: BlockPattern,
    s: float,
    delta: float = 0.0,
    gram_fro: float | None = None,
    iters: int = 1,
) -> float | None:
    """Certified ``t >= lambda_max(G')`` for every symmetric ``G'`` within ``delta`` of G, from one
    float32 block-sparse Cholesky of ``s I - G``; None when the factorization breaks down.

    ``A``: (n_slots, m, m) float32, slot ``pattern.slot[(r, k)]`` (elimination positions
    ``r >= k``) holding G's block ``G[k, r] = G[r, k]^T``, the diagonal blocks whole and
    symmetric, the fill blocks zero. It is overwritten (the factor's blocks ``L[r, k]^T``, so that
    every update is one contiguous product; then their absolute values). ``gram_fro``: a bound of
    ``||G||_F`` (else from A). ``iters``: power steps before the Collatz-Wielandt bound.

    The factor satisfies ``L L^T = B + E`` with ``B = fl(s I - G)`` and ``|E| <= gamma_h |L| |L|^T``
    where h bounds the roundings any term of an entry goes through: the products of one update
    are a fresh GEMM of inner size m (<= m roundings), subtracted once into the entry (one each,
    <= N updates), and the node's own potrf / triangular solve adds <= m + 2 (the entry as one
    leaf, its division and root), so ``h = 2 m + N + 3`` (Higham, Accuracy and Stability of
    Numerical Algorithms, Sec. 3.1 and Thm 10.3: the bound depends on the height of the summation
    tree only). Then ``s I - G >= -(||E|| + ||B - (s I - G)||) I``, so ``lambda_max(G') <= s +
    gamma_h rho(|L| |L|^T) + 2.1 u (||G||_F + s) + delta``, a bound a posteriori.
    """
    if gram_fro is None:  # ||G||_F <= sqrt(2) ||stored blocks||_F, in float64
        gram_fro = math.sqrt(2.0) * float(torch.linalg.vector_norm(A, dtype=torch.float64))
    fro = gram_fro * (1 + 2 * _U32)  # of the float32 G (stored) from the float64 one
    if not _factor(A, pattern, s):
        return None
    return s + factor_margin(A, pattern, iters) + 2.1 * _U32 * (fro + abs(s)) + delta


def _factor(A: torch.Tensor, pattern: BlockPattern, s: float) -> bool:
    """The block Cholesky of ``fl(s I - G)`` in A's slots (see :func:`sparse_cholesky_bound`):
    afterwards slot (r, k) holds ``L[r, k]^T``. False where a pivot is not positive."""
    m = A.shape[-1]
    N = len(pattern.order)
    A.neg_()
    diag = torch.tensor([pattern.slot[(k, k)] for k in range(N)])
    A[diag] += torch.eye(m, dtype=A.dtype) * s  # = A[diag].diagonal() + s, rounded once
    for k in range(N):
        d = A[diag[k]]
        L, info = torch.linalg.cholesky_ex(d)
        if info != 0 or not bool(torch.isfinite(L.diagonal()).all()):
            return False
        d.copy_(L.mT)  # stored as L^T, like the blocks below it
        rows = pattern.cols[k]
        if not rows:
            continue
        R = len(rows)
        idx = torch.tensor([pattern.slot[(r, k)] for r in rows])
        panel = A[idx].mT.reshape(R * m, m)  # the blocks G[r, k] below the diagonal, stacked
        P = torch.linalg.solve_triangular(L.mT, panel, upper=True, left=False)  # P L^T = panel
        A[idx] = P.view(R, m, m).mT  # L[r, k]^T
        for i, r in enumerate(rows):  # G[r_i, r_j] -= L[r_i, k] L[r_j, k]^T, j <= i, stored ^T
            U = torch.mm(P[: (i + 1) * m], P[i * m : (i + 1) * m].mT)  # a fresh product
            tgt = torch.tensor([pattern.slot[(r, rows[j])] for j in range(i + 1)])
            A.index_add_(0, tgt, U.view(i + 1, m, m), alpha=-1)
    return True


def factor_margin(A: torch.Tensor, pattern: BlockPattern, iters: int = 1) -> float:
    """``gamma_h rho(|L| |L|^T) >= ||L L^T - fl(s I - G)||_2`` for the factor :func:`_factor`
    left in A (``h = 2 m + N + 3``); A is overwritten by its absolute values."""
    m = A.shape[-1]
    N = len(pattern.order)
    r_idx = torch.tensor([r for (r, _k) in pattern.slot])
    c_idx = torch.tensor([k for (_r, k) in pattern.slot])
    A.abs_()
    rho = _abs_gram_radius(A, r_idx, c_idx, iters)
    return _gamma32(2 * m + N + 3) * rho
