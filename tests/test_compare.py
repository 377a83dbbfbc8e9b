"""`lipgan compare` on tiny real training runs: bounds, evaluation, results, resume, failures."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from lipgan import compare, gan, report
from lipgan.compare import CompareConfig, parse_duration, plan_runs, run_compare
from lipgan.errors import LipganError
from lipgan.experiments import sweep
from lipgan.experiments.sweep import Variant
from lipgan.runs import RunFolder
from lipgan.train import loop

# Tiny and quick: width 8, batch 16, one thread (two cores are shared by several processes; more
# threads only fight), a 128-sample FID at the end of each run, no TensorBoard.
OPTIONS = {"threads": 1, "fid_n": 128, "tensorboard": False}


def tiny(out, **kw) -> CompareConfig:
    base = dict(
        out=str(out),
        methods=["wgan-gp", "sn"],
        seeds=1,
        steps=2,
        width=8,
        batch_size=16,
        device="cpu",
        train_options=dict(OPTIONS),
        eval_n=128,
        quiet=True,
    )
    base.update(kw)
    return CompareConfig(**base)


@pytest.fixture(autouse=True, scope="module")
def _keep_threads():
    # threads=1 sets torch's global thread count; give the rest of the session its own back.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def spy(monkeypatch):
    """Record every call of the trainer: (run folder name, resume, steps)."""
    calls = []
    real = loop.train

    def train(cfg, **kw):
        calls.append((cfg.out.rsplit("/", 1)[-1], kw.get("resume", False), cfg.steps))
        return real(cfg, **kw)

    monkeypatch.setattr(loop, "train", train)
    return calls


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """Two methods x two seeds, 2 generator steps each, evaluated: the whole pipeline once (the
    two cheapest methods; wgan-gp is trained in the resume and failure tests)."""
    out = tmp_path_factory.mktemp("cmp") / "c"
    cfg = tiny(out, methods=["sn", "gan"], seeds=2)
    paths = run_compare(cfg)
    return cfg, out, paths


def test_parse_duration():
    assert parse_duration("20m") == 1200
    assert parse_duration("90s") == 90
    assert parse_duration("1.5h") == 5400
    assert parse_duration("300") == 300
    for bad in ("", "5 parsecs", "-3m", "0"):
        with pytest.raises(LipganError):
            parse_duration(bad)


def test_every_run_trained_evaluated_and_tabled(done):
    cfg, out, paths = done
    rows = _rows(paths["results"])
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("sn", "0"),
        ("sn", "1"),
        ("gan", "0"),
        ("gan", "1"),
    ]
    for r in rows:
        assert r["state"] == "done" and r["steps"] == "2" and r["eval_n"] == "128"
        run = out / "runs" / r["run"]
        ev = json.loads((run / "eval.json").read_text())
        assert float(r["fid"]) == pytest.approx(ev["fid"])
        # the training flags reached the trainer unchanged
        conf = report.load_run(run).config
        assert (conf["width"], conf["batch_size"], conf["device"], conf["threads"]) == (
            8,
            16,
            "cpu",
            1,
        )
        assert conf["method"] == r["method"] and conf["seed"] == int(r["seed"])
    # two seeds of one method are different runs
    assert rows[0]["fid"] != rows[1]["fid"]
    # time to quality: FID at 1, 2, 5 and 10 minutes, empty for runs of a second or two
    assert all(r[k] == "" for r in rows for k in ("fid_1m", "fid_2m", "fid_5m", "fid_10m"))
    page = paths["report"].read_text()
    assert "FID @ 10 min" in page and 'id="quality"' in page
    assert "n = 128 samples of the ema generator" in page  # the report says what was scored


def _independent_fid(run: Path, which: str) -> float:
    from lipgan import metrics, runs

    g = runs.load_network(run, which)
    z = torch.randn(128, g.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = g(z)
    return metrics.fid(x, "mnist")


def test_eval_json_is_the_ema_generators_fid(done):
    """eval.json's FID against lipgan.metrics.fid of the EMA generator's samples, drawn here:
    compare scores the moving average (issue 19), and eval.json says so."""
    _, out, _ = done
    run = out / "runs" / "sn-seed1"
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n"] == 128 and ev["generator"] == "ema"
    ema = _independent_fid(run, "generator_ema")
    assert ema != _independent_fid(run, "generator")  # the two generators differ
    assert ev["fid"] == pytest.approx(ema, rel=1e-6)


def test_a_raw_generators_eval_json_is_redone_with_the_ema_one(tmp_path):
    """An eval.json of the last iterate (``lipgan eval --raw``, or one written before compare
    scored the average: no ``generator`` key) is not compare's result: compare scores again."""
    from lipgan.metrics import sampling

    out = tmp_path / "c"
    cfg = tiny(out, methods=["gan"])
    run_compare(cfg)
    run = out / "runs" / "gan-seed0"
    raw = sampling.evaluate_run(run, n=128, raw=True)
    assert raw["generator"] == "raw"
    assert raw["fid"] == pytest.approx(_independent_fid(run, "generator"), rel=1e-6)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["generator"] == "raw"
    del ev["generator"]  # the shape of an older eval.json
    (run / "eval.json").write_text(json.dumps(ev))
    paths = run_compare(cfg)
    ev = json.loads((run / "eval.json").read_text())
    assert ev["generator"] == "ema"
    assert ev["fid"] == pytest.approx(_independent_fid(run, "generator_ema"), rel=1e-6)
    row = _rows(paths["results"])[0]
    assert float(row["fid"]) == pytest.approx(ev["fid"]) and row["generator"] == "ema"
    # --raw: compare scores the last iterates instead, and says so in eval.json and results.csv
    paths = run_compare(tiny(out, methods=["gan"], raw=True))
    ev = json.loads((run / "eval.json").read_text())
    assert ev["generator"] == "raw" and ev["fid"] == pytest.approx(raw["fid"], rel=1e-6)
    assert _rows(paths["results"])[0]["generator"] == "raw"


