"""Per-layer soundness: lipgan's certified bounds against the dense matrix of torch's own forward.

Ground truth never comes from lipgan: ``module(x) - module(0)`` on the identity basis in float64,
then ``torch.linalg.matrix_norm(ord=2)``. Every certified upper must be >= truth (or the layer is
refused with a LipganError), every attained lower <= truth and >= 0.99 truth.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lipgan.analysis import conv as conv_mod
from lipgan.analysis import iteration
from lipgan.analysis.operators import LayerBound, layer_bound, linear_map
from lipgan.errors import LipganError

UP, LOW = 1 - 1e-9, 1 + 1e-9


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


def dense_truth(module: nn.Module, shape) -> float:
    """||J|| of an affine module from torch's own forward on the identity basis (float64)."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        out = module(eye) - module(torch.zeros(1, *shape, dtype=torch.float64))
    return float(torch.linalg.matrix_norm(out.reshape(n, -1), ord=2))


def check_affine(module: nn.Module, shape, **kw) -> LayerBound | None:
    """Certified upper >= truth, attained lower in [0.99 truth, truth]; None when refused."""
    module = module.double().eval()
    truth = dense_truth(module, shape)
    try:
        b = layer_bound(module, shape, **kw)
    except LipganError:
        return None
    assert b.upper >= truth * UP, (module, shape, b, truth)
    assert b.lower <= truth * LOW, (module, shape, b, truth)
    assert b.lower >= 0.99 * truth - 1e-12, (module, shape, b, truth)
    if b.exact:
        assert b.upper <= truth * (1 + 1e-6) + 1e-12
    # the linear map lipgan bounds is what the module computes (bias removed)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref = module(x) - module(torch.zeros(1, *shape, dtype=torch.float64))
        got = linear_map(module, shape)(x)
    assert torch.allclose(got, ref, atol=1e-10 * max(1.0, float(ref.abs().max())))
    return b


# ---------------------------------------------------------------- convolutions


#: every kind of convolution the fast suite covers on each run: dimension x padding mode
#: (ConvTranspose has zero padding only)
CONV_KINDS = [
    (d, mode) for d in (1, 2, 3) for mode in ("zeros", "reflect", "replicate", "circular", "T")
]


@st.composite
def conv_configs(draw, max_side=None, d=None, mode=None):
    """A random conv (or ConvTranspose, ``mode="T"``); ``d`` and ``mode`` drawn when None."""
    d = d or draw(st.sampled_from([1, 2, 2, 2, 3]))
    transposed = draw(st.booleans()) if mode is None else mode == "T"
    groups = draw(st.sampled_from([1, 1, 2]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    side = max_side or {1: 12, 2: 8, 3: 4}[d]
    size = tuple(draw(st.integers(1, side)) for _ in range(d))
    k = tuple(draw(st.integers(1, 4 if d < 3 else 3)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(d))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(d))
    init = draw(st.sampled_from(["rand", "pos", "ones"]))
    seed = draw(st.integers(0, 2**16))
    if transposed:
        pad = tuple(draw(st.integers(0, 2)) for _ in range(d))
        op = tuple(draw(st.integers(0, s - 1)) for s in stride)
        op = tuple(min(o, max(s, dd) - 1) for o, s, dd in zip(op, stride, dil))
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[d - 1]
        kw = dict(stride=stride, padding=pad, output_padding=op, dilation=dil, groups=groups)
    else:
        mode = mode or draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        if draw(st.integers(0, 5)) == 0:
            pad, stride = "same", (1,) * d
        else:
            pad = tuple(draw(st.integers(0, 3)) for _ in range(d))
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1]
        kw = dict(stride=stride, padding=pad, dilation=dil, groups=groups, padding_mode=mode)
    return cls, cin, cout, k, kw, size, init, seed


def build_conv(cfg):
    cls, cin, cout, k, kw, size, init, seed = cfg
    torch.manual_seed(seed)
    try:
        layer = cls(cin, cout, k, **kw).double()
        if init == "pos":
            layer.weight.data.abs_()
        elif init == "ones":
            layer.weight.data.fill_(1.0)
        shape = (cin, *size)
        with torch.no_grad():
            layer(torch.zeros(1, *shape, dtype=torch.float64))
    except (RuntimeError, ValueError):
        return None, None  # a configuration torch itself refuses
    return layer, shape


@pytest.mark.parametrize("d,mode", CONV_KINDS)
@given(data=st.data())
@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_conv_bounds_never_below_the_dense_truth(d, mode, data):
    """A few random layers of every kind on each run (the slow sweep draws 400 more)."""
    layer, shape = build_conv(data.draw(conv_configs(d=d, mode=mode)))
    assume(layer is not None)
    check_affine(layer, shape)  # exact paths (dense, fft) where they apply
    check_affine(layer, shape, dense_limit=0)  # the Cholesky certificate where it applies
    check_affine(layer, shape, dense_limit=0, chol_limit=0)  # the structured bounds alone


@pytest.mark.slow
@given(conv_configs(max_side=14))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_conv_bounds_sweep(cfg):
    layer, shape = build_conv(cfg)
    assume(layer is not None)
    check_affine(layer, shape, dense_limit=0)
    check_affine(layer, shape, dense_limit=0, chol_limit=0)


# ---------------------------------------------------------------- other linear layers


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**16), st.booleans())
@settings(max_examples=20, deadline=None)
def test_linear_and_batchnorm(n_in, n_out, seed, low_rank):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    if low_rank:
        lin.weight.data = torch.randn(n_out, 1) @ torch.randn(1, n_in)
    b = check_affine(lin, (n_in,))
    assert b.exact and b.method == "svd"
    assert check_affine(lin, (3, n_in)).exact  # applied per row: the same norm
    for cls, shape in ((nn.BatchNorm1d, (n_in,)), (nn.BatchNorm2d, (n_in, 2, 3)),
                       (nn.BatchNorm3d, (n_in, 2, 2, 1))):  # fmt: skip
        bn = cls(n_in)
        bn.running_var.uniform_(0.1, 3.0)
        bn.running_mean.normal_()
        bn.weight.data.normal_()
        assert check_affine(bn, shape).method == "diag"


