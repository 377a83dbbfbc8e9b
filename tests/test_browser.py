"""Acceptance: the report of two tiny real training runs, opened in headless Chromium.

Checks that the page logs no console error, that every image decodes (``complete`` and
``naturalWidth > 0``), that the tables are there, and looks at Chromium's own screenshots (with
Pillow): the page is not blank, no plot has ink on its outer edge (a legend or label cut off by
the figure's border, as the Lipschitz plot's legend once was), and each sample grid is shown at
twice its pixels. The screenshots go to the test-artifacts folder. Needs Debian's
``chromium`` and ``chromium-driver`` (``scripts/system_deps.sh`` installs them); skipped with
the reason when they are missing.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def driver():
    """A headless Chromium with a fresh profile; skips (before any training) when absent."""
    drv, profile = _browser_or_skip()
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _browser_or_skip():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} missing: install Debian's chromium and chromium-driver "
            "(scripts/system_deps.sh does it as root)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed in this environment (pip install -e '.[dev]')")

    profile = tempfile.mkdtemp(prefix="lipgan-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,2000",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    return driver, profile


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny real runs of different methods, trained by `lipgan train` (one thread: the two
    cores are shared; a 128-sample FID at the end so the FID plot has points)."""
    import torch

    from lipgan.cli import main

    root = tmp_path_factory.mktemp("runs")
    paths = []
    threads = torch.get_num_threads()
    try:
        for method in ("wgan-gp", "sn"):
            out = root / method
            argv = ["train", "--method", method, "--steps", "3", "--width", "8", "--out", str(out)]
            argv += ["--batch-size", "16", "--seed", "0", "--device", "cpu", "--quiet"]
            argv += ["--threads", "1", "--fid-n", "128", "--no-tensorboard"]
            argv += ["--measure-budget", "1"]  # 3 steps: the end-of-run FID is never postponed
            assert main(argv) == 0, f"lipgan train failed for {method}"
            paths.append(out)
    finally:
        torch.set_num_threads(threads)
    return paths


def _inspect(driver, page: Path) -> dict:
    """Open ``page`` and collect what the acceptance checks look at."""
    driver.get_log("browser")  # drop entries of earlier pages
    driver.get(page.resolve().as_uri())
    images = driver.execute_script(
        "return Array.from(document.images).map("
        "i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);"
    )
    tables = driver.execute_script(
        "return Array.from(document.querySelectorAll('table')).map("
        "t => [t.id, t.tBodies[0].rows.length]);"
    )
    states = driver.execute_script(
        "return Array.from(document.querySelectorAll('#runs td.state')).map(c => c.textContent)"
    )
    logs = driver.get_log("browser")
    return {
        "title": driver.title,
        "images": images,
        "broken": [alt for alt, complete, w, h in images if not (complete and w > 0 and h > 0)],
        "tables": dict(tables),
        "states": states,
        "severe": [entry for entry in logs if entry.get("level") == "SEVERE"],
    }


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.int16)


def _edge_ink(png: bytes, width: int = 2, ink: int = 200) -> int:
    """Dark pixels (grey level below ``ink``) in the outer ``width`` pixels of a screenshot of
    a plot: 0 when every legend, label and tick lies inside the figure."""
    a = _pixels(png)
    edge = np.ones(a.shape, dtype=bool)
    edge[width:-width, width:-width] = False
    return int(((a < ink) & edge).sum())


def _shots(driver, selector: str) -> list[dict]:
    """Chromium's screenshot of each element matching ``selector``, with its size on screen
    and its image's own size."""
    from selenium.webdriver.common.by import By

    out = []
    for el in driver.find_elements(By.CSS_SELECTOR, selector):
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
        w, h, nw, nh = driver.execute_script(
            "const r = arguments[0].getBoundingClientRect();"
            "return [r.width, r.height, arguments[0].naturalWidth, arguments[0].naturalHeight];",
            el,
        )
        out.append({"alt": el.get_attribute("alt"), "png": el.screenshot_as_png,
                    "shown": (w, h), "natural": (nw, nh)})  # fmt: skip
    return out


