"""The WGAN trainer: every Lipschitz method through one loop, with presets from their sources.

One generator step is ``n_critic`` critic steps followed by one generator step. With the critic
``D`` (one score per sample) and the generator ``G``::

    Wasserstein estimate  W = E[D(x_real)] - E[D(G(z))]
    critic loss           L_D = loss.critic(D(real), D(fake)) + constraint.penalty(D, real, fake)
    generator loss        L_G = loss.generator(D(G(z)))

For the Wasserstein loss, ``L_D = -W`` (+ penalty) and ``L_G = -E[D(G(z))]``. By the
Kantorovich-Rubinstein duality, ``W`` approximates the Wasserstein-1 distance between the data and
the generator's distribution when ``D`` is 1-Lipschitz: it is >= 0 for a critic that separates the
two, falls towards 0 as the samples improve, and only its trend within one run means anything
(its scale depends on how Lipschitz the critic really is). See ``docs/wgan.md``.

The trainer has no branch on the method's name: a method is a preset (:data:`PRESETS`) naming a
constraint from :mod:`lipgan.constraints`, a loss from :data:`LOSSES`, an optimizer and its
hyper-parameters. The step functions (:meth:`GANTrainer.critic_step`,
:meth:`GANTrainer.generator_step`, :meth:`GANTrainer.train_step`) hold the arithmetic and do no I/O;
:func:`train` does the logging, samples, checkpoints and resume around them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipgan import constraints as C
from lipgan import models
from lipgan.errors import LipganError

# --------------------------------------------------------------------------- losses


@dataclass(frozen=True)
class Loss:
    """A GAN objective as two functions of per-sample scores ``(B,)`` -> scalar."""

    critic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    generator: Callable[[torch.Tensor], torch.Tensor]


LOSSES: dict[str, Loss] = {
    # WGAN (Arjovsky et al. 2017): L_D = E[D(fake)] - E[D(real)] = -W, L_G = -E[D(fake)].
    "wasserstein": Loss(
        critic=lambda r, f: f.mean() - r.mean(),
        generator=lambda f: -f.mean(),
    ),
    # Hinge (Lim & Ye 2017; SAGAN): L_D = E[max(0, 1 - D(real))] + E[max(0, 1 + D(fake))].
    "hinge": Loss(
        critic=lambda r, f: F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean(),
        generator=lambda f: -f.mean(),
    ),
    # Non-saturating GAN (Goodfellow et al. 2014) on logits: -log sigmoid(x) = softplus(-x).
    "ns": Loss(
        critic=lambda r, f: F.softplus(-r).mean() + F.softplus(f).mean(),
        generator=lambda f: F.softplus(-f).mean(),
    ),
}


# --------------------------------------------------------------------------- presets

#: Method presets. Every value fills a TrainConfig field the user left unset (flag or YAML).
PRESETS: dict[str, dict[str, Any]] = {
    # Arjovsky, Chintala & Bottou (2017), Algorithm 1 and official main.py: RMSProp lr 5e-5
    # (torch defaults: momentum 0, alpha 0.99), clip c = 0.01 (the constraint's default),
    # n_critic 5, and 100 critic steps for the first 25 generator steps and every 500th.
    "wgan-clip": dict(
        constraint="weight-clip",
        loss="wasserstein",
        optimizer="rmsprop",
        lr_d=5e-5,
        lr_g=5e-5,
        beta1=0.0,
        beta2=0.99,
        n_critic=5,
        burnin_steps=25,
        burnin_n_critic=100,
        burnin_every=500,
    ),
    # Gulrajani et al. (2017), official gan_mnist.py: Adam 1e-4, betas (0.5, 0.9), lambda 10 (the
    # constraint's default), n_critic 5.
    "wgan-gp": dict(
        constraint="gradient-penalty",
        loss="wasserstein",
        optimizer="adam",
        lr_d=1e-4,
        lr_g=1e-4,
        beta1=0.5,
        beta2=0.9,
        n_critic=5,
    ),
    # Petzka, Fischer & Lukovnikov (2018): the one-sided penalty max(0, ||grad|| - 1)^2 with the
    # WGAN-GP training setup they compared against.
    "wgan-lp": dict(
        constraint="lipschitz-penalty",
        loss="wasserstein",
        optimizer="adam",
        lr_d=1e-4,
        lr_g=1e-4,
        beta1=0.5,
        beta2=0.9,
        n_critic=5,
    ),
    # Miyato et al. (2018), setting C: Adam 2e-4, betas (0, 0.9), n_dis 5; the critic spectrally
    # normalized (one power iteration per forward, u kept) and trained with the Wasserstein loss.
    "sn": dict(
        constraint="spectral-norm",
        loss="wasserstein",
        optimizer="adam",
        lr_d=2e-4,
        lr_g=2e-4,
        beta1=0.0,
        beta2=0.9,
        n_critic=5,
    ),
    # Spectral norm regularization (Yoshida & Miyato 2017) made to hold a Wasserstein critic,
    # trained with the WGAN-GP setup so the methods differ only in how the critic is kept
    # Lipschitz. The paper's lambda/2 sum sigma_l^2 cannot: an L-layer critic's gain E[D(real)] -
    # E[D(fake)] grows like s^L when every weight is scaled by s, the penalty only like s^2, so
    # the critic's loss has no lower bound and the critic diverges (measured: W 1e6-1e7, see
    # docs/wgan.md). The preset penalizes the squared excess over 1 of the product of the
    # sigma_l instead, lam (prod_l sigma_l - 1)_+^2 (degree 2L), with WGAN-GP's lambda 10 (lipgan's
    # choice, measured in docs/wgan.md). `--constraint-option form=sum` gives the paper's form.
    "snr": dict(
        constraint="spectral-norm-reg",
        constraint_options={"form": "bound", "lam": 10.0},
        loss="wasserstein",
        optimizer="adam",
        lr_d=1e-4,
        lr_g=1e-4,
        beta1=0.5,
        beta2=0.9,
        n_critic=5,
    ),
    # The study note's C(w) = prod_l ||W_l||_F, penalized like snr: lam (C(w) - 1)_+^2 with
    # lambda 10 (lipgan's choice; the sum form lambda sum ||W_l||_F^2 diverges like snr's).
    # Adam without momentum, betas (0, 0.9) as in Miyato et al. (2018): with WGAN-GP's beta1 0.5
    # the product of norms swung around 1 and the generator never made digits (18 595 steps,
    # FID 1019); with beta1 0 it gave digits in 20 minutes on one core (FID 480). The critic's
    # last layer goes rank 1 either way (docs/wgan.md §4).
    # Arjovsky et al. (2017) saw momentum destabilize a weight-constrained critic as well.
    "frobenius": dict(
        constraint="frobenius-reg",
        constraint_options={"form": "bound", "lam": 10.0},
        loss="wasserstein",
        optimizer="adam",
        lr_d=1e-4,
        lr_g=1e-4,
        beta1=0.0,
        beta2=0.9,
        n_critic=5,
    ),
    # Weight decay on the critic (the note: L2 regularization is the Frobenius bound's penalty);
    # the constraint carries the decay, added to the critic optimizer's weight_decay.
    "l2": dict(
        constraint="l2",
        loss="wasserstein",
        optimizer="adam",
        lr_d=1e-4,
        lr_g=1e-4,
        beta1=0.5,
        beta2=0.9,
        n_critic=5,
    ),
    # Zhang et al. (2019), SAGAN: spectral normalization in both networks, hinge loss, TTUR
    # (Heusel et al. 2017) lr_D 4e-4 / lr_G 1e-4, Adam betas (0, 0.9), one critic step per
    # generator step; the self-attention architecture. lipgan's one change: the generator's output
    # layer is left unnormalized (last_layer=False). With it normalized, the sagan preset collapsed
    # to one image on MNIST on seeds 0 and 1; without, it gives varied digits (docs/wgan.md).
    "sagan": dict(
        model="sagan28",
        constraint="spectral-norm",
        generator_constraint="spectral-norm",
        generator_constraint_options={"last_layer": False},
        loss="hinge",
        optimizer="adam",
        lr_d=4e-4,
        lr_g=1e-4,
        beta1=0.0,
        beta2=0.9,
        n_critic=1,
    ),
    # The control: non-saturating GAN, no constraint, DCGAN's Adam 2e-4, betas (0.5, 0.999)
    # (Radford et al. 2016), one critic step per generator step.
    "gan": dict(
        constraint="none",
        loss="ns",
        optimizer="adam",
        lr_d=2e-4,
        lr_g=2e-4,
        beta1=0.5,
        beta2=0.999,
        n_critic=1,
    ),
}

# Values used for preset fields a preset does not mention.
_PRESET_FALLBACK: dict[str, Any] = dict(
    model="dcgan28",
    generator_constraint="none",
    weight_decay=0.0,
    burnin_steps=0,
    burnin_n_critic=100,
    burnin_every=0,
)


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` fields are filled from the method's preset.

    Each field is one ``lipgan train`` flag (``--lr-d`` for ``lr_d``) and one YAML key.
    """

    # what to train
    method: str = "wgan-gp"  # preset name, see PRESETS
    model: str | None = None  # architecture in lipgan.models (preset or dcgan28)
    width: int | None = None  # base width D (None: the architecture's default, 64 for dcgan28)
    z_dim: int = 128
    dataset: str = "mnist"  # mnist, fashion-mnist or a folder of IDX files
    data_dir: str | None = None
    steps: int = 2000  # generator steps
    # Stop once the run's training wall time (summed over resumes) reaches this many seconds, and
    # end it as if it had reached `steps` (0: no limit). `lipgan compare --budget` uses it.
    max_time_s: float = 0.0
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto | fp32 | bf16 (autocast; penalties' gradient norms stay fp32). auto: bf16 where the
    # device computes it natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX), else fp32.
    precision: str = "auto"
    out: str | None = None  # run folder (default runs/<method>-<model>-<time>)
    # the method (preset values unless set)
    constraint: str | None = None  # name in lipgan.constraints, or comma-separated names
    constraint_options: dict = field(default_factory=dict)  # keyword overrides for it
    generator_constraint: str | None = None  # e.g. spectral-norm for SAGAN
    generator_constraint_options: dict = field(default_factory=dict)  # keyword overrides for it
    loss: str | None = None  # wasserstein | hinge | ns
    optimizer: str | None = None  # adam | rmsprop
    lr_d: float | None = None
    lr_g: float | None = None
    beta1: float | None = None  # Adam beta1; RMSProp momentum
    beta2: float | None = None  # Adam beta2; RMSProp smoothing constant alpha
    weight_decay: float | None = None  # critic, added to the constraint's own weight_decay
    n_critic: int | None = None
    burnin_steps: int | None = None  # WGAN: burnin_n_critic critic steps for the first ...
    burnin_n_critic: int | None = None
    burnin_every: int | None = None  # ... and at every burnin_every-th generator step (0: never)
    # recording
    log_every: int = 10  # metrics.csv row every N generator steps
    lip_every: int = 100  # gradient norms at real/fake/interpolates (0: off)
    layer_every: int = 1000  # layer_norms.csv and product_bound (0: off; costs seconds to minutes)
    sample_every: int = 500  # sample grid (always at the end)
    checkpoint_every: int = 200  # checkpoints/last.pt (always at the end)
    keep_every: int = 1000  # checkpoints/step_XXXXXX.pt kept (0: never)
    fid_every: int = 0  # FID from lipgan.metrics when available (0: only at the end; -1: never)
    fid_n: int = 2000
    n_samples: int = 64
    tensorboard: bool = True
    quiet: bool = False
    # robustness and speed
    on_nan: str = "stop"  # stop | rollback
    nan_lr_factor: float = 0.5
    max_rollbacks: int = 3
    threads: int = 0  # torch.set_num_threads when > 0 (CPU); 0 leaves torch's default
    compile: bool = False  # torch.compile, never on a critic whose penalty needs double backward
    channels_last: bool | None = None  # None: on for bf16 on a CPU (faster oneDNN convs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a mapping (YAML); unknown keys are a LipganError naming the valid ones."""
        names = {f.name for f in fields(cls)}
        d = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LipganError(
                f"unknown config keys {unknown}; valid keys: {', '.join(sorted(names))}"
            )
        return cls(**d)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _builder_default(kind: str, name: str, arg: str) -> Any:
    models.names(kind)  # make sure every model module is imported
    fn = models._REGISTRY.get((kind, name))
    if fn is None:
        raise LipganError(f"unknown {kind} model {name!r}; choose one of: {models.names(kind)}")
    p = inspect.signature(fn).parameters.get(arg)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every ``None`` preset field from ``PRESETS[cfg.method]`` and check the values."""
    if cfg.method not in PRESETS:
        raise LipganError(f"unknown method {cfg.method!r}; choose one of: {', '.join(PRESETS)}")
    preset = {**_PRESET_FALLBACK, **PRESETS[cfg.method]}
    options = {
        key: (preset.pop(f"{key}_options", {}), getattr(cfg, key))
        for key in ("constraint", "generator_constraint")
    }
    changes = {k: v for k, v in preset.items() if getattr(cfg, k) is None}
    cfg = cfg.replace(**changes)
    for key, (preset_options, user_choice) in options.items():
        if not isinstance(getattr(cfg, f"{key}_options"), dict):
            raise LipganError(f"{key}_options must be a mapping of option names to values")
        if not preset_options or user_choice is not None:
            continue
        # The preset's options go with the constraint it picks: only when this call fills the
        # constraint in (a config read back from a run folder names its constraints and keeps
        # its own options). The user's options win; a user's other `form` takes the
        # constraint's own defaults for the rest (the preset's lam belongs to its form).
        mine = getattr(cfg, f"{key}_options")
        if "form" in mine and mine["form"] != preset_options.get("form"):
            merged = dict(mine)
        else:
            merged = {**preset_options, **mine}
        cfg = cfg.replace(**{f"{key}_options": merged})
    if cfg.width is None:
        cfg = cfg.replace(width=_builder_default("critic", cfg.model, "width"))
    if cfg.loss not in LOSSES:
        raise LipganError(f"unknown loss {cfg.loss!r}; choose one of: {', '.join(LOSSES)}")
    if cfg.optimizer not in _OPTIMIZERS:
        raise LipganError(f"unknown optimizer {cfg.optimizer!r}; use adam or rmsprop")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise LipganError(f"unknown precision {cfg.precision!r}; use auto, fp32 or bf16")
    if cfg.precision == "auto" or cfg.channels_last is None:
        cfg = resolve_precision(cfg)
    if cfg.on_nan not in ("stop", "rollback"):
        raise LipganError(f"unknown --on-nan {cfg.on_nan!r}; use stop or rollback")
    try:
        limit = float(cfg.max_time_s)
    except (TypeError, ValueError):
        limit = math.nan
    if not (limit >= 0 and math.isfinite(limit)):
        raise LipganError(
            f"max_time_s must be a number of seconds >= 0 (0: no limit), got {cfg.max_time_s!r}"
        )
    for name in ("steps", "batch_size", "n_critic", "width", "z_dim", "n_samples"):
        if int(getattr(cfg, name)) < 1:
            raise LipganError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    return cfg


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX (where oneDNN's bf16 convolutions beat fp32 by 2-4x)."""
    if device.type == "cuda":
        # compute capability 8 (Ampere) and later; torch.cuda.is_bf16_supported() also says
        # True for the emulated bf16 of older GPUs, which is slower than fp32
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).major >= 8
    if device.type == "cpu":
        try:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except AttributeError:  # an older torch without the probes: assume not
            return False
    return False


