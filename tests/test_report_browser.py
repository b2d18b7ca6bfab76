"""Reports in a real browser: Debian's headless Chromium driven by Selenium through Debian's
chromedriver (``Service(executable_path)``: Selenium never downloads a driver or a browser).

Each report (a run's, with every section and example images, and a leaderboard's) must open
with no console errors, every image must have a non-zero natural size, and a full-page
screenshot is saved to ``test-artifacts/`` at the repository root.

Skips with the reason when the browser, the driver or the ``selenium`` package is missing
(install: ``apt-get install -y chromium chromium-driver`` and ``pip install -e .[test]``).
Paths can be overridden with ``CFBENCH_CHROMIUM`` and ``CFBENCH_CHROMEDRIVER``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from record_factory import make_record, write_examples, write_record

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
#: flags without which Chromium hangs on a machine with no network (background services)
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--disable-extensions", "--hide-scrollbars",
                  "--window-size=1280,1000"]


def _find(env: str, default: str, name: str) -> str | None:
    for cand in (os.environ.get(env), default, shutil.which(name)):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="the selenium package is not installed (pip install -e .[test])")
    from selenium.webdriver.chrome.service import Service

    chromium = _find("CFBENCH_CHROMIUM", "/usr/bin/chromium", "chromium")
    driver = _find("CFBENCH_CHROMEDRIVER", "/usr/bin/chromedriver", "chromedriver")
    if chromium is None or driver is None:
        pytest.skip("headless Chromium is not available: "
                    + ("no chromium binary" if chromium is None else "no chromedriver binary")
                    + " (Debian: apt-get install -y chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="cfbench-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    d.set_page_load_timeout(60)
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


def check_page(browser, html_path: Path, shot_name: str) -> dict:
    browser.get(html_path.resolve().as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    logs = browser.get_log("browser")
    errors = [e for e in logs if e.get("level") in ("SEVERE", "WARNING")]
    assert errors == [], errors
    imgs = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
    assert imgs, "the report has no images"
    for alt, complete, w, h in imgs:
        assert complete and w > 0 and h > 0, (alt, w, h)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 40, 20000))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / shot_name
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    browser.set_window_size(1280, 1000)
    return {"images": len(imgs), "height": height, "screenshot": shot}


def test_run_report_in_chromium(browser, tmp_path):
    from cfbench.present.report import run_report

    runs = tmp_path / "runs"
    me = write_record(runs, make_record(defense="pgd-at", family="adversarial", clean=0.95, robust=0.7,
                                        flags=["Square found adversarial points that APGD missed"],
                                        description="PGD adversarial training <script>alert(1)</script>"))
    write_examples(me, counterfactual=True)
    write_record(runs, make_record(defense="erm", clean=0.99, robust=0.02))
    write_record(runs, make_record(defense="dp-sgd", family="dp", clean=0.8, robust=0.05, epsilon=2.5))
    page = tmp_path / "run.html"
    page.write_text(run_report(me), encoding="utf-8")
    res = check_page(browser, page, "report-run.png")
    assert res["images"] == 8
    # the description is shown as text, not run as a script
    body = browser.find_element("tag name", "body").text
    assert "<script>alert(1)</script>" in body


def test_leaderboard_report_in_chromium(browser, tmp_path):
    from cfbench.present.leaderboard import build
    from cfbench.present.report import leaderboard_report
    from cfbench.present.writers import write

    runs = tmp_path / "runs"
    for s in (0, 1):
        write_record(runs, make_record(defense="erm", seed=s, clean=0.99 - s / 100, robust=0.02))
        write_record(runs, make_record(defense="pgd-at", family="adversarial", seed=s, clean=0.93, robust=0.7 + s / 50))
    write_record(runs, make_record(defense="dp-sgd", family="dp", clean=0.8, robust=0.05, epsilon=2.5))
    [lb] = build(runs)
    paths = write(lb, tmp_path / "lb")
    page = tmp_path / "lb.html"
    page.write_text(leaderboard_report(lb.name, leaderboards=tmp_path / "lb"), encoding="utf-8")
    res = check_page(browser, page, "report-leaderboard.png")
    assert res["images"] == 3
    # the plain leaderboard table page has no images; it must still load cleanly
    browser.get(paths["html"].resolve().as_uri())
    assert [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"] == []
    assert "pgd-at" in browser.find_element("tag name", "table").text or "pgd-at" in browser.page_source
