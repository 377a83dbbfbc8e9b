"""Classifier training with any Lipschitz method of :mod:`lipgan.constraints`.

:func:`train` fits a small classifier on a subset of MNIST with one method, through the
constraint protocol only (``attach``, ``penalty``, ``weight_decay``, ``after_step`` and, before
the weights are read, convergence of what the method keeps); :mod:`lipgan.classify` measures the
trained network and writes the run folder. A method is a name of the constraint registry or one
of the classifier :data:`PRESETS` (the generalization study's short names and strengths).

A certified mode (``certify=EPS``) trains with Lipschitz-margin training (Tsuzuku, Sato & Sugiyama
2018) in the pairwise form of GloRo nets (Leino, Wang & Fredrikson 2021): the body is made
1-Lipschitz with operator-norm spectral normalization, and the logit of every wrong class j is
raised by ``eps * ||w_y - w_j||`` during training (``L_body = 1`` after the normalization), so the
network learns margins that a guaranteed Lipschitz bound can certify.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lipgan import constraints, data, runs
from lipgan.data import BatchSource
from lipgan.errors import LipganError


@dataclass(frozen=True)
class Preset:
    """A classifier method: a :mod:`lipgan.constraints` registry name, the option ``--lam``
    sets (None: the method has no strength), its default, fixed options, and options taken from
    config fields (``{"mode": "sn_mode"}``)."""

    constraint: str
    strength: str | None = None
    lam: float = 0.0
    options: dict = field(default_factory=dict)
    from_config: dict = field(default_factory=dict)


# The study's short names. Default strengths are starting points only: the study sweeps them.
# l2: 5e-4 is the weight decay of the classic CIFAR/ImageNet recipes (He et al. 2016);
# frobenius: lam*||W||_F^2 has gradient 2*lam*W, so 2.5e-4 matches weight decay 5e-4;
# snr: Yoshida & Miyato (2017) report lam in 0.01..0.1 for lam/2 * sum sigma^2;
# gp: lipgan's WGAN-GP penalty at the training images (fake=None), lam*(||J^T r|| - 1)^2; WGAN-GP's
# 10 is for a critic's unbounded score, a classifier's cross-entropy is O(1): 0.1 (swept 0.01..10).
# sn normalizes the body only: the head keeps a free scale, so the network's constant is (at
# most) 1 x ||head||, and certificates use the head's pairwise constants.
PRESETS: dict[str, Preset] = {
    "none": Preset("none"),
    "l2": Preset("l2", "weight_decay", 5e-4),
    "frobenius": Preset("frobenius-reg", "lam", 2.5e-4),
    "snr": Preset("spectral-norm-reg", "lam", 0.01),
    "sn": Preset("spectral-norm", options={"last_layer": False}, from_config={"mode": "sn_mode"}),
    "gp": Preset("gradient-penalty", "lam", 0.1),
}


def method_names() -> list[str]:
    """Every name ``--reg`` accepts: the presets, then the constraint registry's other names."""
    from lipgan import constraints

    return list(PRESETS) + [n for n in constraints.available() if n not in PRESETS]


