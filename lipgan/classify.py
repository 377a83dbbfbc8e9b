"""Classifier training and the post-training measurements of the generalization study.

The study note's chain (seed DIGEST, points 2, 4 and 6): a regularizer makes the network's
Lipschitz constant C(w) smaller; a smaller C(w) makes the network less sensitive to perturbations
of its input; a less sensitive network generalizes better. :func:`train` fits a small classifier on
a subset of MNIST with one of the Lipschitz methods of :mod:`lipgan.constraints`;
:func:`evaluate` measures every link of the chain on the trained network; :func:`run` does both and
writes a run folder:

    RUN/config.yaml                 the resolved :class:`ClassifyConfig`
    RUN/results.json                every measurement (see :func:`evaluate`), training history
    RUN/classifier.safetensors      the trained network, plain weights, self-describing metadata

A certified mode (``certify=EPS``) trains with Lipschitz-margin training (Tsuzuku, Sato & Sugiyama
2018) in the pairwise form of GloRo nets (Leino, Wang & Fredrikson 2021): the body is made
1-Lipschitz with operator-norm spectral normalization, and the logit of every wrong class j is
raised by ``eps * ||w_y - w_j||`` during training (``L_body = 1`` after the normalization), so the
network learns margins that a guaranteed Lipschitz bound can certify.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lipgan.errors import LipganError

# Study names of the regularizers -> names in the lipgan.constraints registry.
REGULARIZERS = {
    "none": "none",
    "l2": "l2",
    "frobenius": "frobenius-reg",
    "snr": "spectral-norm-reg",
    "sn": "spectral-norm",
    "gp": "gradient-penalty",
}

# Strength used when ``lam`` is not given. Starting points only: the study sweeps them.
# l2: 5e-4 is the weight decay of the classic CIFAR/ImageNet recipes (He et al. 2016);
# frobenius: lam*||W||_F^2 has gradient 2*lam*W, so 2.5e-4 matches weight decay 5e-4;
# snr: Yoshida & Miyato (2017) report lam in 0.01..0.1 for lam/2 * sum sigma^2;
# gp: lipgan's WGAN-GP penalty at the training images (fake=None), lam*(||J^T r|| - 1)^2; WGAN-GP's
# 10 is for a critic's unbounded score, a classifier's cross-entropy is O(1): 0.1 (swept 0.01..10).
DEFAULT_LAM = {"none": 0.0, "l2": 5e-4, "frobenius": 2.5e-4, "snr": 0.01, "sn": 0.0, "gp": 0.1}

#: GloRo's deterministic L2 results on MNIST (Leino et al. 2021, Table 2): verified-robust accuracy
GLORO_MNIST = {0.3: 0.957, 1.58: 0.628}


@dataclass
class ClassifyConfig:
    """Every option of ``lipgan classify``; each CLI flag maps to one field.

    Pixels are scaled to ``[0, 1]`` so that the L2 radii ``eps`` match the certified-robustness
    literature on MNIST (GloRo's 0.3 and 1.58 are L2 radii on ``[0, 1]`` images).
    """

    model: str = "mlp"
    activation: str | None = None  # None: relu, or minmax in the certified mode
    width: int | None = None  # hidden width (mlp) or dense width (cnn); None: the model's own
    dataset: str = "mnist"
    data_dir: str | None = None
    train_subset: int = 5000  # 0 = the whole training split
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3  # Adam (Kingma & Ba 2015) default
    reg: str = "none"
    lam: float | None = None  # None: DEFAULT_LAM[reg]
    sn_mode: str = "operator"  # for reg="sn": "operator" (a true bound) or "reshaped" (SN-GAN)
    certify: float | None = None  # Lipschitz-margin training at this L2 radius
    certify_warmup: float = 0.2  # share of the steps over which the training eps ramps up
    seed: int = 0
    eval_n: int = 1000  # test images for the attacks, noise, certificates and sensitivity
    eps: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    pgd_steps: int = 20
    pgd_restarts: int = 1
    noise_draws: int = 4
    param_noise: float = 0.01  # relative weight noise w -> w + s*|w|*N(0,1)
    hessian_iters: int = 20  # Lanczos steps for each end of the Hessian's spectrum
    hessian_n: int = 1000
    lower_restarts: int = 1  # lipgan.lipschitz.lower_bounds restarts (float64, per point)
    lipsdp: bool = False  # add LipSDP-Neuron partitions to the upper bounds (seconds per layer)
    lipsdp_time: float = 3.0
    threads: int | None = None
    out: str | None = None
    evaluate: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> ClassifyConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LipganError(f"unknown classify option(s): {', '.join(unknown)}")
        return cls(**d)

    def resolved(self) -> ClassifyConfig:
        """A copy with defaults filled in and every field checked; raises :class:`LipganError`."""
        c = copy.deepcopy(self)
        if c.reg not in REGULARIZERS:
            raise LipganError(
                f"unknown regularizer {c.reg!r}; use one of {', '.join(REGULARIZERS)}"
            )
        if c.certify is not None:
            if not (c.certify > 0 and math.isfinite(c.certify)):
                raise LipganError(f"--certify needs a positive radius, got {c.certify}")
            if c.reg not in ("none", "sn"):
                raise LipganError(
                    "--certify trains an operator-norm SN network; leave --reg at sn (or none)"
                )
            c.reg, c.sn_mode = "sn", "operator"
        if c.activation is None:
            c.activation = "minmax" if c.certify is not None else "relu"
        if c.lam is None:
            c.lam = DEFAULT_LAM[c.reg]
        if not (c.lam >= 0 and math.isfinite(c.lam)):
            raise LipganError(f"--lam must be a finite number >= 0, got {c.lam}")
        if c.sn_mode not in ("operator", "reshaped"):
            raise LipganError(f"--sn-mode must be operator or reshaped, got {c.sn_mode!r}")
        for name in ("epochs", "batch_size", "eval_n", "pgd_steps", "pgd_restarts"):
            if getattr(c, name) < 1:
                raise LipganError(f"{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}")
        if c.train_subset < 0:
            raise LipganError(f"--train-subset must be >= 0 (0 = all), got {c.train_subset}")
        if not (c.lr > 0):
            raise LipganError(f"--lr must be positive, got {c.lr}")
        if not c.eps or any(not (e > 0 and math.isfinite(e)) for e in c.eps):
            raise LipganError(f"--eps needs positive radii, got {c.eps}")
        c.eps = [float(e) for e in c.eps]
        if c.width is not None and c.width < 2:
            raise LipganError(f"--width must be >= 2, got {c.width}")
        return c


#: fields that change the trained network (the rest only change the measurements)
_TRAINING_FIELDS = {
    "model",
    "activation",
    "width",
    "dataset",
    "data_dir",
    "train_subset",
    "epochs",
    "batch_size",
    "lr",
    "reg",
    "lam",
    "sn_mode",
    "certify",
    "certify_warmup",
    "seed",
}

# --------------------------------------------------------------------------- building blocks


def build_model(cfg: ClassifyConfig) -> tuple[nn.Sequential, dict]:
    """The classifier named by ``cfg.model`` and the keyword options that rebuild it."""
    from lipgan.models import build

    kwargs: dict = {"activation": cfg.activation}
    if cfg.width is not None:
        kwargs["hidden" if cfg.model == "mlp" else "dense"] = (
            [cfg.width, cfg.width] if cfg.model == "mlp" else cfg.width
        )
    model = build("classifier", cfg.model, **kwargs)
    if not isinstance(model, nn.Sequential) or not isinstance(model[-1], nn.Linear):
        raise LipganError(
            f"classifier {cfg.model!r} must be an nn.Sequential ending in an nn.Linear head"
        )
    return model, kwargs


def make_constraint(cfg: ClassifyConfig):
    """The :mod:`lipgan.constraints` method for ``cfg.reg`` at strength ``cfg.lam``.

    ``gp`` is the library's gradient penalty called with ``fake=None``: it penalizes
    ``lam * (||J(x)^T r|| - 1)^2`` at the training images, ``r`` one random unit direction in
    logit space per sample (WGAN-GP's target norm 1, probed along a random output direction).
    """
    from lipgan import constraints

    name = REGULARIZERS[cfg.reg]
    if cfg.reg == "sn":
        return constraints.get(name, mode=cfg.sn_mode)
    if name == "none" or cfg.lam == 0:
        return constraints.get("none")
    if cfg.reg == "l2":
        return constraints.get(name, weight_decay=cfg.lam)
    return constraints.get(name, lam=cfg.lam)


def _pairwise_head_constants(head: nn.Linear, y: torch.Tensor) -> torch.Tensor:
    """``K[b, j] = ||w_{y_b} - w_j||_2``: Lipschitz constant of the margin z_y - z_j per unit of
    the body's output. Shapes: head weight (C, H), y (B,) -> (B, C) with zeros at j = y."""
    w = head.weight
    diff = w[y].unsqueeze(1) - w.unsqueeze(0)  # (B, C, H)
    return diff.pow(2).sum(-1).clamp_min(1e-12).sqrt() * (1 - F.one_hot(y, w.shape[0]))


_DATA_CACHE: dict = {}


def _load_data(cfg: ClassifyConfig):
    from lipgan import data

    # One load per process: a study runs dozens of cells on the same split.
    key = (cfg.dataset, cfg.data_dir)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = data.load(cfg.dataset, data_dir=cfg.data_dir)
    ds = _DATA_CACHE[key]
    n = ds.train_images.shape[0]
    if cfg.train_subset > n:
        raise LipganError(
            f"--train-subset {cfg.train_subset} exceeds the {n} training images of {ds.name}"
        )
    if cfg.train_subset and cfg.train_subset < n:
        # The subset is a function of the seed only (not of the torch global state).
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + cfg.seed))
        idx = perm[: cfg.train_subset].sort().values
        tr_x, tr_y = ds.train_images[idx], ds.train_labels[idx]
    else:
        tr_x, tr_y = ds.train_images, ds.train_labels
    return ds, tr_x, tr_y


