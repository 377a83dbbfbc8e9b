"""The report's HTML page: one self-contained file (inline CSS, plots and grids as data: URIs)."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from lipgan.errors import LipganError
from lipgan.report.plots import (
    _colors,
    plot_fid,
    plot_lipschitz,
    plot_time_to_quality,
    plot_wasserstein,
)
from lipgan.report.quality import TIME_COLUMNS
from lipgan.report.tables import (
    COST_COLUMNS,
    EVAL_KEYS,
    RunView,
    compare_order,
    group_by_method,
    load_runs,
    run_row,
    summarize,
)
from lipgan.runs.files import atomic_write_text
from lipgan.runs.folder import scored_generator

#: sample grids are shown at this many screen pixels per image pixel (nearest neighbour), so
#: that a 28-pixel digit is large enough to judge
GRID_SCALE = 2


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
figure { margin: 0; text-align: center; } figcaption { font-size: 0.8em; }
figure img { max-width: 100%; height: auto; image-rendering: pixelated; border: 1px solid #ccc; }
.note { font-size: 0.85em; color: #555; } code { background: #f4f4f4; padding: 0 0.2em; }
.missing { width: 224px; height: 224px; display: flex; align-items: center;
           justify-content: center; border: 1px dashed #c00; color: #c00; font-size: 0.85em; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _common_config(runs: Sequence[RunView]) -> dict:
    """Config entries shared by every run (so the page says what was held fixed)."""
    keys = ("model", "width", "dataset", "batch_size", "device", "precision", "steps", "max_time_s",
            "max_cpu_s")
    out = {}
    for key in keys:
        values = {json.dumps(r.config.get(key), sort_keys=True, default=str) for r in runs}
        if len(values) == 1 and runs and runs[0].config.get(key) not in (None, 0, 0.0):
            out[key] = runs[0].config[key]
    if "max_time_s" in out or "max_cpu_s" in out:
        out.pop("steps", None)  # a time-bounded run's step count is only a cap
    return out


def _summary_table(summary: list[dict], columns, table_id: str) -> str:
    head = "".join(f'<th title="{_e(help_)}">{_e(header)}</th>' for _, header, help_ in columns)
    rows = []
    for entry in summary:
        cls = "failed" if entry["done"] == 0 and entry["failed"] else ""
        cells = "".join(f"<td>{_e(_fmt_stat(entry['stats'][key]))}</td>" for key, _, _ in columns)
        rows.append(
            f'<tr class="{cls}"><td class="l">{_e(entry["name"])}</td>'
            f"<td>{entry['done']} / {entry['runs']}</td><td>{entry['failed']}</td>{cells}</tr>"
        )
    return (
        f'<div class="scroll"><table id="{table_id}"><thead><tr><th class="l">method</th>'
        f"<th>done / runs</th><th>failed</th>{head}</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
    )


def _runs_table(runs: Sequence[RunView]) -> str:
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
            f'<tr class="{cls}"><td class="l">{_e(run.name)}</td><td class="l">{_e(run.group)}'
            f'</td><td class="l">{_e(run.method)}</td><td>{_e(_fmt(run.seed))}</td>'
            f'<td class="l state">{_e(text)}</td>{cells}</tr>'
        )
    return (
        '<div class="scroll"><table id="runs"><thead><tr><th class="l">run</th>'
        '<th class="l">variant</th><th class="l">method</th><th>seed</th>'
        f'<th class="l">state</th>{head}</tr></thead>'
        "<tbody>" + "".join(rows) + "</tbody></table></div>"
    )


def _png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR chunk (bytes 16-24), or None if it is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return (width, height) if 0 < width <= 2**15 and 0 < height <= 2**15 else None


def _grids(runs_by_method: dict[str, list[RunView]]) -> str:
    parts = []
    for method, group in runs_by_method.items():
        for run in group:
            caption = f"{method}, seed {_fmt(run.seed)}, step {_fmt(run.steps_done)}"
            if run.state != "done":
                caption += f" ({run.state})"
            if run.samples_png:
                b64 = base64.b64encode(run.samples_png).decode("ascii")
                size = _png_size(run.samples_png)
                # GRID_SCALE screen pixels per image pixel, nearest neighbour (CSS pixelated)
                dims = ""
                if size is not None:
                    dims = f' width="{GRID_SCALE * size[0]}" height="{GRID_SCALE * size[1]}"'
                alt = _e("samples of " + caption)
                body = f'<img src="data:image/png;base64,{b64}"{dims} alt="{alt}">'
            else:
                body = '<div class="missing">no samples/last.png</div>'
            parts.append(f"<figure>{body}<figcaption>{_e(caption)}</figcaption></figure>")
    return '<div class="grids">' + "".join(parts) + "</div>"


def build_html(
    runs: Sequence[RunView], *, title: str | None = None, order: Sequence[str] | None = None
) -> str:
    """The report page for ``runs`` as one HTML string (plots and grids inline as base64 PNG);
    runs are pooled by :attr:`RunView.group` (their variant label, else their method)."""
    return _page(runs, title, order)


def _page(runs: Sequence[RunView], title: str | None, order: Sequence[str] | None) -> str:
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
    scored = sorted({scored_generator(r.eval) for r in runs if r.eval})
    eval_note = (
        f"eval.json metrics on n = {', '.join(str(n) for n in sorted(eval_ns, key=str))} samples"
        f" of the {' and '.join(scored)} generator{'s' if len(scored) > 1 else ''}"
        if eval_ns
        else "no eval.json yet (run `lipgan eval RUN`)"
    )
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    quality = plot_time_to_quality(by_method, colors)
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
<p class="note">{len(runs)} run(s), {len(by_method)} method(s) or variant(s).
Held fixed: {_e(fixed)}. {_e(eval_note)}. Generated {_e(generated)}.</p>

<h2>Sample quality per method (mean ± std over seeds)</h2>
{_summary_table(summary, EVAL_KEYS, "summary")}
<h2>Lipschitz constant and cost per method (mean ± std over seeds)</h2>
{_summary_table(summary, COST_COLUMNS, "cost")}
<p class="note">Averages are over finished runs (state <code>done</code>); the standard deviation
is the sample one (n − 1) and is left out for a single seed. Hover a header for what it means.</p>

<h2>Time to quality (mean ± std over seeds)</h2>
{_summary_table(summary, TIME_COLUMNS, "quality")}
<div class="plots"><img src="data:image/png;base64,{quality}"
alt="time to quality: FID against wall time and CPU time"></div>
<p class="note">FID of the FID rows each run logged while training (metrics.csv), against the
run's wall time and its training process's CPU seconds (<code>cpu_s</code>; runs written before
that column existed have none). The line is the mean over seeds, each seed interpolated at the
seeds' own FID times, the band ± one sample standard deviation. The table takes each run's FID
at the mark (its row for that mark, else interpolated between the rows around it).</p>

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
    labels: dict | None = None,
) -> Path:
    """Read run folders (or folders holding them) and write the HTML report to ``out``.

    Runs are pooled by variant: ``labels`` (run folder -> name) and, for ``lipgan compare``
    folders, the variant each run folder's name gives (:func:`lipgan.report.variant_labels`);
    other runs by their method. The file is written to a temporary name and renamed, so a
    reader never sees half a page. Returns the path written.
    """
    paths = list(paths)
    order = order if order is not None else compare_order(paths)
    runs = load_runs(paths, labels)
    page = build_html(runs, title=title, order=order)
    # Temporary file, fsync, rename: a full disk or an unwritable --out is one line, and no
    # partial file is left behind (the old page, if any, stays as it was).
    return atomic_write_text(Path(out), page)
