"""The generalization study: regularizers x strengths x seeds, measured link by link.

Each cell of the grid is one ``lipgan classify`` run (a run folder under ``OUT/cells/``); the
study gathers their ``results.json`` into

    OUT/cells.csv          one row per cell (every scalar of :func:`lipgan.classify.summary`)
    OUT/summary.csv        mean and standard deviation over seeds per (regularizer, strength)
    OUT/gap_vs_bound.png   generalization gap against the Lipschitz upper bound, every cell
    OUT/acc_vs_lambda.png  train and test accuracy against the strength, per regularizer
    OUT/robustness.png     accuracy under Gaussian noise and L2 PGD, certified accuracy, vs eps
    OUT/sensitivity_vs_bound.png   worst-case input sensitivity against the bound
    OUT/study.md           the results table and a reading of each link of the note's chain
    OUT/study.json         the grid, the command, the wall time, the rank correlations

Cells whose ``results.json`` exists are not run again, so an interrupted study resumes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from lipgan.errors import LipganError
from lipgan.experiments import sweep
from lipgan.experiments.sweep import Cell, Context, Variant
from lipgan.runs import atomic_write_text
from lipgan.train.config import Config, option

# Strengths swept per regularizer (None: the method has no strength). l2 is weight decay wd and
# frobenius adds lam*||W||_F^2 with gradient 2*lam*W, so frobenius at wd/2 is l2 on the weights
# (biases aside): the matched pairs test the note's "L2 regularization is the Frobenius bound".
DEFAULT_GRID: dict[str, list[float | None]] = {
    "none": [None],
    "l2": [1e-4, 1e-3, 1e-2, 3e-2],
    "frobenius": [5e-5, 5e-4, 5e-3, 1.5e-2],
    "snr": [1e-3, 1e-2, 1e-1, 1.0],
    "gp": [1e-2, 1e-1, 1.0, 10.0],
    "sn": [None],
}


@dataclass
class StudyConfig(Config):
    """Options of ``lipgan study generalization``; each field is one CLI flag."""

    out: str = option("runs/study-generalization", "study folder (cells/, CSVs, plots, study.md)")
    seeds: int = option(3, "seeds per (regularizer, strength): 0..N-1", low=1, high=1000)
    train_subset: int = option(5000, "training images per cell (0 = all)", low=0)
    model: str = option("mlp", "mlp or cnn")
    epochs: int = option(20, "epochs per cell", low=1)
    dataset: str = option("mnist", "mnist, fashion-mnist or a folder of IDX files")
    data_dir: str | None = option(None, "read the four IDX files from this folder")
    regs: list = option(list(DEFAULT_GRID), "regularizers (classify --reg names)", flag=False)
    eval_n: int = option(1000, "test images for the robustness checks", low=1)
    # one thread per cell: the two cores of the reference machine
    jobs: int = option(2, "cells at a time, one thread each", low=1, flag=False)
    grid: dict | None = option(None, "{reg: [lam, ...]}; None: DEFAULT_GRID", flag=False)
    overrides: dict = option({}, "any other classify field for every cell, e.g. width=64")

    def variants(self) -> list[Variant]:
        """One variant per (regularizer, strength): ``snr_lam0.01: {reg: snr, lam: 0.01}``."""
        from lipgan.train.classifier_config import preset

        for reg in self.regs:
            preset(reg)  # an unknown name is refused here
        grid = self.grid if self.grid is not None else DEFAULT_GRID
        return [
            Variant(reg + ("" if lam is None else f"_lam{lam:g}"), {"reg": reg, "lam": lam})
            for reg in self.regs
            for lam in grid.get(reg, DEFAULT_GRID.get(reg, [None]))
        ]

    def cells(self) -> list[Cell]:
        """Every variant x seed, in a stable order, each in ``OUT/cells/<variant>_s<seed>``."""
        return sweep.grid(
            self.variants(), self.seeds, Path(self.out) / "cells", "{variant}_s{seed}"
        )


def _classify_config(study: StudyConfig, cell: Cell):
    from lipgan.classify import ClassifyConfig

    opts = dict(
        model=study.model,
        dataset=study.dataset,
        data_dir=study.data_dir,
        train_subset=study.train_subset,
        epochs=study.epochs,
        reg=cell.options["reg"],
        lam=0.0 if cell.options["lam"] is None else cell.options["lam"],
        seed=cell.seed,
        eval_n=study.eval_n,
        threads=1,  # small nets: one thread per cell is the fastest use of a core
        out=str(cell.path),
    )
    opts.update(study.overrides)
    return ClassifyConfig.from_dict(opts)


def _finished(cell: Cell) -> bool:
    return (cell.path / "results.json").is_file()


def _run_cell(cell: Cell, tag: str, ctx: Context, *, study: StudyConfig) -> float:
    """One cell: a classify run (a cell killed before its results is trained again), or with
    action ``reevaluate`` its measurements again; returns its wall time."""
    from lipgan.classify import reevaluate, run

    t = time.perf_counter()
    if cell.action == "reevaluate":
        reevaluate(cell.path)
    else:
        run(_classify_config(study, cell), log=None, overwrite=cell.path.exists())
    return time.perf_counter() - t


def run_study(
    study: StudyConfig,
    log: Callable[[str], None] | None = print,
    command: str | None = None,
    reevaluate: bool = False,
) -> dict:
    """Run every missing cell, then gather, plot and write the reading; returns study.json.

    ``reevaluate``: measure the finished cells again (no training) instead of running new ones.
    """
    out = Path(study.out)
    cells = study.cells()
    if study.jobs > 1:
        from lipgan.constraints import base
        from lipgan.train.classifier_config import preset

        base.check_for_workers(preset(reg).constraint for reg in study.regs)
    out.mkdir(parents=True, exist_ok=True)
    done = [c for c in cells if _finished(c)]
    todo = done if reevaluate else [c for c in cells if not _finished(c)]
    for c in todo:
        c.action = "reevaluate" if reevaluate else "train"
    say = log or (lambda msg: None)
    verb = "to measure again" if reevaluate else "to run"
    say(f"study: {len(cells)} cells, {len(done)} already done, {len(todo)} {verb}")
    t0 = time.perf_counter()
    count = iter(range(1, len(todo) + 1))

    def progress(cell: Cell, seconds: float, unfinished) -> None:
        say(
            f"[{next(count)}/{len(todo)}] {cell.name}  {seconds:.1f}s  "
            f"(elapsed {time.perf_counter() - t0:.0f}s)"
        )

    ran = sweep.run_cells(
        todo, partial(_run_cell, study=study), jobs=study.jobs, threads=1, on_done=progress
    )
    meta = gather(study, run_s=None if reevaluate else ran.wall_s, command=command)
    say(f"study: wrote {out / 'study.md'} ({ran.wall_s:.0f}s for {len(todo)} cells)")
    return meta


# --------------------------------------------------------------------------- gathering


def _load_rows(study: StudyConfig) -> list[dict]:
    rows = []
    for cell in study.cells():
        if not _finished(cell):
            continue
        res = json.loads((cell.path / "results.json").read_text())
        row = {"name": cell.name, **cell.options, "seed": cell.seed}
        row["train_s"] = res["train_s"]
        row["wall_s"] = res["wall_s"]
        row.update(res["summary"])
        rows.append(row)
    return rows


def _mean_std(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))  # sample std


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds per (reg, lam); keys ``k`` and ``k_std``."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["reg"], r["lam"]), []).append(r)
    out = []
    for (reg, lam), rs in groups.items():
        agg = {"reg": reg, "lam": lam, "n_seeds": len(rs)}
        keys = [k for k in rs[0] if k not in ("name", "reg", "lam", "seed")]
        for k in keys:
            m, s = _mean_std([r.get(k) for r in rs])
            agg[k], agg[f"{k}_std"] = m, s
        out.append(agg)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan with fewer than 3 pairs."""
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if len(pairs) < 3:
        return float("nan")
    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return float(rho)