def _unit(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.to(torch.float32) / 255.0


# --------------------------------------------------------------------------- training


@dataclass
class Trained:
    """What :func:`train` returns: the network (constraints attached), its plain copy, the data."""

    model: nn.Sequential
    plain: nn.Sequential
    kwargs: dict
    history: list[dict]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_s: float


def train(cfg: ClassifyConfig, log: Callable[[str], None] | None = print) -> Trained:
    """Fit ``cfg.model`` on the training subset with Adam and the constraint ``cfg.reg``.

    Loss per batch: CE(f(x), y) + penalty, with the penalty from the constraint's
    ``penalty(model, x, None)`` and its ``weight_decay`` given to the optimizer; in the certified
    mode CE is taken on the logits ``z_j + eps_t * ||w_y - w_j||`` (j != y) with eps_t ramping up.
    """
    cfg = cfg.resolved()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ds, tr_x, tr_y = _load_data(cfg)
    from lipgan.data import BatchSource

    gen = torch.Generator().manual_seed(cfg.seed)
    source = BatchSource(tr_x, tr_y, generator=gen, scale="unit")
    test_x, test_y = _unit(ds.test_images), ds.test_labels

    model, kwargs = build_model(cfg)
    method = make_constraint(cfg)
    if cfg.reg == "sn":
        # Normalize the body only: the head keeps a free scale, so the network's constant is
        # (at most) 1 x ||head||, and certificates use the head's pairwise constants.
        body = method.attach(model[:-1])
        model = nn.Sequential(*body, model[-1])
    else:
        model = method.attach(model)
    opt = torch.optim.Adam(
        model.parameters(), lr=cfg.lr, weight_decay=float(getattr(method, "weight_decay", 0.0))
    )
    steps_per_epoch = math.ceil(len(source) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warm = max(1, int(cfg.certify_warmup * total))
    history: list[dict] = []
    step = 0
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        sums = {"loss": 0.0, "penalty": 0.0, "correct": 0, "n": 0}
        for x, y in source.epoch(cfg.batch_size):
            logits = model(x)
            if cfg.certify is not None:
                eps_t = cfg.certify * min(1.0, (step + 1) / warm)
                k = _pairwise_head_constants(model[-1], y)
                loss = F.cross_entropy(logits + eps_t * k, y)
            else:
                loss = F.cross_entropy(logits, y)
            pen = method.penalty(model, x, None)
            total_loss = loss if pen is None else loss + pen
            if not torch.isfinite(total_loss):
                raise LipganError(
                    f"training diverged at epoch {epoch + 1} (loss {float(total_loss)}); "
                    "lower --lr or --lam"
                )
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            opt.step()
            method.after_step(model)
            step += 1
            b = y.shape[0]
            sums["loss"] += float(loss.detach()) * b
            sums["penalty"] += (0.0 if pen is None else float(pen.detach())) * b
            sums["correct"] += int((logits.argmax(1) == y).sum())
            sums["n"] += b
        row = {
            "epoch": epoch + 1,
            "train_loss": sums["loss"] / sums["n"],
            "penalty": sums["penalty"] / sums["n"],
            "train_acc_running": sums["correct"] / sums["n"],
            "time_s": time.perf_counter() - t0,
        }
        history.append(row)
        if log:
            log(
                f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
                f"penalty {row['penalty']:.4g}  acc {row['train_acc_running']:.4f}  "
                f"{row['time_s']:.1f}s"
            )
    train_s = time.perf_counter() - t0
    if cfg.reg == "sn":
        _converge_spectral_norms(model, method)
    plain = plain_copy(model, cfg.model, kwargs)
    return Trained(model, plain, kwargs, history, _unit(tr_x), tr_y, test_x, test_y, train_s)


def _converge_spectral_norms(model: nn.Module, method) -> None:
    """Run each SN layer's power iteration to convergence before the weights are read.

    During training one power step per optimizer step lags behind the moving weights, so sigma is
    underestimated and a normalized layer can exceed norm 1 (10% after a few dozen Adam steps,
    measured in the tests); converging once at the end makes every body layer at most 1-Lipschitz,
    as the certificates assume.
    """
    method.converge(model)


def plain_copy(model: nn.Sequential, name: str, kwargs: dict) -> nn.Sequential:
    """A fresh ``name`` network holding ``model``'s effective weights, in eval mode.

    Parametrizations (spectral normalization) compute ``layer.weight`` from kept state; reading it
    in eval mode gives the weight the trained network really uses, without the parametrization, so
    bounds, attacks and the exported file all see one plain function.
    """
    from lipgan.models import build

    model.eval()
    fresh = build("classifier", name, **kwargs)
    src = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    dst = [m for m in fresh.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if len(src) != len(dst):
        raise LipganError("cannot copy the trained weights: the architectures differ")
    with torch.no_grad():
        for s, d in zip(src, dst):
            d.weight.copy_(s.weight.detach())
            if d.bias is not None:
                d.bias.copy_(s.bias.detach())
    fresh.eval()
    for p in fresh.parameters():
        p.requires_grad_(False)
    return fresh


# --------------------------------------------------------------------------- measurements


@torch.no_grad()
def generalization_gap(model, train_x, train_y, test_x, test_y) -> dict:
    """Train/test accuracy and loss and their gaps (train - test accuracy, test - train loss)."""
    tr_acc, tr_loss = accuracy_and_loss(model, train_x, train_y)
    te_acc, te_loss = accuracy_and_loss(model, test_x, test_y)
    return {
        "train_acc": tr_acc,
        "test_acc": te_acc,
        "train_loss": tr_loss,
        "test_loss": te_loss,
        "gap_acc": tr_acc - te_acc,
        "gap_loss": te_loss - tr_loss,
    }


def accuracy_and_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000
) -> tuple[float, float]:
    """Mean accuracy and mean cross-entropy of ``model`` on ``x`` (N, 1, 28, 28), ``y`` (N,)."""
    correct, loss = 0, 0.0
    for i in range(0, x.shape[0], batch):
        z = model(x[i : i + batch])
        correct += int((z.argmax(1) == y[i : i + batch]).sum())
        loss += float(F.cross_entropy(z, y[i : i + batch], reduction="sum"))
    return correct / x.shape[0], loss / x.shape[0]


def _margin_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} z_j - z_y`` per sample (Carlini & Wagner 2017): > 0 means misclassified."""
    onehot = F.one_hot(y, z.shape[1]).bool()
    return z.masked_fill(onehot, -float("inf")).amax(1) - z[onehot]


def attack_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 20,
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L2 PGD on the margin loss of the true label (Madry et al. 2018; Carlini & Wagner 2017),
    projected each step onto the pixel box [0, 1] and then onto the ball ||d|| <= eps.

    Not :func:`lipgan.sensitivity.pgd_l2`: that one has no box, and through a clamp it spends
    its budget on pixels the clamp cancels (on an MNIST MLP its robust accuracy at eps 1 was
    41.5% against 21.9% here). The first try starts at ``x``, restarts at random points of the
    ball; each sample keeps the try with the largest margin loss.
    Shapes: x (B, 1, 28, 28) in [0, 1], y (B,) -> (B, 1, 28, 28).
    """
    alpha = 2.5 * eps / steps  # Madry et al.'s step: the ball's diameter is crossed ~1.25 times
    view = (-1,) + (1,) * (x.dim() - 1)
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -float("inf"))
    for r in range(max(1, restarts)):
        if r == 0:
            d = torch.zeros_like(x)
        else:
            d = torch.randn(x.shape, generator=generator)
            d = d * (eps * torch.rand(x.shape[0], generator=generator)).view(view)
            d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(view) * eps
            d = (x + d).clamp(0, 1) - x
        for _ in range(steps):
            d.requires_grad_(True)
            (g,) = torch.autograd.grad(_margin_loss(model(x + d), y).sum(), d)
            with torch.no_grad():
                d = d + alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
                d = (x + d).clamp(0, 1) - x
                d = d * (eps / d.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0).view(view)
        with torch.no_grad():
            adv = x + d
            loss = _margin_loss(model(adv), y)
            better = loss > best_loss
            best[better] = adv[better]
            best_loss = torch.where(better, loss, best_loss)
    return best.detach()


