"""The WGAN trainer: presets, losses, steps, run folders, resume, NaN handling, CLI."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lipgan import constraints as C
from lipgan import gan, runs
from lipgan.errors import LipganError
from lipgan.gan import PRESETS, GANTrainer, TrainConfig
from lipgan.train import presets

METHODS = ["wgan-clip", "wgan-gp", "wgan-lp", "sn", "snr", "frobenius", "l2", "sagan", "gan"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _write_idx(path: Path, arr: torch.Tensor) -> None:
    dims = arr.shape
    head = bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    path.write_bytes(head + arr.to(torch.uint8).numpy().tobytes())


@pytest.fixture(scope="module")
def tiny(mnist, tmp_path_factory):
    """A folder of 256 real MNIST digits in the IDX layout (loads in milliseconds)."""
    folder = tmp_path_factory.mktemp("tiny-mnist")
    x, y = mnist.train_images[:256, 0], mnist.train_labels[:256]
    for prefix in ("train", "t10k"):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", y)
    return str(folder)


def _cfg(tiny, tmp_path, **kw):
    base = dict(
        dataset=tiny, width=4, batch_size=8, steps=4, out=str(tmp_path / "run"), quiet=True,
        tensorboard=False, fid_every=-1, threads=1, log_every=1, lip_every=2, sample_every=2,
        checkpoint_every=2, burnin_n_critic=3, measure_budget=1.0,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- presets


def test_presets_cover_the_contract_and_cite_sources():
    assert sorted(PRESETS) == sorted(METHODS)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for preset in PRESETS.values():
        assert set(preset) <= names
        assert preset["constraint"] in C.available()
    gp = gan.resolve(TrainConfig(method="wgan-gp"))
    assert (gp.optimizer, gp.lr_d, gp.lr_g, gp.beta1, gp.beta2, gp.n_critic) == (
        "adam", 1e-4, 1e-4, 0.5, 0.9, 5,
    )  # fmt: skip
    assert C.get(gp.constraint).lam == 10  # the paper's lambda comes from the constraint
    clip = gan.resolve(TrainConfig(method="wgan-clip"))
    assert (clip.optimizer, clip.lr_d, clip.n_critic) == ("rmsprop", 5e-5, 5)
    assert (clip.burnin_steps, clip.burnin_n_critic, clip.burnin_every) == (25, 100, 500)
    sg = gan.resolve(TrainConfig(method="sagan"))
    assert (sg.loss, sg.lr_d, sg.lr_g, sg.constraint, sg.generator_constraint, sg.model) == (
        "hinge", 4e-4, 1e-4, "spectral-norm", "spectral-norm", "sagan28",
    )  # fmt: skip
    assert gan.resolve(TrainConfig(method="gan")).loss == "ns"
    # frobenius: Adam without momentum (with beta1 0.5 it never made digits: docs/wgan.md §4)
    fro = gan.resolve(TrainConfig(method="frobenius"))
    assert (fro.optimizer, fro.lr_d, fro.lr_g, fro.beta1, fro.beta2, fro.n_critic) == (
        "adam", 1e-4, 1e-4, 0.0, 0.9, 5,
    )  # fmt: skip
    # Every preset value is overridable; unset fields come from the preset.
    over = gan.resolve(TrainConfig(method="wgan-gp", lr_d=3e-4, n_critic=2, model="mlp"))
    assert (over.lr_d, over.lr_g, over.n_critic, over.width) == (3e-4, 1e-4, 2, 512)
    src = Path(presets.__file__).read_text()
    for cite in ("Arjovsky", "Gulrajani", "Petzka", "Miyato", "Yoshida", "Zhang", "Radford"):
        assert cite in src


def test_wasserstein_regularizer_presets_use_the_bound_form_and_user_options_win():
    for method, constraint in (("snr", "spectral-norm-reg"), ("frobenius", "frobenius-reg")):
        cfg = gan.resolve(TrainConfig(method=method))
        assert cfg.constraint == constraint
        assert cfg.constraint_options == {"form": "bound", "lam": 10.0}
        assert C.get(cfg.constraint, **cfg.constraint_options).form == "bound"
        assert gan.resolve(cfg) == cfg  # resolving twice changes nothing
        lam = gan.resolve(TrainConfig(method=method, constraint_options={"lam": 3.0}))
        assert lam.constraint_options == {"form": "bound", "lam": 3.0}
        # another form: the constraint's own defaults for the rest (the paper's lambda)
        mine = gan.resolve(TrainConfig(method=method, constraint_options={"form": "sum"}))
        assert mine.constraint_options == {"form": "sum"}
        assert C.get(mine.constraint, **mine.constraint_options).lam < 0.1
        # a config that names its constraint (as config.yaml of an older run does) keeps its own
        named = gan.resolve(TrainConfig(method=method, constraint=constraint))
        assert named.constraint_options == {}
        other = gan.resolve(TrainConfig(method=method, constraint="gradient-penalty"))
        assert other.constraint_options == {}


def test_sagan_preset_leaves_the_generator_output_layer_unnormalized_unless_named():
    cfg = gan.resolve(TrainConfig(method="sagan"))
    assert cfg.generator_constraint == "spectral-norm"
    assert cfg.generator_constraint_options == {"last_layer": False}
    assert gan.resolve(cfg) == cfg
    operator = {"mode": "operator"}
    mine = gan.resolve(TrainConfig(method="sagan", generator_constraint_options=operator))
    assert mine.generator_constraint_options == {"last_layer": False, "mode": "operator"}
    # an older sagan run's config.yaml names the generator constraint: it keeps every layer
    named = gan.resolve(TrainConfig(method="sagan", generator_constraint="spectral-norm"))
    assert named.generator_constraint_options == {}
    assert gan.resolve(TrainConfig(method="wgan-gp")).generator_constraint_options == {}
    with pytest.raises(LipganError, match="generator_constraint_options must be a mapping"):
        gan.resolve(TrainConfig(method="sagan", generator_constraint_options=["x"]))


def test_auto_precision_is_resolved_to_what_runs_and_recorded(tiny, tmp_path):
    cfg = gan.resolve(TrainConfig(method="sn", device="cpu"))
    native = gan.native_bf16(torch.device("cpu"))
    assert cfg.precision == ("bf16" if native else "fp32")
    assert cfg.channels_last is native  # channels-last follows bf16 on a CPU
    assert gan.resolve(TrainConfig(precision="fp32", device="cpu")).channels_last is False
    kept = gan.resolve(TrainConfig(precision="bf16", channels_last=False, device="cpu"))
    assert (kept.precision, kept.channels_last) == ("bf16", False)
    path = gan.train(_cfg(tiny, tmp_path, steps=2))
    written = yaml.safe_load((path / "config.yaml").read_text())
    assert written["precision"] in ("fp32", "bf16") and isinstance(written["channels_last"], bool)


def test_a_cpu_limit_ends_the_run_at_its_cpu_seconds_and_refuses_a_resume(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path, steps=10**6, max_cpu_s=1.5, sample_every=10**6, lip_every=0)
    path = gan.train(cfg)
    st = json.loads((path / "status.json").read_text())
    assert st["state"] == "done" and 0 < st["step"] < 10**6 and st["cpu_s"] >= 1.5
    assert (path / "samples" / "last.png").is_file()
    with pytest.raises(LipganError, match="max_cpu_s"):
        gan.resolve(TrainConfig(max_cpu_s=-1))
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with pytest.raises(gan.TimeLimitReached, match="larger --max-cpu-s"):
        gan.train(cfg.replace(steps=10**7), resume=True)
    assert before == {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_a_time_limit_ends_the_run_like_its_last_step(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path, steps=10**6, max_time_s=1.5, sample_every=10**6, lip_every=0)
    path = gan.train(cfg)
    st = json.loads((path / "status.json").read_text())
    assert st["state"] == "done" and 0 < st["step"] < 10**6
    assert st["wall_s"] >= 1.5
    assert (path / "samples" / "last.png").is_file()  # the end-of-run work ran
    state = runs.load_checkpoint(path / "checkpoints" / "last.pt")
    assert state["step"] == st["step"]  # checkpointed at the end
    for bad in (-1, "10m", None, float("inf")):
        with pytest.raises(LipganError, match="max_time_s"):
            gan.resolve(TrainConfig(max_time_s=bad))
    # Resuming a run that used its time: a clear error, the folder untouched.
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with pytest.raises(gan.TimeLimitReached, match="larger --max-time-s"):
        gan.train(cfg.replace(steps=10**7), resume=True)
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before


def test_bad_config_values_are_lipgan_errors():
    for kw in ({"method": "wgan-xx"}, {"loss": "l1"}, {"precision": "fp16"}, {"steps": 0},
               {"on_nan": "ignore"}):  # fmt: skip
        with pytest.raises(LipganError):
            gan.resolve(TrainConfig(**kw))
    with pytest.raises(LipganError, match="unknown config keys"):
        TrainConfig.from_dict({"lr": 1})


def test_wgan_clip_schedule():
    t = GANTrainer(TrainConfig(method="wgan-clip", width=4, threads=1))
    got = [t.n_critic_at(s) for s in (0, 24, 25, 26, 499, 500, 501, 1000)]
    assert got == [100, 100, 5, 5, 5, 100, 5, 100]


# --------------------------------------------------------------------------- losses and steps


def test_losses_against_formulas():
    r, f = torch.tensor([0.5, -2.0, 3.0]), torch.tensor([1.0, -0.5, 0.2])
    L = gan.LOSSES
    assert torch.isclose(L["wasserstein"].critic(r, f), f.mean() - r.mean())
    assert torch.isclose(L["wasserstein"].generator(f), -f.mean())
    hinge = sum(max(0, 1 - v) for v in r.tolist()) / 3 + sum(max(0, 1 + v) for v in f.tolist()) / 3
    assert torch.isclose(L["hinge"].critic(r, f), torch.tensor(hinge))
    sig = torch.sigmoid
    ns = -(torch.log(sig(r)).mean() + torch.log(1 - sig(f)).mean())
    assert torch.isclose(L["ns"].critic(r, f), ns)
    assert torch.isclose(L["ns"].generator(f), -torch.log(sig(f)).mean())


class LinearCritic(nn.Module):
    """D(x) = <w, x>: its gradient is w everywhere, so every gradient norm is ||w||."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(784, 1, bias=False)

    def forward(self, x):
        return self.lin(x.flatten(1)).squeeze(1)


