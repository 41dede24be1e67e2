"""The `cxrgen preview` gallery in a real headless browser: Debian's chromium driven through chromedriver.

Skipped, with the reason, only where chromium or chromedriver is not installed (`.ci/run` installs both).
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import PROMPTS, QUOTES_PROMPT, make_verified_folder, preview
from PIL import Image

from cxrgen.publish.preview import build_preview
from cxrgen.runs.journal import EVAL_DIR

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra: pip install -e .[test]")
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); install them with "
                "`apt-get install chromium chromium-driver` (.ci/run does)", allow_module_level=True)

from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# Without the background-networking flags chromium keeps trying to reach Google's services.
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,900"]
VISIBLE_TILES = "return Array.from(document.querySelectorAll('figure.tile')).filter(f => f.offsetParent !== null)" \
                ".map(f => Number(f.dataset.i))"
LOADED = "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length"


@pytest.fixture
def browser(tmp_path):
    """A fresh headless chromium with its own profile; console messages are kept for the checks."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The explicit driver path keeps selenium-manager from looking for one online.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


# Waits, not speed checks: generous enough for a machine busy with other work (benchmarks measure speed).
WAIT_S = 300


def open_gallery(driver, index: Path) -> None:
    """Load the page from the file system and wait until its script has built every tile."""
    driver.get(index.resolve().as_uri())
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")


def filter_to(driver, text: str) -> list[int]:
    """Type into the filter box; the image positions still shown once the debounced filter has run."""
    box = driver.find_element(By.ID, "filter")
    box.clear()
    if text:
        box.send_keys(text)
    else:  # clear() fires no input event
        driver.execute_script("arguments[0].dispatchEvent(new Event('input'))", box)
    expected = "of" if text else ""
    # the page marks which filter text it has applied (after its 120 ms debounce), so no fixed sleep
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script("return document.body.dataset.filtered") == text)
    assert expected in driver.find_element(By.ID, "count").text
    return driver.execute_script(VISIBLE_TILES)


def errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_gallery_shows_filters_and_details_the_run(evaluated_run, tmp_path, browser):  # noqa: F811
    out = Path(shutil.copytree(evaluated_run, tmp_path / "out"))
    assert preview(out).exit_code == 0
    meta = pq.read_table(out / "metadata.parquet").to_pylist()
    scores = pq.read_table(out / EVAL_DIR / "scores.parquet").to_pylist()
    open_gallery(browser, out / "preview" / "index.html")

    # 1. every image has a tile, grouped by prompt, the hostile prompt shown as literal text and never run
    assert len(browser.find_elements(By.CSS_SELECTOR, "figure.tile")) == len(meta) == 7
    titles = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "section h2")]
    assert [title.startswith(prompt) for title, prompt in zip(titles, PROMPTS)] == [True, True, True]
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    assert browser.execute_script("return window.pwned === undefined")
    assert browser.execute_script("return document.querySelectorAll('section script, section img[src=x]').length") == 0
    assert browser.execute_script(LOADED) == 7  # every thumbnail is a real, decodable file
    assert errors(browser) == []

    # 2. the filter, by prompt text and by a label value, then cleared
    assert filter_to(browser, "QUOTES & amp") == [2, 3]
    assert filter_to(browser, "effusion=1") == [i for i, r in enumerate(meta) if r["Pleural Effusion"] == 1]
    assert filter_to(browser, "normal effusion=1") == [6]  # terms combine: prompt words and a label
    assert filter_to(browser, "no such words") == []
    assert browser.execute_script("return document.querySelectorAll('section:not([hidden])').length") == 0
    assert filter_to(browser, "") == list(range(7))

    # 3. a click shows the image's parameters, labels, evaluation and a link to the full-size file
    browser.find_elements(By.CSS_SELECTOR, "figure.tile")[3].click()
    detail = browser.find_element(By.ID, "detail")
    assert detail.is_displayed()
    text = detail.text
    assert meta[3]["image_id"] in text and str(meta[3]["seed"]) in text and QUOTES_PROMPT in text
    assert f"accepted {'yes' if scores[3]['accepted'] else 'no'}" in text
    assert f"xrv_Effusion {scores[3]['xrv_Effusion']:.3f}" in text
    link = Path(unquote(urlparse(browser.find_element(By.ID, "full-link").get_attribute("href")).path))
    assert link.resolve() == (out / meta[3]["file_name"]).resolve() and link.is_file()

    # 4. a screenshot that shows something: many gray levels, not one flat colour
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    pixels = np.asarray(shot)
    assert shot.size[0] >= 1000 and pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200
    assert errors(browser) == []


def ten_thousand(out: Path) -> Path:
    """A finished-run folder of 10,000 tiny JPEGs in 100 prompts of 100 images (made directly, in seconds)."""
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(16):  # 16 distinct images: the files are still 10,000 real ones
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(buffer, format="JPEG")
        encoded.append(buffer.getvalue())
    ids = [f"r{i // 100:03d}_{i % 100:04d}" for i in range(10_000)]
    names = [f"images/{i // 1000:05d}/{image_id}.jpg" for i, image_id in enumerate(ids)]
    for i, name in enumerate(names):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(encoded[i % 16])
    prompts = [f"opacity case q{i // 100:03d}" for i in range(10_000)]
    pq.write_table(pa.table({"image_id": ids, "file_name": names, "prompt": prompts, "seed": list(range(10_000)),
                             "effusion": [i % 4 == 0 for i in range(10_000)]}), out / "metadata.parquet")
    (out / "run.json").write_text("{}")
    return out