def resolve_precision(cfg: TrainConfig) -> TrainConfig:
    """Turn ``precision="auto"`` and ``channels_last=None`` into concrete values for the run's
    device, so config.yaml records what ran (and a resume elsewhere runs the same)."""
    dev = resolve_device(cfg.device)
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if native_bf16(dev) else "fp32"
    channels_last = cfg.channels_last
    if channels_last is None:
        channels_last = precision == "bf16" and dev.type == "cpu"
    return cfg.replace(precision=precision, channels_last=bool(channels_last))


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an unavailable cuda is a LipganError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LipganError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LipganError("--device cuda asked for, but torch sees no CUDA device; use cpu")
    return dev


@contextlib.contextmanager
def isolated_rng():
    """Run a block without moving any global RNG (torch CPU/CUDA, python, numpy).

    Logging, measurements and exports run inside it, so a run's arithmetic does not depend on
    when it measures or saves (bit-identical resume needs exactly that).
    """
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


# --------------------------------------------------------------------------- trainer


def _adam(params, lr, b1, b2, wd):
    return torch.optim.Adam(params, lr=lr, betas=(b1, b2), weight_decay=wd)


def _rmsprop(params, lr, b1, b2, wd):
    return torch.optim.RMSprop(params, lr=lr, momentum=b1, alpha=b2, weight_decay=wd)


