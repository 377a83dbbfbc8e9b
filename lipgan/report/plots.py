"""The report's plots: matplotlib's object API (no pyplot, no global state), PNG as base64.

Each ``figure_*`` function returns the matplotlib Figure (tests measure it: every legend lies
inside its figure); ``plot_*`` returns the same figure as a base64 PNG for the page.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import numpy as np

from lipgan.report.quality import fid_rows, pooled_curve
from lipgan.report.tables import _finite

#: legends sit inside their axes (a legend outside the axes is cut off where a figure is small)
_LEGEND = {"fontsize": 7, "loc": "best", "framealpha": 0.85}


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


def _line(ax, t, y, *, positive: bool = False, mark_always: bool = False, **style) -> bool:
    """Plot the finite points of ``y`` against ``t`` (only ``y > 0`` with ``positive``, for a
    log axis); markers on short series, where a line alone may be one invisible point. Returns
    whether anything was drawn."""
    ok = np.isfinite(t) & np.isfinite(y) & ((y > 0) if positive else True)
    if not ok.any():
        return False
    marker = style.pop("marker")
    style["marker"] = marker if mark_always or ok.sum() < 30 else None
    ax.plot(t[ok], y[ok], markersize=3, linewidth=1.2, **style)
    return True


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
            if _line(
                ax,
                t,
                y,
                color=colors[method],
                linestyle=styles[i % len(styles)],
                marker=marker,
                label=None if labelled else method,
            ):
                labelled = True
                drawn += 1
    return drawn


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def figure_wasserstein(runs_by_method, colors):
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot()
    if _plot_series(ax, runs_by_method, colors, lambda r: r.column("wasserstein")):
        ax.axhline(0.0, color="0.6", linewidth=0.8)
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("E[D(real)] − E[D(fake)]")
        ax.legend(**_LEGEND)
    else:
        _no_data(ax, "Wasserstein estimate")
    ax.set_title("Wasserstein estimate")
    return fig


def _log_if_wide(ax, values: np.ndarray) -> None:
    # Log scale only when FID spans more than a decade (early FIDs dwarf late ones).
    if values.size and values.min() > 0 and values.max() / values.min() > 10:
        ax.set_yscale("log")


def figure_fid(runs_by_method, colors):
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot()
    if _plot_series(ax, runs_by_method, colors, lambda r: r.column("fid"), marker="o"):
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("FID (logged while training)")
        ax.legend(**_LEGEND)
        fids = [_finite(r.column("fid")) for g in runs_by_method.values() for r in g]
        _log_if_wide(ax, np.concatenate(fids))
    else:
        _no_data(ax, "FID")
    ax.set_title("FID during training")
    return fig


def figure_time_to_quality(runs_by_method, colors):
    """FID against wall seconds (left) and against the training process's CPU seconds (right),
    per method: the mean over seeds (line) ± the sample std (band), each seed's curve
    interpolated at the seeds' own FID times (:func:`lipgan.report.quality.pooled_curve`); a
    method whose seeds share no time range is drawn seed by seed."""
    fig = _figure(11.2, 3.8)
    axes = fig.subplots(1, 2)
    panels = ((axes[0], "time_s", "wall time (s)"), (axes[1], "cpu_s", "CPU time (s)"))
    for ax, x, label in panels:
        drawn, values = 0, []
        for method, group in runs_by_method.items():
            curve = pooled_curve(group, x)
            n = sum(bool(fid_rows(r, x)[0].size) for r in group)
            if curve is not None:
                t, mean, std = curve
                style = dict(color=colors[method], marker="o", markersize=3, linewidth=1.4)
                ax.plot(t, mean, label=f"{method} (n={n})", **style)
                if np.isfinite(std).any():
                    ax.fill_between(t, mean - std, mean + std, color=colors[method], alpha=0.2)
                values.append(mean)
                drawn += 1
                continue
            for i, run in enumerate(r for r in group if fid_rows(r, x)[0].size):
                t, fid = fid_rows(run, x)
                style = dict(color=colors[method], marker="o", markersize=3, linestyle="--")
                ax.plot(t, fid, label=f"{method} (seeds apart)" if i == 0 else None, **style)
                values.append(fid)
                drawn += 1
        if drawn:
            ax.set_xlabel(label)
            ax.set_ylabel("FID")
            ax.legend(**_LEGEND)
            _log_if_wide(ax, np.concatenate(values))
            ax.grid(alpha=0.3)
        else:
            _no_data(ax, "FID against " + ("CPU time (cpu_s)" if x == "cpu_s" else "wall time"))
        ax.set_title(f"time to quality: FID against {label[:-4]}")
    return fig


def figure_lipschitz(runs_by_method, colors):
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
                panel += _line(
                    ax,
                    t,
                    y,
                    positive=True,  # a log axis
                    mark_always=style == ":",
                    color=colors[method],
                    linestyle=style,
                    marker=marker,
                    alpha=1.0 if i == 0 else 0.55,
                )
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

    # In the first panel, not beside the panels: a figure of one or two panels is narrower
    # than a three-column legend (it was cut off at the left).
    axes[0].legend(
        handles=[
            Line2D([], [], color="0.3", linestyle="-", label="max ‖∇D(x)‖ (lower bound)"),
            Line2D([], [], color="0.3", linestyle=":", marker="s", label="product bound (upper)"),
            Line2D([], [], color="black", linestyle="--", label="target 1"),
        ],
        **_LEGEND,
    )
    return fig


def plot_wasserstein(runs_by_method, colors) -> str:
    return _png_b64(figure_wasserstein(runs_by_method, colors))


def plot_fid(runs_by_method, colors) -> str:
    return _png_b64(figure_fid(runs_by_method, colors))


def plot_time_to_quality(runs_by_method, colors) -> str:
    return _png_b64(figure_time_to_quality(runs_by_method, colors))


def plot_lipschitz(runs_by_method, colors) -> str:
    return _png_b64(figure_lipschitz(runs_by_method, colors))
