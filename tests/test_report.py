"""The report's parsing and page, on run folders written by hand to the run-folder contract."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import statistics
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lipgan import report, schema
from lipgan.errors import LipganError

COLUMNS = schema.METRIC_COLUMNS


def _png(width: int = 8, height: int = 8) -> bytes:
    """A tiny grey PNG written by hand (independent of matplotlib)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"".join(b"\x00" + bytes(range(width)) for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def make_run(
    folder: Path,
    method: str,
    seed: int,
    *,
    state: str = "done",
    reason: str | None = None,
    rows: list[dict] | None = None,
    eval_: dict | None = None,
    samples: bool = True,
    extra_line: str | None = None,
    columns: tuple[str, ...] = COLUMNS,
) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        f"method: {method}\nseed: {seed}\nmodel: dcgan28\nwidth: 8\ndataset: mnist\n"
    )
    rows = rows if rows is not None else []
    steps = int(rows[-1]["step"]) if rows else 0
    (folder / "status.json").write_text(
        json.dumps({"state": state, "reason": reason, "step": steps, "steps": 10, "wall_s": 2.5})
    )
    with open(folder / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
        if extra_line is not None:
            fh.write(extra_line)
    if eval_ is not None:
        (folder / "eval.json").write_text(json.dumps(eval_))
    if samples:
        (folder / "samples").mkdir()
        (folder / "samples" / "last.png").write_bytes(_png())
    return folder


def _rows(n: int, w0: float, ms: float) -> list[dict]:
    return [
        {
            "step": i + 1,
            "time_s": 0.1 * (i + 1),
            "wasserstein": w0 / (i + 1),
            "gnorm_real_max": 0.5 + i,
            "gnorm_fake_max": 0.7 + i if i % 2 == 0 else "",
            "gnorm_interp_max": 0.6 + i,
            "product_bound": 40.0 + i if i % 3 == 0 else "",
            "fid": 300.0 - 10 * i if i % 2 == 1 else "",
            "ms_per_step": ms + i,
        }
        for i in range(n)
    ]


EVAL = {
    "fid": 12.0,
    "kid": -0.001,
    "is": 8.5,
    "precision": 0.7,
    "recall": 0.6,
    "density": 0.9,
    "coverage": 0.8,
    "classes_covered": 10,
    "class_kl": 0.02,
    "n": 1000,
}


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs: list[str] = []
        self.tables: list[str] = []
        self.text: list[str] = []
        self.scripts = 0
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table":
            self.tables.append(a.get("id", ""))
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if key in a and not a[key].startswith("data:"):
                self.external.append(a[key])

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Collect:
    p = _Collect()
    p.feed(page)
    return p


def test_metrics_csv_parsing_and_derived_values(tmp_path):
    rows = _rows(5, 2.0, 100.0)
    run_dir = make_run(tmp_path / "a", "wgan-gp", 0, rows=rows, extra_line="6,0.6,0.1")
    run = report.load_run(run_dir)
    assert len(run) == 5  # the cut-short last line is dropped
    assert run.method == "wgan-gp" and run.seed == 0 and run.state == "done"
    assert math.isnan(run.column("fid")[0]) and run.column("fid")[1] == 290.0
    # max over the three gnorm_*_max columns where any is present, independently computed
    expect = [
        max(v for v in (r["gnorm_real_max"], r["gnorm_fake_max"], r["gnorm_interp_max"]) if v != "")
        for r in rows
    ]
    assert run.max_grad_norm().tolist() == pytest.approx(expect)
    assert run.last("product_bound") == 43.0
    assert run.last("fid") == 270.0
    assert run.last("wasserstein") == pytest.approx(2.0 / 5)
    assert run.ms_per_step() == statistics.median(r["ms_per_step"] for r in rows)


def test_ms_per_step_falls_back_to_wall_time(tmp_path):
    rows = [{"step": 5, "time_s": 1.0, "wasserstein": 0.1}]
    run = report.load_run(make_run(tmp_path / "a", "sn", 1, rows=rows))
    assert run.ms_per_step() == pytest.approx(1000 * 2.5 / 5)


def test_summary_mean_std_over_seeds_excludes_failed(tmp_path):
    fids = [10.0, 14.0, 15.0]
    runs = []
    for s, f in enumerate(fids):
        ev = dict(EVAL, fid=f)
        runs.append(make_run(tmp_path / f"gp{s}", "wgan-gp", s, rows=_rows(3, 1, 50), eval_=ev))
    runs.append(
        make_run(
            tmp_path / "gp9",
            "wgan-gp",
            9,
            state="failed",
            reason="non-finite loss at step 2",
            rows=_rows(2, 1, 50),
            eval_=dict(EVAL, fid=1e6),
        )
    )
    runs.append(
        make_run(tmp_path / "sn0", "sn", 0, rows=_rows(3, 1, 30), eval_=dict(EVAL, fid=7.0))
    )
    loaded = [report.load_run(p) for p in runs]
    summary = {e["method"]: e for e in report.summarize(loaded)}
    gp = summary["wgan-gp"]
    assert (gp["runs"], gp["done"], gp["failed"]) == (4, 3, 1)
    mean, std = gp["stats"]["fid"]
    assert mean == pytest.approx(statistics.mean(fids))
    assert std == pytest.approx(statistics.stdev(fids))
    mean, std = summary["sn"]["stats"]["fid"]
    assert mean == 7.0 and math.isnan(std)
    assert report._fmt_stat(summary["sn"]["stats"]["fid"]) == "7"


def test_page_is_self_contained_and_lists_failed_runs(tmp_path):
    a = make_run(tmp_path / "gp0", "wgan-gp", 0, rows=_rows(6, 1.5, 80), eval_=EVAL)
    b = make_run(tmp_path / "gp1", "wgan-gp", 1, rows=_rows(6, 1.2, 82), eval_=EVAL)
    bad = make_run(
        tmp_path / "clip0",
        "wgan-clip",
        0,
        state="failed",
        reason="loss is nan at step 3 <script>alert(1)</script>",
        rows=_rows(2, 1, 60),
        samples=False,
    )
    out = report.build_report([a, b, bad], tmp_path / "out" / "r.html")
    page = out.read_text()
    parsed = _parse(page)
    assert parsed.scripts == 0 and parsed.external == []
    assert {"summary", "quality", "runs"} <= set(parsed.tables)
    # four plots and two sample grids, all inline PNG
    assert len(parsed.imgs) == 6
    assert all(src.startswith("data:image/png;base64,") for src in parsed.imgs)
    assert sum(src.endswith(base64.b64encode(_png()).decode()) for src in parsed.imgs) == 2
    text = "".join(parsed.text)
    assert "failed: loss is nan at step 3 <script>alert(1)</script>" in text  # escaped, shown
    assert "<script>alert" not in page
    assert html.escape("<script>") in page
    assert "no samples/last.png" in text


def test_single_run_page(tmp_path):
    a = make_run(tmp_path / "only", "sn", 0, rows=_rows(4, 1.0, 30))
    page = report.build_html([report.load_run(a)])
    parsed = _parse(page)
    assert len(parsed.imgs) == 5 and "runs" in parsed.tables
    assert "lipgan report: only" in "".join(parsed.text)


def test_compare_folder_expands_to_its_runs(tmp_path):
    make_run(tmp_path / "cmp" / "runs" / "sn-seed0", "sn", 0, rows=_rows(2, 1, 30))
    make_run(tmp_path / "cmp" / "runs" / "gan-seed0", "gan", 0, rows=_rows(2, 1, 30))
    paths = report.expand_paths([tmp_path / "cmp"])
    assert [p.name for p in paths] == ["gan-seed0", "sn-seed0"]


def test_errors_are_user_errors(tmp_path):
    with pytest.raises(LipganError, match="does not exist"):
        report.expand_paths([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LipganError, match="neither a run folder"):
        report.expand_paths([tmp_path / "empty"])
    bad = make_run(tmp_path / "bad", "sn", 0)
    (bad / "status.json").write_text("{not json")
    with pytest.raises(LipganError, match="not valid JSON"):
        report.load_run(bad)


def test_cli(tmp_path, capsys):
    from lipgan.cli import main

    a = make_run(tmp_path / "r", "sn", 0, rows=_rows(3, 1, 30))
    out = tmp_path / "page.html"
    assert main(["report", str(a), "--out", str(out)]) == 0
    assert out.is_file() and "<table" in out.read_text()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_markdown_summary_in_the_compare_order_with_failures(tmp_path, capsys):
    from lipgan.cli import main

    cmp = tmp_path / "cmp"
    for s, f in enumerate((10.0, 14.0)):
        make_run(
            cmp / "runs" / f"sn-seed{s}", "sn", s, rows=_rows(3, 1, 30), eval_=dict(EVAL, fid=f)
        )
    make_run(
        cmp / "runs" / "snr-seed0", "snr", 0, state="failed", reason="non-finite | loss",
        rows=_rows(2, 1, 30),
    )  # fmt: skip
    (cmp / "compare.json").write_text(json.dumps({"methods": ["snr", "sn"]}))
    table = report.markdown_summary([cmp])
    lines = table.splitlines()
    assert lines[0].startswith("| method | done | FID |") and len(lines) == 4
    assert lines[2].startswith("| snr | 0/1 | non-finite \\| loss |")  # order from compare.json
    assert lines[3].startswith("| sn | 2/2 | 12 ± 2.83 |")
    assert main(["report", str(cmp), "--markdown"]) == 0
    assert capsys.readouterr().out == table


def test_hand_edited_run_folders_give_one_line_errors_or_empty_cells(tmp_path, capsys):
    """Red-team finding 15: NaN/inf numbers, non-UTF-8 files and markup in names."""
    from lipgan.cli import main

    nan = make_run(tmp_path / "nan", "sn", 0, rows=_rows(3, 1, 30))
    (nan / "config.yaml").write_text("method: sn\nseed: .nan\n")
    (nan / "status.json").write_text('{"state": "done", "step": NaN, "wall_s": Infinity}')
    inf = make_run(tmp_path / "inf", "a|b<b>x</b>", 1, rows=_rows(3, 1, 30))
    (inf / "config.yaml").write_text("method: a|b<b>x</b>\nseed: .inf\n")
    for argv in (["report", str(nan), str(inf), "--out", str(tmp_path / "r.html")],
                 ["report", str(nan), str(inf), "--markdown"]):  # fmt: skip
        assert main(argv) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert any(line.startswith("| a\\|b&lt;b&gt;x&lt;/b&gt; |") for line in table)
    cols = table[0].count(" | ")  # the rule line (table[1]) has no spaces
    assert len(table) == 4 and all(line.count(" | ") == cols for line in table[2:])
    run = report.load_run(nan)
    assert run.seed is None and run.steps_done == 3 and run.wall_s is not None
    for name, data in (("config.yaml", b"\xff\xfe method"), ("metrics.csv", b"step\n\xff\n")):
        broken = make_run(tmp_path / f"broken-{name}", "sn", 0, rows=_rows(2, 1, 30))
        (broken / name).write_bytes(data)
        assert main(["report", str(broken), "--out", str(tmp_path / "x.html")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{name}: not UTF-8" in err, err
        assert not (tmp_path / "x.html").exists()
    yaml_bad = make_run(tmp_path / "yaml", "sn", 0)
    (yaml_bad / "config.yaml").write_text("method: [unclosed\n")
    assert main(["report", str(yaml_bad), "--markdown"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid YAML" in err


# ------------------------------------------------------------------ variants, time to quality

#: metrics.csv as runs write it since cpu_s and fid_mark_s exist (older folders lack both)
NEW_COLUMNS = (*COLUMNS, *(c for c in ("cpu_s", "fid_mark_s") if c not in COLUMNS))
#: ... and as runs wrote it before
OLD_COLUMNS = tuple(c for c in COLUMNS if c not in ("cpu_s", "fid_mark_s"))


def _fid_rows(times, fids, cpu=None, marks=None) -> list[dict]:
    return [
        {"step": i + 1, "time_s": t, "fid": f, "cpu_s": "" if cpu is None else cpu[i],
         "fid_mark_s": "" if marks is None else marks[i], "wasserstein": 1.0 / (i + 1),
         "gnorm_real_max": 0.5 + i, "product_bound": 3.0 + i}
        for i, (t, f) in enumerate(zip(times, fids))
    ]  # fmt: skip


def test_compare_variants_of_one_method_are_reported_apart(tmp_path, capsys):
    """frobenius at two strengths (`compare --variant lam1:method=frobenius,...`): two groups,
    not one pool of four seeds."""
    cmp = tmp_path / "cmp"
    for name, seed, fid in (("frobenius", 0, 10.0), ("frobenius", 1, 12.0), ("lam1", 0, 50.0),
                            ("lam1", 1, 70.0)):  # fmt: skip
        make_run(cmp / "runs" / f"{name}-seed{seed}", "frobenius", seed, rows=_rows(3, 1, 30),
                 eval_={**EVAL, "fid": fid})  # fmt: skip
    (cmp / "compare.json").write_text(json.dumps({"methods": ["frobenius", "lam1"]}))
    runs = report.load_runs([cmp])
    assert sorted((r.name, r.group) for r in runs) == [
        ("frobenius-seed0", "frobenius"), ("frobenius-seed1", "frobenius"),
        ("lam1-seed0", "lam1"), ("lam1-seed1", "lam1"),
    ]  # fmt: skip
    summary = {e["method"]: e for e in report.summarize(runs, ["frobenius", "lam1"])}
    assert summary["frobenius"]["stats"]["fid"] == pytest.approx((11.0, statistics.stdev([10, 12])))
    assert summary["lam1"]["stats"]["fid"] == pytest.approx((60.0, statistics.stdev([50, 70])))
    assert summary["lam1"]["name"] == "lam1 (frobenius)"
    md = report.markdown_summary([cmp])
    assert "| lam1 (frobenius) | 2/2 | 60 ± 14.1 |" in md
    page = report.build_report([cmp], tmp_path / "r.html").read_text()
    assert "lam1 (frobenius)" in page
    # labels given by the caller (compare passes its cells' variants) win
    other = report.load_runs([cmp / "runs" / "lam1-seed0"], {cmp / "runs" / "lam1-seed0": "x"})
    assert other[0].group == "x"


def test_fid_at_time_marks(tmp_path):
    run = report.load_run(make_run(
        tmp_path / "a", "sn", 0, columns=NEW_COLUMNS,
        rows=_fid_rows([30.0, 61.0, 150.0, 290.0], [400.0, 300.0, 200.0, 100.0],
                       marks=["", 60.0, 120.0, ""]),
    ))  # fmt: skip
    assert report.fid_at(run, 60.0) == 300.0  # the row taken for the 60 s mark
    assert report.fid_at(run, 120.0) == 200.0
    # 300 s: past the last row (290 s) but within 5 %: that row; 600 s: none
    assert report.fid_at(run, 300.0) == 100.0 and report.fid_at(run, 600.0) is None
    assert report.fid_at(run, 10.0) is None  # before the first FID
    old = report.load_run(make_run(  # no fid_mark_s column: interpolated between rows
        tmp_path / "b", "sn", 0, rows=_fid_rows([100.0, 200.0], [500.0, 300.0]),
        columns=OLD_COLUMNS,
    ))  # fmt: skip
    assert "fid_mark_s" not in old.metrics
    assert report.fid_at(old, 120.0) == pytest.approx(500.0 - 0.2 * 200.0)
    assert report.run_row(old)["fid_2m"] == pytest.approx(460.0)
    assert report.run_row(old)["fid_1m"] is None


def test_fid_at_reads_cpu_seconds_for_a_cpu_budget_run(tmp_path):
    """A run bounded by --max-cpu-s (compare --budget-clock cpu): its marks are CPU seconds,
    so fid_at interpolates on cpu_s, not on the (here twice as long) wall time."""
    path = make_run(tmp_path / "a", "sn", 0, columns=NEW_COLUMNS,
                    rows=_fid_rows([200.0, 400.0], [500.0, 300.0], cpu=[100.0, 200.0]))
    wall = report.load_run(path)
    assert report.fid_at(wall, 150.0) is None  # before its first row at 200 wall s
    with open(path / "config.yaml", "a") as fh:
        fh.write("max_cpu_s: 200.0\n")
    cpu = report.load_run(path)
    assert report.fid_at(cpu, 150.0) == pytest.approx(400.0)
    assert report.run_row(cpu)["fid_2m"] == pytest.approx(460.0)


def test_time_to_quality_table_is_mean_std_over_seeds_with_dashes(tmp_path):
    a = make_run(tmp_path / "a", "sn", 0, rows=_fid_rows([60.0, 120.0], [300.0, 200.0]))
    b = make_run(tmp_path / "b", "sn", 1, rows=_fid_rows([60.0, 120.0], [340.0, 260.0]))
    summary = report.summarize([report.load_run(a), report.load_run(b)])
    stats = summary[0]["stats"]
    assert stats["fid_1m"] == pytest.approx((320.0, statistics.stdev([300, 340])))
    assert stats["fid_2m"] == pytest.approx((230.0, statistics.stdev([200, 260])))
    assert stats["fid_5m"] is None and stats["fid_10m"] is None
    md = report.markdown_summary([a, b])
    head, _, row = md.splitlines()
    assert "FID @ 1 min" in head and "FID @ 10 min" in head
    assert row.endswith("| 320 ± 28.3 | 230 ± 42.4 | – | – |")


def test_pooled_curve_is_mean_and_std_over_seeds(tmp_path):
    rows_a = _fid_rows([10.0, 20.0, 40.0], [300.0, 200.0, 100.0], cpu=[19.0, 39.0, 79.0])
    rows_b = _fid_rows([15.0, 30.0], [280.0, 180.0], cpu=[29.0, 59.0])
    runs = [
        report.load_run(make_run(tmp_path / "a", "sn", 0, columns=NEW_COLUMNS, rows=rows_a)),
        report.load_run(make_run(tmp_path / "b", "sn", 1, columns=NEW_COLUMNS, rows=rows_b)),
    ]
    t, mean, std = report.pooled_curve(runs, "time_s")
    assert list(t) == [15.0, 20.0, 30.0]  # the seeds' own times inside the shared range
    a = [250.0, 200.0, 150.0]  # run a interpolated at 15, 20, 30
    b = [280.0, 280.0 - 100.0 * 5 / 15, 180.0]
    assert mean == pytest.approx([(x + y) / 2 for x, y in zip(a, b)])
    assert std == pytest.approx([statistics.stdev([x, y]) for x, y in zip(a, b)])
    t, mean, _ = report.pooled_curve(runs, "cpu_s")
    assert t[0] == 29.0 and t[-1] == 59.0
    rows = _fid_rows([1.0, 2.0], [5, 4])
    old = report.load_run(make_run(tmp_path / "c", "sn", 0, rows=rows, columns=OLD_COLUMNS))
    assert "cpu_s" not in old.metrics
    assert report.pooled_curve([old], "cpu_s") is None  # written before cpu_s existed


def _legends_inside(fig) -> list[str]:
    """The legends of ``fig`` that reach outside the figure (drawn at the saved size)."""
    from matplotlib.legend import Legend

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    out = []
    for legend in fig.findobj(Legend):
        ext = legend.get_window_extent(renderer)
        if ext.x0 < box.x0 - 0.5 or ext.y0 < box.y0 - 0.5 or ext.x1 > box.x1 + 0.5 or (
            ext.y1 > box.y1 + 0.5
        ):
            out.append(f"{ext} outside {box}")
    return out


@pytest.mark.parametrize("n_methods", [1, 2, 7])
def test_every_legend_lies_inside_its_figure(tmp_path, n_methods):
    from lipgan.report import plots

    runs = [
        report.load_run(make_run(tmp_path / f"m{i}", f"method-{i}", 0, columns=NEW_COLUMNS,
                                 rows=_fid_rows([10.0, 20.0], [300.0, 200.0], cpu=[20.0, 40.0])))
        for i in range(n_methods)
    ]  # fmt: skip
    by_method = report.group_by_method(runs)
    colors = plots._colors(list(by_method))
    for make in (plots.figure_wasserstein, plots.figure_fid, plots.figure_lipschitz,
                 plots.figure_time_to_quality):  # fmt: skip
        fig = make(by_method, colors)
        assert fig.findobj(lambda o: type(o).__name__ == "Legend"), make.__name__
        assert _legends_inside(fig) == [], make.__name__


def test_sample_grids_are_shown_at_twice_their_pixels(tmp_path):
    run = make_run(tmp_path / "a", "sn", 0, rows=_rows(2, 1, 30))
    (run / "samples" / "last.png").write_bytes(_png(58, 30))
    page = report.build_html([report.load_run(run)])
    assert 'width="116" height="60"' in page and "image-rendering: pixelated" in page
