"""Kept for code that imports ``lipgan.gan``: the trainer now lives in :mod:`lipgan.train`."""

from __future__ import annotations

from lipgan.train.config import TrainConfig
from lipgan.train.device import native_bf16, resolve_device, resolve_precision
from lipgan.train.gan import GANTrainer
from lipgan.train.loop import NonFiniteLoss, Session, TimeLimitReached, default_out, train
from lipgan.train.losses import LOSSES, Loss
from lipgan.train.presets import PRESETS, methods, resolve
from lipgan.train.rng import isolated_rng

__all__ = [
    "LOSSES", "PRESETS", "GANTrainer", "Loss", "NonFiniteLoss", "Session", "TimeLimitReached",
    "TrainConfig", "default_out", "isolated_rng", "methods", "native_bf16", "resolve",
    "resolve_device", "resolve_precision", "train",
]  # fmt: skip
