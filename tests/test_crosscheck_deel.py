"""lipgan's certified bounds on deel-torchlip's layers and on the cases of deel's layer tests.

deel-torchlip (a dev extra) builds Lipschitz layers as subclasses of torch's layers, with
parametrizations, scaling factors (``k_coef_lip``) and their own ``forward``. lipgan must bound
each soundly or refuse it by name: for every case, every certified upper bound of
``lipschitz.estimate`` is at least the truth, and lipgan's own attained lower bound is at most
its best upper bound. Truth, from torch's own computation in float64 (never lipgan's code):

- affine models: the largest singular value of the dense matrix built by applying the model's
  own forward to the identity basis (exact);
- other models (sorting activations, L2-norm pooling): the largest Jacobian norm at random
  points (a lower bound of the true constant, so still a valid check of an upper bound).

The cases replay deel's ``tests/test_layers.py`` and ``tests/test_compute_layer_sv.py`` (layer
types, parameters, input shapes and k values; its harness wraps a layer in deel's
``Sequential``) with a short training of the same kind (MSE to a random linear map of inputs
uniform in [-10, 10], Adam 1e-3), plus the layers the peer review found mis-bounded. Left out:
deel's ``SpectralConvTranspose2d(padding="same")``, which deel's test only instantiates (its
forward fails inside torch's conv_transpose2d).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lipgan import lipschitz
from lipgan.errors import LipganError

lip = pytest.importorskip("deel.torchlip")

REL = 1e-6  # rounding slack: float64 truth against float64 bounds


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# building the cases as deel's harness does


def k_lip_model(layer_type, params: dict, k: float) -> nn.Module:
    """deel's ``generate_k_lip_model``: a LipschitzModule gets ``k_coef_lip=k`` and is wrapped
    in deel's Sequential (whose own default k then reassigns the coefficient)."""
    params = dict(params)
    if issubclass(layer_type, lip.LipschitzModule):
        params["k_coef_lip"] = k
    return lip.Sequential(layer_type(**params))


def seq(*layers, k: float = 1.0) -> nn.Module:
    return lip.Sequential(*layers, k_coef_lip=k)


class ConvSortHead(nn.Module):
    """A custom forward (not a Sequential): conv, GroupSort2, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = lip.SpectralConv2d(1, 4, 3, padding=1)
        self.act = lip.GroupSort2()
        self.head = lip.SpectralLinear(4 * 5 * 5, 2)

    def forward(self, x):
        return self.head(torch.flatten(self.act(self.conv(x)), 1))


class Residual(nn.Module):
    """deel's LipResidual: sigmoid(a) x + (1 - sigmoid(a)) f(x), f a spectral linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.f = lip.SpectralLinear(6, 6)
        self.mix = lip.LipResidual()
        with torch.no_grad():
            self.mix.alpha.fill_(0.4)

    def forward(self, x):
        return self.mix(x, torch.relu(self.f(x)))


