"""lipgan.train.ema.GeneratorEMA: averaging, warm-up, buffers, wrappers, bit-exact resume."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lipgan import constraints as C
from lipgan.errors import LipganError
from lipgan.train.ema import GeneratorEMA, unwrap


def _tiny(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 4)]
    if bn:
        layers.append(nn.BatchNorm1d(4))
    layers += [nn.ReLU(), nn.Linear(4, 2)]
    return nn.Sequential(*layers)


def _perturb(model: nn.Module, gen: torch.Generator) -> None:
    """A stand-in for an optimizer step: move every parameter by random noise."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def test_beta_follows_the_half_life_in_images_after_the_ramp():
    ema = GeneratorEMA(_tiny(), half_life_images=6400, rampup=0.05)
    # after the ramp (0.05 * t * 64 >= 6400, t >= 2000) the half-life is 6400 images = 100 steps
    assert ema.beta(5000, 64) == pytest.approx(0.5 ** (64 / 6400))
    assert ema.beta(5000, 64) ** 100 == pytest.approx(0.5)
    # the same half-life in images whatever the batch: 0.5 after 6400 images
    assert ema.beta(5000, 128) ** 50 == pytest.approx(0.5)


def test_warm_up_starts_near_a_copy_and_grows_monotonically():
    ema = GeneratorEMA(_tiny(), half_life_images=10_000, rampup=0.05)
    betas = [ema.beta(t, 64) for t in range(1, 4000, 50)]
    assert betas[0] < 1e-5  # the first update almost copies the generator
    assert all(a <= b for a, b in zip(betas, betas[1:]))
    assert betas[-1] == pytest.approx(0.5 ** (64 / 10_000))
    flat = GeneratorEMA(_tiny(), half_life_images=10_000, rampup=None)
    assert flat.beta(1, 64) == flat.beta(4000, 64) == pytest.approx(0.5 ** (64 / 10_000))


def test_update_is_the_exponential_average_of_the_iterates():
    model = _tiny()
    ema = GeneratorEMA(model, half_life_images=500, rampup=0.05)
    gen = torch.Generator().manual_seed(1)
    expect = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    for step in range(1, 30):
        _perturb(model, gen)
        beta = ema.update(model, step, batch_size=16)
        for k, v in model.named_parameters():
            expect[k] = beta * expect[k] + (1 - beta) * v.detach().double()
    for k, v in ema.module.named_parameters():
        torch.testing.assert_close(v.double(), expect[k], rtol=1e-5, atol=1e-6)
        assert not torch.equal(v, dict(model.named_parameters())[k])  # an average, not a copy


def test_half_life_halves_the_old_weights_share():
    model = _tiny()
    ema = GeneratorEMA(model, half_life_images=320, rampup=None)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.zero_()
        for p in model.parameters():
            p.fill_(1.0)
    for step in range(1, 11):  # 10 steps of 32 images = 320 images = one half-life
        ema.update(model, step, batch_size=32)
    for p in ema.module.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.5))


def test_copy_is_eval_mode_without_grad_and_leaves_the_model_alone():
    model = _tiny(bn=True).train()
    ema = GeneratorEMA(model)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update(model, 1, 8)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_batch_norm_stats_averaged_by_default_copied_on_request():
    model = _tiny(bn=True).train()
    avg = GeneratorEMA(model, half_life_images=100, rampup=None)
    cp = GeneratorEMA(model, half_life_images=100, rampup=None, buffers="copy")
    old_mean = model[1].running_mean.clone()
    model(torch.randn(32, 3) * 5 + 3)  # moves the running stats and the counter
    beta = avg.update(model, 1, 10)
    cp.update(model, 1, 10)
    bn, bn_avg, bn_cp = model[1], avg.module[1], cp.module[1]
    torch.testing.assert_close(bn_avg.running_mean, torch.lerp(old_mean, bn.running_mean, 1 - beta))
    assert not torch.equal(bn_avg.running_mean, bn.running_mean)
    assert torch.equal(bn_cp.running_mean, bn.running_mean)
    assert torch.equal(bn_cp.running_var, bn.running_var)
    # the integer counter is copied in both modes
    assert int(bn_avg.num_batches_tracked) == int(bn.num_batches_tracked) == 1
    assert int(bn_cp.num_batches_tracked) == 1


