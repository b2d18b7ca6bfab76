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
    # browser: console messages; performance: the DevTools network events (every request the page makes)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    d.set_page_load_timeout(60)
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


def requests_made(browser) -> list[str]:
    """The URLs of every request since the last call (DevTools Network.requestWillBeSent)."""
    import json

    urls = []
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def assert_no_external_requests(browser, page: Path) -> None:
    """Only the page itself and data: URIs were requested: nothing over the network."""
    urls = requests_made(browser)
    assert page.resolve().as_uri() in urls, urls
    bad = [u for u in urls if not (u.startswith("data:") or u == page.resolve().as_uri())]
    assert bad == [], bad


def figure_is_drawn(browser, element) -> tuple[float, float]:
    """(fraction of non-white pixels, pixel standard deviation) of an element's screenshot."""
    import io

    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("L"), dtype=float)
    return float((img < 245).mean()), float(img.std())


def check_page(browser, html_path: Path, shot_name: str) -> dict:
    browser.get_log("performance")  # drop earlier pages' events
    browser.get(html_path.resolve().as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    logs = browser.get_log("browser")
    errors = [e for e in logs if e.get("level") in ("SEVERE", "WARNING")]
    assert errors == [], errors
    assert_no_external_requests(browser, html_path)
    imgs = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
    assert imgs, "the report has no images"
    for alt, complete, w, h in imgs:
        assert complete and w > 0 and h > 0, (alt, w, h)
    # every figure has something drawn on it (not a blank or single-colour image)
    for el in browser.find_elements("css selector", "img"):
        browser.execute_script("arguments[0].scrollIntoView()", el)
        ink, spread = figure_is_drawn(browser, el)
        assert ink > 0.01 and spread > 10, (el.get_attribute("alt"), ink, spread)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 40, 20000))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / shot_name
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    browser.set_window_size(1280, 1000)
    return {"images": len(imgs), "height": height, "screenshot": shot}


def _scores(run_dir: Path, n: int = 600) -> None:
    """mia_scores.npz as the mia evaluator writes it (members scored higher)."""
    import numpy as np

    rng = np.random.default_rng(0)
    member = rng.random(n) < 0.5
    score = rng.normal(size=n) + member
    np.savez(run_dir / "mia_scores.npz", member=member, pool_idx=rng.permutation(1000)[:n],
             label=rng.integers(0, 10, n), **{"score.lira_online": score})


def test_run_report_in_chromium(browser, tmp_path):
    from cfbench.present.report import run_report

    runs = tmp_path / "runs"
    me = write_record(runs, make_record(defense="pgd-at", family="adversarial", clean=0.95, robust=0.7,
                                        flags=["Square found adversarial points that APGD missed"],
                                        description="PGD adversarial training <script>alert(1)</script>"))
    write_examples(me, counterfactual=True)
    _scores(me)
    write_record(runs, make_record(defense="erm", clean=0.99, robust=0.02))
    write_record(runs, make_record(defense="dp-sgd", family="dp", clean=0.8, robust=0.05, epsilon=2.5))
    page = tmp_path / "run.html"
    page.write_text(run_report(me), encoding="utf-8")
    res = check_page(browser, page, "report-run.png")
    assert res["images"] == 10   # + the score histograms and the most vulnerable examples
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


def _rows(browser) -> list[list[str]]:
    return [[td.text for td in tr.find_elements("tag name", "td")]
            for tr in browser.find_elements("css selector", "#lb tbody tr") if tr.is_displayed()]


def test_leaderboard_table_sorts_filters_and_links_in_chromium(browser, tmp_path):
    """The HTML table: its script runs under the page's CSP (no console error), sorts by a
    clicked column (numbers as numbers, n/a last), filters by text and family, and every row
    links to its runs' reports, which open."""
    from cfbench.cli import main

    runs = tmp_path / "runs"
    spec = [("erm", "erm", 0.99, 0.02), ("pgd-at", "adversarial", 0.93, 0.71), ("trades", "adversarial", 0.91, 0.74),
            ("dp-sgd", "dp", 0.80, 0.05), ("cf-at", "adversarial", 0.956, None)]
    for d, fam, c, r in spec:
        write_record(runs, make_record(defense=d, family=fam, clean=c, robust=r, evaluators=("clean", "pgd", "autoattack", "mia")))
    out = tmp_path / "boards"
    assert main(["leaderboard", "--runs", str(runs), "--out", str(out), "--quiet"]) == 0
    [page] = list(out.glob("*.html"))
    browser.get_log("performance")
    browser.get(page.resolve().as_uri())
    logs = [e for e in browser.get_log("browser") if e.get("level") in ("SEVERE", "WARNING")]
    assert logs == [], logs   # a script the CSP refused would be a console error here
    assert_no_external_requests(browser, page)
    header = browser.find_elements("css selector", "#lb thead th")
    names = [h.text.replace("\u2195", "").strip() for h in header]
    col = next(i for i, n in enumerate(names) if n.startswith("clean acc."))
    rob = next(i for i, n in enumerate(names) if n.startswith("AutoAttack acc."))
    assert browser.find_element("id", "lb-count").text == "5 of 5 rows"   # the script ran

    def clean_values():
        return [float(r[col].split()[0]) for r in _rows(browser)]

    header[col].click()   # higher is better: the first click sorts descending
    assert clean_values() == sorted((100 * c for _, _, c, _ in spec), reverse=True)
    assert header[col].get_attribute("aria-sort") == "descending"
    header[col].click()
    assert clean_values() == sorted(100 * c for _, _, c, _ in spec)
    header[rob].click()   # n/a (cf-at has no robust accuracy) sorts last either way
    assert [r[1] for r in _rows(browser)][-1] == "cf-at"
    header[rob].click()
    assert [r[1] for r in _rows(browser)][-1] == "cf-at"
    label_col = 1
    header[label_col].click()
    assert [r[1] for r in _rows(browser)] == sorted(d for d, *_ in spec)

    box = browser.find_element("id", "lb-filter")
    box.send_keys("trades")
    assert [r[1] for r in _rows(browser)] == ["trades"]
    assert browser.find_element("id", "lb-count").text == "1 of 5 rows"
    box.clear()
    box.send_keys(" ")  # an input event after clear()
    box.clear()
    browser.execute_script("arguments[0].dispatchEvent(new Event('input'))", box)
    assert len(_rows(browser)) == 5
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "lb-family")).select_by_value("adversarial")
    assert sorted(r[1] for r in _rows(browser)) == ["cf-at", "pgd-at", "trades"]
    Select(browser.find_element("id", "lb-family")).select_by_value("")
    assert len(_rows(browser)) == 5

    links = browser.find_elements("css selector", "#lb tbody a.run")
    assert len(links) == 5
    hrefs = [a.get_attribute("href") for a in links]
    assert all(h.startswith("file://") and h.endswith("/report.html") for h in hrefs)
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "leaderboard-table.png"))
    target = next(a for a in links if "pgd-at" in a.get_attribute("href"))
    target.click()
    assert browser.current_url.endswith("/report.html") and "pgd-at" in browser.current_url
    assert browser.execute_script("return document.readyState") == "complete"
    assert "pgd-at" in browser.find_element("tag name", "h1").text
    assert [e for e in browser.get_log("browser") if e.get("level") in ("SEVERE", "WARNING")] == []