@st.composite
def avg_pools(draw):
    d = draw(st.integers(1, 3))
    size = tuple(draw(st.integers(2, {1: 12, 2: 8, 3: 4}[d])) for _ in range(d))
    k = tuple(draw(st.integers(1, min(3, n))) for n in size)
    s = tuple(draw(st.integers(1, 3)) for _ in range(d))
    p = tuple(draw(st.integers(0, kk // 2)) for kk in k)
    kw = dict(ceil_mode=draw(st.booleans()), count_include_pad=draw(st.booleans()))
    if d > 1 and draw(st.booleans()):
        kw["divisor_override"] = draw(st.integers(1, 5))
    cls = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[d - 1]
    return cls(k, s, p, **kw), (2, *size)


@given(avg_pools(), st.integers(0, 1))
@settings(max_examples=30, deadline=None)
def test_average_pooling(pool_shape, no_dense):
    pool, shape = pool_shape
    check_affine(pool, shape, dense_limit=0 if no_dense else 2**21)
    d = len(shape) - 1
    out = tuple(max(1, n // 2) for n in shape[1:])
    ad = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[d - 1](out)
    check_affine(ad, shape, dense_limit=0 if no_dense else 2**21)


@given(
    st.integers(1, 3),
    st.sampled_from(["nearest", "nearest-exact", "linear", "area"]),
    st.sampled_from([None, False, True]),
    st.sampled_from([0.5, 1.5, 2.0, 2.5, 3.0, "size"]),
    st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_interpolation(d, mode, align, factor, seed):
    g = torch.Generator().manual_seed(seed)
    size = tuple(int(v) for v in torch.randint(2, {1: 9, 2: 6, 3: 4}[d], (d,), generator=g))
    if mode == "linear":
        mode = ("linear", "bilinear", "trilinear")[d - 1]
    else:
        align = None
    if factor == "size":
        up = nn.Upsample(size=tuple(int(v) for v in torch.randint(1, 9, (d,), generator=g)),
                         mode=mode, align_corners=align)  # fmt: skip
    else:
        up = nn.Upsample(scale_factor=factor, mode=mode, align_corners=align)
    try:
        with torch.no_grad():
            up(torch.zeros(1, 1, *size, dtype=torch.float64))
    except (RuntimeError, ValueError):
        assume(False)
    check_affine(up, (2, *size))


@pytest.mark.parametrize(
    "module,shape",
    [
        (nn.ReflectionPad2d((1, 2, 0, 3)), (2, 5, 5)),
        (nn.ReplicationPad1d((3, 1)), (2, 4)),
        (nn.ReplicationPad3d(1), (1, 2, 3, 2)),
        (nn.ZeroPad2d((1, -1, 2, 0)), (2, 4, 4)),
        (nn.ConstantPad1d(2, 3.5), (2, 4)),
        (nn.CircularPad2d((2, 1, 1, 1)), (1, 3, 4)),
        (nn.PixelShuffle(2), (8, 3, 2)),
        (nn.PixelUnshuffle(2), (2, 4, 6)),
        (nn.Flatten(), (2, 3, 2)),
        (nn.Unflatten(1, (2, 3)), (6,)),
        (nn.Identity(), (5,)),
        (nn.Dropout(0.3), (5,)),
        (nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), (1, 3, 4)),
        (nn.Upsample(scale_factor=(2, 1, 3), mode="trilinear"), (1, 2, 3, 2)),
    ],
)
def test_padding_reshapes_and_resampling_are_exact(module, shape):
    b = check_affine(module, shape)
    assert b is not None and b.exact


# ---------------------------------------------------------------- nonlinear layers


def max_quotient(module, shape, pairs=300, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.no_grad():
        for _ in range(pairs):
            a = torch.randn(1, *shape, generator=g, dtype=torch.float64) * 3
            b = a + scale * torch.randn(1, *shape, generator=g, dtype=torch.float64)
            worst = max(worst, float((module(a) - module(b)).norm() / (a - b).norm()))
    return worst


@pytest.mark.parametrize(
    "module,shape",
    [
        (nn.MaxPool2d(3, 2, 1), (1, 7, 7)),
        (nn.MaxPool2d(3, 1, dilation=2), (1, 7, 7)),
        (nn.MaxPool1d(4, 2, 2, ceil_mode=True), (2, 9)),
        (nn.MaxPool3d(2, 1), (1, 3, 3, 3)),
        (nn.AdaptiveMaxPool2d((3, 2)), (1, 7, 5)),
        (nn.AdaptiveMaxPool1d(4), (1, 9)),
        (nn.LPPool2d(2, 3, 2), (1, 7, 7)),
        (nn.LPPool1d(4, 3, 1), (1, 8)),
    ],
)
def test_max_and_lp_pooling_cover_every_difference_quotient(module, shape):
    b = layer_bound(module, shape)
    assert max_quotient(module, shape) <= b.upper * LOW
    # the constant is attained: raise one entry covered by the most windows from 0
    n = math.prod(shape)
    best = 0.0
    with torch.no_grad():
        zero = module(torch.zeros(1, *shape, dtype=torch.float64))
        for i in range(n):
            e = torch.zeros(n, dtype=torch.float64)
            e[i] = 1e-3
            best = max(best, float((module(e.reshape(1, *shape)) - zero).norm()) / 1e-3)
    assert best == pytest.approx(b.upper, rel=1e-6)


def test_lppool_odd_norms_are_refused():
    with pytest.raises(LipganError, match="LPPool"):
        layer_bound(nn.LPPool2d(3, 2), (1, 4, 4))


ACTIVATIONS = [
    nn.ReLU(), nn.LeakyReLU(0.2), nn.LeakyReLU(-1.5), nn.ELU(), nn.ELU(2.0), nn.CELU(0.5),
    nn.SELU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Mish(), nn.Softplus(2.0),
    nn.Tanh(), nn.Sigmoid(), nn.Hardtanh(-2, 3), nn.Hardswish(), nn.Hardsigmoid(), nn.ReLU6(),
    nn.Softsign(), nn.Tanhshrink(), nn.LogSigmoid(),
]  # fmt: skip


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: repr(a))
def test_activation_slope_bounds(act):
    b = layer_bound(act, (50,))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, generator=g, dtype=torch.float64) * 4
    c = a + torch.randn(20000, generator=g, dtype=torch.float64) * 0.3
    q = ((act(a) - act(c)) / (a - c)).abs()
    assert float(q.max()) <= b.upper * LOW
    assert b.lower <= b.upper
    x = torch.linspace(-30, 30, 600001, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(act(x).sum(), x)
    assert float(dx.abs().max()) == pytest.approx(b.lower, abs=1e-4)  # attained


def test_groupsort_only_by_isinstance():
    from lipgan.layers import GroupSort

    assert layer_bound(GroupSort(2), (6,)).upper == pytest.approx(1.0, rel=1e-9)

    class GroupSort(nn.Module):  # a foreign module with lipgan's class name, 3-Lipschitz
        def forward(self, x):
            return 3 * x.sort(dim=-1).values

    with pytest.raises(LipganError, match="GroupSort"):
        layer_bound(GroupSort(), (6,))


def test_unknown_and_training_layers_are_refused_by_name():
    with pytest.raises(LipganError, match="LayerNorm"):
        layer_bound(nn.LayerNorm(4), (4,))
    with pytest.raises(LipganError, match="BatchNorm2d"):
        layer_bound(nn.BatchNorm2d(2).train(), (2, 3, 3))
    with pytest.raises(LipganError, match="Dropout"):
        layer_bound(nn.Dropout(0.5).train(), (4,))
    with pytest.raises(LipganError):
        linear_map(nn.ReLU(), (4,))


# ---------------------------------------------------------------- findings 1, 4 and 9


@pytest.mark.parametrize(
    "layer,shape",
    [
        (nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), (3, 8, 8)),
        (nn.Conv2d(3, 8, 3, padding=1, padding_mode="replicate"), (3, 12, 12)),
        (nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="circular"), (8, 7, 7)),
        (nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="circular"), (3, 9, 9)),
        (nn.Conv2d(2, 4, 2, padding=3, padding_mode="replicate"), (2, 6, 8)),
    ],
)
@pytest.mark.parametrize("dense_limit", [0, 2**21])
def test_finding1_nonzero_padding_is_bounded_from_above(layer, shape, dense_limit):
    from lipgan import norms

    torch.manual_seed(0)
    layer = layer.double()
    layer.weight.data.abs_()  # positive kernels: the worst case of the review
    truth = dense_truth(layer, shape)
    for method in ("gram", "auto"):
        got = norms.conv_operator_norm(layer, shape, method, dense_limit=dense_limit)
        assert got >= truth * UP
    assert layer_bound(layer, shape, dense_limit=dense_limit).upper >= truth * UP


def test_finding4_power_on_rank_deficient_operators():
    from lipgan import norms

    for seed in range(3):
        torch.manual_seed(seed)
        for layer, shape in (
            (nn.Conv2d(128, 1, 3, padding=1), (128, 3, 3)),
            (nn.Conv2d(3, 2, 3, padding=1), (3, 6, 4)),
            (nn.Conv2d(16, 4, 3, stride=2, padding=1), (16, 6, 6)),
        ):
            layer = layer.double()
            truth = dense_truth(layer, shape)
            got = norms.conv_operator_norm(layer, shape, "power")
            assert 0.99 * truth <= got <= truth * LOW


def test_finding4_lanczos_stops_at_breakdown_on_psd_hessian():
    from lipgan import smoothness

    for n, rank, seed in ((100, 5, 0), (100, 5, 1), (50, 3, 1), (200, 10, 0)):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(rank, n, generator=g, dtype=torch.float64)

        def f(x, W=W):
            return 0.5 * (W @ x).square().sum()  # Hessian W^T W: PSD, rank `rank`, mu = 0

        x = torch.randn(n, generator=g, dtype=torch.float64)
        res = smoothness.input_hessian_extremes(f, x)
        H = W.t() @ W
        ev = torch.linalg.eigvalsh(H)
        assert res["L"] == pytest.approx(float(ev[-1]), rel=1e-8)
        assert abs(res["mu"]) <= 1e-8 * res["L"]
        # Ritz values stay inside the spectrum at breakdown
        theta, _ = iteration.lanczos_extreme(
            lambda v, H=H: H @ v, torch.ones(n, dtype=torch.float64)
        )
        assert theta <= float(ev[-1]) * LOW


def test_finding9_dense_gram_is_built_on_the_smaller_side(monkeypatch):
    """dcgan28's first conv (1 -> 64, 5x5/2 on 1x28x28) is 12544 x 784: work on the 784 side."""
    from lipgan.models.gan28 import critic

    layer = critic(64).double()[0]
    seen = []
    real = iteration.symmetric_max_eig
    monkeypatch.setattr(iteration, "symmetric_max_eig", lambda G: seen.append(G.shape) or real(G))
    iteration.dense_operator_norm(linear_map(layer, (1, 28, 28)), (1, 28, 28), 2**24)
    assert seen == [(784, 784)]
    # the structured bound's per-frequency matrices are 64 x 4 (space to depth): Gram on 4 x 4
    grams = []
    real_top = conv_mod._top_sq
    monkeypatch.setattr(conv_mod, "_top_sq", lambda m: grams.append(m.shape) or real_top(m))
    b = layer_bound(layer, (1, 28, 28), lower=False, chol_limit=0)
    assert b.method == "freq" and grams and all(s[-2:] == (64, 4) for s in grams)


def test_finding9_gram_iteration_squares_the_smaller_side(monkeypatch):
    seen = []
    real = torch.linalg.matrix_norm
    monkeypatch.setattr(
        torch.linalg, "matrix_norm", lambda G, *a, **k: seen.append(G.shape) or real(G, *a, **k)
    )
    W = torch.randn(3000, 3, dtype=torch.float64)
    bound = float(iteration.gram_iteration_bound(W, 8))
    assert bound >= float(torch.linalg.svdvals(W)[0]) * UP
    assert all(s[-1] <= 3000 and s[-2] == 3 for s in seen) and seen[-1][-2:] == (3, 3)


def test_convtranspose_reshaped_value_can_exceed_the_operator_norm():
    """The docs' sigma(W_mat) <= ||conv|| holds for Conv, not for a stride-2 ConvTranspose."""
    from lipgan import norms

    above = 0
    for seed in range(10):
        torch.manual_seed(seed)
        layer = nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1).double()
        truth = dense_truth(layer, (8, 7, 7))
        above += norms.conv_operator_norm(layer, (8, 7, 7), "reshaped") > truth * 1.001
    assert above > 0


# ---------------------------------------------------------------- the Cholesky certificate


@pytest.mark.parametrize("width", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_cholesky_bound_is_within_1e3_of_exact_on_the_dcgan28_critic_convs(width):
    """All three convs of the dcgan28 critic (5x5/2, zero padding 2): "chol", <= 1e-3 above."""
    from lipgan.models.gan28 import critic

    torch.manual_seed(0)
    model = critic(width).double().eval()
    shapes = [(1, 28, 28), (width, 14, 14), (2 * width, 7, 7)]
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    for layer, shape in zip(convs, shapes):
        truth = dense_truth(layer, shape)
        b = layer_bound(layer, shape, dense_limit=0, lower=False)
        assert b.method == "chol", (layer, b)
        assert truth * UP <= b.upper <= truth * (1 + 1e-3), (layer, b.upper, truth)


def _gram_with_top(n: int, top: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 * top
    ev[0] = top
    return (Q * ev) @ Q.t()


def test_cholesky_certificate_rejects_a_too_small_t():
    G = _gram_with_top(200, 2.0)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    assert iteration.cholesky_certifies(G, lam * (1 + 1e-6))
    assert not iteration.cholesky_certifies(G, lam * (1 - 1e-6))
    # the factorization's margin: t barely above lambda_max is not enough for a proof
    assert not iteration.cholesky_certifies(G, lam * (1 + 1e-16))


def test_cholesky_certificate_covers_the_stated_gram_error():
    """With ||G' - G|| <= delta, a t below lambda_max(G) + delta must not be certified."""
    G = _gram_with_top(100, 1.0, seed=3)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    delta = 1e-4
    assert iteration.cholesky_certifies(G, lam + 0.5 * delta)
    assert not iteration.cholesky_certifies(G, lam + 0.5 * delta, delta)
    assert iteration.cholesky_certifies(G, lam + 1.5 * delta, delta)
    t = iteration.cholesky_max_eig(G, delta)
    assert t is not None and lam + delta <= t <= lam * (1 + 1e-3) + 3 * delta


def test_conv_gram_matches_the_dense_gram_and_its_error_bound():
    """The assembled Gram is the dense matrix's Gram (up to the ordering of its basis)."""
    torch.manual_seed(0)
    for layer, shape in [
        (nn.Conv2d(3, 5, 3, stride=2, padding=1, groups=1), (3, 7, 6)),  # output side
        (nn.Conv2d(2, 12, 5, stride=2, padding=2), (2, 6, 6)),  # input side
    ]:
        layer = layer.double()
        n = math.prod(shape)
        eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
        with torch.no_grad():
            A = layer(eye) - layer(torch.zeros(1, *shape, dtype=torch.float64))
        A = A.reshape(n, -1).t()
        ((G, delta),) = conv_mod._conv_grams(conv_mod.conv_geometry(layer, shape), 10**6)
        ref = A @ A.t() if G.shape[0] == A.shape[0] else A.t() @ A
        ev, ev_ref = torch.linalg.eigvalsh(G.tril() + G.tril(-1).t()), torch.linalg.eigvalsh(ref)
        assert torch.allclose(ev, ev_ref, atol=1e-12, rtol=0)
        assert 0 < delta < 1e-9


def test_the_cholesky_certificate_reads_only_the_lower_triangle():
    """A Gram symmetric only up to rounding is safe: what lies above the diagonal is not read."""
    torch.manual_seed(3)
    A = torch.randn(40, 30, dtype=torch.float64)
    G = A @ A.t()
    junk = G.tril() + torch.triu(torch.randn(40, 40, dtype=torch.float64) * 50, 1)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    for t in (lam * (1 + 1e-6), lam * (1 - 1e-6)):
        assert iteration.cholesky_certifies(G, t) == iteration.cholesky_certifies(junk, t)
