"""The post-training measurements of the generalization study.

The chain under study: a regularizer makes the network's Lipschitz constant C(w) smaller; a
smaller C(w) makes the network less sensitive to perturbations of its input; a less sensitive
network generalizes better. :func:`evaluate` measures every link of the chain on a trained plain
network (accuracy and gaps, certified and lower Lipschitz bounds, input and parameter
sensitivity, robustness with certificates, loss smoothness); :func:`summary` flattens the result
into the study's CSV columns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lipgan import lipschitz, sensitivity, smoothness
from lipgan.train.classifier import pairwise_head_constants
from lipgan.train.classifier_config import ClassifyConfig

#: GloRo's deterministic L2 results on MNIST (Leino et al. 2021, Table 2): verified-robust accuracy
GLORO_MNIST = {0.3: 0.957, 1.58: 0.628}


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
    """L2 PGD on the margin loss of the true label (Madry et al. 2018; Carlini & Wagner 2017)
    with the pixels kept in [0, 1]: :func:`lipgan.sensitivity.pgd_l2` with ``box=(0, 1)``.

    The first try starts at ``x``, restarts at random points of the sphere; each sample keeps the
    try with the largest margin loss. Shapes: x (B, 1, 28, 28) in [0, 1], y (B,) -> x's shape.
    """

    def margin(z: torch.Tensor) -> torch.Tensor:
        return _margin_loss(z, y)

    best = x.clone()
    best_loss = torch.full((x.shape[0],), -float("inf"))
    for r in range(max(1, restarts)):
        start = torch.zeros_like(x) if r == 0 else None
        d = sensitivity.pgd_l2(
            model, x, eps, margin, steps, generator=generator, box=(0.0, 1.0), start=start
        )
        with torch.no_grad():
            adv = x + d
            loss = margin(model(adv))
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
            k = pairwise_head_constants(model[-1], y) * body_lipschitz
            ok = (gaps > k * eps) | onehot
            out["pairwise"] = correct & ok.all(1)
    return out


def _lipschitz_report(model: nn.Sequential, x: torch.Tensor, cfg: ClassifyConfig) -> dict:
    """Named upper bounds, lower bounds, and the bounds the certificates use.

    Upper bounds from :func:`lipgan.lipschitz.upper_bounds` (Frobenius product, operator-norm
    product, merged segments, LipSDP partitions with ``cfg.lipsdp``); every one is certified, so
    ``guaranteed`` is their minimum. ``body_guaranteed``: the same for the network without its
    head (pairwise certificates). Lower bounds: :func:`lipgan.lipschitz.lower_bounds` from
    ``cfg.lower_restarts`` test images, and the largest ||J(x)||_2 over 64 test images (every
    value is attained, so both are valid lower bounds).
    """
    shape = tuple(x.shape[1:])
    t = time.perf_counter()
    upper, table = lipschitz.upper_bounds(model, shape, lipsdp=cfg.lipsdp)
    body, _ = lipschitz.upper_bounds(model[:-1], shape, lipsdp=cfg.lipsdp)
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


def _lower_bound(model: nn.Module, x: torch.Tensor, n: int = 64) -> float:
    """max over ``n`` sampled inputs of ||J(x)||_2 (:func:`lipgan.lipschitz.jacobian_norm`; each
    value is attained at its input, so the maximum is a lower bound of L)."""
    gen = torch.Generator().manual_seed(1)
    xs = x[torch.randperm(x.shape[0], generator=gen)[:n]].detach()
    return max(lipschitz.jacobian_norm(model, xi)[0] for xi in xs)


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
