"""What a finished ``lipgan train`` prints: how good the result is, and where to look.

After the last step (and for ``--resume`` of a finished run), :func:`after_training` optionally
scores the generator (``summary_eval_n`` samples with :func:`lipgan.metrics.evaluate`, the
metrics of ``lipgan eval``; the EMA generator where the run keeps one) and writes
``RUN/report.html`` (:func:`lipgan.report.build_report`, with ``summary_report``), then prints a
short summary: FID (with its n), recall, classes covered, the Wasserstein estimate, the critic's
measured Lipschitz constant
(largest logged ``||grad_x D||``, a lower estimate; the certified product bound where measured),
the measurement share, and the paths of the sample grid and of the report. This work is not in
the run's measurement budget: its seconds are recorded apart, as ``eval_after_training_s``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

_GNORMS = ("gnorm_real_max", "gnorm_fake_max", "gnorm_interp_max")


def _last(rows: list[dict], key: str) -> tuple[float, int] | None:
    """The last non-empty ``key`` of metrics rows, with its step."""
    for r in reversed(rows):
        v = r.get(key)
        if v is not None and math.isfinite(v):
            return v, int(r["step"])
    return None


def evaluate(path: Path, n: int, dataset: str, device: Any) -> dict:
    """``lipgan eval``'s metrics of the run's EMA generator (else its generator) on ``n``
    samples, written to ``RUN/eval.json`` (its one writer, ``RunFolder.write_eval``)."""
    from lipgan.metrics import sampling

    return sampling.evaluate_run(path, n=n, dataset=dataset, device=device)


def lines(path: Path, rows: list[dict], status: dict, result: dict | None,
          report: Path | None, lip: tuple[float, int] | None = None) -> list[str]:  # fmt: skip
    """The summary's lines from the run's metrics rows, status and evaluation (if any);
    ``lip``: the largest ``||grad_x D||`` measured after training and at how many points."""
    out = [f"summary of {path} (step {status.get('step')} of {status.get('steps')}, "
           f"{status.get('wall_s', 0):.1f} s wall)"]  # fmt: skip
    if result is not None:
        out.append(
            f"  FID {result['fid']:.1f} (n {result['n']}, {result['generator']} generator), "
            f"recall {result['recall']:.3f}, classes covered {result['classes_covered']} of 10"
        )
    else:
        fid = _last(rows, "fid")
        what = f"FID {fid[0]:.1f} at step {fid[1]} (during training)" if fid else "no FID"
        out.append(f"  {what}; pass --summary-eval-n 10000 for FID, recall and classes covered")
    w = [r["wasserstein"] for r in rows if r.get("wasserstein") is not None][-10:]
    if w:
        out.append(f"  W estimate {sum(w) / len(w):+.4f} (mean of the last {len(w)} logged rows)")
    gn = [(v, s) for v, s in (_last(rows, k) for k in _GNORMS if _last(rows, k)) if v]
    text = "  critic Lipschitz: "
    if lip is not None:
        text += f"max ||grad_x D|| {lip[0]:.3f} at {lip[1]} points after training (a lower "
        text += "estimate)"
    elif gn:
        v, s = max(gn)
        text += f"max ||grad_x D|| {v:.3f} (a lower estimate, step {s})"
    else:
        text += "no gradient norms logged"
    bound = _last(rows, "product_bound")
    text += f"; certified product bound {bound[0]:.4g} (step {bound[1]})" if bound else ""
    out.append(text)
    m = status.get("measurement") or {}
    if m:
        text = f"  measurement {100 * m['measure_share']:.1f} % of the wall time (budget "
        text += f"{100 * m['budget']:g} %)"
        if "eval_after_training_s" in m:
            text += f"; evaluation after training {m['eval_after_training_s']:.1f} s"
        out.append(text)
    grid = path / "samples" / "last.png"
    if grid.is_file():
        out.append(f"  samples: {grid}")
    if report is not None:
        out.append(f"  report:  {report}")
    return out


def after_training(session, stream=None) -> dict | None:
    """Score (``cfg.summary_eval_n``), report (``cfg.summary_report``) and print the summary of
    a finished :class:`lipgan.train.loop.Session`; returns the evaluation (or None)."""
    from lipgan.runs import RunFolder

    cfg, path = session.cfg, session.path
    t0 = time.perf_counter()
    result = lip = None
    if cfg.summary_eval_n:
        trainer = session.trainer
        result = evaluate(path, cfg.summary_eval_n, cfg.dataset, trainer.device)
        real = getattr(trainer, "last_real", None)  # None: nothing trained in this session
        if real is not None:  # at the last real batch, fakes and interpolates (measure_gen)
            norms = trainer.gradient_norms(real)
            lip = (max(float(v.max()) for v in norms.values()), sum(len(v) for v in norms.values()))
    report = None
    if cfg.summary_report:
        from lipgan.report import build_report

        report = build_report([path], path / "report.html")
    if result is not None or report is not None:
        session.record_eval(time.perf_counter() - t0)
    if not cfg.quiet:
        folder = RunFolder(path)
        try:
            status = folder.read_status() or {}
            text = lines(path, folder.read_metrics(), status, result, report, lip)
        finally:
            folder.close()
        for line in text:
            tqdm.write(line, file=stream or sys.stderr)
    return result