_OPTIMIZERS = {"adam": _adam, "rmsprop": _rmsprop}


def _needs_double_backward(constraint: C.Constraint) -> bool:
    """Whether the constraint's penalty differentiates through input gradients (no compile).

    A constraint may say so with a ``double_backward`` attribute; otherwise any overridden
    ``penalty`` counts, which is the safe answer.
    """
    parts = constraint.methods if isinstance(constraint, C.Compose) else [constraint]
    for m in parts:
        flag = getattr(m, "double_backward", None)
        if flag is None:
            flag = type(m).penalty is not C.Constraint.penalty
        if flag:
            return True
    return False


class GANTrainer:
    """Networks, constraint, optimizers and RNG streams of one run, and the step arithmetic.

    No I/O happens here, so a distributed or benchmark driver can call the steps directly: a
    DistributedDataParallel version wraps the networks into ``d_forward`` / ``g_forward`` (the
    penalties take input gradients only, then one backward of the whole loss, which DDP allows),
    passes each rank its part of the global batch through ``train_step(next_real=...)`` from
    seeded indices, and keeps :class:`Session` (logging, checkpoints) on rank 0.
    RNG streams, each its own ``torch.Generator`` so that logging never shifts training:
    ``data_gen`` (batch indices), ``noise_gen`` (z), ``measure_gen`` (measurements), plus the
    global torch RNG that constraints use (interpolation weights).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        images: torch.Tensor | None = None,
        *,
        device: torch.device | None = None,
        constraint: C.Constraint | None = None,
        generator: nn.Module | None = None,
        critic: nn.Module | None = None,
    ) -> None:
        from lipgan.data import BatchSource

        self.cfg = cfg = resolve(cfg)
        self.device = device if device is not None else resolve_device(cfg.device)
        if cfg.threads > 0:
            # Explicit, because OpenMP threads spinning on an oversubscribed machine can make
            # each step many times slower than one thread.
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)
        self.noise_gen = torch.Generator(self.device).manual_seed(cfg.seed + 1)
        self.measure_gen = torch.Generator(self.device).manual_seed(cfg.seed + 2)

        self.gen_kwargs = {"width": cfg.width, "z_dim": cfg.z_dim}
        self.critic_kwargs = {"width": cfg.width}
        self.generator = generator if generator is not None else self._build("generator")
        self.critic = critic if critic is not None else self._build("critic")
        self.z_dim = getattr(self.generator, "z_dim", cfg.z_dim)

        self.constraint = (
            constraint
            if constraint is not None
            else C.get(cfg.constraint, **(cfg.constraint_options or {}))
        )
        self.gen_constraint = C.get(
            cfg.generator_constraint or "none", **(cfg.generator_constraint_options or {})
        )
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.generator = self.gen_constraint.attach(self.generator)
        self.generator = self.generator.to(self.device, memory_format=fmt)
        self.critic = self.constraint.attach(self.critic).to(self.device, memory_format=fmt)
        self.memory_format = fmt
        # Project onto the constraint's set once before training (clipping, orthonormalization),
        # so the critic the first generator step sees is already constrained.
        with torch.no_grad():
            self.constraint.after_step(self.critic)
            self.gen_constraint.after_step(self.generator)
        self.generator.train()
        self.critic.train()

        make = _OPTIMIZERS[cfg.optimizer]
        wd_d = float(cfg.weight_decay or 0.0) + float(self.constraint.weight_decay)
        wd_g = float(self.gen_constraint.weight_decay)
        self.opt_d = make(self.critic.parameters(), cfg.lr_d, cfg.beta1, cfg.beta2, wd_d)
        self.opt_g = make(self.generator.parameters(), cfg.lr_g, cfg.beta1, cfg.beta2, wd_g)
        self.loss = LOSSES[cfg.loss]
        self.lr_scale = 1.0
        self.step = 0  # generator steps done
        self.critic_steps = 0

        # Forward functions: compiled where correct (never through a double backward).
        self.g_forward: Callable = self.generator
        self.d_forward: Callable = self.critic
        # What the penalty differentiates through: never a compiled module (double backward);
        # a DDP driver may put its wrapped critic here.
        self.penalty_critic: nn.Module = self.critic
        if cfg.compile:
            self.g_forward = torch.compile(self.generator)
            if not _needs_double_backward(self.constraint):
                self.d_forward = torch.compile(self.critic)

        self.batches = None
        if images is not None:
            self.batches = BatchSource(
                images, generator=self.data_gen, scale="tanh", device=self.device
            )

    def _build(self, kind: str) -> nn.Module:
        kw = self.gen_kwargs if kind == "generator" else self.critic_kwargs
        if _builder_default(kind, self.cfg.model, "z_dim") is None:
            kw.pop("z_dim", None)
        return models.build(kind, self.cfg.model, **kw)

    # ---------------------------------------------------------------- helpers
    def autocast(self):
        """bf16 autocast when asked for; a no-op context for fp32."""
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def n_critic_at(self, step: int) -> int:
        """Critic steps before generator step ``step`` (0-based), with WGAN's burn-in schedule."""
        cfg = self.cfg
        if cfg.burnin_steps and step < cfg.burnin_steps:
            return int(cfg.burnin_n_critic)
        if cfg.burnin_every and step % cfg.burnin_every == 0:
            return int(cfg.burnin_n_critic)
        return int(cfg.n_critic)

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.z_dim, device=self.device, generator=generator or self.noise_gen)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.memory_format)

    @torch.no_grad()
    def make_fakes(self, z: torch.Tensor) -> torch.Tensor:
        """Generator samples for critic steps: no graph is built (the critic step never
        backpropagates into G), cast to fp32 so penalties interpolate in full precision."""
        with self.autocast():
            return self._prep(self.g_forward(z).float())

    # ---------------------------------------------------------------- steps
    def critic_step(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """One critic update on a real and a fake batch (both ``(B, C, H, W)``, no grad).

        ``L_D = loss.critic(D(real), D(fake)) + penalty``; real and fake go through one forward
        over the concatenated batch (one pass instead of two; the critic has no batch statistics).
        Returns detached scalars: wasserstein, loss_d (with penalty), penalty.
        """
        b = real.shape[0]
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():
            scores = self.d_forward(torch.cat([real, fake])).float()
            s_real, s_fake = scores[:b], scores[b:]
            loss = self.loss.critic(s_real, s_fake)
            pen = self.constraint.penalty(self.penalty_critic, real, fake)
        total = loss if pen is None else loss + pen.float()
        total.backward()
        self.opt_d.step()
        self.constraint.after_step(self.critic)
        self.critic_steps += 1
        zero = torch.zeros((), device=self.device)
        return {
            "wasserstein": (s_real.mean() - s_fake.mean()).detach(),
            "loss_d": total.detach(),
            "penalty": zero if pen is None else pen.detach().float(),
        }

    def generator_step(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """One generator update: ``L_G = loss.generator(D(G(z)))``; the critic's weights get no
        gradient (``requires_grad`` off for the step), only its input does."""
        self.opt_g.zero_grad(set_to_none=True)
        self.critic.requires_grad_(False)
        try:
            with self.autocast():
                fake = self._prep(self.g_forward(z).float())
                loss = self.loss.generator(self.d_forward(fake).float())
            loss.backward()
        finally:
            self.critic.requires_grad_(True)
        self.opt_g.step()
        self.gen_constraint.after_step(self.generator)
        return {"loss_g": loss.detach()}

    def train_step(self, next_real: Callable[[int], torch.Tensor] | None = None) -> dict:
        """One generator step with its critic steps; returns detached scalar tensors.

        ``next_real(b)`` gives a real batch (default: the trainer's BatchSource). The fakes of all
        critic steps are made before them in chunks: the generator does not change during the
        critic steps, so this is the same arithmetic in fewer, larger forwards.
        """
        if next_real is None:
            if self.batches is None:
                raise LipganError("GANTrainer has no images; pass images= or next_real=")
            next_real = lambda b: self.batches.sample(b)[0]  # noqa: E731
        b = self.cfg.batch_size
        n = self.n_critic_at(self.step)
        acc = None
        done = 0
        while done < n:
            chunk = min(n - done, 5)
            fakes = self.make_fakes(self.sample_z(chunk * b)).split(b)
            for fake in fakes:
                real = self._prep(next_real(b))
                out = self.critic_step(real, fake)
                acc = out if acc is None else {k: acc[k] + out[k] for k in acc}
            done += chunk
        self.last_real = real
        out = {k: v / n for k, v in acc.items()}
        out.update(self.generator_step(self.sample_z(b)))
        self.step += 1
        return out

    # ---------------------------------------------------------------- measurements
    @isolated_rng()
    @torch.no_grad()
    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Samples ``(N, C, H, W)`` in eval mode (no BN statistics or SN iteration updated)."""
        was = self.generator.training
        self.generator.eval()
        try:
            return torch.cat([self.generator(c).float() for c in z.split(256)])
        finally:
            self.generator.train(was)

    @isolated_rng()
    def gradient_norms(self, real: torch.Tensor, which=("real", "fake", "interp")) -> dict:
        """Per-sample ``||grad_x D(x)||_2`` at real, fake and interpolated points, in fp32.

        Interpolates ``x = a real + (1 - a) fake`` with one ``a ~ U[0, 1]`` per sample. The critic
        is put in eval mode (no power-iteration update) and random draws come from
        ``measure_gen``, so measuring never changes the training trajectory.
        Returns ``{name: (B,) tensor}``.
        """
        b = real.shape[0]
        was = self.critic.training
        self.critic.eval()
        try:
            fake = self.sample(self.sample_z(b, self.measure_gen)).to(real.dtype)
            a = torch.rand(b, 1, 1, 1, device=real.device, generator=self.measure_gen)
            points = {"real": real, "fake": fake, "interp": a * real + (1 - a) * fake}
            out = {}
            for name in which:
                x = points[name].detach().clone().requires_grad_(True)
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(self.critic(x).float().sum(), x)
                out[name] = g.flatten(1).float().norm(dim=1)
            return out
        finally:
            self.critic.train(was)

    @isolated_rng()
    def layer_norms(self) -> tuple[list[tuple[str, Any, Any]], float | None]:
        """Per-layer operator norms and the product bound from :mod:`lipgan.lipschitz`, if present.

        ``product_bound = prod_l ||A_l||_2`` (activations 1-Lipschitz), the certified upper bound
        of the critic's Lipschitz constant. Returns ``([(layer, operator_norm, reshaped_norm),
        ...], product_bound)``; empty when the module is missing or cannot handle this critic.
        """
        try:
            from lipgan import lipschitz
        except ImportError:
            return [], None
        was = self.critic.training
        self.critic.eval()
        shape = tuple(self.last_real.shape[1:]) if hasattr(self, "last_real") else (1, 28, 28)
        try:
            bound = None
            if hasattr(lipschitz, "upper_bounds"):
                upper, table = lipschitz.upper_bounds(
                    self.critic, shape, lipsdp=False, dense_limit=0
                )
                bound = _product_bound(upper)
            elif hasattr(lipschitz, "layer_table"):
                table = _call_flexible(lipschitz.layer_table, self.critic, shape)
            else:
                return [], None
            rows = [_layer_row(r) for r in (table or [])]
            rows = [r for r in rows if r[1] is not None or r[2] is not None]
            if bound is None and rows and all(r[1] is not None for r in rows):
                bound = math.prod(float(r[1]) for r in rows)
            return rows, bound
        except Exception as exc:  # an analysis failure must not stop training
            self.analysis_error = f"{type(exc).__name__}: {exc}"
            return [], None
        finally:
            self.critic.train(was)

    # ---------------------------------------------------------------- state
    def set_lr_scale(self, scale: float) -> None:
        self.lr_scale = float(scale)
        for opt, lr in ((self.opt_d, self.cfg.lr_d), (self.opt_g, self.cfg.lr_g)):
            for group in opt.param_groups:
                group["lr"] = lr * self.lr_scale

    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit: weights, optimizers, counters, RNG states.

        Only tensors, numbers, strings, lists and dicts, so ``weights_only=True`` loads it.
        """
        rng = {
            "torch": torch.get_rng_state(),
            "data": self.data_gen.get_state(),
            "noise": self.noise_gen.get_state(),
            "measure": self.measure_gen.get_state(),
            "python": _python_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        try:
            import numpy as np

            st = np.random.get_state()
            rng["numpy"] = [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]
        except ImportError:  # pragma: no cover
            pass
        return {
            "step": self.step,
            "critic_steps": self.critic_steps,
            "lr_scale": self.lr_scale,
            "models": {
                "generator": {"name": self.cfg.model, "kwargs": dict(self.gen_kwargs)},
                "critic": {"name": self.cfg.model, "kwargs": dict(self.critic_kwargs)},
                "constraint": str(self.cfg.constraint),
                "generator_constraint": str(self.cfg.generator_constraint),
            },
            "generator": self.generator.state_dict(),
            "critic": self.critic.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "rng": rng,
            "extra": {
                "critic": _hidden_state(self.critic, self.constraint),
                "generator": _hidden_state(self.generator, self.gen_constraint),
            },
        }

    def check_compatible(self, state: dict, source: str = "checkpoint") -> None:
        """LipganError when ``state`` belongs to another architecture or method."""
        mine = self.state_dict()["models"]
        theirs = state.get("models")
        if theirs != mine:
            raise LipganError(
                f"{source} is of another model: it holds {_describe(theirs)}, this run trains "
                f"{_describe(mine)}; resume it with its own run folder's config"
            )

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        """Restore :meth:`state_dict`; LipganError (and nothing changed) when it does not fit."""
        self.check_compatible(state, source)
        # A mismatch is raised before anything but the weights changed; callers (resume) then
        # discard this trainer, and the run folder has not been touched yet.
        try:
            for mod, key in ((self.generator, "generator"), (self.critic, "critic")):
                mod.load_state_dict(state[key], strict=True)
            self.opt_g.load_state_dict(state["opt_g"])
            self.opt_d.load_state_dict(state["opt_d"])
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise LipganError(f"{source} does not fit this run's networks: {first}") from None
        extra = state.get("extra", {})
        _set_hidden_state(self.critic, self.constraint, extra.get("critic"))
        _set_hidden_state(self.generator, self.gen_constraint, extra.get("generator"))
        self.step = int(state["step"])
        self.critic_steps = int(state["critic_steps"])
        self.set_lr_scale(float(state.get("lr_scale", 1.0)))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.data_gen.set_state(rng["data"])
        self.noise_gen.set_state(rng["noise"])
        self.measure_gen.set_state(rng["measure"])
        _set_python_rng_state(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "numpy" in rng:
            import numpy as np

            s = rng["numpy"]
            np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4]))