def test_critic_step_wasserstein_and_graph_hygiene(tiny):
    torch.manual_seed(0)
    cfg = TrainConfig(
        method="wgan-gp", width=4, batch_size=8, threads=1, dataset=tiny, precision="fp32"
    )
    t = GANTrainer(cfg, torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8))
    real = t.batches.sample(8)[0]
    fake = t.make_fakes(t.sample_z(8))
    assert not fake.requires_grad and fake.grad_fn is None  # no generator graph
    with torch.no_grad():
        w_before = t.critic(real).mean() - t.critic(fake).mean()
    g_before = [p.detach().clone() for p in t.generator.parameters()]
    out = t.critic_step(real, fake)
    torch.testing.assert_close(out["wasserstein"], w_before)
    # loss_d = -W + penalty for the Wasserstein loss.
    torch.testing.assert_close(out["loss_d"], -w_before + out["penalty"])
    assert all(p.grad is None for p in t.generator.parameters())
    assert all(torch.equal(a, b) for a, b in zip(g_before, t.generator.parameters()))
    # Generator step: the critic's weights neither change nor collect gradients.
    d_before = [p.detach().clone() for p in t.critic.parameters()]
    t.opt_d.zero_grad(set_to_none=True)
    t.generator_step(t.sample_z(8))
    assert all(p.grad is None for p in t.critic.parameters())
    assert all(torch.equal(a, b) for a, b in zip(d_before, t.critic.parameters()))
    assert any(p.grad is not None for p in t.generator.parameters())
    assert all(p.requires_grad for p in t.critic.parameters())


