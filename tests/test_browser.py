"""Acceptance: the report of two tiny real training runs, opened in headless Chromium.

Checks that the page logs no console error, that every image decodes (``complete`` and
``naturalWidth > 0``), that the tables are there, and saves a screenshot to the test-artifacts
folder. Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/system_deps.sh`` installs
them); skipped with the reason when they are missing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

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


def test_report_in_headless_chromium(driver, two_runs, tmp_path, artifacts_dir):
    from lipgan import report

    page = report.build_report(two_runs, tmp_path / "report.html")
    seen = _inspect(driver, page)
    assert "lipgan" in seen["title"]
    assert len(seen["images"]) == 3 + len(two_runs)  # three plots, one sample grid per run
    assert not seen["broken"], f"images that did not load: {seen['broken']}"
    assert seen["tables"] == {"summary": 2, "cost": 2, "runs": 2}
    assert seen["states"] == ["done", "done"]
    assert not seen["severe"], f"console errors: {seen['severe']}"
    shot = Path(artifacts_dir) / "report.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


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