def test_report_table_is_mean_and_std_over_seeds(done):
    _, out, paths = done
    rows = [r for r in _rows(paths["results"]) if r["method"] == "gan"]
    fids = [float(r["fid"]) for r in rows]
    runs_ = [report.load_run(p) for p in report.expand_paths([out])]
    summary = {e["method"]: e for e in report.summarize(runs_)}
    mean, std = summary["gan"]["stats"]["fid"]
    assert mean == pytest.approx(statistics.mean(fids))
    assert std == pytest.approx(statistics.stdev(fids))
    page = paths["report"].read_text()
    assert report._fmt_stat((mean, std)) in page
    for r in _rows(paths["results"]):
        assert r["run"] in page


def test_rerun_trains_nothing(done, spy):
    cfg, out, _ = done
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/generator.safetensors")}
    logs: list[str] = []
    run_compare(cfg, log=logs.append)
    assert spy == []
    # the closing summary: each method's FID and its FID at 1, 2, 5 and 10 minutes
    (table,) = [m for m in logs if m.startswith("compare: FID (eval.json) and time to quality")]
    head, _, *rows = table.splitlines()[1:]
    assert head.split(" | ")[2:] == ["FID", "FID @ 1 min", "FID @ 2 min", "FID @ 5 min",
                                     "FID @ 10 min |"]  # fmt: skip
    results = _rows(out / "results.csv")
    fids = {m: [float(x["fid"]) for x in results if x["method"] == m] for m in ("sn", "gan")}
    assert [r.split(" | ")[:3] for r in rows] == [
        ["| sn", "2/2", report.tables._md_stat(report.mean_std(fids["sn"]))],
        ["| gan", "2/2", report.tables._md_stat(report.mean_std(fids["gan"]))],
    ]
    assert all(r.endswith("| – | – | – | – |") for r in rows)  # runs of a second or two
    after = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/generator.safetensors")}
    assert before == after


def test_other_flags_on_the_same_folder_are_refused(done):
    cfg, out, _ = done
    with pytest.raises(LipganError, match="same flags"):
        run_compare(tiny(out, methods=cfg.methods, seeds=2, width=16))
    with pytest.raises(LipganError, match="same flags"):
        run_compare(tiny(out, methods=cfg.methods, seeds=2, steps=3))


def test_interrupted_compare_resumes_only_what_is_missing(tmp_path, monkeypatch, spy):
    options = {**OPTIONS, "checkpoint_every": 1}
    cfg = tiny(tmp_path / "c", steps=4, train_options=options, evaluate=False)
    real_step = gan.GANTrainer.train_step

    def interrupted(self, *a, **kw):
        if self.cfg.method == "sn" and self.step == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second run
        return real_step(self, *a, **kw)

    monkeypatch.setattr(gan.GANTrainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg)
    assert [p.action for p in plan_runs(cfg)] == ["keep", "resume"]
    monkeypatch.setattr(gan.GANTrainer, "train_step", real_step)
    spy.clear()
    paths = run_compare(cfg)
    assert spy == [("sn-seed0", True, 4)]  # wgan-gp kept; sn resumed from its checkpoint
    rows = _rows(paths["results"])
    assert [(r["state"], r["steps"]) for r in rows] == [("done", "4"), ("done", "4")]
    steps = report.load_run(tmp_path / "c" / "runs" / "sn-seed0").column("step")
    assert steps.tolist() == sorted(set(steps.tolist()))  # no step logged twice after resume


