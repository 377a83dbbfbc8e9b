"""Time to quality: a run's FID at given times, and FID curves pooled over seeds.

A run logs FID rows in metrics.csv (``fid`` with its ``time_s`` and, from runs written since the
column exists, ``cpu_s``: the training process's CPU seconds, and ``fid_mark_s``: the wall-time
mark a row was taken for). Old folders lack ``cpu_s`` and ``fid_mark_s``; everything here works
from the columns a folder has.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: the wall-time marks of the summary table (seconds), with their column keys and headers
MARKS_S: tuple[float, ...] = (60.0, 120.0, 300.0, 600.0)
#: a mark past a run's last FID row still takes that row when it is this close (a budget run
#: ends a few percent short of its budget: compare's slack)
MARK_TOLERANCE = 0.05

TIME_COLUMNS: tuple[tuple[str, str, str], ...] = tuple(
    (
        f"fid_{int(m // 60)}m",
        f"FID @ {int(m // 60)} min",
        f"FID at {int(m)} s of wall time (of CPU time for a CPU-budget run): the row taken "
        "at that mark, else interpolated between the FID rows around it; – where the run has "
        "none",
    )
    for m in MARKS_S
)


def fid_rows(run, x: str = "time_s") -> tuple[np.ndarray, np.ndarray]:
    """The run's FID rows as ``(x, fid)``, sorted by ``x`` (``time_s`` or ``cpu_s``), finite
    only; empty arrays when the run has no such column."""
    if x not in run.metrics or "fid" not in run.metrics:
        return np.empty(0), np.empty(0)
    t, fid = run.metrics[x], run.metrics["fid"]
    ok = np.isfinite(t) & np.isfinite(fid)
    order = np.argsort(t[ok], kind="stable")
    return t[ok][order], fid[ok][order]


def run_clock(run) -> str:
    """The metrics column of a run's budget clock: ``cpu_s`` for a CPU-bounded run
    (``max_cpu_s``, e.g. `lipgan compare --budget-clock cpu`), else ``time_s`` (wall)."""
    return "cpu_s" if (run.config or {}).get("max_cpu_s") else "time_s"


def fid_at(run, seconds: float) -> float | None:
    """FID at ``seconds`` of the run's budget clock (:func:`run_clock`: wall time, or CPU time
    for a CPU-bounded run): the row logged for that mark (``fid_mark_s``), else the linear
    interpolation ``f0 + (s - t0) (f1 - f0) / (t1 - t0)`` between the FID rows around it, else
    the last row when it is within MARK_TOLERANCE of the mark; None before the first FID row or
    well past the last."""
    marks = run.metrics.get("fid_mark_s")
    if marks is not None and "fid" in run.metrics:
        hit = np.isfinite(run.metrics["fid"]) & np.isclose(marks, seconds)
        if hit.any():
            return float(run.metrics["fid"][hit][0])
    t, fid = fid_rows(run, run_clock(run))
    if not t.size or seconds < t[0]:
        return None
    if seconds <= t[-1]:
        return float(np.interp(seconds, t, fid))
    return float(fid[-1]) if t[-1] >= seconds * (1 - MARK_TOLERANCE) else None


def fid_marks_row(run) -> dict[str, float | None]:
    """``{fid_1m: ..., fid_2m: ..., ...}`` for one run (the columns of TIME_COLUMNS)."""
    return {key: fid_at(run, m) for (key, _, _), m in zip(TIME_COLUMNS, MARKS_S)}


def pooled_curve(
    runs: Sequence, x: str = "time_s"
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean and sample std (ddof 1; NaN for one run) over ``runs`` of their FID against ``x``,
    each run's curve linearly interpolated at the union of the runs' own ``x`` values inside the
    range every run covers. None when no run has two FID rows in a shared range (then each run
    is drawn on its own)."""
    curves = [c for c in (fid_rows(r, x) for r in runs) if c[0].size]
    if not curves:
        return None
    lo = max(t[0] for t, _ in curves)
    hi = min(t[-1] for t, _ in curves)
    if len(curves) > 1 and not lo < hi:
        return None
    grid = np.unique(np.concatenate([t[(t >= lo) & (t <= hi)] for t, _ in curves]))
    if grid.size < 2 and len(curves) > 1:
        return None
    ys = np.vstack([np.interp(grid, t, f) for t, f in curves])
    std = ys.std(axis=0, ddof=1) if len(curves) > 1 else np.full(grid.size, np.nan)
    return grid, ys.mean(axis=0), std
