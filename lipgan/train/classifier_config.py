"""The classifier's configuration and its methods, without torch (CLI flags stay cheap).

A method (``--reg``) is a name of the :mod:`lipgan.constraints` registry or one of the classifier
:data:`PRESETS`: the generalization study's short names, each a registry name with the option its
strength ``--lam`` sets and a default strength. :func:`make_constraint` turns a config into the
constraint object; the trainer (:mod:`lipgan.train.classifier`) uses nothing but its protocol.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lipgan.errors import LipganError
from lipgan.train.config import Config, option

if TYPE_CHECKING:
    from lipgan.constraints import Constraint


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
class ClassifyConfig(Config):
    """Every option of ``lipgan classify``; each field is one CLI flag (:func:`add_flags`).

    Pixels are scaled to ``[0, 1]`` so that the L2 radii ``eps`` match the certified-robustness
    literature on MNIST (GloRo's 0.3 and 1.58 are L2 radii on ``[0, 1]`` images).
    """

    model: str = option("mlp", "classifier architecture: mlp or cnn")
    activation: str | None = option(
        None, "relu, tanh or minmax (default relu; minmax with --certify)"
    )
    width: int | None = option(None, "hidden width (mlp) or dense width (cnn)", low=2, high=65536)
    dataset: str = option("mnist", "mnist, fashion-mnist or a folder of IDX files")
    data_dir: str | None = option(None, "read the four IDX files from this folder")
    train_subset: int = option(5000, "training images (0 = the whole training split)", low=0)
    epochs: int = option(20, "epochs of training", low=1, high=100000)
    batch_size: int = option(128, "batch size", low=1, high=65536)
    lr: float = option(1e-3, "Adam learning rate (Kingma & Ba 2015's default)", above=0)
    reg: str = option(
        "none",
        f"the Lipschitz method: {', '.join(PRESETS)} or a lipgan.constraints name, e.g. bjorck",
    )
    lam: float | None = option(None, "the method's strength (default its preset's; 0: none)", low=0)
    reg_options: dict = option({}, "an option of the method's constraint, e.g. iters=30 for bjorck")
    sn_mode: str = option(
        "operator",
        "for --reg sn: operator (a true bound) or reshaped (SN-GAN)",
        choices=("operator", "reshaped"),
    )
    certify: float | None = option(
        None, "Lipschitz-margin training for certified L2 robustness at this radius"
    )
    certify_warmup: float = option(
        0.2, "share of the steps over which the training radius ramps up", low=0, high=1
    )
    seed: int = option(0, "seed of the subset, the initialization and the batches", low=0)
    eval_n: int = option(
        1000, "test images for the attacks, noise, certificates and sensitivity", low=1, high=10**6
    )
    eps: list = option([0.5, 1.0, 2.0], "L2 radii to evaluate")
    pgd_steps: int = option(20, "PGD steps", low=1, high=10**5)
    pgd_restarts: int = option(1, "PGD restarts", low=1, high=1000)
    noise_draws: int = option(4, "Gaussian draws per radius", low=1, high=1000)
    param_noise: float = option(0.01, "relative weight noise s: w -> w + s*|w|*N(0,1)", low=0)
    hessian_iters: int = option(
        20, "Lanczos steps for each end of the Hessian's spectrum", low=1, high=10**4
    )
    hessian_n: int = option(1000, "training images for the Hessian", low=1, high=10**6)
    lower_restarts: int = option(
        1, "restarts of the sampled lower bound (float64, per point)", low=0
    )
    lipsdp: bool = option(False, "add LipSDP-Neuron upper bounds (slower)")
    threads: int | None = option(None, "torch threads", low=1, high=4096)
    out: str | None = option(None, "run folder to write (default: print only)")
    evaluate: bool = option(True, "measure the trained network (--no-evaluate: accuracy only)")

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


def make_constraint(cfg: ClassifyConfig) -> Constraint:
    """The :mod:`lipgan.constraints` method of ``cfg.reg``: its preset's options, the strength
    ``cfg.lam`` under the preset's option name (0: no regularizer), then ``cfg.reg_options``.

    ``gp`` is the library's gradient penalty called with ``fake=None``: it penalizes
    ``lam * (||J(x)^T r|| - 1)^2`` at the training images, ``r`` one random unit direction in
    logit space per sample (WGAN-GP's target norm 1, probed along a random output direction).
    """
    from lipgan import constraints  # torch: only when a method is made

    p = preset(cfg.reg)
    if p.strength is not None and not cfg.lam:
        return constraints.get("none")
    options = {**p.options, **{k: getattr(cfg, f) for k, f in p.from_config.items()}}
    if p.strength is not None:
        options[p.strength] = cfg.lam
    return constraints.get(p.constraint, **options, **cfg.reg_options)
