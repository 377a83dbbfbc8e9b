"""Training: configuration, method presets, the GAN trainer, the run loop, data parallelism.

- :mod:`~lipgan.train.config`: typed configurations (:class:`TrainConfig`), YAML, CLI flags;
- :mod:`~lipgan.train.presets`: method presets with their sources, :func:`resolve`, ``methods()``;
- :mod:`~lipgan.train.losses`, :mod:`~lipgan.train.device`, :mod:`~lipgan.train.rng`;
- :mod:`~lipgan.train.gan`: :class:`GANTrainer`, the step arithmetic (no I/O);
- :mod:`~lipgan.train.loop`: :class:`Session` and :func:`train`, the run folder around the steps
  (:mod:`~lipgan.train.session_io`: resume checks, checkpoints, signals;
  :mod:`~lipgan.train.budget`, :mod:`~lipgan.train.summary`: measurement budget, summary);
- :mod:`~lipgan.train.distributed`: the same run on N processes (DDP).

The names below are imported on first use (PEP 562), so ``lipgan.train.config`` stays light.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "TrainConfig": "config",
    "PRESETS": "presets",
    "methods": "presets",
    "resolve": "presets",
    "LOSSES": "losses",
    "Loss": "losses",
    "native_bf16": "device",
    "resolve_device": "device",
    "resolve_precision": "device",
    "isolated_rng": "rng",
    "GANTrainer": "gan",
    "NonFiniteLoss": "loop",
    "Session": "loop",
    "TimeLimitReached": "loop",
    "default_out": "loop",
    "train": "loop",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
