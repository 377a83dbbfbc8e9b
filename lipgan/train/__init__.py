"""Training: configuration, method presets, the GAN trainer, the run loop, data parallelism.

``config`` (:class:`TrainConfig`, :func:`resolve`), ``presets`` (:data:`PRESETS`), ``losses``,
``device``, ``rng``, ``gan`` (:class:`GANTrainer`: the step arithmetic, no I/O), ``loop``
(:class:`Session` and :func:`train`: the run folder around the steps) and ``distributed``.
"""

from __future__ import annotations

from lipgan.train.config import TrainConfig, resolve
from lipgan.train.device import native_bf16, resolve_device, resolve_precision
from lipgan.train.gan import GANTrainer
from lipgan.train.loop import NonFiniteLoss, Session, TimeLimitReached, default_out, train
from lipgan.train.losses import LOSSES, Loss
from lipgan.train.presets import PRESETS
from lipgan.train.rng import isolated_rng

__all__ = [
    "LOSSES",
    "PRESETS",
    "GANTrainer",
    "Loss",
    "NonFiniteLoss",
    "Session",
    "TimeLimitReached",
    "TrainConfig",
    "default_out",
    "isolated_rng",
    "native_bf16",
    "resolve",
    "resolve_device",
    "resolve_precision",
    "train",
]
