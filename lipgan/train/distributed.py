"""Data-parallel training with torch's DistributedDataParallel (gloo on CPU, NCCL on CUDA).

N processes train one run as one process would on the same global batch ``B``: every rank draws
the same global streams (batch indices, z, the penalty's interpolation weights) and keeps its own
``B / N`` rows; DDP averages the gradients over ranks, and since every loss is a per-sample mean
over equal slices,

    (1/N) sum_r mean_{i in slice r} l_i = mean_{i < B} l_i,

the averaged gradient is the 1-process gradient of the global batch. Every rank applies the same
averaged gradient to the same weights, so weights, optimizer state, RNG streams and the
spectral-norm vectors u, v stay identical on all ranks; one checkpoint (written by rank 0)
therefore describes every rank, and resume is a plain load on each.

Entry points:

- ``torchrun --nproc_per_node=N -m lipgan train [flags]`` (:func:`main_from_env` under torchrun);
- ``lipgan train --nproc N [flags]``: :func:`launch` starts N local processes;
- :func:`maybe_run` is what ``lipgan train`` calls; it returns ``None`` when the run is not
  distributed.

Logging, samples, checkpoints and exports happen on rank 0 only, through
:class:`lipgan.train.loop.Session`, with the :class:`DistributedTrainer` in place of its trainer.
See ``docs/distributed.md``.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lipgan import constraints as C
from lipgan.errors import LipganError
from lipgan.train.config import TrainConfig
from lipgan.train.gan import GANTrainer
from lipgan.train.loop import NonFiniteLoss
from lipgan.train.presets import resolve

__all__ = [
    "DistributedTrainer",
    "is_main_process",
    "launch",
    "main_from_env",
    "maybe_run",
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


def _broadcast_object(obj: Any, src: int = 0) -> Any:
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
        self,
        cfg: TrainConfig,
        images: torch.Tensor | None = None,
        *,
        device: torch.device | None = None,
        constraint: C.Constraint | None = None,
        check_every: int | None = None,
    ) -> None:
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
        super().__init__(cfg, images, device=device, constraint=constraint)
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
        state = _broadcast_object(state if self.rank == 0 else None)
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


# --------------------------------------------------------------------------- one rank's run


def _device_for(cfg: TrainConfig, local_rank: int, world: int) -> torch.device:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LipganError("--device cuda asked for, but torch sees no CUDA device; use cpu")
        if name != "cuda" and world > 1:
            raise LipganError(
                f"--device {name} with {world} processes: use --device cuda (each process "
                "takes cuda:LOCAL_RANK; choose the cards with CUDA_VISIBLE_DEVICES)"
            )
        index = local_rank if name == "cuda" else torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise LipganError(
                f"process with local rank {local_rank} has no CUDA device (torch sees "
                f"{torch.cuda.device_count()}); start at most that many processes per machine"
            )
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
        return dev
    if name != "cpu":
        raise LipganError(f"unknown device {cfg.device!r}; use auto, cpu or cuda")
    return torch.device("cpu")


def _run_rank(
    cfg: TrainConfig,
    resume: bool,
    rank: int,
    world: int,
    local_rank: int,
    init_method: str,
    local_world: int | None = None,
    stream=None,
) -> Path:
    """Train one rank of a run; every rank returns the run folder."""
    from lipgan import data
    from lipgan.train.loop import Session

    device = _device_for(cfg, local_rank, world)
    if cfg.threads <= 0 and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # torch's default (one thread per core) in each of N processes oversubscribes the cores;
        # torchrun sets OMP_NUM_THREADS=1 itself, which is then kept
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world or world)))
    own_group = not dist.is_initialized()
    if own_group:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, **kw)
    trainer = session = None
    try:
        images = data.load(cfg.dataset, data_dir=cfg.data_dir).train_images
        payload: dict[str, Any]
        if rank == 0:
            try:
                if cfg.max_time_s:
                    # Ranks would each read their own clock and could stop at different steps.
                    raise LipganError(
                        "--max-time-s is not supported with several processes; pass "
                        "--max-time-s 0 and bound the run with --steps"
                    )
                if cfg.batch_size % world:
                    raise LipganError(
                        f"--batch-size {cfg.batch_size} is the global batch and must split "
                        f"evenly over {world} processes; use a multiple of {world}"
                    )
                session = Session(cfg, resume=resume, stream=stream, images=images)
                ckpt = session.run_dir.last_checkpoint
                state = session.run_dir.load_checkpoint() if resume and ckpt.is_file() else None
                payload = {"cfg": session.cfg.to_dict(), "resume_state": state is not None}
            except LipganError as exc:
                payload, state = {"error": str(exc)}, None
        else:
            payload, state = {}, None
        payload = _broadcast_object(payload)
        if "error" in payload:
            raise LipganError(payload["error"])
        run_cfg = TrainConfig.from_dict(payload["cfg"])
        if rank:
            run_cfg = run_cfg.replace(quiet=True)
        trainer = DistributedTrainer(run_cfg, images, device=device)
        if payload["resume_state"]:
            trainer.load_state_dict(state, source=str(Path(run_cfg.out) / "checkpoints/last.pt"))
        if session is not None:
            # Session built a plain GANTrainer from the same seed (its step-0 checkpoint equals
            # this one's); from here on it drives the data-parallel one.
            session.trainer = trainer
            try:
                session.run()
            finally:
                session.close()
            path = session.finish()
        else:
            _follow(trainer, run_cfg)
            path = Path(run_cfg.out)
        dist.barrier()
        return path
    finally:
        if trainer is not None:
            trainer.close()  # before the group goes (see DistributedTrainer.close)
        if session is not None:
            session.trainer = None
        del trainer, session
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _follow(trainer: DistributedTrainer, cfg: TrainConfig) -> None:
    """The loop of ranks other than 0: the steps, and the collective part of Session's
    non-finite-loss handling (the averaged losses are the same on every rank, so every rank
    takes the same branch as rank 0)."""
    import math

    rollbacks = 0
    while trainer.step < cfg.steps:
        out = trainer.train_step()
        vals = torch.stack([out["wasserstein"], out["loss_d"], out["penalty"], out["loss_g"]])
        if all(math.isfinite(v) for v in vals.tolist()):
            continue
        if cfg.on_nan == "rollback" and rollbacks < cfg.max_rollbacks:
            rollbacks += 1
            trainer.load_state_dict(None)  # receives the checkpoint rank 0 reloads
            trainer.set_lr_scale(trainer.lr_scale * cfg.nan_lr_factor)
            continue
        raise NonFiniteLoss(f"non-finite loss at generator step {trainer.step} (see rank 0)")


# --------------------------------------------------------------------------- entry points


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise LipganError(
            f"environment variable {name} missing or not a number: main_from_env runs under "
            "torchrun (torchrun --nproc_per_node=N -m lipgan train ...)"
        ) from None


def main_from_env(cfg: TrainConfig, resume: bool = False, stream=None) -> Path:
    """Train ``cfg`` as one rank of a torchrun job (reads RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT); every rank returns the run folder."""
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return _run_rank(cfg, resume, rank, world, local_rank, "env://", local_world, stream)


def _spawn_entry(rank: int, world: int, init_method: str, cfg: dict, resume: bool, queue) -> None:
    # The whole group is on this machine; tell the children so (a launched child that calls
    # maybe_run again would then see it is already a rank).
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
    )
    try:
        path = _run_rank(TrainConfig.from_dict(cfg), resume, rank, world, rank, init_method, world)
    except LipganError as exc:
        queue.put((rank, "error", str(exc)))
        raise SystemExit(2) from None
    queue.put((rank, "ok", str(path)))


def launch(
    cfg: TrainConfig,
    nproc: int,
    resume: bool = False,
    start_method: str = "spawn",
) -> Path:
    """Train ``cfg`` with ``nproc`` local processes (DDP); returns the run folder.

    CPU: gloo, and each process
    gets ``cores / nproc`` threads unless ``cfg.threads`` or OMP_NUM_THREADS say otherwise.
    CUDA: NCCL, process ``r`` on ``cuda:r``. A LipganError in any process is raised here with
    its message.
    ``start_method``: ``spawn`` (safe anywhere; each process imports torch anew, seconds) or
    ``fork`` (Linux, CPU only, starts at once; safe when this process has not initialized CUDA,
    as the workers set their thread count before any parallel work).
    """
    import torch.multiprocessing as mp

    if int(nproc) < 1:
        raise LipganError(f"--nproc must be >= 1, got {nproc}")
    cfg = resolve(cfg)
    if not cfg.out:
        from lipgan.train.loop import default_out

        cfg = cfg.replace(out=default_out(cfg))  # one name for every process
    if start_method not in ("spawn", "fork", "forkserver"):
        raise LipganError(f"unknown start method {start_method!r}; use spawn or fork")
    ctx = mp.get_context(start_method)
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="lipgan-ddp-") as tmp:
        init = Path(tmp, "store").as_uri()  # a file store: no port to find or to race for
        try:
            mp.start_processes(
                _spawn_entry,
                args=(int(nproc), init, cfg.to_dict(), bool(resume), queue),
                nprocs=int(nproc),
                join=True,
                start_method=start_method,
            )
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            msgs = []
            while not queue.empty():
                rank, kind, text = queue.get()
                if kind == "error":
                    msgs.append((rank, text))
            if msgs:
                raise LipganError(sorted(msgs)[0][1]) from None
            raise LipganError(f"a training process failed: {str(exc).strip()[-2000:]}") from None
    results = {}
    while not queue.empty():
        rank, kind, text = queue.get()
        results[rank] = text
    return Path(results.get(0, cfg.out))


def _under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def maybe_run(
    cfg: TrainConfig, nproc: int | None = 1, resume: bool = False, stream=None
) -> Path | None:
    """Run ``cfg`` distributed when asked to, else return ``None`` (the caller trains as usual).

    Under torchrun with WORLD_SIZE > 1: this process's rank (``nproc`` is ignored; torchrun
    decides). Otherwise ``nproc > 1``: :func:`launch` of ``nproc`` local processes.
    """
    if _under_launcher():
        if int(os.environ["WORLD_SIZE"]) > 1:
            return main_from_env(cfg, resume=resume, stream=stream)
        return None
    if nproc is None or int(nproc) == 1:
        return None
    return launch(cfg, int(nproc), resume=resume)
