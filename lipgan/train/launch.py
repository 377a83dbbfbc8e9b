"""Starting a data-parallel run: one rank's run, the local launcher and torchrun's entry.

- ``torchrun --nproc_per_node=N -m lipgan train [flags]`` (:func:`main_from_env` under torchrun);
- ``lipgan train --nproc N [flags]``: :func:`launch` starts N local processes;
- :func:`maybe_run` is what ``lipgan train`` calls; it returns ``None`` when the run is not
  distributed.

Rank 0 runs the :class:`lipgan.train.loop.Session` (logging, samples, checkpoints) with the
:class:`lipgan.train.distributed.DistributedTrainer` in place of its trainer; the other ranks
follow its steps. See ``docs/distributed.md``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lipgan import data
from lipgan.errors import LipganError
from lipgan.train.config import TrainConfig
from lipgan.train.device import device_for_rank
from lipgan.train.distributed import DistributedTrainer, broadcast_object
from lipgan.train.loop import NonFiniteLoss, Session, default_out
from lipgan.train.presets import resolve

__all__ = ["launch", "main_from_env", "maybe_run"]


# --------------------------------------------------------------------------- one rank's run


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

    device = device_for_rank(cfg.device, local_rank, world)
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
                if cfg.max_time_s or cfg.max_cpu_s:
                    # Ranks would each read their own clock and could stop at different steps.
                    raise LipganError(
                        "--max-time-s and --max-cpu-s are not supported with several "
                        "processes; pass 0 and bound the run with --steps"
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
        payload = broadcast_object(payload)
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
            path = session.run_to_end()
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
    cfg = resolve(cfg)  # idempotent; library callers may pass an unresolved config
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