def test_ten_thousand_images_load_lazily_and_filter(tmp_path, browser):
    out = ten_thousand(tmp_path / "big")
    result = build_preview(out, thumb_size=64)
    assert (result.images, result.prompts, len(result.sheets), result.thumbs_made) == (10_000, 100, 100, 10_000)
    open_gallery(browser, result.index)
    assert len(browser.find_elements(By.CSS_SELECTOR, "figure.tile")) == 10_000
    WebDriverWait(browser, WAIT_S).until(lambda d: d.execute_script(LOADED) > 0)  # the first screenful arrives
    loaded = browser.execute_script(LOADED)
    assert 0 < loaded < 1_000  # lazy: only the thumbnails near the viewport were read
    assert filter_to(browser, "q042") == list(range(4200, 4300))
    assert len(filter_to(browser, "effusion=true")) == 2_500
    assert filter_to(browser, "case q042 effusion=true") == list(range(4200, 4300, 4))
    assert len(filter_to(browser, "")) == 10_000
    assert errors(browser) == []


def test_the_verify_panel_and_filter(tmp_path, browser):
    out = make_verified_folder(tmp_path / "out")
    open_gallery(browser, build_preview(out).index)
    panel = browser.find_element(By.ID, "verification")
    assert panel.is_displayed()
    rows = browser.execute_script("return Array.from(document.querySelectorAll('#verification tr'))"
                                  ".map(r => Array.from(r.cells).map(c => c.textContent))")
    assert rows[1] == ["Pneumothorax", "2", "1", "0%", "25%", "4"]
    assert "1 verified by --verify" in browser.find_element(By.ID, "stats").text
    # the filter words: verified (true), every attempt rejected (false), not verified (null)
    assert filter_to(browser, "verified:yes") == [0]
    assert filter_to(browser, "verified:no") == [1]
    assert filter_to(browser, "verified:skip") == [2]
    assert filter_to(browser, "") == [0, 1, 2]
    flags = browser.execute_script("return Array.from(document.querySelectorAll('figure.tile'))"
                                   ".map(f => f.classList.contains('flagged'))")
    assert flags == [False, True, False]
    assert errors(browser) == []


def regroup(driver, value: str) -> list[tuple[str, list[int]]]:
    """Choose a grouping; (section title, image positions) of every visible section once the page has regrouped."""
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "group-by")).select_by_value(value)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script("return document.body.dataset.grouping") == value)
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('section:not([hidden])')).map(s => ["
        "s.querySelector('h2').firstChild.textContent, Array.from(s.querySelectorAll('figure.tile'))"
        ".filter(f => !f.hidden).map(f => Number(f.dataset.i))])")


def test_gallery_groups_by_label_or_shows_one_compact_grid(evaluated_run, tmp_path, browser):  # noqa: F811
    out = Path(shutil.copytree(evaluated_run, tmp_path / "out"))
    assert preview(out).exit_code == 0
    meta = pq.read_table(out / "metadata.parquet").to_pylist()
    open_gallery(browser, out / "preview" / "index.html")
    choices = browser.execute_script("return Array.from(document.getElementById('group-by').options)"
                                     ".map(o => o.value)")
    assert choices == ["prompt", "none", "label:0"]
    positives = [i for i, r in enumerate(meta) if r["Pleural Effusion"] == 1]
    negatives = [i for i, r in enumerate(meta) if r["Pleural Effusion"] == 0]
    # by label: one section per value, in value order, holding exactly those images
    assert regroup(browser, "label:0") == [["Pleural Effusion = 0", negatives], ["Pleural Effusion = 1", positives]]
    assert browser.find_elements(By.CSS_SELECTOR, "section h2 a") == []  # contact sheets belong to prompts
    assert filter_to(browser, "effusion=1") == positives
    assert [title for title, _ in regroup(browser, "label:0")] == ["Pleural Effusion = 1"]  # the filter still holds
    assert sorted(filter_to(browser, "")) == list(range(7))  # in section order: negatives first
    # no grouping: every image in one grid, on one row at this width (not one prompt a row)
    assert regroup(browser, "none") == [["all images", list(range(7))]]
    tops = browser.execute_script("return Array.from(document.querySelectorAll('figure.tile')).map(f => f.offsetTop)")
    assert len(set(tops)) == 1
    # and back: one section per prompt with its contact sheet
    assert [title for title, _ in regroup(browser, "prompt")] == PROMPTS
    assert len(browser.find_elements(By.CSS_SELECTOR, "section h2 a")) == 3
    assert errors(browser) == []


def test_a_demo_runs_gallery_says_its_images_are_noise(evaluated_run, tmp_path, browser):  # noqa: F811
    import json

    out = Path(shutil.copytree(evaluated_run, tmp_path / "out"))
    assert preview(out).exit_code == 0
    open_gallery(browser, out / "preview" / "index.html")
    assert not browser.find_element(By.ID, "demo").is_displayed()  # a real run: no banner
    run = json.loads((out / "run.json").read_text())
    run["resolved"]["demo"] = True  # what a run of `cxrgen download --demo`'s bundle records
    (out / "run.json").write_text(json.dumps(run))
    assert preview(out).exit_code == 0
    open_gallery(browser, out / "preview" / "index.html")
    banner = browser.find_element(By.ID, "demo")
    assert banner.is_displayed() and "noise" in banner.text
    assert errors(browser) == []
