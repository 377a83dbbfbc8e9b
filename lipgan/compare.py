"""Compare Lipschitz methods side by side: train every variant x seed, evaluate, report.

`run_compare(CompareConfig(...))` fills one folder::

    OUT/compare.json             what was asked (variants, seeds, budget or steps, training flags)
    OUT/runs/<variant>-seed<k>/  one run folder per variant and seed (the lipgan.runs layout)
    OUT/results.csv              one row per run: state, steps, time per step, bounds, eval.json
    OUT/report.html              the lipgan.report page of all runs

A *variant* is a name and the training fields it sets: each method of ``methods`` is the variant
``NAME: {method: NAME}``, and ``variants`` adds any others (``w64: {method: frobenius, width:
64}``), so a sweep over one method's settings is a comparison too. Every run gets the same
budget: the same wall-clock time (``budget_s``, the fair comparison when methods differ in cost
per step, as a gradient penalty's double backward does), the same CPU time (``budget_s`` with
``budget_clock="cpu"``: the same compute whatever else loads the machine) or the same number of
generator steps (``steps``). Each finished run is scored by ``lipgan.metrics.evaluate`` on
``eval_n`` generated samples (same latent seed for every run) against the test set.

Running it again on the same folder resumes: a run whose status.json says ``done`` is kept, one
that was interrupted (``running``) resumes from its last checkpoint with what is left of its
budget, a missing one is trained; a ``failed`` run (a non-finite loss) is kept and reported with
its reason, unless ``retry_failed`` moves it aside and trains it again. The runs go through
:mod:`lipgan.experiments.sweep` (``jobs`` at a time in worker processes when ``jobs`` > 1).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from lipgan.errors import LipganError
from lipgan.experiments import sweep
from lipgan.experiments.compare_settings import (
    BUDGET_STEP_CAP,
    DEFAULT_METHODS,
    TRAIN_FLAGS,
    CompareConfig,
    budget_slack,
    budget_used,
    check_settings,
    format_duration,
    parse_duration,
    variant_fields,
)
from lipgan.experiments.compare_settings import check as _check
from lipgan.experiments.sweep import Cell, Context, Variant
from lipgan.runs import FolderLock, RunFolder, make_dirs
from lipgan.runs.folder import scored_generator

__all__ = [
    "BUDGET_STEP_CAP", "DEFAULT_METHODS", "TRAIN_FLAGS", "CompareConfig", "budget_slack",
    "format_duration", "parse_duration", "plan_runs", "run_compare", "variant_fields",
    "worker_threads", "write_report", "write_results",
]  # fmt: skip


# --------------------------------------------------------------------------- the trainer

# This section and compare_settings (variant_fields, check) know how a run is made, through
# lipgan.train's public API (TrainConfig, presets, loop.train); everything else reads run folders.


def _train_config(cell: Cell, cfg: CompareConfig, steps: int, resume: bool, threads: int | None):
    """The TrainConfig of one run: a new run from its variant and the training flags, or, to
    resume, the run's own config.yaml with only ``steps`` changed (as `lipgan train --resume`).
    ``threads`` (a worker's share of the CPU with ``jobs`` > 1) overrides both."""
    from lipgan.train import TrainConfig

    own = {} if threads is None else {"threads": int(threads)}
    if resume:
        base = RunFolder(cell.path).read_config()
        base.update(out=str(cell.path), steps=int(steps), quiet=cfg.quiet, **own)
        return TrainConfig.from_dict(base)
    fields_ = {**cfg.train_flags(), **variant_fields(Variant(cell.variant, cell.options)), **own}
    return TrainConfig.from_dict(
        {
            **fields_,
            "seed": cell.seed,
            "steps": int(steps),
            "out": str(cell.path),
            "quiet": cfg.quiet,
        }
    )


def _train_one(cell: Cell, cfg: CompareConfig, ctx: Context, tag: str) -> None:
    """Train or resume one run to its bound (steps, or ``max_time_s = budget`` with a step cap
    it never reaches: the time sums over resumes, so an interrupted run resumes with the time it
    has left, and the end-of-run work happens once); the trainer writes everything."""
    from lipgan.train import loop

    resume = cell.action == "resume"
    kw = {} if ctx.stream is None else {"stream": ctx.stream}
    if cfg.steps is not None:
        loop.train(_train_config(cell, cfg, cfg.steps, resume, ctx.threads), resume=resume, **kw)
        return
    tc = _train_config(cell, cfg, BUDGET_STEP_CAP, resume, ctx.threads)
    limit = "max_cpu_s" if cfg.budget_clock == "cpu" else "max_time_s"
    try:
        loop.train(tc.replace(**{limit: float(cfg.budget_s)}), resume=resume, **kw)
    except loop.TimeLimitReached:
        # Killed after its final checkpoint but before it was marked done: it is complete.
        st = _status(cell.path)
        with RunFolder(cell.path) as run:
            run.write_status(
                "done", int(st.get("step") or 0), int(st.get("steps") or 0), float(st["wall_s"]),
                extra=st,  # the CPU seconds and the measurement budget kept
            )  # fmt: skip
    st = _status(cell.path)
    ctx.log(
        f"{tag}: step {st.get('step')}, {budget_used(st, cfg):.1f} {cfg.budget_clock} s of "
        f"{float(cfg.budget_s):.0f} s"
    )


# --------------------------------------------------------------------------- run folders


def _status(path: Path) -> dict:
    return RunFolder(path).read_status() or {}


def _has_checkpoint(path: Path) -> bool:
    return RunFolder(path).last_checkpoint.is_file()


def _interrupted(status: dict) -> bool:
    # The trainer records Ctrl-C as failed with reason "interrupted": not a result, resume it.
    return status.get("state") == "failed" and status.get("reason") == "interrupted"


def _action(cell: Cell, cfg: CompareConfig) -> str:
    """``keep`` (done, or failed on its own), ``resume`` (interrupted with a checkpoint, or in
    budget mode done short of the budget) or ``train`` (the rest), from the run's folder."""
    status = _status(cell.path)
    state = status.get("state")
    short = cfg.budget_s is not None and budget_used(status, cfg) < cfg.budget_s - budget_slack(
        cfg.budget_s
    )
    if state == "done" and short and _has_checkpoint(cell.path):
        return "resume"
    if state == "done":
        return "keep"
    if state == "failed" and not _interrupted(status):
        return "train" if cfg.retry_failed else "keep"
    return "resume" if _has_checkpoint(cell.path) else "train"


def plan_runs(cfg: CompareConfig) -> list[Cell]:
    """One cell per variant x seed, with what compare will do to it given the folder's state."""
    cells = sweep.grid(cfg.all_variants(), cfg.seeds, Path(cfg.out) / "runs")
    for cell in cells:
        cell.action = _action(cell, cfg)
    return cells


def _in_the_way(cell: Cell) -> str | None:
    """What a fresh start does to the folder: None (absent), ``"set aside"`` (a failed run,
    retried: moved to OUT/failed/ for inspection) or ``"delete"`` (empty, or a run killed before
    its first checkpoint, which holds nothing a resume could use). Anything else is refused,
    never deleted: a LipganError naming it."""
    path = cell.path
    if not path.exists():
        return None
    if not path.is_dir():
        raise LipganError(f"{path} is a file where compare puts a run; move it away")
    status = _status(path)
    if status.get("state") == "failed" and not _interrupted(status):
        return "set aside"
    held = sorted(p.name for p in path.iterdir() if p.name != FolderLock.NAME)
    if held and not RunFolder(path).exists():
        raise LipganError(
            f"{path} holds {', '.join(held[:3])} and is not a lipgan run; move it away (or "
            "choose another --out)"
        )
    return "delete"


def _clear_for_training(cell: Cell, out: Path) -> None:
    """Make way for a fresh run in ``cell.path`` as :func:`_in_the_way` says, holding the
    folder's lock (a run another process is writing is never moved or deleted)."""
    what = _in_the_way(cell)
    if what is None:
        return
    with RunFolder(cell.path).lock():
        if what == "set aside":
            dest = out / "failed" / f"{cell.path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            make_dirs(dest.parent)
            os.rename(cell.path, dest)
        else:
            shutil.rmtree(cell.path)


# --------------------------------------------------------------------------- evaluation


def _needs_eval(path: Path, n: int, raw: bool = False) -> bool:
    """No eval.json of ``n`` samples of the generator compare scores (the EMA one where the run
    keeps it, unless ``raw``; an eval.json without ``generator`` was written from the raw one)."""
    from lipgan.metrics import sampling

    done = RunFolder(path).read_eval() or {}
    want = sampling.generator_source(path, raw)[1]
    return done.get("n") != n or scored_generator(done) != want


# --------------------------------------------------------------------------- results


def write_results(cells: Sequence[Cell], out: Path) -> Path:
    """results.csv: one row per cell that has a folder (see lipgan.report.run_row), with the
    variant's name after the run's."""
    from lipgan import report

    rows = []
    for c in cells:
        if report.is_run_folder(c.path):
            row = report.run_row(report.load_run(c.path))
            rows.append({"run": row.pop("run"), "variant": c.variant, **row})
    columns = () if rows else ("run", "variant", "method", "seed", "state")
    return sweep.write_table(out / "results.csv", rows, columns)


def write_report(cells: Sequence[Cell], cfg: CompareConfig, out: Path) -> Path | None:
    from lipgan import report

    paths = [c.path for c in cells if report.is_run_folder(c.path)]
    if not paths:
        return None
    clock = " of CPU" if cfg.budget_clock == "cpu" else ""
    per_run = f"{format_duration(cfg.budget_s)}{clock} per run" if cfg.budget_s else ""
    bound = per_run or f"{cfg.steps} G steps"
    title = f"lipgan compare: {out.name} ({bound}, {cfg.seeds} seed(s))"
    order = list(dict.fromkeys(c.variant for c in cells))
    labels = {c.path: c.variant for c in cells}
    return report.build_report(paths, out / "report.html", title=title, order=order, labels=labels)


# --------------------------------------------------------------------------- the driver


def run_compare(
    cfg: CompareConfig, *, log: Callable[[str], None] | None = None
) -> dict[str, Path | None]:
    """Train what is missing, evaluate what is finished, write results.csv and report.html.

    Returns ``{"results": path, "report": path or None}``. A run that raises is recorded as
    failed by the trainer and does not stop the others; any other error, or KeyboardInterrupt,
    stops the comparison (the interrupted runs resume next time).
    """
    variants = _check(cfg)
    log = log or (lambda msg: None if cfg.quiet else print(msg, file=sys.stderr, flush=True))
    out = Path(cfg.out)
    cells = plan_runs(cfg)
    for cell in cells:
        if cell.action == "train":
            _in_the_way(cell)  # refuses a folder it may not delete, before compare.json
    check_settings(cfg, variants, out)
    dataset = cfg.dataset or "mnist"
    can_eval = cfg.evaluate and _metrics_available(dataset, log)
    todo = [c for c in cells if c.action != "keep"]
    per_run = (
        f"{format_duration(cfg.budget_s)}{' of CPU' if cfg.budget_clock == 'cpu' else ''} each"
        if cfg.budget_s
        else f"{cfg.steps} steps each"
    )
    est = ""
    if cfg.budget_s and todo:
        est = f", about {format_duration(cfg.budget_s * math.ceil(len(todo) / cfg.jobs))}"
    at_a_time = f", {cfg.jobs} at a time" if cfg.jobs > 1 and todo else ""
    log(
        f"compare: {len(variants)} variant(s) x {cfg.seeds} seed(s) = {len(cells)} runs, "
        f"{per_run}; {len(cells) - len(todo)} kept, "
        f"{sum(c.action == 'resume' for c in todo)} to resume, "
        f"{sum(c.action == 'train' for c in todo)} to train{est}{at_a_time}"
    )
    work = []
    for i, cell in enumerate(cells, 1):
        if cell.action != "keep" or (can_eval and _evaluable(cell, cfg)):
            work.append(cell)
        else:
            log(f"[{i}/{len(cells)}] {cell.name}: {_status(cell.path).get('state')}, kept")

    def written(cell: Cell, value, unfinished: set[Path]) -> None:
        write_results([c for c in cells if c.path not in unfinished], out)

    sweep.run_cells(
        work,
        partial(_run_cell, cfg=cfg, out=out, can_eval=can_eval),
        jobs=cfg.jobs,
        threads=worker_threads(cfg),
        log=log,
        on_done=written,
    )
    results = write_results(cells, out)
    page = write_report(cells, cfg, out)
    if page is not None:
        from lipgan import report

        table = report.markdown_summary([out], columns=report.QUALITY_COLUMNS)
        log("compare: FID (eval.json) and time to quality, mean ± std over seeds:\n" + table)
    log(f"compare: wrote {results}" + (f" and {page}" if page else ""))
    return {"results": results, "report": page}


def _evaluable(cell: Cell, cfg: CompareConfig) -> bool:
    return _status(cell.path).get("state") == "done" and _needs_eval(
        cell.path, cfg.eval_n, cfg.raw
    )


def _run_cell(
    cell: Cell, tag: str, ctx: Context, *, cfg: CompareConfig, out: Path, can_eval: bool
) -> None:
    """Everything compare does to one run: train or resume it (or keep it), then evaluate it
    when it is done and has no eval.json of ``cfg.eval_n`` samples (in-process or a worker)."""
    if cell.action == "keep":
        ctx.log(f"{tag}: {_status(cell.path).get('state')}, kept")
    else:
        if cell.action == "train":
            _clear_for_training(cell, out)
        ctx.log(f"{tag}: {cell.action}")
        try:
            _train_one(cell, cfg, ctx, tag)
        except LipganError as exc:
            # A run the trainer stopped and recorded as failed (a non-finite loss) is a
            # result; anything else (a bad flag) would fail every run alike: stop here.
            if _status(cell.path).get("state") != "failed":
                raise
            ctx.log(f"{tag}: {exc}")
        status = _status(cell.path)
        reason = f" ({status['reason']})" if status.get("reason") else ""
        ctx.log(
            f"{tag}: {status.get('state')}{reason}, {status.get('step')} steps in "
            f"{float(status.get('wall_s') or 0):.1f} s"
        )
    if can_eval and _evaluable(cell, cfg):
        t0 = time.perf_counter()
        from lipgan.metrics import sampling
        from lipgan.train.device import resolve_device

        device = resolve_device(cfg.device or "auto")
        res = sampling.evaluate_run(
            cell.path, n=cfg.eval_n, dataset=cfg.dataset, device=device, raw=cfg.raw
        )
        took = time.perf_counter() - t0
        ctx.log(
            f"{tag}: FID {res['fid']:.2f} (n {cfg.eval_n}, {res['generator']} generator, "
            f"evaluated in {took:.0f} s)"
        )


def worker_threads(cfg: CompareConfig) -> int:
    """Torch threads per worker: the ``threads`` training option if set (> 0), else an equal
    share of the CPUs, ``cpu_count // jobs`` (at least 1)."""
    threads = cfg.train_options.get("threads")
    if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0:
        return threads
    return sweep.default_threads(cfg.jobs)


def _metrics_available(dataset: str, log) -> bool:
    try:
        from lipgan import metrics

        ok = metrics.available(dataset)
    except ImportError:
        ok = False
    if not ok:
        log(f"compare: no shipped feature extractor for {dataset}; runs are not evaluated")
    return ok
