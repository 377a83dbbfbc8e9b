"""The sweep that chose lipgan's fast recipes: one short, budgeted GAN training trial per call.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recipe_sweep.py \
        --recipe makerun --steps 1500 [--set lr_d=4e-4 --set ema_half_life=5000] \
        [--eval-n 10000] [--record scratch/sweep.jsonl]

A small, readable training loop of its own (the trainer is being restructured, issue 18) that
reuses lipgan's networks (:mod:`lipgan.models`), data (:class:`lipgan.data.BatchSource`),
Lipschitz methods (:func:`lipgan.constraints.get`, each method keeping its own mechanism),
metrics (:func:`lipgan.metrics.evaluate`: FID with the shipped MNIST extractor against the test
set, precision/recall, classes covered) and generator EMA (:class:`lipgan.train.ema.GeneratorEMA`).

Trials are budgeted in generator steps, not seconds: the machine was shared when the recipes were
chosen, so each trial runs on one thread (``torch.set_num_threads(1)``) and records its steps,
CPU seconds of training (``time.process_time``), wall seconds, and the CPU cost per step, from
which docs/recipes.md converts steps into minutes on an idle machine. Both the EMA generator and
the raw one are scored, so every trial also measures what EMA gained.

A recipe is a dict of the fields of :class:`Recipe`; ``RECIPES`` holds the ones docs/recipes.md
reports (``paper-*``: the papers' settings for the same loop), ``--set key=value`` overrides
fields for a sweep point. The generator ``dcgan28-bn`` is lipgan's ``dcgan28`` generator with batch
normalization after each hidden layer (as DCGAN, Radford et al. 2016, and the official WGAN-GP
``gan_mnist.py`` in its plain-WGAN mode); the critic is always ``dcgan28`` (no batch statistics,
so per-sample gradient penalties stay valid).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lipgan import constraints as C  # noqa: E402
from lipgan import data, metrics, models  # noqa: E402
from lipgan.train.ema import GeneratorEMA  # noqa: E402

# --------------------------------------------------------------------------- recipes


@dataclass
class Recipe:
    """Everything one trial depends on (the names follow lipgan's TrainConfig where it has one)."""

    constraint: str = "gradient-penalty"  # a lipgan.constraints name
    constraint_options: dict = field(default_factory=dict)
    generator_constraint: str = "none"
    generator_constraint_options: dict = field(default_factory=dict)
    generator: str = "dcgan28"  # dcgan28 | dcgan28-bn | sagan28
    critic: str = "dcgan28"
    width: int = 32
    loss: str = "wasserstein"  # wasserstein | hinge
    optimizer: str = "adam"  # adam | rmsprop
    lr_d: float = 1e-4
    lr_g: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.9
    n_critic: int = 5
    batch_size: int = 64
    # lazy regularization (Karras et al. 2020): the penalty on every k-th critic step only,
    # weighted k * lambda, so its expected gradient is unchanged
    penalty_every: int = 1
    # generator EMA half-life in training images (0: no EMA; the raw generator is scored too)
    ema_half_life: float = 10_000.0
    ema_rampup: float | None = 0.05
    ema_buffers: str = "average"
    bf16: bool = False  # bf16 autocast for the networks' forwards (penalty norms stay fp32)
    channels_last: bool = False  # NHWC tensors (faster oneDNN convolutions in bf16)
    burnin_steps: int = 0  # WGAN-clip: 100 critic steps for the first burnin_steps G steps
    burnin_n_critic: int = 100


RECIPES: dict[str, dict] = {
    # the papers' settings (lipgan's presets), on dcgan28 width 32, no EMA in training terms
    # (EMA is only a copy; both generators are scored)
    "paper-wgan-gp": dict(constraint="gradient-penalty"),
    "paper-wgan-lp": dict(constraint="lipschitz-penalty"),
    "paper-sn": dict(constraint="spectral-norm", lr_d=2e-4, lr_g=2e-4, beta1=0.0),
    "paper-snr": dict(
        constraint="spectral-norm-reg", constraint_options={"form": "bound", "lam": 10.0}
    ),
    "paper-frobenius": dict(
        constraint="frobenius-reg", constraint_options={"form": "bound", "lam": 10.0}, beta1=0.0
    ),
    "paper-wgan-clip": dict(
        constraint="weight-clip",
        optimizer="rmsprop",
        lr_d=5e-5,
        lr_g=5e-5,
        beta1=0.0,
        beta2=0.99,
        burnin_steps=25,
    ),
    # what the trials of docs/recipes.md start from (each sets its differences with --set)
    "base": dict(
        constraint="gradient-penalty",
        generator="dcgan28-bn",
        lr_d=2e-4,
        lr_g=2e-4,
        beta1=0.0,
        beta2=0.9,
        n_critic=2,
        penalty_every=1,
    ),
    # the best measured so far for `make run` (docs/recipes.md, trial t1): spectral-norm critic,
    # hinge loss, one critic step, TTUR 4e-4 / 1e-4 with betas (0, 0.9), batch norm in G, EMA
    "makerun": dict(
        constraint="spectral-norm",
        generator="dcgan28-bn",
        loss="hinge",
        lr_d=4e-4,
        lr_g=1e-4,
        beta1=0.0,
        beta2=0.9,
        n_critic=1,
    ),
}
# trial t6 of docs/recipes.md: makerun at batch 32 with lr_g 2e-4 and an EMA ramp of 2 % of the
# images seen (t7 continues it; t8/t9 raise the learning rates with --set)
RECIPES["fast-sn"] = {**RECIPES["makerun"], "lr_g": 2e-4, "batch_size": 32, "ema_rampup": 0.02}
# `lipgan train --recipe fast --method sn` (trial t8): fast-sn at twice its learning rates
RECIPES["fast-sn-t8"] = {**RECIPES["fast-sn"], "lr_d": 8e-4, "lr_g": 4e-4}


# --------------------------------------------------------------------------- networks


def generator_bn(width: int, z_dim: int = 128) -> nn.Module:
    """dcgan28's generator with BatchNorm2d after each hidden layer: ``(B, 128) -> (B, 1, 28, 28)``.

    Built from lipgan's dcgan28 generator, inserting a batch norm before each hidden ReLU.
    """
    base = models.build("generator", "dcgan28", width=width, z_dim=z_dim)
    layers: list[nn.Module] = []
    mods = list(base)
    for i, m in enumerate(mods):
        if isinstance(m, nn.ReLU):
            # the channels of the feature map this ReLU acts on
            prev = next(
                p for p in reversed(mods[:i]) if isinstance(p, (nn.Linear, nn.ConvTranspose2d))
            )
            if isinstance(prev, nn.Linear):
                # Linear -> ReLU -> Unflatten in dcgan28: normalize per feature
                layers.append(nn.BatchNorm1d(prev.out_features))
            else:
                layers.append(nn.BatchNorm2d(prev.out_channels))
        layers.append(m)
    from lipgan.models.gan28 import Generator

    return Generator(*layers, z_dim=base.z_dim)


def build(r: Recipe) -> tuple[nn.Module, nn.Module]:
    if r.generator == "dcgan28-bn":
        g = generator_bn(r.width)
    else:
        g = models.build("generator", r.generator, width=r.width)
    d = models.build("critic", r.critic, width=r.width)
    return g, d


LOSSES = {
    "wasserstein": (lambda sr, sf: sf.mean() - sr.mean(), lambda sf: -sf.mean()),
    "hinge": (lambda sr, sf: F.relu(1 - sr).mean() + F.relu(1 + sf).mean(), lambda sf: -sf.mean()),
}


def _opt(r: Recipe, params, lr: float):
    if r.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=r.beta2, momentum=r.beta1)
    return torch.optim.Adam(params, lr=lr, betas=(r.beta1, r.beta2))