def test_failed_run_is_reported_and_kept(tmp_path, monkeypatch, spy):
    real_step = gan.GANTrainer.train_step

    def blows_up(self, *a, **kw):  # a real run whose loss turns NaN at step 2
        out = real_step(self, *a, **kw)
        if self.cfg.method == "wgan-gp" and self.step == 2:
            out["wasserstein"] = torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(gan.GANTrainer, "train_step", blows_up)
    cfg = tiny(tmp_path / "c", methods=["wgan-gp"], steps=3)
    paths = run_compare(cfg)
    rows = {r["method"]: r for r in _rows(paths["results"])}
    assert rows["wgan-gp"]["state"] == "failed"
    assert "non-finite loss at generator step 2" in rows["wgan-gp"]["reason"]
    assert rows["wgan-gp"]["fid"] == ""  # not evaluated
    page = paths["report"].read_text()
    assert "failed: non-finite loss at generator step 2" in page
    # a rerun keeps it; --retry-failed trains it again and keeps the old folder aside
    monkeypatch.setattr(gan.GANTrainer, "train_step", real_step)
    spy.clear()
    run_compare(cfg)
    assert spy == []
    run_compare(tiny(tmp_path / "c", methods=["wgan-gp"], steps=3, retry_failed=True))
    assert spy == [("wgan-gp-seed0", False, 3)]
    assert len(list((tmp_path / "c" / "failed").iterdir())) == 1
    assert {r["state"] for r in _rows(paths["results"])} == {"done"}


def test_budget_real_runs(tmp_path, spy):
    """A real budget run: one trainer call bounded by the time, done at the budget, with the
    end-of-run work (grid, product bound) done once."""
    budget = 3.0
    cfg = tiny(tmp_path / "c", methods=["sn"], steps=None, budget_s=budget, evaluate=False)
    paths = run_compare(cfg)
    (row,) = _rows(paths["results"])
    assert row["state"] == "done"
    assert budget <= float(row["wall_s"]) < budget + 120
    assert 0 < int(row["steps"]) < compare.BUDGET_STEP_CAP
    assert spy == [("sn-seed0", False, compare.BUDGET_STEP_CAP)]
    grids = sorted(p.name for p in (tmp_path / "c" / "runs" / "sn-seed0" / "samples").iterdir())
    assert "last.png" in grids
    assert all(p.action == "keep" for p in plan_runs(cfg))
    spy.clear()
    run_compare(cfg)  # complete: nothing more to do
    assert spy == []
    # Killed after its final checkpoint, before it was marked done: the rerun marks it done.
    status_path = tmp_path / "c" / "runs" / "sn-seed0" / "status.json"
    st = json.loads(status_path.read_text())
    status_path.write_text(json.dumps({**st, "state": "running"}))
    run_compare(cfg)
    again = json.loads(status_path.read_text())
    assert again["state"] == "done" and again["step"] == st["step"]


def test_a_cpu_budget_bounds_each_run_by_its_own_cpu_seconds(tmp_path):
    """``budget_clock="cpu"``: the run stops once its process has used the budget in CPU
    seconds (status.json's cpu_s), however long that took on the wall; a rerun keeps it, and
    a folder started with the wall clock refuses the CPU clock rather than mix them."""
    budget = 3.0
    cfg = tiny(tmp_path / "c", methods=["sn"], steps=None, budget_s=budget, evaluate=False)
    cfg.budget_clock = "cpu"
    paths = run_compare(cfg)
    st = json.loads((tmp_path / "c" / "runs" / "sn-seed0" / "status.json").read_text())
    assert st["state"] == "done" and budget <= st["cpu_s"] < budget + 120
    (row,) = _rows(paths["results"])
    assert 0 < int(row["steps"]) < compare.BUDGET_STEP_CAP
    assert all(p.action == "keep" for p in plan_runs(cfg))
    cfg.budget_clock = "wall"  # the same folder, the other clock: refused, nothing changed
    with pytest.raises(LipganError, match="budget_clock"):
        run_compare(cfg)


