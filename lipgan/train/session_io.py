"""What a run :class:`~lipgan.train.loop.Session` reads and writes around its steps.

The checks a resume must pass before its folder is touched (:func:`check_resume`: a resumed run
keeps its :data:`IDENTITY_FIELDS`), the checkpoint with its exports in the order that survives a
kill (:func:`write_checkpoint`), and the SIGINT/SIGTERM handling that lets the step in progress
finish before the run checkpoints and stops (:func:`stop_signals`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from lipgan import constraints as C
from lipgan import runs
from lipgan.errors import LipganError
from lipgan.train.config import TrainConfig
from lipgan.train.gan import GANTrainer
from lipgan.train.presets import resolve
from lipgan.train.rng import isolated_rng

#: Fields a resumed run keeps: changing one would make it another run (or relabel it).
IDENTITY_FIELDS = (
    "method", "recipe", "model", "generator_norm", "width", "z_dim", "dataset", "seed",
    "constraint", "constraint_options", "generator_constraint", "generator_constraint_options",
    "loss", "optimizer",
)  # fmt: skip


def default_out(cfg: TrainConfig) -> str:
    """``runs/<method>-<model>-<YYYYmmdd-HHMMSS>``: a new run's folder when ``--out`` is unset."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{cfg.method}-{cfg.model}-{stamp}")


def with_constraint(cfg: TrainConfig, constraint: C.Constraint | None) -> TrainConfig:
    """``cfg`` naming ``constraint`` (a user's object) by its spec, so config.yaml records the
    method that trains and a resume rebuilds it; unrecordable objects are a LipganError."""
    if constraint is None:
        return cfg
    spec = C.checked_spec(constraint)
    return cfg.replace(constraint=spec["name"], constraint_options=dict(spec["options"]))


def check_resume(cfg: TrainConfig, stored: dict, path: Path) -> None:
    """LipganError when ``cfg`` would change what the run in ``path`` (its config ``stored``)
    is: its method, architecture, data, seed or constraints, or its folder."""
    try:
        before = resolve(TrainConfig.from_dict({**stored, "out": str(path)}))
    except LipganError as exc:
        raise LipganError(f"{path}/config.yaml: {exc}") from None
    for name in IDENTITY_FIELDS:
        old, new = getattr(before, name), getattr(cfg, name)
        if old != new:
            raise LipganError(
                f"{path} was trained with {name} {old!r}, not {new!r}; a resumed run keeps it "
                "(start a new run with another --out to change it)"
            )


def exports(trainer: GANTrainer) -> dict[str, runs.Export]:
    """The generator, its EMA (when kept) and the critic as the run folder exports them
    (safetensors + rebuild info; ``generator_ema``, a generator: RUN/generator_ema.safetensors)."""
    model = trainer.cfg.model
    out = {
        "generator": runs.Export(trainer.generator, model, dict(trainer.gen_kwargs)),
        "critic": runs.Export(trainer.critic, model, dict(trainer.critic_kwargs)),
    }
    if trainer.ema is not None:
        out["generator_ema"] = runs.Export(trainer.ema.module, model, dict(trainer.gen_kwargs))
    return out


@isolated_rng()
def write_checkpoint(
    run: runs.RunFolder, trainer: GANTrainer, extra: dict[str, Any], keep: bool
) -> None:
    """The exports, then ``last.pt`` naming them (RunFolder.save_checkpoint's order): a kill
    between the two leaves the older checkpoint, and its resume rewrites the exports.
    ``extra``: the loop's own state (wall clock, budget, config), stored beside the trainer's."""
    state = trainer.state_dict()
    state.update(extra)
    run.save_checkpoint(state, exports(trainer), keep=keep)


class _Stoppable(Protocol):
    signal: int | None


@contextlib.contextmanager
def stop_signals(owner: _Stoppable) -> Iterator[None]:
    """SIGINT/SIGTERM set ``owner.signal`` (the loop then checkpoints and stops); a second one
    interrupts at once. Only in the main thread, and never over an ignored signal."""
    # Under DDP every rank must stop at the same step; torchrun's signals reach them all.
    if threading.current_thread() is not threading.main_thread() or dist.is_initialized():
        yield
        return

    def handler(signum, frame):
        if owner.signal is not None:
            raise KeyboardInterrupt
        owner.signal = signum

    before = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            before[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in before.items():
            signal.signal(sig, old)
