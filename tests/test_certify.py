"""The Cholesky certificates (lipgan.analysis.certify) and the block-sparse one on conv Gram
matrices, against eigenvalues and dense matrices from torch's own forward in float64."""

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


def sparse_gram(n_nodes: int, m: int, n_cols: int, reads: int, seed: int):
    """A PSD Gram matrix ``B B^T`` in blocks of m with its block graph: node i's block row of B
    reads ``reads`` random column blocks of ``n_cols``, so ``G[i, j]`` is an exact zero unless
    i and j read a common one."""
    g = torch.Generator().manual_seed(seed)
    B = torch.zeros(n_nodes * m, n_cols * m, dtype=torch.float64)
    sets = [torch.randperm(n_cols, generator=g)[:reads].tolist() for _ in range(n_nodes)]
    for i, cols in enumerate(sets):
        for c in cols:
            B[i * m : (i + 1) * m, c * m : (c + 1) * m] = torch.randn(
                m, m, generator=g, dtype=torch.float64
            )
    adjacency = [{j for j in range(n_nodes) if set(sets[i]) & set(sets[j])} for i in range(n_nodes)]
    return B @ B.t(), adjacency


def to_slots(G: torch.Tensor, pattern: certify.BlockPattern, m: int) -> torch.Tensor:
    """The slots sparse_cholesky_bound takes: slot (r, k) holds ``G[k, r]`` (nodes at those
    elimination positions), float32."""
    A = torch.zeros(len(pattern.slot), m, m, dtype=torch.float32)
    for (r, k), i in pattern.slot.items():
        a, b = pattern.order[k], pattern.order[r]
        A[i] = G[a * m : (a + 1) * m, b * m : (b + 1) * m].float()
    return A


