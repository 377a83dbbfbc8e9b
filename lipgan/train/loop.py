"""The run loop: a :class:`GANTrainer` inside its run folder.

:class:`Session` opens (or reopens) the folder, then :meth:`Session.run` calls the trainer's
``train_step`` and, after each step, small hooks, each for one concern and each only when its
interval is due: the metrics row (losses, gradient norms, layer norms, FID), the sample grid, the
checkpoint with the exports, and the progress bar. Measurements keep within ``measure_budget`` of
the wall time (:mod:`lipgan.train.budget`): a due one that does not fit is postponed. A
non-finite loss stops the run or rolls it back. SIGINT and SIGTERM let the step in progress
finish, write a checkpoint and mark the run resumable (status ``failed``, reason
``interrupted``) before the loop stops. The resume checks, the checkpoint writer and the signal
handler are in :mod:`lipgan.train.session_io`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lipgan import constraints as C
from lipgan import data, metrics, runs
from lipgan.errors import LipganError
from lipgan.train.budget import Budget
from lipgan.train.config import TrainConfig
from lipgan.train.gan import GANTrainer
from lipgan.train.presets import resolve
from lipgan.train.rng import isolated_rng
from lipgan.train.session_io import (
    check_resume,
    default_out,
    exports,
    stop_signals,
    with_constraint,
    write_checkpoint,
)

LOSS_KEYS = ("wasserstein", "loss_d", "penalty", "loss_g")


class TimeLimitReached(LipganError):
    """Raised when a run is resumed that has already used its ``max_time_s`` or ``max_cpu_s``."""


class NonFiniteLoss(LipganError):
    """Raised when a loss becomes NaN or infinite and ``on_nan`` is ``stop``."""


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
    path = session.run_to_end()
    if session.trainer.step >= session.cfg.steps or session.ended:
        from lipgan.train import summary

        summary.after_training(session, stream=stream)
    return path


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
    Everything is checked (config, checkpoint, resume overrides) before the folder is touched.
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
        cfg = with_constraint(resolve(cfg), constraint)
        if not cfg.out:
            cfg = cfg.replace(out=default_out(cfg))
        run = runs.RunFolder(cfg.out)
        try:
            trainer, wall0, budget = self._open(run, cfg, resume, constraint, images)
        except BaseException:
            run.close()  # the lock, when a check refused the run
            raise
        self.cfg, self.run_dir, self.trainer, self.stream = cfg, run, trainer, stream
        self.tb = None
        if cfg.tensorboard:
            # After a resume, drop events the interrupted segment wrote past its checkpoint.
            self.tb = run.tensorboard(
                purge_step=trainer.step + 1 if run.metrics_path.is_file() else None
            )
        self.fixed_z = torch.randn(
            cfg.n_samples, trainer.z_dim, generator=torch.Generator().manual_seed(cfg.seed + 3)
        ).to(trainer.device)
        self.progress = tqdm(
            total=cfg.steps, initial=trainer.step, disable=cfg.quiet, file=stream or sys.stderr,
            unit="step", dynamic_ncols=True, mininterval=0.5,
        )  # fmt: skip
        self.t_start = time.perf_counter()
        self.wall0 = wall0  # wall time of earlier segments (resume)
        self.budget = budget
        self.pending: dict[str, int] = {}  # postponed measurements: kind -> step first due
        # FID marks still ahead (those an earlier segment passed were taken, or were lost
        # with the rows past its checkpoint: truncate_logs)
        self.marks = [m for m in cfg.fid_at_s if m > self.mark_clock()]
        self.ended = False  # the last step was the run's end (steps reached or time limit)
        if trainer.step == 0:
            self._checkpoint(keep=False)  # rollback target before any step
        self.last_good = trainer.step
        self.rollbacks = 0
        self.layer_error: str | None = None  # why the layer analysis is off for this run
        self.fid_error: str | None = None  # why FID is off for this run
        self.signal: int | None = None  # SIGINT/SIGTERM received: stop after this step
        self._status("running")
        self.w_ema: float | None = None
        self.t_log, self.step_log = time.perf_counter(), trainer.step

    def _open(
        self,
        run: runs.RunFolder,
        cfg: TrainConfig,
        resume: bool,
        constraint: C.Constraint | None,
        images: torch.Tensor | None,
    ) -> tuple[GANTrainer, float, Budget]:
        """Check everything (config, checkpoint, resume overrides), then open the folder; the
        trainer (state loaded), the wall time of earlier segments and the measurement budget."""
        state = None
        if resume:
            if not run.path.is_dir():  # before the lock, which would create the folder
                raise LipganError(f"{run.path}: no such run folder to resume")
            run.lock()  # one writer: taken before anything is read
            if not run.config_path.is_file() and not run.last_checkpoint.is_file():
                raise LipganError(f"{run.path}: no checkpoints/last.pt to resume from")
            if run.config_path.is_file():
                check_resume(cfg, run.read_config(), run.path)
            if run.last_checkpoint.is_file():
                state = run.load_checkpoint()  # manifest and structure checked here
        elif run.exists():
            raise LipganError(
                f"{run.path} already holds a run; continue it with `lipgan train --resume "
                f"{run.path}` or choose another --out"
            )
        if images is None:
            images = data.load(cfg.dataset, data_dir=cfg.data_dir).train_images
        trainer = GANTrainer(cfg, images, constraint=constraint)
        wall0 = 0.0
        budget = Budget(cfg.measure_budget)
        if state is not None:
            trainer.load_state_dict(state, source=str(run.last_checkpoint))
            wall0 = float(state.get("wall_s", 0.0))
            if "timing" in state:  # older checkpoints have none: their clocks start at 0
                budget.load_state_dict(state["timing"], source=str(run.last_checkpoint))
            if cfg.steps < trainer.step:
                raise LipganError(
                    f"{run.path} is already at generator step {trainer.step}; --steps "
                    f"{cfg.steps} would end before it (pass --steps {trainer.step} or more)"
                )
            if cfg.max_time_s and wall0 >= cfg.max_time_s:
                raise TimeLimitReached(
                    f"{run.path} has used its time limit ({wall0:.0f} s of max_time_s "
                    f"{cfg.max_time_s:g}); resume with a larger --max-time-s, or --max-time-s 0 "
                    "to train to --steps"
                )
            if cfg.max_cpu_s and budget.cpu() >= cfg.max_cpu_s:
                raise TimeLimitReached(
                    f"{run.path} has used its CPU limit ({budget.cpu():.0f} s of max_cpu_s "
                    f"{cfg.max_cpu_s:g}); resume with a larger --max-cpu-s, or --max-cpu-s 0 "
                    "to train to --steps"
                )
        # Everything checked: only now touch the folder.
        if resume:
            run.write_config(cfg.to_dict())
            run.truncate_logs(trainer.step)
            run.remove_partials()
            if state is not None and run.stale_exports(state):
                # a kill between the exports and last.pt, or a folder of an older version
                run.write_exports(exports(trainer))
        else:
            run.create(cfg.to_dict())
        return trainer, wall0, budget

    @property
    def path(self) -> Path:
        return self.run_dir.path

    def wall(self) -> float:
        return self.wall0 + time.perf_counter() - self.t_start

    def mark_clock(self) -> float:
        """The clock of the FID marks: the run's CPU seconds for a CPU-bounded run (its
        budget's clock), else its wall seconds."""
        return self.budget.cpu() if self.cfg.max_cpu_s else self.wall()

    def run(self, until: int | None = None) -> None:
        """Train to generator step ``until`` (at most ``cfg.steps``)."""
        until = self.cfg.steps if until is None else min(until, self.cfg.steps)
        try:
            with stop_signals(self):
                while self.trainer.step < until and not self.ended:
                    with self.budget.training():
                        out = self.trainer.train_step()
                        # read inside the clock: on a GPU this waits for the step's kernels
                        vals = [out[k] for k in ("wasserstein", "loss_d", "penalty", "loss_g")]
                        losses = dict(zip(LOSS_KEYS, torch.stack(vals).tolist()))
                    self._after_step(losses)
                    if self.signal is not None:
                        self._stop_on_signal()
        except KeyboardInterrupt:
            self._status("failed", "interrupted")
            raise

    # ---------------------------------------------------------------- after each step
    def _after_step(self, losses: dict[str, float]) -> None:
        cfg, step = self.cfg, self.trainer.step
        if not all(math.isfinite(v) for v in losses.values()):
            self._non_finite(step, losses)
            return
        w = losses["wasserstein"]
        self.w_ema = w if self.w_ema is None else 0.9 * self.w_ema + 0.1 * w
        end = (
            step >= cfg.steps
            or bool(cfg.max_time_s and self.wall() >= cfg.max_time_s)
            or bool(cfg.max_cpu_s and self.budget.cpu() >= cfg.max_cpu_s)
        )
        self.ended = end

        def due(every: int) -> bool:
            return bool(every) and (step % every == 0 or end)

        row: dict[str, Any] = {}
        if due(cfg.log_every):
            self._log_losses(step, losses, row)
        for kind, every in (("gradient_norms", cfg.lip_every), ("layers", cfg.layer_every),
                            ("samples", cfg.sample_every)):  # fmt: skip
            if due(every) or (kind == "samples" and end):
                self._due(kind, step)
        if cfg.fid_every >= 0 and (due(cfg.fid_every) or end):
            self._due("fid", step)
        marks = cfg.fid_every >= 0 and self.marks  # --fid-every -1: no FID at all
        if marks and self.mark_clock() >= self.marks[0] and "fid_mark" not in self.pending:
            self._due("fid_mark", step)
        self._measure(step, row, end)
        if row:
            self._write_row(step, row)
        keep = bool(cfg.keep_every) and step % cfg.keep_every == 0
        if due(cfg.checkpoint_every) or keep or end:
            if _params_finite(self.trainer):
                self._checkpoint(keep=keep)  # never postponed: a kill or a resume needs it
                self.last_good = step
            self._status("running")
        self.progress.set_postfix_str(f"W {self.w_ema:+.4f}", refresh=False)
        self.progress.update(step - self.progress.n)

    def _due(self, kind: str, step: int) -> None:
        """``kind`` is due at ``step``; one still pending from earlier absorbs it (counted as
        postponed: the budget dropped that measurement)."""
        if kind in self.pending:
            self.budget.postponed["fid" if kind == "fid_mark" else kind] += 1
        else:
            self.pending[kind] = step

    def _measure(self, step: int, row: dict, end: bool) -> None:
        """Take the pending measurements that fit the budget (the sample grid at the end in any
        case); at the end, skip the rest and count them."""
        budget, wall = self.budget, self.wall()
        if ("fid" in self.pending or "fid_mark" in self.pending) and "fid" not in budget.cost:
            self._probe_fid()
        skipped: set[str] = set()
        for kind in ("samples", "fid", "fid_mark", "gradient_norms", "layers"):
            if kind not in self.pending:
                continue
            clock = "fid" if kind == "fid_mark" else kind
            forced = kind == "samples" and end
            if not (forced or budget.fits(clock, wall)):
                if self.pending[kind] == step:  # first due now: count the decision once
                    budget.postponed[clock] += 1
                if end:
                    del self.pending[kind]
                    if not (kind == "fid_mark" and "fid" in skipped):  # one FID, counted once
                        budget.skipped[clock] += 1
                    skipped.add(kind)
                continue
            del self.pending[kind]
            if kind in ("fid", "fid_mark") and "fid" in row:
                continue  # one FID serves both at this step
            with budget.measuring(clock):
                if kind == "samples":
                    self.run_dir.save_samples(step, self.trainer.sample(self.fixed_z, ema=True))
                elif kind == "gradient_norms":
                    self._log_gradient_norms(row)
                elif kind == "layers":
                    self._log_layer_norms(step, row)
                else:
                    self._log_fid(row)
            if kind in ("fid", "fid_mark"):
                passed = [m for m in self.marks if m <= self.mark_clock()]
                if passed:
                    row["fid_mark_s"] = passed[-1]
                    self.marks = self.marks[len(passed):]
                self.pending.pop("fid", None)
                self.pending.pop("fid_mark", None)
            wall = self.wall()

    @isolated_rng()
    def _probe_fid(self) -> None:
        """The first FID's cost estimate: the whole FID on 256 EMA samples, scaled to ``fid_n``
        with a margin (the safe side of the budget). None for ``fid_n <= 256``: that FID is as
        cheap as its probe."""
        cfg, trainer, n = self.cfg, self.trainer, 256
        if cfg.fid_n <= n or self.fid_error is not None or not metrics.available(cfg.dataset):
            return
        # x1.5: measured under load, the 2000-sample FID took up to 1.4x its scaled probe
        with self.budget.probe("fid", 1.5 * cfg.fid_n / n):
            z = trainer.sample_z(n, torch.Generator(trainer.device).manual_seed(cfg.seed + 5))
            metrics.fid(trainer.sample(z, ema=True).cpu(), dataset=cfg.dataset, n=n)

    def _log_losses(self, step: int, losses: dict[str, float], row: dict) -> None:
        now = time.perf_counter()
        ms = 1000 * (now - self.t_log) / max(step - self.step_log, 1)
        row.update(step=step, time_s=round(self.wall(), 3), cpu_s=round(self.budget.cpu(), 3),
                   **losses, ms_per_step=round(ms, 2))  # fmt: skip
        self.t_log, self.step_log = now, step
        gn = self.trainer.constraint.last_grad_norm
        if gn is not None:  # reuse the penalty's own gradients at the interpolates
            gn = gn.detach().float()
            row.update(gnorm_interp_mean=gn.mean().item(), gnorm_interp_max=gn.max().item())

    def _log_gradient_norms(self, row: dict) -> None:
        which = ("real", "fake") if "gnorm_interp_mean" in row else ("real", "fake", "interp")
        for k, v in self.trainer.gradient_norms(self.trainer.last_real, which).items():
            row[f"gnorm_{k}_mean"] = v.mean().item()
            row[f"gnorm_{k}_max"] = v.max().item()

    def _log_layer_norms(self, step: int, row: dict) -> None:
        if self.layer_error is not None:
            return
        try:
            layers, bound = self.trainer.layer_norms()
        except LipganError as exc:
            # The analysis refuses some critics (attention): say so once, train on without it.
            self.layer_error = str(exc)
            self._say(f"no layer norms or product bound for this critic: {exc}")
            return
        if layers:
            self.run_dir.log_layer_norms(step, layers)
        row["product_bound"] = bound

    @isolated_rng()
    def _log_fid(self, row: dict) -> None:
        cfg, trainer = self.cfg, self.trainer
        if self.fid_error is not None or not metrics.available(cfg.dataset):
            return
        z = trainer.sample_z(cfg.fid_n, trainer.measure_gen)
        try:  # the moving average where the run keeps one (issue 19), as eval and compare
            x = trainer.sample(z, ema=True).cpu()
            row["fid"] = metrics.fid(x, dataset=cfg.dataset, n=cfg.fid_n)
        except LipganError as exc:  # e.g. more samples asked for than the reference set has
            self.fid_error = str(exc)
            self._say(f"no FID for this run: {exc}")

    def _write_row(self, step: int, row: dict) -> None:
        row = {"step": step, **row}
        row.setdefault("time_s", round(self.wall(), 3))
        row.setdefault("cpu_s", round(self.budget.cpu(), 3))
        self.run_dir.log_metrics(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(k, v, step)

    def _checkpoint(self, keep: bool) -> None:
        extra = {"wall_s": self.wall(), "timing": self.budget.state_dict(),
                 "config": self.cfg.to_dict()}  # fmt: skip
        with self.budget.measuring("checkpoint"):
            write_checkpoint(self.run_dir, self.trainer, extra, keep)

    def _non_finite(self, step: int, losses: dict[str, float]) -> None:
        """Roll back to the last checkpoint with lower learning rates, or stop the run."""
        cfg, trainer, ckpt = self.cfg, self.trainer, self.run_dir.last_checkpoint
        if cfg.on_nan == "rollback" and self.rollbacks < cfg.max_rollbacks:
            self.rollbacks += 1
            state = self.run_dir.load_checkpoint()
            scale = float(state.get("lr_scale", 1.0)) * cfg.nan_lr_factor
            trainer.load_state_dict(state, source=str(ckpt))
            trainer.set_lr_scale(scale)
            self.run_dir.truncate_logs(trainer.step)
            self._say(
                f"non-finite loss at generator step {step}; rolled back to step "
                f"{trainer.step} ({ckpt}) with learning rates x{scale:g}"
            )
            return
        reason = (
            f"non-finite loss at generator step {step} (W {losses['wasserstein']}, loss_d "
            f"{losses['loss_d']}, loss_g {losses['loss_g']}); last good checkpoint: {ckpt} (step "
            f"{self.last_good}). Resume with --on-nan rollback or lower learning rates"
        )
        self._status("failed", reason)
        raise NonFiniteLoss(reason)

    # ---------------------------------------------------------------- stop and status
    def _stop_on_signal(self) -> None:
        if _params_finite(self.trainer) and self.trainer.step > self.last_good:
            self._checkpoint(keep=False)
            self.last_good = self.trainer.step
        self._status("failed", "interrupted")
        raise KeyboardInterrupt

    def record_eval(self, seconds: float) -> None:
        """Record the evaluation after training (summary) in status.json, beside the budget."""
        self.budget.eval_s = float(seconds)
        self._status("done", wall=self.wall_end)

    def _status(self, state: str, reason: str | None = None, wall: float | None = None) -> None:
        wall = self.wall() if wall is None else wall
        self.run_dir.write_status(
            state, self.trainer.step, self.cfg.steps, wall, reason,
            extra={"cpu_s": round(self.budget.cpu(), 3), "measurement": self.budget.report(wall)},
        )  # fmt: skip

    def _say(self, msg: str) -> None:
        if not self.cfg.quiet:
            tqdm.write(f"lipgan: {msg}", file=self.stream or sys.stderr)

    def close(self) -> None:
        """Close the progress bar and the log files (the run can be reopened with resume)."""
        if not getattr(self, "_closed", False):
            self._closed = True
            self.progress.close()
            self.run_dir.close()

    def run_to_end(self) -> Path:
        """:meth:`run` to ``cfg.steps``, then :meth:`finish`; closed (resumable) on any error."""
        try:
            self.run()
        except BaseException:
            self.close()
            raise
        return self.finish()

    def finish(self) -> Path:
        """Mark the run done when it reached ``cfg.steps`` or its time limit, then close it
        (the folder's lock is given back); returns the run folder."""
        if self.trainer.step >= self.cfg.steps or self.ended:
            self.wall_end = self.wall()
            self._status("done", wall=self.wall_end)
            self._say(self.budget.line(self.wall_end))
        self.close()
        return self.path
