"""The report's view of run folders: one :class:`RunView` per run, summaries and tables.

Everything is read through :class:`lipgan.runs.RunFolder` (the one reader of run folders); a
hand-edited folder (NaN counters, a non-UTF-8 config, an unreadable CSV) gives one-line errors
or an empty cell, never a traceback.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lipgan.errors import LipganError
from lipgan.report.quality import TIME_COLUMNS, fid_marks_row
from lipgan.runs.folder import RunFolder, expand_paths, scored_generator

#: eval.json keys in table order, with their headers and whether lower is better.
EVAL_KEYS: tuple[tuple[str, str, str], ...] = (
    ("fid", "FID", "lower is better"),
    ("kid", "KID", "lower is better; unbiased, may be < 0"),
    ("is", "IS", "higher is better, at most 10"),
    ("precision", "precision", "higher is better"),
    ("recall", "recall", "higher is better"),
    ("density", "density", "about 1 for real data"),
    ("coverage", "coverage", "higher is better"),
    ("classes_covered", "classes", "of 10"),
    ("class_kl", "class KL", "lower is better"),
)

_GNORM_MAX = ("gnorm_real_max", "gnorm_fake_max", "gnorm_interp_max")


def _number(value) -> float | None:
    """A finite int or float from a JSON/YAML value (bools, strings, NaN and inf: None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class RunView:
    """One run folder as the report sees it; every part is optional except the folder itself.

    ``label`` names the group the run is pooled in (a ``lipgan compare`` variant such as
    ``w64``); without one, runs are pooled by their config's ``method``."""

    path: Path
    config: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    eval: dict | None = None
    samples_png: bytes | None = None
    label: str | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        return str(self.config.get("method") or self.name)

    @property
    def group(self) -> str:
        """What the run is pooled under: its label, else its method."""
        return self.label or self.method

    @property
    def seed(self) -> int | None:
        seed = _number(self.config.get("seed"))
        return None if seed is None else int(seed)

    @property
    def state(self) -> str:
        """``done``, ``failed``, ``running`` as written, or ``unknown`` without status.json."""
        return str(self.status.get("state") or "unknown")

    @property
    def reason(self) -> str | None:
        reason = self.status.get("reason")
        return None if reason is None else str(reason)

    @property
    def steps_done(self) -> int | None:
        step = _number(self.status.get("step"))
        if step is not None:
            return int(step)
        steps = _finite(self.metrics.get("step", np.empty(0)))
        return int(steps.max()) if steps.size else None

    @property
    def wall_s(self) -> float | None:
        wall = _number(self.status.get("wall_s"))
        if wall is not None:
            return wall
        t = self.metrics.get("time_s")
        return float(np.nanmax(t)) if t is not None and np.isfinite(t).any() else None

    def column(self, name: str) -> np.ndarray:
        """A metrics.csv column as float64 (NaN where not measured); empty when absent."""
        return self.metrics.get(name, np.full(len(self), np.nan))

    def __len__(self) -> int:
        return len(next(iter(self.metrics.values()))) if self.metrics else 0

    def ms_per_step(self) -> float | None:
        """Time per generator step in ms: the median of the logged ``ms_per_step`` (robust to the
        first, warm-up steps and to evaluation pauses), else ``wall_s / step``."""
        ms = _finite(self.column("ms_per_step"))
        if ms.size:
            return float(np.median(ms))
        steps, wall = self.steps_done, self.wall_s
        if steps and wall:
            return 1000.0 * wall / steps
        return None

    def max_grad_norm(self) -> np.ndarray:
        """Per logged row, the largest gradient norm over real, fake and interpolated points."""
        cols = [self.column(c) for c in _GNORM_MAX]
        stacked = np.vstack(cols) if cols and len(self) else np.empty((0, 0))
        if stacked.size == 0:
            return np.empty(0)
        out = np.full(stacked.shape[1], np.nan)
        has = np.isfinite(stacked).any(axis=0)
        out[has] = np.nanmax(stacked[:, has], axis=0)
        return out

    def last(self, name: str) -> float | None:
        """Last measured value of a metrics.csv column (or of ``max_grad_norm``)."""
        values = self.max_grad_norm() if name == "max_grad_norm" else self.column(name)
        finite = values[np.isfinite(values)] if values.size else values
        return float(finite[-1]) if finite.size else None


def _finite(a: np.ndarray) -> np.ndarray:
    return a[np.isfinite(a)] if a.size else a


def load_run(path: str | os.PathLike) -> RunView:
    """Read one run folder. Raises LipganError when ``path`` is not a run folder."""
    folder = RunFolder(path)
    p = folder.path
    if not p.is_dir():
        raise LipganError(f"{p} is not a folder; pass run folders written by `lipgan train`")
    if not folder.is_run():
        raise LipganError(
            f"{p} has neither status.json nor config.yaml; pass run folders written by "
            "`lipgan train` (or a `lipgan compare` folder)"
        )
    return RunView(
        path=p,
        config=folder.read_config() if folder.config_path.is_file() else {},
        status=folder.read_status() or {},
        metrics=folder.metrics_columns(),
        eval=folder.read_eval(),
        samples_png=folder.samples_png(),
    )


def mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (ddof 1; NaN for a single value) of finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return None
    a = np.asarray(finite)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan


def group_by_method(runs: Sequence[RunView], order: Sequence[str] | None = None) -> dict[str, list]:
    """Runs grouped by :attr:`RunView.group` (variant label, else method), in ``order`` first,
    then in order of appearance."""
    groups: dict[str, list[RunView]] = {m: [] for m in order or ()}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return {m: rs for m, rs in groups.items() if rs}


def group_name(group: str, runs: Sequence[RunView]) -> str:
    """A group's name for a table: the variant, with the method(s) it trains when they differ
    from its name (``w64 (frobenius)``)."""
    methods = sorted({r.method for r in runs} - {group})
    return f"{group} ({', '.join(methods)})" if methods else group


_SEEDED = re.compile(r"-seed\d+")


def variant_labels(paths: Iterable[str | os.PathLike]) -> dict[Path, str]:
    """Run folder -> variant, for the runs of the ``lipgan compare`` folders among ``paths``:
    a compare folder keeps the run of variant V and seed k in OUT/runs/V-seed<k>, and its
    compare.json lists the variants under ``methods``."""
    out: dict[Path, str] = {}
    for raw in paths:
        names = (_compare_json(raw) or {}).get("methods")
        runs_dir = Path(raw) / "runs"
        if not isinstance(names, list) or not runs_dir.is_dir():
            continue
        wanted = {n for n in names if isinstance(n, str)}
        try:
            found = list(runs_dir.iterdir())
        except OSError:  # unreadable: expand_paths says so, in one line
            continue
        for run in found:
            variant, seeded, rest = run.name.rpartition("-seed")
            if seeded and variant in wanted and _SEEDED.fullmatch(seeded + rest):
                out[run.resolve()] = variant
    return out


def load_runs(
    paths: Iterable[str | os.PathLike], labels: dict[Path, str] | None = None
) -> list[RunView]:
    """Every run folder among ``paths`` (compare folders expanded), each labelled with its
    variant: ``labels`` (run folder -> name) over those :func:`variant_labels` reads."""
    paths = list(paths)
    given = {Path(p).resolve(): name for p, name in (labels or {}).items()}
    found = {**variant_labels(paths), **given}
    runs = [load_run(p) for p in expand_paths(paths)]
    for run in runs:
        run.label = found.get(run.path.resolve())
    return runs


def run_row(run: RunView) -> dict:
    """One flat row per run (the columns of results.csv)."""
    row: dict = {
        "run": run.name,
        "method": run.method,
        "seed": run.seed,
        "state": run.state,
        "reason": run.reason or "",
        "steps": run.steps_done,
        "wall_s": run.wall_s,
        "ms_per_step": run.ms_per_step(),
        "wasserstein": run.last("wasserstein"),
        "max_grad_norm": run.last("max_grad_norm"),
        "product_bound": run.last("product_bound"),
    }
    for key, _, _ in EVAL_KEYS:
        value = (run.eval or {}).get(key)
        row[key] = float(value) if isinstance(value, (int, float)) else None
    row["eval_n"] = (run.eval or {}).get("n")
    row["generator"] = scored_generator(run.eval) if run.eval else None
    row.update(fid_marks_row(run))
    return row


#: the per-method Lipschitz-and-cost table: (row key, header, help)
COST_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("wasserstein", "W estimate", "last logged E[D(real)] - E[D(fake)]"),
    ("max_grad_norm", "max ‖∇D‖", "last logged; a lower bound on Lip(D); target 1"),
    ("product_bound", "product bound", "last logged; an upper bound on Lip(D)"),
    ("ms_per_step", "ms / G step", "median over logged rows"),
    ("steps", "G steps", "generator steps done"),
    ("wall_s", "wall s", "training wall time"),
)
SUMMARY_COLUMNS = (*EVAL_KEYS, *COST_COLUMNS, *TIME_COLUMNS)


