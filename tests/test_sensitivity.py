"""lipgan.sensitivity: quotients bounded by the Lipschitz constant, exact restoration of weights."""

import pytest
import torch
from torch import nn

from lipgan import sensitivity as S

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


def test_linear_model_quotients_lie_between_singular_values():
    torch.manual_seed(0)
    lin = nn.Linear(6, 6).double()
    sv = torch.linalg.svdvals(lin.weight.detach())
    x = torch.randn(32, 6, dtype=torch.float64)
    rep = S.input_sensitivity(lin, x, sizes=(0.1, 1.0), n_noise=4, pgd_steps=30, classifier=False)
    for eps in (0.1, 1.0):
        g = rep["gaussian"][eps]
        assert sv[-1] - 1e-9 <= g["min"] <= g["max"] <= sv[0] + 1e-9
        # the worst case found by PGD is the top singular value (a linear map)
        assert rep["pgd"][eps]["max"] == pytest.approx(float(sv[0]), rel=1e-3)
        assert rep["pgd"][eps]["mean"] >= g["mean"]
    assert not rep["classifier"]


def test_classifier_flips_grow_with_size_and_pgd_beats_noise():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(64, 4)
    net.train()
    rep = S.input_sensitivity(net, x, sizes=(0.05, 2.0), n_noise=4, pgd_steps=10)
    assert rep["classifier"]
    assert net.training  # mode restored
    small, big = rep["gaussian"][0.05]["flipped"], rep["gaussian"][2.0]["flipped"]
    assert small <= big
    assert rep["pgd_flip"][2.0]["flipped"] >= rep["gaussian"][2.0]["flipped"]
    assert 0.0 <= rep["pgd_flip"][0.05]["flipped"] <= 1.0


def test_parameter_noise_changes_outputs_and_restores_weights_exactly():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    rep = S.parameter_sensitivity(net, x, y, eps=(1e-4, 1e-1), n_draws=4)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])  # bit for bit
    assert rep[1e-4]["output_rel"]["mean"] < rep[1e-1]["output_rel"]["mean"]
    # first order: the output change scales linearly with eps for small eps
    assert rep[1e-4]["output_rel"]["mean"] < 1e-2
    expected_loss = nn.functional.cross_entropy(net(x), y).item()
    assert rep["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert "flipped" in rep[1e-1]


def test_parameter_noise_restores_after_an_error():
    net = nn.Linear(3, 1)
    before = net.weight.detach().clone()

    def bad_loss(out, y):
        if not torch.equal(net.weight, before):
            raise RuntimeError("boom")
        return out.mean()

    with pytest.raises(RuntimeError):
        S.parameter_sensitivity(net, torch.randn(4, 3), loss_fn=bad_loss, eps=(0.5,))
    assert torch.equal(net.weight, before)
