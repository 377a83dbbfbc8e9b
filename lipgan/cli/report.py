"""`lipgan report RUN... [--out report.html]`."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page from run folders (one run or a comparison)",
        description=(
            "Build one self-contained HTML file (plots and sample grids embedded) from run "
            "folders written by `lipgan train`, or from a `lipgan compare` folder: per method the "
            "Wasserstein estimate and FID against wall time, the critic's measured Lipschitz "
            "constant, the last sample grids, and eval.json's metrics as mean ± std over seeds."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or folders holding them")
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--title", help="page title (default from the runs)")
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print the per-method summary (mean ± std over seeds) as a Markdown table instead",
    )
    p.set_defaults(func=_report)


def _report(args) -> int:
    from lipgan import report

    if args.markdown:
        print(report.markdown_summary(args.runs), end="")
        return 0
    out = report.build_report(args.runs, args.out, title=args.title)
    print(f"report: {out}")
    return 0