def certify(
    model: nn.Sequential,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    lipschitz: float,
    body_lipschitz: float | None = None,
) -> dict:
    """Certified predictions at L2 radius ``eps`` from the logits' margins.

    Global rule (Tsuzuku et al. 2018): correct and ``z_y - max_{j != y} z_j > sqrt(2) * L * eps``,
    since each margin z_y - z_j is sqrt(2)*L-Lipschitz when f is L-Lipschitz in L2. Pairwise rule
    (GloRo): correct and ``z_y - z_j > L_body * ||w_y - w_j|| * eps`` for every j, with L_body a
    bound of the network without its head. Both need *guaranteed* upper bounds. Returns boolean
    masks ``(B,)`` under "global" and "pairwise" (the latter only with ``body_lipschitz``).
    """
    with torch.no_grad():
        z = model(x)
        pred = z.argmax(1)
        correct = pred == y
        zy = z.gather(1, y.view(-1, 1))
        gaps = zy - z  # (B, C); 0 at j = y
        onehot = F.one_hot(y, z.shape[1]).bool()
        margin = gaps.masked_fill(onehot, float("inf")).amin(1)
        out = {"global": correct & (margin > math.sqrt(2) * lipschitz * eps)}
        if body_lipschitz is not None:
            k = _pairwise_head_constants(model[-1], y) * body_lipschitz
            ok = (gaps > k * eps) | onehot
            out["pairwise"] = correct & ok.all(1)
    return out


