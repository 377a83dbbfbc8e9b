"""Graph analysis is sound: random small graphs against the dense Jacobian of torch's own forward.

Each model is a random program over a pool of feature maps (C x H x W): convolutions, Linear maps
through flatten/unflatten, module and functional activations, scalings, residual additions,
subtractions, concatenations (sliced or mixed back by a 1x1 conv), chunks, pooling followed by
upsampling, BatchNorm in eval mode, lipgan's GroupSort (MaxMin), functional sorts, and blocks nested
in child modules. Truth (float64, from the
model's own forward, never from lipgan): the dense Jacobian; for a purely linear graph it is the
exact constant, for a ReLU graph the max of ||J(x)|| over random points is a lower bound of it.
Every certified upper bound must be >= that truth (or lipgan raises LipganError), and the
attained lower bounds must not exceed the certified upper bound.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lipgan import lipschitz as L
from lipgan.analysis.report import UnsoundBoundError
from lipgan.errors import LipganError
from lipgan.layers import GroupSort

C, H = 2, 4
OPS = [
    "conv",
    "linear",
    "relu",
    "leaky",
    "tanh",
    "scale",
    "div",
    "add",
    "sub",
    "cat_slice",
    "cat_mix",
    "chunk",
    "pool_up",
    "bn",
    "nested",
    "neg",
    "groupsort",
    "sort",
    "sort_px",
]
LINEAR_OPS = {
    "conv",
    "linear",
    "scale",
    "div",
    "add",
    "sub",
    "cat_slice",
    "cat_mix",
    "chunk",
    "pool_up",
    "bn",
    "nested",
    "neg",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


class Nested(nn.Module):
    """A residual block nested in the program: x + conv(act(conv(x)))."""

    def __init__(self, act: bool):
        super().__init__()
        self.a = nn.Conv2d(C, C, 3, padding=1)
        self.b = nn.Sequential(nn.ReLU() if act else nn.Identity(), nn.Conv2d(C, C, 1))

    def forward(self, x):
        return x + self.b(self.a(x))


class Program(nn.Module):
    """Apply ``ops`` in order; op i reads the pool entries ``srcs[i]`` and appends its result."""

    def __init__(self, ops, srcs, consts, act_nested):
        super().__init__()
        self.ops, self.srcs, self.consts = ops, srcs, consts
        self.mods = nn.ModuleList()
        for op in ops:
            if op == "conv":
                self.mods.append(nn.Conv2d(C, C, 3, padding=1))
            elif op == "linear":
                self.mods.append(nn.Linear(C * H * H, C * H * H))
            elif op == "cat_mix":
                self.mods.append(nn.Conv2d(2 * C, C, 1))
            elif op == "bn":
                bn = nn.BatchNorm2d(C)
                with torch.no_grad():
                    bn.running_mean.uniform_(-1, 1)
                    bn.running_var.uniform_(0.3, 2.0)
                    bn.weight.uniform_(-1.5, 1.5)
                self.mods.append(bn)
            elif op == "nested":
                self.mods.append(Nested(act_nested))
            elif op == "relu":
                self.mods.append(nn.ReLU())
            elif op == "groupsort":  # lipgan's MaxMin over channels: a leaf of constant 1
                self.mods.append(GroupSort(2))
            else:
                self.mods.append(nn.Identity())
        self.head = nn.Linear(C * H * H, 3)

    def forward(self, x):
        pool = [x]
        for i, op in enumerate(self.ops):
            a = pool[self.srcs[i][0] % len(pool)]
            b = pool[self.srcs[i][1] % len(pool)]
            c = self.consts[i]
            m = self.mods[i]
            if op in ("conv", "bn", "nested", "relu", "groupsort"):
                y = m(a)
            elif op == "linear":
                y = m(a.flatten(1)).view(a.shape[0], C, H, H)
            elif op == "leaky":
                y = F.leaky_relu(a, 0.1)
            elif op == "tanh":
                y = torch.tanh(a)
            elif op == "scale":
                y = c * a
            elif op == "div":
                y = a / c
            elif op == "neg":
                y = -a
            elif op == "add":
                y = a + b
            elif op == "sub":
                y = a - 0.5 * b
            elif op == "cat_slice":
                y = torch.cat([a, b], dim=1)[:, 1 : 1 + C]
            elif op == "cat_mix":
                y = m(torch.cat([a, b], dim=1))
            elif op == "sort":  # functional sort over channels, its values
                y = torch.sort(a, dim=1).values
            elif op == "sort_px":  # each channel's pixels sorted, as MaxMin-style code writes it
                y = a.flatten(2).sort(dim=-1, descending=True)[0].view_as(a)
            elif op == "chunk":
                y = torch.cat([a, b], dim=1).chunk(2, dim=1)[1]
            else:  # pool_up
                y = F.interpolate(F.avg_pool2d(a, 2), scale_factor=2, mode="nearest")
            pool.append(y)
        return self.head(pool[-1].flatten(1))


def jac_norm(model, x):
    J = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0)).reshape(-1), x)
    return float(torch.linalg.matrix_norm(J.reshape(J.shape[0], -1), ord=2))


def programs(linear_only: bool, max_ops: int):
    ops = st.sampled_from(sorted(LINEAR_OPS) if linear_only else OPS)
    return st.tuples(
        st.lists(ops, min_size=1, max_size=max_ops),
        st.lists(
            st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=max_ops, max_size=max_ops
        ),
        st.lists(
            st.floats(-3, 3).filter(lambda v: abs(v) > 0.1), min_size=max_ops, max_size=max_ops
        ),
        st.just(False) if linear_only else st.booleans(),  # a nested ReLU is not linear
        st.integers(0, 2**16),
    )


def build(spec):
    ops, srcs, consts, act_nested, seed = spec
    torch.manual_seed(seed)
    return Program(ops, srcs[: len(ops)], consts[: len(ops)], act_nested).double().eval()


def check(spec, linear: bool, points: int = 4):
    model = build(spec)
    try:
        rep = L.estimate(model, input_shape=(C, H, H), restarts=1, steps=2, lipsdp_width=64)
    except UnsoundBoundError:
        raise  # the report's own guard: a certified bound below an attained one
    except LipganError:
        return None  # a refusal is allowed; a wrong number is not
    g = torch.Generator().manual_seed(1)
    truth = max(
        jac_norm(model, torch.randn(C, H, H, generator=g, dtype=torch.float64))
        for _ in range(1 if linear else points)
    )
    for name, up in rep.upper.items():
        assert up >= truth * (1 - 1e-7), (name, up, truth, spec[0])
    assert rep.best_lower <= rep.best_upper * (1 + 1e-6)
    if linear:  # the exact constant is attained by the Jacobian lower bound
        assert rep.lower["jacobian"] == pytest.approx(truth, rel=1e-5)
    return rep


@pytest.mark.parametrize("op", OPS)
def test_every_kind_of_node_is_bounded_and_never_below_truth(op):
    """Each op on the input, then again on its result with the input as second operand (x+x,
    cat([x, x]), then a residual y op x): every kind on every run, whatever hypothesis draws."""
    spec = ([op, op], [(0, 0), (1, 0)], [1.7, -0.6], True, 0)
    assert check(spec, linear=op in LINEAR_OPS and op != "nested", points=4) is not None


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(linear_only=True, max_ops=5))
def test_linear_graphs_are_bounded_above_their_exact_norm(spec):
    check(spec, linear=True)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(linear_only=False, max_ops=5))
def test_piecewise_linear_graphs_are_bounded_above_attained_jacobians(spec):
    check(spec, linear=False)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(linear_only=False, max_ops=10))
def test_larger_sweep_of_random_graphs(spec):
    check(spec, linear=False, points=8)


def test_a_residual_graph_is_bounded_not_refused_and_never_below_truth():
    # today's code refused every non-Sequential model ("wrap the layers in nn.Sequential")
    spec = (
        ["conv", "add", "relu", "cat_mix", "nested"],
        [(0, 0), (0, 1), (2, 0), (3, 1), (4, 0)],
        [1.0] * 5,
        True,
        3,
    )
    assert check(spec, linear=False, points=8) is not None


@pytest.mark.parametrize("group", [2, 4])
def test_groupsort_in_a_traced_residual_block_is_a_leaf_of_constant_one(group):
    """lipgan's GroupSort (MaxMin for 2) inside a custom forward: an fx leaf bounded by 1."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(C, 4, 3, padding=1)
            self.sort = GroupSort(group)
            self.mix = nn.Conv2d(4, C, 1)

        def forward(self, x):
            return x + self.mix(self.sort(self.conv(x)))

    torch.manual_seed(group)
    model = nn.Sequential(Block(), nn.Flatten(), nn.Linear(C * H * H, 3)).double().eval()
    rep = L.estimate(model, input_shape=(C, H, H), restarts=2, steps=2, lipsdp_iters=40)
    (row,) = [r for r in rep.layers if r["type"] == "GroupSort"]
    assert row["name"] == "0.sort" and row["constant"] == pytest.approx(1.0, rel=1e-9)
    g = torch.Generator().manual_seed(1)
    truth = max(jac_norm(model, torch.randn(C, H, H, generator=g, dtype=torch.float64))
                for _ in range(8))  # fmt: skip
    for name, up in rep.upper.items():
        assert up >= truth * (1 - 1e-7), (name, up, truth)


