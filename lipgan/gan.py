"""Kept for code that imports ``lipgan.gan``: the trainer now lives in :mod:`lipgan.train`."""

from __future__ import annotations

from lipgan.train import *  # noqa: F403
from lipgan.train import __all__  # noqa: F401
