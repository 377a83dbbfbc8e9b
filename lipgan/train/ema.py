"""An exponential moving average of a generator's weights, for sampling and evaluation.

Averaging the generator's parameters over the last training steps gives better samples than the
last iterate (Yazici et al., ICLR 2019, "The Unusual Effectiveness of Averaging in GAN Training":
better FID on every dataset and objective they tried); every StyleGAN keeps such a copy,
``G_ema`` (Karras et al. 2019, 2020). Training never reads the average: it is a second copy of the
generator, updated after each generator step and used by ``sample``/``eval``/FID.

Decay (StyleGAN2-ADA's ``ema_kimg`` / ``ema_rampup``): a half-life ``h`` in training images, so
that after ``h`` images an old weight's share has halved whatever the batch size:

    beta_t = 0.5 ** (B / h_t),   h_t = min(h, rampup * t * B)   (no ramp: h_t = h)

with ``t`` generator steps done and batch size ``B``. The ramp shortens the half-life early on,
so the average is not dragged back to the random initialisation (after t steps the average
covers about the last ``rampup`` of training). Update: ``ema <- lerp(ema, w, 1 - beta_t)`` =
``beta_t * ema + (1 - beta_t) * w``.

Buffers. Batch-norm running statistics (``running_mean``, ``running_var``) are averaged with
the same ``beta_t`` (``buffers="average"``, the default): to first order in the weight changes
the activation statistics of the averaged weights are the average of the statistics, so the
averaged statistics belong to the averaged network, while the raw network's statistics belong to
its last iterate (measured in docs/recipes.md). Every other buffer is copied: integer counters
(``num_batches_tracked``) and spectral normalization's power-iteration vectors ``u``, ``v`` (a
mean of unit vectors is not a unit vector). ``buffers="copy"`` copies every buffer, as
StyleGAN2's ``G_ema`` does (it has no batch norm).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from lipgan.errors import LipganError

__all__ = ["GeneratorEMA", "unwrap"]

_AVERAGED_BUFFERS = ("running_mean", "running_var")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside ``torch.compile`` (``_orig_mod``) and DDP/DataParallel
    (``.module``) wrappers, in any nesting."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(
            model, (nn.parallel.DistributedDataParallel, nn.parallel.DataParallel)
        ) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _averaged(name: str, module: nn.Module, buffer: torch.Tensor) -> bool:
    return (
        isinstance(module, nn.modules.batchnorm._NormBase)
        and name in _AVERAGED_BUFFERS
        and buffer.is_floating_point()
    )


class GeneratorEMA:
    """A moving average of ``model``'s parameters (and batch-norm statistics) in its own copy.

    ``half_life_images``: the half-life ``h`` in training images (StyleGAN2-ADA's default
    ``ema_kimg`` is 10 * B / 32 thousand images; lipgan's recipes use the value measured in
    docs/recipes.md). ``rampup``: the ramp ``h_t = min(h, rampup * t * B)``, ``None`` for none.
    ``buffers``: ``"average"`` (batch-norm running stats averaged, the rest copied) or ``"copy"``.

    :attr:`module` is the averaged copy, in eval mode and without gradients. ``update(model,
    step, batch_size)`` after every generator step; ``state_dict()`` / ``load_state_dict()``
    resume bit for bit (the copy's tensors are stored exactly; the decay is a function of the
    ``step`` passed in, so a resumed run performs the same float operations in the same order).
    """

    def __init__(
        self,
        model: nn.Module,
        half_life_images: float = 10_000.0,
        rampup: float | None = 0.05,
        buffers: str = "average",
    ) -> None:
        if not half_life_images > 0 or not math.isfinite(half_life_images):
            raise LipganError(f"EMA half_life_images must be positive, got {half_life_images!r}")
        if rampup is not None and not rampup > 0:
            raise LipganError(f"EMA rampup must be positive or None, got {rampup!r}")
        if buffers not in ("average", "copy"):
            raise LipganError(f"EMA buffers must be 'average' or 'copy', not {buffers!r}")
        self.half_life_images = float(half_life_images)
        self.rampup = None if rampup is None else float(rampup)
        self.buffers = buffers
        self.module = copy.deepcopy(unwrap(model))
        self.module.eval()
        self.module.requires_grad_(False)
        self.updates = 0  # update() calls so far (for the record; the decay uses `step`)
        self.last_beta: float | None = None

    # ------------------------------------------------------------------ decay
    def beta(self, step: int, batch_size: int) -> float:
        """``beta_t = 0.5 ** (B / h_t)`` after ``step`` generator steps of ``batch_size`` images."""
        if step < 1 or batch_size < 1:
            raise LipganError(f"EMA step and batch_size must be >= 1, got {step}, {batch_size}")
        h = self.half_life_images
        if self.rampup is not None:
            h = min(h, self.rampup * step * batch_size)
        return 0.5 ** (batch_size / h)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, model: nn.Module, step: int, batch_size: int) -> float:
        """Move the average toward ``model`` after generator step ``step`` (1-based: the number
        of generator steps done, this one included); returns the ``beta_t`` used."""
        src = unwrap(model)
        beta = self.beta(step, batch_size)
        weight = 1.0 - beta
        ema_params = dict(self.module.named_parameters())
        src_params = dict(src.named_parameters())
        if ema_params.keys() != src_params.keys():
            raise LipganError(
                "the EMA copy and the generator have different parameters; build the EMA from "
                "this generator (after attaching its constraint)"
            )
        for name, p in src_params.items():
            e = ema_params[name]
            e.lerp_(p.detach().to(e.dtype), weight)
        src_modules = dict(src.named_modules())
        for mod_name, mod in self.module.named_modules():
            twin = src_modules.get(mod_name)
            if twin is None:
                raise LipganError(f"the generator has no module {mod_name!r} that the EMA has")
            for b_name, b in mod.named_buffers(recurse=False):
                s = getattr(twin, b_name)
                if s is None or b is None:
                    continue
                if self.buffers == "average" and _averaged(b_name, mod, b):
                    b.lerp_(s.detach().to(b.dtype), weight)
                else:
                    if b.shape != s.shape:  # lazily sized buffers (operator-mode SN's u, v)
                        setattr(mod, b_name, s.detach().clone())
                    else:
                        b.copy_(s.detach())
        self.updates += 1
        self.last_beta = beta
        return beta

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to resume: the copy's tensors (cloned) and the settings."""
        return {
            "module": {k: v.detach().clone() for k, v in self.module.state_dict().items()},
            "half_life_images": self.half_life_images,
            "rampup": self.rampup,
            "buffers": self.buffers,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; the settings must match this object's."""
        for key in ("half_life_images", "rampup", "buffers"):
            if state.get(key) != getattr(self, key):
                raise LipganError(
                    f"the checkpoint's EMA {key} is {state.get(key)!r}, this run's is "
                    f"{getattr(self, key)!r}; resume with the checkpoint's settings"
                )
        saved = state["module"]
        for mod_name, mod in self.module.named_modules():
            for b_name, b in list(mod.named_buffers(recurse=False)):
                key = f"{mod_name}.{b_name}" if mod_name else b_name
                if b is not None and key in saved and saved[key].shape != b.shape:
                    # a lazily sized buffer (operator-mode SN's u, v) not yet sized here
                    setattr(mod, b_name, saved[key].clone())
        self.module.load_state_dict(saved)
        self.updates = int(state["updates"])

    def __repr__(self) -> str:
        return (
            f"GeneratorEMA(half_life_images={self.half_life_images:g}, rampup={self.rampup}, "
            f"buffers={self.buffers!r}, updates={self.updates})"
        )
