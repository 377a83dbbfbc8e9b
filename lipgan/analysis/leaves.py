"""Leaves of a model: what lipgan knows about each layer it bounds, and a check that it is right.

A leaf is one map on a path of the model's graph: a module lipgan recognises (by ``isinstance`` of
torch's or lipgan's classes, never by name), a module that declares its own constant, or a
functional call (``F.relu``, ``x.view``, ``2 * x``, ...). Each leaf is ``linear`` (an affine map:
its linear part ``lin`` and a certified bound of ``||lin||``), ``act`` (elementwise with slopes in
[a, b]) or ``cut`` (any other map with a known Lipschitz constant, e.g. max pooling, GroupSort).

**Declaring a constant.** A module of your own is bounded by a constant it declares::

    class MyBlock(nn.Module):
        def lipschitz_constant(self, input_shape):  # or a float attribute / property
            return 1.0

``lipschitz_constant`` may be a number (attribute or property) or a method taking the input shape
without the batch dimension (e.g. ``(C, H, W)``) and returning a float. It must be a certified
upper bound of the module's L2 Lipschitz constant on inputs of that shape: lipgan takes it on
trust (the report still raises if an attained lower bound exceeds the certified upper one). A
module that declares a constant is a leaf: lipgan does not trace into it.

**Consistency check.** A recognised module is bounded as what its class computes; a subclass that
overrides ``forward`` (padding inside forward, a rescaled pooling, hooks) computes something else.
:func:`check_leaf` runs the module's own forward on random inputs against its class's forward and,
for linear leaves, against the linear map lipgan bounds (``m(x) - m(0) == lin(x)``); a mismatch
raises :class:`~lipgan.errors.LipganError` naming the module, never a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lipgan import norms
from lipgan.analysis import operators
from lipgan.analysis.activations import slope_range
from lipgan.analysis.convmap import one_thread
from lipgan.errors import LipganError

__all__ = ["Leaf", "module_leaf", "function_leaf", "check_leaf", "known_base", "declared_constant"]


@dataclass
class Leaf:
    """One map of a path: its kind, shapes (without batch), and the bounds the chain uses."""

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
    type_name: str = ""
    cost: float = 0.0  # multiply-adds per sample (decides which dense matrices are affordable)
    checked: bool = False  # consistency-checked against the module's own forward


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_POOL_LINEAR = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Upsample,
)
_PADS = (
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
)
_SHAPE_ONLY = (
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
    nn.ChannelShuffle,
)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
LINEAR_TYPES = (nn.Linear, *_CONV, *_CONVT, *_BN, *_POOL_LINEAR, *_PADS, *_SHAPE_ONLY)
ACTIVATION_TYPES = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Tanh,
    nn.Softsign,
    nn.Softshrink,
    nn.CELU,
    nn.Softplus,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.LeakyReLU,
    nn.RReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.SiLU,
    nn.GELU,
    nn.Mish,
)
CUT_TYPES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Softmax,
)


_LP = tuple(getattr(nn, n) for n in ("LPPool1d", "LPPool2d", "LPPool3d") if hasattr(nn, n))


def _lipgan_types() -> tuple[type, ...]:
    from lipgan.layers import GroupSort

    return (GroupSort,)


def _lipgan_linear_types() -> tuple[type, ...]:
    from lipgan.models.gan28 import Crop

    return (Crop,)


def known_base(m: nn.Module) -> type | None:
    """The torch or lipgan class in ``type(m)``'s MRO whose computation lipgan models, or None.

    Recognition is by ``isinstance`` only: a class of another library that happens to be called
    ``GroupSort`` is not lipgan's GroupSort."""
    known = set(LINEAR_TYPES) | set(ACTIVATION_TYPES) | set(CUT_TYPES) | set(_LP)
    known |= set(_lipgan_types()) | set(_lipgan_linear_types())
    for cls in type(m).__mro__:
        if cls in known:
            return cls
    return None


