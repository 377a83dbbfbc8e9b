"""Data-parallel training with torch's DistributedDataParallel (gloo on CPU, NCCL on CUDA).

N processes train one run as one process would on the same global batch ``B``: every rank draws
the same global streams (batch indices, z, the penalty's per-sample draws) and keeps its own
``B / N`` rows; DDP averages the gradients over ranks, and since every loss is a per-sample mean
over equal slices,

    (1/N) sum_r mean_{i in slice r} l_i = mean_{i < B} l_i,

the averaged gradient is the 1-process gradient of the global batch. Every rank applies the same
averaged gradient to the same weights, so weights, optimizer state, RNG streams and the
spectral-norm vectors u, v stay identical on all ranks; one checkpoint (written by rank 0)
therefore describes every rank, and resume is a plain load on each.

Logging, samples, checkpoints and exports happen on rank 0 only, through
:class:`lipgan.train.loop.Session`, with the :class:`DistributedTrainer` in place of its trainer;
:mod:`lipgan.train.launch` starts the processes. See ``docs/distributed.md``.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lipgan import constraints as C
from lipgan.errors import LipganError
from lipgan.train.config import TrainConfig
from lipgan.train.gan import GANTrainer
from lipgan.train.presets import resolve

__all__ = [
    "DistributedTrainer",
    "is_main_process",
    "replicas_in_sync",
]


# --------------------------------------------------------------------------- helpers


def _ddp(module: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """Wrap ``module`` in DDP without buffer broadcasts in ``forward``.

    Why no per-forward broadcast: a critic step runs two forwards through the critic (scores, and
    the gradient penalty's forward at the interpolates) before one backward. DDP's default
    copies rank 0's buffers in place at each forward; a buffer that the first forward's graph
    saved is then "modified by an inplace operation" at backward (pytorch #22095). lipgan's
    spectral norm clones u and v into its graph, so it would survive, but a user's constraint
    need not. The broadcast is also unnecessary here: buffers are synced once at construction (DDP's
    init sync) and every rank then runs the same power iteration on the same weights, so u and v
    stay identical without it (:func:`replicas_in_sync` checks that, and repairs it if it ever
    were not so).
    """
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    kw: dict[str, Any] = {}
    if device.type == "cuda":
        kw["device_ids"] = [device.index]
    if "forward_sync_buffers" in params:  # torch >= 2.13: still syncs buffers at init
        kw["forward_sync_buffers"] = False
    else:
        kw["broadcast_buffers"] = False  # older torch: this also skips the init sync (see below)
    # A conv weight with one input channel (MNIST's first layer) gets gradients whose stride on
    # that size-1 dimension differs from DDP's bucket view; the layouts are the same memory
    # order, so torch's "Grad strides do not match bucket view strides" warning is noise here.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ddp = nn.parallel.DistributedDataParallel(module, **kw)
    if "forward_sync_buffers" not in params:
        with torch.no_grad():
            for b in module.buffers():
                dist.broadcast(b, 0)
    return ddp


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (collective)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def is_main_process() -> bool:
    """True on rank 0 of a distributed run (``RANK`` of torchrun), and outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


# --------------------------------------------------------------------------- trainer


class DistributedTrainer(GANTrainer):
    """A :class:`lipgan.train.gan.GANTrainer` whose critic and generator updates are data parallel.

    Needs an initialized default process group. ``cfg.batch_size`` is the GLOBAL batch ``B``;
    each of the ``world_size`` ranks takes rows ``[rank * b, (rank + 1) * b)``, ``b = B / N``, of
    every real batch, every z batch and every interpolation-weight draw, all drawn in full from
    seeded streams that are identical on every rank. ``self.critic`` and ``self.generator`` stay
    the plain modules (checkpoints, exports, measurements); the DDP wrappers are
    ``critic_ddp`` and ``generator_ddp``. The scalars :meth:`train_step` returns are averaged
    over ranks, i.e. those of the global batch.
    """

    def __init__(
        self, cfg: TrainConfig, images: torch.Tensor | None = None, *, check_every=None, **kw
    ) -> None:
        """``kw``: those of :class:`GANTrainer` (device, constraint, generator, critic)."""
        if not (dist.is_available() and dist.is_initialized()):
            raise LipganError(
                "DistributedTrainer needs torch.distributed initialized; run it under torchrun "
                "or through lipgan.train.distributed.launch"
            )
        cfg = resolve(cfg)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if cfg.batch_size % self.world_size:
            raise LipganError(
                f"--batch-size {cfg.batch_size} is the global batch and must split evenly over "
                f"{self.world_size} processes; use a multiple of {self.world_size}"
            )
        super().__init__(cfg, images, **kw)
        self.local_batch = cfg.batch_size // self.world_size
        self.rows = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        #: replicas compared every this many generator steps (0: never); default: checkpoints
        self.check_every = int(cfg.checkpoint_every if check_every is None else check_every)
        self.resynced = 0

        for name in ("generator", "critic"):
            mod = getattr(self, name)
            if _has_batchnorm(mod):
                if self.device.type == "cuda":
                    # Batch statistics over the global batch, as one process computes them.
                    setattr(self, name, nn.SyncBatchNorm.convert_sync_batchnorm(mod))
                elif self.rank == 0:
                    warnings.warn(
                        f"the {name} has BatchNorm: on CPU its batch statistics are per rank "
                        "(torch's SyncBatchNorm needs CUDA), so the run is not identical to "
                        "one process",
                        stacklevel=2,
                    )
        # The plain forwards GANTrainer chose (compiled where it may be).
        self._d_local, self._g_local = self.d_forward, self.g_forward
        self.critic_ddp = _ddp(self.critic, self.device)
        self.generator_ddp = _ddp(self.generator, self.device)
        # The critic step's score forward goes through DDP: its backward all-reduces the critic's
        # gradients, those of the penalty included (the penalty's forward runs on the plain
        # critic, whose parameters are the same tensors, so one backward of loss + penalty
        # reaches each parameter's gradient hook once with the summed gradient).
        self.d_forward = self.critic_ddp
        self.g_forward = self.generator_ddp
        if cfg.compile:
            self.g_forward = torch.compile(self.generator_ddp)
            if self._d_local is not self.critic:  # GANTrainer compiled it: no double backward
                self.d_forward = torch.compile(self.critic_ddp)
        # The penalty draws its per-sample numbers for the global batch from penalty_gen (the
        # same stream on every rank) and keeps this rank's rows: those of one process.
        self.shard = C.Shard(self.rows, cfg.batch_size)

    def close(self) -> None:
        """Drop the DDP wrappers; call it before ``destroy_process_group``.

        Why: a DDP reducer that outlives the process group becomes the group's last owner and
        destroys it while holding the GIL, and torch's gloo teardown can then deadlock with its
        own worker thread (seen here: ``~Reducer -> ~ProcessGroupGloo -> thread join`` while that
        thread waits for the GIL). Freed while the group is still registered, nothing blocks.
        """
        import gc

        self.d_forward, self.g_forward = self._d_local, self._g_local
        self.critic_ddp = self.generator_ddp = None
        gc.collect()

    # ---------------------------------------------------------------- steps
    def make_fakes(self, z: torch.Tensor) -> torch.Tensor:
        """This rank's fakes, through the plain generator (no gradient, so nothing to sync)."""
        ddp, self.g_forward = self.g_forward, self._g_local
        try:
            return super().make_fakes(z)
        finally:
            self.g_forward = ddp

    def generator_step(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """GANTrainer's generator step with ``z`` this rank's rows: G through DDP (its gradients
        are averaged), D plain (its weights get no gradient, so DDP must not wait for them)."""
        ddp, self.d_forward = self.d_forward, self._d_local
        try:
            return super().generator_step(z)
        finally:
            self.d_forward = ddp

    def train_step(self, next_real: Callable[[int], torch.Tensor] | None = None) -> dict:
        """One generator step with its critic steps on this rank's slice of the global batch.

        ``next_real(B)``, when given, must return the same global batch on every rank.
        Returns detached scalars averaged over ranks (those of the global batch).
        """
        if next_real is None and self.batches is None:
            raise LipganError("DistributedTrainer has no images; pass images= or next_real=")
        big, b, rows = self.cfg.batch_size, self.local_batch, self.rows
        n = self.n_critic_at(self.step)
        acc = None
        done = 0
        idx = None
        while done < n:
            chunk = min(n - done, 5)
            z = self.sample_z(chunk * big)  # the 1-process draw; keep this rank's rows
            z = z.view(chunk, big, -1)[:, rows].reshape(chunk * b, -1)
            for fake in self.make_fakes(z).split(b):
                if next_real is None:
                    idx = self.batches.indices(big)
                    real = self.batches.take(idx[rows])[0]
                else:
                    real = next_real(big)[rows]
                out = self.critic_step(self._prep(real), fake)
                acc = out if acc is None else {k: acc[k] + out[k] for k in acc}
            done += chunk
        if idx is not None and self.rank == 0:
            # measurements (gradient norms, layer shapes) on rank 0 see the whole global batch
            self.last_real = self._prep(self.batches.take(idx)[0])
        else:
            self.last_real = self._prep(real)
        out = {k: v / n for k, v in acc.items()}
        out.update(self.generator_step(self.sample_z(big)[rows]))
        self.step += 1
        out = self._average(out)
        if self.check_every and self.step % self.check_every == 0:
            self.resynced += replicas_in_sync(self, repair=True)
        return out

    def _average(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All-reduce the step's scalars (one collective) and, at logged steps, gather the
        penalty's per-sample gradient norms, so rank 0 logs the global batch's values."""
        keys = sorted(out)
        vals = torch.stack([out[k].float() for k in keys])
        dist.all_reduce(vals)
        vals /= self.world_size
        cfg = self.cfg
        if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
            gn = self.constraint.last_grad_norm
            if gn is not None and gn.shape[0] == self.local_batch:
                parts = [torch.empty_like(gn) for _ in range(self.world_size)]
                dist.all_gather(parts, gn.contiguous())
                self.constraint.last_grad_norm = torch.cat(parts)
        return {k: vals[i] for i, k in enumerate(keys)}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.device.type == "cuda":
            # the stream this rank's penalty draws from (get_rng_state_all would save every
            # device's, and another rank would restore the wrong one)
            state["rng"]["cuda_current"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict | None, source: str = "checkpoint") -> None:
        """Collective: every rank calls it; rank 0's ``state`` is sent to all (others may pass
        ``None``), so ranks without access to rank 0's files load the same state."""
        state = broadcast_object(state if self.rank == 0 else None)
        super().load_state_dict(state, source)
        cur = state.get("rng", {}).get("cuda_current")
        if cur is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(cur, self.device)


@torch.no_grad()
def replicas_in_sync(trainer: DistributedTrainer, repair: bool = False) -> int:
    """Compare every rank's parameters and buffers (u, v included) with rank 0's, exactly.

    Collective. Returns the number of ranks that differed (0 when all are identical). With
    ``repair``, rank 0's values are copied to every rank and rank 0 warns with the largest
    difference; the tensors are left untouched when they agree.
    """
    tensors = [
        t
        for mod in (trainer.critic, trainer.generator)
        for t in (*mod.parameters(), *mod.buffers())
        if t.numel()
    ]
    if not tensors:
        return 0
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    bad = torch.tensor([float(diff > 0)], device=flat.device)
    dist.all_reduce(bad)
    worst = diff.reshape(1).clone()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    n_bad = int(bad.item())
    if n_bad and repair:
        for t in tensors:
            dist.broadcast(t.data, 0)
        if trainer.rank == 0:
            warnings.warn(
                f"replicas had drifted (max |difference| {worst.item():.3g} on {n_bad} "
                "rank(s)); copied rank 0's weights and buffers to all",
                stacklevel=2,
            )
    return n_bad
