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
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lipgan import constraints as C
from lipgan import lipschitz, models
from lipgan.errors import LipganError
from lipgan.train.config import TrainConfig
from lipgan.train.device import resolve_device
from lipgan.train.ema import GeneratorEMA
from lipgan.train.losses import LOSSES, OPTIMIZERS
from lipgan.train.presets import resolve
from lipgan.train.rng import isolated_rng, rng_state, set_rng_state

#: Version of the checkpoint layout GANTrainer.state_dict writes (1: before the constraint
#: protocol had state_dict/spec; still read).
STATE_FORMAT = 2


class GANTrainer:
    """Networks, constraint, optimizers and RNG streams of one run, and the step arithmetic.

    No I/O happens here, so a distributed or benchmark driver can call the steps directly: a
    DistributedDataParallel version wraps the networks into ``d_forward`` / ``g_forward`` (the
    penalties take input gradients only, then one backward of the whole loss, which DDP allows),
    passes each rank its part of the global batch through ``train_step(next_real=...)`` from
    seeded indices, and keeps :class:`Session` (logging, checkpoints) on rank 0.
    RNG streams, each its own ``torch.Generator`` so that logging never shifts training:
    ``data_gen`` (batch indices), ``noise_gen`` (z), ``penalty_gen`` (the constraint's draws,
    e.g. interpolation weights), ``measure_gen`` (measurements).
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
        self.penalty_gen = torch.Generator(self.device).manual_seed(cfg.seed + 4)
        #: where the penalty's batch sits in the global batch (set by data-parallel trainers)
        self.shard: C.Shard | None = None

        self.gen_kwargs = {"width": cfg.width, "z_dim": cfg.z_dim}
        if cfg.generator_norm != "none":  # only then: older checkpoints name no norm
            self.gen_kwargs["norm"] = cfg.generator_norm
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
        # Both methods must be recordable (rebuilt by name on resume) before any step is taken.
        self.specs = {
            "constraint": C.checked_spec(self.constraint),
            "generator_constraint": C.checked_spec(self.gen_constraint),
        }
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.generator = self.gen_constraint.attach(self.generator)
        self.generator = self.generator.to(self.device, memory_format=fmt)
        self.critic = self.constraint.attach(self.critic).to(self.device, memory_format=fmt)
        self.memory_format = fmt
        self._first_forward()
        # Project onto the constraint's set once before training (clipping, orthonormalization),
        # so the critic the first generator step sees is already constrained.
        with torch.no_grad():
            self.constraint.after_step(self.critic)
            self.gen_constraint.after_step(self.generator)
        self.generator.train()
        self.critic.train()

        make = OPTIMIZERS[cfg.optimizer]
        wd_d = float(cfg.weight_decay or 0.0) + float(self.constraint.weight_decay)
        wd_g = float(self.gen_constraint.weight_decay)
        self.opt_d = make(self.critic.parameters(), cfg.lr_d, cfg.beta1, cfg.beta2, wd_d)
        self.opt_g = make(self.generator.parameters(), cfg.lr_g, cfg.beta1, cfg.beta2, wd_g)
        self.loss = LOSSES[cfg.loss]
        self.lr_scale = 1.0
        self.step = 0  # generator steps done
        self.critic_steps = 0

        # Forward functions: compiled where correct (a critic whose penalty takes input
        # gradients never is: torch.compile does not differentiate twice).
        self.g_forward: Callable = self.generator
        self.d_forward: Callable = self.critic
        # What the penalty differentiates through: never a compiled module (double backward);
        # a DDP driver may put its wrapped critic here.
        self.penalty_critic: nn.Module = self.critic
        if cfg.compile:
            self.g_forward = torch.compile(self.generator)
            if not self.constraint.needs_input_grad:
                self.d_forward = torch.compile(self.critic)
        #: a moving average of the generator's weights (cfg.ema > 0), never read by training
        self.ema = self._new_ema() if cfg.ema else None

        self.batches = None
        if images is not None:
            self.batches = BatchSource(
                images, generator=self.data_gen, scale="tanh", device=self.device
            )

    def _new_ema(self) -> GeneratorEMA:
        return GeneratorEMA(self.generator, self.cfg.ema, self.cfg.ema_rampup or None)

    @torch.no_grad()
    def _first_forward(self) -> None:
        """One eval-mode forward of both networks (nothing updated): layers that learn their
        input shape there (operator-mode spectral norm) can then be read, exported, bounded."""
        self.generator.eval()
        self.critic.eval()
        try:
            z = torch.zeros(1, self.z_dim, device=self.device)
            self.critic(self._prep(self.generator(z).float()))
        finally:
            self.generator.train()
            self.critic.train()

    def _build(self, kind: str) -> nn.Module:
        kw = self.gen_kwargs if kind == "generator" else self.critic_kwargs
        if models.default_option(kind, self.cfg.model, "z_dim") is None:
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
        Lazy penalty (``penalty_every`` k > 1; Karras et al. 2020, StyleGAN2's lazy R1): the
        penalty only on critic steps ``0, k, 2k, ...`` (counted over the run, so a resume keeps
        the schedule) and weighted ``k``, the same penalty per critic step on average.
        Returns detached scalars: wasserstein, loss_d (with penalty), penalty (as added).
        """
        b = real.shape[0]
        k = int(self.cfg.penalty_every or 1)
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():
            scores = self.d_forward(torch.cat([real, fake])).float()
            s_real, s_fake = scores[:b], scores[b:]
            loss = self.loss.critic(s_real, s_fake)
            pen = None
            if self.critic_steps % k == 0:
                pen = self.constraint.penalty(
                    self.penalty_critic, real, fake, generator=self.penalty_gen, shard=self.shard
                )
                if pen is not None and k > 1:
                    pen = pen * k
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
        if self.ema is not None:
            self.ema.update(self.generator, self.step + 1, self.cfg.batch_size)
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
    def sample(self, z: torch.Tensor, ema: bool = False) -> torch.Tensor:
        """Samples ``(N, C, H, W)`` in eval mode (no BN statistics or SN iteration updated); with
        ``ema`` from the generator's moving average where the run keeps one."""
        g = self.ema.module if ema and self.ema is not None else self.generator
        was = g.training
        g.eval()
        try:
            return torch.cat([g(c).float() for c in z.split(256)])
        finally:
            g.train(was)

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
    def layer_norms(self) -> tuple[list[tuple[str, float | None, float | None]], float]:
        """Per-layer operator norms and the product bound (:func:`lipgan.lipschitz.upper_bounds`).

        ``product_bound = prod_l ||A_l||_2`` (activations 1-Lipschitz), a certified upper bound
        of the critic's Lipschitz constant. Returns ``([(layer, operator_norm, reshaped_norm),
        ...], product_bound)``. A critic the analysis cannot bound raises its LipganError.
        """
        was = self.critic.training
        self.critic.eval()
        shape = tuple(self.last_real.shape[1:]) if hasattr(self, "last_real") else (1, 28, 28)
        try:
            upper, table = lipschitz.upper_bounds(self.critic, shape, lipsdp=False, dense_limit=0)
        finally:
            self.critic.train(was)
        rows = [(r["name"], r["operator"], r["reshaped"]) for r in table]
        return [r for r in rows if r[1] is not None or r[2] is not None], upper["operator_product"]

    # ---------------------------------------------------------------- state
    def set_lr_scale(self, scale: float) -> None:
        self.lr_scale = float(scale)
        for opt, lr in ((self.opt_d, self.cfg.lr_d), (self.opt_g, self.cfg.lr_g)):
            for group in opt.param_groups:
                group["lr"] = lr * self.lr_scale

    def streams(self) -> dict[str, torch.Generator]:
        """The run's own RNG streams by name (their states go into the checkpoint)."""
        return {
            "data": self.data_gen,
            "noise": self.noise_gen,
            "measure": self.measure_gen,
            "penalty": self.penalty_gen,
        }

    def models(self) -> dict:
        """What the checkpoint says it holds: architectures and the two constraints' specs."""
        return {
            "generator": {"name": self.cfg.model, "kwargs": dict(self.gen_kwargs)},
            "critic": {"name": self.cfg.model, "kwargs": dict(self.critic_kwargs)},
            **self.specs,
        }

    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit: weights, optimizers, counters, RNG states,
        and what each constraint keeps outside the modules (``Constraint.state_dict``).

        Only tensors, numbers, strings, lists and dicts, so ``weights_only=True`` loads it.
        """
        state = {
            "state_format": STATE_FORMAT,
            "step": self.step,
            "critic_steps": self.critic_steps,
            "lr_scale": self.lr_scale,
            "models": self.models(),
            "generator": self.generator.state_dict(),
            "critic": self.critic.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "rng": rng_state(self.streams()),
            "extra": {
                "critic": self.constraint.state_dict(self.critic),
                "generator": self.gen_constraint.state_dict(self.generator),
            },
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def check_compatible(self, state: dict, source: str = "checkpoint") -> None:
        """LipganError when ``state`` belongs to another architecture or method."""
        mine, theirs = self.models(), state.get("models")
        if not _same_models(theirs, mine):
            raise LipganError(
                f"{source} is of another model: it holds {_describe(theirs)}, this run trains "
                f"{_describe(mine)}; resume it with its own run folder's config"
            )

    def load_state_dict(self, state: dict, source: str = "checkpoint") -> None:
        """Restore :meth:`state_dict`; LipganError (and nothing changed) when it does not fit."""
        version = state.get("state_format", 1)
        if not isinstance(version, int) or not 1 <= version <= STATE_FORMAT:
            raise LipganError(
                f"{source} has checkpoint state format {version!r}, this lipgan reads formats 1 "
                f"to {STATE_FORMAT}; resume it with the lipgan version that wrote it"
            )
        self.check_compatible(state, source)
        # A mismatch is raised before anything but the weights changed; callers (resume) then
        # discard this trainer, and the run folder has not been touched yet.
        try:
            for mod, key in ((self.generator, "generator"), (self.critic, "critic")):
                mod.load_state_dict(state[key], strict=True)
            self.opt_g.load_state_dict(state["opt_g"])
            self.opt_d.load_state_dict(state["opt_d"])
            if self.ema is not None and "ema" in state:
                self.ema.load_state_dict(state["ema"])
            elif self.ema is not None:  # a checkpoint without one: average from here on
                self.ema = self._new_ema()
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise LipganError(f"{source} does not fit this run's networks: {first}") from None
        extra = state.get("extra", {})
        if version < 2:
            extra = {k: _v1_extra(v, c) for k, v, c in (
                ("critic", extra.get("critic"), self.constraint),
                ("generator", extra.get("generator"), self.gen_constraint),
            )}  # fmt: skip
        self.constraint.load_state_dict(self.critic, extra.get("critic") or {})
        self.gen_constraint.load_state_dict(self.generator, extra.get("generator") or {})
        self.step = int(state["step"])
        self.critic_steps = int(state["critic_steps"])
        self.set_lr_scale(float(state.get("lr_scale", 1.0)))
        set_rng_state(state["rng"], self.streams())


def _same_models(theirs: Any, mine: dict) -> bool:
    """Whether a checkpoint's ``models`` describe this trainer's; a format-1 checkpoint names
    each constraint by its registry name (or comma-separated names) instead of a spec."""
    if not isinstance(theirs, dict):
        return False
    theirs = dict(theirs)
    for key in ("constraint", "generator_constraint"):
        if isinstance(theirs.get(key), str):
            theirs[key] = _spec_names(theirs[key])
            mine = {**mine, key: _spec_names(mine[key])}
    return theirs == mine


def _spec_names(spec: dict | str | None) -> str:
    if not isinstance(spec, (dict, str)):
        return str(spec)
    if isinstance(spec, str):
        return ",".join(n.strip() for n in spec.split(",")) if spec != "None" else "none"
    if spec["name"] == "compose":
        return ",".join(_spec_names(m) for m in spec["options"]["methods"])
    return spec["name"]


def _v1_extra(saved: dict | None, constraint: C.Constraint) -> dict:
    """A format-1 checkpoint's hidden state (``{"stale": [...], "constraints": [per method]}``)
    in the layout of ``constraint.state_dict``."""
    if not saved:
        return {}
    stale = {"stale": saved.get("stale", [])}
    parts = [{**stale, **p.get("own", {}), **p} for p in saved.get("constraints", [])]
    for p in parts:
        p.pop("own", None)
    if isinstance(constraint, C.Compose):
        return {"methods": parts or [stale] * len(constraint.methods)}
    return parts[0] if parts else stale


def _describe(m: dict | None) -> str:
    if not isinstance(m, dict):
        return "an unknown model"
    g = m.get("critic", {})
    return f"{g.get('name')} {g.get('kwargs')} with constraint {_spec_names(m.get('constraint'))}"