def test_plan_with_the_cpu_clock_reads_cpu_seconds(tmp_path):
    cfg = tiny(tmp_path, methods=["a", "b"], steps=None, budget_s=100.0)
    cfg.budget_clock = "cpu"
    for name, cpu in (("a", 99.0), ("b", 40.0)):
        run = tmp_path / "runs" / f"{name}-seed0"
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.pt").write_bytes(b"x")
        # both used the whole wall budget; only a used its CPU budget
        (run / "status.json").write_text(json.dumps({"state": "done", "wall_s": 100.0,
                                                     "cpu_s": cpu}))
    assert [p.action for p in plan_runs(cfg)] == ["keep", "resume"]


def test_an_interrupted_budget_run_resumes_with_the_time_it_has_left(tmp_path, monkeypatch):
    """Ctrl-C in the middle of a budget run; the rerun resumes it from its checkpoint and
    stops when the time summed over both segments reaches the budget."""
    budget = 4.0
    real_step = gan.GANTrainer.train_step
    t_start = []

    def interrupted(self, *a, **kw):
        t_start.append(1)
        if len(t_start) == 4:  # early: a loaded machine may spend the budget in a dozen steps
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)

    monkeypatch.setattr(gan.GANTrainer, "train_step", interrupted)
    cfg = tiny(
        tmp_path / "c", methods=["sn"], steps=None, budget_s=budget, evaluate=False,
        train_options={**OPTIONS, "checkpoint_every": 2},
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg)
    run = tmp_path / "c" / "runs" / "sn-seed0"
    first = json.loads((run / "status.json").read_text())
    assert first["state"] == "failed" and first["reason"] == "interrupted"
    assert [p.action for p in plan_runs(cfg)] == ["resume"]
    monkeypatch.setattr(gan.GANTrainer, "train_step", real_step)
    run_compare(cfg)
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "done" and st["step"] > first["step"]
    assert budget <= st["wall_s"] < budget + 120


def test_plan_from_folder_states(tmp_path):
    cfg = tiny(tmp_path, methods=["a", "b", "c", "d", "e", "f"], steps=None, budget_s=100.0)

    def status(name, ckpt=True, **st):
        run = tmp_path / "runs" / f"{name}-seed0"
        (run / "checkpoints").mkdir(parents=True)
        if ckpt:
            (run / "checkpoints" / "last.pt").write_bytes(b"x")
        (run / "status.json").write_text(json.dumps(st))

    status("a", state="done", wall_s=99.0)  # complete
    status("b", state="done", wall_s=40.0)  # stopped before its budget was spent
    status("c", state="failed", reason="interrupted", wall_s=10.0)  # Ctrl-C
    status("d", state="failed", reason="non-finite loss at generator step 7", wall_s=10.0)
    status("e", ckpt=False, state="running", wall_s=0.0)  # killed before its first checkpoint
    actions = [p.action for p in plan_runs(cfg)]
    assert actions == ["keep", "resume", "resume", "keep", "train", "train"]
    assert [p.action for p in plan_runs(tiny(tmp_path, methods=["d"], retry_failed=True))] == [
        "train"
    ]


def test_bad_settings_fail_before_anything_is_written(tmp_path):
    with pytest.raises(LipganError, match="unknown method"):
        run_compare(tiny(tmp_path / "a", methods=["wgan-gp", "nope"]))
    with pytest.raises(LipganError, match="exactly one"):
        run_compare(tiny(tmp_path / "b", budget_s=10.0))
    with pytest.raises(LipganError, match="unknown config keys"):
        run_compare(tiny(tmp_path / "c", train_options={"no_such_field": 1}))
    with pytest.raises(LipganError, match="set by compare"):
        run_compare(tiny(tmp_path / "d", train_options={"seed": 3}))
    if not torch.cuda.is_available():
        with pytest.raises(LipganError, match="CUDA"):
            run_compare(tiny(tmp_path / "e", device="cuda"))
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_cli_passes_the_training_flags_on(monkeypatch, tmp_path, capsys):
    from lipgan.cli import main

    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        return {"results": tmp_path / "results.csv", "report": None}

    monkeypatch.setattr(compare, "run_compare", fake)
    argv = ["compare", "--methods", "sn,gan", "--seeds", "3", "--budget", "1.5h", "--out"]
    argv += [str(tmp_path), "--model", "dcgan28", "--width", "32", "--batch-size", "50"]
    argv += ["--device", "cuda", "--precision", "bf16", "--dataset", "fashion-mnist"]
    argv += ["--train-option", "fid_every=500", "--train-option", "compile=true"]
    assert main(argv) == 0
    c = seen["cfg"]
    assert (c.methods, c.seeds, c.budget_s, c.steps) == (["sn", "gan"], 3, 5400.0, None)
    assert c.train_flags() == {
        "model": "dcgan28",
        "width": 32,
        "batch_size": 50,
        "device": "cuda",
        "precision": "bf16",
        "dataset": "fashion-mnist",
        "fid_every": 500,
        "compile": True,
    }
    assert main(["compare", "--out", str(tmp_path), "--steps", "5"]) == 0
    assert seen["cfg"].budget_s is None and seen["cfg"].steps == 5
    assert main(["compare", "--out", str(tmp_path)]) == 0
    assert seen["cfg"].budget_s == 1200.0  # 20m by default
    assert seen["cfg"].budget_clock == "wall"
    assert main(["compare", "--out", str(tmp_path), "--budget", "5m", "--budget-clock", "cpu"]) == 0
    assert (seen["cfg"].budget_s, seen["cfg"].budget_clock) == (300.0, "cpu")
    assert seen["cfg"].raw is False
    assert main(["compare", "--out", str(tmp_path), "--raw"]) == 0 and seen["cfg"].raw is True
    assert main(["compare", "--out", str(tmp_path), "--budget", "soon"]) == 2
    assert "20m" in capsys.readouterr().err


