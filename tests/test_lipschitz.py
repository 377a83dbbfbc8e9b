"""lipgan.lipschitz: bounds bracket the truth, meet it on linear nets; tighter ones are tighter."""

import itertools
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipgan import lipschitz as L
from lipgan.errors import LipganError

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


FAST = dict(restarts=4, steps=8)


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
    got, T = L.lipsdp_neuron(W0, W1, max_iter=400)  # by steps, not time
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
    got2, _ = L.lipsdp_neuron(W0, W1, (0.2, 1.0), max_iter=400)
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
    assert rows[0]["reshaped"] is not None and rows[0]["operator_method"]
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
    rep = L.estimate(critic, torch.randn(4, 1, 28, 28), restarts=2, steps=3, lipsdp_iters=40)
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


def dense_truth(model, shape):
    """||J|| of an affine model from torch's own forward on the identity basis, float64."""
    m = model.double().eval()
    n = math.prod(shape)
    with torch.no_grad():
        cols = m(torch.eye(n, dtype=torch.float64).reshape(n, *shape)).reshape(n, -1)
        cols = cols - m(torch.zeros(1, *shape, dtype=torch.float64)).reshape(1, -1)
    return float(torch.linalg.matrix_norm(cols, ord=2))


def test_residuals_and_overridden_forwards_are_bounded_from_the_graph():
    # finding 8: today every non-Sequential model is refused ("wrap the layers in nn.Sequential")
    torch.manual_seed(8)
    res = Residual()
    up, _ = L.upper_bounds(res, (4,))
    W = res.f.weight.detach().double()
    assert up["operator_product"] == pytest.approx(1 + float(torch.linalg.matrix_norm(W, ord=2)))
    assert up["merged_segments"] >= dense_truth(res, (4,)) * (1 - 1e-9)
    rep = L.estimate(nn.Sequential(nn.Linear(4, 4), Residual()), torch.randn(4, 4), **FAST)
    check_bracket(rep)
    dbl = Doubling(nn.Linear(4, 4))  # a Sequential subclass whose forward scales: bounded as 2x
    up, rows = L.upper_bounds(dbl, (4,))
    assert up["merged_segments"] == pytest.approx(dense_truth(dbl, (4,)), rel=1e-9)
    assert [r["name"] for r in rows] == ["0", "mul"]


def test_models_it_cannot_bound_say_so():
    class Attention(nn.Module):
        def forward(self, x):
            return torch.softmax(x @ x.transpose(1, 2), -1) @ x

    with pytest.raises(LipganError, match="input shape"):
        L.layer_table(nn.Sequential(nn.Conv2d(1, 1, 3)))
    with pytest.raises(LipganError, match="Hardshrink"):
        L.layer_table(nn.Sequential(nn.Linear(4, 4), nn.Hardshrink()), (4,))
    with pytest.raises(LipganError, match="two input-dependent"):
        L.upper_bounds(Attention(), (3, 4))
    with pytest.raises(LipganError, match="LayerNorm"):
        L.upper_bounds(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), (4,))

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(LipganError, match="torch.fx cannot trace"):
        L.upper_bounds(Branchy(), (4,))


def test_lipgans_group_sort_is_one_lipschitz_by_isinstance():
    from lipgan.layers import GroupSort

    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(4, 6), GroupSort(2), nn.Linear(6, 2))
    rep = L.estimate(net, torch.randn(8, 4), **FAST)
    check_bracket(rep)
    prod = math.prod(float(torch.linalg.matrix_norm(net[i].weight.double(), ord=2)) for i in (0, 2))
    assert rep.upper["operator_product"] == pytest.approx(prod, rel=1e-9)


def test_a_foreign_class_named_group_sort_is_not_taken_for_lipgans():
    # finding 2: a class of another library named GroupSort that scales by 3 was certified 1.0
    class GroupSort(nn.Module):
        def forward(self, x):
            a, b = x.unflatten(1, (-1, 2)).unbind(2)
            return 3 * torch.stack([torch.minimum(a, b), torch.maximum(a, b)], 2).flatten(1)

    net = nn.Sequential(nn.Identity(), GroupSort())
    try:
        up, _ = L.upper_bounds(net, (4,))
    except LipganError:
        return
    assert min(up.values()) >= 3.0 * (1 - 1e-9)  # |GroupSort(x) - GroupSort(y)| = 3 |x - y|


