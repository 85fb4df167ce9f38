"""The feature browser works in a real headless Chromium, opened from the file system.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Skipped when they are
missing unless SAEV_REQUIRE_BROWSER is set, which CI does, so there it fails instead.
"""

import os
import shutil

import pytest

from saev_core import datasets, render, sae, shards, topk

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("SAEV_REQUIRE_BROWSER"):
    pytest.skip("chromium and chromedriver are not installed", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser_fpath(shards_dpath, trained_dpath, dataset_cfg, tmp_path_factory):
    model, _ = sae.load_trained(trained_dpath / "topk" / "sae.pt")
    reader = shards.ShardReader(shards_dpath)
    result = topk.top_k(model, reader, -1, "patches", k=4)
    latents = render.select_latents(result, n_latents=8, seed=0)
    out_dpath = tmp_path_factory.mktemp("features")
    dataset = datasets.load(dataset_cfg)
    summaries = render.render(model, result, reader, dataset, -1, out_dpath, latents)
    render.write_browser(out_dpath, result, summaries, "test SAE", "")
    return out_dpath / "index.html"


@pytest.fixture(scope="module")
def driver():
    assert CHROMIUM and CHROMEDRIVER, "SAEV_REQUIRE_BROWSER is set: install chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield chrome
    chrome.quit()


def heading(driver) -> str:
    return driver.find_element(By.ID, "heading").text


def nav_latents(driver) -> list[int]:
    return [int(b.text.split()[1]) for b in driver.find_elements(By.CSS_SELECTOR, "nav button")]


def images_loaded(driver) -> bool:
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll('#grid img')];"
        "return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);"
    )


def canvas_is_drawn(driver, canvas_id: str) -> bool:
    return driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "for (let i = 3; i < px.length; i += 4) if (px[i] > 0) return true;"
        "return false;",
        canvas_id,
    )


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_browser_works_in_chromium(driver, browser_fpath):
    driver.get(browser_fpath.as_uri())
    assert console_errors(driver) == []
    latents = nav_latents(driver)
    assert len(latents) == 8 and latents == sorted(latents)
    assert heading(driver) == f"Latent {latents[0]}"
    WebDriverWait(driver, 10).until(images_loaded)
    for canvas_id in ("freq-hist", "value-hist", "latent-hist", "scatter"):
        assert canvas_is_drawn(driver, canvas_id), canvas_id

    driver.find_element(By.ID, "next").click()
    assert heading(driver) == f"Latent {latents[1]}"
    WebDriverWait(driver, 10).until(images_loaded)
    driver.find_element(By.ID, "prev").click()
    driver.find_element(By.ID, "prev").click()
    assert heading(driver) == f"Latent {latents[-1]}"  # wraps around

    data = driver.execute_script("return DATA.latents;")
    freq = {entry["latent"]: entry["log10_freq"] for entry in data}
    Select(driver.find_element(By.ID, "sort")).select_by_value("log10_freq")
    by_freq = nav_latents(driver)
    assert sorted(by_freq) == latents and by_freq != latents
    assert [freq[i] for i in by_freq] == sorted(freq.values(), reverse=True)
    assert heading(driver) == f"Latent {latents[-1]}"  # sorting keeps the latent shown

    driver.find_element(By.ID, "jump").send_keys(str(latents[3]))
    driver.find_element(By.ID, "go").click()
    assert heading(driver) == f"Latent {latents[3]}"

    # Click the scatter point that lies farthest from the others: it opens that latent.
    points = {i: driver.execute_script("return scatterPoint(arguments[0]);", i) for i in latents}

    def isolation(i):
        others = [p for j, p in points.items() if j != i]
        return min((points[i][0] - x) ** 2 + (points[i][1] - y) ** 2 for x, y in others)

    target = max((i for i in latents if i != latents[3]), key=isolation)
    canvas = driver.find_element(By.ID, "scatter")
    x, y = points[target]
    ActionChains(driver).move_to_element_with_offset(
        canvas, round(x - canvas.size["width"] / 2), round(y - canvas.size["height"] / 2)
    ).click().perform()
    assert heading(driver) == f"Latent {target}"
    WebDriverWait(driver, 10).until(images_loaded)
    assert console_errors(driver) == []
