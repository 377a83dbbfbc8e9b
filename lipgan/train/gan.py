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
import inspect
import math
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lipgan import constraints as C
from lipgan import models
from lipgan.errors import LipganError
from lipgan.train.config import TrainConfig
from lipgan.train.device import resolve_device
from lipgan.train.losses import LOSSES, OPTIMIZERS
from lipgan.train.presets import resolve
from lipgan.train.rng import _python_rng_state, _set_python_rng_state, isolated_rng


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

        make = OPTIMIZERS[cfg.optimizer]
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