def test_gradient_norms_against_a_linear_critic():
    cfg = TrainConfig(method="wgan-gp", width=4, threads=1)
    t = GANTrainer(cfg, critic=LinearCritic())
    real = torch.rand(5, 1, 28, 28) * 2 - 1
    norms = t.gradient_norms(real)
    want = t.critic.lin.weight.norm()
    for k in ("real", "fake", "interp"):
        assert norms[k].shape == (5,)
        torch.testing.assert_close(norms[k], want.expand(5))
    # The penalty's own norms (reused for logging) agree: lam * mean((||w|| - 1)^2).
    pen = t.constraint.penalty(t.critic, real, t.make_fakes(t.sample_z(5)))
    torch.testing.assert_close(pen, 10 * (want - 1) ** 2)
    torch.testing.assert_close(t.constraint.last_grad_norm, want.expand(5))


def test_compile_applies_exactly_where_the_constraint_takes_no_input_gradients():
    # needs_input_grad is the constraint's own statement, not a guess from "penalty is
    # overridden" (which left the snr and frobenius critics uncompiled).
    for name, needs in (
        ("gradient-penalty", True), ("lipschitz-penalty", True), ("spectral-norm", False),
        ("none", False), ("spectral-norm-reg", False), ("frobenius-reg", False), ("l2", False),
        ("weight-clip", False), ("spectral-norm,gradient-penalty", True),
    ):  # fmt: skip
        assert C.get(name).needs_input_grad is needs, name
    for method, compiled in (("frobenius", True), ("snr", True), ("wgan-gp", False)):
        t = GANTrainer(TrainConfig(method=method, width=4, z_dim=8, compile=True, device="cpu"))
        assert (t.d_forward is not t.critic) is compiled, method
        assert t.penalty_critic is t.critic  # the penalty never runs through a compiled critic


# --------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("method", METHODS)
def test_smoke_every_method(tiny, tmp_path, method):
    path = gan.train(_cfg(tiny, tmp_path, method=method, steps=3))
    run = runs.Run(path)
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for k in ("wasserstein", "loss_d", "loss_g", "penalty"):
            assert r[k] is not None and abs(r[k]) < 1e6
    assert rows[1]["gnorm_real_mean"] is not None and rows[1]["gnorm_interp_max"] is not None
    assert (run.samples_dir / "last.png").is_file() and (
        run.samples_dir / "step_000002.png"
    ).is_file()
    assert (path / "generator.safetensors").is_file() and (path / "critic.safetensors").is_file()
    cfg = run.read_config()
    assert set(cfg) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert None not in (cfg["lr_d"], cfg["loss"], cfg["constraint"], cfg["width"])
    assert run.read_status()["state"] == "done"
    g = runs.load_network(path, "generator")
    assert g(torch.randn(2, g.z_dim)).shape == (2, 1, 28, 28)
    ck = torch.load(run.last_checkpoint, weights_only=True)
    assert ck["step"] == 3
    if method != "sagan":  # attention has no finite product bound; lipschitz refuses it
        assert rows[-1]["product_bound"] is not None and rows[-1]["product_bound"] > 0
        assert run.layer_norms_path.read_text().startswith("step,layer,operator_norm")


