"""The two stabilities of the study note, measured: to input perturbations and to parameter noise.

- Input: for perturbations d of given L2 sizes, random (Gaussian directions scaled to the size) and
  worst case (L2 projected gradient ascent, PGD), the distribution of the quotient
  ``||f(x + d) - f(x)|| / ||d||`` (never above the Lipschitz constant) and, for classifiers, the
  share of predictions that flip.
- Parameters: relative weight noise ``w -> w + eps * |w| * N(0, 1)`` (multiplicative, so every
  layer is disturbed in proportion to its scale), the change of the outputs and of the loss. The
  weights are restored exactly (bit for bit) afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lipgan.errors import LipganError

__all__ = ["input_sensitivity", "parameter_sensitivity", "pgd_l2"]


def _summary(r: torch.Tensor) -> dict[str, float]:
    r = r.detach().double().reshape(-1)
    return {
        "mean": float(r.mean()),
        "median": float(r.median()),
        "p95": float(torch.quantile(r, 0.95)) if r.numel() > 1 else float(r[0]),
        "max": float(r.max()),
        "min": float(r.min()),
    }


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for a measurement, and in the mode it had afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _restored(params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Copies of ``params``, written back bit for bit afterwards, whatever happened."""
    saved = [p.detach().clone() for p in params]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _is_classifier(y: torch.Tensor, classifier: bool | None) -> bool:
    if classifier is not None:
        return classifier
    return y.dim() == 2 and y.shape[1] > 1


def _unit(g: torch.Tensor) -> torch.Tensor:
    """Per-sample unit vectors in L2 over all but the batch dimension."""
    n = g.reshape(g.shape[0], -1).norm(dim=1).clamp_min(1e-30)
    return g / n.reshape(-1, *([1] * (g.dim() - 1)))


def pgd_l2(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    eps: float,
    objective: Callable[[torch.Tensor], torch.Tensor],
    steps: int = 20,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    box: tuple[float, float] | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """L2 PGD: maximize ``objective(f(x + d))`` (per sample, shape (B,)) over ``||d_i|| <= eps``.

    Normalized gradient steps of ``step_size`` (default 2.5 eps / steps, Madry et al. 2018) from
    ``start`` (default a random point of the sphere), each followed by the projection onto the
    box ``lo <= x + d <= hi`` (when ``box`` is given, e.g. pixels in [0, 1]) and then onto the
    ball. Projecting onto the box keeps the budget on pixels that can still move, where a clamp
    inside ``f`` would waste it. This is lipgan's one L2 PGD (the sensitivity measurements, the
    Lipschitz lower bounds and the classifier attacks use it). Returns d, x's shape.
    """
    step = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    view = (-1,) + (1,) * (x.dim() - 1)

    def project(d: torch.Tensor) -> torch.Tensor:
        if box is not None:
            d = (x + d).clamp(box[0], box[1]) - x
        n = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-30)
        return d * (eps / n).clamp(max=1.0).reshape(view)

    if start is None:
        d = eps * _unit(torch.randn(x.shape, generator=generator, dtype=x.dtype))
    else:
        d = start.to(x.dtype)
    d = project(d.detach())
    for _ in range(steps):
        d = d.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(objective(f(x + d)).sum(), d)
        with torch.no_grad():
            d = project(d + step * _unit(g))
    return d.detach()


