"""Random-number streams: running a block without moving the global RNGs; saving them all."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping

import numpy as np
import torch


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run a block without moving any global RNG (torch CPU/CUDA, python, numpy).

    Logging, measurements and exports run inside it, so a run's arithmetic does not depend on
    when it measures or saves (bit-identical resume needs exactly that).
    """
    py, npy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def rng_state(streams: Mapping[str, torch.Generator]) -> dict:
    """The state of the named ``streams`` and of every global RNG, as tensors, numbers and
    lists only (a ``weights_only`` checkpoint loads it)."""
    version, internal, gauss = random.getstate()
    npy = np.random.get_state()
    state = {name: g.get_state() for name, g in streams.items()}
    state.update(
        torch=torch.get_rng_state(),
        python=[version, list(internal), gauss],
        numpy=[npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping, streams: Mapping[str, torch.Generator]) -> None:
    """Restore :func:`rng_state`; a stream the state lacks (an older checkpoint) keeps its own
    seeded state."""
    for name, g in streams.items():
        if name in state:
            g.set_state(state[name])
    torch.set_rng_state(state["torch"])
    s = state["python"]
    random.setstate((s[0], tuple(s[1]), s[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4]))