def test_report_in_headless_chromium(driver, two_runs, tmp_path, artifacts_dir):
    from lipgan import report

    for run in map(report.load_run, two_runs):  # the time-to-quality plot has points to show
        assert np.isfinite(run.column("fid")).any() and np.isfinite(run.column("cpu_s")).any()
    page = report.build_report(two_runs, tmp_path / "report.html")
    seen = _inspect(driver, page)
    assert "lipgan" in seen["title"]
    assert len(seen["images"]) == 4 + len(two_runs)  # four plots, one sample grid per run
    assert not seen["broken"], f"images that did not load: {seen['broken']}"
    assert seen["tables"] == {"summary": 2, "cost": 2, "quality": 2, "runs": 2}
    assert seen["states"] == ["done", "done"]
    assert not seen["severe"], f"console errors: {seen['severe']}"
    shot = Path(artifacts_dir) / "report.png"
    driver.save_screenshot(str(shot))
    full = _pixels(shot.read_bytes())
    assert full.std() > 10 and (full < 128).mean() > 0.005  # not a blank page
    plots = _shots(driver, ".plots img")
    assert len(plots) == 4
    for i, p in enumerate(plots):
        (Path(artifacts_dir) / f"report-plot{i}.png").write_bytes(p["png"])
        assert _pixels(p["png"]).std() > 10, p["alt"]
        assert _edge_ink(p["png"]) == 0, f"{p['alt']}: ink on the figure's edge (cut off)"
    grids = _shots(driver, "figure img")
    assert len(grids) == len(two_runs)
    for g in grids:
        (nw, nh), (w, h) = g["natural"], g["shown"]
        assert abs(w - 2 * nw) <= 2 and abs(h - 2 * nh) <= 2, g  # 1 px border each side
        shown = _pixels(g["png"])
        assert abs(shown.shape[1] - 2 * nw) <= 3 and shown.std() > 10


def test_checks_catch_a_broken_page(driver, tmp_path):
    """The same checks fail on a page with an undecodable grid and a script error."""
    from test_report import _rows, make_run

    from lipgan import report

    run = make_run(tmp_path / "bad", "sn", 0, rows=_rows(3, 1.0, 30))
    (run / "samples" / "last.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    page = report.build_report([run], tmp_path / "bad.html")
    text = page.read_text()
    page.write_text(text.replace("</body>", "<script>throw new Error('boom')</script></body>"))
    seen = _inspect(driver, page)
    assert len(seen["broken"]) == 1 and "samples of sn" in seen["broken"][0]
    assert any("boom" in entry["message"] for entry in seen["severe"])


def test_edge_check_catches_a_legend_cut_off_by_the_figure(driver, tmp_path):
    """A plot whose legend box runs past the figure's left border (the old Lipschitz plot with
    one method): its screenshot has ink on the edge; the same plot drawn inside does not."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def plot(loc: str) -> bytes:
        fig = Figure(figsize=(3.8, 3.3), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot([0, 1], [1, 2], label="a long legend entry, too wide for this small figure")
        ax.plot([0, 1], [2, 1], label="another entry")
        kw = {"loc": "outside upper center", "ncol": 2} if loc == "outside" else {"loc": "best"}
        (fig if loc == "outside" else ax).legend(fontsize=8, **kw)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    import base64

    imgs = "".join(
        f'<div class="plots"><img alt="{loc}" src="data:image/png;base64,'
        f'{base64.b64encode(plot(loc)).decode()}"></div>'
        for loc in ("outside", "inside")
    )
    page = tmp_path / "edge.html"
    page.write_text(f"<!DOCTYPE html><html><body>{imgs}</body></html>")
    driver.get(page.resolve().as_uri())
    ink = {p["alt"]: _edge_ink(p["png"]) for p in _shots(driver, ".plots img")}
    assert ink["outside"] > 0 and ink["inside"] == 0, ink