def declared_constant(m: nn.Module, in_shape: tuple[int, ...] | None = None) -> float | None:
    """The module's own ``lipschitz_constant`` (a number, or a method of the input shape)."""
    c = getattr(type(m), "lipschitz_constant", None)
    if c is None and "lipschitz_constant" not in vars(m):
        return None
    c = m.lipschitz_constant
    if callable(c):
        if in_shape is None:
            return math.nan  # declared, value needs the shape
        c = c(tuple(in_shape))
    if isinstance(c, torch.Tensor) and c.numel() == 1:
        c = float(c)
    if not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
        raise LipganError(
            f"{type(m).__name__}.lipschitz_constant must be a finite number >= 0 (or a method of "
            f"the input shape returning one), got {c!r}"
        )
    return float(c)


# ---------------------------------------------------------------------------------------------
# per-layer bounds: lipgan.analysis.operators (layer_bound, linear_map)


def _layer_bound(m: nn.Module, shape: tuple[int, ...]) -> tuple[float, str]:
    # lower=False: the whole-model lower bounds come from the model itself (analysis.lower)
    b = operators.layer_bound(m, shape, lower=False)
    return float(b.upper), b.method


def _linear_map(m: nn.Module, shape: tuple[int, ...]) -> Callable:
    return operators.linear_map(m, shape)


def _cost(m: nn.Module, in_shape, out_shape) -> float:
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear):
        return float(m.in_features * m.out_features)
    if isinstance(m, _CONV) and isinstance(w, torch.Tensor):
        return float(n_out * w[0].numel())
    if isinstance(m, _CONVT) and isinstance(w, torch.Tensor):
        return float(n_in * w[0].numel())
    return float(n_in + n_out)


def _reshaped_norm(m: nn.Module) -> float:
    """sigma_max of the kernel reshaped to a matrix (out, in/groups * k) (transposed convs:
    (in, out/groups * k)), from the smaller Gram matrix."""
    W = m.weight.detach().double()
    M = W.reshape(W.shape[0], -1)
    with one_thread():  # a small eigensolver: a second thread only spins (convmap.one_thread)
        G = M @ M.t() if M.shape[0] <= M.shape[1] else M.t() @ M
        return float(torch.linalg.eigvalsh(G)[-1].clamp_min(0).sqrt())


def _frobenius_columns(leaf: Leaf) -> None:
    m = leaf.module
    if isinstance(m, nn.Linear):
        leaf.frobenius = norms.frobenius_norm(m.weight.detach())
        leaf.frobenius_bound = max(leaf.frobenius, leaf.operator)
        return
    if isinstance(m, (*_CONV, *_CONVT)):
        leaf.frobenius = norms.frobenius_norm(m.weight.detach())
        try:
            leaf.frobenius_bound = max(norms.conv_frobenius_bound(m), leaf.operator)
        except Exception:  # a geometry the Frobenius bound does not cover: the operator bound
            leaf.frobenius_bound = leaf.operator
        # sigma of the reshaped kernel (out, in * k): what torch's spectral_norm normalizes
        leaf.reshaped = _reshaped_norm(m)
        return
    leaf.frobenius_bound = leaf.operator


def module_leaf(name: str, m: nn.Module, in_shape: tuple, out_shape: tuple) -> Leaf:
    """Classify one module called on inputs of ``in_shape`` (no batch) and bound it.

    Raises LipganError naming the module when lipgan knows no sound bound for it."""
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    leaf = Leaf(name, m, "cut", in_shape, out_shape, type_name=type(m).__name__)
    leaf.cost = _cost(m, in_shape, out_shape)
    declared = declared_constant(m, in_shape)
    base = known_base(m)
    if declared is not None:
        leaf.constant = leaf.operator = leaf.frobenius_bound = declared
        leaf.operator_method = "declared"
        return leaf
    if base is None:
        raise cannot(name, m, "lipgan knows no Lipschitz constant for this layer")
    if base in _lipgan_types() and int(m.dim) % (len(in_shape) + 1) == 0:
        # 1-Lipschitz on the whole batch, but no function of one sample: no per-sample constant
        raise cannot(name, m, "it sorts along the batch dimension (dim=0), which mixes samples")
    try:
        upper, method = _layer_bound(m, in_shape)
    except LipganError as exc:
        raise LipganError(f"cannot bound layer {name!r} ({type(m).__name__}): {exc}") from None
    if issubclass(base, LINEAR_TYPES + _lipgan_linear_types()):
        leaf.kind = "linear"
        leaf.lin = _linear_map(m, in_shape)
        leaf.operator = leaf.constant = upper
        leaf.operator_method = method
        _frobenius_columns(leaf)
        return leaf
    slope = slope_range(m) if issubclass(base, ACTIVATION_TYPES) else None
    if slope is not None:
        leaf.kind, leaf.slope = "act", (float(slope[0]), float(slope[1]))
        upper = max(upper, abs(slope[0]), abs(slope[1]))
    leaf.constant = leaf.operator = leaf.frobenius_bound = upper
    leaf.operator_method = method or "constant"
    return leaf


