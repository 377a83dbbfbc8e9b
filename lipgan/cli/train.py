"""`lipgan train` and `lipgan sample`.

Every ``lipgan train`` flag is one :class:`lipgan.gan.TrainConfig` field (``--lr-d`` sets
``lr_d``); the parser is built from the dataclass so the two cannot drift apart. Precedence:
dataclass defaults < method preset < ``--config FILE.yaml`` < flags (for ``--resume``: the run's
config.yaml < flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

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

Examples
  lipgan train --method wgan-gp --width 32 --steps 2000 --out runs/gp
  lipgan train --method sn --config my.yaml --lr-d 1e-4
  lipgan train --resume runs/gp --steps 4000
  lipgan sample runs/gp --n 64 --out grid.png --interpolate
"""

# Help for each TrainConfig field (the flag is the field name with dashes).
HELP = {
    "method": "method preset: wgan-clip, wgan-gp, wgan-lp, sn, snr, frobenius, l2, sagan, gan",
    "model": "architecture: dcgan28 (WGAN-GP paper), mlp (WGAN paper), sagan28",
    "width": "base width D of both networks (default: the model's, 64 for dcgan28)",
    "z_dim": "latent size",
    "dataset": "mnist, fashion-mnist, or a folder holding the four IDX files",
    "data_dir": "read the dataset's IDX files from this folder",
    "steps": "generator steps to train (the total, also when resuming)",
    "max_time_s": "stop when the run has trained this many seconds (summed over resumes) and end"
    " it as at --steps; 0: no limit",
    "batch_size": "samples per batch (real and fake each)",
    "seed": "seed of every random stream (weights, batches, noise)",
    "device": "auto (cuda when available), cpu, cuda or cuda:N",
    "precision": "auto (bf16 where the device has native bf16, else fp32), fp32, or bf16 autocast"
    " (gradient-penalty norms stay float32)",
    "out": "run folder (default runs/<method>-<model>-<time>)",
    "constraint": "Lipschitz method of the critic, a lipgan.constraints name (preset's)",
    "constraint_options": "KEY=VALUE option of the constraint, e.g. lam=5 (repeatable)",
    "generator_constraint": "constraint on the generator, e.g. spectral-norm (sagan)",
    "generator_constraint_options": "KEY=VALUE option of the generator's constraint, e.g. "
    "last_layer=false (repeatable)",
    "loss": "wasserstein, hinge or ns (non-saturating)",
    "optimizer": "adam or rmsprop",
    "lr_d": "critic learning rate",
    "lr_g": "generator learning rate",
    "beta1": "Adam beta1 (RMSProp: momentum)",
    "beta2": "Adam beta2 (RMSProp: smoothing constant alpha)",
    "weight_decay": "critic weight decay, added to the constraint's own",
    "n_critic": "critic steps per generator step",
    "burnin_steps": "WGAN schedule: use --burnin-n-critic for the first N generator steps",
    "burnin_n_critic": "critic steps during burn-in (WGAN: 100)",
    "burnin_every": "and at every N-th generator step (WGAN: 500; 0 = never)",
    "log_every": "metrics.csv/TensorBoard row every N generator steps",
    "lip_every": "gradient norms at real/fake/interpolates every N steps (0: off)",
    "layer_every": "per-layer operator norms and product bound every N steps (0: off)",
    "sample_every": "sample grid every N steps (and at the end)",
    "checkpoint_every": "write checkpoints/last.pt every N steps (and at the end)",
    "keep_every": "keep checkpoints/step_XXXXXX.pt every N steps (0: never)",
    "fid_every": "FID every N steps when lipgan.metrics has an extractor (0: end only; -1: never)",
    "fid_n": "samples per FID",
    "n_samples": "images in each sample grid",
    "tensorboard": "write TensorBoard events to RUN/tb",
    "quiet": "no progress bar",
    "on_nan": "on a non-finite loss: stop, or rollback to the last checkpoint with lower lr",
    "nan_lr_factor": "learning-rate factor applied at each rollback",
    "max_rollbacks": "rollbacks before giving up",
    "threads": "torch CPU threads (0: torch's default)",
    "compile": "torch.compile the networks (never a critic with a gradient penalty)",
    "channels_last": "channels-last memory format for the convolutions (default: on with bf16 on"
    " a CPU)",
}