# --------------------------------------------------------------------------- one trial


def train(
    r: Recipe,
    steps: int,
    seed: int = 0,
    log_every: int = 0,
    budget_s: float = 0.0,
    clock: str = "cpu",
    eval_at: tuple[int, ...] = (),
    eval_n: int = 5000,
    extra_half_lives: tuple[float, ...] = (),
) -> dict:
    """Train ``steps`` generator steps of recipe ``r`` (or until ``budget_s`` seconds of the
    ``clock``, ``"cpu"`` = process time or ``"wall"``, when positive); returns networks, EMA,
    steps done and costs. ``eval_at``: generator steps after which the EMA generator (else the
    raw one) is scored on ``eval_n`` samples; the scoring's CPU and wall time are excluded from
    the training times recorded with each point (``curve``)."""
    torch.manual_seed(seed)
    ds = data.load("mnist")
    batches = data.BatchSource(ds.train_images, generator=torch.Generator().manual_seed(seed))
    noise = torch.Generator().manual_seed(seed + 1)
    g, d = build(r)
    con = C.get(r.constraint, **r.constraint_options)
    gcon = C.get(r.generator_constraint, **r.generator_constraint_options)
    d = con.attach(d)
    g = gcon.attach(g)
    with torch.no_grad():
        con.after_step(d)
    fmt = torch.channels_last if r.channels_last else torch.contiguous_format
    g, d = g.to(memory_format=fmt), d.to(memory_format=fmt)
    g.train()
    d.train()
    opt_d, opt_g = _opt(r, d.parameters(), r.lr_d), _opt(r, g.parameters(), r.lr_g)
    loss_d_fn, loss_g_fn = LOSSES[r.loss]
    ema = GeneratorEMA(g, r.ema_half_life, r.ema_rampup, r.ema_buffers) if r.ema_half_life else None
    # more EMAs of the same run (half-lives in images), to compare half-lives on one trajectory
    extra = {h: GeneratorEMA(g, h, r.ema_rampup, r.ema_buffers) for h in extra_half_lives}
    b = r.batch_size
    cast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if r.bf16
        else (lambda: torch.autocast("cpu", enabled=False))
    )
    critic_steps = 0
    w_hist = []
    curve = []
    skip_cpu = skip_wall = 0.0  # time spent scoring, not training
    cpu0, wall0 = time.process_time(), time.perf_counter()
    now = time.process_time if clock == "cpu" else time.perf_counter
    start = now()
    done = 0
    for step in range(steps):
        if budget_s and now() - start >= budget_s:
            break
        done = step + 1
        if step == 5:  # the first steps pay for oneDNN's kernel selection: time from here
            cpu5 = time.process_time()
        n = r.burnin_n_critic if step < r.burnin_steps else r.n_critic
        for _ in range(n):
            real = batches.sample(b)[0].contiguous(memory_format=fmt)
            with torch.no_grad(), cast():
                fake = g(torch.randn(b, 128, generator=noise)).float().contiguous(memory_format=fmt)
            opt_d.zero_grad(set_to_none=True)
            with cast():
                s = d(torch.cat([real, fake])).float()
            sr, sf = s[:b], s[b:]
            loss = loss_d_fn(sr, sf)
            k = r.penalty_every
            if k == 1 or critic_steps % k == 0:
                pen = con.penalty(d, real, fake)
                if pen is not None:
                    loss = loss + (k * pen if k > 1 else pen)
            loss.backward()
            opt_d.step()
            con.after_step(d)
            critic_steps += 1
        opt_g.zero_grad(set_to_none=True)
        d.requires_grad_(False)
        with cast():
            sf = d(g(torch.randn(b, 128, generator=noise)).float()).float()
        loss_g = loss_g_fn(sf)
        loss_g.backward()
        d.requires_grad_(True)
        opt_g.step()
        gcon.after_step(g)
        if ema is not None:
            ema.update(g, step + 1, b)
        for e in extra.values():
            e.update(g, step + 1, b)
        w = float((sr.mean() - s[b:].mean()).detach())  # the last critic step's W estimate
        if not math.isfinite(w):
            raise FloatingPointError(f"non-finite critic output at step {step}")
        w_hist.append(w)
        if done in eval_at:
            c0, w0 = time.process_time(), time.perf_counter()
            point = score(ema.module if ema is not None else g, eval_n)
            skip_cpu += time.process_time() - c0
            skip_wall += time.perf_counter() - w0
            point.update(
                steps=done,
                train_cpu_s=round(time.process_time() - cpu0 - skip_cpu, 1),
                train_wall_s=round(time.perf_counter() - wall0 - skip_wall, 1),
            )
            curve.append(point)
            print(f"  {json.dumps(point)}", flush=True)
        if log_every and (step + 1) % log_every == 0:
            print(
                f"  step {step + 1}: W {w_hist[-1]:.3f}, cpu {time.process_time() - cpu0:.0f}s",
                flush=True,
            )
    cpu = time.process_time() - cpu0 - skip_cpu
    wall = time.perf_counter() - wall0 - skip_wall
    steady = (
        (time.process_time() - cpu5 - skip_cpu) / (done - 5) if done > 10 else cpu / max(done, 1)
    )
    return dict(
        steady_cpu_ms=1000 * steady,
        curve=curve,
        g=g,
        d=d,
        ema=ema,
        extra=extra,
        steps=done,
        cpu_s=cpu,
        wall_s=wall,
        critic_steps=critic_steps,
        w_last=w_hist[-1],
    )


