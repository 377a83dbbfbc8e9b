"""The generalization study on a tiny grid: cells, resume, aggregation, plots, CLI."""

import csv
import json
import math

import numpy as np
import pytest

from lipgan.errors import LipganError
from lipgan.study import StudyConfig, aggregate, correlations, run_study, spearman

TINY = dict(
    width=16,
    batch_size=64,
    pgd_steps=4,
    noise_draws=1,
    hessian_iters=3,
    hessian_n=100,
    lower_restarts=1,
)


def _study(tmp_path, **kw) -> StudyConfig:
    base = dict(
        out=str(tmp_path / "study"),
        seeds=2,
        train_subset=200,
        epochs=1,
        regs=["none", "snr"],
        grid={"none": [None], "snr": [1e-2, 1.0]},
        eval_n=40,
        overrides=TINY,
        jobs=1,
    )
    base.update(kw)
    return StudyConfig(**base)


def test_tiny_study_writes_everything_and_resumes(mnist, tmp_path):
    study = _study(tmp_path)
    logs: list[str] = []
    meta = run_study(study, log=logs.append, command="lipgan study generalization (test)")
    out = tmp_path / "study"
    assert meta["n_cells"] == 6
    for name in (
        "cells.csv",
        "summary.csv",
        "study.md",
        "study.json",
        "gap_vs_bound.png",
        "acc_vs_lambda.png",
        "robustness.png",
        "sensitivity_vs_bound.png",
    ):
        assert (out / name).is_file(), name
    with open(out / "cells.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    # summary = mean and sample std over seeds, checked with numpy
    with open(out / "summary.csv") as fh:
        summ = {(r["reg"], r["lam"]): r for r in csv.DictReader(fh)}
    for key, group in (("snr", "1.0"), ("none", "")):
        accs = [float(r["test_acc"]) for r in rows if r["reg"] == key and r["lam"] == group]
        assert len(accs) == 2
        s = summ[(key, group)]
        assert float(s["test_acc"]) == pytest.approx(np.mean(accs))
        assert float(s["test_acc_std"]) == pytest.approx(np.std(accs, ddof=1))
    md = (out / "study.md").read_text()
    assert "| snr | 1 |" in md and "±" in md and "Link 1" in md
    # resume: nothing left to run, the recorded command survives
    logs.clear()
    run_study(study, log=logs.append)
    assert "0 to run" in logs[0]
    assert json.loads((out / "study.json").read_text())["n_cells"] == 6
    # measuring again without training reproduces the deterministic measurements
    before = (out / "cells.csv").read_text()
    run_study(study, log=None, reevaluate=True)
    with open(out / "cells.csv") as fh:
        again = list(csv.DictReader(fh))
    for r0, r1 in zip(csv.DictReader(before.splitlines()), again):
        for key in ("test_acc", "upper_operator_product", "pgd_acc_1", "cert_acc_0.5"):
            assert float(r1[key]) == pytest.approx(float(r0[key]), rel=1e-4, abs=1e-6), key


def test_aggregate_and_spearman_independent():
    rows = [
        {"name": f"a{i}", "reg": "l2", "lam": 0.1, "seed": i, "x": v}
        for i, v in enumerate([1.0, 2.0, 4.0])
    ]
    (agg,) = aggregate(rows)
    assert agg["x"] == pytest.approx(7 / 3)
    assert agg["x_std"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    a, b = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    ra, rb = np.argsort(np.argsort(a)), np.array([0, 1, 2.5, 4, 2.5])
    assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    assert math.isnan(spearman([1, 2], [3, 4]))
    assert correlations([])["n_cells"] == 0


def test_bad_study_options(tmp_path):
    with pytest.raises(LipganError):
        _study(tmp_path, regs=["none", "dropout"]).cells()
    with pytest.raises(LipganError):
        _study(tmp_path, seeds=0).cells()


def test_study_cli_smoke(mnist, tmp_path, capsys):
    from lipgan.cli import main

    out = tmp_path / "cli"
    argv = [
        "study",
        "generalization",
        "--seeds",
        "1",
        "--train-subset",
        "200",
        "--epochs",
        "1",
        "--regs",
        "none",
        "sn",
        "--eval-n",
        "30",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert (out / "summary.csv").is_file() and (out / "study.md").is_file()
    assert main(["study", "generalization", "--regs", "dropout", "--out", str(out)]) == 2
    assert main(["study", "generalization", "--gather-only", "--out", str(tmp_path / "e")]) == 2


def test_a_users_registered_constraint_runs_in_study_workers(mnist, tmp_path):
    """classify cells in worker processes (jobs 2) build a constraint registered in the user's
    own module, and record it."""
    import user_constraints  # registers test-user-clip in this process only

    study = _study(tmp_path, regs=["test-user-clip"], grid=None, jobs=2)
    meta = run_study(study, log=None)
    assert meta["n_cells"] == 2
    with open(tmp_path / "study" / "cells.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["reg"] for r in rows] == ["test-user-clip"] * 2
    assert user_constraints.UserClip.name == "test-user-clip"