def _lipschitz_report(model: nn.Sequential, x: torch.Tensor, cfg: ClassifyConfig) -> dict:
    """Named upper bounds, lower bounds, and the bounds the certificates use.

    Upper bounds from :func:`lipgan.lipschitz.upper_bounds` (Frobenius product, operator-norm
    product, merged segments, LipSDP partitions with ``cfg.lipsdp``); every one is certified, so
    ``guaranteed`` is their minimum. ``body_guaranteed``: the same for the network without its
    head (pairwise certificates). Lower bounds: :func:`lipgan.lipschitz.lower_bounds` from
    ``cfg.lower_restarts`` test images, and the largest ||J(x)||_2 over 64 test images by a
    batched power iteration (every value is attained, so both are valid lower bounds).
    """
    from lipgan import lipschitz

    shape = tuple(x.shape[1:])
    t = time.perf_counter()
    upper, table = lipschitz.upper_bounds(
        model, shape, lipsdp=cfg.lipsdp, lipsdp_time=cfg.lipsdp_time
    )
    body, _ = lipschitz.upper_bounds(
        model[:-1], shape, lipsdp=cfg.lipsdp, lipsdp_time=cfg.lipsdp_time
    )
    t_up = time.perf_counter() - t
    lower = {"jacobian_sampled": _lower_bound(model, x)}
    if cfg.lower_restarts > 0:
        lower.update(
            lipschitz.lower_bounds(model, x, restarts=cfg.lower_restarts, steps=0, seed=cfg.seed)
        )
    best_up, best_lo = min(upper.values()), max(lower.values())
    return {
        "upper": upper,
        "lower_all": lower,
        "lower": best_lo,
        "guaranteed": best_up,
        "body_upper": body,
        "body_guaranteed": min(body.values()),
        "gap": best_up / best_lo if best_lo > 0 else float("inf"),
        "layers": [
            {k: r[k] for k in ("name", "type", "frobenius", "operator", "reshaped", "constant")}
            for r in table
        ],
        "times_s": {"upper": t_up, "lower": time.perf_counter() - t - t_up},
    }


