"""lipgan.lipschitz: bounds bracket the truth, meet it on linear nets; tighter ones are tighter."""

import itertools
import math

import pytest
import torch
from torch import nn

from lipgan import lipschitz as L
from lipgan.errors import LipganError


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are small: on a shared 2-core machine extra threads only spin and wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FAST = dict(restarts=4, steps=8, lipsdp_time=0.5)


def vertex_bound(W1: torch.Tensor, W2: torch.Tensor) -> float:
    """max over D in {0,1}^h of ||W2 D W1||: the exact sup over the box (a convex function of D
    peaks at a vertex), which every valid bound of a ReLU layer pair must reach."""
    W1, W2 = W1.double(), W2.double()
    best = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=W1.shape[0]):
        D = torch.tensor(bits, dtype=torch.float64)
        best = max(best, float(torch.linalg.matrix_norm(W2 @ (D[:, None] * W1), ord=2)))
    return best


def check_bracket(rep, rel=1e-9):
    for lo in rep.lower.values():
        for up in rep.upper.values():
            assert lo <= up * (1 + rel), (rep.lower, rep.upper)
    prod = rep.upper["operator_product"]
    for name in ("merged_segments", "lipsdp_partition"):
        if name in rep.upper:
            assert rep.upper[name] <= prod * (1 + 1e-9)
    assert rep.upper["operator_product"] <= rep.upper["frobenius_product"] * (1 + 1e-9)


def train(model, x, y, steps=150, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_small_relu_mlp_brackets_and_reaches_vertex_bound():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    rep = L.estimate(net, torch.randn(16, 6), **FAST)
    check_bracket(rep)
    vb = vertex_bound(net[0].weight.detach(), net[2].weight.detach())
    for up in rep.upper.values():
        assert up >= vb * (1 - 1e-9)
    assert max(rep.lower.values()) <= vb * (1 + 1e-9)
    assert rep.upper["lipsdp_partition"] < rep.upper["operator_product"]
    assert rep.gap >= 1


def test_lipsdp_first_order_matches_cvxpy():
    pytest.importorskip("cvxpy")
    torch.manual_seed(1)
    W0, W1 = torch.randn(12, 8), torch.randn(4, 12)
    ref = L.lipsdp_neuron_cvxpy(W0, W1, solver="CLARABEL")
    got, T = L.lipsdp_neuron(W0, W1, time_limit=60.0, max_iter=400)  # by steps, not time
    assert got >= ref * (1 - 1e-4)  # cannot beat the SDP optimum
    assert got <= ref * 1.01
    # the returned T certifies got: the LMI of Fazlyab et al. holds at rho = got^2 (+ slack)
    rho = got**2 * (1 + 1e-9)
    W0d, W1d = W0.double(), W1.double()
    Td = torch.diag(T)
    M = torch.cat(
        [
            torch.cat([-rho * torch.eye(8, dtype=torch.float64), W0d.t() @ Td], 1),
            torch.cat([Td @ W0d, W1d.t() @ W1d - 2 * Td], 1),
        ]
    )
    assert float(torch.linalg.eigvalsh(M)[-1]) <= 1e-9
    # leaky slope range: also valid and above the vertex bound of that box
    got2, _ = L.lipsdp_neuron(W0, W1, (0.2, 1.0), time_limit=60.0, max_iter=400)
    ref2 = L.lipsdp_neuron_cvxpy(W0, W1, (0.2, 1.0), solver="CLARABEL")
    assert ref2 * (1 - 1e-4) <= got2 <= ref2 * 1.01


def test_trained_mlp_brackets():
    torch.manual_seed(2)
    x = torch.randn(256, 8)
    y = (x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    net = train(nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 3)), x, y)
    rep = L.estimate(net, x[:32], **FAST)
    check_bracket(rep)
    assert rep.upper["lipsdp_partition"] <= rep.upper["merged_segments"] * (1 + 1e-9)