def _weight_layers(module: nn.Module) -> list[nn.Module]:
    try:
        from lipgan.layers import weight_layers
    except ImportError:  # pragma: no cover
        return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return weight_layers(module)


def _hidden_state(module: nn.Module, constraint: C.Constraint) -> dict:
    """State outside ``state_dict()`` that changes the arithmetic after a resume.

    - Power-iteration parametrizations remember whether their next training forward must iterate
      (``_stale``); a fresh one always iterates, which would add one iteration after a resume.
    - A constraint may keep per-layer state in itself (the spectral-norm regularizer's u, v):
      saved through its own ``state_dict()`` when it has one, else through a kept-power-iteration
      ``_power._state`` mapping, by layer position.
    """
    from torch.nn.utils import parametrize

    stale = []
    for layer in module.modules():
        if parametrize.is_parametrized(layer):
            for plist in layer.parametrizations.values():
                for p in plist:
                    if hasattr(p, "_stale"):
                        stale.append(bool(p._stale))
    out: dict[str, Any] = {"stale": stale}
    parts = constraint.methods if isinstance(constraint, C.Compose) else [constraint]
    cons = []
    for c in parts:
        if hasattr(c, "state_dict") and callable(c.state_dict):
            cons.append({"own": c.state_dict()})
            continue
        kept = getattr(getattr(c, "_power", None), "_state", None)
        if kept is not None:
            layers = _weight_layers(module)
            cons.append({"power": [list(kept[m]) if m in kept else [] for m in layers]})
        else:
            cons.append({})
    out["constraints"] = cons
    return out