def preset(reg: str) -> Preset:
    """The preset of ``reg``; a registry name without a preset is its own, without a strength."""
    if reg in PRESETS:
        return PRESETS[reg]
    if isinstance(reg, str) and reg in method_names():
        return Preset(reg)
    raise LipganError(f"unknown regularizer {reg!r}; use one of {', '.join(method_names())}")


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
    reg: str = "none"  # a preset (PRESETS) or a lipgan.constraints name
    lam: float | None = None  # the method's strength (None: its preset's; 0: no regularizer)
    reg_options: dict = field(default_factory=dict)  # other options of the constraint
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
        p = preset(c.reg)
        if c.certify is not None:
            if not (c.certify > 0 and math.isfinite(c.certify)):
                raise LipganError(f"--certify needs a positive radius, got {c.certify}")
            if c.reg not in ("none", "sn"):
                raise LipganError(
                    "--certify trains an operator-norm SN network; leave --reg at sn (or none)"
                )
            c.reg, c.sn_mode, p = "sn", "operator", PRESETS["sn"]
        if c.activation is None:
            c.activation = "minmax" if c.certify is not None else "relu"
        if c.lam is None:
            c.lam = p.lam
        if not (c.lam >= 0 and math.isfinite(c.lam)):
            raise LipganError(f"--lam must be a finite number >= 0, got {c.lam}")
        if c.lam and p.strength is None:
            raise LipganError(
                f"--reg {c.reg} has no strength for --lam; set its options with --reg-option"
            )
        if not isinstance(c.reg_options, dict):
            raise LipganError("reg_options must be a mapping of option names to values")
        if c.sn_mode not in ("operator", "reshaped"):
            raise LipganError(f"--sn-mode must be operator or reshaped, got {c.sn_mode!r}")
        make_constraint(c)  # the method's own checks of its options
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
TRAINING_FIELDS = {
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
    "reg_options",
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


def make_constraint(cfg: ClassifyConfig) -> constraints.Constraint:
    """The :mod:`lipgan.constraints` method of ``cfg.reg``: its preset's options, the strength
    ``cfg.lam`` under the preset's option name (0: no regularizer), then ``cfg.reg_options``.

    ``gp`` is the library's gradient penalty called with ``fake=None``: it penalizes
    ``lam * (||J(x)^T r|| - 1)^2`` at the training images, ``r`` one random unit direction in
    logit space per sample (WGAN-GP's target norm 1, probed along a random output direction).
    """
    p = preset(cfg.reg)
    if p.strength is not None and not cfg.lam:
        return constraints.get("none")
    options = {**p.options, **{k: getattr(cfg, f) for k, f in p.from_config.items()}}
    if p.strength is not None:
        options[p.strength] = cfg.lam
    return constraints.get(p.constraint, **options, **cfg.reg_options)


def pairwise_head_constants(head: nn.Linear, y: torch.Tensor) -> torch.Tensor:
    """``K[b, j] = ||w_{y_b} - w_j||_2``: Lipschitz constant of the margin z_y - z_j per unit of
    the body's output. Shapes: head weight (C, H), y (B,) -> (B, C) with zeros at j = y."""
    w = head.weight
    diff = w[y].unsqueeze(1) - w.unsqueeze(0)  # (B, C, H)
    return diff.pow(2).sum(-1).clamp_min(1e-12).sqrt() * (1 - F.one_hot(y, w.shape[0]))


_DATA_CACHE: dict = {}


def load_data(cfg: ClassifyConfig):
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


def unit_pixels(x_uint8: torch.Tensor) -> torch.Tensor:
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
    ds, tr_x, tr_y = load_data(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    source = BatchSource(tr_x, tr_y, generator=gen, scale="unit")
    test_x, test_y = unit_pixels(ds.test_images), ds.test_labels

    model, kwargs = build_model(cfg)
    method = make_constraint(cfg)
    model = method.attach(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=float(method.weight_decay))
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
                k = pairwise_head_constants(model[-1], y)
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
    _finalize(method, model)
    plain = plain_copy(model, cfg.model, kwargs)
    return Trained(model, plain, kwargs, history, unit_pixels(tr_x), tr_y, test_x, test_y, train_s)


def _finalize(method: constraints.Constraint, model: nn.Module) -> None:
    """Converge what the method keeps before the weights are read.

    During training one power step per optimizer step lags behind the moving weights, so sigma is
    underestimated and a normalized layer can exceed norm 1 (10% after a few dozen Adam steps,
    measured in the tests); converging once at the end makes every body layer at most 1-Lipschitz,
    as the certificates assume.
    """
    converge = getattr(method, "converge", None)  # the protocol's finalize, once it has one
    if converge is not None:
        converge(model)


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


def save_classifier(model: nn.Sequential, path: str | Path, name: str, kwargs: dict) -> None:
    """Export plain weights to safetensors with lipgan's self-describing metadata
    (``lipgan_kind="classifier"``, ``lipgan_model``, ``lipgan_kwargs`` as JSON)."""
    runs.export_network(model, path, "classifier", name, kwargs)


def load_classifier(path: str | Path) -> nn.Sequential:
    """Load a classifier exported by :func:`save_classifier` (or a run folder holding one)."""
    return runs.load_network(path, which="classifier")