def _lower_bound(model: nn.Module, x: torch.Tensor, n: int = 64, steps: int = 30) -> float:
    """max over ``n`` sampled inputs of ||J(x)||_2, by power iteration on J^T J batched over the
    inputs (each value is attained at its input, so the maximum is a lower bound of L)."""
    gen = torch.Generator().manual_seed(1)
    xs = x[torch.randperm(x.shape[0], generator=gen)[:n]].detach()
    with torch.no_grad():
        out_dim = model(xs[:1]).shape[1]
    v = torch.randn(xs.shape[0], out_dim, generator=gen)
    sig = torch.zeros(xs.shape[0])
    for _ in range(steps):
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
        xi = xs.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((model(xi) * v).sum(), xi)  # rows J_i^T v_i
        sig = g.flatten(1).norm(dim=1)  # ||J_i^T v_i|| <= ||J_i||, attained at convergence
        _, v = torch.func.jvp(model, (xs,), (g,))  # J_i J_i^T v_i
    return float(sig.max())


def evaluate(
    model: nn.Sequential,
    cfg: ClassifyConfig,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Every measurement of the study on a trained plain network; see the module docstring.

    Keys: accuracy (train/test acc and loss, gaps), lipschitz (named upper bounds, lower bound,
    gap, the guaranteed bound used for certificates), sensitivity (input: Gaussian and worst-case
    L2 ratios ||f(x+d) - f(x)|| / ||d|| and flipped shares; parameters), robustness (accuracy
    under Gaussian noise and L2 PGD, certified accuracy, per eps), smoothness (top Hessian
    eigenvalue of the training loss with respect to the parameters), timings.
    """
    cfg = cfg.resolved()
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    out: dict = {}

    t = time.perf_counter()
    out["accuracy"] = generalization_gap(model, train_x, train_y, test_x, test_y)
    timings["accuracy"] = time.perf_counter() - t

    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    sel = torch.randperm(test_x.shape[0], generator=gen)[: cfg.eval_n]
    ex, ey = test_x[sel], test_y[sel]

    t = time.perf_counter()
    lip = _lipschitz_report(model, ex, cfg)
    out["lipschitz"] = lip
    timings["lipschitz"] = time.perf_counter() - t

    t = time.perf_counter()
    out["sensitivity"] = _sensitivity(model, ex, ey, cfg, gen)
    timings["sensitivity"] = time.perf_counter() - t

    t = time.perf_counter()
    out["robustness"] = _robustness(model, ex, ey, cfg, lip, gen)
    timings["robustness"] = time.perf_counter() - t

    t = time.perf_counter()
    out["smoothness"] = _smoothness(model, train_x, train_y, cfg)
    timings["smoothness"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - t_all
    out["eval_timings_s"] = timings
    out["eval_n"] = int(ex.shape[0])
    return out


def _sensitivity(model, x, y, cfg: ClassifyConfig, gen) -> dict:
    """The note's two stabilities through :mod:`lipgan.sensitivity`.

    Input: quotients ||f(x+d) - f(x)|| / ||d|| for Gaussian d and for the worst d found by PGD,
    with the share of flipped predictions (for the worst case: the cross-entropy attack's).
    Parameters: relative weight noise w -> w + s*|w|*N(0,1), the relative output change, the
    loss increase and the flipped share.
    """
    from lipgan import sensitivity

    inp = sensitivity.input_sensitivity(
        model,
        x,
        sizes=cfg.eps,
        n_noise=cfg.noise_draws,
        pgd=True,
        pgd_steps=cfg.pgd_steps,
        classifier=True,
        seed=cfg.seed,
    )
    res: dict = {"input": {}, "parameters": {}}
    for eps in cfg.eps:
        g = inp["gaussian"][float(eps)]
        res["input"][f"gauss_{eps:g}"] = {"ratio": g, "flipped": g["flipped"]}
    for eps in cfg.eps:
        w = inp["pgd"][float(eps)]
        res["input"][f"worst_{eps:g}"] = {
            "ratio": w,
            "flipped": inp["pgd_flip"][float(eps)]["flipped"],
            "flipped_by_change_attack": w["flipped"],
        }
    par = sensitivity.parameter_sensitivity(
        model, x, y, eps=(cfg.param_noise,), n_draws=cfg.noise_draws, seed=cfg.seed
    )[float(cfg.param_noise)]
    res["parameters"] = {
        "sigma": cfg.param_noise,
        "relative_output_change": par["output_rel"]["mean"],
        "loss_increase": par["loss_change"]["mean"],
        "flipped": par["flipped"]["mean"],
        "stats": par,
    }
    return res


def _robustness(model, x, y, cfg: ClassifyConfig, lip: dict, gen) -> dict:
    res: dict = {"clean_acc": None, "per_eps": {}}
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    res["clean_acc"] = float(clean.float().mean())
    L = lip["guaranteed"]
    Lb = lip.get("body_guaranteed")
    for eps in cfg.eps:
        accs = []
        for _ in range(cfg.noise_draws):
            d = torch.randn(x.shape, generator=gen)
            d = d * (eps / d.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
            with torch.no_grad():
                accs.append(float((model((x + d).clamp(0, 1)).argmax(1) == y).float().mean()))
        adv = attack_l2(model, x, y, eps, cfg.pgd_steps, cfg.pgd_restarts, gen)
        with torch.no_grad():
            robust = model(adv).argmax(1) == y
        cert = certify(model, x, y, eps, L, Lb)
        row = {
            "gauss_acc": sum(accs) / len(accs),
            "pgd_acc": float(robust.float().mean()),
            "certified_acc": float(cert["global"].float().mean()),
            # a certificate broken by the attack would mean an invalid bound: count them
            "certified_but_broken": int((cert["global"] & ~robust).sum()),
        }
        if "pairwise" in cert:
            row["certified_pairwise_acc"] = float(cert["pairwise"].float().mean())
            row["certified_pairwise_but_broken"] = int((cert["pairwise"] & ~robust).sum())
        res["per_eps"][f"{eps:g}"] = row
    return res


def _smoothness(model, x, y, cfg: ClassifyConfig) -> dict:
    """Extreme Hessian eigenvalues of the mean training loss in the parameters, at the end of
    training (:func:`lipgan.smoothness.param_hessian_extremes`, Lanczos): L of the note's
    quadratic upper bound, and mu (negative: the loss is not convex in the weights)."""
    from lipgan import smoothness

    n = min(cfg.hessian_n, x.shape[0])
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    idx = torch.randperm(x.shape[0], generator=gen)[:n]
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        ext = smoothness.param_hessian_extremes(
            model,
            lambda z, t: F.cross_entropy(z, t),
            x[idx],
            y[idx],
            method="lanczos",
            n_iter=cfg.hessian_iters,
            tol=1e-6,
            seed=cfg.seed,
        )
    finally:
        for p in params:
            p.requires_grad_(False)
    return {
        "hessian_top": ext["L"],
        "hessian_bottom": ext["mu"],
        "n": n,
        "iters": cfg.hessian_iters,
    }


def summary(results: dict) -> dict:
    """The scalar columns of the study CSV from one ``results.json``."""
    acc, lip, sens, rob = (
        results["accuracy"],
        results["lipschitz"],
        results["sensitivity"],
        results["robustness"],
    )
    row = dict(acc)
    for k, v in lip["upper"].items():
        row[f"upper_{k}"] = v
    row["upper_guaranteed"] = lip["guaranteed"]
    row["body_guaranteed"] = lip["body_guaranteed"]
    row["lower"] = lip["lower"]
    for k, v in sens["input"].items():
        row[f"sens_{k}"] = v["ratio"]["mean"]
        row[f"flip_{k}"] = v["flipped"]
    row["param_rel_change"] = sens["parameters"]["relative_output_change"]
    row["param_loss_increase"] = sens["parameters"]["loss_increase"]
    row["param_flipped"] = sens["parameters"]["flipped"]
    for eps, r in rob["per_eps"].items():
        row[f"gauss_acc_{eps}"] = r["gauss_acc"]
        row[f"pgd_acc_{eps}"] = r["pgd_acc"]
        row[f"cert_acc_{eps}"] = r["certified_acc"]
        if "certified_pairwise_acc" in r:
            row[f"cert_pair_acc_{eps}"] = r["certified_pairwise_acc"]
    row["hessian_top"] = results["smoothness"]["hessian_top"]
    row["hessian_bottom"] = results["smoothness"]["hessian_bottom"]
    return row


def save_classifier(model: nn.Sequential, path: str | Path, name: str, kwargs: dict) -> None:
    """Export plain weights to safetensors with lipgan's self-describing metadata
    (``lipgan_kind="classifier"``, ``lipgan_model``, ``lipgan_kwargs`` as JSON)."""
    from lipgan.runs import export_network

    export_network(model, path, "classifier", name, kwargs)


def load_classifier(path: str | Path) -> nn.Sequential:
    """Load a classifier exported by :func:`save_classifier` (or a run folder holding one)."""
    from lipgan.runs import load_network

    return load_network(path, which="classifier")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(cfg: ClassifyConfig, log: Callable[[str], None] | None = print) -> dict:
    """Train, evaluate and (with ``cfg.out``) write the run folder; returns the results dict."""
    import yaml

    cfg = cfg.resolved()
    out = Path(cfg.out) if cfg.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))
    t0 = time.perf_counter()
    tr = train(cfg, log=log)
    results: dict = {
        "config": asdict(cfg),
        "history": tr.history,
        "train_s": tr.train_s,
        "n_train": int(tr.train_y.shape[0]),
        "n_test": int(tr.test_y.shape[0]),
    }
    if cfg.evaluate:
        results.update(evaluate(tr.plain, cfg, tr.train_x, tr.train_y, tr.test_x, tr.test_y, log))
        results["summary"] = summary(results)
    else:
        results["accuracy"] = generalization_gap(
            tr.plain, tr.train_x, tr.train_y, tr.test_x, tr.test_y
        )
    results["wall_s"] = time.perf_counter() - t0
    if out is not None:
        save_classifier(tr.plain, out / "classifier.safetensors", cfg.model, tr.kwargs)
        _write_atomic(out / "results.json", json.dumps(results, indent=2))
    return results


def reevaluate(
    run_dir: str | Path,
    log: Callable[[str], None] | None = None,
    overrides: dict | None = None,
) -> dict:
    """Measure a finished run folder again (same subset, same seed) without retraining.

    Reads ``config.yaml`` and ``classifier.safetensors``, reruns :func:`evaluate` with the
    evaluation options in ``overrides`` (eval_n, eps, pgd_steps, ...) and rewrites
    ``results.json`` (and ``config.yaml``) keeping the training history and time.
    """
    import yaml

    run_dir = Path(run_dir)
    cfg_path, res_path = run_dir / "config.yaml", run_dir / "results.json"
    if not cfg_path.is_file() or not res_path.is_file():
        raise LipganError(f"{run_dir}: not a finished classify run (config.yaml, results.json)")
    raw = yaml.safe_load(cfg_path.read_text())
    for key in overrides or {}:
        if key in _TRAINING_FIELDS:
            raise LipganError(f"{key} changes training; train a new run instead")
    raw.update(overrides or {})
    cfg = ClassifyConfig.from_dict(raw).resolved()
    if overrides:
        _write_atomic(cfg_path, yaml.safe_dump(asdict(cfg), sort_keys=False))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_classifier(run_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    ds, tr_x, tr_y = _load_data(cfg)
    old = json.loads(res_path.read_text())
    t0 = time.perf_counter()
    res = {k: old[k] for k in ("history", "train_s", "n_train", "n_test") if k in old}
    res["config"] = asdict(cfg)
    res.update(evaluate(model, cfg, _unit(tr_x), tr_y, _unit(ds.test_images), ds.test_labels, log))
    res["summary"] = summary(res)
    res["wall_s"] = old.get("train_s", 0.0) + (time.perf_counter() - t0)
    _write_atomic(res_path, json.dumps(res, indent=2))
    return res
