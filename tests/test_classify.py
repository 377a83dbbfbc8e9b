"""Classifier training, the measurements of the generalization study, certified robustness.

Quick setups (a few hundred MNIST images, small widths, one thread) so each test takes seconds.
Every check compares with an independent computation (SVD by torch.linalg, dense matrices of the
convolutions, exact distances to the decision boundary of a linear model).
"""

import json
import math

import pytest
import torch
from torch import nn

from lipgan.classify import (
    ClassifyConfig,
    attack_l2,
    certify,
    evaluate,
    load_classifier,
    plain_copy,
    run,
    train,
)
from lipgan.errors import LipganError

QUICK = dict(train_subset=500, epochs=3, batch_size=64, width=32, threads=1)
EVAL_QUICK = dict(eval_n=100, pgd_steps=10, noise_draws=2, hessian_iters=5, hessian_n=200)


def _op_product(model: nn.Sequential) -> float:
    """Product of the exact spectral norms of the Linear layers (torch SVD, float64)."""
    out = 1.0
    for m in model:
        if isinstance(m, nn.Linear):
            out *= float(torch.linalg.svdvals(m.weight.detach().double())[0])
    return out


def _dense_conv_norm(conv: nn.Conv2d, shape: tuple) -> float:
    """Largest singular value of the conv's dense matrix, built column by column: the square
    root of the top eigenvalue of its smaller Gram matrix (8x faster than an SVD of the
    1568 x 3136 matrix of the CNN's second conv, equal to 1e-13)."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    w = conv.weight.detach().double()
    with torch.no_grad():
        cols = nn.functional.conv2d(basis, w, None, conv.stride, conv.padding).reshape(n, -1)
    gram = cols.T @ cols if cols.shape[1] <= n else cols @ cols.T
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())


def test_snr_larger_lambda_smaller_operator_product(mnist):
    small = train(ClassifyConfig(reg="snr", lam=1e-3, seed=0, **QUICK), log=None)
    large = train(ClassifyConfig(reg="snr", lam=1.0, seed=0, **QUICK), log=None)
    p_small, p_large = _op_product(small.plain), _op_product(large.plain)
    assert p_large < 0.8 * p_small, (p_small, p_large)


def test_sn_operator_mlp_product_at_most_head(mnist):
    tr = train(ClassifyConfig(reg="sn", sn_mode="operator", seed=1, **QUICK), log=None)
    body = [m for m in tr.plain if isinstance(m, nn.Linear)][:-1]
    head = tr.plain[-1]
    for layer in body:
        assert float(torch.linalg.svdvals(layer.weight.double())[0]) <= 1 + 1e-3
    head_norm = float(torch.linalg.svdvals(head.weight.double())[0])
    assert _op_product(tr.plain) <= head_norm * (1 + 1e-3)


def test_sn_operator_cnn_true_conv_norms(mnist):
    cfg = ClassifyConfig(reg="sn", sn_mode="operator", model="cnn", seed=2, **QUICK)
    cfg.epochs, cfg.train_subset = 1, 256
    tr = train(cfg, log=None)
    shape, norms = (1, 28, 28), []
    for m in tr.plain:
        if isinstance(m, nn.Conv2d):
            norms.append(_dense_conv_norm(m, shape))
        elif isinstance(m, nn.Linear):
            norms.append(float(torch.linalg.svdvals(m.weight.double())[0]))
        shape = tuple(m(torch.zeros(1, *shape)).shape[1:])
    # power iteration approaches sigma from below: allow its last-step shortfall
    assert max(norms[:-1]) <= 1 + 1e-2, norms
    assert math.prod(norms) <= norms[-1] * (1 + 1e-2) ** (len(norms) - 1)


def test_certified_never_exceeds_pgd_robust(mnist):
    cfg = ClassifyConfig(certify=0.5, seed=0, **QUICK)
    cfg.epochs = 4
    tr = train(cfg, log=None)
    res = evaluate(
        tr.plain,
        ClassifyConfig(certify=0.5, eps=[0.1, 0.3, 0.5, 1.0], **QUICK, **EVAL_QUICK),
        tr.train_x,
        tr.train_y,
        tr.test_x,
        tr.test_y,
    )
    per = res["robustness"]["per_eps"]
    assert per["0.1"]["certified_pairwise_acc"] > 0.3  # not vacuous
    for row in per.values():
        assert row["certified_acc"] <= row["pgd_acc"]
        assert row["certified_pairwise_acc"] <= row["pgd_acc"]
        assert row["certified_but_broken"] == 0 and row["certified_pairwise_but_broken"] == 0
    # the guaranteed bound brackets the sampled lower bound
    lip = res["lipschitz"]
    assert lip["lower"] <= lip["guaranteed"] * (1 + 1e-6)


def test_certify_matches_exact_linear_distances():
    """For f(x) = Wx + b the distance from x to the boundary with class j is exactly
    (z_y - z_j) / ||w_y - w_j||: the pairwise certificate must be exactly that test."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    x = torch.rand(200, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)
        y[:20] = (y[:20] + 1) % 10  # some wrong predictions: never certified
        z = model(x)
    w = model[1].weight.double()
    eps = 0.05
    dist = torch.full((200,), float("inf"), dtype=torch.float64)
    for j in range(10):
        d = (z.double().gather(1, y.view(-1, 1)).squeeze(1) - z[:, j].double()) / (
            (w[y] - w[j]).norm(dim=1).clamp_min(1e-30)
        )
        dist = torch.where(y == j, dist, torch.minimum(dist, d))
    expect = (z.argmax(1) == y) & (dist > eps)
    got = certify(
        model, x, y, eps, lipschitz=float(torch.linalg.svdvals(w.detach())[0]), body_lipschitz=1
    )
    assert torch.equal(got["pairwise"], expect)
    assert expect[20:].any() and not got["pairwise"][:20].any()
    # the global rule is weaker (sqrt2 * ||W|| >= ||w_i - w_j||), never certifies more
    assert not (got["global"] & ~got["pairwise"]).any()


