"""Vector and matrix norms, spectral norms of layers, Lipschitz constants of simple layers.

The operator norm ``||A||_2 = max_{x != 0} ||A x|| / ||x||`` of every linear layer:

- dense matrices: SVD (:func:`spectral_norm`), or power iteration with kept vectors
  (:class:`PowerIteration`, as SN-GAN, Miyato et al. 2018, runs it once per step);
- ``nn.ConvNd`` / ``nn.ConvTransposeNd`` as maps on inputs of shape (C, *S)
  (:func:`conv_operator_norm`): ``"fft"`` exact for circular padding with output = input /
  stride (Sedghi, Gupta & Long 2019), ``"gram"`` / ``"auto"`` a certified upper bound for any
  padding mode (exact by the dense matrix when small; see :mod:`lipgan.analysis.conv`),
  ``"power"`` Lanczos on the real operator (an attained value, from below), ``"reshaped"`` the
  value SN-GAN normalizes by (not the operator norm: below it for Conv, and for ConvTranspose
  with stride > 1 it can be above it).

Also the Lipschitz constants (and slope ranges) of activations, BatchNorm in eval mode, pooling,
reshapes and residual additions. The per-layer entry point is
:func:`lipgan.analysis.operators.layer_bound`; the iterations live in
:mod:`lipgan.analysis.iteration` (re-exported here: ``lanczos_extreme``,
``gram_iteration_bound``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lipgan.analysis import conv as _conv
from lipgan.analysis.activations import slope_range as _slope_range
from lipgan.analysis.iteration import (
    gram_iteration_bound,
    lanczos_extreme,
    top_singular_value,
)
from lipgan.errors import LipganError

__all__ = [
    "lp_norm",
    "frobenius_norm",
    "spectral_norm",
    "PowerIteration",
    "gram_iteration_bound",
    "conv_operator_norm",
    "lanczos_extreme",
    "conv_power_iteration",
    "conv_frequency_matrices",
    "conv_frobenius_bound",
    "activation_slope_range",
    "activation_constant",
    "batchnorm_constant",
    "pooling_constant",
    "residual_constant",
]


# --------------------------------------------------------------------------------------------
# vectors and matrices


def lp_norm(x: torch.Tensor, p: float, dim: int | Sequence[int] | None = None) -> torch.Tensor:
    """``||x||_p = (sum_i |x_i|^p)^(1/p)`` for real p >= 1; p=inf: max |x_i|; p=0: #{x_i != 0}.

    ``x``: any shape; ``dim``: the dimensions reduced (all when None). The absolute values matter:
    without them an odd p gives negative "norms".
    """
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if not x.is_floating_point() and not x.is_complex():
        x = x.double()
    a = x.abs()
    dims = tuple(range(x.dim())) if dim is None else dim
    if p == 0:
        return (a != 0).sum(dim=dims).to(a.dtype)
    if p == math.inf or p == float("inf"):
        return a.amax(dim=dims) if a.numel() else a.new_zeros(())
    if not isinstance(p, (int, float)) or p < 1:
        raise LipganError(f"lp_norm: p must be 0, inf or a real number >= 1, got {p!r}")
    if p == 1:
        return a.sum(dim=dims)
    if p == 2:
        return a.square().sum(dim=dims).sqrt()
    # Scale by the largest entry first so that |x|^p neither overflows nor underflows.
    m = a.amax(dim=dims, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    s = (a / m).pow(p).sum(dim=dims).pow(1.0 / p)
    return s * m.reshape(s.shape)


def frobenius_norm(W: torch.Tensor) -> float:
    """``||W||_F = sqrt(sum_ij W_ij^2)``; any shape (a conv kernel is taken as its entries)."""
    return float(W.detach().double().square().sum().sqrt())


def spectral_norm(W: torch.Tensor, return_vectors: bool = False):
    """The largest singular value ``sigma = max ||W x|| / ||x||`` of a matrix, exact (SVD).

    ``W``: (m, n), or a conv kernel reshaped to (shape[0], -1). With ``return_vectors`` returns
    ``(sigma, u, v)`` with ``W v = sigma u``, ``||u|| = ||v|| = 1`` (v the top right singular
    vector, where ``||W v|| = sigma ||v||`` holds with equality).
    """
    W = W.detach()
    M = W.reshape(W.shape[0], -1) if W.dim() != 2 else W
    if M.numel() == 0:
        raise LipganError("spectral_norm: empty matrix")
    if not return_vectors:
        return float(torch.linalg.matrix_norm(M, ord=2))
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return float(S[0]), U[:, 0].clone(), Vh[0].conj().clone()


class PowerIteration:
    """Power iteration on ``W^T W`` that keeps its vectors between calls (SN-GAN style).

    Each call runs ``n_iter`` steps ``v <- W^T u / ||W^T u||``, ``u <- W v / ||W v||`` from the kept
    ``u`` and returns ``(sigma, u, v)`` with ``sigma = u^T W v``, a lower bound of the spectral
    norm that reaches it as the iterations accumulate. ``eps`` guards the normalization
    (torch's spectral_norm uses 1e-12). W: (m, n) or a kernel reshaped to (shape[0], -1).
    """

    def __init__(self, n_iter: int = 1, eps: float = 1e-12, seed: int | None = 0) -> None:
        if n_iter < 0:
            raise LipganError(f"PowerIteration: n_iter must be >= 0, got {n_iter}")
        self.n_iter = n_iter
        self.eps = eps
        self.seed = seed
        self.u: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def reset(self) -> None:
        self.u = self.v = None

    @torch.no_grad()
    def __call__(self, W: torch.Tensor, n_iter: int | None = None):
        M = W.detach()
        M = M.reshape(M.shape[0], -1) if M.dim() != 2 else M
        m, _ = M.shape
        if self.u is None or self.u.shape[0] != m or self.u.dtype != M.dtype:
            g = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
            u = torch.randn(m, generator=g, dtype=torch.float64).to(M.dtype)
            self.u = u / u.norm().clamp_min(self.eps)
        u = self.u.to(M.device)
        v = self.v
        for _ in range(self.n_iter if n_iter is None else n_iter):
            v = M.t().conj() @ u
            v = v / v.norm().clamp_min(self.eps)
            u = M @ v
            u = u / u.norm().clamp_min(self.eps)
        if v is None:  # zero iterations and no kept v: one half step so sigma is defined
            v = M.t().conj() @ u
            v = v / v.norm().clamp_min(self.eps)
        self.u, self.v = u, v
        sigma = float((u.conj() @ (M @ v)).real)
        return sigma, u.clone(), v.clone()


# --------------------------------------------------------------------------------------------
# convolutions as linear maps on (C, H, W)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_spec(layer: nn.Module, input_shape: Sequence[int]) -> dict:
    """Everything that defines the layer as a linear map, with its *effective* weight."""
    if not isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
        raise LipganError(
            "conv_operator_norm: expected nn.Conv2d or nn.ConvTranspose2d, got "
            f"{type(layer).__name__}"
        )
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3:
        raise LipganError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if shape[0] != layer.in_channels:
        raise LipganError(
            f"input_shape has {shape[0]} channels but the layer expects {layer.in_channels}"
        )
    transposed = isinstance(layer, nn.ConvTranspose2d)
    spec = dict(
        weight=layer.weight.detach(),  # after any parametrization: the weight the layer uses
        stride=_pair(layer.stride),
        dilation=_pair(layer.dilation),
        groups=int(layer.groups),
        transposed=transposed,
        padding_mode=layer.padding_mode,
        input_shape=shape,
    )
    if transposed:
        spec["padding"] = _pair(layer.padding)
        spec["output_padding"] = _pair(layer.output_padding)
    else:
        # [left, right, top, bottom], also right for padding="same" with even kernels
        lw, rw, th, bh = (int(p) for p in layer._reversed_padding_repeated_twice)
        spec["pads"] = (th, bh, lw, rw)
        spec["padding"] = layer.padding
    return spec


def _apply_conv(x: torch.Tensor, weight: torch.Tensor, spec: dict) -> torch.Tensor:
    """The layer's linear part (no bias) on a batch x of shape (B, C, H, W)."""
    if spec["transposed"]:
        return F.conv_transpose2d(
            x,
            weight,
            None,
            spec["stride"],
            spec["padding"],
            spec["output_padding"],
            spec["groups"],
            spec["dilation"],
        )
    th, bh, lw, rw = spec["pads"]
    if spec["padding_mode"] != "zeros":
        x = F.pad(x, (lw, rw, th, bh), mode=spec["padding_mode"])
        return F.conv2d(x, weight, None, spec["stride"], 0, spec["dilation"], spec["groups"])
    if th == bh and lw == rw:
        return F.conv2d(x, weight, None, spec["stride"], (th, lw), spec["dilation"], spec["groups"])
    x = F.pad(x, (lw, rw, th, bh))
    return F.conv2d(x, weight, None, spec["stride"], 0, spec["dilation"], spec["groups"])


def conv_power_iteration(
    weight: torch.Tensor,
    input_shape: Sequence[int],
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    transposed: bool = False,
    u: torch.Tensor | None = None,
    n_iter: int = 1,
    output_padding=0,
    padding_mode: str = "zeros",
    eps: float = 1e-12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Power iteration on the conv operator A itself (not the reshaped kernel).

    ``u`` (shape (1, C, H, W), the input-space vector kept between calls; random when None) is
    updated ``n_iter`` times by ``u <- A^T A u / ||A^T A u||`` without gradients (A^T through
    autograd), then ``sigma = ||A u||`` is returned *with* gradients with respect to ``weight``,
    so ``weight / sigma`` is an operator-norm spectral normalization (its gradient at convergence
    is that of ``s^T A u`` in SN-GAN). sigma approaches ||A||_2 from below.
    ``input_shape``: (C, H, W) of the layer's input; ``weight`` as in nn.Conv2d (c_out,
    c_in/groups, kh, kw) or nn.ConvTranspose2d (c_in, c_out/groups, kh, kw).
    Returns ``(sigma, u)``: a 0-dim tensor and the new detached unit ``u``.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    spec = dict(
        stride=_pair(stride),
        dilation=_pair(dilation),
        groups=int(groups),
        transposed=bool(transposed),
        padding_mode=padding_mode,
    )
    if transposed:
        spec["padding"] = _pair(padding)
        spec["output_padding"] = _pair(output_padding)
    else:
        if isinstance(padding, str):
            raise LipganError("conv_power_iteration: give padding as numbers, not a string")
        if isinstance(padding, int):
            padding = (padding, padding)
        if len(padding) == 2:
            spec["pads"] = (padding[0], padding[0], padding[1], padding[1])
        else:
            spec["pads"] = tuple(int(p) for p in padding)
    if u is None:
        u = torch.randn((1, *shape), dtype=weight.dtype, device=weight.device)
    u = u.detach().reshape(1, *shape).to(weight.dtype)
    u = u / u.norm().clamp_min(eps)
    w = weight.detach()
    with torch.enable_grad():
        for _ in range(n_iter):
            x = u.clone().requires_grad_(True)
            y = _apply_conv(x, w, spec)
            # A^T A u = grad_x of ||A x||^2 / 2 at x = u
            (g,) = torch.autograd.grad(0.5 * y.square().sum(), x)
            u = (g / g.norm().clamp_min(eps)).detach()
    sigma = _apply_conv(u, weight, spec).norm()
    return sigma, u


def _exact_circular(spec: dict) -> bool:
    """Whether the layer is a full (strided) circulant: circular padding, output = input/stride."""
    if spec["transposed"] or spec["padding_mode"] != "circular":
        return False
    _, H, W = spec["input_shape"]
    (sh, sw), (dh, dw) = spec["stride"], spec["dilation"]
    t, b, lft, r = spec["pads"]
    kh, kw = spec["weight"].shape[-2:]
    Ho = (H + t + b - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + lft + r - dw * (kw - 1) - 1) // sw + 1
    return H % sh == 0 and W % sw == 0 and Ho == H // sh and Wo == W // sw


def conv_frequency_matrices(
    weight: torch.Tensor,
    grid: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """Per-frequency matrices of the circular conv2d on a ``grid`` (divisible by the stride).

    Complex ``(groups, Mh, Mw//2+1, c_out/groups, c_in/groups * sh * sw)`` with M = grid/stride;
    the N-d version is :func:`lipgan.analysis.conv.frequency_matrices`.
    """
    return _conv.frequency_matrices(weight, grid, stride, dilation, groups, onesided=True)


def conv_operator_norm(
    layer: nn.Module,
    input_shape: Sequence[int],
    method: str = "auto",
    n_iter: int = 300,
    tol: float = 1e-9,
    gram_iter: int = 10,
    gram_grids: int = 3,
    return_vector: bool = False,
    dense_limit: int = 2**21,
):
    """Operator norm ``max ||conv(x)|| / ||x||`` of a torch ConvNd / ConvTransposeNd (no bias).

    ``input_shape``: (C, *S) of the layer's input. ``method``: ``"auto"`` / ``"gram"`` a certified
    upper bound for any padding mode, stride, dilation, groups (exact where an exact method
    applies: FFT for a full circulant, the dense matrix when it has at most ``dense_limit``
    entries; ``dense_limit=0`` turns that off); ``"fft"`` exact for circular padding with output =
    input / stride, else a LipganError; ``"power"`` Lanczos on the operator (an attained value
    <= the norm; ``n_iter`` products, Ritz residual ``tol``); ``"reshaped"`` sigma of the kernel
    as a c_out x (c_in k^d) matrix. Returns a float (with ``return_vector`` and ``"power"``:
    ``(sigma, u)`` with u of shape (1, C, *S)). ``gram_iter`` is kept for compatibility.
    """
    if not isinstance(layer, _conv.CONV_TYPES):
        raise LipganError(
            f"conv_operator_norm: expected a torch conv layer, got {type(layer).__name__}"
        )
    shape = tuple(int(v) for v in input_shape)
    if len(shape) == layer.weight.dim() and shape[0] == 1:
        shape = shape[1:]
    geom = _conv.conv_geometry(layer, shape)
    if method == "reshaped":
        w = layer.weight.detach()
        M = w.transpose(0, 1) if geom.transposed else w  # torch's SN uses dim=1 for transposed
        return spectral_norm(M.reshape(M.shape[0], -1))
    if method == "power":
        f = _conv.conv_linear_map(layer, shape)
        sigma, u = top_singular_value(f, shape, n_iter=n_iter, tol=tol)
        return (sigma, u) if return_vector else sigma
    if method == "fft":
        if geom.mode != "circular":
            raise LipganError(
                "method 'fft' is exact only for circular padding with output size = input / "
                "stride; use method='gram' (upper bound) or 'power' (lower bound)"
            )
        bound, exact = _conv._circulant_rows_bound(geom)
        if not exact:
            raise LipganError(
                "method 'fft' is exact only for circular padding with output size = input / "
                "stride; use method='gram' (upper bound) or 'power' (lower bound)"
            )
        return bound
    if method not in ("auto", "gram"):
        raise LipganError(f"unknown method {method!r}; choose auto, fft, power, gram or reshaped")
    return _conv.conv_upper_bound(layer, shape, dense_limit, max(1, gram_grids))[0]


def _cover(k: int, s: int, d: int) -> int:
    """How many (output, tap) pairs of a k-tap, stride-s, dilation-d window read one position."""
    return min(k, -(-k * math.gcd(s, d) // s))


def conv_frobenius_bound(layer: nn.Module) -> float:
    """``||K||_F * sqrt(m)``: a Cauchy-Schwarz bound of a conv's operator norm.

    Each output is a dot product of one filter with one patch, so ``||y||^2 <= sum_o ||K_o||^2
    sum_patches ||patch||^2 <= ||K||_F^2 * m * ||x||^2`` with m the number of patches that contain
    one input position (k^2 for stride 1, ceil(k/s)^2 for stride s). Transposed: the adjoint's.
    """
    w = layer.weight.detach()
    kh, kw = w.shape[-2:]
    (sh, sw), (dh, dw) = _pair(layer.stride), _pair(layer.dilation)
    m = _cover(kh, sh, dh) * _cover(kw, sw, dw)
    return frobenius_norm(w) * math.sqrt(m)


# --------------------------------------------------------------------------------------------
# activations and other simple layers


def activation_slope_range(module: nn.Module) -> tuple[float, float] | None:
    """``(a, b)`` with ``a <= (phi(s) - phi(t)) / (s - t) <= b`` for an elementwise activation.

    None when the module is not a torch elementwise activation with a bounded slope (e.g. Softmax,
    MaxPool, Hardshrink, any user module). See :func:`lipgan.analysis.activations.slope_range`.
    """
    return _slope_range(module)


def activation_constant(module: nn.Module) -> float | None:
    """Lipschitz constant (in L2) of an activation-like module, None when it has none we know.

    Elementwise: max(|a|, |b|) of the slope range. Softmax: 1/2 (its Jacobian diag(p) - p p^T has
    Gershgorin radius 2 p_i (1 - p_i) <= 1/2). lipgan's own GroupSort (found by ``isinstance``,
    never by class name): 1, a permutation on every input.
    """
    r = _slope_range(module)
    if r is not None:
        return max(abs(r[0]), abs(r[1]))
    if isinstance(module, nn.Softmax):
        return 0.5
    from lipgan.layers import GroupSort

    if isinstance(module, GroupSort):
        return 1.0
    return None


def batchnorm_constant(bn: nn.Module) -> float:
    """``max_c |gamma_c| / sqrt(running_var_c + eps)``: BatchNorm in eval mode, a diagonal map."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise LipganError(f"batchnorm_constant: expected BatchNorm, got {type(bn).__name__}")
    if bn.training or bn.running_var is None:
        raise LipganError(
            "BatchNorm in training mode (or without running statistics) depends on the whole "
            "batch and has no per-sample Lipschitz constant; call model.eval() first"
        )
    scale = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double().abs()
    return float(scale.max())


def pooling_constant(layer: nn.Module, input_shape: Sequence[int] | None = None) -> float:
    """Certified Lipschitz constant in L2 of a pooling / resampling layer on (C, *S) inputs.

    Max pooling: ``sqrt(max number of windows holding one entry)`` (1 when windows do not overlap);
    without ``input_shape`` the count ``prod ceil(k / s)``-style bound for any input. Average
    pooling and interpolation are linear and act on each channel alike: the exact norm of the
    one-channel map when small, else a certified bound (see
    :func:`lipgan.analysis.operators.layer_bound`).
    """
    from lipgan.analysis.operators import layer_bound

    pools = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
    if input_shape is None and isinstance(layer, pools):
        d = (1, 2, 3)[[nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d].index(type(layer))]

        def tup(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d

        k, s, dd = (
            tup(layer.kernel_size),
            tup(layer.stride or layer.kernel_size),
            tup(layer.dilation),
        )
        return math.sqrt(math.prod(_cover(a, b, c) for a, b, c in zip(k, s, dd)))
    if input_shape is None and isinstance(layer, nn.Upsample) and layer.mode == "nearest":
        sf = layer.scale_factor
        if sf is not None:
            sf = sf if isinstance(sf, tuple) else (sf,)
            if all(float(f).is_integer() for f in sf) and len(sf) > 1:
                return math.sqrt(math.prod(float(f) for f in sf))  # each input copied prod sf
    if input_shape is None:
        raise LipganError(f"{type(layer).__name__} needs the input shape (C, H, W)")
    return layer_bound(layer, input_shape, lower=False).upper


def residual_constant(*branch_constants: float) -> float:
    """``x -> x + f(x)``: Lipschitz constant at most ``1 + L_f`` (triangle inequality); for
    ``x -> sum_i f_i(x)`` at most ``sum_i L_i``. Pass the branches' constants (identity = 1)."""
    return float(sum(branch_constants))