def test_cli_end_to_end_on_a_finished_folder(done, capsys):
    """The command on the module's finished folder: nothing to train, report rewritten."""
    from lipgan.cli import main

    cfg, out, paths = done
    (out / "report.html").unlink()
    argv = ["compare", "--methods", "sn,gan", "--seeds", "2", "--steps", "2", "--out"]
    argv += [str(out), "--width", "8", "--batch-size", "16", "--device", "cpu", "--eval-n"]
    argv += ["128", "--quiet"]
    for k, v in OPTIONS.items():
        argv += ["--train-option", f"{k}={str(v).lower()}"]
    assert main(argv) == 0
    assert (out / "report.html").is_file()
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    assert math.isfinite(float(_rows(out / "results.csv")[0]["fid"]))


# --------------------------------------------------------------------------- --jobs N
# Workers are separate ("spawn") processes: monkeypatches of this one do not reach them, so
# these tests make their failures with real run folders.


def _resumable(cfg, method, steps, state="failed", reason="interrupted"):
    """A real run folder of ``method`` trained to ``steps`` with cfg's flags, then marked as
    ``state``: what compare finds after an interrupted comparison."""
    from lipgan import runs

    path = Path(cfg.out) / "runs" / f"{method}-seed0"
    flags = {**cfg.train_flags(), "method": method, "seed": 0, "steps": steps}
    gan.train(gan.TrainConfig.from_dict({**flags, "out": str(path), "quiet": True}))
    with runs.RunFolder(path) as run:
        run.write_status(state, steps, cfg.steps or steps, 1.0, reason)
    return run


def test_jobs_gives_the_serial_results(done, tmp_path, spy):
    """Two runs at a time in worker processes: the same rows as the serial module run (same
    seeds and flags, one thread each), every run done with its grid and eval.json."""
    _, serial, _ = done
    cfg = tiny(tmp_path / "c", methods=["sn", "gan"], seeds=1, jobs=2)
    paths = run_compare(cfg)
    rows = _rows(paths["results"])
    want = [r for r in _rows(serial / "results.csv") if r["seed"] == "0"]
    assert [(r["method"], r["seed"], r["state"], r["steps"]) for r in rows] == [
        (r["method"], r["seed"], r["state"], r["steps"]) for r in want
    ]
    assert [float(r["fid"]) for r in rows] == pytest.approx([float(r["fid"]) for r in want])
    for r in rows:
        run = tmp_path / "c" / "runs" / r["run"]
        assert json.loads((run / "status.json").read_text())["state"] == "done"
        assert (run / "samples" / "last.png").is_file() and (run / "eval.json").is_file()
        assert report.load_run(run).config["threads"] == 1  # the user's threads option
    assert paths["report"].is_file()
    # compare.json checks the flags as given, not the workers' threads: the same command with
    # another --jobs resumes
    assert json.loads((tmp_path / "c" / "compare.json").read_text())["train"] == cfg.train_flags()
    cfg.jobs = 1
    run_compare(cfg)
    assert spy == []


