"""The ``"chol"`` bound of a zero-padded conv: its Gram matrix on the smaller side, certified by one
Cholesky factorization (``iteration.cholesky_max_eig``).

The Gram matrix is assembled from the tap products ``W_t W_t'^T`` (or ``W_t^T W_t'``) that all
positions share, with a bound of its rounding error, so the certificate covers the exact Gram.
"""

from __future__ import annotations

import math

import torch

from lipgan.analysis.convmap import ConvGeometry, one_thread, outer_threads
from lipgan.analysis.iteration import cholesky_max_eig

__all__ = ["CHOL_LIMIT", "conv_grams", "cholesky_bound"]

#: the Cholesky certificate runs where the smaller side of each group's operator has at most this
#: many entries (one float64 Cholesky of 4096 takes ~1.4 CPU s; 6272 ~4.3 s)
CHOL_LIMIT = 4096


def conv_grams(geom: ConvGeometry, limit: int, max_entries: int = 2**25):
    """Per group: ``(G, delta)``, the Gram matrix of a zero-padded conv on its smaller side and a
    bound of its rounding error ``||G - G_exact||_2``; None when a side or the tap products are
    too large.

    A valid read (output p, tap t, input x = s p + d t - lo) puts ``W_t`` at block (p, x) of A, so
    ``(A A^T)[p, p'] = sum_{t, t' reading one x} W_t W_t'^T`` (and ``(A^T A)[x, x'] = sum over
    reads from one p of W_t^T W_t'``): a sparse count matrix times the distinct tap products.
    """
    w = geom.weight
    d = len(geom.stride)
    co, cig = w.shape[:2]
    cog = co // geom.groups
    out, k, sp = geom.out_spatial, w.shape[2:], geom.in_shape[1:]
    L, K, X = math.prod(out), math.prod(k), math.prod(sp)
    if min(cog * L, cig * X) > limit:
        return None
    xf, ok = torch.zeros((), dtype=torch.long), torch.ones((), dtype=torch.bool)
    for ax in range(d):
        xa = (
            geom.stride[ax] * torch.arange(out[ax])[:, None]
            + geom.dilation[ax] * torch.arange(k[ax])[None, :]
            - geom.pads[ax][0]
        )
        shape = [1] * (2 * d)
        shape[ax], shape[d + ax] = out[ax], k[ax]
        xa = xa.reshape(shape)
        ok = ok & (xa >= 0) & (xa < sp[ax])
        xf = xf * sp[ax] + xa
    ok, xf = ok.expand(*out, *k).reshape(L, K), xf.expand(*out, *k).reshape(L, K)
    pi, ti = torch.nonzero(ok, as_tuple=True)
    xi = xf[pi, ti]
    out_side = cog * L <= cig * X
    shared, other, n_o = (xi, pi, L) if out_side else (pi, xi, X)
    c = cog if out_side else cig
    # the reads of each shared index, padded with -1, and all their pairs
    order = torch.argsort(shared, stable=True)
    counts = torch.bincount(shared, minlength=int(shared.max()) + 1 if len(shared) else 1)
    start = torch.cumsum(counts, 0) - counts
    R = torch.full((counts.numel(), max(int(counts.max()), 1)), -1, dtype=torch.long)
    R[shared[order], torch.arange(len(order)) - start[shared[order]]] = order
    a, b = R[:, :, None].expand(-1, -1, R.shape[1]), R[:, None, :].expand(-1, R.shape[1], -1)
    keep = (a >= 0) & (b >= 0)
    i1, i2 = a[keep], b[keep]
    # G is symmetric and the Cholesky reads its lower triangle only: the blocks (o1, o2) with
    # o1 >= o2 suffice (about half the tap products and half the product below)
    lower = other[i1] >= other[i2]
    i1, i2 = i1[lower], i2[lower]
    taps, inv = torch.unique(ti[i1] * K + ti[i2], return_inverse=True)
    if taps.numel() * c * c > max_entries:
        return None
    blocks, brow = torch.unique(other[i1] * n_o + other[i2], return_inverse=True)
    n_b, n_t = blocks.numel(), taps.numel()
    if n_b * n_t <= 2**24:  # a dense count matrix: BLAS beats torch's sparse product
        C = torch.zeros(n_b, n_t, dtype=torch.float64)
        C.index_put_((brow, inv), torch.ones(len(i1), dtype=torch.float64), accumulate=True)
    else:
        C = torch.sparse_coo_tensor(
            torch.stack([brow, inv]), torch.ones(len(i1), dtype=torch.float64),
            (n_b, n_t), check_invariants=True,
        ).coalesce()  # fmt: skip
    bi, bj = blocks // n_o, blocks % n_o
    inner = cig * X if out_side else cog * L  # products summed into one entry, at most
    result = []
    for g in range(geom.groups):
        Wt = w[g * cog : (g + 1) * cog].reshape(cog, cig, K).permute(2, 0, 1)
        if not out_side:
            Wt = Wt.mT
        P = Wt[taps // K] @ Wt[taps % K].mT  # (taps, c, c)
        P = P.reshape(n_t, c * c)
        Gb = C @ P if C.layout == torch.strided else torch.sparse.mm(C, P)
        G = torch.zeros(n_o * c, n_o * c, dtype=torch.float64)  # blocks no read links stay 0
        G4, Gb3 = G.view(n_o, c, n_o, c).transpose(1, 2), Gb.view(n_b, c, c)
        G4[bi, bj] = Gb3  # the lower blocks, then their mirror images
        off = bi != bj
        G4[bj[off], bi[off]] = Gb3[off].mT
        # |fl(G) - G| <= gamma_m |A| |A|^T entrywise (any summation order), so its 2-norm is at
        # most gamma_m ||A||_F^2, and ||A||_F^2 = sum over reads of ||W_t||_F^2; ten times that
        fro = float(Wt.square().sum((1, 2))[ti].sum()) * 1.01
        m = inner + 2
        # G is symmetric up to rounding; the Cholesky reads its lower triangle only
        result.append((G, 10 * m * 2.0**-53 / (1 - m * 2.0**-53) * fro))
    return result


def cholesky_bound(geom: ConvGeometry, limit: int = CHOL_LIMIT) -> float | None:
    """The ``"chol"`` bound of a zero-padded conv (max over groups), or None."""
    with one_thread():  # many small products; the Cholesky below may use every thread
        grams = conv_grams(geom, limit)
    if grams is None:
        return None
    best = 0.0
    for G, delta in grams:
        if G.shape[0] <= 2048:  # small: one thread is faster than two
            with one_thread():
                t = cholesky_max_eig(G, delta)
        else:  # one large factorization: the caller's threads (BLAS 3 scales)
            with outer_threads():
                t = cholesky_max_eig(G, delta)
        if t is None:
            return None
        best = max(best, t)
    return math.sqrt(best)