def test_bf16_and_tensorboard(tiny, tmp_path):
    path = gan.train(_cfg(tiny, tmp_path, precision="bf16", tensorboard=True, steps=2))
    rows = runs.Run(path).read_metrics()
    assert all(abs(r["wasserstein"]) < 1e6 for r in rows)
    assert any(f.name.startswith("events.") for f in (path / "tb").iterdir())


def test_new_run_refuses_existing_folder(tiny, tmp_path):
    gan.train(_cfg(tiny, tmp_path, steps=1))
    with pytest.raises(LipganError, match="already holds a run"):
        gan.train(_cfg(tiny, tmp_path, steps=1))


def _whole_and_resumed(tiny, tmp_path, **kw):
    """6 steps in one go (folder a) and 3 + a resume to 6 (folder b); both last.pt states."""
    a = gan.train(_cfg(tiny, tmp_path, out=str(tmp_path / "a"), steps=6, **kw))
    b = str(tmp_path / "b")
    gan.train(_cfg(tiny, tmp_path, out=b, steps=3, **kw))
    gan.train(_cfg(tiny, tmp_path, out=b, steps=6, **kw), resume=True)
    sa = torch.load(Path(a) / "checkpoints/last.pt", weights_only=True)
    sb = torch.load(Path(b) / "checkpoints/last.pt", weights_only=True)
    return a, b, sa, sb


@pytest.mark.parametrize("method", ["wgan-gp", "sn", "snr"])
def test_resume_is_bit_identical(tiny, tmp_path, method):
    # two critic steps (not the presets' 5) are enough to carry the data stream across the cut;
    # gradient norms at step 4 are the first measurement after the resume
    kw = dict(method=method, lip_every=2, checkpoint_every=3, n_critic=2)
    a, b, sa, sb = _whole_and_resumed(tiny, tmp_path, **kw)
    for net in ("generator", "critic"):
        for k, v in sa[net].items():
            assert torch.equal(v, sb[net][k]), (net, k)
    assert [r["step"] for r in runs.Run(b).read_metrics()] == list(range(1, 7))


def test_measurements_do_not_change_training(tiny, tmp_path):
    a = gan.train(_cfg(tiny, tmp_path, out=str(tmp_path / "a"), method="sn", lip_every=1))
    b = gan.train(_cfg(tiny, tmp_path, out=str(tmp_path / "b"), method="sn", lip_every=0,
                       sample_every=0))  # fmt: skip
    sa = torch.load(Path(a) / "checkpoints/last.pt", weights_only=True)["critic"]
    sb = torch.load(Path(b) / "checkpoints/last.pt", weights_only=True)["critic"]
    assert all(torch.equal(v, sb[k]) for k, v in sa.items())


@C.register("test-nan-at")
class NaNAt(C.Constraint):
    """A gradient penalty that returns NaN at the given critic-step calls."""

    needs_input_grad = True

    def __init__(self, bad):
        super().__init__()
        self.inner = C.get("gradient-penalty")
        self.bad, self.calls = sorted(bad), 0

    def penalty(self, critic, real, fake=None, **kw):
        self.calls += 1
        p = self.inner.penalty(critic, real, fake, **kw)
        return p * float("nan") if self.calls in self.bad else p


def test_nan_stops_with_step_and_checkpoint(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path, steps=6, n_critic=1)
    with pytest.raises(LipganError) as err:
        gan.train(cfg, constraint=NaNAt({4}))
    msg = str(err.value)
    assert "generator step 4" in msg and "last.pt" in msg and "(step 2)" in msg
    status = runs.Run(cfg.out).read_status()
    assert status["state"] == "failed" and "step 4" in status["reason"]


def test_nan_rollback_lowers_lr_and_finishes(tiny, tmp_path):
    cfg = _cfg(tiny, tmp_path, steps=6, n_critic=1, on_nan="rollback")
    path = gan.train(cfg, constraint=NaNAt({4}))
    run = runs.Run(path)
    assert run.read_status()["state"] == "done"
    ck = torch.load(run.last_checkpoint, weights_only=True)
    assert ck["lr_scale"] == 0.5
    assert ck["opt_d"]["param_groups"][0]["lr"] == pytest.approx(0.5 * 1e-4)
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4, 5, 6]


