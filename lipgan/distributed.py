"""Kept for code that imports ``lipgan.distributed``: now :mod:`lipgan.train.distributed`."""

from __future__ import annotations

from lipgan.train.distributed import *  # noqa: F403
from lipgan.train.distributed import __all__  # noqa: F401
