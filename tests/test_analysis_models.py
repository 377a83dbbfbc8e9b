"""estimate() on models that are not chains: a residual CNN, a U-Net-like net with concatenation
skips, a ResNet-18-style network (written out here, small widths, eval-mode BatchNorm) and a
chain written as a custom forward. Each certified upper bound must be at least every attained
lower bound and at least the Jacobian norm of torch's own forward at random points."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipgan import lipschitz as L

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


class ResidualCNN(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.a1 = nn.Conv2d(c, c, 3, padding=1)
        self.a2 = nn.Conv2d(c, c, 3, padding=1)
        self.b1 = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + 0.5 * self.a2(F.relu(self.a1(x)))  # a scaled residual branch
        x = F.leaky_relu(x - self.b1(x), 0.1)
        x = F.avg_pool2d(x, 2)
        return self.head(torch.flatten(x, 1))


class UNetLike(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.Tanh())
        self.up = nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1)
        self.fuse = nn.Conv2d(2 * c, 1, 3, padding=1)

    def forward(self, x):
        d1 = self.down1(x)
        d2 = self.down2(d1)
        m = self.mid(d2)
        u = self.up(torch.cat([m, d2], dim=1)[:, : m.shape[1]])  # concat skip, then sliced
        return self.fuse(torch.cat([u, d1], dim=1))  # the U-Net skip: concatenation


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        idt = x if self.down is None else self.down(x)
        return F.relu(out + idt)


class ResNet18Style(nn.Module):
    """ResNet-18's layout (He et al. 2016): stem, 4 stages of 2 basic blocks, pooling, fc."""

    def __init__(self, w=4, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.pool = nn.MaxPool2d(2)
        widths = [w, 2 * w, 4 * w, 8 * w]
        layers, cin = [], w
        for i, c in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, c, stride), BasicBlock(c, c, 1)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


class CustomChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, padding=1)
        self.l1 = nn.Linear(4 * 6 * 6, 16)
        self.l2 = nn.Linear(16, 2)

    def forward(self, x):
        y = torch.sigmoid(self.c(x))
        y = y.view(y.size(0), -1)
        return self.l2(F.gelu(self.l1(y)) * 2.0)


def random_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def max_jacobian(model, shape, n=4):
    m = model.double().eval()
    g = torch.Generator().manual_seed(1)
    best = 0.0
    for _ in range(n):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(lambda z: m(z.unsqueeze(0)).reshape(-1), x)
        best = max(best, float(torch.linalg.matrix_norm(J.reshape(J.shape[0], -1), ord=2)))
    return best


@pytest.mark.parametrize(
    "make, shape",
    [
        (ResidualCNN, (1, 8, 8)),
        (UNetLike, (1, 8, 8)),
        (lambda: random_bn(ResNet18Style()), (3, 8, 8)),
        (CustomChain, (2, 6, 6)),
    ],
    ids=["residual_cnn", "unet_like", "resnet18_style", "custom_forward_chain"],
)
def test_estimate_bounds_non_chain_models(make, shape):
    torch.manual_seed(0)
    model = make()
    # LipSDP certifies at any step count: 40 steps (not 300) keep it in play at a tenth the cost
    rep = L.estimate(model, input_shape=shape, restarts=2, steps=4, lipsdp_iters=40)
    assert rep.best_lower > 0
    assert rep.best_upper >= rep.best_lower * (1 - 1e-9)
    truth = max_jacobian(make_copy(model), shape)
    for name, up in rep.upper.items():
        assert up >= truth * (1 - 1e-9), (name, up, truth)
    assert rep.layers and all(r["name"] for r in rep.layers)
    assert model.training  # the caller's model is untouched (analysed as an eval copy)


def make_copy(model):
    import copy

    return copy.deepcopy(model)


def test_custom_chain_is_bounded_as_one_chain_with_merged_segments():
    torch.manual_seed(0)
    rep = L.estimate(CustomChain(), input_shape=(2, 6, 6), restarts=2, steps=2)
    names = [r["name"] for r in rep.layers]
    assert names[:2] == ["c", "sigmoid"] and "l2" in names  # rows name the graph nodes
    assert rep.upper["merged_segments"] < rep.upper["operator_product"]
    assert "lipsdp_partition" in rep.upper  # LipSDP on the 16-wide GELU layer of the path
