"""lipgan.smoothness on quadratics (exact answers from eigvalsh) and on a small network."""

import numpy as np
import pytest
import torch
from torch import nn

from lipgan import smoothness as S

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


def random_symmetric(n, seed, definite=False):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(-2.0, 5.0, n, dtype=torch.float64)
    if definite:
        lam = torch.linspace(0.5, 5.0, n, dtype=torch.float64)
    return Q @ torch.diag(lam) @ Q.t()


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("definite", [False, True])
def test_quadratic_extremes_equal_eigenvalues(method, definite):
    A = random_symmetric(30, seed=1, definite=definite)
    ev = np.linalg.eigvalsh(A.numpy())

    def f(x):
        return 0.5 * x @ A @ x

    x = torch.randn(30, dtype=torch.float64)
    # power iteration converges at rate (lambda_2 / lambda_1), so it gets more steps
    res = S.input_hessian_extremes(f, x, method=method, n_iter=3000 if method == "power" else 200)
    assert res["L"] == pytest.approx(ev[-1], rel=1e-4)
    assert res["mu"] == pytest.approx(ev[0], rel=1e-4)
    if definite:
        assert res["condition"] == pytest.approx(ev[-1] / ev[0], rel=1e-3)


def test_quadratic_bounds_hold_and_fail_when_too_tight():
    A = random_symmetric(10, seed=2)
    ev = np.linalg.eigvalsh(A.numpy())

    def f(x):
        return 0.5 * x @ A @ x

    x = torch.randn(10, dtype=torch.float64)
    ok = S.check_quadratic_bounds(f, x, float(ev[-1]), float(ev[0]), radius=3.0)
    assert ok["upper_share"] == 1.0 and ok["lower_share"] == 1.0
    bad = S.check_quadratic_bounds(f, x, 0.5 * float(ev[-1]), 0.5 * float(ev[0]) + 1, radius=3.0)
    assert bad["upper_share"] < 1.0 and bad["lower_share"] < 1.0
    assert bad["upper_worst"] > 0 and bad["lower_worst"] > 0


def test_param_hessian_matches_dense_hessian():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))

    def loss_fn(out, yy):
        return nn.functional.cross_entropy(out, yy)

    res = S.param_hessian_extremes(net, loss_fn, x, y)
    params = list(net.parameters())
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(flat):
        out, i = x, 0
        ws = []
        for s in shapes:
            n = int(np.prod(s))
            ws.append(flat[i : i + n].reshape(s))
            i += n
        h = torch.tanh(out @ ws[0].t() + ws[1])
        return loss_fn(h @ ws[2].t() + ws[3], y)

    H = torch.autograd.functional.hessian(loss_of, flat0)
    ev = np.linalg.eigvalsh(H.numpy())
    assert res["L"] == pytest.approx(ev[-1], rel=1e-6)
    assert res["mu"] == pytest.approx(ev[0], rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("n,rank,seed", [(100, 5, 0), (100, 5, 1), (50, 3, 1), (200, 10, 0)])
def test_rank_deficient_psd_hessian_has_mu_zero(n, rank, seed):
    """Finding 4: Lanczos past breakdown gave mu = -3290 (first case) for a PSD Hessian (mu 0)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rank, n, generator=g, dtype=torch.float64)

    def f(x):
        return 0.5 * (W @ x).square().sum()  # Hessian W^T W

    res = S.input_hessian_extremes(f, torch.randn(n, generator=g, dtype=torch.float64))
    ev = np.linalg.eigvalsh((W.t() @ W).numpy())
    assert res["L"] == pytest.approx(ev[-1], rel=1e-8)
    assert abs(res["mu"]) <= 1e-8 * res["L"]
