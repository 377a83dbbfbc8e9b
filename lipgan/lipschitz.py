"""Lipschitz constants of whole networks: a per-layer table, upper bounds, lower bounds, the gap.

For a chain ``f = B_m o phi_{m-1} o ... o phi_1 o B_1`` (B_k affine, phi_k elementwise with
slopes in [a_k, b_k]) every difference is ``f(x) - f(y) = B_m D_{m-1} ... D_1 B_1 (x - y)`` with
data-dependent diagonal D_k whose entries lie in [a_k, b_k] (mean value theorem; biases cancel). All
upper bounds below bound ``||B_m D_{m-1} ... D_1 B_1||`` over every such D (proofs in
docs/theory.md):

- ``frobenius_product``: prod ||B_k||_F (convs: kernel norm times sqrt(patch overlap)) * prod L_k;
- ``operator_product``: prod ||B_k||_2 (exact, or the certified "gram" bound for zero-padded
  convs) * prod L_k;
- ``merged_segments``: write D_k = c_k I + r_k S_k with c = (a+b)/2, r = (b-a)/2, ||S_k|| <= 1, and
  expand the product (Combettes & Pesquet 2020 for ReLU): a sum over subsets of the activations of
  c/r weights times products of norms of *merged* runs of layers, computed exactly when the run's
  matrix has a small side;
- ``lipsdp_partition``: the chain cut at activations into groups; groups with one activation are
  bounded by LipSDP-Neuron (Fazlyab et al. 2019) with a feasible multiplier T found by a
  first-order method on the Schur complement (any feasible T certifies), others by
  merged_segments; the best partition by dynamic programming.

Lower bounds: ``jacobian`` (max over inputs of ||J_f(x)||_2, gradient/hill-climbing ascent with
restarts, power/Lanczos on J^T J) and ``pairs`` (max ||f(x1) - f(x2)|| / ||x1 - x2|| over pairs,
ascended). Only chains (``nn.Sequential``, nested) are bounded; anything else raises LipganError
naming what cannot be bounded.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lipgan import norms
from lipgan.errors import LipganError

__all__ = [
    "LipschitzReport",
    "layer_table",
    "estimate",
    "upper_bounds",
    "lower_bounds",
    "lipsdp_neuron",
    "lipsdp_neuron_cvxpy",
    "jacobian_norm",
]

#: lipgan layers that are linear with norm 1 (coordinate projections), by class name
LINEAR_NORM1_NAMES = {"Crop"}

_IDENTITY_TYPES = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ZeroPad2d,
)


# --------------------------------------------------------------------------------------------
# walking a chain


@dataclass
class _Leaf:
    name: str
    module: nn.Module
    kind: str  # "linear" | "act" | "cut"
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    lin: Callable[[torch.Tensor], torch.Tensor] | None = None  # linear part, batch in/out
    operator: float = 1.0  # certified bound of ||linear part|| (exact where possible)
    operator_method: str = ""
    frobenius: float | None = None  # ||W||_F of the weight
    frobenius_bound: float = 1.0  # a Frobenius-based bound of the norm
    reshaped: float | None = None
    slope: tuple[float, float] | None = None  # activations
    constant: float = 1.0  # Lipschitz constant used in the products


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Leaf layers of nested Sequentials in call order."""
    if isinstance(module, nn.Sequential):
        out = []
        for name, child in module.named_children():
            out += _leaves(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix or type(module).__name__, module)]


def _cannot(name: str, module: nn.Module, why: str) -> LipganError:
    return LipganError(
        f"cannot bound layer {name!r} ({type(module).__name__}): {why}. lipgan bounds chains "
        "(nn.Sequential, nested) of Linear, Conv2d, ConvTranspose2d, elementwise activations, "
        "BatchNorm in eval mode, pooling, Flatten and Dropout"
    )


