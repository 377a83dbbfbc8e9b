"""The Cholesky certificates (lipgan.analysis.certify) and the banded one on conv Gram matrices,
against eigenvalues and dense matrices from torch's own forward in float64."""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_soundness_layers import build_conv, conv_configs, dense_truth
from torch import nn

from lipgan.analysis import certify, convgram
from lipgan.analysis.convmap import conv_geometry

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


def banded_gram(n_blocks: int, m: int, width: int, seed: int) -> torch.Tensor:
    """A PSD Gram matrix ``A A^T`` whose blocks more than ``width`` apart are exact zeros: each
    row block of A reads only its own ``width + 1`` column blocks."""
    g = torch.Generator().manual_seed(seed)
    A = torch.zeros(n_blocks * m, (n_blocks + width) * m, dtype=torch.float64)
    for i in range(n_blocks):
        A[i * m : (i + 1) * m, i * m : (i + width + 1) * m] = torch.randn(
            m, (width + 1) * m, generator=g, dtype=torch.float64
        )
    return A @ A.t()


def to_band(G: torch.Tensor, n_blocks: int, m: int, width: int) -> torch.Tensor:
    band = torch.zeros(n_blocks, width + 1, m, m, dtype=torch.float64)
    for i in range(n_blocks):
        for d in range(min(width, i) + 1):
            j = i - d
            band[i, d] = G[i * m : (i + 1) * m, j * m : (j + 1) * m]
    return band


@given(
    n_blocks=st.integers(2, 6),
    m=st.integers(1, 9),
    width=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_the_banded_certificate_decides_as_the_eigenvalues_do(n_blocks, m, width, seed):
    width = min(width, n_blocks - 1)
    G = banded_gram(n_blocks, m, width, seed)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    band = to_band(G, n_blocks, m, width)
    assert certify.banded_cholesky_certifies(band, lam * (1 + 1e-6))
    assert not certify.banded_cholesky_certifies(band, lam * (1 - 1e-6))
    # and as the dense certificate does, on both sides of lambda_max
    for t in (lam * (1 + 1e-6), lam * (1 - 1e-6), lam * (1 + 1e-16)):
        assert certify.banded_cholesky_certifies(band, t) == certify.cholesky_certifies(G, t)


def test_the_banded_certificate_covers_the_stated_error_and_reads_only_the_band():
    G = banded_gram(5, 6, 2, seed=3)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    band = to_band(G, 5, 6, 2)
    delta = 1e-4 * lam
    assert certify.banded_cholesky_certifies(band, lam + 0.5 * delta)
    assert not certify.banded_cholesky_certifies(band, lam + 0.5 * delta, delta)
    assert certify.banded_cholesky_certifies(band, lam + 1.5 * delta, delta)
    # junk above the diagonal of the diagonal blocks and in the unused slots band[i, d > i]
    junk = band.clone()
    for i in range(5):
        junk[i, 0] += torch.triu(torch.full((6, 6), 1e3, dtype=torch.float64), 1)
    junk[0, 1:] = 7.0
    junk[1, 2:] = -7.0
    for t in (lam * (1 + 1e-6), lam * (1 - 1e-6)):
        assert certify.banded_cholesky_certifies(junk, t) == certify.banded_cholesky_certifies(
            band, t
        )
    # overwrite=True consumes the band, and decides the same
    assert certify.banded_cholesky_certifies(band.clone(), lam * (1 + 1e-6), overwrite=True)


def test_band_work_counts_the_kept_blocks():
    m = 10
    # no band (width 0): one factorization per block
    assert certify.band_work(4, 0, m) == pytest.approx(4 * m**3 / 3)
    # the dcgan28 critic's second conv at width 64: 7 rows of 896, band 2, ~3.3e10 flops
    assert 3.0e10 < certify.band_work(7, 2, 896) < 3.5e10
    assert certify.band_work(7, 2, 896) < (7 * 896) ** 3 / 3


def _band_bound(layer: nn.Module, shape) -> float | None:
    """The banded certificate, forced (no dense factorization, no work limit)."""
    geom = conv_geometry(layer, shape)
    if geom.mode != "zeros" or not convgram._band_affordable(geom, math.inf, 2**40):
        return None
    return convgram.cholesky_bound(geom, limit=1, work=math.inf)


@given(cfg=conv_configs(mode="zeros") | conv_configs(mode="T"))
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_the_banded_conv_bound_is_never_below_the_dense_truth_and_within_2e3(cfg):
    layer, shape = build_conv(cfg)
    assume(layer is not None)
    up = _band_bound(layer, shape)
    assume(up is not None)
    truth = dense_truth(layer, shape)
    assert up >= truth * (1 - 1e-12), (layer, shape, up, truth)
    assert up <= truth * (1 + 2e-3) + 1e-150, (layer, shape, up, truth)


@pytest.mark.parametrize("width", [4, 8])
def test_the_banded_bound_certifies_the_dcgan28_critic_convs_within_1e3(width):
    """Each conv of the critic through the band (forced), against its dense matrix."""
    from lipgan.models.gan28 import critic

    torch.manual_seed(0)
    model = critic(width).double().eval()
    shapes = [(1, 28, 28), (width, 14, 14), (2 * width, 7, 7)]
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    for layer, shape in zip(convs, shapes):
        up = _band_bound(layer, shape)
        truth = dense_truth(layer, shape)
        assert truth * (1 - 1e-12) <= up <= truth * (1 + 1e-3), (layer, up, truth)


def test_a_side_over_the_dense_limit_is_certified_by_the_band_in_layer_bound():
    """Above CHOL_LIMIT, layer_bound takes the band (method "chol") where it is affordable."""
    from lipgan.analysis.operators import layer_bound

    torch.manual_seed(1)
    layer = nn.Conv2d(8, 16, 5, stride=2, padding=2).double()
    shape = (8, 14, 14)  # output side 16 * 49 = 784
    truth = dense_truth(layer, shape)
    b = layer_bound(layer, shape, dense_limit=0, lower=False, chol_limit=400)
    assert b.method == "chol" and truth * (1 - 1e-12) <= b.upper <= truth * (1 + 1e-3)
    b = layer_bound(layer, shape, dense_limit=0, lower=False, chol_limit=0)  # 0: no Cholesky
    assert b.method == "freq" and b.upper >= truth


@pytest.mark.parametrize("n", [1, 3, 7, 30])
@pytest.mark.parametrize("spread", [0.0, 1.0])
def test_a_matrix_smaller_than_the_krylov_space_gets_a_tight_certificate(n, spread):
    """The float32 Lanczos estimate stops at the space's dimension and at float32 breakdown
    (it once went on building a 40-vector space of rounding: 2010x too high on 7 equal
    eigenvalues, and a Conv1d(1, 1, 1) on length 3 was certified at 46x its norm)."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = (1 + spread * torch.linspace(0, 1, n, dtype=torch.float64)) * 5.6e-5
    G = (Q * ev) @ Q.t()
    t = certify.cholesky_max_eig(G)
    assert t is not None and float(ev.max()) <= t <= float(ev.max()) * (1 + 2e-3)


@pytest.mark.slow
@given(cfg=conv_configs(mode="zeros", max_side=10) | conv_configs(mode="T", max_side=10))
@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_the_banded_conv_bound_sweep(cfg):
    """The larger sweep of the test above (``make test-slow``)."""
    test_the_banded_conv_bound_is_never_below_the_dense_truth_and_within_2e3.hypothesis.inner_test(
        cfg
    )