def summarize(runs: Sequence[RunView], order: Sequence[str] | None = None) -> list[dict]:
    """Per method: counts and, for each column of SUMMARY_COLUMNS, (mean, std) over its finished
    runs (state ``done``); failed and unfinished runs are counted but not averaged."""
    out = []
    for method, group in group_by_method(runs, order).items():
        done = [r for r in group if r.state == "done"]
        rows = [run_row(r) for r in done]
        entry: dict = {
            "method": method,
            "name": group_name(method, group),
            "runs": len(group),
            "done": len(done),
            "failed": sum(r.state == "failed" for r in group),
            "stats": {key: mean_std([row[key] for row in rows]) for key, _, _ in SUMMARY_COLUMNS},
        }
        out.append(entry)
    return out


#: the columns of :func:`markdown_summary`: (key, header)
MARKDOWN_COLUMNS: tuple[tuple[str, str], ...] = (
    ("fid", "FID"),
    ("is", "IS"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("classes_covered", "classes"),
    ("wasserstein", "W estimate"),
    ("max_grad_norm", "max ‖∇D‖"),
    ("product_bound", "product bound"),
    ("ms_per_step", "ms / G step"),
    ("steps", "G steps"),
    *((key, header) for key, header, _ in TIME_COLUMNS),
)


def compare_order(paths: Iterable[str | os.PathLike]) -> list[str] | None:
    """The method order of the first ``lipgan compare`` folder among ``paths`` (its
    compare.json), so tables list methods as the comparison asked for them; None if none."""
    for raw in paths:
        info = _compare_json(raw)
        methods = (info or {}).get("methods")
        if isinstance(methods, list) and all(isinstance(m, str) for m in methods):
            return methods
    return None


def _md_num(v: float) -> str:
    """A number for a reading table: 3 significant digits, no exponent below 1e5."""
    if not math.isfinite(v):
        return str(v)
    if v == int(v) and abs(v) < 1e5:
        return str(int(v))
    a = abs(v)
    if a >= 1e5 or (0 < a < 1e-3):
        return f"{v:.2e}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _md_stat(stat: tuple[float, float] | None) -> str:
    if stat is None:
        return "–"
    mean, std = stat
    return _md_num(mean) if math.isnan(std) else f"{_md_num(mean)} ± {_md_num(std)}"


def _md_cell(text: str) -> str:
    """A table cell that cannot break the table or smuggle markup: ``|`` escaped, ``<`` and
    ``>`` as entities, on one line."""
    text = " ".join(str(text).split())
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


#: the time-to-quality columns of :func:`markdown_summary` (``lipgan compare`` prints them)
QUALITY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("fid", "FID"),
    *((key, header) for key, header, _ in TIME_COLUMNS),
)