def _base_type(tp) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from lipgan.gan import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = HELP.get(f.name, f.name) + (
            f" (default {default})" if default not in (None,) else ""
        )
        if f.name in ("constraint_options", "generator_constraint_options"):
            p.add_argument(
                _option_flag(f.name),
                dest=f.name,
                action="append",
                metavar="KEY=VALUE",
                default=argparse.SUPPRESS,
                help=HELP[f.name],
            )
        elif tp is bool:
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_
            )
        else:
            p.add_argument(flag, type=tp, default=argparse.SUPPRESS, help=help_)


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a WGAN with a Lipschitz method",
        description="Train a GAN on MNIST-like data with one of lipgan's Lipschitz methods.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML of TrainConfig fields")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder")
    _add_config_flags(p)
    add_nproc_argument(p)
    p.set_defaults(func=_train)

    s = sub.add_parser("sample", help="sample grid (or interpolations) from a trained generator")
    s.add_argument("run", help="run folder or generator.safetensors")
    s.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    s.add_argument("--out", default="grid.png", help="PNG to write (default grid.png)")
    s.add_argument("--seed", type=int, default=0, help="seed of the latent draws")
    s.add_argument("--nrow", type=int, default=None, help="images per row")
    s.add_argument(
        "--interpolate",
        action="store_true",
        help="rows of spherical interpolations between two random latents",
    )
    s.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    s.set_defaults(func=_sample)


def _option_flag(field_name: str) -> str:
    """The repeatable flag of a ``*_options`` field: constraint_options -> --constraint-option."""
    return "--" + field_name.removesuffix("s").replace("_", "-")


def _parse_options(items: list[str], flag: str = "--constraint-option") -> dict:
    import yaml

    from lipgan.errors import LipganError

    out = {}
    for item in items:
        if "=" not in item:
            raise LipganError(f"{flag} {item!r}: write KEY=VALUE, e.g. lam=5")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of ``lipgan train`` arguments (YAML, resume folder and flags merged)."""
    import yaml

    from lipgan.errors import LipganError
    from lipgan.gan import TrainConfig
    from lipgan.runs import Run

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    for key in ("constraint_options", "generator_constraint_options"):
        if key in flags:
            flags[key] = _parse_options(flags[key], _option_flag(key))
    base: dict = {}
    if args.resume:
        base = Run(args.resume).read_config()
        base["out"] = str(args.resume)
    if args.config:
        try:
            with open(args.config) as fh:
                loaded = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise LipganError(f"--config {args.config}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise LipganError(f"--config {args.config}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise LipganError(f"--config {args.config}: expected a mapping of TrainConfig fields")
        base.update({k.replace("-", "_"): v for k, v in loaded.items()})
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
    from lipgan import distributed, gan

    cfg = config_from_args(args)
    path = distributed.maybe_run(cfg, args.nproc, resume=bool(args.resume))
    if path is None:
        path = gan.train(cfg, resume=bool(args.resume))
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

    import torch

    from lipgan import image, runs
    from lipgan.errors import LipganError
    from lipgan.gan import resolve_device

    if args.n < 1:
        raise LipganError("--n must be >= 1")
    device = resolve_device(args.device)
    g = runs.load_network(args.run, "generator").to(device)
    z_dim = getattr(g, "z_dim", None)
    if z_dim is None:
        raise LipganError(f"{args.run}: the generator does not say its latent size (z_dim)")
    gen = torch.Generator().manual_seed(args.seed)
    if args.interpolate:
        cols = args.nrow or max(2, int(round(math.sqrt(args.n))))
        rows = max(1, math.ceil(args.n / cols))
        a, b = torch.randn(2, rows, 1, z_dim, generator=gen)
        t = torch.linspace(0, 1, cols).view(1, cols, 1)
        z = _slerp(a, b, t).reshape(rows * cols, z_dim)[: args.n]
        nrow = cols
    else:
        z = torch.randn(args.n, z_dim, generator=gen)
        nrow = args.nrow
    with torch.no_grad():
        x = torch.cat([g(c.to(device)).float().cpu() for c in z.split(256)])
    path = image.save_grid(args.out, x, nrow=nrow)
    print(path)
    return 0