def test_worker_threads():
    assert compare.worker_threads(tiny("x", jobs=2)) == 1  # OPTIONS sets threads=1
    cfg = tiny("x", jobs=2, train_options={})
    assert compare.worker_threads(cfg) == max(1, (compare.os.cpu_count() or 1) // 2)
    cfg.jobs = 10_000
    assert compare.worker_threads(cfg) == 1


@pytest.mark.parametrize("jobs", [0, -1, 1.5, True])
def test_bad_jobs_are_refused(tmp_path, jobs):
    with pytest.raises(LipganError, match="--jobs must be") as err:
        run_compare(tiny(tmp_path / "c", jobs=jobs))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "c").exists()


def test_cli_jobs(monkeypatch, tmp_path, capsys):
    from lipgan.cli import main

    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        return {"results": tmp_path / "results.csv", "report": None}

    monkeypatch.setattr(compare, "run_compare", fake)
    assert main(["compare", "--out", str(tmp_path), "--steps", "2", "--jobs", "3"]) == 0
    assert seen["cfg"].jobs == 3
    assert main(["compare", "--out", str(tmp_path), "--steps", "2"]) == 0
    assert seen["cfg"].jobs == 1
    monkeypatch.undo()
    for bad in ("0", "-1"):
        argv = ["compare", "--out", str(tmp_path / "c"), "--steps", "2", "--jobs", bad]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "--jobs must be" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_jobs_failed_run_is_a_result(tmp_path):
    """wgan-gp resumes from a checkpoint with NaN generator weights and fails on a non-finite
    loss in its worker; sn, trained next to it, finishes and is evaluated."""
    from lipgan import runs

    cfg = tiny(tmp_path / "c", methods=["wgan-gp", "sn"], steps=3, jobs=2)
    run = _resumable(cfg, "wgan-gp", 1)
    state = runs.load_checkpoint(run.last_checkpoint)
    for t in state["generator"].values():
        if t.is_floating_point():
            t.fill_(float("nan"))
    runs.save_checkpoint(run.last_checkpoint, state)
    assert [p.action for p in plan_runs(cfg)] == ["resume", "train"]
    paths = run_compare(cfg)
    rows = {r["method"]: r for r in _rows(paths["results"])}
    assert rows["wgan-gp"]["state"] == "failed" and rows["wgan-gp"]["fid"] == ""
    assert "non-finite loss at generator step 2" in rows["wgan-gp"]["reason"]
    assert (rows["sn"]["state"], rows["sn"]["steps"]) == ("done", "3")
    assert math.isfinite(float(rows["sn"]["fid"]))
    assert "failed: non-finite loss at generator step 2" in paths["report"].read_text()


def test_jobs_other_errors_are_raised_as_in_serial(tmp_path):
    """A run that cannot start (a corrupt checkpoint to resume from) is not a result: the
    worker's LipganError is raised in the main process, as the serial loop raises it."""
    cfg = tiny(tmp_path / "c", methods=["sn"], evaluate=False)
    run = _resumable(cfg, "sn", 1, state="running", reason=None)
    run.last_checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(LipganError) as serial:
        run_compare(cfg)
    cfg.jobs = 2
    with pytest.raises(LipganError) as parallel:
        run_compare(cfg)
    assert type(parallel.value) is type(serial.value)
    assert str(parallel.value) == str(serial.value)


def test_jobs_ctrl_c_interrupts_the_workers(tmp_path, monkeypatch):
    """Ctrl-C reaching only the main process: the pool is stopped, the runs in progress are
    interrupted (recorded by the trainer, so they resume next time), KeyboardInterrupt raised."""
    import os
    import signal
    import threading
    import time

    monkeypatch.setattr(sweep, "STOP_GRACE_S", 0.2)
    cfg = tiny(tmp_path / "c", steps=100_000, jobs=2, evaluate=False)
    statuses = [p.path / "status.json" for p in plan_runs(cfg)]

    def interrupt():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(compare._status(s.parent).get("state") == "running" for s in statuses):
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_compare(cfg)
    assert signal.getsignal(signal.SIGINT) is before  # the main process's handler is back
    for s in statuses:
        st = json.loads(s.read_text())
        assert (st["state"], st["reason"]) == ("failed", "interrupted")
        assert st["step"] < 100_000
    assert [p.action for p in plan_runs(cfg)] == ["resume", "resume"]