def test_bad_checkpoints_leave_the_run_untouched(tiny, tmp_path):
    from test_runs import _Evil, _snapshot

    cfg = _cfg(tiny, tmp_path, out=str(tmp_path / "r"), steps=2)
    path = gan.train(cfg)
    other = gan.train(_cfg(tiny, tmp_path, out=str(tmp_path / "o"), steps=1, model="mlp",
                           width=8))  # fmt: skip
    last = path / "checkpoints/last.pt"
    good = last.read_bytes()
    target = tmp_path / "pwned"
    cases = {
        "truncated": good[: len(good) // 3],
        "other model": (other / "checkpoints/last.pt").read_bytes(),
    }
    torch.save({"format": runs.CHECKPOINT_FORMAT, "x": _Evil(str(target))}, tmp_path / "evil.pt")
    cases["malicious"] = (tmp_path / "evil.pt").read_bytes()
    expect = {"truncated": "truncated|checksum mismatch",
              "other model": "checksum mismatch|another model",
              "malicious": "checksum mismatch|refused"}
    for name, data in cases.items():
        last.write_bytes(data)
        before = _snapshot(path)
        with pytest.raises(LipganError, match=expect[name]):
            gan.train(cfg.replace(steps=4), resume=True)
        assert _snapshot(path) == before, name
        assert not target.exists()


# --------------------------------------------------------------------------- CLI


def test_cli_train_config_precedence_and_sample(tiny, tmp_path, capsys):
    from lipgan.cli import main

    yml = tmp_path / "c.yaml"
    yml.write_text(yaml.safe_dump({"method": "wgan-lp", "lr_d": 3e-4, "steps": 2, "width": 4}))
    out = tmp_path / "run"
    argv = ["train", "--config", str(yml), "--lr-d", "2e-4", "--dataset", tiny, "--out", str(out),
            "--batch-size", "8", "--quiet", "--no-tensorboard", "--fid-every", "-1",
            "--threads", "1", "--constraint-option", "lam=5",
            "--generator-constraint", "spectral-norm",
            "--generator-constraint-option", "last_layer=false"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["method"], cfg["lr_d"], cfg["lr_g"], cfg["steps"]) == ("wgan-lp", 2e-4, 1e-4, 2)
    assert cfg["constraint_options"] == {"lam": 5}
    assert cfg["generator_constraint_options"] == {"last_layer": False}
    # Resume with more steps through the CLI.
    assert main(["train", "--resume", str(out), "--steps", "3"]) == 0
    assert runs.Run(out).read_status()["step"] == 3
    grid = tmp_path / "g.png"
    assert main(["sample", str(out), "--n", "6", "--out", str(grid), "--nrow", "3"]) == 0
    from lipgan.image import read_png

    assert read_png(grid).shape == (2 * 30 + 2, 3 * 30 + 2)
    assert main(["sample", str(out), "--n", "8", "--out", str(grid), "--interpolate"]) == 0
    assert read_png(grid).shape[1] == 3 * 30 + 2  # rows of round(sqrt(8)) = 3 steps
    # the EMA generator by default, and it says so; --raw samples the last iterate
    capsys.readouterr()
    raw = tmp_path / "raw.png"
    assert main(["sample", str(out), "--n", "6", "--out", str(grid)]) == 0
    assert "EMA generator" in capsys.readouterr().err
    assert main(["sample", str(out), "--n", "6", "--out", str(raw), "--raw"]) == 0
    assert "EMA" not in capsys.readouterr().err
    assert main(["sample", str(out / "generator_ema.safetensors"), "--n", "6", "--out",
                 str(tmp_path / "e.png")]) == 0  # fmt: skip
    assert (tmp_path / "e.png").read_bytes() == grid.read_bytes() != raw.read_bytes()
    assert main(["train", "--method", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_help_explains_the_sign(capsys):
    from lipgan.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "E[D(real)] - E[D(fake)]" in text and "-W" in text and "--lr-d" in text


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_short_real_mnist_run(tmp_path, method, artifacts_dir):
    cfg = TrainConfig(method=method, width=16, steps=40, batch_size=32, out=str(tmp_path / "r"),
                      quiet=True, tensorboard=False, fid_every=-1, log_every=5, lip_every=20,
                      sample_every=20, burnin_n_critic=10, threads=1)  # fmt: skip
    path = gan.train(cfg)
    rows = runs.Run(path).read_metrics()
    assert len(rows) == 8
    for r in rows:
        for k, v in r.items():
            assert v is None or v == v and abs(v) != float("inf"), (k, v)
    grid = path / "samples" / "last.png"
    assert grid.is_file()
    import shutil

    shutil.copy(grid, Path(artifacts_dir) / f"smoke-{method}.png")


def _train_cmd(out, steps):
    return [sys.executable, "-m", "lipgan", "train", "--method", "wgan-gp", "--width", "8",
            "--batch-size", "16", "--steps", str(steps), "--out", str(out), "--quiet",
            "--no-tensorboard", "--fid-every", "-1", "--checkpoint-every", "3", "--log-every",
            "2", "--lip-every", "5", "--threads", "1",
            "--measure-budget", "1"]  # fmt: skip (the rows must not depend on timing)


@pytest.mark.slow
def test_sigkill_resume_is_bit_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 24
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(ref, steps), check=True, env=env, capture_output=True)
    want = torch.load(ref / "checkpoints/last.pt", weights_only=True)
    t_full = runs.Run(ref).read_status()["wall_s"] + 2.5  # start-up included roughly
    rng = random.Random(1234)
    for trial in range(3):
        out = tmp_path / f"k{trial}"
        proc = subprocess.Popen(_train_cmd(out, steps), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(1.0, t_full))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Killed before the folder existed: start again; otherwise resume it.
        again = ["--resume", str(out)] if (out / "config.yaml").is_file() else []
        done = subprocess.run(_train_cmd(out, steps) + again, env=env, capture_output=True,
                              text=True)  # fmt: skip
        assert done.returncode == 0, (trial, done.stderr[-2000:])
        got = torch.load(out / "checkpoints/last.pt", weights_only=True)
        assert got["step"] == steps
        # the generator's moving average too, in the checkpoint and in its export
        for k, v in want["ema"]["module"].items():
            assert torch.equal(v, got["ema"]["module"][k]), (trial, "ema", k)
        assert got["ema"]["updates"] == want["ema"]["updates"]
        ema_file = "generator_ema.safetensors"
        assert (out / ema_file).read_bytes() == (ref / ema_file).read_bytes(), trial
        for net in ("generator", "critic", "opt_d", "opt_g"):
            if net.startswith("opt"):
                for pid, st in want[net]["state"].items():
                    for k, v in st.items():
                        assert torch.equal(v, got[net]["state"][pid][k]), (trial, net, k)
                continue
            for k, v in want[net].items():
                assert torch.equal(v, got[net][k]), (trial, net, k)
        # metrics.csv: the interrupted segment's rows past the checkpoint were dropped
        want_steps = [r["step"] for r in runs.Run(ref).read_metrics()]
        assert [r["step"] for r in runs.Run(out).read_metrics()] == want_steps


def test_fid_logged_when_the_extractor_exists(tmp_path):
    from lipgan import metrics

    if not metrics.available("mnist"):
        pytest.skip("no shipped MNIST extractor")
    cfg = TrainConfig(width=4, batch_size=8, steps=1, out=str(tmp_path / "r"), quiet=True,
                      tensorboard=False, threads=1, fid_n=256, lip_every=0,
                      layer_every=0, measure_budget=1.0)  # fmt: skip
    rows = runs.Run(gan.train(cfg)).read_metrics()
    assert rows[-1]["fid"] is not None and rows[-1]["fid"] > 0


# --------------------------------------------------------------------------- issue 19


def test_a_tight_measurement_budget_postpones_measurements_without_changing_training(
    tiny, tmp_path
):
    kw = dict(method="sn", steps=6, lip_every=1, layer_every=3, sample_every=1)
    a = gan.train(_cfg(tiny, tmp_path, out=str(tmp_path / "a"), **kw))  # budget 1: all of it
    b = gan.train(_cfg(tiny, tmp_path, out=str(tmp_path / "b"), measure_budget=1e-6, **kw))
    ra, rb = runs.Run(a).read_metrics(), runs.Run(b).read_metrics()
    assert all(r["gnorm_real_max"] is not None for r in ra)
    assert all(r["gnorm_real_max"] is None for r in rb)  # every one postponed, then skipped
    assert all(r["cpu_s"] is not None and r["cpu_s"] > 0 for r in ra + rb)
    sa = torch.load(a / "checkpoints/last.pt", weights_only=True)
    sb = torch.load(b / "checkpoints/last.pt", weights_only=True)
    for net in ("generator", "critic"):
        assert all(torch.equal(v, sb[net][k]) for k, v in sa[net].items())
    m = json.loads((b / "status.json").read_text())["measurement"]
    assert m["budget"] == 1e-6 and m["postponed"]["gradient_norms"] == 6
    assert m["skipped"] == {"gradient_norms": 1, "layers": 1}
    assert m["count"]["checkpoint"] >= 2 and m["count"]["samples"] == 1  # the final grid
    assert 0 < m["measure_s"] < m["wall_s"] and 0 < m["train_s"] < m["wall_s"]
    # the three figures are stored rounded (seconds to 1e-3, the share to 1e-4): on a run of
    # under a second the ratio of the rounded seconds moves by up to 5e-4 (1 + share) / wall_s
    slack = 5e-4 * (1 + m["measure_share"]) / m["wall_s"] + 5e-5 + 1e-9
    assert m["measure_share"] == pytest.approx(m["measure_s"] / m["wall_s"], abs=slack)
    full = json.loads((a / "status.json").read_text())["measurement"]
    assert full["count"]["gradient_norms"] == 6 and not full["skipped"]


def test_cpu_seconds_and_budget_clocks_continue_across_resume(tiny, tmp_path):
    out = str(tmp_path / "r")
    gan.train(_cfg(tiny, tmp_path, out=out, steps=3))
    first = runs.load_checkpoint(Path(out) / "checkpoints/last.pt")["timing"]
    gan.train(_cfg(tiny, tmp_path, out=out, steps=6), resume=True)
    rows = runs.Run(out).read_metrics()
    cpu = [r["cpu_s"] for r in rows]
    assert cpu == sorted(cpu) and cpu[3] >= first["cpu_s"]
    second = runs.load_checkpoint(Path(out) / "checkpoints/last.pt")["timing"]
    assert second["steps"] == 6 and second["train_s"] > first["train_s"]


def test_fid_at_wall_time_marks_from_the_ema_generator(tmp_path):
    from lipgan import metrics

    if not metrics.available("mnist"):
        pytest.skip("no shipped MNIST extractor")
    cfg = TrainConfig(width=4, batch_size=8, steps=3, out=str(tmp_path / "r"), quiet=True,
                      tensorboard=False, threads=1, fid_n=256, lip_every=0, layer_every=0,
                      fid_every=0, fid_at_s=[1e-3, 1e-2, 1e6], measure_budget=1.0)  # fmt: skip
    rows = runs.Run(gan.train(cfg)).read_metrics()
    marked = [r for r in rows if r["fid"] is not None]
    # both early marks passed before the first step's end: one FID serves them, labelled 0.01;
    # then the end-of-run FID (fid_every 0), no mark
    assert [(r["step"], r["fid_mark_s"]) for r in marked] == [(1, 1e-2), (3, None)]
    off = runs.Run(gan.train(cfg.replace(out=str(tmp_path / "off"), fid_every=-1)))
    assert all(r["fid"] is None for r in off.read_metrics())  # -1: no FID, marks neither
    assert marked[0]["time_s"] >= 1e-2 and marked[0]["cpu_s"] > 0
    import argparse

    from lipgan.train.config import add_flags, from_args

    parser = argparse.ArgumentParser()
    add_flags(parser, TrainConfig)
    got = from_args(parser.parse_args(["--fid-at-s", "120,60"]), TrainConfig).fid_at_s
    assert got == [60.0, 120.0] and TrainConfig(fid_at_s=[120, "6e1"]).fid_at_s == got
    assert from_args(parser.parse_args(["--fid-at-s", ""]), TrainConfig).fid_at_s == []
    with pytest.raises(LipganError, match="fid_at_s"):
        TrainConfig(fid_at_s=[-5])


def test_lazy_penalty_every_k_critic_steps_with_weight_k(tiny):
    from lipgan import data

    images = data.load(tiny).train_images
    t1 = GANTrainer(TrainConfig(dataset=tiny, width=4, batch_size=8, threads=1), images)
    t2 = GANTrainer(TrainConfig(dataset=tiny, width=4, batch_size=8, threads=1,
                                penalty_every=2), images)  # fmt: skip
    real, fake = t1.batches.sample(8)[0], t1.make_fakes(t1.sample_z(8))
    p1 = t1.critic_step(real, fake)["penalty"]
    p2 = t2.critic_step(real, fake)["penalty"]  # critic step 0: penalized, weight 2
    assert p1 > 0 and torch.allclose(p2, 2 * p1)
    assert t2.critic_step(real, fake)["penalty"] == 0  # step 1: no penalty
    assert t2.critic_step(real, fake)["penalty"] > 0  # step 2
    with pytest.raises(LipganError, match="penalty_every"):
        TrainConfig(penalty_every=0)


def test_every_wgan_method_has_a_fast_recipe_that_keeps_its_mechanism():
    """The fast recipes change the training around the critic, never how it is kept
    Lipschitz: the same constraint with the same options as the paper preset."""
    from lipgan.train import presets

    for method in ("wgan-clip", "wgan-gp", "wgan-lp", "sn", "snr", "frobenius"):
        paper = gan.resolve(TrainConfig(method=method))
        fast = gan.resolve(TrainConfig(method=method, recipe="fast"))
        assert (fast.constraint, fast.generator_constraint) == (
            paper.constraint, paper.generator_constraint), method  # fmt: skip
        if method == "frobenius":  # the same penalty's weight on the same norms, two-sided,
            # from a feasible start (docs/recipes.md, trials U1-U3, R1)
            assert fast.constraint_options == {**paper.constraint_options, "form": "unit",
                                               "rescale": True}  # fmt: skip
            assert paper.constraint_options["form"] == "bound"
        else:
            assert fast.constraint_options == paper.constraint_options or method == "wgan-clip"
        assert fast.recipe == "fast" and fast.generator_norm == "batch", method
        assert not set(presets.FAST[method]) & {"constraint", "generator_constraint", "model"}


def test_fast_recipe_is_named_recorded_and_resumes_bit_exactly(tiny, tmp_path):
    fast = gan.resolve(TrainConfig(method="sn", recipe="fast"))
    assert (fast.loss, fast.n_critic, fast.lr_d, fast.lr_g, fast.beta1, fast.beta2) == (
        "hinge", 1, 8e-4, 4e-4, 0.0, 0.9)  # fmt: skip
    assert fast.generator_norm == "batch" and fast.constraint == "spectral-norm"
    assert (fast.batch_size, fast.ema_rampup, fast.ema) == (32, 0.02, 10_000.0)
    paper = gan.resolve(TrainConfig(method="sn"))
    assert (paper.recipe, paper.loss, paper.n_critic, paper.generator_norm) == (
        "paper", "wasserstein", 5, "none")  # fmt: skip
    assert (paper.batch_size, paper.ema_rampup) == (64, 0.05)
    # the user's value wins over the recipe's, also where the field has a fallback
    mine = gan.resolve(TrainConfig(method="sn", recipe="fast", lr_d=1e-3, batch_size=64,
                                   ema_rampup=0.0))  # fmt: skip
    assert (mine.lr_d, mine.batch_size, mine.ema_rampup) == (1e-3, 64, 0.0)
    with pytest.raises(LipganError, match="no fast recipe"):
        gan.resolve(TrainConfig(method="gan", recipe="fast"))
    with pytest.raises(LipganError, match="no norm option"):
        gan.resolve(TrainConfig(method="sagan", generator_norm="batch"))
    kw = dict(method="sn", recipe="fast", ema_rampup=0.2, checkpoint_every=3)
    a, b, sa, sb = _whole_and_resumed(tiny, tmp_path, **kw)
    for key in ("generator", "critic"):
        assert all(torch.equal(v, sb[key][k]) for k, v in sa[key].items()), key
    assert all(torch.equal(v, sb["ema"]["module"][k]) for k, v in sa["ema"]["module"].items())
    assert any("running_mean" in k for k in sa["generator"])  # the batch-norm generator
    assert sa["ema"]["rampup"] == 0.2
    written = yaml.safe_load((Path(a) / "config.yaml").read_text())
    assert (written["recipe"], written["generator_norm"], written["penalty_every"]) == (
        "fast", "batch", 1)  # fmt: skip
    g = runs.load_network(a, "generator")  # the export rebuilds the batch-norm generator
    assert any(isinstance(m, nn.BatchNorm2d) for m in g.modules())
    with pytest.raises(LipganError, match="recipe"):
        gan.train(_cfg(tiny, tmp_path, out=b, steps=7, method="sn"), resume=True)


def test_finished_run_prints_a_summary_with_eval_and_report(tmp_path, capsys):
    from lipgan import metrics
    from lipgan.cli import main

    if not metrics.available("mnist"):
        pytest.skip("no shipped MNIST extractor")
    out = tmp_path / "r"
    argv = ["train", "--width", "4", "--batch-size", "8", "--steps", "2", "--out", str(out),
            "--no-tensorboard", "--fid-every", "-1", "--threads", "1", "--layer-every", "0",
            "--lip-every", "1", "--measure-budget", "1", "--summary-eval-n", "256",
            "--summary-report"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "FID" in err and "(n 256, ema generator)" in err and "classes covered" in err
    assert "max ||grad_x D||" in err and "points after training" in err and "W estimate" in err
    assert f"samples: {out / 'samples' / 'last.png'}" in err
    assert f"report:  {out / 'report.html'}" in err and (out / "report.html").is_file()
    assert "measurement took" in err
    assert json.loads((out / "eval.json").read_text())["generator"] == "ema"
    m = runs.Run(out).read_status()["measurement"]
    assert m["eval_after_training_s"] > 0
    # resuming the finished run prints the summary again, training nothing
    argv = ["train", "--resume", str(out), "--summary-eval-n", "0", "--no-summary-report"]
    assert main(argv) == 0
    again = capsys.readouterr().err
    assert "summary of" in again and "FID" in again


def test_resuming_a_missing_folder_creates_nothing(tiny, tmp_path):
    with pytest.raises(LipganError, match="no such run folder"):
        gan.train(_cfg(tiny, tmp_path, out=str(tmp_path / "nope")), resume=True)
    assert not (tmp_path / "nope").exists()


def test_an_old_folder_without_cpu_s_resumes_with_its_rows_and_reports(tmp_path):
    import shutil

    from lipgan import report

    run = tmp_path / "sn"
    shutil.copytree(Path(__file__).parent / "data" / "v0.1.0" / "sn", run)
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "cpu_s" not in header  # written by lipgan 0.1.0
    assert report.load_run(run).metrics  # reads as it is
    cfg = {**runs.Run(run).read_config(), "steps": 4, "quiet": True, "out": str(run)}
    gan.train(TrainConfig.from_dict(cfg), resume=True)
    rows = runs.Run(run).read_metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the old rows kept
    assert [r["cpu_s"] is None for r in rows] == [True, True, False, False]
    assert report.load_run(run).metrics["cpu_s"] is not None