def _linear_part(name: str, m: nn.Module, in_shape) -> tuple[Callable, float, str, dict]:
    """(linear map without bias, certified norm, method, extra columns) of a linear leaf."""
    extra: dict = {}
    if isinstance(m, nn.Linear):
        W = m.weight.detach()  # effective weight: parametrizations (e.g. spectral norm) applied
        extra["frobenius"] = norms.frobenius_norm(W)
        extra["frobenius_bound"] = extra["frobenius"]
        return (lambda x, W=W: F.linear(x, W)), norms.spectral_norm(W), "svd", extra
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        spec = norms._conv_spec(m, in_shape)
        w = spec["weight"]
        extra["frobenius"] = norms.frobenius_norm(w)
        extra["frobenius_bound"] = norms.conv_frobenius_bound(m)
        extra["reshaped"] = norms.conv_operator_norm(m, in_shape, "reshaped")
        method = "fft" if norms._exact_circular(spec) else "gram"
        op = norms.conv_operator_norm(m, in_shape, method)
        return (lambda x, w=w, spec=spec: norms._apply_conv(x, w, spec)), op, method, extra
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        c = norms.batchnorm_constant(m)  # raises in training mode
        scale = 1.0 / torch.sqrt(m.running_var.detach() + m.eps)
        if m.weight is not None:
            scale = scale * m.weight.detach()

        def bn(x, scale=scale):
            return x * scale.reshape(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)

        return bn, c, "diagonal", extra
    if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Upsample)):
        if isinstance(m, nn.Upsample) and m.mode != "nearest":
            raise _cannot(name, m, "only nearest upsampling is bounded")
        return m, norms.pooling_constant(m, in_shape), "pooling", extra
    if isinstance(m, _IDENTITY_TYPES) or type(m).__name__ in LINEAR_NORM1_NAMES:
        if isinstance(m, nn.ZeroPad2d) and float(m.value) != 0.0:
            raise _cannot(name, m, "padding with a nonzero value is affine; use ZeroPad2d")
        return m, 1.0, "isometry", extra
    raise KeyError


def _walk(model: nn.Module, input_shape: Sequence[int]) -> list[_Leaf]:
    """Classify every leaf of the chain and record its shapes (model must be in eval mode)."""
    if not isinstance(model, nn.Sequential):
        pairs = [(type(model).__name__, model)]
        known = isinstance(model, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))
        if not known:
            raise _cannot(
                type(model).__name__,
                model,
                "its forward is not a chain lipgan can read (wrap the layers in nn.Sequential)",
            )
    else:
        pairs = _leaves(model)
    x = torch.zeros(1, *input_shape, dtype=_dtype(model))
    leaves: list[_Leaf] = []
    for name, m in pairs:
        in_shape = tuple(x.shape[1:])
        with torch.no_grad():
            try:
                x = m(x)
            except Exception as exc:  # a shape the layer does not accept: say which
                raise LipganError(
                    f"layer {name!r} ({type(m).__name__}) fails on inputs of shape {in_shape}: "
                    f"{exc}; give the model's input shape (C,H,W)"
                ) from None
        out_shape = tuple(x.shape[1:])
        leaf = _Leaf(name, m, "linear", in_shape, out_shape)
        try:
            lin, op, method, extra = _linear_part(name, m, in_shape)
            leaf.lin, leaf.operator, leaf.operator_method = lin, op, method
            leaf.frobenius = extra.get("frobenius")
            leaf.frobenius_bound = extra.get("frobenius_bound", op)
            leaf.reshaped = extra.get("reshaped")
            leaf.constant = op
        except KeyError:
            slope = norms.activation_slope_range(m)
            const = norms.activation_constant(m)
            if slope is not None:
                leaf.kind, leaf.slope, leaf.constant = "act", slope, const
            elif const is not None:
                leaf.kind, leaf.constant = "cut", const
            elif isinstance(m, (nn.MaxPool2d, nn.MaxPool1d, nn.AdaptiveMaxPool2d)):
                leaf.kind, leaf.constant = "cut", norms.pooling_constant(m, in_shape)
            elif isinstance(getattr(m, "lipschitz_constant", None), (int, float)):
                leaf.kind, leaf.constant = "cut", float(m.lipschitz_constant)
            elif any(True for _ in m.children()) or any(True for _ in m.parameters()):
                raise _cannot(name, m, "a layer of unknown type") from None
            else:
                raise _cannot(name, m, "no Lipschitz constant is known for it") from None
            leaf.operator = leaf.frobenius_bound = leaf.constant
            leaf.operator_method = "constant"
        leaves.append(leaf)
    _check_chain(model, leaves, input_shape)
    return leaves


