"""Per-layer certified bounds: :func:`layer_bound` and :func:`linear_map`, by ``isinstance``.

``layer_bound(module, input_shape)`` returns a :class:`LayerBound` for every layer lipgan knows:
``upper`` is certified (never below the layer's Lipschitz constant in L2 on inputs of that shape;
for an affine layer the norm of its linear part, the bias being irrelevant), ``lower`` a value
attained (or approached) by the layer, ``exact`` whether ``upper`` is the exact constant (up to
a rounding margin), ``method`` a short name of how. A layer that cannot be bounded soundly is a
``LipganError`` naming it, never a number. Methods:

- ``"svd"`` Linear; ``"diag"`` BatchNorm (eval); ``"perm"`` reshapes and permutations (1);
- ``"fft"``, ``"dense"``, ``"freq"``, ``"rows*fft"``, ``"pad*freq"`` convolutions (see
  :mod:`lipgan.analysis.conv`);
- ``"dense"`` / ``"schur"`` average pooling (exact per-channel matrix when small, else
  ``sqrt(||A||_1 ||A||_inf)`` for a nonnegative matrix), ``"kron"`` interpolation (a Kronecker
  product of 1-D interpolation matrices: the product of their exact norms);
- ``"pad"`` padding layers (a copy map: ``sqrt(max copies)``, exact);
- ``"cover"`` max / LP pooling: ``|max_W a - max_W b| <= ||a - b||_inf on W``, so
  ``sqrt(max number of windows holding one entry)``, attained by moving one entry;
- ``"slope"`` elementwise activations (``max |slope|``), ``"const"`` lipgan's GroupSort (1: a
  permutation on every input, Anil et al. 2019) and Softmax (1/2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lipgan.analysis import conv as _conv
from lipgan.analysis.activations import attained_slope, slope_range
from lipgan.analysis.iteration import dense_operator_norm, top_singular_value
from lipgan.errors import LipganError

__all__ = ["LayerBound", "layer_bound", "linear_map", "interpolate_bound", "coverage"]

#: relative margin put on exact values computed in floating point (SVD, eigvalsh, FFT)
_ROUND = 1e-12

_AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAVG = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_MAX = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_ADMAX = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_LP = tuple(c for c in (getattr(nn, n, None) for n in ("LPPool1d", "LPPool2d", "LPPool3d")) if c)
_PAD = tuple(
    c
    for c in (
        getattr(nn, f"{kind}Pad{d}d", None)
        for kind in ("Zero", "Constant", "Reflection", "Replication", "Circular")
        for d in (1, 2, 3)
    )
    if c is not None
)
_PAD_MODES = [
    (getattr(nn.modules.padding, n), mode)
    for n, mode in (("_ReflectionPadNd", "reflect"), ("_ReplicationPadNd", "replicate"),
                    ("_CircularPadNd", "circular"))
    if hasattr(nn.modules.padding, n)
]  # fmt: skip
_PERM = (nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass(frozen=True)
class LayerBound:
    """``lower <= Lipschitz constant <= upper`` of one layer on inputs of a given shape."""

    upper: float
    lower: float
    exact: bool
    method: str


def _name(m: nn.Module) -> str:
    return type(m).__name__


def _shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(s) for s in input_shape)


def _exact(value: float, method: str) -> LayerBound:
    return LayerBound(value * (1 + _ROUND), value, True, method)


def _refuse(m: nn.Module, why: str) -> LipganError:
    return LipganError(f"cannot bound {_name(m)} soundly: {why}")


# --------------------------------------------------------------------------------------------
# linear maps


def _bn_scale(m: nn.Module) -> torch.Tensor:
    if m.training or m.running_var is None:
        raise _refuse(
            m,
            "BatchNorm in training mode (or without running statistics) depends on the whole "
            "batch and has no per-sample Lipschitz constant; call model.eval() first",
        )
    scale = 1.0 / torch.sqrt(m.running_var.detach().double() + m.eps)
    if m.weight is not None:
        scale = scale * m.weight.detach().double()
    return scale


def _interp_args(m: nn.Module) -> dict:
    return dict(
        size=m.size,
        scale_factor=m.scale_factor,
        mode=m.mode,
        align_corners=m.align_corners,
        recompute_scale_factor=getattr(m, "recompute_scale_factor", None),
    )


def linear_map(
    module: nn.Module, input_shape: Sequence[int]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The linear part of an affine layer, as a function on batched inputs ``(B, *input_shape)``.

    Forward minus bias, computed functionally from the module's attributes (not its ``forward``):
    comparing it with ``module(x) - module(0)`` checks that the module computes what lipgan
    bounds. Raises ``LipganError`` for a layer that is not affine (activations, max pooling).
    """
    m = module
    shape = _shape(input_shape)
    if isinstance(m, nn.Linear):
        W = m.weight.detach()
        if not shape or shape[-1] != m.in_features:
            raise LipganError(f"Linear expects inputs (..., {m.in_features}), got {shape}")
        return lambda x: F.linear(x, W.to(x.dtype))
    if isinstance(m, _conv.CONV_TYPES):
        return _conv.conv_linear_map(m, shape)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        scale = _bn_scale(m)
        return lambda x: x * scale.reshape(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)
    if isinstance(m, _AVG):
        d = _AVG.index(type(m)) + 1 if type(m) in _AVG else len(shape) - 1
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[d - 1]
        kw = dict(ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad)
        if d > 1:
            kw["divisor_override"] = m.divisor_override
        return lambda x: fn(x, m.kernel_size, m.stride, m.padding, **kw)
    if isinstance(m, _ADAVG):
        d = len(shape) - 1
        fn = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[d - 1]
        return lambda x: fn(x, m.output_size)
    if isinstance(m, nn.Upsample):
        args = _interp_args(m)
        return lambda x: F.interpolate(x, **args)
    if isinstance(m, _PAD):
        mode = "constant"
        for base, name in _PAD_MODES:
            if isinstance(m, base):
                mode = name
        pads = list(m.padding)
        return lambda x: F.pad(x, pads, mode=mode)
    if isinstance(m, nn.Flatten):
        sd, ed = m.start_dim, m.end_dim
        return lambda x: x.flatten(sd, ed)
    if isinstance(m, nn.Unflatten):
        return lambda x: x.unflatten(m.dim, m.unflattened_size)
    if isinstance(m, nn.PixelShuffle):
        return lambda x: F.pixel_shuffle(x, m.upscale_factor)
    if isinstance(m, nn.PixelUnshuffle):
        return lambda x: F.pixel_unshuffle(x, m.downscale_factor)
    if isinstance(m, nn.ChannelShuffle):
        return lambda x: F.channel_shuffle(x, m.groups)
    if isinstance(m, nn.Identity) or (isinstance(m, _DROPOUT) and not m.training):
        return lambda x: x
    from lipgan.models.gan28 import Crop

    if isinstance(m, Crop):
        size = m.size
        return lambda x: x[:, :, :size, :size]
    raise LipganError(f"{_name(m)} is not a linear layer lipgan knows")