def _cases() -> list[tuple[str, object, tuple, bool]]:
    """(id, builder, input shape, affine)."""
    S, F_ = lip.SpectralConv2d, lip.FrobeniusConv2d
    out: list[tuple[str, object, tuple, bool]] = []

    def add(name, build, shape, affine=True):
        out.append((name, build, shape, affine))

    # test_spectral_linear, test_frobenius_linear, test_verifySV (linear)
    add(
        "SpectralLinear-4x3-nobias",
        lambda: k_lip_model(
            lip.SpectralLinear, {"in_features": 4, "out_features": 3, "bias": False}, 1.0
        ),
        (4,),
    )
    for k in (1.0, 5.0):
        add(
            f"SpectralLinear-4x4-k{k:g}",
            lambda k=k: k_lip_model(lip.SpectralLinear, {"in_features": 4, "out_features": 4}, k),
            (4,),
        )
        add(
            f"FrobeniusLinear-4x1-k{k:g}",
            lambda k=k: k_lip_model(lip.FrobeniusLinear, {"in_features": 4, "out_features": 1}, k),
            (4,),
        )
    add(
        "FrobeniusLinear-8x4-disjoint",
        lambda: k_lip_model(lip.FrobeniusLinear, {"in_features": 8, "out_features": 4}, 1.0),
        (8,),
    )
    # test_conv2d: Spectral/Frobenius conv and the transposed spectral conv, 1x5x5
    for t in (S, F_, lip.SpectralConvTranspose2d):
        add(
            f"{t.__name__}-1x2x3-nobias-k1",
            lambda t=t: k_lip_model(
                t, {"in_channels": 1, "out_channels": 2, "kernel_size": (3, 3), "bias": False}, 1.0
            ),
            (1, 5, 5),
        )
        add(
            f"{t.__name__}-1x2x3-k5",
            lambda t=t: k_lip_model(
                t, {"in_channels": 1, "out_channels": 2, "kernel_size": (3, 3)}, 5.0
            ),
            (1, 5, 5),
        )
    # test_verifySV (convs): more channels, stride 2
    add(
        "SpectralConv2d-3x2x3-nobias",
        lambda: k_lip_model(
            S, {"in_channels": 3, "out_channels": 2, "kernel_size": (3, 3), "bias": False}, 1.0
        ),
        (3, 5, 5),
    )
    for c in (5, 3):
        add(
            f"SpectralConv2d-1x{c}x3-stride2",
            lambda c=c: k_lip_model(
                S,
                {
                    "in_channels": 1,
                    "out_channels": c,
                    "kernel_size": (3, 3),
                    "bias": False,
                    "stride": 2,
                },
                1.0,
            ),
            (1, 10, 10),
        )
    add(
        "FrobeniusConv2d-3x2x3",
        lambda: k_lip_model(F_, {"in_channels": 3, "out_channels": 2, "kernel_size": (3, 3)}, 1.0),
        (3, 5, 5),
    )
    # test_spectralconv2d_pad / test_Conv2d_vanilla_export: every padding mode
    for mode in ("zeros", "reflect", "circular", "symmetric"):
        for pad, ks in ((1, 3), (2, 5)):
            for k in (1.0, 5.0):
                add(
                    f"SpectralConv2d-pad{pad}-{mode}-k{k:g}",
                    lambda mode=mode, pad=pad, ks=ks, k=k: k_lip_model(
                        S,
                        {
                            "in_channels": 1,
                            "out_channels": 2,
                            "kernel_size": (ks, ks),
                            "padding": pad,
                            "padding_mode": mode,
                        },
                        k,
                    ),
                    (1, 5, 5),
                )
        add(
            f"FrobeniusConv2d-pad1-{mode}",
            lambda mode=mode: k_lip_model(
                F_,
                {
                    "in_channels": 1,
                    "out_channels": 2,
                    "kernel_size": (3, 3),
                    "padding": 1,
                    "padding_mode": mode,
                },
                1.0,
            ),
            (1, 5, 5),
        )
    # test_SpectralConvTranspose2d_instantiation and a stride-2 transposed conv
    add(
        "SpectralConvTranspose2d-1x12x5-stride2",
        lambda: k_lip_model(
            lip.SpectralConvTranspose2d,
            {"in_channels": 1, "out_channels": 12, "kernel_size": 5, "stride": 2, "bias": False},
            1.0,
        ),
        (1, 5, 5),
    )
    add(
        "SpectralConvTranspose2d-8x3x4-s2p1",
        lambda: k_lip_model(
            lip.SpectralConvTranspose2d,
            {"in_channels": 8, "out_channels": 3, "kernel_size": 4, "stride": 2, "padding": 1},
            1.0,
        ),
        (8, 7, 7),
    )
    # pooling tests
    for k in (1.0, 5.0):
        add(
            f"ScaledAvgPool2d-3x3-k{k:g}",
            lambda k=k: k_lip_model(lip.ScaledAvgPool2d, {"kernel_size": (3, 3)}, k),
            (1, 6, 6),
        )
        add(
            f"ScaledAdaptiveAvgPool2d-k{k:g}",
            lambda k=k: seq(lip.ScaledAdaptiveAvgPool2d(output_size=(1, 1)), k=k),
            (1, 5, 5),
        )
        add(
            f"ScaledL2NormPool2d-2x3-k{k:g}",
            lambda k=k: seq(lip.ScaledL2NormPool2d(kernel_size=(2, 3)), k=k),
            (1, 5, 5),
            False,
        )
        add(
            f"ScaledAdaptativeL2NormPool2d-k{k:g}",
            lambda k=k: seq(lip.ScaledAdaptativeL2NormPool2d(), k=k),
            (1, 5, 5),
            False,
        )
    add(
        "ScaledAdaptiveAvgPool2d-70x70",
        lambda: seq(lip.ScaledAdaptiveAvgPool2d(output_size=(1, 1))),
        (1, 70, 70),
    )
    # test_invertibledownsampling / test_invertibleupsampling
    add(
        "InvertibleDownSampling-3",
        lambda: k_lip_model(lip.InvertibleDownSampling, {"kernel_size": 3}, 1.0),
        (3, 6, 6),
    )
    add(
        "InvertibleUpSampling-3",
        lambda: k_lip_model(lip.InvertibleUpSampling, {"kernel_size": 3}, 1.0),
        (18, 6, 6),
    )
    # test_multilayer and test_callbacks
    for k in (1.0, 5.0):
        add(
            f"multilayer-k{k:g}",
            lambda k=k: seq(
                S(1, 2, (3, 3), padding=1, bias=k == 1.0),
                nn.Flatten(),
                lip.SpectralLinear(50, 4),
                k=k,
            ),
            (1, 5, 5),
        )
    add(
        "callbacks-model",
        lambda: seq(
            S(1, 2, (3, 3), padding=1),
            lip.ScaledAvgPool2d(kernel_size=(2, 2)),
            nn.Flatten(),
            lip.SpectralLinear(8, 4),
        ),
        (1, 5, 5),
    )
    add(
        "multilayer-vanilla-export",
        lambda: seq(
            S(1, 2, (3, 3), padding=1), nn.Flatten(), lip.SpectralLinear(50, 4)
        ).vanilla_export(),
        (1, 5, 5),
    )
    # sorting activations (test_activations) and k_coef_lip on them
    add("GroupSort-2", lambda: nn.Sequential(lip.GroupSort(2)), (8,), False)
    add("GroupSort-4-on-maps", lambda: nn.Sequential(lip.GroupSort(4)), (8, 3, 3), False)
    add("GroupSort2", lambda: nn.Sequential(lip.GroupSort2()), (8,), False)
    add("FullSort", lambda: nn.Sequential(lip.FullSort()), (6,), False)
    add("MaxMin", lambda: nn.Sequential(lip.MaxMin()), (6,), False)
    add("GroupSort-2-k3", lambda: lip.GroupSort(2, k_coef_lip=3.0), (8,), False)
    # deel's Sequential reassigns the coefficient; torch's keeps it: a 3-Lipschitz GroupSort
    add(
        "GroupSort-2-k3-in-torch-Sequential",
        lambda: nn.Sequential(lip.GroupSort(2, k_coef_lip=3.0)),
        (8,),
        False,
    )
    add(
        "Sequential-k8-linear-sort-linear",
        lambda: seq(lip.SpectralLinear(4, 4), lip.GroupSort(2), lip.SpectralLinear(4, 2), k=8.0),
        (4,),
        False,
    )
    add(
        "spectral-mlp-groupsort2",
        lambda: seq(
            lip.SpectralLinear(6, 8),
            lip.GroupSort2(),
            lip.SpectralLinear(8, 8),
            lip.FullSort(),
            lip.SpectralLinear(8, 1),
        ),
        (6,),
        False,
    )
    # not a Sequential: a custom forward, a residual connection
    add("custom-forward-conv-sort-linear", ConvSortHead, (1, 5, 5), False)
    add("LipResidual", Residual, (6,), False)
    return out