def test_spectral_norm_vectors_are_copied_not_averaged():
    model = C.get("spectral-norm").attach(_tiny())
    ema = GeneratorEMA(model, half_life_images=100, rampup=None)
    gen = torch.Generator().manual_seed(2)
    _perturb(model, gen)
    model(torch.randn(5, 3))  # training-mode forward: one power-iteration step moves u, v
    ema.update(model, 1, 10)
    src = dict(model.named_buffers())
    names = [k for k in src if k.endswith("_u") or k.endswith("_v")]
    assert names
    for k, b in ema.module.named_buffers():
        if k in names:
            assert torch.equal(b, src[k])
    # the averaged copy still samples (eval mode, no power iteration)
    with torch.no_grad():
        assert torch.isfinite(ema.module(torch.randn(4, 3))).all()


def _run(model: nn.Module, ema: GeneratorEMA, steps: range, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for step in steps:
        _perturb(model, gen)
        model(torch.randn(8, 3, generator=gen))  # batch-norm statistics move too
        ema.update(model, step, batch_size=8)


def test_state_dict_round_trip_is_bit_exact():
    model = _tiny(bn=True).train()
    ema = GeneratorEMA(model, half_life_images=200)
    _run(model, ema, range(1, 8), seed=3)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    fresh = GeneratorEMA(_tiny(bn=True), half_life_images=200)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    a, b = ema.module.state_dict(), fresh.module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert fresh.updates == ema.updates == 7


def test_resumed_sequence_equals_the_uninterrupted_one_bit_for_bit():
    whole_model = _tiny(bn=True).train()
    gen = torch.Generator().manual_seed(4)
    # one stream of iterates, replayed for both runs
    states = []
    for _ in range(20):
        _perturb(whole_model, gen)
        whole_model(torch.randn(8, 3, generator=gen))
        states.append({k: v.clone() for k, v in whole_model.state_dict().items()})
    replay = _tiny(bn=True).train()
    first = GeneratorEMA(replay, half_life_images=300)
    for step in range(1, 11):
        replay.load_state_dict(states[step - 1])
        first.update(replay, step, 8)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    del first
    resumed = GeneratorEMA(_tiny(bn=True), half_life_images=300)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for step in range(11, 21):
        replay.load_state_dict(states[step - 1])
        resumed.update(replay, step, 8)
    check = _tiny(bn=True).train()
    uninterrupted = GeneratorEMA(check, half_life_images=300)
    for step in range(1, 21):
        check.load_state_dict(states[step - 1])
        uninterrupted.update(check, step, 8)
    a, b = uninterrupted.module.state_dict(), resumed.module.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_compiled_and_data_parallel_models_are_unwrapped():
    model = _tiny()
    compiled = torch.compile(model)  # no forward: nothing is compiled, only wrapped
    assert unwrap(compiled) is model
    dp = nn.DataParallel(model)
    assert unwrap(dp) is model
    ema = GeneratorEMA(compiled, half_life_images=100)
    assert not any(k.startswith("_orig_mod") for k in ema.module.state_dict())
    _perturb(model, torch.Generator().manual_seed(5))
    ema.update(dp, 1, 1000)  # beta ~ 0 at the first step with the ramp: almost a copy
    for k, v in ema.module.named_parameters():
        torch.testing.assert_close(v, dict(model.named_parameters())[k], rtol=1e-4, atol=1e-5)


def test_bad_settings_and_mismatches_are_lipgan_errors():
    with pytest.raises(LipganError, match="half_life"):
        GeneratorEMA(_tiny(), half_life_images=0)
    with pytest.raises(LipganError, match="rampup"):
        GeneratorEMA(_tiny(), rampup=-1)
    with pytest.raises(LipganError, match="buffers"):
        GeneratorEMA(_tiny(), buffers="mean")
    ema = GeneratorEMA(_tiny())
    with pytest.raises(LipganError, match="different parameters"):
        ema.update(nn.Linear(3, 2), 1, 8)
    with pytest.raises(LipganError, match=">= 1"):
        ema.update(_tiny(), 0, 8)
    other = GeneratorEMA(_tiny(), half_life_images=123)
    with pytest.raises(LipganError, match="half_life_images"):
        other.load_state_dict(ema.state_dict())