def correlations(rows: list[dict], eps: str = "1") -> dict:
    """Rank correlations for each link of the chain, over all cells and per regularizer.

    Link 1 (regularization -> smaller C(w)): lam vs the operator-norm product, per regularizer.
    Link 2 (smaller C(w) -> lower sensitivity): bound vs worst-case and Gaussian sensitivity, and
    vs PGD accuracy. Link 3 (lower sensitivity -> better generalization): sensitivity and bound vs
    the generalization gap and the test accuracy.
    """
    bound = "upper_guaranteed"
    sens_w, sens_g = f"sens_worst_{eps}", f"sens_gauss_{eps}"
    col = {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}
    res: dict = {"n_cells": len(rows), "eps": eps, "link1": {}, "link2": {}, "link3": {}}
    for reg in sorted({r["reg"] for r in rows}):
        rs = [r for r in rows if r["reg"] == reg and r["lam"] is not None]
        if len({r["lam"] for r in rs}) >= 2:
            res["link1"][reg] = {
                "lam_vs_bound": spearman([r["lam"] for r in rs], [r[bound] for r in rs]),
                "lam_vs_frobenius_product": spearman(
                    [r["lam"] for r in rs], [r["upper_frobenius_product"] for r in rs]
                ),
            }
    if rows:
        res["link2"] = {
            "bound_vs_worst_sensitivity": spearman(col[bound], col[sens_w]),
            "bound_vs_gauss_sensitivity": spearman(col[bound], col[sens_g]),
            "bound_vs_pgd_acc": spearman(col[bound], col[f"pgd_acc_{eps}"]),
            "lower_vs_worst_sensitivity": spearman(col["lower"], col[sens_w]),
            "worst_sensitivity_vs_param_change": spearman(col[sens_w], col["param_rel_change"]),
        }
        res["link3"] = {
            "worst_sensitivity_vs_gap": spearman(col[sens_w], col["gap_acc"]),
            "worst_sensitivity_vs_test_acc": spearman(col[sens_w], col["test_acc"]),
            "bound_vs_gap": spearman(col[bound], col["gap_acc"]),
            "bound_vs_test_acc": spearman(col[bound], col["test_acc"]),
            "bound_vs_loss_gap": spearman(col[bound], col["gap_loss"]),
            "param_change_vs_gap": spearman(col["param_rel_change"], col["gap_acc"]),
            "hessian_vs_gap": spearman(col["hessian_top"], col["gap_acc"]),
        }
    return res