def test_pgd_finds_exact_linear_adversary():
    """On a linear model L2 PGD must reach the boundary whenever it lies inside the ball."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        model[1].weight.mul_(20)
    x = 0.25 + 0.5 * torch.rand(100, 1, 28, 28)  # interior: the box does not bind
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.2
    adv = attack_l2(model, x, y, eps, steps=30)
    assert (adv - x).flatten(1).norm(dim=1).max() <= eps * (1 + 1e-5)
    cert = certify(model, x, y, eps, 1.0, body_lipschitz=1.0)["pairwise"]
    with torch.no_grad():
        robust = model(adv).argmax(1) == y
    # exact for a linear model: robust to PGD if and only if certified (up to ties at the edge)
    assert (robust == cert).float().mean() >= 0.97
    assert not (cert & ~robust).any()


def test_plain_copy_is_the_trained_function(mnist):
    tr = train(ClassifyConfig(reg="sn", sn_mode="reshaped", seed=3, **QUICK), log=None)
    tr.model.eval()
    x = tr.test_x[:64]
    with torch.no_grad():
        assert torch.allclose(tr.model(x), tr.plain(x), atol=1e-5)
    fresh = plain_copy(tr.model, "mlp", tr.kwargs)
    assert not any(p.requires_grad for p in fresh.parameters())


def test_run_folder_and_export(mnist, tmp_path):
    out = tmp_path / "run"
    cfg = ClassifyConfig(reg="l2", lam=1e-3, out=str(out), **QUICK, **EVAL_QUICK)
    cfg.epochs = 1
    res = run(cfg, log=None)
    saved = json.loads((out / "results.json").read_text())
    assert (out / "config.yaml").is_file()
    for key in ("accuracy", "lipschitz", "sensitivity", "robustness", "smoothness", "summary"):
        assert key in saved
    acc = saved["accuracy"]
    assert acc["gap_acc"] == pytest.approx(acc["train_acc"] - acc["test_acc"])
    model = load_classifier(out)
    x = torch.rand(8, 1, 28, 28)
    from safetensors import safe_open

    with safe_open(str(out / "classifier.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["lipgan_kind"] == "classifier" and meta["lipgan_model"] == "mlp"
    assert json.loads(meta["lipgan_kwargs"])["hidden"] == [32, 32]
    # the exported network reproduces the measured test accuracy
    from lipgan import data

    ds = data.load("mnist")
    with torch.no_grad():
        pred = model(ds.test_images.float() / 255).argmax(1)
    assert float((pred == ds.test_labels).float().mean()) == pytest.approx(
        res["accuracy"]["test_acc"]
    )
    assert model(x).shape == (8, 10)


@pytest.mark.parametrize(
    "bad",
    [
        dict(reg="dropout"),
        dict(reg="snr", lam=-1.0),
        dict(certify=-0.3),
        dict(certify=0.3, reg="l2"),
        dict(eps=[0.5, -1.0]),
        dict(epochs=0),
        dict(train_subset=-5),
        dict(sn_mode="fft"),
        dict(lr="fast"),
        dict(epochs=1.5),
        dict(model="resnet"),
    ],
)
def test_bad_options_raise_lipgan_error(bad, mnist):
    with pytest.raises(LipganError):
        cfg = ClassifyConfig(**{**QUICK, **bad})  # types and ranges are checked here
        if "model" in bad:
            train(cfg, log=None)
        else:
            cfg.resolved()


def test_train_subset_too_large(mnist):
    with pytest.raises(LipganError, match="exceeds"):
        train(ClassifyConfig(**{**QUICK, "train_subset": 10**6}), log=None)


def test_cli_smoke(mnist, tmp_path, capsys):
    from lipgan.cli import main

    out = tmp_path / "cli"
    argv = [
        "classify",
        "--reg",
        "snr",
        "--lam",
        "0.01",
        "--epochs",
        "1",
        "--train-subset",
        "300",
        "--width",
        "16",
        "--eval-n",
        "50",
        "--pgd-steps",
        "5",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "test acc" in text and "certified" in text
    assert (out / "results.json").is_file() and (out / "classifier.safetensors").is_file()
    again = ["classify", "--reevaluate", str(out), "--eval-n", "20", "--pgd-steps", "2"]
    assert main(again) == 0
    assert json.loads((out / "results.json").read_text())["eval_n"] == 20
    assert main(["classify", "--reevaluate", str(tmp_path)]) == 2
    assert main(["classify", "--reg", "nope"]) == 2
    assert "unknown regularizer" in capsys.readouterr().err
    assert main(["classify", "--certify", "0", "--epochs", "1"]) == 2


def test_out_holding_a_run_is_refused_unless_overwrite(mnist, tmp_path, capsys):
    """A second classify into the same --out must not replace the first run silently."""
    from lipgan.cli import main

    out = tmp_path / "d"
    base = ["classify", "--train-subset", "200", "--epochs", "1", "--no-eval", "--out", str(out)]
    assert main(base) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(base + ["--reg", "l2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a classify run" in err and str(out) in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    assert main(base + ["--reg", "l2", "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["reg"] == "l2"
    # a folder of something else is never a classify run to replace
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(LipganError, match="not a classify run"):
        run(ClassifyConfig(out=str(other), **QUICK), log=None, overwrite=True)
    assert (other / "notes.txt").read_text() == "precious"


def test_any_registry_method_trains_bjorck_orthonormal(mnist):
    """`--reg bjorck` (a constraint name, no classifier preset): every Linear of the trained
    network has singular values 1 (Björck orthonormalization), by torch's SVD."""
    cfg = ClassifyConfig(reg="bjorck", reg_options={"iters": 30}, **{**QUICK, "epochs": 1})
    tr = train(cfg, log=None)
    for m in tr.plain:
        if isinstance(m, nn.Linear):
            s = torch.linalg.svdvals(m.weight.double())
            assert float(s.max()) <= 1 + 1e-3 and float(s.min()) >= 1 - 2e-2, s
    with pytest.raises(LipganError, match="no strength"):
        ClassifyConfig(reg="bjorck", lam=0.1).resolved()
    with pytest.raises(LipganError, match="bad option"):
        ClassifyConfig(reg="bjorck", reg_options={"nope": 1}).resolved()