def test_jobs_train_a_users_registered_constraint(tmp_path):
    """A constraint registered by name in the user's own module (not lipgan's) trains in the
    worker processes, and each run records it as itself."""
    import user_constraints  # registers test-user-clip in this process only

    tight = Variant("tight", {"method": "test-user-clip", "constraint_options": {"c": 0.02}})
    cfg = tiny(
        tmp_path / "c", methods=["test-user-clip"], seeds=2, evaluate=False, jobs=2,
        variants=[tight],
    )  # fmt: skip
    run_compare(cfg)
    for name, c in (("test-user-clip-seed0", 0.05), ("test-user-clip-seed1", 0.05),
                    ("tight-seed1", 0.02)):  # fmt: skip
        run = report.load_run(tmp_path / "c" / "runs" / name)
        assert run.status["state"] == "done"
        assert run.config["constraint"] == "test-user-clip"
        # the clip held in the worker: every critic parameter within [-c, c]
        critic = RunFolder(run.path).load_export("critic")
        assert max(float(p.detach().abs().max()) for p in critic.parameters()) <= c + 1e-7
    assert user_constraints.UserClip.name == "test-user-clip"


def test_jobs_refuse_a_constraint_workers_cannot_import(tmp_path, monkeypatch):
    from lipgan import constraints
    from lipgan.constraints import base

    class Local(constraints.WeightClip):  # inside a function: a worker cannot import it
        pass

    monkeypatch.setitem(base._REGISTRY, "test-local-clip", Local)
    with pytest.raises(LipganError, match="'test-local-clip' cannot reach the worker") as err:
        run_compare(tiny(tmp_path / "c", methods=["test-local-clip"], jobs=2))
    assert "--jobs 1" in str(err.value)
    assert not (tmp_path / "c" / "compare.json").exists()


# --------------------------------------------------------------------------- variants, vocabulary


def test_variants_and_a_registry_method_are_compared(tmp_path):
    """Config variants of one method side by side (what a bash sweep once did), next
    to a method that is a constraint name and no preset (bjorck)."""
    variants = [
        Variant("sn-w8", {"method": "sn"}),
        Variant("sn-w12", {"method": "sn", "width": 12}),
        # the MLP critic: on dcgan28 the trainer exports bjorck's critic before its first forward
        Variant("bjorck", {"model": "mlp"}),
    ]
    cfg = tiny(tmp_path / "c", methods=[], variants=variants, steps=1, evaluate=False)
    paths = run_compare(cfg)
    rows = {r["run"]: r for r in _rows(paths["results"])}
    assert sorted(rows) == ["bjorck-seed0", "sn-w12-seed0", "sn-w8-seed0"]
    assert {r["variant"] for r in rows.values()} == {"bjorck", "sn-w8", "sn-w12"}
    assert all(r["state"] == "done" for r in rows.values())
    conf = {n: report.load_run(tmp_path / "c" / "runs" / n).config for n in rows}
    assert (conf["sn-w8-seed0"]["width"], conf["sn-w12-seed0"]["width"]) == (8, 12)
    assert conf["sn-w12-seed0"]["constraint"] == "spectral-norm"
    assert conf["bjorck-seed0"]["constraint"] == "bjorck"
    saved = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert saved["variants"]["sn-w12"] == {"method": "sn", "width": 12}
    # the report (written by compare, and rebuilt from the folder) keeps the two sn variants apart
    for page in (paths["report"], report.build_report([tmp_path / "c"], tmp_path / "again.html")):
        text = page.read_text()
        assert "sn-w8 (sn)" in text and "sn-w12 (sn)" in text
    md = report.markdown_summary([tmp_path / "c"])
    assert [line.split(" | ")[0] for line in md.splitlines()[2:]] == [
        "| sn-w8 (sn)", "| sn-w12 (sn)", "| bjorck",
    ]  # fmt: skip
    # the same name with other settings would mix unlike runs: refused, nothing trained
    variants[1] = Variant("sn-w12", {"method": "sn", "width": 16})
    with pytest.raises(LipganError, match="same flags"):
        run_compare(tiny(tmp_path / "c", methods=[], variants=variants, steps=1))


def test_methods_take_constraint_names(tmp_path):
    """`--methods bjorck`: a constraint of the registry is a method (the WGAN-GP setup)."""
    from lipgan.train import TrainConfig, presets

    (v,) = compare._check(tiny(tmp_path / "c", methods=["bjorck"]))
    resolved = presets.resolve(TrainConfig.from_dict(compare.variant_fields(v)))
    assert (resolved.method, resolved.constraint, resolved.loss) == (
        "bjorck",
        "bjorck",
        "wasserstein",
    )
    assert not (tmp_path / "c").exists()