class Fn(nn.Module):
    """A functional call of the graph (``x.view(...)``, ``2 * x``) as a module of the table."""

    def __init__(self, fn: Callable, label: str) -> None:
        super().__init__()
        self.fn = fn
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.label


def function_leaf(
    name: str,
    fn: Callable,
    label: str,
    in_shape: tuple,
    out_shape: tuple,
    operator: float,
    method: str,
    linear: bool = True,
) -> Leaf:
    """A linear functional op (``fn`` batched, linear) with a certified bound of its norm."""
    m = Fn(fn, label)
    n = math.prod(in_shape) + math.prod(out_shape)
    leaf = Leaf(name, m, "linear" if linear else "cut", tuple(in_shape), tuple(out_shape))
    leaf.lin = fn if linear else None
    leaf.operator = leaf.constant = leaf.frobenius_bound = float(operator)
    leaf.operator_method = method
    leaf.type_name = label
    leaf.cost = float(n)
    return leaf


def cannot(name: str, m: nn.Module | None, why: str) -> LipganError:
    what = f" ({type(m).__name__})" if m is not None else ""
    return LipganError(
        f"cannot bound {name!r}{what}: {why}. lipgan bounds graphs of Linear, Conv, ConvTranspose, "
        "BatchNorm (eval), pooling, upsampling, elementwise activations, reshapes, slicing, "
        "concatenation, sums and scalings; a module of your own can declare its constant with a "
        "`lipschitz_constant` attribute or method (see docs/analysis.md)"
    )


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> bool:
    if a.shape != b.shape:
        return False
    return float((a - b).norm()) <= rtol * (float(a.norm()) + float(b.norm())) + 1e-12


def check_leaf(leaf: Leaf, n: int = 1, seed: int = 0) -> None:
    """The leaf's own forward must compute what lipgan bounds (raises LipganError otherwise).

    ``m(x)`` against ``Base.forward(m, x)`` of the class lipgan recognised it as, and for linear
    leaves ``m(x) - m(0)`` against the linear map ``lin(x)`` whose norm is bounded; x: ``n``
    random float64 inputs of the leaf's input shape (one suffices: two linear maps that differ
    differ on a Gaussian input with probability 1; three took the width-64 dcgan28 critic's
    checks 0.056 s instead of 0.028 s, float64 convs being slow)."""
    m = leaf.module
    base = known_base(m)
    if base is None or isinstance(m, Fn) or leaf.operator_method == "declared":
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *leaf.in_shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = m(x.clone())
        if not _close(y, base.forward(m, x.clone())):
            raise LipganError(
                f"cannot bound layer {leaf.name!r} ({type(m).__name__}): it is a {base.__name__} "
                f"whose forward (or a hook) computes something else than {base.__name__}'s "
                "(checked on random inputs); lipgan would bound the wrong map. Declare its "
                "constant with `lipschitz_constant`, or write the extra step (padding, scaling) "
                "as its own layer"
            )
        if leaf.lin is not None:
            y0 = m(torch.zeros(1, *leaf.in_shape, dtype=torch.float64))
            if not _close(y - y0, leaf.lin(x)):
                raise LipganError(
                    f"cannot bound layer {leaf.name!r} ({type(m).__name__}): its output differs "
                    "from the linear map lipgan bounds for it (checked on random inputs)"
                )
    leaf.checked = True
