"""`lipgan train` and `lipgan sample`.

Every ``lipgan train`` flag is one :class:`lipgan.train.config.TrainConfig` field (``--lr-d`` sets
``lr_d``); the parser is built from the dataclass so the two cannot drift apart. Precedence:
dataclass defaults < method preset < ``--config FILE.yaml`` < flags (for ``--resume``: the run's
config.yaml < flags).
"""

from __future__ import annotations

import argparse
from pathlib import Path

TRAIN_EPILOG = """\
What the logged numbers mean
  W (column `wasserstein`) = E[D(real)] - E[D(fake)], the critic's estimate of the
  Wasserstein-1 distance between the data and the generator (Kantorovich-Rubinstein duality).
  It is >= 0 when the critic tells real from fake and shrinks towards 0 as samples improve;
  with the `wasserstein` loss the critic minimizes loss_d = -W + penalty, so loss_d is
  negative while W is positive (WGAN's printed "Loss_D" is -W). Its scale is only meaningful
  if the critic is 1-Lipschitz: compare its trend within a run, not values across methods.
  gnorm_* are measured ||grad_x D(x)|| at real, fake and interpolated points: the critic's
  local Lipschitz constant (1 is the target). See docs/wgan.md.
  time_s / cpu_s: wall and CPU seconds of the run (summed over resumes). Measurements
  (gradient norms, layer tables, FID, grids, checkpoints) keep within --measure-budget of
  the wall time (default 5 %; postponed, or skipped at the end); status.json says the share.

Examples
  lipgan train --method wgan-gp --width 32 --steps 2000 --out runs/gp
  lipgan train --method sn --config my.yaml --lr-d 1e-4
  lipgan train --method sn --recipe fast --width 32 --steps 3000 --summary-eval-n 10000
  lipgan train --resume runs/gp --steps 4000
  lipgan sample runs/gp --n 64 --out grid.png --interpolate
"""


def register(sub) -> None:
    from lipgan.train.config import SampleConfig, TrainConfig, add_flags

    p = sub.add_parser(
        "train",
        help="train a WGAN with a Lipschitz method",
        description="Train a GAN on MNIST-like data with one of lipgan's Lipschitz methods.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML of TrainConfig fields")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder")
    add_flags(p, TrainConfig)
    add_nproc_argument(p)
    p.set_defaults(func=_train)

    s = sub.add_parser("sample", help="sample grid (or interpolations) from a trained generator")
    s.add_argument("run", help="run folder or generator.safetensors")
    add_flags(s, SampleConfig)
    s.set_defaults(func=_sample)


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of ``lipgan train`` arguments: the resumed run's config.yaml (or the
    dataclass defaults) < ``--config FILE.yaml`` < flags. Checked here, before anything runs."""
    from lipgan.errors import LipganError
    from lipgan.runs import Run
    from lipgan.train.config import TrainConfig, check_flags, given_flags, load_yaml

    flags = check_flags(given_flags(args, TrainConfig), TrainConfig)
    base: dict = {}
    if args.resume:
        if "out" in flags and str(Path(flags["out"])) != str(Path(args.resume)):
            raise LipganError(
                f"--resume {args.resume} with --out {flags['out']}: a run is resumed in its own "
                "folder; drop --out (or copy the folder first)"
            )
        base = Run(args.resume).read_config()
        base["out"] = str(args.resume)
    if args.config:
        base.update({str(k).replace("-", "_"): v for k, v in load_yaml(args.config).items()})
    base.update(flags)
    return TrainConfig.from_dict(base)


def add_nproc_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train with N local processes (DistributedDataParallel: gloo on CPU, NCCL on CUDA); "
        "--batch-size is the global batch; under torchrun, torchrun decides",
    )


def _train(args) -> int:
    from lipgan.train import distributed, launch, loop
    from lipgan.train.presets import resolve

    # resolved here, once, so every process of a data-parallel run starts from the same values
    cfg = resolve(config_from_args(args))
    path = launch.maybe_run(cfg, args.nproc, resume=bool(args.resume))
    if path is None:
        path = loop.train(cfg, resume=bool(args.resume))
    if distributed.is_main_process():
        print(path)
    return 0


def _slerp(a, b, t):
    import torch

    # Spherical interpolation keeps |z| typical of a Gaussian draw along the path.
    an, bn = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.acos((an * bn).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def _sample(args) -> int:
    import math
    import sys

    import torch

    from lipgan import image, runs
    from lipgan.errors import LipganError
    from lipgan.metrics import sampling
    from lipgan.train.config import SampleConfig, from_args
    from lipgan.train.device import resolve_device

    cfg = from_args(args, SampleConfig)  # typed and range-checked before any work
    device = resolve_device(cfg.device)
    source, which = sampling.generator_source(args.run, cfg.raw)
    if which == "ema":  # issue 19: the average samples better (Yazici et al. 2019); say so
        print(f"lipgan: sampling the EMA generator ({source}); --raw for the last iterate",
              file=sys.stderr)  # fmt: skip
    g = runs.load_network(source, "generator").to(device)
    z_dim = getattr(g, "z_dim", None)
    if z_dim is None:
        raise LipganError(f"{args.run}: the generator does not say its latent size (z_dim)")
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.interpolate:
        cols = cfg.nrow or max(2, int(round(math.sqrt(cfg.n))))
        rows = max(1, math.ceil(cfg.n / cols))
        a, b = torch.randn(2, rows, 1, z_dim, generator=gen)
        t = torch.linspace(0, 1, cols).view(1, cols, 1)
        z = _slerp(a, b, t).reshape(rows * cols, z_dim)[: cfg.n]
        nrow = cols
    else:
        z = torch.randn(cfg.n, z_dim, generator=gen)
        nrow = cfg.nrow
    with torch.no_grad():
        x = torch.cat([g(c.to(device)).float().cpu() for c in z.split(256)])
    path = image.save_grid(cfg.out, x, nrow=nrow)
    print(path)
    return 0