@torch.no_grad()
def samples(g: nn.Module, n: int, seed: int = 1234) -> torch.Tensor:
    """``n`` images ``(n, 1, 28, 28)`` from ``g`` in eval mode, fixed noise."""
    was = g.training
    g.eval()
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 128, generator=gen)
    out = torch.cat([g(c).float() for c in z.split(500)])
    g.train(was)
    return out


def critic_lipschitz(d: nn.Module, n: int = 256, seed: int = 7) -> float:
    """Max over ``n`` real/fake-free test points of ``||grad_x D(x)||_2``: a lower estimate of the
    critic's Lipschitz constant, at real test images (shows each mechanism still holds)."""
    ds = data.load("mnist")
    idx = torch.randperm(ds.test_images.shape[0], generator=torch.Generator().manual_seed(seed))
    x = (ds.test_images[idx[:n]].float() * (2 / 255) - 1).requires_grad_(True)
    was = d.training
    d.eval()
    (grad,) = torch.autograd.grad(d(x).sum(), x)
    d.train(was)
    return float(grad.flatten(1).norm(dim=1).max())


def score(g: nn.Module, n: int) -> dict:
    t0 = time.process_time()
    x = samples(g, n)
    ev = metrics.evaluate(x)
    keep = ("fid", "precision", "recall", "coverage", "classes_covered")
    out = {k: ev[k] for k in keep}
    out["score_cpu_s"] = time.process_time() - t0
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="makerun", choices=sorted(RECIPES))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, required=True, help="generator steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-n", type=int, default=10_000)
    ap.add_argument("--no-raw", action="store_true", help="score only the EMA generator")
    ap.add_argument("--record", default=None, help="append the result as one JSON line here")
    ap.add_argument("--grid", default=None, help="save a 10x10 sample grid (PNG) here")
    ap.add_argument("--save", default=None, help="save the generator and its EMA (torch.save)")
    ap.add_argument("--eval-at", default="", help="comma-separated steps to score on the way")
    ap.add_argument("--curve-n", type=int, default=5000, help="samples per --eval-at point")
    ap.add_argument(
        "--extra-half-lives",
        default="",
        help="comma-separated EMA half-lives (images) kept beside the recipe's, scored at the end "
        "with --curve-n samples",
    )
    ap.add_argument("--log-every", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    overrides = {}
    for kv in args.set:
        key, _, val = kv.partition("=")
        if key not in fields:
            ap.error(f"unknown recipe field {key!r}; fields: {', '.join(fields)}")
        overrides[key] = json.loads(val) if val[:1] in "[{0123456789-.tfn" else val
    r = Recipe(**{**RECIPES[args.recipe], **overrides})
    eval_at = tuple(int(x) for x in args.eval_at.split(",") if x)
    extra = tuple(float(x) for x in args.extra_half_lives.split(",") if x)
    t = train(
        r,
        args.steps,
        args.seed,
        args.log_every,
        eval_at=eval_at,
        eval_n=args.curve_n,
        extra_half_lives=extra,
    )
    result = dict(
        recipe=args.recipe,
        overrides=overrides,
        config=dataclasses.asdict(r),
        steps=args.steps,
        seed=args.seed,
        threads=args.threads,
        train_cpu_s=round(t["cpu_s"], 1),
        train_wall_s=round(t["wall_s"], 1),
        cpu_ms_per_step=round(1000 * t["cpu_s"] / args.steps, 1),
        steady_cpu_ms_per_step=round(t["steady_cpu_ms"], 1),
        critic_steps=t["critic_steps"],
        w_last=round(t["w_last"], 4),
        critic_grad_max=round(critic_lipschitz(t["d"]), 3),
        eval_n=args.eval_n,
        curve=t["curve"],
        curve_n=args.curve_n,
    )
    if t["ema"] is not None:
        result["ema"] = score(t["ema"].module, args.eval_n)
    if t["ema"] is None or not args.no_raw:
        result["raw"] = score(t["g"], args.eval_n)
    if extra:
        result["extra_ema"] = {
            f"{h:g}": score(e.module, args.curve_n) for h, e in t["extra"].items()
        }
        if args.no_raw:
            result["raw_curve_n"] = score(t["g"], args.curve_n)
    if args.save:
        ema_state = None if t["ema"] is None else t["ema"].state_dict()
        torch.save({"g": t["g"].state_dict(), "ema": ema_state, "result": result}, args.save)
    if args.grid:
        from lipgan.image import save_grid

        best = t["ema"].module if t["ema"] is not None else t["g"]
        save_grid(args.grid, samples(best, 100), nrow=10)
    line = json.dumps(result)
    print(line)
    if args.record:
        with open(args.record, "a") as fh:
            fh.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