def _set_hidden_state(module: nn.Module, constraint: C.Constraint, saved: dict | None) -> None:
    from torch.nn.utils import parametrize

    if not saved:
        return
    flags = iter(saved.get("stale", []))
    for layer in module.modules():
        if parametrize.is_parametrized(layer):
            for plist in layer.parametrizations.values():
                for p in plist:
                    if hasattr(p, "_stale"):
                        p._stale = next(flags, True)
                        if hasattr(p, "_seen_version"):
                            # the weights were just copied in: their new version is "seen"
                            p._seen_version = plist.original._version
    parts = constraint.methods if isinstance(constraint, C.Compose) else [constraint]
    for c, s in zip(parts, saved.get("constraints", [])):
        if "own" in s and hasattr(c, "load_state_dict"):
            c.load_state_dict(s["own"])
        elif "power" in s and getattr(getattr(c, "_power", None), "_state", None) is not None:
            kept = c._power._state
            for layer, uv in zip(_weight_layers(module), s["power"]):
                if uv:
                    kept[layer] = tuple(t.to(layer.weight.device) for t in uv)


def _describe(m: dict | None) -> str:
    if not isinstance(m, dict):
        return "an unknown model"
    g = m.get("critic", {})
    return f"{g.get('name')} {g.get('kwargs')} with constraint {m.get('constraint')}"


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_rng_state(s: list) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))


