"""Random-number streams: running a block without moving the global RNGs; saving them."""

from __future__ import annotations

import contextlib
import random

import torch


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


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_rng_state(s: list) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))

