"""The run loop: a trainer, its run folder, logs, samples and checkpoints."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lipgan import constraints as C
from lipgan.errors import LipganError
from lipgan.train.config import TrainConfig
from lipgan.train.gan import GANTrainer
from lipgan.train.presets import resolve
from lipgan.train.rng import isolated_rng


class Progress:
    """A one-line progress bar on stderr: step, rate, Wasserstein estimate, ETA.

    On a terminal it redraws in place at most 5 times a second; otherwise (log files) it prints a
    line every 5% of the run.
    """

    def __init__(
        self,
        total: int,
        start: int = 0,
        enabled: bool = True,
        stream=None,
        time_limit: float = 0.0,
        wall0: float = 0.0,
    ) -> None:
        self.total, self.start = total, start
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.last_draw = 0.0
        self.time_limit, self.wall0 = float(time_limit or 0.0), float(wall0)
        self.bucket = -1  # last twentieth of the run printed (log files)

    def fraction(self, step: int, now: float) -> float:
        """How far the run is: by steps, or by wall time when a time limit comes first."""
        f = step / max(self.total, 1)
        if self.time_limit:
            f = max(f, (self.wall0 + now - self.t0) / self.time_limit)
        return min(f, 1.0)

    def update(self, step: int, w: float | None, end: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        end = end or step >= self.total
        if self.tty and now - self.last_draw < 0.2 and not end:
            return
        frac = self.fraction(step, now)
        bucket = int(20 * frac)
        if not self.tty and bucket <= self.bucket and not end:
            return
        self.bucket = bucket
        self.last_draw = now
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        if self.time_limit:
            eta = min(eta, max(self.time_limit - self.wall0 - (now - self.t0), 0.0))
        width = 24
        filled = int(width * frac)
        bar = "#" * filled + "." * (width - filled)
        wtxt = "" if w is None else f"  W {w:+.4f}"
        if self.time_limit:
            spent = self.wall0 + now - self.t0
            where = f"step {step}, {spent:.0f}/{self.time_limit:.0f} s"
        else:
            where = f"{step}/{self.total}"
        line = (
            f"[{bar}] {where}  {rate:.2f} it/s{wtxt}  "
            f"ETA {_hms(eta) if math.isfinite(eta) else '?'}"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# --------------------------------------------------------------------------- the run


class TimeLimitReached(LipganError):
    """Raised when a run is resumed that has already used its ``max_time_s``."""


class NonFiniteLoss(LipganError):
    """Raised when a loss becomes NaN or infinite and ``on_nan`` is ``stop``."""


def default_out(cfg: TrainConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{cfg.method}-{cfg.model}-{stamp}")


@isolated_rng()
def _fid(trainer: GANTrainer, cfg: TrainConfig) -> float | None:
    try:
        from lipgan import metrics
    except ImportError:
        return None
    if not (hasattr(metrics, "available") and hasattr(metrics, "fid")):
        return None
    try:
        if not metrics.available(cfg.dataset):
            return None
        z = trainer.sample_z(cfg.fid_n, trainer.measure_gen)
        return float(metrics.fid(trainer.sample(z).cpu(), dataset=cfg.dataset, n=cfg.fid_n))
    except LipganError:
        return None


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    constraint: C.Constraint | None = None,
    stream=None,
) -> Path:
    """Train (or, with ``resume``, continue) the run ``cfg.out`` to ``cfg.steps``; return its path.

    A new run refuses a folder that already holds one. A resumed run reads and checks
    ``checkpoints/last.pt`` before changing anything in the folder.
    """
    session = Session(cfg, resume=resume, constraint=constraint, stream=stream)
    try:
        session.run()
    finally:
        session.close()
    return session.finish()


@isolated_rng()
def _checkpoint(trainer: GANTrainer, run, cfg: TrainConfig, wall_s: float, keep: bool) -> None:
    from lipgan import runs

    state = trainer.state_dict()
    state["wall_s"] = wall_s
    state["config"] = cfg.to_dict()
    runs.save_checkpoint(run.last_checkpoint, state)
    if keep:
        runs.save_checkpoint(run.checkpoint_path(trainer.step), state)
    g_kw = {k: v for k, v in trainer.gen_kwargs.items()}
    runs.export_network(
        trainer.generator, run.path / "generator.safetensors", "generator", cfg.model, g_kw
    )
    runs.export_network(
        trainer.critic,
        run.path / "critic.safetensors",
        "critic",
        cfg.model,
        dict(trainer.critic_kwargs),
    )


def _params_finite(trainer: GANTrainer) -> bool:
    return all(
        bool(torch.isfinite(p).all())
        for m in (trainer.generator, trainer.critic)
        for p in m.parameters()
    )


class Session:
    """A run in progress: a :class:`GANTrainer` plus its run folder, logs and progress bar.

    ``Session(cfg)`` opens (or, with ``resume``, reopens) the run folder; ``run(until)`` trains to
    generator step ``until`` (default ``cfg.steps``) doing the logging, samples and checkpoints the
    config asks for; ``finish()`` marks the run done. Benchmarks call ``run`` in slices.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        constraint: C.Constraint | None = None,
        stream=None,
        images: torch.Tensor | None = None,
    ) -> None:
        from lipgan import data, runs

        cfg = resolve(cfg)
        if not cfg.out:
            cfg = cfg.replace(out=default_out(cfg))
        run = runs.Run(cfg.out)
        state = None
        fresh_in_place = False
        if resume:
            if run.last_checkpoint.is_file():
                state = runs.load_checkpoint(run.last_checkpoint)
            elif run.config_path.is_file():
                fresh_in_place = True  # stopped before its first checkpoint: nothing to keep
            else:
                raise LipganError(f"{run.path}: no checkpoints/last.pt to resume from")
        elif run.exists():
            raise LipganError(
                f"{run.path} already holds a run; continue it with `lipgan train --resume "
                f"{run.path}` or choose another --out"
            )
        if images is None:
            images = data.load(cfg.dataset, data_dir=cfg.data_dir).train_images
        trainer = GANTrainer(cfg, images, constraint=constraint)
        wall0 = 0.0
        if state is not None:
            trainer.load_state_dict(state, source=str(run.last_checkpoint))
            used = float(state.get("wall_s", 0.0))
            if cfg.max_time_s and used >= cfg.max_time_s:
                raise TimeLimitReached(
                    f"{run.path} has used its time limit ({used:.0f} s of max_time_s "
                    f"{cfg.max_time_s:g}); resume with a larger --max-time-s, or --max-time-s 0 "
                    "to train to --steps"
                )
            # Everything checked: only now touch the folder.
            run.write_config(cfg.to_dict())
            run.truncate_logs(trainer.step)
            run.remove_partials()
            wall0 = float(state.get("wall_s", 0.0))
        elif fresh_in_place:
            run.write_config(cfg.to_dict())
            run.truncate_logs(0)
            run.remove_partials()
        else:
            run.create(cfg.to_dict())
        self.cfg, self.run_dir, self.trainer, self.stream = cfg, run, trainer, stream

        self.tb = None
        if cfg.tensorboard:
            try:
                # After a resume, drop events the interrupted segment wrote past its checkpoint.
                self.tb = run.tensorboard(
                    purge_step=trainer.step + 1 if run.metrics_path.is_file() else None
                )
            except ImportError:
                self.tb = None
        self.fixed_z = torch.randn(
            cfg.n_samples, trainer.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 3)
        ).to(trainer.device)
        self.progress = Progress(
            cfg.steps,
            trainer.step,
            enabled=not cfg.quiet,
            stream=stream,
            time_limit=cfg.max_time_s,
            wall0=wall0,
        )
        self.t_start = time.perf_counter()
        self.wall0 = wall0  # wall time of earlier segments (resume)
        self.ended = False  # the last step was the run's end (steps reached or time limit)
        if trainer.step == 0:
            _checkpoint(trainer, run, cfg, 0.0, keep=False)  # rollback target before any step
        self.last_good = trainer.step
        self.rollbacks = 0
        run.write_status("running", trainer.step, cfg.steps, self.wall())
        self.w_ema: float | None = None
        self.t_log, self.step_log = time.perf_counter(), trainer.step

    @property
    def path(self) -> Path:
        return self.run_dir.path

    def wall(self) -> float:
        return self.wall0 + time.perf_counter() - self.t_start

    def run(self, until: int | None = None) -> None:
        """Train to generator step ``until`` (at most ``cfg.steps``)."""
        until = self.cfg.steps if until is None else min(until, self.cfg.steps)
        try:
            while self.trainer.step < until and not self.ended:
                out = self.trainer.train_step()
                self._after_step(out)
        except KeyboardInterrupt:
            self.run_dir.write_status(
                "failed", self.trainer.step, self.cfg.steps, self.wall(), "interrupted"
            )
            raise

    def _after_step(self, out: dict) -> None:
        from lipgan import runs

        cfg, trainer, run = self.cfg, self.trainer, self.run_dir
        step = trainer.step
        vals = torch.stack([out["wasserstein"], out["loss_d"], out["penalty"], out["loss_g"]])
        w, loss_d, pen, loss_g = vals.tolist()  # one sync per generator step
        if not all(math.isfinite(v) for v in (w, loss_d, pen, loss_g)):
            ckpt = run.last_checkpoint
            if cfg.on_nan == "rollback" and self.rollbacks < cfg.max_rollbacks:
                self.rollbacks += 1
                state = runs.load_checkpoint(ckpt)
                scale = float(state.get("lr_scale", 1.0)) * cfg.nan_lr_factor
                trainer.load_state_dict(state, source=str(ckpt))
                trainer.set_lr_scale(scale)
                run.truncate_logs(trainer.step)
                _say(
                    cfg,
                    self.stream,
                    f"non-finite loss at generator step {step}; rolled back to step "
                    f"{trainer.step} ({ckpt}) with learning rates x{scale:g}",
                )
                return
            reason = (
                f"non-finite loss at generator step {step} (W {w}, loss_d {loss_d}, "
                f"loss_g {loss_g}); last good checkpoint: {ckpt} (step {self.last_good}). "
                "Resume with --on-nan rollback or lower learning rates"
            )
            run.write_status("failed", step, cfg.steps, self.wall(), reason)
            raise NonFiniteLoss(reason)
        self.w_ema = w if self.w_ema is None else 0.9 * self.w_ema + 0.1 * w
        end = step >= cfg.steps or bool(cfg.max_time_s and self.wall() >= cfg.max_time_s)
        self.ended = end

        def due(every: int) -> bool:
            return bool(every) and step % every == 0

        row: dict[str, Any] = {}
        if cfg.log_every and (due(cfg.log_every) or end):
            now = time.perf_counter()
            row.update(
                step=step,
                time_s=round(self.wall(), 3),
                wasserstein=w,
                loss_d=loss_d,
                loss_g=loss_g,
                penalty=pen,
                ms_per_step=round(1000 * (now - self.t_log) / max(step - self.step_log, 1), 2),
            )
            self.t_log, self.step_log = now, step
            gn = trainer.constraint.last_grad_norm
            if gn is not None:  # reuse the penalty's own gradients at the interpolates
                gn = gn.detach().float()
                row.update(gnorm_interp_mean=gn.mean().item(), gnorm_interp_max=gn.max().item())
        if cfg.lip_every and (due(cfg.lip_every) or end):
            which = ["real", "fake"]
            if "gnorm_interp_mean" not in row:
                which.append("interp")
            norms = trainer.gradient_norms(trainer.last_real, tuple(which))
            row.setdefault("step", step)
            for k, v in norms.items():
                row[f"gnorm_{k}_mean"] = v.mean().item()
                row[f"gnorm_{k}_max"] = v.max().item()
        if cfg.layer_every and (due(cfg.layer_every) or end):
            layers, bound = trainer.layer_norms()
            if layers:
                run.log_layer_norms(step, layers)
            if bound is not None:
                row.setdefault("step", step)
                row["product_bound"] = bound
        if cfg.fid_every >= 0 and (due(cfg.fid_every) or end):
            fid = _fid(trainer, cfg)
            if fid is not None:
                row.setdefault("step", step)
                row["fid"] = fid
        if row:
            row.setdefault("time_s", round(self.wall(), 3))
            run.log_metrics(row)
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step" and v is not None:
                        self.tb.add_scalar(k, v, step)
        if due(cfg.sample_every) or end:
            run.save_samples(step, trainer.sample(self.fixed_z))
        keep = due(cfg.keep_every)
        if due(cfg.checkpoint_every) or keep or end:
            if _params_finite(trainer):
                _checkpoint(trainer, run, cfg, self.wall(), keep=keep)
                self.last_good = step
            run.write_status("running", step, cfg.steps, self.wall())
        self.progress.update(step, self.w_ema, end=end)

    def close(self) -> None:
        """Close the progress bar and the log files (the run can be reopened with resume)."""
        if not getattr(self, "_closed", False):
            self._closed = True
            self.progress.close()
            self.run_dir.close()

    def finish(self) -> Path:
        """Mark the run done when it reached ``cfg.steps`` or its time limit; returns the run
        folder."""
        self.close()
        if self.trainer.step >= self.cfg.steps or self.ended:
            self.run_dir.write_status("done", self.trainer.step, self.cfg.steps, self.wall())
        return self.path


def _say(cfg: TrainConfig, stream, msg: str) -> None:
    if not cfg.quiet:
        print(f"lipgan: {msg}", file=stream or sys.stderr)