def _call_flexible(fn: Callable, module: nn.Module, input_shape: tuple[int, ...]):
    """Call ``fn(module, ...)`` passing an input shape under whichever name it accepts."""
    params = inspect.signature(fn).parameters
    for name in ("input_shape", "in_shape", "shape"):
        if name in params:
            return fn(module, **{name: input_shape})
    return fn(module)


def _layer_row(r: Any) -> tuple[str, Any, Any]:
    if isinstance(r, dict):
        name = r.get("layer", r.get("name", "?"))
        op = r.get("operator_norm", r.get("operator"))
        reshaped = r.get("reshaped_norm", r.get("reshaped"))
        return str(name), _num(op), _num(reshaped)
    name = getattr(r, "layer", getattr(r, "name", "?"))
    op = getattr(r, "operator_norm", None)
    reshaped = getattr(r, "reshaped_norm", None)
    return str(name), _num(op), _num(reshaped)


def _num(x: Any) -> float | None:
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def _product_bound(est: Any) -> float | None:
    if isinstance(est, (int, float)):
        return float(est)
    if isinstance(est, dict):
        for key in ("operator_product", "product_bound", "product"):
            if key in est and _num(est[key]) is not None:
                return _num(est[key])
    for key in ("product_bound", "product", "upper"):
        if _num(getattr(est, key, None)) is not None:
            return _num(getattr(est, key))
    return None