def input_sensitivity(
    model: nn.Module,
    x: torch.Tensor,
    sizes: Sequence[float] = (0.1, 0.5, 1.0),
    n_noise: int = 8,
    pgd: bool = True,
    pgd_steps: int = 20,
    classifier: bool | None = None,
    seed: int = 0,
) -> dict:
    """Quotients ``||f(x+d) - f(x)|| / ||d||`` and flipped shares for noise and worst-case d.

    x: (B, ...) inputs; ``sizes``: L2 norms of d. Gaussian: ``n_noise`` directions per input, each
    scaled to exactly the size. PGD: d maximizing ``||f(x+d) - f(x)||`` within the ball and, for
    classifiers (2-D outputs with several columns unless ``classifier`` says otherwise), a second
    PGD on the cross-entropy of the clean prediction, whose flipped share is the usual robust
    error. Returns ``{"gaussian": {size: stats}, "pgd": {size: stats}, "pgd_flip": {...}}``,
    stats = mean/median/p95/max/min of the quotient (+ "flipped" share for classifiers).
    The model is evaluated in eval mode and left in the mode it had.
    """
    if x.dim() < 2:
        raise LipganError("input_sensitivity: x must have a batch dimension (B, ...)")
    g = torch.Generator().manual_seed(seed)
    with _eval_mode(model):
        with torch.no_grad():
            y0 = model(x)
        is_cls = _is_classifier(y0, classifier)
        flat0 = y0.reshape(y0.shape[0], -1)
        pred0 = y0.argmax(1) if is_cls else None
        out: dict = {"gaussian": {}, "classifier": is_cls}
        for eps in sizes:
            ratios, flips = [], []
            with torch.no_grad():
                for _ in range(n_noise):
                    d = float(eps) * _unit(torch.randn(x.shape, generator=g, dtype=x.dtype))
                    y = model(x + d)
                    ratios.append((y.reshape(y.shape[0], -1) - flat0).norm(dim=1) / float(eps))
                    if is_cls:
                        flips.append((y.argmax(1) != pred0).double())
            stats = _summary(torch.cat(ratios))
            if is_cls:
                stats["flipped"] = float(torch.cat(flips).mean())
            out["gaussian"][float(eps)] = stats
        if pgd:
            out["pgd"] = {}
            if is_cls:
                out["pgd_flip"] = {}
            for eps in sizes:

                def change(y):
                    return (y.reshape(y.shape[0], -1) - flat0).norm(dim=1)

                # steps as long as the radius: on a linear map this is power iteration
                d = pgd_l2(model, x, float(eps), change, pgd_steps, float(eps), generator=g)
                with torch.no_grad():
                    y = model(x + d)
                    dn = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-30)
                    stats = _summary(change(y) / dn)
                    if is_cls:
                        stats["flipped"] = float((y.argmax(1) != pred0).double().mean())
                out["pgd"][float(eps)] = stats
                if is_cls:

                    def ce(y):
                        return F.cross_entropy(y, pred0, reduction="none")

                    d = pgd_l2(model, x, float(eps), ce, pgd_steps, generator=g)
                    with torch.no_grad():
                        y = model(x + d)
                    out["pgd_flip"][float(eps)] = {
                        "flipped": float((y.argmax(1) != pred0).double().mean())
                    }
        return out


def parameter_sensitivity(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    eps: Sequence[float] = (1e-3, 1e-2, 1e-1),
    n_draws: int = 5,
    classifier: bool | None = None,
    seed: int = 0,
) -> dict:
    """Output and loss change under relative weight noise ``w -> w + eps |w| N(0, 1)``.

    For each eps, ``n_draws`` noise draws over every parameter; per draw the relative output change
    ``||f'(x) - f(x)||_F / ||f(x)||_F``, the loss change ``loss' - loss`` and (classifiers) the
    share of flipped predictions. ``loss_fn(outputs, y)``: default cross-entropy for classifiers
    with labels, else the mean output (a critic's score). Weights are restored bit for bit.
    Returns ``{"loss": float, eps: {"output_rel": stats, "loss_change": stats, ...}}``.
    """
    if loss_fn is None:

        def loss_fn(out, yy):
            if yy is not None and out.dim() == 2 and out.shape[1] > 1:
                return F.cross_entropy(out, yy)
            return out.mean()

    params = [p for p in model.parameters()]
    if not params:
        raise LipganError("parameter_sensitivity: the model has no parameters")
    g = torch.Generator().manual_seed(seed)
    with _eval_mode(model), _restored(params) as saved:
        with torch.no_grad():
            out0 = model(x)
            loss0 = float(loss_fn(out0, y))
            is_cls = _is_classifier(out0, classifier)
            norm0 = float(out0.double().norm()) or 1.0
            result: dict = {"loss": loss0}
            for e in eps:
                rel, dloss, flips = [], [], []
                for _ in range(n_draws):
                    for p, s in zip(params, saved):
                        noise = torch.randn(s.shape, generator=g, dtype=s.dtype)
                        p.copy_(s + float(e) * s.abs() * noise.to(s.device))
                    out = model(x)
                    rel.append(float((out - out0).double().norm()) / norm0)
                    dloss.append(float(loss_fn(out, y)) - loss0)
                    if is_cls:
                        flips.append(float((out.argmax(1) != out0.argmax(1)).double().mean()))
                    for p, s in zip(params, saved):
                        p.copy_(s)
                stats = {
                    "output_rel": _summary(torch.tensor(rel)),
                    "loss_change": _summary(torch.tensor(dloss)),
                }
                if is_cls:
                    stats["flipped"] = _summary(torch.tensor(flips))
                result[float(e)] = stats
        return result
