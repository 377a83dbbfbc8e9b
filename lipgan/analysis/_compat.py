"""TEMPORARY stand-in for lipgan.analysis.operators until a17-bounds' module is merged."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lipgan import norms
from lipgan.errors import LipganError


@dataclass(frozen=True)
class LayerBound:
    upper: float
    lower: float
    exact: bool
    method: str


def linear_map(m, shape):
    if isinstance(m, nn.Linear):
        W = m.weight.detach()
        return lambda x: F.linear(x, W)
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        spec = norms._conv_spec(m, shape)
        w = spec["weight"]
        return lambda x: norms._apply_conv(x, w, spec)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        scale = 1.0 / torch.sqrt(m.running_var.detach() + m.eps)
        if m.weight is not None:
            scale = scale * m.weight.detach()
        return lambda x: x * scale.reshape(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)
    if isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
        return lambda x: F.pad(x, m.padding)
    return m


def layer_bound(m, shape):
    if isinstance(m, nn.Linear):
        s = norms.spectral_norm(m.weight.detach())
        return LayerBound(s, s, True, "svd")
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        if getattr(m, "padding_mode", "zeros") not in ("zeros", "circular"):
            raise LipganError("padding mode not bounded (temporary adapter)")
        spec = norms._conv_spec(m, shape)
        method = "fft" if norms._exact_circular(spec) else "gram"
        if method == "gram" and getattr(m, "padding_mode", "zeros") == "circular":
            raise LipganError("non-full circular not bounded (temporary adapter)")
        v = norms.conv_operator_norm(m, shape, method)
        return LayerBound(v, 0.0, method == "fft", method)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        c = norms.batchnorm_constant(m)
        return LayerBound(c, c, True, "diagonal")
    if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Upsample)):
        if isinstance(m, nn.Upsample) and m.mode != "nearest":
            raise LipganError("only nearest upsampling is bounded")
        c = norms.pooling_constant(m, shape)
        return LayerBound(c, 0.0, False, "pooling")
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
        c = norms.pooling_constant(m, shape)
        return LayerBound(c, 0.0, False, "pooling")
    ident = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.PixelShuffle, nn.PixelUnshuffle,
             nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
    if isinstance(m, ident):
        return LayerBound(1.0, 1.0, True, "isometry")
    from lipgan.layers import GroupSort

    if isinstance(m, GroupSort):
        return LayerBound(1.0, 1.0, True, "constant")
    c = norms.activation_constant(m)
    if c is not None and type(m).__name__ not in norms.ONE_LIPSCHITZ_NAMES:
        return LayerBound(c, 0.0, False, "constant")
    raise LipganError("no bound known (temporary adapter)")
