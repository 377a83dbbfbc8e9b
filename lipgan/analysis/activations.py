"""Slope ranges of elementwise activations, recognised by ``isinstance`` of torch's classes.

An elementwise ``phi`` with every difference quotient ``(phi(s) - phi(t)) / (s - t)`` in ``[a, b]``
is ``max(|a|, |b|)``-Lipschitz in L2 (apply the bound per coordinate), and no smaller constant
works when the slope range is attained or approached, as it is for every entry below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["slope_range", "attained_slope"]


def _derivative_range(fn, lo: float = -30.0, hi: float = 30.0) -> tuple[float, float, float]:
    """(min - 1e-6, max + 1e-6, max |fn'|) of fn' on a fine grid (float64).

    The grid step is 1e-4 and |fn''| <= 2 for the functions used, so the extremes between grid
    points differ from the grid's by < 1e-8: the 1e-6 rounding outward makes the range certified.
    Beyond [-30, 30] their slopes are within 1e-11 of 0 or 1.
    """
    x = torch.linspace(lo, hi, 600001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return float(g.min()) - 1e-6, float(g.max()) + 1e-6, float(g.abs().max())


# Smooth activations whose slope range has no closed form: computed once, on first use.
_NUMERIC: dict[str, tuple[float, float, float]] = {}


def _numeric(key: str, fn) -> tuple[float, float, float]:
    if key not in _NUMERIC:
        _NUMERIC[key] = _derivative_range(fn)
    return _NUMERIC[key]


def _numeric_module(m: nn.Module) -> tuple[float, float, float] | None:
    if isinstance(m, nn.SiLU):
        return _numeric("silu", F.silu)
    if isinstance(m, nn.GELU):
        approx = m.approximate
        return _numeric(f"gelu-{approx}", lambda x: F.gelu(x, approximate=approx))
    if isinstance(m, nn.Mish):
        return _numeric("mish", F.mish)
    return None


def slope_range(module: nn.Module) -> tuple[float, float] | None:
    """``(a, b)`` with ``a <= (phi(s) - phi(t)) / (s - t) <= b`` for an elementwise activation.

    None when the module is not an elementwise activation with a bounded slope (Softmax, MaxPool,
    Hardshrink, a user's module). ReLU (0, 1), LeakyReLU(s) (min(s, 1), max(s, 1)), Sigmoid
    (0, 1/4), ... Softplus: slope sigma(beta x) in (0, 1); torch switches to x above the
    threshold, a jump of log1p(exp(-threshold)) / beta (2e-9 / beta by default) that no slope
    bound covers.
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
        if m.training:  # a random slope in [lower, upper] per element
            return (min(float(m.lower), 1.0), max(float(m.upper), 1.0))
        s = (float(m.lower) + float(m.upper)) / 2  # eval: the fixed mean slope
        return (min(s, 1.0), max(s, 1.0))
    if isinstance(m, nn.PReLU):
        w = m.weight.detach()
        return (min(float(w.min()), 1.0), max(float(w.max()), 1.0))
    if isinstance(m, nn.ELU):
        a = float(m.alpha)  # slope 1 for x > 0, a e^x between 0 and a for x < 0
        return (min(0.0, a), max(1.0, a))
    if isinstance(m, nn.SELU):
        scale, alpha = 1.0507009873554805, 1.6732632423543772
        return (0.0, scale * max(1.0, alpha))
    if isinstance(m, nn.Sigmoid):
        return (0.0, 0.25)
    if isinstance(m, nn.Hardsigmoid):
        return (0.0, 1.0 / 6.0)
    if isinstance(m, nn.Hardswish):
        return (-0.5, 1.5)  # slope (2x + 3) / 6 on [-3, 3]
    r = _numeric_module(m)
    if r is not None:
        return r[0], r[1]
    if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
        return (1.0, 1.0) if not m.training or isinstance(m, nn.Identity) else None
    if isinstance(m, nn.AlphaDropout):
        return (1.0, 1.0) if not m.training else None
    return None


def attained_slope(module: nn.Module) -> float | None:
    """The largest |slope| the activation attains or approaches (a lower Lipschitz bound)."""
    r = _numeric_module(module)
    if r is not None:
        return r[2]
    s = slope_range(module)
    return None if s is None else max(abs(s[0]), abs(s[1]))
