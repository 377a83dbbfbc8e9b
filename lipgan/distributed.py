"""Kept for code that imports ``lipgan.distributed``: now :mod:`lipgan.train.distributed` (the
trainer) and :mod:`lipgan.train.launch` (the entry points)."""

from __future__ import annotations

from lipgan.train.distributed import DistributedTrainer, is_main_process, replicas_in_sync
from lipgan.train.launch import launch, main_from_env, maybe_run

__all__ = [
    "DistributedTrainer", "is_main_process", "launch", "main_from_env", "maybe_run",
    "replicas_in_sync",
]  # fmt: skip
