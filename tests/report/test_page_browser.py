"""The evaluation and prediction pages opened in a real browser (headless Chromium driven by
playwright): every row, image and link loads, and the first row is a misclassified image
when there is one.

Needs the ``playwright`` Python package (test extra) and a Chromium on the machine (Debian:
``apt-get install chromium``; playwright's own browser download is not used). Without a
browser the test is skipped with the reason, except under CI (``CI=true``), which installs
one (.ci/run): there a missing browser fails.
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
from cli_runs import ssm

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser_path() -> str | None:
    """SSM_CHROMIUM if set, else the first Chromium on PATH."""
    env = os.environ.get("SSM_CHROMIUM")
    if env:
        return env if os.path.isfile(env) else None
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def _need_browser() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[test]')"
    else:
        exe = browser_path()
        if exe:
            return exe
        reason = ("no Chromium found (apt-get install chromium, or set SSM_CHROMIUM to the "
                  "browser's path)")
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI installs a browser for this test, but: {reason}")
    pytest.skip(reason)


def _open(exe: str):
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    # --no-sandbox: CI and the development machines run as root, where Chromium's sandbox
    # refuses to start.
    browser = pw.chromium.launch(executable_path=exe, headless=True,
                                 args=["--no-sandbox", "--disable-gpu"])
    return pw, browser


_IMAGES_STATE = """() => Array.from(document.images).map(
    i => [i.getAttribute('src'), i.complete, i.naturalWidth])"""
_LINKS = """() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"""


def _check_page(browser, page_path, num_rows: int) -> dict:
    """Loads the page, scrolls every image into view (they load lazily), and checks that
    each image decoded and each link points to an existing file or an anchor on the page.
    Returns what the tests compare further."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"file://{page_path}")
    rows = page.locator("table.images tr[id^='img-']")
    assert rows.count() == num_rows
    for img in page.locator("img").all():
        img.scroll_into_view_if_needed()
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete)",
                           timeout=30_000)
    broken = [s for s, done, w in page.evaluate(_IMAGES_STATE) if not done or w == 0]
    assert not broken, f"broken images: {broken[:5]}"
    base = os.path.dirname(str(page_path))
    for href in page.evaluate(_LINKS):
        assert href.startswith("file://"), href
        target, _, anchor = href[len("file://"):].partition("#")
        if anchor:
            assert page.locator(f"[id='{anchor}']").count() == 1, href
        else:
            assert os.path.isfile(target) and target.startswith(base), href
    first = {"class": rows.first.get_attribute("class"),
             "classes": [r.get_attribute("class") for r in rows.all()]}
    # One click from the top: the summary's link lands on row 1, whose image link opens
    # the overlay, a decodable image.
    jump = page.locator("p.summary a[href^='#']").last
    target = jump.get_attribute("href")
    jump.click()
    assert page.url.endswith(target) and target in ("#img-1", "#per-image")
    box = page.locator(target).bounding_box()
    assert box is not None and -1 <= box["y"] < 900  # scrolled into view
    with page.expect_navigation():
        page.locator("#img-1 td a").first.click()
    assert page.url.endswith("_overlay.png")
    assert page.evaluate("() => document.images[0].naturalWidth") > 0
    assert not errors, errors
    page.close()
    return first


@pytest.mark.slow
def test_report_pages_in_chromium(tiny_run, tmp_path):
    exe = _need_browser()
    wd = tmp_path / "wd"
    shutil.copytree(tiny_run[0], wd)
    res = ssm("evaluate", "--workdir", wd)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((wd / "eval" / "metrics.json").read_text())
    with open(wd / "eval" / "per_image.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == metrics["num_images"]

    from ssm_jax.data.synthetic import write_synthetic_folder

    write_synthetic_folder(tmp_path / "imgs", image_size=32, grayscale=True, num_train=1,
                           num_test_good=3, num_test_anomalous=2, seed=5)
    out = tmp_path / "pred"
    res = ssm("predict", "--workdir", wd, "--input", tmp_path / "imgs" / "test", "--output", out)
    assert res.returncode == 0, res.stderr[-2000:]

    pw, browser = _open(exe)
    try:
        ev = _check_page(browser, wd / "eval" / "index.html", len(table))
        wrong = [r for r in table if r["correct"] == "no"]
        assert (ev["class"] == "wrong") == bool(wrong)
        # Misclassified rows all come before the others.
        n = len(wrong)
        assert ev["classes"][:n] == ["wrong"] * n and "wrong" not in ev["classes"][n:]
        pred = _check_page(browser, out / "index.html", 5)
        assert "wrong" not in pred["classes"]  # no ground truth there
    finally:
        browser.close()
        pw.stop()
