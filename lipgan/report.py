"""The HTML report of one training run or of a comparison of several.

`build_report(paths, out)` reads run folders (the layout of ``lipgan.runs``: ``config.yaml``,
``status.json``, ``metrics.csv``, ``eval.json``, ``samples/last.png``) and writes one
self-contained HTML file: every plot is a matplotlib PNG embedded as base64, every sample grid is
the run's own ``samples/last.png`` embedded the same way, there are no scripts and no external
requests, so the file can be mailed or opened offline.

What it shows, per method (runs grouped by ``config.yaml``'s ``method``, seeds pooled):

- the Wasserstein estimate ``E[D(real)] - E[D(fake)]`` and FID against wall time;
- the critic's measured Lipschitz constant against wall time: the largest per-sample gradient
  norm ``max_x ||grad_x D(x)||_2`` seen at real, fake and interpolated points (a lower bound on
  Lip(D)) and the product of the layers' operator norms (an upper bound), with the target 1;
- the last sample grid of every run;
- the metrics of ``eval.json`` as mean ± std over seeds (sample standard deviation, ddof 1), and
  the time per generator step; failed runs are listed with their reason.

The report only reads; it never imports torch, so it is quick and works on any machine that has
the run folders.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lipgan.errors import LipganError

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


# --------------------------------------------------------------------------- reading run folders


@dataclass
class Run:
    """One run folder as the report sees it; every part is optional except the folder itself."""

    path: Path
    config: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    eval: dict | None = None
    samples_png: bytes | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        return str(self.config.get("method") or self.name)

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed")
        return int(seed) if isinstance(seed, (int, float)) else None

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
        if isinstance(self.status.get("step"), (int, float)):
            return int(self.status["step"])
        steps = _finite(self.metrics.get("step", np.empty(0)))
        return int(steps.max()) if steps.size else None

    @property
    def wall_s(self) -> float | None:
        if isinstance(self.status.get("wall_s"), (int, float)):
            return float(self.status["wall_s"])
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


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            value = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LipganError(f"{path} is not valid JSON ({exc}); rewrite or delete it") from exc
    return value if isinstance(value, dict) else None


def _read_metrics(path: Path) -> dict[str, np.ndarray]:
    """metrics.csv as columns of float64; empty cells are NaN. A last line cut short by a killed
    process (fewer cells than the header, or a cell that is not a number) is dropped."""
    try:
        fh = open(path, newline="", encoding="utf-8")
    except FileNotFoundError:
        return {}
    with fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            return {}
        rows: list[list[float]] = []
        for cells in reader:
            if len(cells) != len(header):
                continue
            try:
                rows.append([float(c) if c.strip() else math.nan for c in cells])
            except ValueError:
                continue
    data = np.array(rows, dtype=np.float64).reshape(len(rows), len(header))
    return {name: data[:, i] for i, name in enumerate(header)}


def is_run_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "status.json").is_file() or (p / "config.yaml").is_file()


def load_run(path: str | os.PathLike) -> Run:
    """Read one run folder. Raises LipganError when ``path`` is not a run folder."""
    import yaml

    p = Path(path)
    if not p.is_dir():
        raise LipganError(f"{p} is not a folder; pass run folders written by `lipgan train`")
    if not is_run_folder(p):
        raise LipganError(
            f"{p} has neither status.json nor config.yaml; pass run folders written by "
            "`lipgan train` (or a `lipgan compare` folder)"
        )
    config: dict = {}
    if (p / "config.yaml").is_file():
        try:
            loaded = yaml.safe_load((p / "config.yaml").read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise LipganError(f"{p / 'config.yaml'} is not valid YAML ({exc})") from exc
        config = loaded if isinstance(loaded, dict) else {}
    last_png = p / "samples" / "last.png"
    return Run(
        path=p,
        config=config,
        status=_read_json(p / "status.json") or {},
        metrics=_read_metrics(p / "metrics.csv"),
        eval=_read_json(p / "eval.json"),
        samples_png=last_png.read_bytes() if last_png.is_file() else None,
    )


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run folders named by ``paths``: a run folder stands for itself; a folder that is not one
    (a ``lipgan compare`` output, or any parent) stands for the run folders in it and in its
    ``runs/`` subfolder, sorted by name."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise LipganError(f"{p} does not exist; pass run folders written by `lipgan train`")
        if is_run_folder(p):
            out.append(p)
            continue
        found = [
            child
            for parent in (p, p / "runs")
            if parent.is_dir()
            for child in sorted(parent.iterdir())
            if child.is_dir() and is_run_folder(child)
        ]
        if not found:
            raise LipganError(
                f"{p} is neither a run folder nor holds any (no status.json or config.yaml); "
                "pass folders written by `lipgan train` or `lipgan compare`"
            )
        out.extend(found)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


# --------------------------------------------------------------------------- summaries


def mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (ddof 1; NaN for a single value) of finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return None
    a = np.asarray(finite)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan


def group_by_method(runs: Sequence[Run], order: Sequence[str] | None = None) -> dict[str, list]:
    """Runs grouped by method, in ``order`` first, then in order of appearance."""
    groups: dict[str, list[Run]] = {m: [] for m in order or ()}
    for run in runs:
        groups.setdefault(run.method, []).append(run)
    return {m: rs for m, rs in groups.items() if rs}


def run_row(run: Run) -> dict:
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
SUMMARY_COLUMNS = (*EVAL_KEYS, *COST_COLUMNS)


def summarize(runs: Sequence[Run], order: Sequence[str] | None = None) -> list[dict]:
    """Per method: counts and, for each column of SUMMARY_COLUMNS, (mean, std) over its finished
    runs (state ``done``); failed and unfinished runs are counted but not averaged."""
    out = []
    for method, group in group_by_method(runs, order).items():
        done = [r for r in group if r.state == "done"]
        rows = [run_row(r) for r in done]
        entry: dict = {
            "method": method,
            "runs": len(group),
            "done": len(done),
            "failed": sum(r.state == "failed" for r in group),
            "stats": {key: mean_std([row[key] for row in rows]) for key, _, _ in SUMMARY_COLUMNS},
        }
        out.append(entry)
    return out


# --------------------------------------------------------------------------- plots


def _figure(width: float = 6.4, height: float = 3.6):
    # The object API (no pyplot): no global figure state and no GUI backend is ever chosen.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _colors(methods: Sequence[str]) -> dict[str, str]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _plot_series(ax, runs_by_method, colors, y_of, *, marker: str = "o") -> int:
    """One line per run, one colour per method, seeds told apart by line style. Returns how many
    runs had at least one point."""
    styles = ("-", "--", ":", "-.")
    drawn = 0
    for method, group in runs_by_method.items():
        labelled = False
        for i, run in enumerate(group):
            t = run.column("time_s")
            y = y_of(run)
            if not len(t) or not len(y):
                continue
            ok = np.isfinite(t) & np.isfinite(y)
            if not ok.any():
                continue
            ax.plot(
                t[ok],
                y[ok],
                color=colors[method],
                linestyle=styles[i % len(styles)],
                # markers only on short series, where a line alone may be a single invisible point
                marker=marker if ok.sum() < 30 else None,
                markersize=3,
                linewidth=1.2,
                label=None if labelled else method,
            )
            labelled = True
            drawn += 1
    return drawn


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_wasserstein(runs_by_method, colors) -> str:
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot()
    if _plot_series(ax, runs_by_method, colors, lambda r: r.column("wasserstein")):
        ax.axhline(0.0, color="0.6", linewidth=0.8)
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("E[D(real)] − E[D(fake)]")
        ax.legend(fontsize=8)
    else:
        _no_data(ax, "Wasserstein estimate")
    ax.set_title("Wasserstein estimate")
    return _png_b64(fig)


def plot_fid(runs_by_method, colors) -> str:
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot()
    if _plot_series(ax, runs_by_method, colors, lambda r: r.column("fid"), marker="o"):
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("FID (logged while training)")
        ax.legend(fontsize=8)
        # Log scale only when FID spans more than a decade (early FIDs dwarf late ones).
        fids = np.concatenate(
            [_finite(r.column("fid")) for g in runs_by_method.values() for r in g]
        )
        if fids.size and fids.min() > 0 and fids.max() / fids.min() > 10:
            ax.set_yscale("log")
    else:
        _no_data(ax, "FID")
    ax.set_title("FID during training")
    return _png_b64(fig)


def plot_lipschitz(runs_by_method, colors) -> str:
    """One panel per method (shared log y axis): the largest gradient norm seen (solid, a lower
    bound on Lip(D)) and the product bound (dotted with markers, an upper bound) against time,
    with the target Lip(D) = 1. Panels, not one crowded plot: seven methods times two bounds
    times the seeds would be unreadable overlaid."""
    methods = list(runs_by_method)
    ncols = max(1, min(4, len(methods)))
    nrows = math.ceil(len(methods) / ncols)
    fig = _figure(3.2 * ncols + 0.6, 2.6 * nrows + 0.7)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    drawn = 0
    for ax, method in zip(axes, methods):
        panel = 0
        for i, run in enumerate(runs_by_method[method]):
            t = run.column("time_s")
            if not len(t):
                continue
            for y, style, marker in (
                (run.max_grad_norm(), "-", "o"),
                (run.column("product_bound"), ":", "s"),
            ):
                ok = np.isfinite(t) & np.isfinite(y) & (y > 0)
                if not ok.any():
                    continue
                ax.plot(
                    t[ok],
                    y[ok],
                    color=colors[method],
                    linestyle=style,
                    # dots on a short solid series, so that a single point still shows
                    marker=marker if style == ":" or ok.sum() < 30 else None,
                    markersize=3,
                    linewidth=1.2,
                    alpha=1.0 if i == 0 else 0.55,
                )
                panel += 1
        ax.axhline(1.0, color="black", linewidth=1.0, linestyle="--")
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("wall time (s)", fontsize=8)
        ax.tick_params(labelsize=8)
        if not panel:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        drawn += panel
    for ax in axes[len(methods) :]:
        ax.set_visible(False)
    if drawn:
        axes[0].set_yscale("log")
    axes[0].set_ylabel("Lip(D)")
    from matplotlib.lines import Line2D

    fig.legend(
        handles=[
            Line2D([], [], color="0.3", linestyle="-", label="max ‖∇D(x)‖ (lower bound)"),
            Line2D([], [], color="0.3", linestyle=":", marker="s", label="product bound (upper)"),
            Line2D([], [], color="black", linestyle="--", label="target 1"),
        ],
        loc="outside upper center",
        ncol=3,
        fontsize=8,
    )
    return _png_b64(fig)


# --------------------------------------------------------------------------- HTML


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–" if math.isnan(value) else str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.{digits}g}"
    return str(value)


def _fmt_stat(stat: tuple[float, float] | None) -> str:
    if stat is None:
        return "–"
    mean, std = stat
    return _fmt(mean) if math.isnan(std) else f"{_fmt(mean)} ± {_fmt(std, 2)}"


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
)


def compare_order(paths: Iterable[str | os.PathLike]) -> list[str] | None:
    """The method order of the first ``lipgan compare`` folder among ``paths`` (its
    compare.json), so tables list methods as the comparison asked for them; None if none."""
    for raw in paths:
        info = _read_json(Path(raw) / "compare.json") if Path(raw).is_dir() else None
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


def markdown_summary(paths: Iterable[str | os.PathLike], order: Sequence[str] | None = None) -> str:
    """The per-method summary as a Markdown table (mean ± std over finished runs), with a
    ``done/runs`` column; a method whose runs all failed shows the first failure's reason."""
    paths = list(paths)
    order = order if order is not None else compare_order(paths)
    runs = [load_run(p) for p in expand_paths(paths)]
    summary = summarize(runs, order)
    by_method = group_by_method(runs, order)
    head = ["method", "done", *(h for _, h in MARKDOWN_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in summary:
        cells = [entry["method"], f"{entry['done']}/{entry['runs']}"]
        if entry["done"]:
            cells += [_md_stat(entry["stats"].get(key)) for key, _ in MARKDOWN_COLUMNS]
        else:
            failed = [r for r in by_method[entry["method"]] if r.state == "failed"]
            reason = (failed[0].reason or "failed") if failed else "not finished"
            cells += [reason.replace("|", "/")] + ["–"] * (len(MARKDOWN_COLUMNS) - 1)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
tr.failed td { background: #fde8e8; } tr.incomplete td { background: #fff7e0; }
.scroll { overflow-x: auto; }
.plots { display: flex; flex-wrap: wrap; gap: 0.5em; }
.plots img { max-width: 100%; height: auto; display: block; }
.grids { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; text-align: center; } figcaption { font-size: 0.8em; max-width: 240px; }
figure img { width: 224px; height: 224px; image-rendering: pixelated; border: 1px solid #ccc; }
.note { font-size: 0.85em; color: #555; } code { background: #f4f4f4; padding: 0 0.2em; }
.missing { width: 224px; height: 224px; display: flex; align-items: center;
           justify-content: center; border: 1px dashed #c00; color: #c00; font-size: 0.85em; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _common_config(runs: Sequence[Run]) -> dict:
    """Config entries shared by every run (so the page says what was held fixed)."""
    keys = ("model", "width", "dataset", "batch_size", "device", "precision", "steps", "max_time_s")
    out = {}
    for key in keys:
        values = {json.dumps(r.config.get(key), sort_keys=True, default=str) for r in runs}
        if len(values) == 1 and runs and runs[0].config.get(key) not in (None, 0, 0.0):
            out[key] = runs[0].config[key]
    if "max_time_s" in out:
        out.pop("steps", None)  # a time-bounded run's step count is only a cap
    return out


def _summary_table(summary: list[dict], columns, table_id: str) -> str:
    head = "".join(f'<th title="{_e(help_)}">{_e(header)}</th>' for _, header, help_ in columns)
    rows = []
    for entry in summary:
        cls = "failed" if entry["done"] == 0 and entry["failed"] else ""
        cells = "".join(f"<td>{_e(_fmt_stat(entry['stats'][key]))}</td>" for key, _, _ in columns)
        rows.append(
            f'<tr class="{cls}"><td class="l">{_e(entry["method"])}</td>'
            f"<td>{entry['done']} / {entry['runs']}</td><td>{entry['failed']}</td>{cells}</tr>"
        )
    return (
        f'<div class="scroll"><table id="{table_id}"><thead><tr><th class="l">method</th>'
        f"<th>done / runs</th><th>failed</th>{head}</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
    )


def _runs_table(runs: Sequence[Run]) -> str:
    cols = (
        ("steps", "G steps"),
        ("wall_s", "wall s"),
        ("ms_per_step", "ms / G step"),
        ("wasserstein", "W estimate"),
        ("max_grad_norm", "max ‖∇D‖"),
        ("product_bound", "product bound"),
        *((k, h) for k, h, _ in EVAL_KEYS),
    )
    head = "".join(f"<th>{_e(h)}</th>" for _, h in cols)
    rows = []
    for run in runs:
        row = run_row(run)
        state = run.state
        cls = {"done": "", "failed": "failed"}.get(state, "incomplete")
        text = state if not run.reason else f"{state}: {run.reason}"
        cells = "".join(f"<td>{_e(_fmt(row[k]))}</td>" for k, _ in cols)
        rows.append(
            f'<tr class="{cls}"><td class="l">{_e(run.name)}</td><td class="l">'
            f"{_e(run.method)}</td><td>{_e(_fmt(run.seed))}</td>"
            f'<td class="l state">{_e(text)}</td>{cells}</tr>'
        )
    return (
        '<div class="scroll"><table id="runs"><thead><tr><th class="l">run</th>'
        f'<th class="l">method</th><th>seed</th><th class="l">state</th>{head}</tr></thead>'
        "<tbody>" + "".join(rows) + "</tbody></table></div>"
    )


def _grids(runs_by_method: dict[str, list[Run]]) -> str:
    parts = []
    for method, group in runs_by_method.items():
        for run in group:
            caption = f"{method}, seed {_fmt(run.seed)}, step {_fmt(run.steps_done)}"
            if run.state != "done":
                caption += f" ({run.state})"
            if run.samples_png:
                b64 = base64.b64encode(run.samples_png).decode("ascii")
                body = (
                    f'<img src="data:image/png;base64,{b64}" alt="{_e("samples of " + caption)}">'
                )
            else:
                body = '<div class="missing">no samples/last.png</div>'
            parts.append(f"<figure>{body}<figcaption>{_e(caption)}</figcaption></figure>")
    return '<div class="grids">' + "".join(parts) + "</div>"


def build_html(
    runs: Sequence[Run], *, title: str | None = None, order: Sequence[str] | None = None
) -> str:
    """The report page for ``runs`` as one HTML string (plots and grids inline as base64 PNG)."""
    if not runs:
        raise LipganError("no runs to report on; pass at least one run folder")
    by_method = group_by_method(runs, order)
    colors = _colors(list(by_method))
    summary = summarize(runs, order)
    if title is None:
        title = f"lipgan report: {runs[0].name}" if len(runs) == 1 else "lipgan comparison"
    common = _common_config(runs)
    fixed = ", ".join(f"{k} {v}" for k, v in common.items()) or "see each run's config.yaml"
    eval_ns = {r.eval.get("n") for r in runs if r.eval}
    eval_note = (
        f"eval.json metrics on n = {', '.join(str(n) for n in sorted(eval_ns, key=str))} samples"
        if eval_ns
        else "no eval.json yet (run `lipgan eval RUN`)"
    )
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    plots = (
        plot_wasserstein(by_method, colors),
        plot_fid(by_method, colors),
        plot_lipschitz(by_method, colors),
    )
    plot_alts = (
        "Wasserstein estimate against wall time",
        "FID against wall time",
        "critic Lipschitz constant against wall time",
    )
    plot_html = "".join(
        f'<img src="data:image/png;base64,{b64}" alt="{_e(alt)}">'
        for b64, alt in zip(plots, plot_alts)
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="note">{len(runs)} run(s), {len(by_method)} method(s). Held fixed: {_e(fixed)}.
{_e(eval_note)}. Generated {_e(generated)}.</p>

<h2>Sample quality per method (mean ± std over seeds)</h2>
{_summary_table(summary, EVAL_KEYS, "summary")}
<h2>Lipschitz constant and cost per method (mean ± std over seeds)</h2>
{_summary_table(summary, COST_COLUMNS, "cost")}
<p class="note">Averages are over finished runs (state <code>done</code>); the standard deviation
is the sample one (n − 1) and is left out for a single seed. Hover a header for what it means.</p>

<h2>Runs</h2>
{_runs_table(runs)}

<h2>Training curves</h2>
<div class="plots">{plot_html}</div>
<p class="note">The Wasserstein estimate is E[D(real)] − E[D(fake)]: positive, and shrinking as
the generator improves, when the critic is (close to) 1-Lipschitz; its size is only comparable
between methods that hold the critic to the same constant. In the Lipschitz plot, solid lines are
the largest per-sample gradient norm seen (a lower bound on the critic's constant), dotted lines
the product of the layers' operator norms (an upper bound); the dashed line is the target 1.</p>

<h2>Samples (last grid of each run)</h2>
{_grids(by_method)}
</body></html>
"""


def build_report(
    paths: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    title: str | None = None,
    order: Sequence[str] | None = None,
) -> Path:
    """Read run folders (or folders holding them) and write the HTML report to ``out``.

    The file is written to a temporary name and renamed, so a reader never sees half a page.
    Returns the path written.
    """
    paths = list(paths)
    order = order if order is not None else compare_order(paths)
    runs = [load_run(p) for p in expand_paths(paths)]
    page = build_html(runs, title=title, order=order)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
