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

from lipgan.analysis.iteration import dense_operator_norm, symmetric_max_eig
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


def _zero_pad_bound(geom: ConvGeometry, n_grids: int = 3) -> float:
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
    best = math.inf
    for grid in zip(*sizes):
        lam = _lambda_full(w, grid, geom.stride, geom.dilation, geom.groups)
        best = min(best, _box_bound(lam, [tuple(boxes_in), tuple(out)]))
    return math.sqrt(max(best, 0.0))


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
    layer: nn.Module, input_shape: Sequence[int], dense_limit: int = 2**21, n_grids: int = 3
) -> tuple[float, bool, str]:
    """Certified ``||linear part||`` of a conv layer: ``(upper, exact, method)``.

    Exact by the dense matrix when it has at most ``dense_limit`` entries, or by the FFT for a full
    circular conv; else the ``"freq"``, ``"rows*fft"`` or ``"pad*freq"`` bound (module docstring).
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
        return _zero_pad_bound(geom, n_grids), False, "freq"
    # reflect / replicate / non-full circular: the copy map, then the valid conv
    p = pad_operator_norm(geom.in_shape[1:], geom.pads, geom.mode)
    padded = tuple(n + lo + hi for n, (lo, hi) in zip(geom.in_shape[1:], geom.pads))
    valid = ConvGeometry(
        geom.weight, geom.stride, geom.dilation, geom.groups,
        tuple((0, 0) for _ in geom.pads), "zeros", (geom.in_shape[0], *padded), False,
    )  # fmt: skip
    candidates = [(p * _zero_pad_bound(valid, n_grids), "pad*freq")]
    if geom.mode == "circular":
        candidates.append((bound, "rows*fft"))
    up, method = min(candidates)
    return up, False, method
