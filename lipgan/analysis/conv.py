"""Operator norms of N-d convolutions (Conv1d/2d/3d, ConvTranspose1d/2d/3d) as maps on (C, *S).

Every value returned as an upper bound is certified (never below ``max ||A x|| / ||x||``):

- ``"fft"`` exact: circular padding with output = input / stride. A strided circular conv on an
  N-grid is, after space to depth, a stride-1 circular conv on the N/s grid with c_in * s^d input
  channels; its singular values are those of the per-frequency c_out x (c_in s^d) matrices of the
  kernel's DFT (Sedghi, Gupta & Long 2019).
- ``"freq"``: zero padding. The zero-padded conv is a submatrix ``R C E`` of a circular conv C on
  a grid large enough that no read wraps onto data (E embeds the input, R keeps the real outputs).
  With ``lambda(w) = sigma_max(K(w))^2`` per frequency, ``||C E x||^2 = sum_w |K(w) x(w)|^2 <=
  sum_c x_c^T (E^T Circ(lambda) E) x_c``, so ``||A||^2 <= lambda_max(E^T Circ(lambda) E)``, the
  compression of the scalar circulant with eigenvalues lambda to the input's support box (a
  |S| x |S| matrix), and the same on the output side (``||A|| = ||A^T|| <= ||R C||``). This is
  never above the plain circular-embedding bound max lambda (Delattre et al. 2023's embedding).
- ``"rows*fft"``: circular padding whose output is not input / stride. Each output is a row of the
  full circulant (stride s where the axis divides, else stride 1), some rows repeated m times:
  ``||A|| <= sqrt(m) ||circulant||``.
- ``"pad*..."``: reflect / replicate / circular padding is a copy map P (one input entry per padded
  entry), ``||P|| = sqrt(max copies of one entry)`` exactly (separable: the product over axes),
  then ``||A|| <= ||P|| ||valid conv||``.
- ``"chol"``: zero padding, smaller side up to ``CHOL_LIMIT``: the Gram matrix on the smaller
  side, assembled from the tap products ``W_t W_t'^T`` (or ``W_t^T W_t'``) shared by all positions,
  then a Lanczos estimate lam and a float64 Cholesky of ``lam (1 + 1e-3) I - G`` with a margin
  for the Gram's and the factorization's rounding (``certify.cholesky_certifies``): within 5e-4
  of exact. Above ``CHOL_LIMIT`` the same Gram matrix is block-sparse (positions that read no
  common input), and its blocks are factored in float32 in the minimum-degree order where that
  costs at most ``SPARSE_WORK`` flops, the rounding bounded after the factorization
  (``certify.sparse_cholesky_bound``): within about 2e-3 of exact.
- ``"dense"``: the exact norm from the dense matrix when it is small (any padding).

The layer as a linear map (geometry, functional map, padding norm) is in
:mod:`lipgan.analysis.convmap`, the ``"chol"`` Gram certificate in :mod:`lipgan.analysis.convgram`;
this module holds the frequency-domain bounds and the dispatcher :func:`conv_upper_bound`.

A transposed conv is the adjoint of the conv with the same weight on its output shape (torch
defines it as that conv's gradient), and a map and its adjoint have the same norm. Note: the
reshaped-kernel value SN-GAN divides by is below ``||conv||`` for Conv (one full patch), but *not*
for ConvTranspose with stride > 1: 1.032 x the true norm on ConvTranspose2d(8, 3, 4, 2, 1) on
8x7x7.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from lipgan.analysis.convgram import CHOL_LIMIT, cholesky_bound, conv_grams
from lipgan.analysis.convmap import (
    CONV_TYPES,
    ConvGeometry,
    conv_geometry,
    conv_linear_map,
    geometry_map,
    one_thread,
    outer_threads,
    pad_operator_norm,
)
from lipgan.analysis.iteration import dense_operator_norm, symmetric_max_eig
from lipgan.errors import LipganError

__all__ = [
    "CHOL_LIMIT",
    "CONV_TYPES",
    "ConvGeometry",
    "conv_geometry",
    "conv_linear_map",
    "frequency_matrices",
    "conv_upper_bound",
    "pad_operator_norm",
    "one_thread",
    "outer_threads",
]

# the names this module had before the split (tests and callers reach them here)
_geometry_map = geometry_map
_conv_grams = conv_grams
_cholesky_bound = cholesky_bound

#: support boxes larger than this use the plain embedding bound (max lambda) instead
_BOX_LIMIT = 2048
#: the refined bound's (directions x frequencies) system is at most this size
_REFINE_LIMIT = 640


# --------------------------------------------------------------------------------------------
# per-frequency matrices


def frequency_matrices(
    weight: torch.Tensor,
    grid: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    groups: int = 1,
    onesided: bool = True,
) -> torch.Tensor:
    """Per-frequency matrices of the circular N-d conv on ``grid`` (each axis divisible by stride).

    After space to depth the conv is a stride-1 circular conv on the ``M = grid / stride`` torus
    with ``c_in/groups * prod(stride)`` input channels, whose kernel tap q of phase a is the
    original tap with ``d * k = s * q + a`` (taps past the torus wrap, as a circular conv does).
    Its singular values are those of ``K(w) = sum_q K'[q] exp(-2 pi i <q, w / M>)`` at the M
    frequencies. weight: (c_out, c_in/groups, *k). Returns complex
    ``(groups, *M, c_out/groups, c_in/groups * prod(stride))``; with ``onesided`` the last axis
    holds M[-1] // 2 + 1 frequencies (the others are complex conjugates: the same singular values).
    """
    d = weight.dim() - 2
    grid, stride, dilation = tuple(grid), tuple(stride), tuple(dilation)
    if any(n % s for n, s in zip(grid, stride)):
        raise LipganError(f"grid {grid} is not divisible by the stride {stride}")
    M = tuple(n // s for n, s in zip(grid, stride))
    co, cig = weight.shape[:2]
    k = weight.shape[2:]
    wk = weight.detach().to(torch.float64)
    poly = wk.new_zeros(co, cig, *stride, *M)
    for tap in itertools.product(*(range(kk) for kk in k)):
        qs, ps = zip(*(divmod(dd * a, ss) for dd, a, ss in zip(dilation, tap, stride)))
        idx = (slice(None), slice(None), *ps, *(q % m for q, m in zip(qs, M)))
        poly[idx] += wk[(slice(None), slice(None), *tap)]
    dims = tuple(range(-d, 0))
    spec = torch.fft.rfftn(poly, dim=dims) if onesided else torch.fft.fftn(poly, dim=dims)
    spec = spec.reshape(groups, co // groups, cig * math.prod(stride), *spec.shape[-d:])
    return spec.permute(0, *range(3, 3 + d), 1, 2)


def _top_sq(mats: torch.Tensor) -> torch.Tensor:
    """Certified ``sigma_max^2`` of each matrix of a batch (..., a, b), float64 (...)."""
    small = mats if mats.shape[-2] <= mats.shape[-1] else mats.mT.conj()
    gram = small @ small.mT.conj()
    lam = torch.linalg.eigvalsh(gram).amax(-1)
    fro = torch.linalg.matrix_norm(gram, ord="fro")
    return lam + gram.shape[-1] * 1e-14 * fro  # the rounding margin of symmetric_max_eig


def _lambda_full(weight, grid, stride, dilation, groups) -> torch.Tensor:
    """``lambda(w) = max_groups sigma_max(K_g(w))^2`` on the whole torus M (real, (*M))."""
    mats = frequency_matrices(weight, grid, stride, dilation, groups, onesided=True)
    lam = _top_sq(mats).amax(0)  # (*M[:-1], M[-1]//2+1)
    M = tuple(n // s for n, s in zip(grid, stride))
    h = lam.shape[-1]
    if h == M[-1]:
        return lam
    full = lam.new_empty(M)
    full[..., :h] = lam
    # lambda(-w) = lambda(w): the kernel is real, K(-w) = conj(K(w))
    rest = lam[..., [M[-1] - j for j in range(h, M[-1])]]
    for ax, m in enumerate(M[:-1]):
        rest = rest.index_select(ax, (-torch.arange(m)) % m)
    full[..., h:] = rest
    return full


def _box_bound(lam: torch.Tensor, boxes: Sequence[Sequence[int]]) -> float:
    """``min(max lambda, lambda_max(E_S^T Circ(lambda) E_S))`` over the support boxes S."""
    best = float(lam.max())
    M = lam.shape
    d = len(M)
    c = None
    for box in boxes:
        b = tuple(min(int(bb), m) for bb, m in zip(box, M))
        P = math.prod(b)
        if P > _BOX_LIMIT or b == tuple(M):
            continue
        if c is None:
            c = torch.fft.ifftn(lam.to(torch.complex128)).real  # the circulant's kernel
        idx = []
        for ax, (bb, m) in enumerate(zip(b, M)):
            r = torch.arange(bb)
            diff = (r[:, None] - r[None, :]) % m
            shape = [1] * (2 * d)
            shape[ax], shape[d + ax] = bb, bb
            idx.append(diff.reshape(shape))
        T = c[tuple(idx)].reshape(P, P)
        best = min(best, symmetric_max_eig(0.5 * (T + T.t())))
    return best


def _certified(lam: float, FQ, tev, G, lidx, eye_v) -> bool:
    """Whether ``I - V (I (x) (lam - T)^{-1}) V^H`` is positive definite (with a margin)."""
    Phi = (FQ / (lam - tev).to(torch.complex128)[None, :]) @ FQ.conj().t()
    Mm = eye_v - Phi[lidx][:, lidx] * G
    Mm = 0.5 * (Mm + Mm.conj().t()) - 1e-9 * eye_v  # a margin for the rounding
    return bool(torch.linalg.cholesky_ex(Mm)[1] == 0)


def _refined_box_bound(
    weight, grid, stride, dilation, groups, box_in, box_out, hi: float, rank: int
) -> float:
    """A tighter certified ``||A||^2`` than the scalar box bound ``hi``, by keeping ``rank``
    channel directions per frequency.

    On the side with fewer channels c, ``h(w) = K(w)^H K(w)`` (or ``K K^H``) satisfies
    ``h(w) <= mu(w) I + sum_{i<=r} (lambda_i(w) - mu(w)) u_i u_i^H`` with ``mu = lambda_{r+1}``,
    so ``||A||^2 <= lambda_max(I_c (x) T_S(mu) + V^H V)`` (T_S the box compression of the scalar
    circulant, V the r directions seen through the box). For ``lam > lambda_max(T_S(mu))``
    that holds iff ``I - V (I (x) (lam - T_S)^{-1}) V^H`` is positive definite, a
    (r P) x (r P) matrix (P frequencies): bisection on lam with Cholesky.
    """
    half = frequency_matrices(weight, grid, stride, dilation, groups, onesided=True)
    d_ = len(grid)
    M = tuple(n // s for n, s in zip(grid, stride))
    P = math.prod(M)
    # every frequency of the torus from the one-sided half: K(-w) = conj(K(w))
    hs = half.shape[1 : 1 + d_]
    full = torch.stack(torch.meshgrid(*[torch.arange(m) for m in M], indexing="ij"), -1).reshape(
        -1, d_
    )
    mirror = full[:, -1] >= hs[-1]
    src = torch.where(mirror[:, None], (-full) % torch.tensor(M), full)
    flat = torch.zeros(P, dtype=torch.long)
    for ax in range(d_):
        flat = flat * hs[ax] + src[:, ax]
    Kh = half.reshape(groups, -1, *half.shape[-2:])
    out_side = Kh.shape[-2] <= Kh.shape[-1]
    c = Kh.shape[-2] if out_side else Kh.shape[-1]
    r = min(rank, c)
    if r * P > _REFINE_LIMIT:
        return hi
    h_all = Kh @ Kh.mT.conj() if out_side else Kh.mT.conj() @ Kh
    ev_all, U_all = torch.linalg.eigh(h_all)  # ascending
    margin_all = c * 1e-14 * torch.linalg.matrix_norm(h_all, ord="fro")  # eigh's backward error
    # the scalar box bound on this torus from the same spectra (lambda = top eigenvalue)
    lam = (ev_all[..., -1] + margin_all).amax(0)[flat].reshape(M)
    hi = min(hi, _box_bound(lam, [tuple(box_in), tuple(box_out)]))
    box = tuple(min(int(b), m) for b, m in zip(box_out if out_side else box_in, M))
    best = 0.0
    for g in range(groups):
        ev_h, U_h, margin_h = ev_all[g], U_all[g], margin_all[g]
        ev, margin = ev_h[flat], margin_h[flat]
        U = torch.where(mirror[:, None, None], U_h[flat].conj(), U_h[flat])
        mu = (ev[:, c - r - 1] if r < c else torch.zeros_like(ev[:, 0])) + margin
        d = (ev[:, c - r :].flip(-1) + margin[:, None] - mu[:, None]).clamp_min(0)  # (P, r)
        u = U[:, :, c - r :].flip(-1)  # (P, c, r)
        grids = torch.meshgrid(*[torch.arange(b) for b in box], indexing="ij")
        pos = torch.stack([t.reshape(-1) for t in grids], 1).double()
        om = full.double() / torch.tensor(M, dtype=torch.float64)
        FS = torch.exp(-2j * math.pi * (om @ pos.t())) / math.sqrt(P)  # (P, |S|)
        T = (FS.conj().t() * mu.to(torch.complex128)[None, :]) @ FS
        tev, tvec = torch.linalg.eigh(0.5 * (T + T.conj().t()))
        tmax = float(tev.max()) + T.shape[0] * 1e-14 * float(torch.linalg.matrix_norm(T, ord="fro"))
        FQ = FS @ tvec  # Phi(lam) = FQ diag(1 / (lam - tev)) FQ^H
        Uf = u.permute(0, 2, 1).reshape(P * r, c)
        sq = d.reshape(-1).sqrt()
        G = (Uf.conj() @ Uf.t()) * (sq[:, None] * sq[None, :])
        lidx = torch.arange(P).repeat_interleave(r)
        eye_v = torch.eye(P * r, dtype=torch.complex128)

        parts = (FQ, tev, G, lidx, eye_v)
        lo = max(tmax * (1 + 1e-9), 1e-300)
        top = hi
        if lo >= top or not _certified(top, *parts):
            return hi
        for _ in range(12):
            mid = 0.5 * (lo + top)
            if _certified(mid, *parts):
                top = mid
            else:
                lo = mid
        best = max(best, top)
    return min(hi, best * (1 + 1e-9))


def _zero_pad_bound(geom: ConvGeometry, n_grids: int = 2, rank: int = 8) -> float:
    """The ``"freq"`` bound of a zero-padded conv (any stride, dilation, groups, pads)."""
    with one_thread():
        return _zero_pad_bound_1t(geom, n_grids, rank)


def _zero_pad_bound_1t(geom: ConvGeometry, n_grids: int, rank: int) -> float:
    w = geom.weight
    out = geom.out_spatial
    sizes = []
    boxes_in = []
    for n, (lo, hi), s, no in zip(geom.in_shape[1:], geom.pads, geom.stride, out):
        first = max(n + max(lo, hi), s * no)
        first = -(-first // s) * s
        sizes.append([first + s * j for j in range(n_grids)])
        boxes_in.append((lo + n - 1) // s - lo // s + 1)
    grids = list(zip(*sizes))
    co, cig = w.shape[:2]
    c = min(co // geom.groups, cig * math.prod(geom.stride))
    P = math.prod(n // s for n, s in zip(grids[0], geom.stride))
    if rank > 0 and min(rank, c) * P <= _REFINE_LIMIT:
        # the refinement on the smallest torus (its own scalar bound included) beats more tori
        best = _refined_box_bound(
            w, grids[0], geom.stride, geom.dilation, geom.groups, boxes_in, out, math.inf, rank
        )
    else:
        best = math.inf
        for grid in grids:
            lam = _lambda_full(w, grid, geom.stride, geom.dilation, geom.groups)
            best = min(best, _box_bound(lam, [tuple(boxes_in), tuple(out)]))
    return math.sqrt(max(best, 0.0))


def _circulant_rows_bound(geom: ConvGeometry) -> tuple[float, bool]:
    """Circular padding: sqrt(multiplicity) x the exact norm of the full circulant it rows from.

    Returns ``(bound, exact)``; exact when the layer is the full (strided) circulant.
    """
    with one_thread():
        return _circulant_rows_bound_1t(geom)


def _circulant_rows_bound_1t(geom: ConvGeometry) -> tuple[float, bool]:
    w = geom.weight
    strides, grid, mult = [], [], 1
    exact = True
    for n, s, no in zip(geom.in_shape[1:], geom.stride, geom.out_spatial):
        if n % s == 0:
            m = n // s
            strides.append(s)
            counts = torch.bincount(torch.arange(no) % m, minlength=m)
        else:
            strides.append(1)
            counts = torch.bincount((s * torch.arange(no)) % n, minlength=n)
        grid.append(n)
        mult *= int(counts.max())
        exact = exact and n % s == 0 and no == n // s
    lam = _lambda_full(w, grid, strides, geom.dilation, geom.groups)
    return math.sqrt(mult * max(float(lam.max()), 0.0)), exact



def conv_upper_bound(
    layer: nn.Module,
    input_shape: Sequence[int],
    dense_limit: int = 2**21,
    n_grids: int = 2,
    chol_limit: int = CHOL_LIMIT,
) -> tuple[float, bool, str]:
    """Certified ``||linear part||`` of a conv layer: ``(upper, exact, method)``.

    Exact by the dense matrix when it has at most ``dense_limit`` entries, or by the FFT for a full
    circular conv; else ``"chol"`` where the smaller side has at most ``chol_limit`` entries (or
    its band is affordable, ``chol_limit > 0``), else the ``"freq"``, ``"rows*fft"`` or
    ``"pad*..."`` bound (module docstring).
    """
    geom = conv_geometry(layer, input_shape)
    if geom.mode == "circular":
        bound, exact = _circulant_rows_bound(geom)
        if exact:
            return bound, True, "fft"
    dense = dense_operator_norm(geometry_map(geom), geom.in_shape, dense_limit)
    if dense is not None:
        return dense, True, "dense"
    if geom.mode == "zeros":
        chol = cholesky_bound(geom, chol_limit)
        if chol is not None:
            return chol, False, "chol"
        return _zero_pad_bound(geom, n_grids), False, "freq"
    # reflect / replicate / non-full circular: the copy map, then the valid conv
    p = pad_operator_norm(geom.in_shape[1:], geom.pads, geom.mode)
    padded = tuple(n + lo + hi for n, (lo, hi) in zip(geom.in_shape[1:], geom.pads))
    valid = ConvGeometry(
        geom.weight, geom.stride, geom.dilation, geom.groups,
        tuple((0, 0) for _ in geom.pads), "zeros", (geom.in_shape[0], *padded), False,
    )  # fmt: skip
    chol = cholesky_bound(valid, chol_limit)
    if chol is not None:
        candidates = [(p * chol, "pad*chol")]
    else:
        candidates = [(p * _zero_pad_bound(valid, n_grids), "pad*freq")]
    if geom.mode == "circular":
        candidates.append((bound, "rows*fft"))
    up, method = min(candidates)
    return up, False, method
