"""Tests of lipgan.layers: Björck orthonormalization, GroupSort, the spectral-norm
parametrization on layer kinds the constraint tests do not cover. Every check compares with an
independent computation (SVD, a hand-written sort, dense matrices of the layers)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lipgan import layers as L
from lipgan.errors import LipganError

pytestmark = pytest.mark.usefixtures("one_thread")


def polar_factor(w: torch.Tensor) -> torch.Tensor:
    """The nearest (semi-)orthonormal matrix U V^T, by SVD."""
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(20, 50), (50, 20), (16, 16), (1, 30)])
def test_bjorck_singular_values_never_exceed_one_and_reach_the_polar_factor(shape):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64)
    for iters in (1, 3, 10):
        s = torch.linalg.svdvals(L.bjorck_orthonormalize(w, iters))
        assert s.max() <= 1 + 1e-9, (iters, s.max())
    out = L.bjorck_orthonormalize(w, iters=200)
    assert torch.allclose(out, polar_factor(w), atol=1e-6)


def test_bjorck_linear_is_orthonormal_and_one_lipschitz():
    torch.manual_seed(1)
    layer = L.BjorckLinear(32, 16)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(5):  # after training moves the raw weight away from orthogonal
        opt.zero_grad()
        layer(torch.randn(8, 32)).square().sum().backward()
        opt.step()
    s = torch.linalg.svdvals(layer.weight.detach().double())
    assert s.max() <= 1 + 1e-5 and s.min() > 0.99, s
    x, y = torch.randn(100, 32), torch.randn(100, 32)
    ratio = (layer(x) - layer(y)).norm(dim=1) / (x - y).norm(dim=1)
    assert ratio.max() <= 1 + 1e-5


def test_bjorck_rejects_bad_options():
    with pytest.raises(LipganError):
        L.BjorckOrthonormal(iters=0)
    with pytest.raises(LipganError):
        L.BjorckOrthonormal(beta=0.9)


def test_groupsort_matches_a_hand_sort_and_preserves_gradient_norms():
    torch.manual_seed(2)
    x = torch.randn(3, 6, 2, 2, requires_grad=True)
    out = L.GroupSort(2)(x)
    for b in range(3):
        for i in range(0, 6, 2):
            for h in range(2):
                for w in range(2):
                    pair = sorted([x[b, i, h, w].item(), x[b, i + 1, h, w].item()])
                    assert out[b, i, h, w].item() == pair[0]
                    assert out[b, i + 1, h, w].item() == pair[1]
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    assert torch.allclose(grad.flatten(1).norm(dim=1), g.flatten(1).norm(dim=1))
    x3 = torch.randn(4, 9)
    out3 = L.GroupSort(3)(x3)
    assert torch.equal(out3, x3.reshape(4, 3, 3).sort(dim=2).values.reshape(4, 9))
    a, b = torch.randn(200, 8), torch.randn(200, 8)
    gs = L.GroupSort(4)
    assert ((gs(a) - gs(b)).norm(dim=1) <= (a - b).norm(dim=1) + 1e-6).all()


def test_groupsort_odd_channels_error_and_activation_replacement():
    with pytest.raises(LipganError, match="divisible"):
        L.GroupSort(2)(torch.randn(2, 5))
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.LeakyReLU(0.2), nn.Tanh())
    assert L.groupsort_activations(net) == 2
    assert isinstance(net[1], L.GroupSort) and isinstance(net[3], L.GroupSort)
    assert isinstance(net[4], nn.Tanh)  # output squashers stay


def dense(fn, in_shape) -> torch.Tensor:
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    return fn(basis).reshape(n, -1).t()


def test_spectral_norm_conv_transpose_reshaped_uses_output_channels():
    torch.manual_seed(3)
    layer = L.spectral_norm(nn.ConvTranspose2d(6, 4, 4, 2, 1))
    L.converge_spectral_norms(layer)
    w = layer.weight.detach().double()  # (c_in, c_out, k, k): output channels are dim 1
    m = w.transpose(0, 1).reshape(4, -1)
    assert float(torch.linalg.matrix_norm(m, 2)) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular", "reflect"])
def test_spectral_norm_operator_mode_padding_modes(padding_mode):
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 5, 3, 1, 1, padding_mode=padding_mode).double()
    L.spectral_norm(conv, mode="operator")
    conv(torch.randn(2, 3, 7, 7, dtype=torch.float64))
    conv.eval()
    w = conv.weight.detach()
    a = dense(lambda x: conv._conv_forward(x, w, None), (3, 7, 7))
    assert float(torch.linalg.matrix_norm(a, 2)) == pytest.approx(1.0, abs=1e-3)


def test_spectral_norm_operator_mode_unsupported_layer():
    with pytest.raises(LipganError, match="reshaped"):
        L.spectral_norm(nn.Conv1d(2, 2, 3), mode="operator")
    L.spectral_norm(nn.Conv1d(2, 2, 3))  # reshaped works for any conv


def test_spectral_norm_operator_mode_relearns_a_new_input_size():
    torch.manual_seed(5)
    conv = L.spectral_norm(nn.Conv2d(2, 4, 3, 2, 1), mode="operator")
    conv(torch.randn(1, 2, 8, 8))
    p = conv.parametrizations.weight[0]
    assert p.input_shape == (2, 8, 8)
    conv(torch.randn(1, 2, 10, 10))
    assert p.input_shape == (2, 10, 10) and p._v.shape == (1, 2, 10, 10)
