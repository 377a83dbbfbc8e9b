"""The ``"chol"`` bound of a zero-padded conv: its Gram matrix on the smaller side, certified by one
Cholesky factorization (:mod:`lipgan.analysis.certify`), dense or block-sparse.

The Gram matrix is assembled from the tap products ``W_t W_t'^T`` (or ``W_t^T W_t'``) that all
positions share, with a bound of its rounding error, so the certificate covers the exact Gram.
It is block-sparse: two positions of the side more than ``(k - 1) d / s`` apart on some axis
read no common input, so their block is an exact zero. Up to ``CHOL_LIMIT`` entries the dense
matrix is factored in float64; above, the blocks of nodes of a few positions are factored in
float32 in the minimum-degree order, where that takes at most ``SPARSE_WORK`` flops (the
dcgan28 critic's second conv at width 64: 49 nodes of 128, 1.8e10 flops against 8.2e10 dense;
its third: 16 nodes of 256, 1.5e10 against 2.3e10), with the float32 rounding bounded a
posteriori (:func:`certify.sparse_cholesky_bound`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from lipgan.analysis.certify import (
    BlockPattern,
    certified_max_eig,
    dense_cholesky_bound,
    lanczos_estimate,
    min_degree_pattern,
    sparse_cholesky_bound,
)
from lipgan.analysis.convmap import (
    ConvGeometry,
    geometry_adjoint,
    geometry_map,
    one_thread,
    outer_threads,
)

__all__ = ["CHOL_LIMIT", "SPARSE_WORK", "conv_grams", "cholesky_bound"]

#: the dense float64 Cholesky certificate runs where the smaller side of each group's operator
#: has at most this many entries; above, the float32 block-sparse one (the width-32 critic's
#: third conv, 2048: 0.45 s dense in float64, 0.17 s block-sparse)
CHOL_LIMIT = 1024
#: above CHOL_LIMIT, the block-sparse certificate runs where its work is at most this many flops
SPARSE_WORK = 4e10
#: ... and where its stored blocks hold at most this many float32 entries (512 MiB)
MAX_ENTRIES = 2**27
#: no Gram matrix is built for a side larger than this (the pair enumeration alone would be slow)
MAX_SIDE = 2**17
#: entries per node of the block-sparse factorization, at least (smaller blocks: BLAS 2 speed)
MIN_BLOCK = 64


@dataclasses.dataclass
class _PairBlocks:
    """The nonzero blocks ``G[o1, o2]`` (o1 >= o2: the lower triangle) of each group's Gram
    matrix on its smaller side, with ``n_o`` positions of ``c`` channels (index ``o * c + ch``),
    and ``delta`` per group: a bound of
    the rounding error ``||G - G_exact||_2``. Block ``b`` is the sum of the tap products
    ``products[g][inv[j]]`` over the reads j with ``brow[j] == b`` (brow sorted)."""

    products: list[torch.Tensor]  # per group (n_t, c, c): the distinct tap products
    brow: torch.Tensor  # (reads,) the block of each read pair, sorted
    inv: torch.Tensor  # (reads,) its tap product
    bi: torch.Tensor  # (n_b,) position o1
    bj: torch.Tensor  # (n_b,) position o2 <= o1
    n_o: int
    c: int
    out_side: bool
    deltas: list[float]
    layout: _Sparse | None = None


def _pair_blocks(
    geom: ConvGeometry, max_side: int, max_entries: int = 2**25, sparse: bool = False
) -> _PairBlocks | None:
    """The lower blocks of the smaller side's Gram matrix (:class:`_PairBlocks`); None when that
    side has more than ``max_side`` entries or the tap products more than ``max_entries``.
    ``sparse``: with the block-sparse layout of :func:`_layout` (``layout``).

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
    c = cog if out_side else cig
    layout = None
    if sparse:
        layout = _layout(other[i1], other[i2], n_o, c, (out if out_side else sp)[-1])
        if layout is None:
            return None
    lower = other[i1] >= other[i2]
    i1, i2 = i1[lower], i2[lower]
    # tap pairs (t1, t2) sorted by t2: each W_t2's partners form one contiguous run below
    taps, inv = torch.unique(ti[i2] * K + ti[i1], return_inverse=True)
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
        Wt = w[g * cog : (g + 1) * cog].reshape(cog, cig, K).permute(2, 0, 1).contiguous()
        if not out_side:
            Wt = Wt.mT
        with outer_threads():  # BLAS 3 scales
            result.append(_tap_products(Wt, taps % K, taps // K))
        # |fl(G) - G| <= gamma_m |A| |A|^T entrywise (any summation order), so its 2-norm is at
        # most gamma_m ||A||_F^2, and ||A||_F^2 = sum over reads of ||W_t||_F^2; ten times that
        fro = float(Wt.square().sum((1, 2))[ti].sum()) * 1.01
        m = inner + 2
        deltas.append(10 * m * 2.0**-53 / (1 - m * 2.0**-53) * fro)
    bi, bj = blocks // n_o, blocks % n_o
    if layout is not None:
        layout.place(bi, bj)
    return _PairBlocks(result, brow, inv, bi, bj, n_o, c, out_side, deltas, layout)


def _tap_products(Wt: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``Wt[left[i]] @ Wt[right[i]]^T`` for every i, (len(left), c, c), ``right`` sorted: per
    right tap one product of all its partners stacked, ``[W_l1; W_l2; ...] W_r^T``, whose rows
    are those products one after another (a tall GEMM instead of a batch of small ones, written
    in place)."""
    c = Wt.shape[1]
    out = Wt.new_empty(len(left), c, c)
    edges = torch.searchsorted(right, torch.unique(right)).tolist() + [len(right)]
    for a, b in zip(edges[:-1], edges[1:]):
        stacked = Wt[left[a:b]].reshape((b - a) * c, -1)
        torch.mm(stacked, Wt[int(right[a])].T, out=out[a:b].view((b - a) * c, c))
    return out


def _scatter(pb: _PairBlocks, g: int, write, chunk: int = 2**22) -> None:
    """Each block's sum of tap products, a chunk of blocks at a time: ``write(b0, b1, sums)``
    with ``sums`` (b1 - b0, c, c) float64 for blocks b0..b1-1. ``sums = C @ P`` with the
    chunk's (blocks x tap products) count matrix C, which streams the products once per chunk (a
    gather of each block's products moves several times more memory, and memory is what this
    step waits for); where the products are small (few channels), a gather of each read's
    product and one ``index_add_`` instead (the count matrix would be mostly zeros)."""
    P = pb.products[g].reshape(len(pb.products[g]), pb.c * pb.c)
    n_t = P.shape[0]
    if n_t == 0 or len(pb.bi) == 0:  # no read is valid: the Gram matrix is 0
        return
    n_b = len(pb.bi)
    if len(pb.brow) * P.shape[1] <= chunk:
        sums = P.new_zeros(n_b, P.shape[1]).index_add_(0, pb.brow, P[pb.inv])
        write(0, n_b, sums.view(n_b, pb.c, pb.c))
        return
    per = max(1, chunk // max(P.shape[1], 1))
    edges = torch.searchsorted(pb.brow, torch.arange(0, n_b + per, per).clamp_max(n_b)).tolist()
    sums = P.new_empty(min(per, n_b), P.shape[1])
    for k, b0 in enumerate(range(0, n_b, per)):
        b1 = min(b0 + per, n_b)
        lo, hi = edges[k], edges[k + 1]
        C = P.new_zeros(b1 - b0, n_t)
        C.index_put_((pb.brow[lo:hi] - b0, pb.inv[lo:hi]), P.new_ones(hi - lo), accumulate=True)
        part = torch.mm(C, P, out=sums[: b1 - b0])
        write(b0, b1, part.view(b1 - b0, pb.c, pb.c))


def _dense(pb: _PairBlocks, g: int, mirror: bool = False) -> torch.Tensor:
    """Group g's Gram matrix, dense: its lower blocks, and with ``mirror`` the upper ones."""
    n_o, c, bi, bj = pb.n_o, pb.c, pb.bi, pb.bj
    G = torch.zeros(n_o * c, n_o * c, dtype=torch.float64)  # blocks no read links stay 0
    G4 = G.view(n_o, c, n_o, c).transpose(1, 2)

    def write(b0: int, b1: int, part: torch.Tensor) -> None:
        G4[bi[b0:b1], bj[b0:b1]] = part

    _scatter(pb, g, write)
    if mirror:
        off = bi != bj
        G4[bj[off], bi[off]] = G4[bi[off], bj[off]].mT
    return G


@dataclasses.dataclass
class _Sparse:
    """The block-sparse layout of a Gram matrix (:func:`certify.sparse_cholesky_bound`): nodes
    of ``tile`` consecutive positions (``m = tile * c`` entries) at their elimination positions
    ``pos`` (minimum degree on their block graph); per pair block ``(o1, o2)`` (o1 >= o2) its
    ``slot``, whether it is stored transposed (``trans``: the slot of nodes (r, k) holds
    ``G[k, r]``), and where inside the slot (``sub``); ``fill``: the slots no block writes."""

    pattern: BlockPattern
    tile: int
    m: int
    pos: torch.Tensor
    slot: torch.Tensor | None = None
    trans: torch.Tensor | None = None
    sub: tuple[torch.Tensor, torch.Tensor] | None = None
    fill: torch.Tensor | None = None

    def place(self, bi: torch.Tensor, bj: torch.Tensor) -> None:
        e1, e2 = self.pos[bi // self.tile], self.pos[bj // self.tile]
        N = len(self.pattern.order)
        lut = torch.full((N, N), -1, dtype=torch.long)
        keys = torch.tensor(list(self.pattern.slot), dtype=torch.long).reshape(-1, 2)
        lut[keys[:, 0], keys[:, 1]] = torch.arange(len(keys))
        self.slot = lut[torch.maximum(e1, e2), torch.minimum(e1, e2)]
        # slot (r, k) holds G[k, r]: the block G[o1, o2] goes in as its transpose where o1's node
        # is eliminated later; a diagonal slot keeps its lower triangle, as the Cholesky reads it
        self.trans = e1 > e2
        a, b = bi % self.tile, bj % self.tile
        self.sub = (torch.where(self.trans, b, a), torch.where(self.trans, a, b))
        used = torch.zeros(len(keys), dtype=torch.bool)
        used[self.slot] = True
        self.fill = torch.nonzero(~used)[:, 0]


def _layout(o1: torch.Tensor, o2: torch.Tensor, n_o: int, c: int, last: int, max_nodes=400):
    """:class:`_Sparse` for positions that share reads pairwise (o1[i], o2[i]): nodes of the
    fewest consecutive positions along the side's last axis (a divisor of its length, ``last``)
    with at least ``MIN_BLOCK`` entries, so that the factorization runs as BLAS 3; None when
    there would be more than ``max_nodes`` nodes."""
    tile = next((t for t in range(1, last + 1) if last % t == 0 and t * c >= MIN_BLOCK), last)
    N = n_o // tile
    if N > max_nodes:
        return None
    adjacency: list[set[int]] = [set() for _ in range(N)]
    for a, b in (divmod(x, N) for x in torch.unique((o1 // tile) * N + o2 // tile).tolist()):
        adjacency[a].add(b)
        adjacency[b].add(a)
    pattern = min_degree_pattern(adjacency)
    pos = torch.tensor([pattern.position[i] for i in range(N)])
    return _Sparse(pattern, tile, tile * c, pos)


def _sparse(pb: _PairBlocks, g: int) -> tuple[torch.Tensor, float]:
    """Group g's Gram matrix in the slots of ``pb.layout`` (float32, the lower blocks in the
    elimination order) and a bound of its Frobenius norm (from the float64 sums)."""
    lay, c = pb.layout, pb.c
    A = torch.empty(len(lay.pattern.slot), lay.m, lay.m, dtype=torch.float32)
    if lay.tile == 1:  # the blocks cover their slots: only the fill is zero
        A[lay.fill] = 0.0
    else:  # pairs of positions in two nodes may read nothing in common
        A.zero_()
    V = A.view(-1, lay.tile, c, lay.tile, c).transpose(2, 3)
    fro2 = [0.0]
    t1, t2 = lay.sub

    def write(b0: int, b1: int, part: torch.Tensor) -> None:
        if lay.tile == 1:  # whole blocks: cast into the slots, then transpose those stored ^T
            sl, tr = lay.slot[b0:b1], lay.trans[b0:b1]
            A.index_copy_(0, sl, part.to(torch.float32))
            A[sl[tr]] = A[sl[tr]].mT
        else:
            tr = lay.trans[b0:b1, None, None]
            V[lay.slot[b0:b1], t1[b0:b1], t2[b0:b1]] = torch.where(tr, part.mT, part).float()
        twice = 1.0 + (pb.bi[b0:b1] != pb.bj[b0:b1]).double()
        fro2[0] += float(torch.linalg.vector_norm(part, dim=(1, 2)).square() @ twice)

    _scatter(pb, g, write)
    return A, math.sqrt(fro2[0]) * (1 + 1e-12)


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
    g32 = dataclasses.replace(geom, weight=geom.weight.float())  # cast once, not per product
    f, ft = geometry_map(g32), geometry_adjoint(g32)
    shape = (1, pb.c * geom.groups, *geom.out_spatial) if pb.out_side else (1, *geom.in_shape)
    start = torch.zeros(shape, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    part = start[:, g * pb.c : (g + 1) * pb.c]
    part.copy_(torch.randn(part.shape, generator=gen, dtype=torch.float64).float())

    def matvec(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return f(ft(v)) if pb.out_side else ft(f(v))

    return lanczos_estimate(matvec, start)


def _matrix_estimate(G: torch.Tensor, seed: int = 0) -> float:
    """Lanczos estimate of a dense symmetric G's lambda_max (float32 products)."""
    G32 = G.to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(G.shape[0], generator=gen, dtype=torch.float64).float()
    return lanczos_estimate(lambda v: G32 @ v, v0)


def _side(geom: ConvGeometry) -> int:
    """Entries of the smaller side of one group's operator."""
    cog, cig = geom.weight.shape[0] // geom.groups, geom.weight.shape[1]
    return min(cog * math.prod(geom.out_spatial), cig * math.prod(geom.in_shape[1:]))


def cholesky_bound(
    geom: ConvGeometry, limit: int = CHOL_LIMIT, work: float = SPARSE_WORK
) -> float | None:
    """The ``"chol"`` bound of a zero-padded conv (max over groups), or None.

    Dense (float64) where the smaller side has at most ``limit`` entries; else block-sparse
    (float32, :func:`certify.sparse_cholesky_bound`) where that factorization takes at most
    ``work`` flops and ``MAX_ENTRIES`` stored entries (and ``limit > 0``).
    """
    if limit <= 0 or _side(geom) > MAX_SIDE:
        return None
    dense = _side(geom) <= limit
    with one_thread():  # many small products; the Cholesky below may use every thread
        pb = _pair_blocks(geom, 2**62, sparse=not dense)
    if pb is None:
        return None
    n = pb.n_o * pb.c
    if not dense:
        lay = pb.layout
        if lay.pattern.work(lay.m) > work or len(lay.pattern.slot) * lay.m**2 > MAX_ENTRIES:
            return None
    big = n > 2048  # small: one thread is faster than two; large: BLAS 3 and convs scale
    best = 0.0
    for g in range(geom.groups):
        with outer_threads() if big else one_thread():
            if dense:  # the estimate from G itself: a small matrix is cheaper than two convs
                G = _dense(pb, g, mirror=True)
                est = _matrix_estimate(G)
                build, bound = G.clone, functools.partial(dense_cholesky_bound, overwrite=True)
            else:
                est = _gram_estimate(geom, pb, g)
                build = functools.partial(_sparse, pb, g)
                bound = functools.partial(_sparse_bound, pb.layout.pattern)
            t = certified_max_eig(build, bound, est, pb.deltas[g])
        if t is None:
            return None
        best = max(best, t)
    return math.sqrt(best)


def _sparse_bound(pattern: BlockPattern, built, t: float, delta: float) -> float | None:
    A, fro = built
    return sparse_cholesky_bound(A, pattern, t, delta, gram_fro=fro)
