"""The ``"chol"`` bound of a zero-padded conv: its Gram matrix on the smaller side, certified by one
Cholesky factorization (:mod:`lipgan.analysis.certify`), dense or block-banded.

The Gram matrix is assembled from the tap products ``W_t W_t'^T`` (or ``W_t^T W_t'``) that all
positions share, with a bound of its rounding error, so the certificate covers the exact Gram.
Ordered by the first spatial axis of its side, that Gram matrix is block-banded: two outputs more
than ``(k - 1) d / s`` rows apart read no common input. Where the side is too large for a dense
factorization (``CHOL_LIMIT``) the band alone is factored, when its work is at most
``BAND_WORK`` flops (the dcgan28 critic's second conv at width 64: 6272 = 7 rows of 896, band 2,
about 3.3e10 flops against 8.2e10 dense).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from lipgan.analysis.certify import (
    band_work,
    banded_cholesky_certifies,
    certified_max_eig,
    cholesky_certifies,
    lanczos_estimate,
)
from lipgan.analysis.convmap import (
    ConvGeometry,
    geometry_adjoint,
    geometry_map,
    one_thread,
    outer_threads,
)

__all__ = ["CHOL_LIMIT", "BAND_WORK", "conv_grams", "cholesky_bound"]

#: the dense Cholesky certificate runs where the smaller side of each group's operator has at
#: most this many entries (one float64 Cholesky of 4096 takes ~1.3 CPU s; 6272 ~3.7 s)
CHOL_LIMIT = 4096
#: above CHOL_LIMIT, the banded certificate runs where its work is at most this many flops
BAND_WORK = 4e10


@dataclass
class _PairBlocks:
    """The nonzero blocks ``G[o1, o2]`` (o1 >= o2: the lower triangle) of each group's Gram
    matrix on its smaller side, with ``n_o`` positions of ``c`` channels (index ``o * c + ch``),
    the first spatial axis of that side of length ``rows``, and ``delta`` per group: a bound of
    the rounding error ``||G - G_exact||_2``. Block ``b`` is the sum of the tap products
    ``products[g][inv[j]]`` over the reads j with ``brow[j] == b`` (brow sorted)."""

    products: list[torch.Tensor]  # per group (n_t, c, c): the distinct tap products
    brow: torch.Tensor  # (reads,) the block of each read pair, sorted
    inv: torch.Tensor  # (reads,) its tap product
    bi: torch.Tensor  # (n_b,) position o1
    bj: torch.Tensor  # (n_b,) position o2 <= o1
    n_o: int
    c: int
    rows: int
    out_side: bool
    deltas: list[float]


def _pair_blocks(geom: ConvGeometry, max_side: int, max_entries: int = 2**25) -> _PairBlocks | None:
    """The lower blocks of the smaller side's Gram matrix (:class:`_PairBlocks`); None when that
    side has more than ``max_side`` entries or the tap products more than ``max_entries``.

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
    if min(cog * L, cig * X) > max_side:
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
    # block brow[j] sums tap product inv[j]; sorted by block, so that chunks of blocks are sums
    # over contiguous runs
    by_block = torch.argsort(brow, stable=True)
    brow, inv = brow[by_block], inv[by_block]
    inner = cig * X if out_side else cog * L  # products summed into one entry, at most
    result, deltas = [], []
    for g in range(geom.groups):
        Wt = w[g * cog : (g + 1) * cog].reshape(cog, cig, K).permute(2, 0, 1)
        if not out_side:
            Wt = Wt.mT
        with outer_threads():  # one batched product: BLAS 3 scales
            result.append(Wt[taps // K] @ Wt[taps % K].mT)  # (taps, c, c)
        # |fl(G) - G| <= gamma_m |A| |A|^T entrywise (any summation order), so its 2-norm is at
        # most gamma_m ||A||_F^2, and ||A||_F^2 = sum over reads of ||W_t||_F^2; ten times that
        fro = float(Wt.square().sum((1, 2))[ti].sum()) * 1.01
        m = inner + 2
        deltas.append(10 * m * 2.0**-53 / (1 - m * 2.0**-53) * fro)
    rows = (out if out_side else sp)[0]
    return _PairBlocks(
        result, brow, inv, blocks // n_o, blocks % n_o, n_o, c, rows, out_side, deltas
    )


def _scatter(view: torch.Tensor, pb: _PairBlocks, g: int, index, chunk: int = 2**22) -> None:
    """Write each block's sum of tap products: ``view[index(blocks)] = sums``, a chunk of blocks
    at a time: ``sums = C @ P`` with the chunk's (blocks x tap products) count matrix C, which
    streams the products once per chunk (a gather of each block's products moves several times
    more memory, and memory is what this step waits for)."""
    P = pb.products[g].reshape(len(pb.products[g]), pb.c * pb.c)
    n_t = P.shape[0]
    if n_t == 0 or len(pb.bi) == 0:  # no read is valid: the Gram matrix is 0
        return
    per = max(1, chunk // max(P.shape[1], 1))
    n_b = len(pb.bi)
    edges = torch.searchsorted(pb.brow, torch.arange(0, n_b + per, per).clamp_max(n_b)).tolist()
    sums = P.new_empty(min(per, n_b), P.shape[1])
    for k, b0 in enumerate(range(0, n_b, per)):
        b1 = min(b0 + per, n_b)
        lo, hi = edges[k], edges[k + 1]
        C = P.new_zeros(b1 - b0, n_t)
        C.index_put_((pb.brow[lo:hi] - b0, pb.inv[lo:hi]), P.new_ones(hi - lo), accumulate=True)
        part = torch.mm(C, P, out=sums[: b1 - b0])
        view[index(torch.arange(b0, b1))] = part.view(b1 - b0, pb.c, pb.c)


def _dense(pb: _PairBlocks, g: int, mirror: bool = False) -> torch.Tensor:
    """Group g's Gram matrix, dense: its lower blocks, and with ``mirror`` the upper ones."""
    n_o, c, bi, bj = pb.n_o, pb.c, pb.bi, pb.bj
    G = torch.zeros(n_o * c, n_o * c, dtype=torch.float64)  # blocks no read links stay 0
    G4 = G.view(n_o, c, n_o, c).transpose(1, 2)
    _scatter(G4, pb, g, lambda b: (bi[b], bj[b]))
    if mirror:
        off = bi != bj
        G4[bj[off], bi[off]] = G4[bi[off], bj[off]].mT
    return G


def _band(pb: _PairBlocks, g: int) -> torch.Tensor:
    """Group g's Gram matrix as its band (``certify.banded_cholesky_certifies``): block rows of
    one coordinate of the side's first spatial axis (``n_o / rows`` positions of c channels)."""
    per = pb.n_o // pb.rows
    ri, rj = pb.bi // per, pb.bj // per
    width = int((ri - rj).max()) if len(ri) else 0
    band = torch.zeros(pb.rows, width + 1, per * pb.c, per * pb.c, dtype=torch.float64)
    B6 = band.view(pb.rows, width + 1, per, pb.c, per, pb.c).transpose(3, 4)
    _scatter(B6, pb, g, lambda b: (ri[b], ri[b] - rj[b], pb.bi[b] % per, pb.bj[b] % per))
    return band


def conv_grams(geom: ConvGeometry, limit: int, max_entries: int = 2**25):
    """Per group: ``(G, delta)``, the Gram matrix of a zero-padded conv on its smaller side (dense,
    symmetric) and a bound of its rounding error ``||G - G_exact||_2``; None when a side has more
    than ``limit`` entries or the tap products more than ``max_entries``."""
    pb = _pair_blocks(geom, limit, max_entries)
    if pb is None:
        return None
    return [(_dense(pb, g, True), pb.deltas[g]) for g in range(geom.groups)]


def _gram_estimate(geom: ConvGeometry, pb: _PairBlocks, g: int, seed: int = 0) -> float:
    """Lanczos estimate of group g's lambda_max from the conv's own products in float32
    (``A A^T`` or ``A^T A`` on that group's channels): no dense matrix is needed."""
    f, ft = geometry_map(geom), geometry_adjoint(geom)
    shape = (1, pb.c * geom.groups, *geom.out_spatial) if pb.out_side else (1, *geom.in_shape)
    start = torch.zeros(shape, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    part = start[:, g * pb.c : (g + 1) * pb.c]
    part.copy_(torch.randn(part.shape, generator=gen, dtype=torch.float64).float())

    def matvec(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return f(ft(v)) if pb.out_side else ft(f(v))

    return lanczos_estimate(matvec, start)


def _side(geom: ConvGeometry) -> int:
    """Entries of the smaller side of one group's operator."""
    cog, cig = geom.weight.shape[0] // geom.groups, geom.weight.shape[1]
    return min(cog * math.prod(geom.out_spatial), cig * math.prod(geom.in_shape[1:]))


def _band_affordable(geom: ConvGeometry, work: float, max_entries: int = 2**25) -> bool:
    """Whether the banded certificate fits ``work`` flops and ``max_entries`` (from the geometry:
    rows of the output side more than ``d (k - 1) / s`` apart, of the input side more than
    ``d (k - 1)`` apart, share no read)."""
    if work <= 0:
        return False
    cog, cig = geom.weight.shape[0] // geom.groups, geom.weight.shape[1]
    out, sp = geom.out_spatial, geom.in_shape[1:]
    reach = geom.dilation[0] * (geom.weight.shape[2] - 1)
    if cog * math.prod(out) <= cig * math.prod(sp):
        rows, width, m = out[0], reach // geom.stride[0], cog * math.prod(out[1:])
    else:
        rows, width, m = sp[0], reach, cig * math.prod(sp[1:])
    width = min(width, rows - 1)
    if width + 1 >= rows:  # no band to keep: the dense factorization
        return False
    return band_work(rows, width, m) <= work and rows * (width + 1) * m * m <= max_entries


def cholesky_bound(
    geom: ConvGeometry, limit: int = CHOL_LIMIT, work: float = BAND_WORK
) -> float | None:
    """The ``"chol"`` bound of a zero-padded conv (max over groups), or None.

    Dense where the smaller side has at most ``limit`` entries; else banded where the band's
    factorization takes at most ``work`` flops (and ``limit > 0``).
    """
    if limit <= 0:
        return None
    dense = _side(geom) <= limit
    if not dense and not _band_affordable(geom, work):
        return None
    with one_thread():  # many small products; the Cholesky below may use every thread
        pb = _pair_blocks(geom, 2**62)
    if pb is None:
        return None
    n = pb.n_o * pb.c
    big = n > 2048  # small: one thread is faster than two; large: BLAS 3 and convs scale
    if dense:
        build, certifies = _dense, functools.partial(cholesky_certifies, overwrite=True)
    else:
        build, certifies = _band, functools.partial(banded_cholesky_certifies, overwrite=True)
    best = 0.0
    for g in range(geom.groups):
        with outer_threads() if big else one_thread():
            est = _gram_estimate(geom, pb, g)
            t = certified_max_eig(functools.partial(build, pb, g), certifies, est, pb.deltas[g])
        if t is None:
            return None
        best = max(best, t)
    return math.sqrt(best)