def gather(study: StudyConfig, run_s: float | None = None, command: str | None = None) -> dict:
    """Write the CSVs, the plots, study.md and study.json from the cells present."""
    out = Path(study.out)
    rows = _load_rows(study)
    if not rows:
        raise LipganError(f"{out}: no finished cells to gather")
    agg = aggregate(rows)
    sweep.write_table(out / "cells.csv", rows)
    sweep.write_table(out / "summary.csv", agg)
    corr = correlations(rows)
    plots = _plots(out, rows, agg)
    meta = {
        "study": asdict(study),
        "grid": study.grid if study.grid is not None else DEFAULT_GRID,
        "n_cells": len(rows),
        "run_s": run_s,
        "cell_wall_s_sum": sum(r["wall_s"] for r in rows),
        "command": command,
        "correlations": corr,
        "plots": plots,
    }
    prev = out / "study.json"
    if run_s is None and prev.is_file():  # re-gathering keeps the measured wall time
        old = json.loads(prev.read_text())
        meta["run_s"], meta["command"] = old.get("run_s"), old.get("command")
    atomic_write_text(out / "study.json", json.dumps(meta, indent=2))
    atomic_write_text(out / "study.md", markdown(agg, corr, meta))
    return meta


def _fmt(m: float, s: float, pct: bool = False, digits: int = 3) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f}"
    return f"{m:.{digits}g} ± {s:.2g}"


