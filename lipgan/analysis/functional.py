"""Functional calls of a traced graph as the torch modules that compute them.

``F.relu(x)``, ``F.avg_pool2d(x, 2)``, ``F.interpolate(x, ...)``, ``F.pad(x, ...)``,
``x.clamp(lo, hi)``, ...: lipgan bounds each as the module that computes the same map (and the
graph analysis checks that the stand-in computes what the call computed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipgan.errors import LipganError

__all__ = ["equivalent_module", "method_module"]


# functional activations and pooling: the module each call is equivalent to
def _act_builders() -> dict:
    def leaky(negative_slope=0.01, inplace=False):
        return nn.LeakyReLU(negative_slope)

    def elu(alpha=1.0, inplace=False):
        return nn.ELU(alpha)

    def celu(alpha=1.0, inplace=False):
        return nn.CELU(alpha)

    def gelu(approximate="none"):
        return nn.GELU(approximate=approximate)

    def softplus(beta=1.0, threshold=20.0):
        return nn.Softplus(beta, threshold)

    def hardtanh(min_val=-1.0, max_val=1.0, inplace=False):
        return nn.Hardtanh(min_val, max_val)

    def simple(cls):
        return lambda *a, inplace=False, **k: cls()

    table = {
        torch.relu: simple(nn.ReLU),
        F.relu: simple(nn.ReLU),
        torch.relu_: simple(nn.ReLU),
        F.relu_: simple(nn.ReLU),
        F.relu6: simple(nn.ReLU6),
        F.leaky_relu: leaky,
        torch.tanh: simple(nn.Tanh),
        F.tanh: simple(nn.Tanh),
        torch.sigmoid: simple(nn.Sigmoid),
        F.sigmoid: simple(nn.Sigmoid),
        F.gelu: gelu,
        F.silu: simple(nn.SiLU),
        F.mish: simple(nn.Mish),
        F.elu: elu,
        F.celu: celu,
        F.selu: simple(nn.SELU),
        torch.selu: simple(nn.SELU),
        F.softplus: softplus,
        F.softsign: simple(nn.Softsign),
        F.hardtanh: hardtanh,
        F.hardsigmoid: simple(nn.Hardsigmoid),
        F.hardswish: simple(nn.Hardswish),
        F.logsigmoid: simple(nn.LogSigmoid),
        F.avg_pool1d: lambda *a, **k: nn.AvgPool1d(*a, **k),
        F.avg_pool2d: lambda *a, **k: nn.AvgPool2d(*a, **k),
        F.avg_pool3d: lambda *a, **k: nn.AvgPool3d(*a, **k),
        F.max_pool1d: lambda *a, **k: nn.MaxPool1d(**_max_pool(*a, **k)),
        F.max_pool2d: lambda *a, **k: nn.MaxPool2d(**_max_pool(*a, **k)),
        F.max_pool3d: lambda *a, **k: nn.MaxPool3d(**_max_pool(*a, **k)),
        F.adaptive_avg_pool1d: lambda *a, **k: nn.AdaptiveAvgPool1d(*a, **k),
        F.adaptive_avg_pool2d: lambda *a, **k: nn.AdaptiveAvgPool2d(*a, **k),
        F.adaptive_avg_pool3d: lambda *a, **k: nn.AdaptiveAvgPool3d(*a, **k),
        F.adaptive_max_pool1d: lambda *a, **k: nn.AdaptiveMaxPool1d(*a, **k),
        F.adaptive_max_pool2d: lambda *a, **k: nn.AdaptiveMaxPool2d(*a, **k),
        F.adaptive_max_pool3d: lambda *a, **k: nn.AdaptiveMaxPool3d(*a, **k),
        F.softmax: lambda dim=None, _stacklevel=3, dtype=None: nn.Softmax(dim),
        torch.softmax: lambda dim=None, dtype=None: nn.Softmax(dim),
    }
    # torch.max_pool2d & co. are the C functions F.max_pool2d dispatches to
    table[torch.max_pool1d] = table[F.max_pool1d]
    table[torch.max_pool2d] = table[F.max_pool2d]
    table[torch.max_pool3d] = table[F.max_pool3d]
    table[torch.avg_pool1d] = table[F.avg_pool1d]
    return table


def _interpolate(
    size=None,
    scale_factor=None,
    mode="nearest",
    align_corners=None,
    recompute_scale_factor=None,
    antialias=False,
):
    if antialias:
        return None  # nn.Upsample has no antialiasing: no stand-in
    return nn.Upsample(size, scale_factor, mode, align_corners, recompute_scale_factor)


def _max_pool(*args, **kwargs):
    """F.max_poolNd's argument order (..., dilation, ceil_mode, return_indices) as keywords."""
    names = ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
    kw = dict(zip(names, args))
    kw.update(kwargs)
    return kw


def _pad(pad, mode="constant", value=None):
    d = len(pad) // 2
    if mode == "constant":
        return [nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d][d - 1](
            tuple(pad), float(value or 0.0)
        )
    cls = {"reflect": "ReflectionPad", "replicate": "ReplicationPad", "circular": "CircularPad"}
    if mode not in cls:
        raise LipganError(f"F.pad mode {mode!r} is not supported")
    return getattr(nn, f"{cls[mode]}{d}d")(tuple(pad))


_BUILDERS: dict | None = None


def equivalent_module(target, args: tuple, kwargs: dict) -> nn.Module | None:
    """The torch module that computes ``target(x, *args, **kwargs)`` (functional activations,
    pooling, interpolate, pad), or None."""
    global _BUILDERS
    if _BUILDERS is None:
        _BUILDERS = _act_builders()
        _BUILDERS[F.interpolate] = _interpolate
        _BUILDERS[F.pad] = _pad
        _BUILDERS[torch._C._nn.pad] = _pad
    b = _BUILDERS.get(target)
    if b is None:
        return None
    if target in (F.max_pool1d, F.max_pool2d, F.max_pool3d) and (
        kwargs.get("return_indices") or (len(args) > 5 and args[5])
    ):
        return None
    return b(*args, **kwargs)


def method_module(name: str, args: tuple, kwargs: dict) -> nn.Module | None:
    """The module of a tensor method call ``x.relu()``, ``x.clamp(lo, hi)``, ..., or None."""
    simple = {"relu": nn.ReLU, "relu_": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    if name in simple:
        return simple[name]()
    if name in ("clamp", "clip", "clamp_", "clip_"):
        lo = kwargs.get("min", args[0] if args else None)
        hi = kwargs.get("max", args[1] if len(args) > 1 else None)
        if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
            return None
        return _Clamp(lo, hi)
    return None


class _Clamp(nn.Hardtanh):
    """``x.clamp(lo, hi)`` with either side open: slopes in [0, 1] like Hardtanh."""

    def __init__(self, lo, hi) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.lo, self.hi)
