"""LipSDP-Neuron: lipgan's first-order solver against an SDP solved by cvxpy, and the dual bound."""

import math

import pytest
import torch

from lipgan.analysis.lipsdp import lipsdp_dual_bound, lipsdp_neuron

pytestmark = pytest.mark.usefixtures("one_thread")


def _cvxpy_lipsdp(W0, W1, slope):
    """The full (n + h) LMI of Fazlyab et al. (2019), written here (not lipgan's formulation):
    returns sqrt(rho*) and the dual matrix's factor (F1, F2)."""
    cp = pytest.importorskip("cvxpy")
    import numpy as np

    a, b = slope
    A, B = W0.double().numpy(), W1.double().numpy()
    h, n = A.shape
    t = cp.Variable(h, nonneg=True)
    rho = cp.Variable()
    T = cp.diag(t)
    M = cp.bmat([[-rho * np.eye(n) - 2 * a * b * A.T @ T @ A, (a + b) * A.T @ T],
                 [(a + b) * T @ A, B.T @ B - 2 * T]])  # fmt: skip
    lmi = 0.5 * (M + M.T) << 0
    cp.Problem(cp.Minimize(rho), [lmi]).solve(solver="CLARABEL")
    Z = np.asarray(lmi.dual_value)
    ev, Q = np.linalg.eigh(0.5 * (Z + Z.T))
    F = torch.from_numpy(Q * np.sqrt(np.clip(ev, 0, None)))
    return math.sqrt(float(rho.value)), F[:n], F[n:]


@pytest.mark.parametrize("slope", [(0.0, 1.0), (0.2, 1.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_first_order_lipsdp_within_a_thousandth_of_the_sdp_optimum(seed, slope):
    torch.manual_seed(seed)
    W0, W1 = torch.randn(16, 20), torch.randn(5, 16)
    ref, F1, F2 = _cvxpy_lipsdp(W0, W1, slope)
    lower = lipsdp_dual_bound(W0, W1, F1, F2, slope)
    got, _ = lipsdp_neuron(W0, W1, slope)
    assert lower <= ref * (1 + 1e-6)  # weak duality, up to the solver's tolerance
    assert lower >= ref * (1 - 1e-4)  # the repaired dual is (nearly) optimal
    assert got >= lower  # the first-order value is a feasible T: never below the dual bound
    assert got <= lower * 1.001


def test_dual_bound_is_below_every_feasible_multiplier():
    torch.manual_seed(3)
    W0, W1 = torch.randn(10, 7), torch.randn(3, 10)
    gen = torch.Generator().manual_seed(0)
    F1, F2 = torch.randn(7, 4, generator=gen), torch.randn(10, 4, generator=gen)
    lower = lipsdp_dual_bound(W0, W1, F1, F2)  # any F: repaired to a feasible dual point
    got, T = lipsdp_neuron(W0, W1)
    assert 0 < lower <= got
    # T = ||W1||^2 I certifies the product of the norms, so the dual bound is below it as well
    norm = torch.linalg.matrix_norm
    prod = float(norm(W0.double(), 2) * norm(W1.double(), 2))
    assert lower <= prod * (1 + 1e-12)
    # and above the attained ||W1 D W0 x|| for one activation pattern (a rank-one dual point)
    x = torch.randn(7, 1, generator=gen, dtype=torch.float64)
    D = (W0.double() @ x > 0).double()
    v = D * (W0.double() @ x)
    att = float((W1.double() @ v).norm() / x.norm())
    assert lipsdp_dual_bound(W0, W1, x, v) >= att * (1 - 1e-9)
