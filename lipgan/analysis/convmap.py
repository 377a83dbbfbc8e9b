"""A torch conv layer as the linear map lipgan bounds: :class:`ConvGeometry` and the padding map.

- :func:`conv_geometry`: the analysed conv of an ``nn.ConvNd`` / ``nn.ConvTransposeNd`` on an
  input shape (for a transposed layer its adjoint conv, which has the same norm);
- :func:`conv_linear_map`: the layer's linear part computed functionally from its attributes
  (not through its ``forward``, so a subclass that computes something else is caught);
- :func:`pad_operator_norm`: the exact norm of reflect / replicate / circular padding (a copy map).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lipgan.errors import LipganError

__all__ = [
    "CONV_TYPES",
    "ConvGeometry",
    "conv_geometry",
    "conv_linear_map",
    "geometry_map",
    "geometry_adjoint",
    "pad_operator_norm",
    "one_thread",
    "outer_threads",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_TYPES = _CONV + _CONVT
_FUNCS = {1: (F.conv1d, F.conv_transpose1d), 2: (F.conv2d, F.conv_transpose2d),
          3: (F.conv3d, F.conv_transpose3d)}  # fmt: skip


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


def geometry_map(geom: ConvGeometry) -> Callable:
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


def geometry_adjoint(geom: ConvGeometry) -> Callable:
    """The adjoint of a zero-padded geometry's map (``A^T`` on output batches): the transposed conv
    to the padded size, then the crop that is the adjoint of zero padding."""
    if geom.mode != "zeros":
        raise LipganError(f"geometry_adjoint: zero padding only, not {geom.mode!r}")
    d = len(geom.stride)
    convt = _FUNCS[d][1]
    k = geom.weight.shape[2:]
    padded = [n + lo + hi for n, (lo, hi) in zip(geom.in_shape[1:], geom.pads)]
    op = tuple(
        p - ((m - 1) * s + dd * (kk - 1) + 1)
        for p, m, s, dd, kk in zip(padded, geom.out_spatial, geom.stride, geom.dilation, k)
    )
    crop = (slice(None), slice(None)) + tuple(
        slice(lo, lo + n) for n, (lo, _) in zip(geom.in_shape[1:], geom.pads)
    )

    def f(y: torch.Tensor) -> torch.Tensor:
        w = geom.weight.to(y.dtype)
        x = convt(y, w, None, geom.stride, 0, op, geom.groups, geom.dilation)
        return x[crop]

    return f


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



#: thread counts in force when the outermost :func:`one_thread` was entered
_OUTER: list[int] = []


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside (restored after). The per-layer bounds are many small
    products, eigensolvers and factorizations, where a second thread only spins: on the shared
    2-core machine under load, ``eigvalsh`` of a 256 x 256 matrix took 0.59 CPU s at 2 threads
    and 0.0055 s at 1; the dcgan28 critic's second conv bound 14.9 CPU s at 2 threads, 0.75 at 1.
    :func:`outer_threads` gives the large factorizations their threads back."""
    before = torch.get_num_threads()
    _OUTER.append(before)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _OUTER.pop()
        torch.set_num_threads(before)


@contextlib.contextmanager
def outer_threads() -> Iterator[None]:
    """Inside :func:`one_thread`: the thread count the outermost caller had (large BLAS work)."""
    before = torch.get_num_threads()
    torch.set_num_threads(_OUTER[0] if _OUTER else before)
    try:
        yield
    finally:
        torch.set_num_threads(before)