@given(
    n_nodes=st.integers(1, 9),
    m=st.integers(1, 8),
    n_cols=st.integers(1, 8),
    reads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_the_sparse_certificate_is_never_below_lambda_max_and_within_1e2_above_it(
    n_nodes, m, n_cols, reads, seed
):
    G, adjacency = sparse_gram(n_nodes, m, n_cols, min(reads, n_cols), seed)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    pattern = certify.min_degree_pattern(adjacency)
    for step in (-1e-2, -1e-4, -1e-6, -1e-7, 1e-4, 1e-3, 1e-2):  # below lambda_max too
        t = certify.sparse_cholesky_bound(to_slots(G, pattern, m), pattern, lam * (1 + step))
        if step >= 1e-3:
            assert t is not None, (step, lam)
        if t is not None:
            assert t >= lam, (step, t, lam)
            assert t <= lam * (1 + max(step, 0) + 1e-2), (step, t, lam)


def test_the_sparse_certificate_covers_the_stated_error_and_ignores_the_upper_diagonal_triangle():
    G, adjacency = sparse_gram(6, 5, 6, 2, seed=3)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    pattern = certify.min_degree_pattern(adjacency)
    delta = 1e-3 * lam
    t = certify.sparse_cholesky_bound(to_slots(G, pattern, 5), pattern, lam * 1.001, delta)
    assert t is not None and t >= lam + delta
    # the diagonal blocks are read in their lower triangle only
    A = to_slots(G, pattern, 5)
    for k in range(6):
        A[pattern.slot[(k, k)]].triu_(1).mul_(-7).add_(torch.tril(A[pattern.slot[(k, k)]]))
    assert certify.sparse_cholesky_bound(A, pattern, lam * 1.001) == pytest.approx(
        certify.sparse_cholesky_bound(to_slots(G, pattern, 5), pattern, lam * 1.001), rel=1e-6
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_float32_factor_residual_is_within_the_margin_it_adds(seed):
    """``||L L^T - fl(s I - G)||_2`` (float64, from the float32 factor itself) is at most
    ``factor_margin``, the rounding term the certificate adds; near-singular ``s I - G``."""
    G, adjacency = sparse_gram(7, 24, 7, 3, seed)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    pattern = certify.min_degree_pattern(adjacency)
    m, n = 24, 7 * 24
    A = to_slots(G, pattern, m)
    B = torch.zeros(n, n, dtype=torch.float64)  # fl(s I - G), as _factor forms it
    s = lam * (1 + 1e-5)
    for (r, k), i in pattern.slot.items():
        blk = -A[i].double().t()  # slot (r, k) holds G[k, r]: block (r, k) is its transpose
        if r == k:
            blk = torch.tril(blk) + torch.tril(blk, -1).t()
            blk = (blk.float() + torch.eye(m) * s).double()
        a, b = pattern.order[r], pattern.order[k]
        B[a * m : (a + 1) * m, b * m : (b + 1) * m] = blk
        B[b * m : (b + 1) * m, a * m : (a + 1) * m] = blk.t()
    assert certify._factor(A, pattern, s)
    L = torch.zeros(n, n, dtype=torch.float64)
    for (r, k), i in pattern.slot.items():
        a, b = pattern.order[r], pattern.order[k]
        L[a * m : (a + 1) * m, b * m : (b + 1) * m] = A[i].double().t()
    residual = float(torch.linalg.matrix_norm(L @ L.t() - B, ord=2))
    margin = certify.factor_margin(A, pattern)
    assert 0 < residual <= margin, (residual, margin)
    assert margin < 1e-2 * lam


@given(n=st.integers(1, 12), p=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_the_minimum_degree_pattern_holds_every_fill_block(n, p, seed):
    """Eliminating position k joins its later neighbours: each pair of them has a block."""
    g = torch.Generator().manual_seed(seed)
    edges = torch.rand(n, n, generator=g) < p
    adjacency = [{j for j in range(n) if edges[min(i, j), max(i, j)] and i != j} for i in range(n)]
    pat = certify.min_degree_pattern(adjacency)
    assert sorted(pat.order) == list(range(n))
    pos = pat.position
    for i in range(n):
        for j in adjacency[i]:
            assert (max(pos[i], pos[j]), min(pos[i], pos[j])) in pat.slot
    for k, rows in enumerate(pat.cols):
        assert all(r > k for r in rows)
        for a in rows:
            for b in rows:
                if a >= b:
                    assert (a, b) in pat.slot
    assert pat.work(3) == pytest.approx(sum(27 * (1 / 3 + len(c) * (len(c) + 2)) for c in pat.cols))


def test_the_minimum_degree_order_saves_work_on_the_dcgan28_convs():
    """The critic's second and third conv (width 64) as position graphs: 49 nodes of 128 and
    16 of 256 (positions within 2 rows and 2 columns share reads)."""

    def grid(h, w, reach):
        nodes = [(i, j) for i in range(h) for j in range(w)]
        return [
            {b for b, q in enumerate(nodes) if max(abs(p[0] - q[0]), abs(p[1] - q[1])) <= reach}
            for p in nodes
        ]

    w2 = certify.min_degree_pattern(grid(7, 7, 2)).work(128)
    w3 = certify.min_degree_pattern(grid(4, 4, 2)).work(256)
    assert 1.7e10 < w2 < 1.9e10 and w2 < (49 * 128) ** 3 / 3 / 4
    assert 1.4e10 < w3 < 1.6e10 and w3 < (16 * 256) ** 3 / 3 * 0.7


def _sparse_bound(layer: nn.Module, shape) -> float | None:
    """The block-sparse certificate, forced (no dense factorization, no work limit)."""
    geom = conv_geometry(layer, shape)
    if geom.mode != "zeros":
        return None
    return convgram.cholesky_bound(geom, limit=1, work=math.inf)


@given(cfg=conv_configs(mode="zeros") | conv_configs(mode="T"))
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_the_sparse_conv_bound_is_never_below_the_dense_truth_and_within_5e3(cfg):
    layer, shape = build_conv(cfg)
    assume(layer is not None)
    up = _sparse_bound(layer, shape)
    assume(up is not None)
    truth = dense_truth(layer, shape)
    assert up >= truth * (1 - 1e-12), (layer, shape, up, truth)
    assert up <= truth * (1 + 5e-3) + 1e-150, (layer, shape, up, truth)


@pytest.mark.parametrize("width", [4, 8])
def test_the_sparse_bound_certifies_the_dcgan28_critic_convs_within_3e3(width):
    """Each conv of the critic through the block-sparse certificate (forced), against its dense
    matrix."""
    from lipgan.models.gan28 import critic

    torch.manual_seed(0)
    model = critic(width).double().eval()
    shapes = [(1, 28, 28), (width, 14, 14), (2 * width, 7, 7)]
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    for layer, shape in zip(convs, shapes):
        up = _sparse_bound(layer, shape)
        truth = dense_truth(layer, shape)
        assert truth * (1 - 1e-12) <= up <= truth * (1 + 3e-3), (layer, up, truth)


def test_a_side_over_the_dense_limit_is_certified_block_sparse_in_layer_bound():
    """Above CHOL_LIMIT, layer_bound takes the block-sparse certificate (method "chol")."""
    from lipgan.analysis.operators import layer_bound

    torch.manual_seed(1)
    layer = nn.Conv2d(8, 16, 5, stride=2, padding=2).double()
    shape = (8, 14, 14)  # output side 16 * 49 = 784
    truth = dense_truth(layer, shape)
    b = layer_bound(layer, shape, dense_limit=0, lower=False, chol_limit=400)
    assert b.method == "chol" and truth * (1 - 1e-12) <= b.upper <= truth * (1 + 3e-3)
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
def test_the_sparse_conv_bound_sweep(cfg):
    """The larger sweep of the test above (``make test-slow``)."""
    test_the_sparse_conv_bound_is_never_below_the_dense_truth_and_within_5e3.hypothesis.inner_test(
        cfg
    )
