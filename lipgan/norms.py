"""Vector and matrix norms, exact spectral norms of layers, Lipschitz constants of simple layers.

The operator norm ``||A||_2 = max_{x != 0} ||A x|| / ||x||`` of every linear layer, computed exactly
where an exact method exists:

- dense matrices: SVD (:func:`spectral_norm`), or power iteration with kept vectors
  (:class:`PowerIteration`, as SN-GAN, Miyato et al. 2018, runs it once per step);
- ``nn.Conv2d`` / ``nn.ConvTranspose2d`` as maps on inputs of shape (C, H, W)
  (:func:`conv_operator_norm`): ``"fft"`` is exact for circular padding (Sedghi, Gupta & Long
  2019: the singular values are those of the per-frequency c_out x c_in matrices of the kernel's
  2-D DFT), ``"power"`` iterates on the real operator (from below), ``"gram"`` is a guaranteed
  upper bound for zero padding (Gram iteration, Delattre et al. 2023, on the per-frequency
  matrices of a circular conv on a grid large enough to contain the zero-padded one; strides by
  space-to-depth), ``"reshaped"`` is the value SN-GAN normalizes by (not the operator norm).

Also the Lipschitz constants (and slope ranges) of activations, BatchNorm in eval mode, pooling,
reshapes and residual additions, used by :mod:`lipgan.lipschitz`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

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


def gram_iteration_bound(mats: torch.Tensor, n_iter: int = 10, prune: bool = False) -> torch.Tensor:
    """Upper bounds of the spectral norms of a batch of matrices (..., m, n) by Gram iteration.

    ``G_0 = W``, ``G_{t+1} = G_t^H G_t`` gives ``sigma(W)^(2^t) = sigma(G_t) <= ||G_t||_F``, so
    ``sigma(W) <= ||G_t||_F^(1/2^t)``, which decreases to sigma (Delattre et al. 2023); also
    ``sigma(W) >= (||G_t||_F / sqrt(rank))^(1/2^t)``. Each step is rescaled and the scale kept in
    logs so nothing overflows. With ``prune`` only the batch maximum is wanted: matrices whose
    upper bound falls below another's lower bound stop iterating (their entry keeps its last,
    still valid, bound). Returns shape (...,), float64.
    """
    G = mats.to(torch.complex128 if mats.is_complex() else torch.float64)
    if G.shape[-2] > G.shape[-1]:
        G = G.mT.conj()  # same singular values, smaller Gram matrices
    batch = G.shape[:-2]
    G = G.reshape(-1, *G.shape[-2:])
    rank = min(G.shape[-2:])
    log_scale = torch.zeros(G.shape[0], dtype=torch.float64, device=G.device)
    result = torch.empty(G.shape[0], dtype=torch.float64, device=G.device)
    alive = torch.arange(G.shape[0], device=G.device)
    for t in range(n_iter + 1):
        r = torch.linalg.matrix_norm(G, ord="fro").clamp_min(1e-300)
        upper = (log_scale + torch.log(r)) / (2.0**t)
        result[alive] = torch.exp(upper)
        if t == n_iter:
            break
        if prune and G.shape[0] > 1:
            lower = (log_scale + torch.log(r) - 0.5 * math.log(rank)) / (2.0**t)
            keep = upper >= lower.max()
            G, log_scale, r, alive = G[keep], log_scale[keep], r[keep], alive[keep]
        G = G / r[:, None, None].to(G.dtype)
        log_scale = 2.0 * (log_scale + torch.log(r))
        G = G.mT.conj() @ G
    return result.reshape(batch)


def lanczos_extreme(
    matvec,
    v0: torch.Tensor,
    n_iter: int = 300,
    tol: float = 1e-10,
    which: str = "largest",
    krylov: int = 60,
) -> tuple[float, torch.Tensor]:
    """Extreme eigenpair of a symmetric operator by restarted Lanczos (full reorthogonalization).

    ``matvec(x)``: x of any shape -> the operator applied, same shape; ``v0``: start vector.
    Builds Krylov spaces of up to ``krylov`` vectors, restarts from the best Ritz vector, and stops
    when the residual ``||M y - theta y|| <= tol * |theta|`` or after ``n_iter`` products. Ritz
    values lie inside the spectrum, so ``"largest"`` approaches lambda_max from below.
    Returns ``(theta, y)`` with y a unit vector of v0's shape.
    """
    if which not in ("largest", "smallest"):
        raise LipganError(f"which must be 'largest' or 'smallest', got {which!r}")
    shape = v0.shape
    y = v0.detach().reshape(-1)
    y = y / y.norm().clamp_min(1e-300)
    used = 0
    theta = float("nan")
    while used < n_iter:
        m = min(krylov, n_iter - used)
        V = [y]
        alphas: list[float] = []
        betas: list[float] = []
        for j in range(m):
            w = matvec(V[j].reshape(shape)).detach().reshape(-1)
            used += 1
            a = float(w @ V[j])
            alphas.append(a)
            Q = torch.stack(V)
            for _ in range(2):  # reorthogonalize twice: once is not enough in floating point
                w = w - Q.t() @ (Q @ w)
            b = float(w.norm())
            betas.append(b)
            if j == m - 1 or b <= 1e-14 * max(abs(a), 1e-300):
                break
            V.append(w / b)
        k = len(alphas)
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if k > 1:
            off = torch.tensor(betas[: k - 1], dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        idx = -1 if which == "largest" else 0
        theta = float(evals[idx])
        s = evecs[:, idx].to(y.dtype)
        y = (torch.stack(V[:k]).t() @ s).reshape(-1)
        y = y / y.norm().clamp_min(1e-300)
        residual = abs(betas[k - 1] * float(s[-1]))
        if residual <= tol * max(abs(theta), 1e-300):
            break
    return theta, y.reshape(shape)


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


def _conv_as_circular(spec: dict) -> tuple[torch.Tensor, dict]:
    """The conv2d whose operator norm equals (transposed) or bounds (zero padding) the layer's.

    A transposed conv is the adjoint of conv2d(weight, stride, padding, dilation, groups) on inputs
    of the transposed conv's *output* shape, and a map and its adjoint have the same norm.
    Returns the conv2d kernel and (in_hw, stride, dilation, pads, groups, circular).
    """
    w = spec["weight"]
    C, H, W = spec["input_shape"]
    s, d, g = spec["stride"], spec["dilation"], spec["groups"]
    if spec["transposed"]:
        kh, kw = w.shape[-2:]
        p, op = spec["padding"], spec["output_padding"]
        Ho = (H - 1) * s[0] - 2 * p[0] + d[0] * (kh - 1) + op[0] + 1
        Wo = (W - 1) * s[1] - 2 * p[1] + d[1] * (kw - 1) + op[1] + 1
        return w, dict(hw=(Ho, Wo), stride=s, dilation=d, pads=(p[0], p[0], p[1], p[1]), groups=g)
    return w, dict(hw=(H, W), stride=s, dilation=d, pads=spec["pads"], groups=g)


def conv_frequency_matrices(
    weight: torch.Tensor,
    grid: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """Per-frequency matrices of the circular conv2d on a ``grid`` (divisible by the stride).

    A stride-s circular conv on an N x N grid equals a stride-1 circular conv on the (N/s)^2 grid
    of the input's s^2 polyphase components (space to depth), whose kernel tap q of phase a is
    the original tap with d*k = s*q + a. Its singular values are those of the matrices
    ``sum_q K'[:, :, q] exp(2 pi i <q, w> / M)`` at the M^2 frequencies w (Sedghi et al. 2019).
    weight: (c_out, c_in/groups, kh, kw). Returns complex (groups, Mh, Mw//2+1, c_out/groups,
    c_in/groups * sh * sw); the other half of the frequencies are complex conjugates.
    """
    (Nh, Nw), (sh, sw), (dh, dw) = grid, stride, dilation
    if Nh % sh or Nw % sw:
        raise LipganError(f"grid {grid} is not divisible by the stride {stride}")
    Mh, Mw = Nh // sh, Nw // sw
    co, cig, kh, kw = weight.shape
    wk = weight.detach().to(torch.float64)
    poly = wk.new_zeros(co, cig, sh, sw, Mh, Mw)
    for a in range(kh):
        qa, pa = divmod(dh * a, sh)
        for b in range(kw):
            qb, pb = divmod(dw * b, sw)
            # taps beyond the grid wrap around, as a circular conv does
            poly[:, :, pa, pb, qa % Mh, qb % Mw] += wk[:, :, a, b]
    # exp(+i...) gives the conjugate of the FFT: the same singular values
    spec = torch.fft.rfft2(poly, dim=(-2, -1))
    g = groups
    spec = spec.reshape(g, co // g, cig * sh * sw, Mh, spec.shape[-1])
    return spec.permute(0, 3, 4, 1, 2)


def _gram_grids(hw, pads, stride, ksize, dilation) -> list[tuple[int, int]]:
    """Grids, divisible by the stride, whose circular conv contains the zero-padded conv.

    With the input placed after the top padding t, an output i reads positions s*i + d*a in
    [0, H + t + b); on a grid N >= H + max(t, b) (and N >= s * #outputs, so that outputs stay
    distinct) every read past the data wraps into the zeros before it, so the zero-padded conv is
    a submatrix of the circular one and its norm is at most the circular norm.
    Returns the smallest such grid and the next few sizes.
    """
    out = []
    for n, (lo, hi), s, k, d in zip(hw, (pads[:2], pads[2:]), stride, ksize, dilation):
        n_out = (n + lo + hi - d * (k - 1) - 1) // s + 1
        first = max(n + max(lo, hi), s * n_out)
        first = -(-first // s) * s
        out.append([first + s * j for j in range(6)])
    return list(zip(out[0], out[1]))


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


def conv_operator_norm(
    layer: nn.Module,
    input_shape: Sequence[int],
    method: str = "auto",
    n_iter: int = 300,
    tol: float = 1e-6,
    gram_iter: int = 10,
    gram_grids: int = 2,
    return_vector: bool = False,
    dense_limit: int = 2048,
):
    """Operator norm ``max ||conv(x)|| / ||x||`` of nn.Conv2d / nn.ConvTranspose2d (bias ignored).

    ``input_shape``: (C, H, W) of the layer's input. ``method``:
    ``"fft"`` exact for circular padding with output = input / stride (Sedghi et al. 2019);
    ``"power"`` power iteration then Lanczos on the operator (lower bound; up to ``n_iter``
    products, stops when the Ritz residual is below ``tol`` relatively, so sigma is off by at most
    tol/2 and in practice by ~tol^2); ``"gram"`` guaranteed upper bound for any
    padding (Delattre et al. 2023); ``"reshaped"`` sigma of the kernel as a c_out x (c_in k k)
    matrix (what SN-GAN normalizes by, not the operator norm); ``"auto"``: fft where exact, else
    gram. Returns a float (with ``return_vector`` and ``"power"``: (sigma, u of shape (1,C,H,W))).
    For ``"gram"`` on a layer whose input has at most ``dense_limit`` entries, Gram iteration also
    runs on the operator's dense matrix (built from the basis vectors): on tiny inputs the circular
    embedding is several percent loose, the dense bound is not.
    """
    spec = _conv_spec(layer, input_shape)
    if method == "auto":
        method = "fft" if _exact_circular(spec) else "gram"
    if method == "reshaped":
        w = spec["weight"]
        M = w.transpose(0, 1) if spec["transposed"] else w  # torch's SN uses dim=1 for transposed
        return spectral_norm(M.reshape(M.shape[0], -1))
    if method == "power":
        w = spec["weight"]
        pad_arg = spec["padding"] if spec["transposed"] else spec["pads"]
        sp = dict(spec)

        def gram_mv(x: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                y = _apply_conv(x, w, sp)
                (g,) = torch.autograd.grad(0.5 * y.square().sum(), x)
            return g

        # A few plain power steps (as SN-GAN would), then Lanczos on the Krylov space they span:
        # the clustered top of a conv's spectrum makes plain power iteration crawl.
        _, u = conv_power_iteration(
            w,
            spec["input_shape"],
            spec["stride"],
            pad_arg,
            spec["dilation"],
            spec["groups"],
            spec["transposed"],
            n_iter=3,
            output_padding=spec.get("output_padding", 0),
            padding_mode=spec["padding_mode"],
        )
        _, u = lanczos_extreme(gram_mv, u, n_iter=n_iter, tol=tol, which="largest")
        with torch.no_grad():
            sigma = float(_apply_conv(u, w, spec).norm() / u.norm())
        return (sigma, u) if return_vector else sigma
    if method not in ("fft", "gram"):
        raise LipganError(f"unknown method {method!r}; choose auto, fft, power, gram or reshaped")
    w, c = _conv_as_circular(spec)
    if method == "fft":
        if not _exact_circular(spec):
            raise LipganError(
                "method 'fft' is exact only for circular padding with output size = input / "
                "stride; use method='gram' (upper bound) or 'power' (lower bound)"
            )
        # the circular shift by the padding is a permutation of the input: norm unchanged
        mats = conv_frequency_matrices(w, c["hw"], c["stride"], c["dilation"], c["groups"])
        mats = mats.reshape(-1, *mats.shape[-2:])
        if mats.shape[-2] > mats.shape[-1]:
            mats = mats.mT.conj()
        gram = mats @ mats.mT.conj()
        return float(torch.linalg.eigvalsh(gram).amax().clamp_min(0).sqrt())
    if _exact_circular(spec):
        grids = [c["hw"]]
    else:
        grids = _gram_grids(c["hw"], c["pads"], c["stride"], w.shape[-2:], c["dilation"])
        grids = grids[: max(1, gram_grids)]
    best = math.inf
    for grid in grids:
        mats = conv_frequency_matrices(w, grid, c["stride"], c["dilation"], c["groups"])
        mats = mats.reshape(-1, *mats.shape[-2:])
        # Only the frequencies near the top can hold the maximum: a backward-stable eigensolver
        # places every sigma within ~1e-13 relative, far inside the 1e-3 margin, so Gram iteration
        # (batched complex products are slow on CPU) runs on those few matrices alone.
        small = mats.mT.conj() if mats.shape[-2] > mats.shape[-1] else mats
        small = small.to(torch.complex64)  # single precision is plenty for choosing candidates
        approx = torch.linalg.eigvalsh(small @ small.mT.conj()).amax(-1).clamp_min(0).sqrt()
        approx = approx.double()
        cand = approx >= (1 - 1e-3) * approx.max()
        bound = float(gram_iteration_bound(mats[cand], gram_iter, prune=True).max())
        # every valid grid gives a valid bound, and their frequency samples differ: keep the least
        best = min(best, bound)
    n_in = math.prod(spec["input_shape"])
    if n_in <= dense_limit:
        # Gram iteration on the dense operator: sigma <= ||G_t||_F^(1/2^t) <= sigma * r^(2^-(t+1)),
        # so 12 steps are within 0.2% for rank r <= 2048, and the bound stays certified.
        with torch.no_grad():
            w64 = spec["weight"].double()
            basis = torch.eye(n_in, dtype=torch.float64, device=w64.device)
            basis = basis.reshape(n_in, *spec["input_shape"])
            dense = _apply_conv(basis, w64, spec).reshape(n_in, -1)
        best = min(best, float(gram_iteration_bound(dense, max(gram_iter, 12))))
    return best


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


def _derivative_range(fn, lo: float = -30.0, hi: float = 30.0) -> tuple[float, float]:
    """Min and max of fn' on a fine grid (float64), rounded outward by 1e-6."""
    x = torch.linspace(lo, hi, 600001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return float(g.min()) - 1e-6, float(g.max()) + 1e-6


# Smooth activations whose slope range has no closed form: computed once, on first use.
_NUMERIC_RANGES: dict[str, tuple[float, float]] = {}


def _numeric_range(key: str, fn) -> tuple[float, float]:
    if key not in _NUMERIC_RANGES:
        _NUMERIC_RANGES[key] = _derivative_range(fn)
    return _NUMERIC_RANGES[key]


#: lipgan's own 1-Lipschitz layers (found by class name: the sort/max of pairs are permutations
#: of their inputs piecewise, hence 1-Lipschitz; Anil et al. 2019)
ONE_LIPSCHITZ_NAMES = {"GroupSort", "MaxMin", "FullSort", "MinMax"}


def activation_slope_range(module: nn.Module) -> tuple[float, float] | None:
    """``(a, b)`` with ``a <= (phi(s) - phi(t)) / (s - t) <= b`` for an elementwise activation.

    None when the module is not an elementwise activation with a bounded slope (e.g. Softmax,
    MaxPool, Hardshrink). ReLU (0, 1), LeakyReLU(s) (min(s,1), max(s,1)), Sigmoid (0, 1/4), ...
    """
    m = module
    if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Tanh, nn.Softsign, nn.Softshrink)):
        return (0.0, 1.0)
    if isinstance(m, (nn.CELU, nn.Softplus, nn.LogSigmoid, nn.Tanhshrink)):
        return (0.0, 1.0)
    if isinstance(m, nn.LeakyReLU):
        s = float(m.negative_slope)
        return (min(s, 1.0), max(s, 1.0))
    if isinstance(m, nn.RReLU):
        if m.training:
            s_lo, s_hi = float(m.lower), float(m.upper)
            return (min(s_lo, 1.0), max(s_hi, 1.0))
        s = (float(m.lower) + float(m.upper)) / 2  # eval: the fixed mean slope
        return (min(s, 1.0), max(s, 1.0))
    if isinstance(m, nn.PReLU):
        w = m.weight.detach()
        return (min(float(w.min()), 1.0), max(float(w.max()), 1.0))
    if isinstance(m, nn.ELU):
        a = float(m.alpha)  # slope 1 for x > 0, a e^x in (0, a) for x < 0
        return (min(0.0, a), max(1.0, a))
    if isinstance(m, nn.SELU):
        scale, alpha = 1.0507009873554805, 1.6732632423543772
        return (0.0, scale * max(1.0, alpha))
    if isinstance(m, nn.Sigmoid):
        return (0.0, 0.25)
    if isinstance(m, nn.Hardsigmoid):
        return (0.0, 1.0 / 6.0)
    if isinstance(m, nn.Hardswish):
        return (-0.5, 1.5)  # slope (2x+3)/6 on [-3, 3]
    if isinstance(m, nn.SiLU):
        return _numeric_range("silu", F.silu)
    if isinstance(m, nn.GELU):
        approx = m.approximate
        return _numeric_range(f"gelu-{approx}", lambda x: F.gelu(x, approximate=approx))
    if isinstance(m, nn.Mish):
        return _numeric_range("mish", F.mish)
    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)):
        return (1.0, 1.0)
    return None


