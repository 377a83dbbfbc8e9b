"""Generator and critic architectures: shapes, one score per sample, the papers' layouts."""

import pytest
import torch
from torch import nn

from lipgan import models
from lipgan.models.sagan import SelfAttention

NAMES = ["dcgan28", "mlp", "sagan28"]


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_shapes(name):
    assert name in models.names("generator") and name in models.names("critic")
    g = models.build("generator", name, width=8)
    d = models.build("critic", name, width=8)
    z = torch.randn(5, g.z_dim)
    x = g(z)
    assert x.shape == (5, 1, 28, 28)
    assert x.min() >= -1 and x.max() <= 1  # tanh output, the data's [-1, 1] range
    assert d(x).shape == (5,)


@pytest.mark.parametrize("name", NAMES)
def test_critic_scores_each_sample_alone(name):
    """Changing sample j must not move the score of sample i (no batch mean, no batch stats)."""
    torch.manual_seed(0)
    d = models.build("critic", name, width=8).train()
    with torch.no_grad():
        for p in d.parameters():  # sagan's gamma starts at 0; make the attention matter
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(6, 1, 28, 28)
    s1 = d(x)
    y = x.clone()
    y[3] += 5.0
    s2 = d(y)
    keep = [i for i in range(6) if i != 3]
    torch.testing.assert_close(s1[keep], s2[keep])
    assert not torch.allclose(s1[3], s2[3])
    torch.testing.assert_close(d(x[2:3]), s1[2:3])


def test_dcgan28_is_the_wgan_gp_layout():
    """Gulrajani et al. gan_mnist.py: 5x5 stride-2 convs 1->D->2D->4D, LeakyReLU 0.2,
    linear 4*4*4D -> 1, no normalization; generator z 128 -> 4*4*4D -> ... -> 28x28."""
    D = 16
    d = models.build("critic", "dcgan28", width=D)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, D), (D, 2 * D), (2 * D, 4 * D)]
    assert all(c.kernel_size == (5, 5) and c.stride == (2, 2) for c in convs)
    acts = [m for m in d.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 3 and all(a.negative_slope == 0.2 for a in acts)
    assert not any(
        isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.InstanceNorm2d)) for m in d.modules()
    )
    lin = [m for m in d.modules() if isinstance(m, nn.Linear)]
    assert [(lin_.in_features, lin_.out_features) for lin_ in lin] == [(4 * 4 * 4 * D, 1)]
    # Parameter count by the formula: convs (k*k*cin*cout + cout) + linear.
    expect = sum(25 * a * b + b for a, b in [(1, D), (D, 2 * D), (2 * D, 4 * D)]) + 64 * D + 1
    assert sum(p.numel() for p in d.parameters()) == expect

    g = models.build("generator", "dcgan28", width=D)
    assert g.z_dim == 128
    first = next(m for m in g.modules() if isinstance(m, nn.Linear))
    assert (first.in_features, first.out_features) == (128, 4 * 4 * 4 * D)
    sizes = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
        for m in g.modules()
        if isinstance(m, nn.ConvTranspose2d)
    ]
    g(torch.randn(2, 128))
    for h in hooks:
        h.remove()
    assert sizes == [(2 * D, 8, 8), (D, 14, 14), (1, 28, 28)]  # 8 is cropped to 7 after


def test_dcgan28_batch_norm_generator_normalizes_before_each_hidden_relu():
    """norm="batch" (DCGAN, Radford et al. 2016): a batch norm over the channels (features, for
    the linear layer) of the map each hidden ReLU acts on; the other layers as without it."""
    from lipgan.errors import LipganError

    D = 8
    torch.manual_seed(0)
    plain = models.build("generator", "dcgan28", width=D)
    torch.manual_seed(0)
    bn = models.build("generator", "dcgan28", width=D, norm="batch")
    layers = list(bn)
    for i, m in enumerate(layers):
        if isinstance(m, nn.ReLU):
            norm, prev = layers[i - 1], layers[i - 2]
            assert isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d))
            width = prev.out_features if isinstance(prev, nn.Linear) else prev.out_channels
            assert norm.num_features == width
    assert sum(isinstance(m, nn.ReLU) for m in layers) == 3
    assert isinstance(layers[-1], nn.Tanh) and isinstance(layers[-2], nn.ConvTranspose2d)
    same = [m for m in bn if not isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert [type(m) for m in same] == [type(m) for m in plain]  # the same layers, same init
    for a, b in zip(plain.parameters(), (p for m in same for p in m.parameters())):
        assert torch.equal(a, b)
    bn.eval()
    assert bn(torch.randn(3, 128)).shape == (3, 1, 28, 28)
    with pytest.raises(LipganError, match="norm"):
        models.build("generator", "dcgan28", width=D, norm="layer")


def test_mlp_is_four_layers_of_512():
    d = models.build("critic", "mlp")
    g = models.build("generator", "mlp")
    dl = [(m.in_features, m.out_features) for m in d.modules() if isinstance(m, nn.Linear)]
    gl = [(m.in_features, m.out_features) for m in g.modules() if isinstance(m, nn.Linear)]
    assert dl == [(784, 512), (512, 512), (512, 512), (512, 1)]
    assert gl == [(128, 512), (512, 512), (512, 512), (512, 784)]


def test_self_attention_matches_formula_and_sits_at_14x14():
    torch.manual_seed(1)
    att = SelfAttention(16)
    with torch.no_grad():
        att.gamma.fill_(0.7)
    x = torch.randn(2, 16, 5, 5)

    # Independent computation with einsum over positions n, m.
    def conv1x1(layer):
        w = layer.weight[:, :, 0, 0]
        return torch.einsum("oc,bchw->bohw", w, x) + layer.bias.view(1, -1, 1, 1)

    q, k, v = conv1x1(att.query), conv1x1(att.key), conv1x1(att.value)
    q, k, v = (t.flatten(2) for t in (q, k, v))
    a = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k), dim=-1)
    out = torch.einsum("bcm,bnm->bcn", v, a).view_as(x)
    torch.testing.assert_close(att(x), x + 0.7 * out)
    # Starts as the identity (gamma = 0), as in SAGAN.
    torch.testing.assert_close(SelfAttention(16)(x), x)

    for kind in ("critic", "generator"):
        net = models.build(kind, "sagan28", width=8)
        seen = []

        def hook(m, i, o, seen=seen):
            seen.append(tuple(i[0].shape[-2:]))

        for m in net.modules():
            if isinstance(m, SelfAttention):
                m.register_forward_hook(hook)
        net(torch.randn(2, 1, 28, 28) if kind == "critic" else torch.randn(2, net.z_dim))
        assert seen == [(14, 14)]


@pytest.mark.parametrize("name", NAMES)
def test_double_backward_through_critic(name):
    """A gradient penalty differentiates the input gradient: every critic must support it."""
    d = models.build("critic", name, width=8)
    x = torch.randn(3, 1, 28, 28, requires_grad=True)
    (g,) = torch.autograd.grad(d(x).sum(), x, create_graph=True)
    g.flatten(1).norm(dim=1).sum().backward()
    # every weight matrix shapes the input gradient (biases of the last layer cannot)
    assert all(p.grad is not None for p in d.parameters() if p.dim() > 1)