# --------------------------------------------------------------------------------------------
# pooling and interpolation


def coverage(n: int, n_out: int, starts, ends) -> int:
    """Max over positions of [0, n) of how many windows ``[starts[o], ends[o])`` hold it."""
    counts = [0] * n
    for o in range(n_out):
        for p in range(max(0, starts[o]), min(n, ends[o])):
            counts[p] += 1
    return max(counts, default=0)


def _dilated_coverage(n, n_out, k, s, p, d) -> int:
    counts = [0] * n
    for o in range(n_out):
        for j in range(k):
            q = o * s - p + d * j
            if 0 <= q < n:
                counts[q] += 1
    return max(counts, default=0)


def _cover_bound(m: nn.Module, shape: tuple[int, ...]) -> LayerBound:
    spatial_d = (
        (_MAX + _ADMAX + _LP).index(type(m)) % 3 + 1
        if type(m) in (_MAX + _ADMAX + _LP)
        else len(shape) - 1
    )
    spatial = shape[-spatial_d:]
    with torch.no_grad():
        out = m(torch.zeros((1, *shape), dtype=torch.float64)).shape[-spatial_d:]
    total = 1
    for ax, (n, no) in enumerate(zip(spatial, out)):
        if isinstance(m, _ADMAX):
            starts = [(o * n) // no for o in range(no)]
            ends = [-(-((o + 1) * n) // no) for o in range(no)]
            total *= coverage(n, no, starts, ends)
            continue

        def at(v, ax=ax):
            return int(v[ax]) if isinstance(v, (tuple, list)) else int(v)

        k = at(m.kernel_size)
        s = at(m.stride if m.stride is not None else m.kernel_size)
        if isinstance(m, _LP):
            total *= _dilated_coverage(n, no, k, s, 0, 1)
        else:
            total *= _dilated_coverage(n, no, k, s, at(m.padding), at(m.dilation))
    return _exact(math.sqrt(total), "cover")


def _avg_bound(m: nn.Module, shape: tuple[int, ...], dense_limit: int) -> LayerBound:
    f = linear_map(m, shape)
    one = (1, *shape[1:])  # every channel alike: the norm of the one-channel map
    dense = dense_operator_norm(f, one, dense_limit)
    if dense is not None:
        return LayerBound(dense, dense / (1 + 1e-9), True, "dense")
    # nonnegative entries: row sums A 1 and column sums A^T 1 from one forward and one vjp
    x = torch.ones((1, *one), dtype=torch.float64)
    with torch.enable_grad():
        y, vjp_fn = torch.func.vjp(f, x)
    cols = vjp_fn(torch.ones_like(y))[0]
    up = math.sqrt(float(y.max()) * float(cols.max())) * (1 + _ROUND)
    low, _ = top_singular_value(f, one, n_iter=100, tol=1e-9)
    return LayerBound(up, min(low, up), False, "schur")


_INTERP_1D = {"nearest": "nearest", "nearest-exact": "nearest-exact", "linear": "linear",
              "bilinear": "linear", "trilinear": "linear", "area": "area"}  # fmt: skip


def interpolate_bound(
    spatial: Sequence[int],
    size=None,
    scale_factor=None,
    mode: str = "nearest",
    align_corners: bool | None = None,
    recompute_scale_factor: bool | None = None,
    dense_limit: int = 2**21,
) -> LayerBound:
    """Bound of ``F.interpolate`` on one channel of spatial shape ``spatial`` (channels alike).

    nearest / linear / area interpolation acts axis by axis: the map is the Kronecker product of
    1-D matrices, whose norm is the product of theirs (each exact by SVD). The factorization is
    checked against torch's N-d call on a random input; other modes use the dense matrix.
    """
    args = dict(size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners,
                recompute_scale_factor=recompute_scale_factor)  # fmt: skip

    def full(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, **args)

    def per_axis(v, ax):
        if v is None:
            return None
        return v[ax] if isinstance(v, (tuple, list)) else v

    mode1 = _INTERP_1D.get(mode)
    if mode1 is not None:
        mats = []
        for ax, n in enumerate(spatial):
            kw = dict(mode=mode1, size=per_axis(size, ax), scale_factor=per_axis(scale_factor, ax))
            if mode1 == "linear":
                kw["align_corners"] = align_corners
            if kw["scale_factor"] is not None:
                kw["recompute_scale_factor"] = recompute_scale_factor
            eye = torch.eye(n, dtype=torch.float64).reshape(n, 1, n)
            mats.append(F.interpolate(eye, **kw).reshape(n, -1).t())  # (out, in)
        g = torch.Generator().manual_seed(0)
        x = torch.randn((1, 1, *spatial), generator=g, dtype=torch.float64)
        y = x[0, 0]
        for ax, A in enumerate(mats):
            y = torch.movedim(torch.tensordot(A, torch.movedim(y, ax, 0), dims=1), 0, ax)
        ref = full(x)[0, 0]
        if y.shape == ref.shape and torch.allclose(y, ref, rtol=1e-10, atol=1e-12):
            value = math.prod(float(torch.linalg.matrix_norm(A, ord=2)) for A in mats)
            return _exact(value, "kron")
    dense = dense_operator_norm(full, (1, *spatial), dense_limit)
    if dense is not None:
        return LayerBound(dense, dense / (1 + 1e-9), True, "dense")
    raise LipganError(
        f"cannot bound interpolation mode {mode!r} on a {tuple(spatial)} input soundly (its "
        f"dense matrix is too large); use nearest, (bi/tri)linear or area"
    )


# --------------------------------------------------------------------------------------------
# the entry point


def layer_bound(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    dense_limit: int = 2**21,
    lower: bool = True,
    n_iter: int = 150,
    seed: int = 0,
    chol_limit: int = _conv.CHOL_LIMIT,
) -> LayerBound:
    """Certified ``upper`` and attained ``lower`` Lipschitz bounds (L2) of one layer.

    ``input_shape``: the layer's input without the batch dimension. ``dense_limit``: the largest
    dense matrix (entries) built for an exact norm. ``lower=False`` skips the power iteration
    where the bound is not exact (``lower`` is then 0). ``n_iter``: its matrix-vector products.
    ``chol_limit``: the largest smaller side of a conv certified by a dense Cholesky; larger ones
    by the block-sparse one where affordable (``convgram.SPARSE_WORK``); 0: no Cholesky.
    Raises ``LipganError`` naming the module when it cannot be bounded soundly. Runs on one
    thread (small linear algebra: a second thread only spins), but for a conv's large Cholesky.
    """
    with _conv.one_thread():
        return _layer_bound(
            module, input_shape, dense_limit=dense_limit, lower=lower, n_iter=n_iter, seed=seed,
            chol_limit=chol_limit,
        )  # fmt: skip


def _layer_bound(module, input_shape, *, dense_limit, lower, n_iter, seed, chol_limit):
    m = module
    shape = _shape(input_shape)
    if isinstance(m, nn.Linear):
        linear_map(m, shape)  # checks the shape
        W = m.weight.detach().double()
        if W.numel() == 0:
            return LayerBound(0.0, 0.0, True, "svd")
        return _exact(float(torch.linalg.matrix_norm(W, ord=2)), "svd")
    if isinstance(m, _conv.CONV_TYPES):
        up, exact, method = _conv.conv_upper_bound(m, shape, dense_limit, chol_limit=chol_limit)
        if exact:
            return LayerBound(up * (1 + _ROUND), up / (1 + 1e-9), True, method)
        low = 0.0
        if lower:
            low, _ = top_singular_value(linear_map(m, shape), shape, n_iter=n_iter, seed=seed)
        if low > up * (1 + 1e-9):
            raise RuntimeError(f"internal error: {_name(m)} attained {low} above its bound {up}")
        return LayerBound(up, low, False, method)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return _exact(float(_bn_scale(m).abs().max()), "diag")
    if isinstance(m, _AVG + _ADAVG):
        return _avg_bound(m, shape, dense_limit)
    if isinstance(m, nn.Upsample):
        return interpolate_bound(shape[1:], dense_limit=dense_limit, **_interp_args(m))
    if isinstance(m, _PAD):
        f = linear_map(m, shape)
        x = torch.ones((1, *shape), dtype=torch.float64)
        with torch.enable_grad():
            y, vjp_fn = torch.func.vjp(f, x)
        counts = vjp_fn(torch.ones_like(y))[0]  # P^T 1: copies of each entry
        return _exact(math.sqrt(float(counts.max())) if counts.numel() else 0.0, "pad")
    if isinstance(m, _PERM) or isinstance(m, nn.Identity):
        return _exact(1.0, "perm")
    if isinstance(m, _DROPOUT):
        if m.training:
            raise _refuse(m, "dropout in training mode is random; call model.eval() first")
        return _exact(1.0, "perm")
    if isinstance(m, _MAX + _ADMAX):
        return _cover_bound(m, shape)
    if _LP and isinstance(m, _LP):
        p = float(m.norm_type)
        if not (p >= 2 and p.is_integer() and int(p) % 2 == 0) or m.ceil_mode:
            raise _refuse(
                m, "LPPool is bounded for an even norm_type (2, 4, ...) and ceil_mode=False only"
            )
        return _cover_bound(m, shape)  # ||a_W||_p - ||b_W||_p <= ||a_W - b_W||_p <= ||.||_2
    from lipgan.layers import GroupSort

    if isinstance(m, GroupSort):
        return _exact(1.0, "const")
    if isinstance(m, nn.Softmax):
        n = (1, *shape)[m.dim] if m.dim is not None and shape else 1
        # Jacobian diag(p) - p p^T: Gershgorin radii 2 p_i (1 - p_i) <= 1/2; uniform p attains 1/n
        return LayerBound(0.5, 1.0 / n if n >= 2 else 0.0, n == 2, "const")
    from lipgan.models.gan28 import Crop

    if isinstance(m, Crop):
        return _exact(1.0, "perm")
    s = slope_range(m)
    if s is not None:
        up = max(abs(s[0]), abs(s[1]))
        att = attained_slope(m)
        return LayerBound(up, att, att == up, "slope")
    raise _refuse(m, "it is not a layer lipgan knows (declare its constant, or use torch layers)")