def test_groupsort_along_the_batch_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), GroupSort(2, dim=0), nn.Linear(4, 2))
    with pytest.raises(LipganError, match=r"'1' \(GroupSort\).*batch"):
        L.upper_bounds(model, (4,))


@pytest.mark.parametrize(
    "forward,why",
    [
        (lambda y: y + torch.sort(y, dim=1).indices.double(), "indices"),
        (lambda y: torch.sort(y, dim=0).values, "batch"),
    ],
    ids=["indices", "batch"],
)
def test_sorts_that_are_not_lipschitz_per_sample_are_refused(forward, why):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return forward(self.a(x))

    with pytest.raises(LipganError, match=rf"'sort = sort\(\.\.\.\).*{why}"):
        L.upper_bounds(Model(), (4,))


class PairSort(nn.Module):
    """MaxMin written as other libraries write it: a group-size check on the shape (control flow
    plain fx cannot trace), then max and min of each pair along a feature dimension."""

    def forward(self, x):
        if x.shape[1] % 2:
            raise ValueError("an even number of channels, please")
        g = x.view(x.shape[0], x.shape[1] // 2, 2, *x.shape[2:])
        lo, hi = torch.min(g, 2, keepdim=True)[0], g.max(dim=2, keepdim=True).values
        return torch.cat([lo, hi], 2).view(x.shape) + 0.5 * g.amax(dim=(1, 2)).unsqueeze(1)


def test_shape_control_flow_is_traced_at_the_input_shape_and_bounded_soundly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), PairSort(), nn.Flatten(),
                          nn.Linear(4 * H * H, 3)).double().eval()  # fmt: skip
    rep = L.estimate(model, input_shape=(C, H, H), restarts=2, steps=2, lipsdp_iters=40)
    g = torch.Generator().manual_seed(1)
    truth = max(jac_norm(model, torch.randn(C, H, H, generator=g, dtype=torch.float64))
                for _ in range(8))  # fmt: skip
    for name, up in rep.upper.items():
        assert up >= truth * (1 - 1e-7), (name, up, truth)

    # control flow on values stays a refusal
    class ByValue(nn.Module):
        def forward(self, x):
            return x if float(x.sum()) > 0 else -x

    with pytest.raises(LipganError, match="cannot trace"):
        L.upper_bounds(nn.Sequential(nn.Linear(4, 4), ByValue()), (4,))