def test_subclasses_that_change_forward_are_refused_by_name():
    # finding 3: a Conv2d padding inside forward was certified 0.200 (true 0.402); a scaled
    # adaptive pooling 0.014 (true 1.0)
    class PadConv2d(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (2, 2, 2, 2), mode="reflect"))

    class ScaledAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
        def forward(self, x):
            return super().forward(x) * math.sqrt(x.shape[-1] * x.shape[-2])

    class Hooked(nn.Linear):
        pass

    torch.manual_seed(3)
    with pytest.raises(LipganError, match=r"'conv' \(PadConv2d\).*computes something else"):
        L.upper_bounds(nn.Sequential(OrderedDict(conv=PadConv2d(1, 1, 5))), (1, 5, 5))
    with pytest.raises(LipganError, match="ScaledAdaptiveAvgPool2d"):
        L.upper_bounds(nn.Sequential(ScaledAdaptiveAvgPool2d(1)), (1, 70, 70))
    hooked = Hooked(3, 3)
    hooked.register_forward_hook(lambda m, i, o: 5 * o)
    with pytest.raises(LipganError, match="Hooked"):
        L.upper_bounds(hooked, (3,))
    plain = Hooked(3, 3)  # a subclass that computes what Linear computes is fine
    up, _ = L.upper_bounds(plain, (3,))
    assert up["operator_product"] == pytest.approx(dense_truth(plain, (3,)), rel=1e-9)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Flatten(), (2, 3, 3)),
        (nn.Identity(), (5,)),
        (nn.AvgPool2d(2), (1, 4, 4)),
        (nn.Upsample(scale_factor=2), (1, 3, 3)),
        (nn.PixelUnshuffle(2), (1, 4, 4)),
    ],
)
def test_parameter_free_chains_are_estimated(layer, shape):
    # finding 6: a raw autograd RuntimeError ("element 0 of tensors does not require grad")
    rep = L.estimate(nn.Sequential(layer), input_shape=shape, **FAST)
    truth = dense_truth(nn.Sequential(layer), shape)
    assert rep.best_upper >= truth * (1 - 1e-9)
    assert rep.lower["jacobian"] == pytest.approx(truth, rel=1e-6)


def test_a_model_that_fails_in_float64_says_so():
    class Float32Only(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(4, 4))

        def forward(self, x):
            return x @ self.w.float()

    with pytest.raises(LipganError, match="float64"):
        L.estimate(Float32Only(), input_shape=(4,), **FAST)


def test_declared_constants_attribute_and_method():
    class Declared(nn.Module):
        lipschitz_constant = 2.0

        def forward(self, x):
            return 2 * torch.sin(x)

    class DeclaredByShape(nn.Module):
        def lipschitz_constant(self, input_shape):
            return float(math.sqrt(input_shape[0]))

        def forward(self, x):
            return x.sum(1, keepdim=True).expand_as(x) / math.sqrt(x.shape[1])

    up, rows = L.upper_bounds(nn.Sequential(Declared(), DeclaredByShape()), (4,))
    assert up["operator_product"] == pytest.approx(2.0 * 2.0)
    assert rows[0]["constant"] == 2.0 and rows[1]["constant"] == 2.0

    class Wrong(nn.Module):
        lipschitz_constant = 0.5  # a wrong declaration: 3x is 3-Lipschitz

        def forward(self, x):
            return 3 * x

    with pytest.raises(L.UnsoundBoundError, match="below the attained lower bound"):
        L.estimate(Wrong(), input_shape=(3,), **FAST)


def test_a_report_below_its_own_lower_bound_raises():
    # finding 5: lipgan printed "certified" for upper 1.0 < lower 3.0
    with pytest.raises(L.UnsoundBoundError):
        L.LipschitzReport(upper={"operator_product": 1.0}, lower={"jacobian": 3.0})
    rep = L.LipschitzReport(upper={"operator_product": 3.0}, lower={"jacobian": 3.0})
    assert rep.gap == pytest.approx(1.0)


def test_bounds_do_not_depend_on_the_clock(monkeypatch):
    # finding 7: LipSDP stopped on a wall-clock budget (20.56 idle, 23.78 under load)
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    first, _ = L.upper_bounds(net, (20,))
    import time as time_mod

    clock = iter(range(0, 10**9, 1000))  # a machine where every step takes 1000 s
    monkeypatch.setattr(time_mod, "perf_counter", lambda: float(next(clock)))
    again, _ = L.upper_bounds(net, (20,))
    assert again == first
    assert first["lipsdp_partition"] < first["merged_segments"]


def test_lower_bounds_on_a_non_chain_module():
    torch.manual_seed(10)
    res = Residual()
    lo = L.lower_bounds(res, torch.randn(4, 4), restarts=2, steps=3)
    truth = dense_truth(res, (4,))
    assert lo["jacobian"] == pytest.approx(truth, rel=1e-6)
    assert lo["pairs"] <= truth * (1 + 1e-9)


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
    args = ["--samples", "2", "--lipsdp-iters", "20"]
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
