"""The HTML report of one training run or of a comparison of several.

`build_report(paths, out)` reads run folders (through ``lipgan.runs.RunFolder``: ``config.yaml``,
``status.json``, ``metrics.csv``, ``eval.json``, ``samples/last.png``) and writes one
self-contained HTML file: every plot is a matplotlib PNG embedded as base64, every sample grid is
the run's own ``samples/last.png`` embedded the same way, there are no scripts and no external
requests, so the file can be mailed or opened offline.

What it shows, per method (runs grouped by ``config.yaml``'s ``method``, seeds pooled; the runs of
a ``lipgan compare`` folder by variant, so ``frobenius`` at several ``lam`` are told apart):

- time to quality: FID against wall seconds and against CPU seconds (mean ± std over seeds), and
  each method's FID at 1, 2, 5 and 10 minutes (:mod:`~lipgan.report.quality`);
- the Wasserstein estimate ``E[D(real)] - E[D(fake)]`` and FID against wall time;
- the critic's measured Lipschitz constant against wall time: the largest per-sample gradient
  norm ``max_x ||grad_x D(x)||_2`` seen at real, fake and interpolated points (a lower bound on
  Lip(D)) and the product of the layers' operator norms (an upper bound), with the target 1;
- the last sample grid of every run, at two screen pixels per image pixel;
- the metrics of ``eval.json`` as mean ± std over seeds (sample standard deviation, ddof 1), and
  the time per generator step; failed runs are listed with their reason.

The report only reads; it never imports torch, so it is quick and works on any machine that has
the run folders.

Modules: :mod:`~lipgan.report.tables` (the view of a run, summaries, Markdown),
:mod:`~lipgan.report.quality` (FID at time marks, curves pooled over seeds),
:mod:`~lipgan.report.plots` and :mod:`~lipgan.report.page` (the HTML).
"""

from __future__ import annotations

from lipgan.report.page import _fmt_stat, build_html, build_report
from lipgan.report.plots import plot_fid, plot_lipschitz, plot_time_to_quality, plot_wasserstein
from lipgan.report.quality import MARKS_S, TIME_COLUMNS, fid_at, pooled_curve
from lipgan.report.tables import (
    COST_COLUMNS,
    EVAL_KEYS,
    MARKDOWN_COLUMNS,
    QUALITY_COLUMNS,
    SUMMARY_COLUMNS,
    RunView,
    compare_order,
    group_by_method,
    load_run,
    load_runs,
    markdown_summary,
    mean_std,
    run_row,
    summarize,
    variant_labels,
)
from lipgan.runs.folder import expand_paths, is_run_folder

__all__ = [
    "COST_COLUMNS",
    "EVAL_KEYS",
    "MARKDOWN_COLUMNS",
    "MARKS_S",
    "QUALITY_COLUMNS",
    "SUMMARY_COLUMNS",
    "TIME_COLUMNS",
    "RunView",
    "_fmt_stat",
    "build_html",
    "build_report",
    "compare_order",
    "expand_paths",
    "fid_at",
    "group_by_method",
    "is_run_folder",
    "load_run",
    "load_runs",
    "markdown_summary",
    "mean_std",
    "plot_fid",
    "plot_lipschitz",
    "plot_time_to_quality",
    "plot_wasserstein",
    "pooled_curve",
    "run_row",
    "summarize",
    "variant_labels",
]