def table(agg: list[dict], eps: list[str] | None = None) -> str:
    """The results table in Markdown: mean ± std over seeds per (regularizer, strength)."""
    eps = eps or ["0.5", "1", "2"]
    head = (
        "| reg | λ | train acc % | test acc % | gap (pp) | loss gap | Frob. product | op. product "
        "| best upper | lower | worst sens. @1 | Gauss sens. @1 | param Δ | "
        + " | ".join(f"PGD acc @{e} %" for e in eps)
        + " | "
        + " | ".join(f"cert. @{e} %" for e in eps)
        + " | Hessian top |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for a in agg:
        lam = "-" if a["lam"] is None else f"{a['lam']:g}"
        cells = [
            a["reg"],
            lam,
            _fmt(a["train_acc"], a["train_acc_std"], True),
            _fmt(a["test_acc"], a["test_acc_std"], True),
            _fmt(100 * a["gap_acc"], 100 * a["gap_acc_std"]),
            _fmt(a["gap_loss"], a["gap_loss_std"]),
            _fmt(a["upper_frobenius_product"], a["upper_frobenius_product_std"]),
            _fmt(a["upper_operator_product"], a["upper_operator_product_std"]),
            _fmt(a["upper_guaranteed"], a["upper_guaranteed_std"]),
            _fmt(a["lower"], a["lower_std"]),
            _fmt(a["sens_worst_1"], a["sens_worst_1_std"]),
            _fmt(a["sens_gauss_1"], a["sens_gauss_1_std"]),
            _fmt(a["param_rel_change"], a["param_rel_change_std"]),
        ]
        cells += [_fmt(a[f"pgd_acc_{e}"], a[f"pgd_acc_{e}_std"], True) for e in eps]
        cells += [_fmt(a[f"cert_acc_{e}"], a[f"cert_acc_{e}_std"], True) for e in eps]
        cells.append(_fmt(a["hessian_top"], a["hessian_top_std"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(agg: list[dict], corr: dict, meta: dict) -> str:
    s = meta["study"]
    lines = [
        "# Generalization study",
        "",
        f"{s['model']} on {s['dataset']}, {s['train_subset']} training images, {s['epochs']} "
        f"epochs, {s['seeds']} seeds; robustness on {s['eval_n']} test images. "
        f"{meta['n_cells']} cells"
        + (f", run in {meta['run_s']:.0f} s" if meta.get("run_s") else "")
        + ".",
        "",
    ]
    if meta.get("command"):
        lines += ["```", meta["command"], "```", ""]
    lines += [table(agg), ""]
    lines += ["## Rank correlations (Spearman, over cells)", ""]
    for link, title in (
        ("link1", "Link 1: strength λ vs bound, per regularizer"),
        ("link2", "Link 2: bound vs sensitivity"),
        ("link3", "Link 3: sensitivity / bound vs generalization"),
    ):
        lines.append(f"**{title}**")
        lines.append("")
        for k, v in corr[link].items():
            if isinstance(v, dict):
                lines.append(f"- {k}: " + ", ".join(f"{a} ρ={b:+.2f}" for a, b in v.items()))
            else:
                lines.append(f"- {k}: ρ={v:+.2f}")
        lines.append("")
    lines += [
        "## Plots",
        "",
        *[f"![{p}]({p})" for p in meta["plots"]],
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots

#: colours of the default regularizers; any other gets the next colour of matplotlib's cycle
_COLORS = {
    "none": "black",
    "l2": "tab:blue",
    "frobenius": "tab:cyan",
    "snr": "tab:red",
    "sn": "tab:purple",
    "gp": "tab:green",
}


def _plots(out: Path, rows: list[dict], agg: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    regs = list(dict.fromkeys(r["reg"] for r in rows))  # the study's order
    colors = {reg: _COLORS.get(reg, f"C{i % 10}") for i, reg in enumerate(regs)}

    for fname, ykey, ylabel in (
        ("gap_vs_bound.png", "gap_acc", "generalization gap (train − test accuracy)"),
        ("sensitivity_vs_bound.png", "sens_worst_1", "worst-case sensitivity at ε=1"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for reg in regs:
            rs = [r for r in rows if r["reg"] == reg]
            ax.scatter(
                [r["upper_guaranteed"] for r in rs],
                [r[ykey] for r in rs],
                label=reg,
                color=colors[reg],
                s=18,
            )
        ax.set_xscale("log")
        ax.set_xlabel("Lipschitz upper bound C(w) (best certified bound)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        made.append(fname)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    base = next((a for a in agg if a["reg"] == "none"), None)
    for reg in regs:
        ag = sorted(
            [a for a in agg if a["reg"] == reg and a["lam"] is not None], key=lambda a: a["lam"]
        )
        if not ag:
            continue
        lam = [a["lam"] for a in ag]
        for ax, key in ((axes[0], "test_acc"), (axes[1], "gap_acc")):
            ax.errorbar(
                lam,
                [a[key] for a in ag],
                yerr=[a[f"{key}_std"] for a in ag],
                label=reg,
                color=colors[reg],
                marker="o",
                capsize=3,
            )
    for ax, key, title in (
        (axes[0], "test_acc", "test accuracy"),
        (axes[1], "gap_acc", "generalization gap (accuracy)"),
    ):
        if base is not None:
            ax.axhline(base[key], color="black", ls="--", lw=1, label="none")
        sn = next((a for a in agg if a["reg"] == "sn"), None)
        if sn is not None:
            ax.axhline(sn[key], color=colors["sn"], ls=":", lw=1, label="sn")
        ax.set_xscale("log")
        ax.set_xlabel("strength λ")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # a grid of methods without strengths: none
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "acc_vs_lambda.png", dpi=110)
    plt.close(fig)
    made.append("acc_vs_lambda.png")

    # Robustness: for each regularizer the strength with the best mean test accuracy.
    eps_keys = sorted(
        {k[len("pgd_acc_") :] for k in agg[0] if k.startswith("pgd_acc_") and "_std" not in k},
        key=float,
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for reg in regs:
        best = max((a for a in agg if a["reg"] == reg), key=lambda a: a["test_acc"])
        xs = [0.0] + [float(e) for e in eps_keys]
        label = reg + ("" if best["lam"] is None else f" λ={best['lam']:g}")
        for ax, pre in zip(axes, ("gauss_acc_", "pgd_acc_", "cert_acc_")):
            ys = [best["test_acc"]] + [best[f"{pre}{e}"] for e in eps_keys]
            ax.plot(xs, ys, marker="o", color=colors[reg], label=label)
    for ax, title in zip(
        axes, ("Gaussian noise of L2 size ε", "L2 PGD at radius ε", "certified at radius ε")
    ):
        ax.set_title(title)
        ax.set_xlabel("ε (pixels in [0, 1])")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "robustness.png", dpi=110)
    plt.close(fig)
    made.append("robustness.png")
    return made


def main_command() -> str:
    return "lipgan " + " ".join(sys.argv[1:]) if sys.argv else "lipgan study"
