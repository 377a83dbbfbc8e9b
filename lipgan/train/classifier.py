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

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lipgan import data, runs
from lipgan.data import BatchSource
from lipgan.errors import LipganError
from lipgan.train.classifier_config import ClassifyConfig, make_constraint

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
    ``penalty(model, x, None, generator=...)`` and its ``weight_decay`` given to the optimizer;
    in the certified mode CE is taken on the logits ``z_j + eps_t * ||w_y - w_j||`` (j != y),
    eps_t ramping up.
    """
    cfg = cfg.resolved()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ds, tr_x, tr_y = load_data(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    # the penalty's own draws (gp's random output directions), apart from the batch order
    penalty_gen = torch.Generator().manual_seed(cfg.seed + 1)
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
            pen = method.penalty(model, x, None, generator=penalty_gen)
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
    # One power step per optimizer step lags behind the moving weights, so sigma is
    # underestimated and a normalized layer can exceed norm 1 (10% after a few dozen Adam steps,
    # measured in the tests); finalizing converges it, so every body layer is at most
    # 1-Lipschitz before the weights are read, as the certificates assume.
    method.finalize(model)
    plain = plain_copy(model, cfg.model, kwargs)
    return Trained(model, plain, kwargs, history, unit_pixels(tr_x), tr_y, test_x, test_y, train_s)


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