CASES = _cases()


# --------------------------------------------------------------------------------------------
# truth from torch's own computation


def _float64_eval(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


def dense_norm(model: nn.Module, shape: tuple) -> float:
    """sigma_max of the affine model's linear part, from its forward on the identity basis."""
    m = _float64_eval(model)
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        dense = (m(basis) - m(torch.zeros(1, *shape, dtype=torch.float64))).reshape(n, -1)
    return float(torch.linalg.matrix_norm(dense, ord=2))


def jacobian_lower(model: nn.Module, shape: tuple, points: int = 24, seed: int = 0) -> float:
    """max over random inputs of ||J(x)||_2 (autograd, float64): at most the true constant."""
    m = _float64_eval(model)
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(points):
        x = torch.randn(1, *shape, generator=g, dtype=torch.float64) * 3
        jac = torch.autograd.functional.jacobian(lambda t: m(t).reshape(-1), x)
        best = max(best, float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2)))
    return best


def train_briefly(model: nn.Module, shape: tuple, steps: int = 5, seed: int = 0) -> None:
    """deel's harness, shortened: MSE to a random linear map of inputs uniform in [-10, 10]."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out_dim = model(torch.zeros(1, *shape)).numel()
    kernel = torch.rand(math.prod(shape), out_dim, generator=g)
    kernel = kernel / kernel.norm()
    opt = torch.optim.Adam(params, lr=1e-3)
    model.train()
    for _ in range(steps):
        x = torch.rand(32, *shape, generator=g) * 20 - 10
        y = (x.reshape(32, -1) @ kernel).reshape(32, -1)
        loss = (model(x).reshape(32, -1) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,build,shape,affine", CASES, ids=[c[0] for c in CASES])
def test_lipgan_bounds_deel_case_soundly(name, build, shape, affine):
    torch.manual_seed(0)
    model = build()
    train_briefly(model, shape)
    truth = dense_norm(model, shape) if affine else jacobian_lower(model, shape)
    try:
        report = lipschitz.estimate(model, input_shape=shape, restarts=4, steps=10)
    except LipganError as exc:
        print(f"{name}: refused: {exc}")
        return  # a refusal that names what cannot be bounded is sound
    print(
        f"{name}: truth {truth:.6g}, best upper {report.best_upper:.6g}, "
        f"best lower {report.best_lower:.6g}"
    )
    low = {k: v for k, v in report.upper.items() if v < truth * (1 - REL)}
    assert not low, f"{name}: certified bounds below the truth {truth:.6g}: {low}"
    assert report.best_lower <= report.best_upper * (1 + REL), (
        f"{name}: attained lower {report.best_lower:.6g} above certified {report.best_upper:.6g}"
    )


def test_the_case_list_covers_deels_layer_kinds():
    """Every Lipschitz layer class the brief names appears in some case."""
    wanted = {
        "SpectralLinear",
        "SpectralConv2d",
        "FrobeniusLinear",
        "FrobeniusConv2d",
        "SpectralConvTranspose2d",
        "ScaledAvgPool2d",
        "ScaledAdaptiveAvgPool2d",
        "ScaledL2NormPool2d",
        "InvertibleDownSampling",
        "InvertibleUpSampling",
        "GroupSort",
        "GroupSort2",
        "FullSort",
        "MaxMin",
    }
    seen = set()
    for _, build, _, _ in CASES:
        # parametrized layers are instances of a generated subclass: look along the MRO
        seen |= {c.__name__ for m in build().modules() for c in type(m).__mro__}
    assert wanted <= seen, wanted - seen