def test_deep_mixed_mlp_brackets():
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Linear(5, 16),
        nn.Tanh(),
        nn.Sequential(nn.Linear(16, 16), nn.LeakyReLU(0.2)),
        nn.Dropout(0.3),
        nn.Linear(16, 8),
        nn.ELU(),
        nn.Linear(8, 2),
    )
    rep = L.estimate(net, torch.randn(16, 5), **FAST)
    check_bracket(rep)
    assert rep.upper["merged_segments"] < rep.upper["operator_product"]


@pytest.mark.parametrize("trained", [False, True])
def test_cnn_brackets(trained):
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 4, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.LeakyReLU(0.1),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 3),
    )
    x = torch.randn(64, 1, 8, 8)
    if trained:
        y = (x[:, 0, :4].sum((1, 2)) > x[:, 0, 4:].sum((1, 2))).long()
        net = train(net, x, y, steps=60)
    rep = L.estimate(net, x[:16], **FAST)
    check_bracket(rep)
    assert net.training  # the model itself is untouched (analysed as an eval-mode copy)


def test_linear_networks_meet_the_exact_value():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(7, 9), nn.Sequential(nn.Linear(9, 5)), nn.Linear(5, 4))
    W = net[2].weight @ net[1][0].weight @ net[0].weight
    exact = float(torch.linalg.matrix_norm(W.detach().double(), ord=2))
    rep = L.estimate(net, torch.randn(8, 7), **FAST)
    assert rep.upper["merged_segments"] == pytest.approx(exact, rel=1e-6)
    assert rep.lower["jacobian"] == pytest.approx(exact, rel=1e-6)
    assert rep.gap == pytest.approx(1.0, rel=1e-6)
    # a linear CNN: conv -> flatten -> linear, compared with its dense matrix
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    n = 2 * 5 * 5
    with torch.no_grad():
        cols = conv.double()(torch.eye(n, dtype=torch.float64).reshape(n, 2, 5, 5))
        cols = cols - conv(torch.zeros(1, 2, 5, 5, dtype=torch.float64))  # remove the bias
    exact = float(torch.linalg.matrix_norm(cols.t(), ord=2))
    rep = L.estimate(conv, torch.randn(4, 2, 5, 5, dtype=torch.float64), **FAST)
    assert rep.upper["merged_segments"] == pytest.approx(exact, rel=1e-6)
    assert rep.lower["jacobian"] == pytest.approx(exact, rel=1e-6)


def test_parametrized_layers_use_the_effective_weight():
    torch.manual_seed(6)
    lin = nn.Linear(10, 10)
    with torch.no_grad():
        lin.weight.mul_(5)
    sn = torch.nn.utils.parametrizations.spectral_norm(lin, n_power_iterations=50)
    net = nn.Sequential(sn, nn.ReLU(), nn.Linear(10, 2))
    net.train()
    net(torch.randn(4, 10))  # one more update, as in training
    rows = L.layer_table(net, (10,))
    eff = float(torch.linalg.matrix_norm(sn.weight.detach().double(), ord=2))
    assert rows[0]["operator"] == pytest.approx(eff, rel=1e-6)
    assert rows[0]["operator"] == pytest.approx(1.0, rel=1e-3)  # not the raw weight's ~5x


def test_layer_table_columns():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 1))
    rows = L.layer_table(net, (1, 4, 4))
    assert [r["type"] for r in rows] == ["Conv2d", "ReLU", "Flatten", "Linear"]
    assert rows[0]["reshaped"] is not None and rows[0]["operator_method"] == "gram"
    assert rows[1]["constant"] == 1.0 and rows[1]["operator"] is None
    assert rows[3]["in_shape"] == [32]


