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
  then a Lanczos estimate lam and a Cholesky of ``lam (1 + 1e-3) I - G`` with a margin for the
  Gram's and the factorization's rounding (``iteration.cholesky_certifies``): within 5e-4 of exact.
- ``"dense"``: the exact norm from the dense matrix when it is small (any padding).

A transposed conv is the adjoint of the conv with the same weight on its output shape (torch
defines it as that conv's gradient), and a map and its adjoint have the same norm. Note: the
reshaped-kernel value SN-GAN divides by is below ``||conv||`` for Conv (one full patch), but *not*
for ConvTranspose with stride > 1: 1.032 x the true norm on ConvTranspose2d(8, 3, 4, 2, 1) on
8x7x7.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lipgan.analysis.iteration import cholesky_max_eig, dense_operator_norm, symmetric_max_eig
from lipgan.errors import LipganError

__all__ = [
    "CONV_TYPES",
    "ConvGeometry",
    "conv_geometry",
    "conv_linear_map",
    "frequency_matrices",
    "conv_upper_bound",
    "pad_operator_norm",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_TYPES = _CONV + _CONVT
_FUNCS = {1: (F.conv1d, F.conv_transpose1d), 2: (F.conv2d, F.conv_transpose2d),
          3: (F.conv3d, F.conv_transpose3d)}  # fmt: skip
#: support boxes larger than this use the plain embedding bound (max lambda) instead
_BOX_LIMIT = 2048
#: the refined bound's (directions x frequencies) system is at most this size
_REFINE_LIMIT = 640
#: the Cholesky certificate runs where the smaller side of each group's operator has at most this
#: many entries (one float64 Cholesky of 4096 takes ~1.4 CPU s; 6272 ~4.3 s)
CHOL_LIMIT = 4096


def _tuple(v, d: int) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        return tuple(int(x) for x in v)
    return (int(v),) * d


@dataclass(frozen=True)
class ConvGeometry:
    """The conv that is analysed, as a linear map on ``in_shape = (C, *spatial)``.

    For a transposed layer this is its adjoint conv (``transposed`` True, ``in_shape`` the
    layer's *output* shape). ``pads``: (lo, hi) per spatial axis; ``mode`` the padding mode.
    """

    weight: torch.Tensor  # (c_out, c_in / groups, *k), float64
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    pads: tuple[tuple[int, int], ...]
    mode: str
    in_shape: tuple[int, ...]
    transposed: bool

    @property
    def out_spatial(self) -> tuple[int, ...]:
        k = self.weight.shape[2:]
        return tuple(
            (n + lo + hi - d * (kk - 1) - 1) // s + 1
            for n, (lo, hi), d, kk, s in zip(
                self.in_shape[1:], self.pads, self.dilation, k, self.stride
            )
        )


def _check_shape(layer: nn.Module, input_shape: Sequence[int], d: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != d + 1:
        raise LipganError(
            f"{type(layer).__name__}: input_shape must be (C, {', '.join('S' * d)}) without the "
            f"batch dimension, got {tuple(input_shape)}"
        )
    if shape[0] != layer.in_channels:
        raise LipganError(
            f"{type(layer).__name__}: input_shape has {shape[0]} channels but the layer expects "
            f"{layer.in_channels}"
        )
    return shape


def conv_geometry(layer: nn.Module, input_shape: Sequence[int]) -> ConvGeometry:
    """The :class:`ConvGeometry` of an ``nn.ConvNd`` / ``nn.ConvTransposeNd`` on ``input_shape``."""
    if not isinstance(layer, CONV_TYPES):
        raise LipganError(f"expected a torch conv layer, got {type(layer).__name__}")
    d = layer.weight.dim() - 2
    shape = _check_shape(layer, input_shape, d)
    w = layer.weight.detach().to(torch.float64)  # the weight the layer uses (parametrized)
    s, dil = _tuple(layer.stride, d), _tuple(layer.dilation, d)
    if isinstance(layer, _CONVT):
        p, op = _tuple(layer.padding, d), _tuple(layer.output_padding, d)
        k = w.shape[2:]
        out = tuple(
            (n - 1) * ss - 2 * pp + dd * (kk - 1) + oo + 1
            for n, ss, pp, dd, kk, oo in zip(shape[1:], s, p, dil, k, op)
        )
        if min(out, default=1) <= 0:
            raise LipganError(f"{type(layer).__name__}: empty output for input {shape}")
        return ConvGeometry(
            w, s, dil, int(layer.groups), tuple((pp, pp) for pp in p), "zeros",
            (layer.out_channels, *out), True,
        )  # fmt: skip
    r = [int(v) for v in layer._reversed_padding_repeated_twice]
    pads = tuple((r[2 * (d - 1 - i)], r[2 * (d - 1 - i) + 1]) for i in range(d))
    g = ConvGeometry(w, s, dil, int(layer.groups), pads, layer.padding_mode, shape, False)
    if min(g.out_spatial, default=1) <= 0:
        raise LipganError(f"{type(layer).__name__}: empty output for input {shape}")
    return g


def _torch_pads(pads: Sequence[tuple[int, int]]) -> list[int]:
    out: list[int] = []
    for lo, hi in reversed(pads):
        out += [lo, hi]
    return out


def conv_linear_map(layer: nn.Module, input_shape: Sequence[int]) -> Callable:
    """The layer's linear part (no bias) from its attributes, on batches ``(B, C, *S)``.

    Computed functionally (torch.nn.functional), not through the module's ``forward``, so a
    subclass that computes something else is caught by comparing the two.
    """
    if not isinstance(layer, CONV_TYPES):
        raise LipganError(f"expected a torch conv layer, got {type(layer).__name__}")
    d = layer.weight.dim() - 2
    _check_shape(layer, input_shape, d)
    weight = layer.weight.detach()
    conv, convt = _FUNCS[d]
    if isinstance(layer, _CONVT):
        s, p, op = layer.stride, layer.padding, layer.output_padding
        dil, gr = layer.dilation, layer.groups

        def f(x: torch.Tensor) -> torch.Tensor:
            return convt(x, weight.to(x.dtype), None, s, p, op, gr, dil)

        return f
    geom = conv_geometry(layer, input_shape)
    tp = _torch_pads(geom.pads)
    mode = "constant" if geom.mode == "zeros" else geom.mode

    def g(x: torch.Tensor) -> torch.Tensor:
        if any(tp):
            x = F.pad(x, tp, mode=mode)
        return conv(x, weight.to(x.dtype), None, geom.stride, 0, geom.dilation, geom.groups)

    return g


def _geometry_map(geom: ConvGeometry) -> Callable:
    """The linear map of a geometry (the analysed conv, not the transposed layer)."""
    d = len(geom.stride)
    conv = _FUNCS[d][0]
    tp = _torch_pads(geom.pads)
    mode = "constant" if geom.mode == "zeros" else geom.mode

    def f(x: torch.Tensor) -> torch.Tensor:
        if any(tp):
            x = F.pad(x, tp, mode=mode)
        return conv(x, geom.weight.to(x.dtype), None, geom.stride, 0, geom.dilation, geom.groups)

    return f


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


def _conv_grams(geom: ConvGeometry, limit: int, max_entries: int = 2**25):
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
    taps, inv = torch.unique(ti[i1] * K + ti[i2], return_inverse=True)
    if taps.numel() * c * c > max_entries:
        return None
    rows, n_t = other[i1] * n_o + other[i2], taps.numel()
    if n_o * n_o * n_t <= 2**24:  # a dense count matrix: BLAS beats torch's sparse product
        C = torch.zeros(n_o * n_o, n_t, dtype=torch.float64)
        C.index_put_((rows, inv), torch.ones(len(i1), dtype=torch.float64), accumulate=True)
    else:
        C = torch.sparse_coo_tensor(
            torch.stack([rows, inv]), torch.ones(len(i1), dtype=torch.float64),
            (n_o * n_o, n_t), check_invariants=True,
        ).coalesce()  # fmt: skip
    inner = cig * X if out_side else cog * L  # products summed into one entry, at most
    result = []
    for g in range(geom.groups):
        Wt = w[g * cog : (g + 1) * cog].reshape(cog, cig, K).permute(2, 0, 1)
        if not out_side:
            Wt = Wt.mT
        P = Wt[taps // K] @ Wt[taps % K].mT  # (taps, c, c)
        P = P.reshape(n_t, c * c)
        Gb = C @ P if C.layout == torch.strided else torch.sparse.mm(C, P)
        G = torch.empty(n_o * c, n_o * c, dtype=torch.float64)
        G.view(n_o, c, n_o, c).copy_(Gb.view(n_o, n_o, c, c).transpose(1, 2))
        # |fl(G) - G| <= gamma_m |A| |A|^T entrywise (any summation order), so its 2-norm is at
        # most gamma_m ||A||_F^2, and ||A||_F^2 = sum over reads of ||W_t||_F^2; ten times that
        fro = float(Wt.square().sum((1, 2))[ti].sum()) * 1.01
        m = inner + 2
        # G is symmetric up to rounding; the Cholesky reads its lower triangle only
        result.append((G, 10 * m * 2.0**-53 / (1 - m * 2.0**-53) * fro))
    return result


def _cholesky_bound(geom: ConvGeometry, limit: int = CHOL_LIMIT) -> float | None:
    """The ``"chol"`` bound of a zero-padded conv (max over groups), or None."""
    grams = _conv_grams(geom, limit)
    if grams is None:
        return None
    best = 0.0
    for G, delta in grams:
        t = cholesky_max_eig(G, delta)
        if t is None:
            return None
        best = max(best, t)
    return math.sqrt(best)


def _circulant_rows_bound(geom: ConvGeometry) -> tuple[float, bool]:
    """Circular padding: sqrt(multiplicity) x the exact norm of the full circulant it rows from.

    Returns ``(bound, exact)``; exact when the layer is the full (strided) circulant.
    """
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


def pad_operator_norm(shape_spatial: Sequence[int], pads, mode: str) -> float:
    """Exact ``||P||`` of torch's N-d padding (``pads``: (lo, hi) per axis) on one channel.

    Each padded entry copies one input entry (or is 0), so ``P^T P`` is diagonal with the copy
    counts, ``||P|| = sqrt(max count)``; the padding acts axis by axis, so it is the product.
    Negative pads (crops) are allowed.
    """
    if mode in ("zeros", "constant"):
        return 1.0
    total = 1
    for n, (lo, hi) in zip(shape_spatial, pads):
        idx = torch.arange(n, dtype=torch.float64).reshape(1, 1, n)
        try:
            padded = F.pad(idx, (lo, hi), mode=mode)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            raise LipganError(f"{mode} padding {(lo, hi)} of a length-{n} axis: {exc}") from None
        total *= int(torch.bincount(padded.reshape(-1).long(), minlength=n).max())
    return math.sqrt(total)


def conv_upper_bound(
    layer: nn.Module,
    input_shape: Sequence[int],
    dense_limit: int = 2**21,
    n_grids: int = 2,
    chol_limit: int = CHOL_LIMIT,
) -> tuple[float, bool, str]:
    """Certified ``||linear part||`` of a conv layer: ``(upper, exact, method)``.

    Exact by the dense matrix when it has at most ``dense_limit`` entries, or by the FFT for a full
    circular conv; else ``"chol"`` where the smaller side has at most ``chol_limit`` entries, else
    the ``"freq"``, ``"rows*fft"`` or ``"pad*..."`` bound (module docstring).
    """
    geom = conv_geometry(layer, input_shape)
    if geom.mode == "circular":
        bound, exact = _circulant_rows_bound(geom)
        if exact:
            return bound, True, "fft"
    dense = dense_operator_norm(_geometry_map(geom), geom.in_shape, dense_limit)
    if dense is not None:
        return dense, True, "dense"
    if geom.mode == "zeros":
        chol = _cholesky_bound(geom, chol_limit)
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
    chol = _cholesky_bound(valid, chol_limit)
    if chol is not None:
        candidates = [(p * chol, "pad*chol")]
    else:
        candidates = [(p * _zero_pad_bound(valid, n_grids), "pad*freq")]
    if geom.mode == "circular":
        candidates.append((bound, "rows*fft"))
    up, method = min(candidates)
    return up, False, method