def _dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def _check_chain(model: nn.Module, leaves: list[_Leaf], input_shape) -> None:
    """The chain of leaves must compute the model (a Sequential subclass may change forward)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *input_shape, generator=g).to(_dtype(model))
    with torch.no_grad():
        y = model(x)
        z = x
        for leaf in leaves:
            z = leaf.module(z)
    if y.numel() != z.numel() or not torch.allclose(
        y.reshape(-1), z.reshape(-1), rtol=1e-4, atol=1e-5
    ):
        raise LipganError(
            f"{type(model).__name__}.forward does not compute the chain of its layers (it "
            "changes more than the output's shape); lipgan cannot bound it"
        )


def _prepare(model: nn.Module) -> nn.Module:
    """A float64 CPU copy in eval mode: Dropout off, BatchNorm on running stats, no SN updates.

    On the CPU because the analysis is float64 and small-batch (and so that a model trained on a
    GPU is bounded the same way); the caller's model is left where it is.
    """
    m = copy.deepcopy(model).cpu()
    m.eval()
    return m.double()


def _infer_shape(model: nn.Module, input_shape) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    first = _leaves(model)[0][1] if isinstance(model, nn.Sequential) else model
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    raise LipganError(
        "give the input shape (C,H,W) of the model, e.g. --input-shape 1,28,28 or "
        "input_shape=(1, 28, 28)"
    )


def layer_table(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[dict]:
    """One row per layer: name, type, shapes, Frobenius norm, operator norm, reshaped norm
    (convs), activation constant. The operator norm is exact (SVD, fft) or a certified upper
    bound ("gram"); ``constant`` is the Lipschitz constant the products use."""
    m = _prepare(model)
    shape = _infer_shape(m, input_shape)
    return [_row(leaf) for leaf in _walk(m, shape)]


def _stable_rank(leaf: _Leaf) -> float | None:
    """``||W||_F^2 / sigma(W)^2`` of the weight matrix (a conv's reshaped kernel): between 1 and
    the rank. Close to 1 means the layer passes on essentially one feature direction."""
    if leaf.frobenius is None:
        return None
    sigma = leaf.reshaped
    if sigma is None and isinstance(leaf.module, nn.Linear):
        sigma = leaf.operator
    if not sigma:
        return None
    return (leaf.frobenius / sigma) ** 2


def _row(leaf: _Leaf) -> dict:
    return {
        "name": leaf.name,
        "type": type(leaf.module).__name__,
        "kind": leaf.kind,
        "in_shape": list(leaf.in_shape),
        "out_shape": list(leaf.out_shape),
        "frobenius": leaf.frobenius,
        "frobenius_bound": leaf.frobenius_bound if leaf.kind == "linear" else None,
        "operator": leaf.operator if leaf.kind == "linear" else None,
        "operator_method": leaf.operator_method if leaf.kind == "linear" else None,
        "reshaped": leaf.reshaped,
        "stable_rank": _stable_rank(leaf),
        "slope": list(leaf.slope) if leaf.slope else None,
        "constant": leaf.constant,
    }


# --------------------------------------------------------------------------------------------
# upper bounds


@dataclass
class _Chain:
    """Linear blocks B_1..B_m separated by elementwise activations; block k's input shape is
    ``in_shapes[k]`` and the chain's output shape ``in_shapes[m]``."""

    blocks: list[list[_Leaf]]
    acts: list[_Leaf]
    in_shapes: list[tuple[int, ...]]


def _split(leaves: list[_Leaf]) -> tuple[list[_Chain], list[_Leaf]]:
    """Cut at non-elementwise nonlinear layers; inside each piece, blocks between activations."""
    chains, cuts = [], []
    cur = leaves[0].in_shape if leaves else ()
    chain = _Chain([[]], [], [cur])
    for leaf in leaves:
        cur = leaf.out_shape
        if leaf.kind == "linear":
            chain.blocks[-1].append(leaf)
        elif leaf.kind == "act":
            chain.acts.append(leaf)
            chain.blocks.append([])
            chain.in_shapes.append(cur)
        else:
            chain.in_shapes.append(leaf.in_shape)
            chains.append(chain)
            cuts.append(leaf)
            chain = _Chain([[]], [], [cur])
    chain.in_shapes.append(cur)
    chains.append(chain)
    return chains, cuts


def _compose(blocks: list[list[_Leaf]]) -> Callable:
    fns = [leaf.lin for block in blocks for leaf in block]

    def f(x):
        for fn in fns:
            x = fn(x)
        return x

    return f


class _Segments:
    """Norms of merged runs of blocks B_{i+1} ... B_j of one chain (exact when a side is small)."""

    def __init__(self, chain: _Chain, in_shapes: list[tuple], dense_limit: int) -> None:
        self.chain = chain
        self.in_shapes = in_shapes  # input shape of block k (k = 0..m-1) and output of the last
        self.dense_limit = dense_limit
        self.single = [math.prod(leaf.operator for leaf in b) if b else 1.0 for b in chain.blocks]
        self.cache: dict[tuple[int, int], float] = {}
        self.mats: dict[tuple[int, int], torch.Tensor] = {}

    def matrix(self, i: int, j: int) -> torch.Tensor | None:
        """The dense matrix (out_dim, in_dim) of blocks i..j-1 (0-based), None if too large."""
        if (i, j) in self.mats:
            return self.mats[(i, j)]
        shp_in, shp_out = self.in_shapes[i], self.in_shapes[j]
        n_in, n_out = math.prod(shp_in), math.prod(shp_out)
        if min(n_in, n_out) > self.dense_limit:
            return None
        f = _compose(self.chain.blocks[i:j])
        if n_in <= n_out:
            cols = []
            for start in range(0, n_in, 256):
                k = min(256, n_in - start)
                e = torch.zeros(k, n_in, dtype=torch.float64)
                e[torch.arange(k), start + torch.arange(k)] = 1.0
                with torch.no_grad():
                    cols.append(f(e.reshape(k, *shp_in)).reshape(k, -1))
            M = torch.cat(cols).t()
        else:
            rows = []
            for start in range(0, n_out, 256):
                k = min(256, n_out - start)
                x = torch.zeros(k, *shp_in, dtype=torch.float64, requires_grad=True)
                y = f(x).reshape(k, -1)
                e = torch.zeros_like(y)
                e[torch.arange(k), start + torch.arange(k)] = 1.0
                (g,) = torch.autograd.grad(y, x, e)  # row k of the matrix: A^T e_k
                rows.append(g.reshape(k, -1))
            M = torch.cat(rows)
        self.mats[(i, j)] = M
        return M

    def norm(self, i: int, j: int) -> float:
        """Certified bound of ||B_j ... B_{i+1}|| (never above the product of single norms)."""
        if (i, j) in self.cache:
            return self.cache[(i, j)]
        prod = math.prod(self.single[i:j])
        val = prod
        n_leaves = sum(len(b) for b in self.chain.blocks[i:j])
        if n_leaves > 1:  # a single layer's norm is already exact (or certified)
            M = self.matrix(i, j)
            if M is not None:
                val = min(prod, _matrix_norm(M))
        self.cache[(i, j)] = val
        return val


def _matrix_norm(M: torch.Tensor) -> float:
    small = M @ M.t() if M.shape[0] <= M.shape[1] else M.t() @ M
    return float(torch.linalg.eigvalsh(small).amax().clamp_min(0).sqrt())


def _cr(act: _Leaf) -> tuple[float, float]:
    a, b = act.slope
    return abs((a + b) / 2), (b - a) / 2


def _merged_bound(seg: _Segments, i: int, j: int) -> float:
    """sup over D of ||B_j D ... D B_{i+1}|| by the c/r expansion (blocks i..j-1, 0-based)."""
    acts = seg.chain.acts
    # V[t]: weighted sum over the expansions whose last "S" factor sits at activation t-1
    # (t = i means no S yet); activation k sits between blocks k and k+1 (0-based blocks)
    V = {i: 1.0}
    for t in range(i + 1, j + 1):
        total = 0.0
        for s, vs in V.items():
            w = math.prod(_cr(acts[k])[0] for k in range(s, t - 1))
            total += vs * w * seg.norm(s, t)
        if t == j:
            return total
        V[t] = total * _cr(acts[t - 1])[1]
    return V[i]


def _chain_bounds(seg: _Segments, lipsdp: dict[tuple[int, int], float]) -> tuple[float, float]:
    """(merged_segments, best partition using LipSDP groups) for one chain."""
    m = len(seg.chain.blocks)
    merged = _merged_bound(seg, 0, m)
    if not lipsdp:
        return merged, merged
    U = {0: 1.0}
    for j in range(1, m + 1):
        best = math.inf
        for i in range(j):
            cut = seg.chain.acts[i - 1].constant if i > 0 else 1.0
            g = _merged_bound(seg, i, j)
            if (i, j) in lipsdp:
                g = min(g, lipsdp[(i, j)])
            best = min(best, U[i] * cut * g)
        U[j] = best
    return merged, min(U[m], merged)


def lipsdp_neuron(
    W0: torch.Tensor,
    W1: torch.Tensor,
    slope: tuple[float, float] = (0.0, 1.0),
    time_limit: float = 3.0,
    max_iter: int = 2000,
    lr: float = 0.05,
) -> tuple[float, torch.Tensor]:
    """LipSDP-Neuron bound of ``x -> W1 phi(W0 x + b)`` (phi's slopes in [a, b]), first-order.

    For diagonal T >= 0 with ``B = 2T - W1^T W1 > 0``, the LMI of Fazlyab et al. (2019) holds for
    ``rho(T) = lambda_max(W0^T Q W0)``, ``Q = (a+b)^2 T B^{-1} T - 2ab T`` (Schur complement), and
    then ``L <= sqrt(rho(T))`` for *any* such T. We minimize log rho over log T with Adam (the
    problem is quasi-convex in T), keeping the best certified value. Shapes: W0 (h, n), W1 (o, h).
    Returns ``(L, T)``.
    """
    a, b = slope
    W0 = W0.detach().double()
    W1 = W1.detach().double()
    A0 = W0 @ W0.t()
    lam, P = torch.linalg.eigh(A0)
    keep = lam > lam.max() * 1e-13
    E = P[:, keep] * lam[keep].sqrt()  # E E^T = W0 W0^T: the (h, r) factor
    G1 = W1.t() @ W1
    h = W0.shape[0]

    def rho(t: torch.Tensor) -> torch.Tensor:
        T = torch.exp(t)
        B = 2 * torch.diag(T) - G1
        Lc, info = torch.linalg.cholesky_ex(B)
        if int(info) != 0:
            return torch.tensor(math.inf, dtype=torch.float64)
        X = torch.cholesky_solve(T[:, None] * E, Lc)  # B^{-1} T E
        Mq = (a + b) ** 2 * (E.t() * T) @ X - 2 * a * b * (E.t() * T) @ E
        Mq = 0.5 * (Mq + Mq.t())
        return torch.linalg.eigvalsh(Mq)[-1].clamp_min(0)

    start = time.perf_counter()
    # T = tau I first: with G1 = Qg diag(g) Qg^T the matrix is explicit in tau, and rho along a line
    # of a quasi-convex problem is unimodal, so a golden-section search finds the best tau
    # (tau = ||W1||^2 already certifies the product of the norms).
    g, Qg = torch.linalg.eigh(G1)
    Eh = Qg.t() @ E
    EtE = E.t() @ E
    gmax = max(float(g[-1]), 1e-12)

    def rho_tau(log_tau: float) -> float:
        tau = math.exp(log_tau)
        Mq = (a + b) ** 2 * tau**2 * (Eh.t() / (2 * tau - g)) @ Eh - 2 * a * b * tau * EtE
        return float(torch.linalg.eigvalsh(0.5 * (Mq + Mq.t()))[-1].clamp_min(0))

    lo_, hi_ = math.log(gmax / 2) + 1e-6, math.log(gmax * 100)
    phi = (math.sqrt(5) - 1) / 2
    c1, c2 = hi_ - phi * (hi_ - lo_), lo_ + phi * (hi_ - lo_)
    f1, f2 = rho_tau(c1), rho_tau(c2)
    for _ in range(20):
        if f1 < f2:
            hi_, c2, f2 = c2, c1, f1
            c1 = hi_ - phi * (hi_ - lo_)
            f1 = rho_tau(c1)
        else:
            lo_, c1, f1 = c1, c2, f2
            c2 = lo_ + phi * (hi_ - lo_)
            f2 = rho_tau(c2)
        if time.perf_counter() - start > time_limit / 3:
            break
    best_log = c1 if f1 < f2 else c2
    best_t = torch.full((h,), best_log, dtype=torch.float64)
    with torch.no_grad():
        best_r = float(rho(best_t))
    theta = best_t.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    stall = 0
    for _ in range(max_iter):
        if time.perf_counter() - start > time_limit:
            break
        r = rho(theta)
        if not torch.isfinite(r):
            with torch.no_grad():
                theta.copy_(best_t)
            for grp in opt.param_groups:
                grp["lr"] *= 0.5
            continue
        rv = float(r.detach())
        if rv < best_r * (1 - 1e-7):
            best_r, best_t, stall = rv, theta.detach().clone(), 0
        else:
            stall += 1
            if stall > 200:
                break
        opt.zero_grad()
        torch.log(r).backward()
        opt.step()
    with torch.no_grad():
        final = float(rho(best_t))  # recomputed: the returned T certifies this value
    return math.sqrt(final), torch.exp(best_t)


def lipsdp_neuron_cvxpy(
    W0: torch.Tensor,
    W1: torch.Tensor,
    slope: tuple[float, float] = (0.0, 1.0),
    solver: str = "SCS",
    **solver_kwargs,
) -> float:
    """LipSDP-Neuron solved as an SDP with cvxpy (reference; slow for wide layers).

    Schur complement on the rho I block and ``W0 W0^T = R R^T`` (R of h columns) turn the
    (n+h)-sized LMI into ``[[W1^T W1 - 2T + ..., (a+b) T R], [(a+b) R^T T, -rho I]] <= 0`` of size
    2h (for a = 0; with a > 0 the -2ab W0^T T W0 term is kept through R as well). Returns sqrt(rho).
    """
    try:
        import cvxpy as cp
    except ImportError:
        raise LipganError("LipSDP with cvxpy needs cvxpy: pip install 'lipgan[sdp]'") from None
    import numpy as np

    a, b = slope
    W0n = W0.detach().double().numpy()
    W1n = W1.detach().double().numpy()
    h = W0n.shape[0]
    lam, P = np.linalg.eigh(W0n @ W0n.T)
    keep = lam > lam.max() * 1e-13
    R = P[:, keep] * np.sqrt(lam[keep])
    r = R.shape[1]
    t = cp.Variable(h, nonneg=True)
    rho = cp.Variable(nonneg=True)
    T = cp.diag(t)
    if a == 0:
        top = W1n.T @ W1n - 2 * T
        M = cp.bmat([[top, (a + b) * T @ R], [(a + b) * R.T @ T, -rho * np.eye(r)]])
    else:
        # x-space form restricted to range(W0^T): variables z = R^T-coordinates
        # [[-rho I - 2ab R^T T R, (a+b) R^T T], [(a+b) T R, W1^T W1 - 2T]] <= 0
        M = cp.bmat(
            [
                [-rho * np.eye(r) - 2 * a * b * R.T @ T @ R, (a + b) * R.T @ T],
                [(a + b) * T @ R, W1n.T @ W1n - 2 * T],
            ]
        )
    cons = [0.5 * (M + M.T) << 0]
    prob = cp.Problem(cp.Minimize(rho), cons)
    prob.solve(solver=solver, **solver_kwargs)
    if rho.value is None:
        raise LipganError(f"LipSDP: the solver {solver} returned no solution ({prob.status})")
    return math.sqrt(max(float(rho.value), 0.0))


def _lipsdp_groups(
    seg: _Segments, limit: int, time_limit: float, notes: list[str]
) -> dict[tuple[int, int], float]:
    """LipSDP bounds of every group B_{i+2} D B_{i+1} whose hidden width is at most ``limit``."""
    out = {}
    chain = seg.chain
    for k, act in enumerate(chain.acts):
        h = math.prod(seg.in_shapes[k + 1])
        if h > limit or not chain.blocks[k] or not chain.blocks[k + 1]:
            continue  # too wide, or a side is the identity (nothing to gain over the product)
        W0 = seg.matrix(k, k + 1)
        W1 = seg.matrix(k + 1, k + 2)
        if W0 is None or W1 is None:
            continue
        t0 = time.perf_counter()
        L, _ = lipsdp_neuron(W0, W1, act.slope, time_limit=time_limit)
        notes.append(
            f"LipSDP-Neuron on activation {act.name} (width {h}): {L:.6g} in "
            f"{time.perf_counter() - t0:.2f} s"
        )
        out[(k, k + 2)] = L
    return out


def upper_bounds(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    dense_limit: int = 1024,
    lipsdp: bool = True,
    lipsdp_width: int = 512,
    lipsdp_time: float = 3.0,
    _prepared: bool = False,
    _notes: list[str] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Named certified upper bounds of the Lipschitz constant (L2) and the layer table.

    Bounds: frobenius_product, operator_product, merged_segments and (where a hidden layer of
    width <= ``lipsdp_width`` sits between two linear blocks) lipsdp_partition.
    """
    m = model if _prepared else _prepare(model)
    shape = _infer_shape(m, input_shape)
    notes = _notes if _notes is not None else []
    leaves = _walk(m, shape)
    frob = math.prod(leaf.frobenius_bound for leaf in leaves)
    op = math.prod(leaf.constant for leaf in leaves)
    chains, cuts = _split(leaves)
    merged_total = math.prod(c.constant for c in cuts)
    part_total = merged_total
    any_sdp = False
    for chain in chains:
        seg = _Segments(chain, chain.in_shapes, dense_limit)
        groups = _lipsdp_groups(seg, lipsdp_width, lipsdp_time, notes) if lipsdp else {}
        any_sdp = any_sdp or bool(groups)
        merged, part = _chain_bounds(seg, groups)
        merged_total *= merged
        part_total *= part
    upper = {"frobenius_product": frob, "operator_product": op, "merged_segments": merged_total}
    if any_sdp:
        upper["lipsdp_partition"] = part_total
    return upper, [_row(leaf) for leaf in leaves]


# --------------------------------------------------------------------------------------------
# lower bounds


def jacobian_norm(
    f: Callable, x: torch.Tensor, v: torch.Tensor | None = None, n_iter: int = 30
) -> tuple[float, torch.Tensor]:
    """||J_f(x)||_2 at one input x (shape as f takes it without batch) by Lanczos on J^T J.

    Returns ``(sigma, v)``: ``sigma = ||J v||`` with v the unit top right singular vector
    estimate, so sigma never exceeds the true norm (a valid lower bound of the Lipschitz
    constant).
    """

    def g(z):
        return f(z.unsqueeze(0)).reshape(-1)

    with torch.no_grad():
        n_out = g(x).numel()
    if n_out <= 64:
        # few outputs: the whole Jacobian from one batched backward, then its exact norm
        xs = x.detach().unsqueeze(0).repeat(n_out, *([1] * x.dim())).requires_grad_(True)
        y = f(xs).reshape(n_out, -1)
        (J,) = torch.autograd.grad(y, xs, torch.eye(n_out, dtype=y.dtype))
        J = J.reshape(n_out, -1)
        _, S, Vh = torch.linalg.svd(J, full_matrices=False)
        return float(S[0]), Vh[0].reshape(x.shape).detach()

    _, vjp_fn = torch.func.vjp(g, x)

    def jtj(u):
        _, ju = torch.func.jvp(g, (x,), (u,))
        return vjp_fn(ju)[0]

    if v is None:
        v = torch.randn_like(x)
    _, v = norms.lanczos_extreme(jtj, v, n_iter=n_iter, tol=1e-12, krylov=min(n_iter, 30))
    _, jv = torch.func.jvp(g, (x,), (v,))
    return float((jv.norm() / v.norm()).detach()), v.detach()


def lower_bounds(
    model: nn.Module,
    x: torch.Tensor,
    restarts: int = 8,
    steps: int = 20,
    seed: int = 0,
    _prepared: bool = False,
) -> dict[str, float]:
    """Lower bounds: ``jacobian`` = max ||J_f(x)||_2 over ascended inputs (restarts from the
    batch x), ``pairs`` = max ||f(x1) - f(x2)|| / ||x1 - x2|| over data pairs, pairs along the
    top singular direction, and pairs ascended by gradient steps. x: (B, *input_shape)."""
    m = model if _prepared else _prepare(model)
    x = x.detach().to("cpu", torch.float64)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]

    def f(z):
        return m(z).reshape(z.shape[0], -1)

    best_j, best_x, best_v = 0.0, x[0], None
    for r in range(min(restarts, n) if n else 0):
        xr = x[r].clone()
        val, v = jacobian_norm(f, xr)
        scale = float(x.std()) if n > 1 else 1.0
        for _ in range(steps):
            # ascend ||J(x) v||: the gradient (zero a.e. for ReLU nets) plus a random step,
            # kept only when the Jacobian norm grows
            xx = xr.clone().requires_grad_(True)
            _, jv = torch.func.jvp(lambda z: f(z.unsqueeze(0)).reshape(-1), (xx,), (v,))
            (gr,) = torch.autograd.grad(jv.norm(), xx, allow_unused=True)
            step = torch.randn(xr.shape, generator=g, dtype=torch.float64) * 0.1 * scale
            if gr is not None and float(gr.norm()) > 0:
                step = step + 0.1 * scale * math.sqrt(xr.numel()) * gr / gr.norm()
            cand = xr + step
            cval, cv = jacobian_norm(f, cand, v, n_iter=10)
            if cval > val:
                xr, val, v = cand, cval, cv
        val, v = jacobian_norm(f, xr, v, n_iter=40)
        if val > best_j:
            best_j, best_x, best_v = val, xr, v
    # pairs
    best_p = 0.0
    with torch.no_grad():
        if n > 1:
            perm = torch.randperm(n, generator=g)
            d = f(x) - f(x[perm])
            dx = (x - x[perm]).reshape(n, -1).norm(dim=1)
            ok = dx > 0
            if ok.any():
                best_p = float((d.norm(dim=1)[ok] / dx[ok]).max())
        if best_v is not None:
            for h in (1e-2, 1e-4):
                dxv = h * best_v / best_v.norm()
                r = float((f((best_x + dxv)[None]) - f(best_x[None])).norm() / dxv.norm())
                best_p = max(best_p, r)
    if n:
        # gradient ascent on the quotient from near-diagonal pairs
        k = min(restarts, n)
        x1 = x[:k].clone()
        dirs = torch.randn(x1.shape, generator=g, dtype=torch.float64)
        if best_v is not None:
            dirs[0] = best_v
        x2 = x1 + 0.05 * dirs * float(x.std() if n > 1 else 1.0)
        p1, p2 = x1.requires_grad_(True), x2.requires_grad_(True)
        opt = torch.optim.Adam([p1, p2], lr=0.01 * float(x.std() if n > 1 else 1.0))
        for _ in range(steps * 2):
            q = (f(p1) - f(p2)).norm(dim=1) / (p1 - p2).reshape(k, -1).norm(dim=1).clamp_min(1e-12)
            best_p = max(best_p, float(q.detach().max()))
            opt.zero_grad()
            (-q.sum()).backward()
            opt.step()
    return {"jacobian": best_j, "pairs": best_p}


# --------------------------------------------------------------------------------------------
# the report


@dataclass
class LipschitzReport:
    """Upper bounds (certified), lower bounds (attained), the layer table and timings."""

    upper: dict[str, float]
    lower: dict[str, float]
    layers: list[dict] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def best_upper(self) -> float:
        return min(self.upper.values())

    @property
    def best_lower(self) -> float:
        return max(self.lower.values()) if self.lower else 0.0

    @property
    def gap(self) -> float:
        """best upper / best lower (>= 1; 1 means the Lipschitz constant is known exactly)."""
        lo = self.best_lower
        return self.best_upper / lo if lo > 0 else math.inf

    def to_dict(self) -> dict:
        return {
            "upper": self.upper,
            "lower": self.lower,
            "best_upper": self.best_upper,
            "best_lower": self.best_lower,
            "gap": self.gap,
            "layers": self.layers,
            "times": self.times,
            "notes": self.notes,
        }

    def __str__(self) -> str:
        lines = [
            f"{'layer':<14}{'type':<18}{'in':<14}{'frobenius':>11}{'operator':>11}"
            f"{'reshaped':>11}{'st.rank':>9}{'const':>9}"
        ]

        def fmt(v):
            return f"{v:11.4g}" if isinstance(v, float) else f"{'':>11}"

        def srank(v):
            return f"{v:9.3g}" if isinstance(v, float) else f"{'':>9}"

        for r in self.layers:
            shape = "x".join(str(s) for s in r["in_shape"])
            lines.append(
                f"{r['name']:<14}{r['type']:<18}{shape:<14}{fmt(r['frobenius'])}"
                f"{fmt(r['operator'])}{fmt(r['reshaped'])}{srank(r.get('stable_rank'))}"
                f"{r['constant']:9.4g}"
            )
        lines.append("upper bounds (certified):")
        for k, v in sorted(self.upper.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {k:<20}{v:12.6g}")
        lines.append("lower bounds (attained):")
        for k, v in self.lower.items():
            lines.append(f"  {k:<20}{v:12.6g}")
        lines.append(f"gap (best upper / best lower): {self.gap:.4g}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def estimate(
    model: nn.Module,
    x: torch.Tensor | None = None,
    input_shape: Sequence[int] | None = None,
    lower: bool = True,
    restarts: int = 8,
    steps: int = 20,
    dense_limit: int = 1024,
    lipsdp: bool = True,
    lipsdp_width: int = 512,
    lipsdp_time: float = 3.0,
    seed: int = 0,
) -> LipschitzReport:
    """Upper and lower bounds of the L2 Lipschitz constant of a chain model, and their gap.

    ``x``: (B, *input_shape) inputs where the lower bounds start (random normal inputs when
    None); the model is analysed as a float64 copy in eval mode (the model itself is untouched).
    """
    t0 = time.perf_counter()
    m = _prepare(model)
    if x is not None and input_shape is None:
        input_shape = tuple(x.shape[1:])
    shape = _infer_shape(m, input_shape)
    notes: list[str] = []
    upper, layers = upper_bounds(
        m,
        shape,
        dense_limit=dense_limit,
        lipsdp=lipsdp,
        lipsdp_width=lipsdp_width,
        lipsdp_time=lipsdp_time,
        _prepared=True,
        _notes=notes,
    )
    t1 = time.perf_counter()
    lo: dict[str, float] = {}
    if lower:
        if x is None:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(max(restarts, 2), *shape, generator=g, dtype=torch.float64)
        lo = lower_bounds(m, x, restarts=restarts, steps=steps, seed=seed, _prepared=True)
    t2 = time.perf_counter()
    return LipschitzReport(
        upper=upper,
        lower=lo,
        layers=layers,
        times={"upper_s": t1 - t0, "lower_s": t2 - t1},
        notes=notes,
    )