def markdown_summary(
    paths: Iterable[str | os.PathLike],
    order: Sequence[str] | None = None,
    columns: Sequence[tuple[str, str]] = MARKDOWN_COLUMNS,
) -> str:
    """The per-method summary as a Markdown table (mean ± std over finished runs) of
    ``columns`` (key, header), with a ``done/runs`` column; a method whose runs all failed shows
    the first failure's reason."""
    paths = list(paths)
    order = order if order is not None else compare_order(paths)
    runs = load_runs(paths)
    summary = summarize(runs, order)
    by_method = group_by_method(runs, order)
    head = ["method", "done", *(h for _, h in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in summary:
        cells = [entry["name"], f"{entry['done']}/{entry['runs']}"]
        if entry["done"]:
            cells += [_md_stat(entry["stats"].get(key)) for key, _ in columns]
        else:
            failed = [r for r in by_method[entry["method"]] if r.state == "failed"]
            reason = (failed[0].reason or "failed") if failed else "not finished"
            cells += [reason] + ["–"] * (len(columns) - 1)
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _compare_json(raw: str | os.PathLike) -> dict | None:
    """A ``lipgan compare`` folder's compare.json, or None (read like any run-folder JSON)."""
    path = Path(raw)
    if not path.is_dir():
        return None
    return RunFolder(path)._read_json(path / "compare.json")