# --------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress bar on stderr: step, rate, Wasserstein estimate, ETA.

    On a terminal it redraws in place at most 5 times a second; otherwise (log files) it prints a
    line every 5% of the run.
    """

    def __init__(
        self,
        total: int,
        start: int = 0,
        enabled: bool = True,
        stream=None,
        time_limit: float = 0.0,
        wall0: float = 0.0,
    ) -> None:
        self.total, self.start = total, start
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.last_draw = 0.0
        self.time_limit, self.wall0 = float(time_limit or 0.0), float(wall0)
        self.bucket = -1  # last twentieth of the run printed (log files)

    def fraction(self, step: int, now: float) -> float:
        """How far the run is: by steps, or by wall time when a time limit comes first."""
        f = step / max(self.total, 1)
        if self.time_limit:
            f = max(f, (self.wall0 + now - self.t0) / self.time_limit)
        return min(f, 1.0)

    def update(self, step: int, w: float | None, end: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        end = end or step >= self.total
        if self.tty and now - self.last_draw < 0.2 and not end:
            return
        frac = self.fraction(step, now)
        bucket = int(20 * frac)
        if not self.tty and bucket <= self.bucket and not end:
            return
        self.bucket = bucket
        self.last_draw = now
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        if self.time_limit:
            eta = min(eta, max(self.time_limit - self.wall0 - (now - self.t0), 0.0))
        width = 24
        filled = int(width * frac)
        bar = "#" * filled + "." * (width - filled)
        wtxt = "" if w is None else f"  W {w:+.4f}"
        if self.time_limit:
            spent = self.wall0 + now - self.t0
            where = f"step {step}, {spent:.0f}/{self.time_limit:.0f} s"
        else:
            where = f"{step}/{self.total}"
        line = (
            f"[{bar}] {where}  {rate:.2f} it/s{wtxt}  "
            f"ETA {_hms(eta) if math.isfinite(eta) else '?'}"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# --------------------------------------------------------------------------- the run


class TimeLimitReached(LipganError):
    """Raised when a run is resumed that has already used its ``max_time_s``."""


class NonFiniteLoss(LipganError):
    """Raised when a loss becomes NaN or infinite and ``on_nan`` is ``stop``."""


def default_out(cfg: TrainConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{cfg.method}-{cfg.model}-{stamp}")


@isolated_rng()
def _fid(trainer: GANTrainer, cfg: TrainConfig) -> float | None:
    try:
        from lipgan import metrics
    except ImportError:
        return None
    if not (hasattr(metrics, "available") and hasattr(metrics, "fid")):
        return None
    try:
        if not metrics.available(cfg.dataset):
            return None
        z = trainer.sample_z(cfg.fid_n, trainer.measure_gen)
        return float(metrics.fid(trainer.sample(z).cpu(), dataset=cfg.dataset, n=cfg.fid_n))
    except LipganError:
        return None


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    constraint: C.Constraint | None = None,
    stream=None,
) -> Path:
    """Train (or, with ``resume``, continue) the run ``cfg.out`` to ``cfg.steps``; return its path.

    A new run refuses a folder that already holds one. A resumed run reads and checks
    ``checkpoints/last.pt`` before changing anything in the folder.
    """
    session = Session(cfg, resume=resume, constraint=constraint, stream=stream)
    try:
        session.run()
    finally:
        session.close()
    return session.finish()


@isolated_rng()
def _checkpoint(trainer: GANTrainer, run, cfg: TrainConfig, wall_s: float, keep: bool) -> None:
    from lipgan import runs

    state = trainer.state_dict()
    state["wall_s"] = wall_s
    state["config"] = cfg.to_dict()
    runs.save_checkpoint(run.last_checkpoint, state)
    if keep:
        runs.save_checkpoint(run.checkpoint_path(trainer.step), state)
    g_kw = {k: v for k, v in trainer.gen_kwargs.items()}
    runs.export_network(
        trainer.generator, run.path / "generator.safetensors", "generator", cfg.model, g_kw
    )
    runs.export_network(
        trainer.critic,
        run.path / "critic.safetensors",
        "critic",
        cfg.model,
        dict(trainer.critic_kwargs),
    )


def _params_finite(trainer: GANTrainer) -> bool:
    return all(
        bool(torch.isfinite(p).all())
        for m in (trainer.generator, trainer.critic)
        for p in m.parameters()
    )


class Session:
    """A run in progress: a :class:`GANTrainer` plus its run folder, logs and progress bar.

    ``Session(cfg)`` opens (or, with ``resume``, reopens) the run folder; ``run(until)`` trains to
    generator step ``until`` (default ``cfg.steps``) doing the logging, samples and checkpoints the
    config asks for; ``finish()`` marks the run done. Benchmarks call ``run`` in slices.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        constraint: C.Constraint | None = None,
        stream=None,
        images: torch.Tensor | None = None,
    ) -> None:
        from lipgan import data, runs

        cfg = resolve(cfg)
        if not cfg.out:
            cfg = cfg.replace(out=default_out(cfg))
        run = runs.Run(cfg.out)
        state = None
        fresh_in_place = False
        if resume:
            if run.last_checkpoint.is_file():
                state = runs.load_checkpoint(run.last_checkpoint)
            elif run.config_path.is_file():
                fresh_in_place = True  # stopped before its first checkpoint: nothing to keep
            else:
                raise LipganError(f"{run.path}: no checkpoints/last.pt to resume from")
        elif run.exists():
            raise LipganError(
                f"{run.path} already holds a run; continue it with `lipgan train --resume "
                f"{run.path}` or choose another --out"
            )
        if images is None:
            images = data.load(cfg.dataset, data_dir=cfg.data_dir).train_images
        trainer = GANTrainer(cfg, images, constraint=constraint)
        wall0 = 0.0
        if state is not None:
            trainer.load_state_dict(state, source=str(run.last_checkpoint))
            used = float(state.get("wall_s", 0.0))
            if cfg.max_time_s and used >= cfg.max_time_s:
                raise TimeLimitReached(
                    f"{run.path} has used its time limit ({used:.0f} s of max_time_s "
                    f"{cfg.max_time_s:g}); resume with a larger --max-time-s, or --max-time-s 0 "
                    "to train to --steps"
                )
            # Everything checked: only now touch the folder.
            run.write_config(cfg.to_dict())
            run.truncate_logs(trainer.step)
            run.remove_partials()
            wall0 = float(state.get("wall_s", 0.0))
        elif fresh_in_place:
            run.write_config(cfg.to_dict())
            run.truncate_logs(0)
            run.remove_partials()
        else:
            run.create(cfg.to_dict())
        self.cfg, self.run_dir, self.trainer, self.stream = cfg, run, trainer, stream

        self.tb = None
        if cfg.tensorboard:
            try:
                # After a resume, drop events the interrupted segment wrote past its checkpoint.
                self.tb = run.tensorboard(
                    purge_step=trainer.step + 1 if run.metrics_path.is_file() else None
                )
            except ImportError:
                self.tb = None
        self.fixed_z = torch.randn(
            cfg.n_samples, trainer.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 3)
        ).to(trainer.device)
        self.progress = Progress(
            cfg.steps,
            trainer.step,
            enabled=not cfg.quiet,
            stream=stream,
            time_limit=cfg.max_time_s,
            wall0=wall0,
        )
        self.t_start = time.perf_counter()
        self.wall0 = wall0  # wall time of earlier segments (resume)
        self.ended = False  # the last step was the run's end (steps reached or time limit)
        if trainer.step == 0:
            _checkpoint(trainer, run, cfg, 0.0, keep=False)  # rollback target before any step
        self.last_good = trainer.step
        self.rollbacks = 0
        run.write_status("running", trainer.step, cfg.steps, self.wall())
        self.w_ema: float | None = None
        self.t_log, self.step_log = time.perf_counter(), trainer.step

    @property
    def path(self) -> Path:
        return self.run_dir.path

    def wall(self) -> float:
        return self.wall0 + time.perf_counter() - self.t_start

    def run(self, until: int | None = None) -> None:
        """Train to generator step ``until`` (at most ``cfg.steps``)."""
        until = self.cfg.steps if until is None else min(until, self.cfg.steps)
        try:
            while self.trainer.step < until and not self.ended:
                out = self.trainer.train_step()
                self._after_step(out)
        except KeyboardInterrupt:
            self.run_dir.write_status(
                "failed", self.trainer.step, self.cfg.steps, self.wall(), "interrupted"
            )
            raise

    def _after_step(self, out: dict) -> None:
        from lipgan import runs

        cfg, trainer, run = self.cfg, self.trainer, self.run_dir
        step = trainer.step
        vals = torch.stack([out["wasserstein"], out["loss_d"], out["penalty"], out["loss_g"]])
        w, loss_d, pen, loss_g = vals.tolist()  # one sync per generator step
        if not all(math.isfinite(v) for v in (w, loss_d, pen, loss_g)):
            ckpt = run.last_checkpoint
            if cfg.on_nan == "rollback" and self.rollbacks < cfg.max_rollbacks:
                self.rollbacks += 1
                state = runs.load_checkpoint(ckpt)
                scale = float(state.get("lr_scale", 1.0)) * cfg.nan_lr_factor
                trainer.load_state_dict(state, source=str(ckpt))
                trainer.set_lr_scale(scale)
                run.truncate_logs(trainer.step)
                _say(
                    cfg,
                    self.stream,
                    f"non-finite loss at generator step {step}; rolled back to step "
                    f"{trainer.step} ({ckpt}) with learning rates x{scale:g}",
                )
                return
            reason = (
                f"non-finite loss at generator step {step} (W {w}, loss_d {loss_d}, "
                f"loss_g {loss_g}); last good checkpoint: {ckpt} (step {self.last_good}). "
                "Resume with --on-nan rollback or lower learning rates"
            )
            run.write_status("failed", step, cfg.steps, self.wall(), reason)
            raise NonFiniteLoss(reason)
        self.w_ema = w if self.w_ema is None else 0.9 * self.w_ema + 0.1 * w
        end = step >= cfg.steps or bool(cfg.max_time_s and self.wall() >= cfg.max_time_s)
        self.ended = end

        def due(every: int) -> bool:
            return bool(every) and step % every == 0

        row: dict[str, Any] = {}
        if cfg.log_every and (due(cfg.log_every) or end):
            now = time.perf_counter()
            row.update(
                step=step,
                time_s=round(self.wall(), 3),
                wasserstein=w,
                loss_d=loss_d,
                loss_g=loss_g,
                penalty=pen,
                ms_per_step=round(1000 * (now - self.t_log) / max(step - self.step_log, 1), 2),
            )
            self.t_log, self.step_log = now, step
            gn = trainer.constraint.last_grad_norm
            if gn is not None:  # reuse the penalty's own gradients at the interpolates
                gn = gn.detach().float()
                row.update(gnorm_interp_mean=gn.mean().item(), gnorm_interp_max=gn.max().item())
        if cfg.lip_every and (due(cfg.lip_every) or end):
            which = ["real", "fake"]
            if "gnorm_interp_mean" not in row:
                which.append("interp")
            norms = trainer.gradient_norms(trainer.last_real, tuple(which))
            row.setdefault("step", step)
            for k, v in norms.items():
                row[f"gnorm_{k}_mean"] = v.mean().item()
                row[f"gnorm_{k}_max"] = v.max().item()
        if cfg.layer_every and (due(cfg.layer_every) or end):
            layers, bound = trainer.layer_norms()
            if layers:
                run.log_layer_norms(step, layers)
            if bound is not None:
                row.setdefault("step", step)
                row["product_bound"] = bound
        if cfg.fid_every >= 0 and (due(cfg.fid_every) or end):
            fid = _fid(trainer, cfg)
            if fid is not None:
                row.setdefault("step", step)
                row["fid"] = fid
        if row:
            row.setdefault("time_s", round(self.wall(), 3))
            run.log_metrics(row)
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step" and v is not None:
                        self.tb.add_scalar(k, v, step)
        if due(cfg.sample_every) or end:
            run.save_samples(step, trainer.sample(self.fixed_z))
        keep = due(cfg.keep_every)
        if due(cfg.checkpoint_every) or keep or end:
            if _params_finite(trainer):
                _checkpoint(trainer, run, cfg, self.wall(), keep=keep)
                self.last_good = step
            run.write_status("running", step, cfg.steps, self.wall())
        self.progress.update(step, self.w_ema, end=end)

    def close(self) -> None:
        """Close the progress bar and the log files (the run can be reopened with resume)."""
        if not getattr(self, "_closed", False):
            self._closed = True
            self.progress.close()
            self.run_dir.close()

    def finish(self) -> Path:
        """Mark the run done when it reached ``cfg.steps`` or its time limit; returns the run
        folder."""
        self.close()
        if self.trainer.step >= self.cfg.steps or self.ended:
            self.run_dir.write_status("done", self.trainer.step, self.cfg.steps, self.wall())
        return self.path


def _say(cfg: TrainConfig, stream, msg: str) -> None:
    if not cfg.quiet:
        print(f"lipgan: {msg}", file=stream or sys.stderr)