def test_reg_names_are_the_shared_vocabulary():
    from lipgan import constraints
    from lipgan.train.classifier_config import method_names

    names = method_names()
    assert {"none", "l2", "frobenius", "snr", "sn", "gp"} <= set(names)
    assert set(constraints.available()) <= set(names)


def test_a_registered_user_constraint_is_a_method(mnist):
    """A constraint registered by name trains through the protocol alone: its penalty is seen
    every step, finalize once, and the config records its name."""
    from lipgan import constraints

    calls = {"penalty": 0, "finalize": 0}

    class Shrink(constraints.Constraint):
        name = "test-shrink"

        def __init__(self, lam: float = 1.0) -> None:
            super().__init__()
            self.lam = lam

        def penalty(self, critic, real, fake=None, *, generator=None, shard=None):
            calls["penalty"] += 1
            return self.lam * sum(p.square().sum() for p in critic.parameters())

        def finalize(self, module) -> None:
            calls["finalize"] += 1

    constraints.register("test-shrink")(Shrink)
    cfg = ClassifyConfig(reg="test-shrink", reg_options={"lam": 1e-3}, **{**QUICK, "epochs": 1})
    tr = train(cfg, log=None)
    assert calls == {"penalty": 8, "finalize": 1}  # 500 images in batches of 64
    assert tr.history[0]["penalty"] > 0