def activation_constant(module: nn.Module) -> float | None:
    """Lipschitz constant (in L2) of an activation-like module, None when it has none we know.

    Elementwise: max(|a|, |b|) of the slope range. Softmax: 1/2 (its Jacobian diag(p) - p p^T has
    Gershgorin radius 2 p_i (1 - p_i) <= 1/2). lipgan's GroupSort / MaxMin: 1.
    """
    r = activation_slope_range(module)
    if r is not None:
        return max(abs(r[0]), abs(r[1]))
    if isinstance(module, nn.Softmax):
        return 0.5
    if type(module).__name__ in ONE_LIPSCHITZ_NAMES:
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


def _dense_norm(fn, shape: Sequence[int], limit: int = 4096) -> float | None:
    """Exact norm of a linear map on (C?, H, W) inputs by applying it to every basis vector."""
    n = math.prod(shape)
    if n > limit:
        return None
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        out = fn(eye).reshape(n, -1)
    return float(torch.linalg.matrix_norm(out, ord=2))


def pooling_constant(layer: nn.Module, input_shape: Sequence[int] | None = None) -> float:
    """Lipschitz constant in L2 of a pooling / resampling layer (``input_shape`` (C, H, W)).

    Max pooling: ``|max a - max b| <= ||a - b||_inf`` per window, and each position lies in at
    most m windows, so sqrt(m) (1 when windows do not overlap). Average pooling and nearest
    upsampling are linear and act on each channel alike: exact norm from the per-channel matrix
    on small inputs, else the Schur bound sqrt(max row sum * max column sum).
    """
    if isinstance(layer, (nn.MaxPool2d, nn.MaxPool1d)):
        k, s, d = (
            _pair(layer.kernel_size),
            _pair(layer.stride or layer.kernel_size),
            _pair(layer.dilation),
        )
        if isinstance(layer, nn.MaxPool1d):
            return math.sqrt(_cover(k[0], s[0], d[0]))
        return math.sqrt(_cover(k[0], s[0], d[0]) * _cover(k[1], s[1], d[1]))
    if isinstance(layer, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)):
        if input_shape is None:
            raise LipganError(f"{type(layer).__name__} needs the input shape (C, H, W)")
        _, H, W = input_shape
        out = _pair(
            tuple(o if o is not None else i for o, i in zip(_pair_none(layer.output_size), (H, W)))
        )
        cov = []
        for n, o in zip((H, W), out):
            starts = [(i * n) // o for i in range(o)]
            ends = [-(-((i + 1) * n) // o) for i in range(o)]
            cov.append(max(sum(1 for a, b in zip(starts, ends) if a <= p < b) for p in range(n)))
        if isinstance(layer, nn.AdaptiveMaxPool2d):
            return math.sqrt(cov[0] * cov[1])
    if isinstance(layer, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Upsample, nn.UpsamplingNearest2d)):
        if isinstance(layer, nn.Upsample) and layer.mode == "nearest" and layer.scale_factor:
            sf = layer.scale_factor
            sf = sf if isinstance(sf, tuple) else (sf, sf)
            if all(float(f).is_integer() for f in sf):
                return math.sqrt(float(sf[0]) * float(sf[1]))  # each input copied sf^2 times
        if input_shape is None:
            raise LipganError(f"{type(layer).__name__} needs the input shape (C, H, W)")
        _, H, W = input_shape
        exact = _dense_norm(lambda x: layer(x.to(torch.float64)), (1, H, W))
        if exact is not None:
            return exact
        if isinstance(layer, nn.AvgPool2d):
            k, s = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size)
            p = _pair(layer.padding)
            if layer.divisor_override:
                wmax = 1.0 / layer.divisor_override
            elif layer.count_include_pad or p == (0, 0):
                wmax = 1.0 / (k[0] * k[1])
            else:
                wmax = 1.0 / max(1, (k[0] - p[0]) * (k[1] - p[1]))
            rows = k[0] * k[1] * wmax
            cols = _cover(k[0], s[0], 1) * _cover(k[1], s[1], 1) * wmax
            return math.sqrt(rows * cols)
        if isinstance(layer, nn.AdaptiveAvgPool2d):
            # rows sum to 1; a column sums to at most (windows containing it) / (smallest window)
            smallest = max(1, (H // out[0])) * max(1, (W // out[1]))
            return math.sqrt(cov[0] * cov[1] / smallest)
        raise LipganError(f"cannot bound {type(layer).__name__} on an input this large")
    raise LipganError(f"pooling_constant: {type(layer).__name__} is not a pooling layer")


def _pair_none(v):
    return (v, v) if not isinstance(v, (tuple, list)) else tuple(v)


def residual_constant(*branch_constants: float) -> float:
    """``x -> x + f(x)``: Lipschitz constant at most ``1 + L_f`` (triangle inequality); for
    ``x -> sum_i f_i(x)`` at most ``sum_i L_i``. Pass the branches' constants (identity = 1)."""
    return float(sum(branch_constants))