def test_cli_variants(monkeypatch, tmp_path):
    from lipgan.cli import main

    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        return {"results": tmp_path / "results.csv", "report": None}

    monkeypatch.setattr(compare, "run_compare", fake)
    vfile = tmp_path / "v.yaml"
    vfile.write_text("w64-lam1: {method: frobenius, width: 64, constraint_options: {lam: 1}}\n")
    argv = ["compare", "--out", str(tmp_path), "--steps", "2", "--variants", str(vfile)]
    argv += ["--variant", "w32-b05:method=frobenius,width=32,beta1=0.5"]
    assert main(argv) == 0
    c = seen["cfg"]
    assert c.methods == []  # variants given: no default methods
    assert [(v.name, v.options) for v in c.variants] == [
        ("w32-b05", {"method": "frobenius", "width": 32, "beta1": 0.5}),
        ("w64-lam1", {"method": "frobenius", "width": 64, "constraint_options": {"lam": 1}}),
    ]
    assert main(argv + ["--methods", "gan"]) == 0 and seen["cfg"].methods == ["gan"]


def test_variant_errors_are_one_line_before_anything_is_written(tmp_path):
    for variants, match in (
        ([Variant("w64", {"width": 64})], "name the method"),
        ([Variant("x", {"method": "nope"})], "unknown method 'nope'"),
        ([Variant("x", {"method": "sn", "seed": 3})], "set by compare"),
        ([Variant("sn"), Variant("sn")], "given twice"),
    ):
        with pytest.raises(LipganError, match=match) as err:
            run_compare(tiny(tmp_path / "c", methods=[], variants=variants))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- red-team findings


def test_train_options_in_exponent_notation_are_numbers(monkeypatch, tmp_path):
    """`--train-option lr_d=1e-4` is the learning rate 1e-4 (YAML 1.1 reads it as a string,
    which crashed in Adam after compare.json was written)."""
    from lipgan.cli import main

    seen = {}
    monkeypatch.setattr(compare, "run_compare", lambda cfg: seen.update(cfg=cfg) or {
        "results": tmp_path / "r.csv", "report": None})  # fmt: skip
    argv = ["compare", "--out", str(tmp_path / "c"), "--steps", "1"]
    assert main(argv + ["--train-option", "lr_d=1e-4", "--train-option", "lr-g=2E-4"]) == 0
    assert seen["cfg"].train_options == {"lr_d": 1e-4, "lr_g": 2e-4}
    assert all(isinstance(v, float) for v in seen["cfg"].train_options.values())


def test_a_folder_in_the_way_is_refused_not_deleted(tmp_path, capsys):
    """OUT/runs/<method>-seed0 holding something that is not a lipgan run: compare refuses,
    naming it, before writing compare.json; nothing in it is touched."""
    from lipgan.cli import main

    out = tmp_path / "c"
    mine = out / "runs" / "sn-seed0"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(LipganError, match="sn-seed0 holds notes.txt and is not a lipgan run"):
        run_compare(tiny(out, methods=["sn"]))
    argv = ["compare", "--methods", "sn", "--seeds", "1", "--steps", "1", "--out", str(out)]
    assert main(argv + ["--no-eval", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(mine) in err
    assert (mine / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in out.rglob("*")) == ["notes.txt", "runs", "sn-seed0"]
    # a file where the run folder goes is refused too
    (mine / "notes.txt").rename(tmp_path / "notes.txt")
    mine.rmdir()
    mine.write_text("a file")
    with pytest.raises(LipganError, match="is a file"):
        run_compare(tiny(out, methods=["sn"]))
    assert mine.read_text() == "a file"


def test_a_bad_train_option_is_refused_before_anything_is_written(tmp_path, capsys):
    """A wrongly typed training option is one line before OUT exists, so the corrected command
    then runs (it used to crash in Adam after compare.json was written, and the corrected
    command was refused as "other flags")."""
    from lipgan.cli import main

    out = tmp_path / "c"
    argv = ["compare", "--methods", "sn", "--seeds", "1", "--steps", "1", "--width", "8"]
    argv += ["--batch-size", "16", "--device", "cpu", "--no-eval", "--quiet", "--out", str(out)]
    argv += ["--threads", "1", "--no-tensorboard"]
    for bad in (["--train-option", "lr_d=fast"], ["--lr-d", "fast"], ["--train-option", "steps=2"]):
        assert main(argv + bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lipgan: error:") and len(err.splitlines()) == 1, err
        assert not out.exists()
    assert main(argv + ["--train-option", "lr_d=1e-4"]) == 0
    assert report.load_run(out / "runs" / "sn-seed0").config["lr_d"] == pytest.approx(1e-4)