def test_stable_rank_is_frobenius_over_spectral_squared_per_layer():
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    rank_one = nn.Linear(8, 5)
    with torch.no_grad():
        rank_one.weight.copy_(torch.randn(5, 1) @ torch.randn(1, 8))  # rank 1
    square = nn.Linear(96, 8)
    with torch.no_grad():
        square.weight[:, :8].copy_(torch.eye(8))  # 8 equal singular values
        square.weight[:, 8:].zero_()
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 96), square, rank_one)
    rows = L.layer_table(net, (3, 4, 4))
    s = torch.linalg.svdvals(conv.weight.detach().reshape(6, -1).double())
    assert rows[0]["stable_rank"] == pytest.approx(float(s.square().sum() / s[0] ** 2), rel=1e-4)
    assert rows[4]["stable_rank"] == pytest.approx(8.0, rel=1e-5)
    assert rows[5]["stable_rank"] == pytest.approx(1.0, rel=1e-5)
    assert rows[1]["stable_rank"] is None  # an activation has no weight
    assert "st.rank" in str(L.estimate(net, input_shape=(3, 4, 4), lower=False, lipsdp=False))


def test_dcgan_critic_subclass_of_sequential():
    models = pytest.importorskip("lipgan.models")
    critic = models.build("critic", "dcgan28", width=4)
    rep = L.estimate(critic, torch.randn(4, 1, 28, 28), restarts=2, steps=3, lipsdp_time=0.3)
    check_bracket(rep)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.f(x)


class Doubling(nn.Sequential):
    def forward(self, x):
        return 2 * super().forward(x)


def test_models_it_cannot_bound_say_so():
    with pytest.raises(LipganError, match="cannot bound"):
        L.estimate(Residual(), torch.randn(2, 4))
    with pytest.raises(LipganError, match="cannot bound"):
        L.estimate(nn.Sequential(nn.Linear(4, 4), Residual()), torch.randn(2, 4))
    with pytest.raises(LipganError, match="does not compute the chain"):
        L.estimate(Doubling(nn.Linear(4, 4)), torch.randn(2, 4))
    with pytest.raises(LipganError, match="input shape"):
        L.layer_table(nn.Sequential(nn.Conv2d(1, 1, 3)))
    with pytest.raises(LipganError, match="cannot bound"):
        L.layer_table(nn.Sequential(nn.Linear(4, 4), nn.Hardshrink()), (4,))


def test_group_sort_by_name_is_one_lipschitz():
    class GroupSort(nn.Module):
        def forward(self, x):
            a, b = x.unflatten(1, (-1, 2)).unbind(2)
            return torch.stack([torch.minimum(a, b), torch.maximum(a, b)], 2).flatten(1)

    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(4, 6), GroupSort(), nn.Linear(6, 2))
    rep = L.estimate(net, torch.randn(8, 4), **FAST)
    check_bracket(rep)
    prod = math.prod(float(torch.linalg.matrix_norm(net[i].weight.double(), ord=2)) for i in (0, 2))
    assert rep.upper["operator_product"] == pytest.approx(prod, rel=1e-9)


def test_cli_on_exported_network_and_run_folder(tmp_path, capsys):
    import json

    runs = pytest.importorskip("lipgan.runs", reason="runs not available")
    from lipgan import models
    from lipgan.cli import main

    net = models.build("critic", "dcgan28", width=4)
    (tmp_path / "run").mkdir()
    runs.export_network(
        net, tmp_path / "run" / "critic.safetensors", "critic", "dcgan28", {"width": 4}
    )
    runs.export_network(net, tmp_path / "c.safetensors", "critic", "dcgan28", {"width": 4})
    args = ["--samples", "2", "--lipsdp-time", "0.2"]
    assert main(["lipschitz", str(tmp_path / "c.safetensors"), "--json", *args]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["best_lower"] <= rep["best_upper"]
    assert rep["upper"]["merged_segments"] <= rep["upper"]["operator_product"]
    assert [r["type"] for r in rep["layers"]][0] == "Conv2d"
    assert main(["lipschitz", str(tmp_path / "run"), "--input-shape", "1,28,28", *args]) == 0
    text = capsys.readouterr().out
    assert "operator_product" in text and "gap" in text
    assert main(["lipschitz", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
