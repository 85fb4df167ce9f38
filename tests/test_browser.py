"""The feature browser works in a real headless Chromium, opened from the file system and, as the
report shows it, as a self-contained page inside an iframe of a `data:` URL.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Skipped when they are
missing unless SAEV_REQUIRE_BROWSER is set, which CI does, so there it fails instead.
"""

import base64
import csv
import os
import shutil

import numpy as np
import pytest
from conftest import render_spec_fpath

from saev_core import datasets, sae, shards, topk_results
from saev_core.steps import evaluate, render, topk

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("SAEV_REQUIRE_BROWSER"):
    pytest.skip("chromium and chromedriver are not installed", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

N_LATENTS = 8


@pytest.fixture(scope="module")
def rendered(shards_dpath, trained_dpath, dataset_cfg, tmp_path_factory):
    """What the workflow's evaluate, top-k and render steps leave for one SAE."""
    tmp_path = tmp_path_factory.mktemp("features")
    sae_fpath = trained_dpath / "topk" / "sae.pt"
    model, _ = sae.load_trained(sae_fpath)
    reader = shards.ShardReader(shards_dpath)
    class_names = datasets.load(dataset_cfg).classes
    evaluate.write(evaluate.evaluate(model, reader, -1, "patches", class_names), "t", tmp_path)
    topk_results.save(tmp_path / "topk.npz", topk.top_k(model, reader, -1, "patches", k=4))
    render_cfg = {"n_latents": N_LATENTS, "seed": 0, "log10_freq_range": [-6, 0]}
    spec_fpath = render_spec_fpath(
        tmp_path, sae_fpath, shards_dpath, dataset_cfg, render_cfg, label="L-1 topk k=8 x4"
    )
    render.main(
        [
            *("--spec-fpath", str(spec_fpath)),
            *("--out-dpath", str(tmp_path / "features")),
            *("--browser-fpath", str(tmp_path / "browser.html")),
            *("--grid-fpath", str(tmp_path / "grid.jpg")),
            *("--device", "cpu"),
        ]
    )
    return tmp_path


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


def text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


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


def open_page(driver, fpath, fragment: str = ""):
    driver.get(fpath.as_uri() + fragment)
    WebDriverWait(driver, 10).until(lambda d: heading(d) != "")


def test_browser_works_in_chromium(driver, rendered):
    open_page(driver, rendered / "features" / "index.html")
    assert console_errors(driver) == []
    latents = nav_latents(driver)
    assert len(latents) >= N_LATENTS and latents == sorted(latents)
    assert heading(driver) == f"Latent {latents[0]}"
    assert "L-1 topk k=8 x4" in text(driver, "title")
    WebDriverWait(driver, 10).until(images_loaded)
    for canvas_id in ("freq-hist", "value-hist", "latent-hist", "scatter", "colorbar"):
        assert canvas_is_drawn(driver, canvas_id), canvas_id
    n_overlays = len(driver.find_elements(By.CSS_SELECTOR, "#grid canvas.heat"))
    assert n_overlays == len(driver.find_elements(By.CSS_SELECTOR, "#grid img")) > 0

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
    # Offsets count from the centre of the element's visible part: show all of it first.
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", canvas)
    x, y = points[target]
    ActionChains(driver).move_to_element_with_offset(
        canvas, round(x - canvas.size["width"] / 2), round(y - canvas.size["height"] / 2)
    ).click().perform()
    assert heading(driver) == f"Latent {target}"
    WebDriverWait(driver, 10).until(images_loaded)
    assert console_errors(driver) == []


def test_deep_links_and_history(driver, rendered):
    page = rendered / "features" / "index.html"
    open_page(driver, page)
    latents = nav_latents(driver)
    open_page(driver, page, f"#latent={latents[2]}")
    assert heading(driver) == f"Latent {latents[2]}"
    driver.find_element(By.ID, "next").click()
    assert heading(driver) == f"Latent {latents[3]}"
    assert driver.execute_script("return location.hash") == f"#latent={latents[3]}"
    driver.back()
    WebDriverWait(driver, 5).until(lambda d: heading(d) == f"Latent {latents[2]}")
    driver.forward()
    WebDriverWait(driver, 5).until(lambda d: heading(d) == f"Latent {latents[3]}")
    assert console_errors(driver) == []


def test_captions_name_the_label_of_the_strongest_patch(
    driver, rendered, shards_dpath, dataset_cfg
):
    open_page(driver, rendered / "features" / "index.html")
    WebDriverWait(driver, 10).until(images_loaded)
    labels_NP = shards.ShardReader(shards_dpath).labels()
    class_names = datasets.load(dataset_cfg).classes
    entry = driver.execute_script("return DATA.latents.find((l) => l.latent === current);")
    captions = driver.find_elements(By.CSS_SELECTOR, "#grid figcaption .label")
    assert len(captions) == len(entry["images"])
    for caption, image in zip(captions, entry["images"], strict=True):
        heat_P = np.frombuffer(base64.b64decode(image["heat"]), dtype=np.uint8)
        assert image["top_patch"] == int(np.argmax(heat_P))
        assert caption.text == class_names[labels_NP[image["index"], image["top_patch"]]]


def concept_rows(rendered) -> list[dict]:
    with open(rendered / "concepts.csv", newline="") as fd:
        return list(csv.DictReader(fd))


def test_best_concept_line_matches_concepts_csv(driver, rendered):
    page = rendered / "features" / "index.html"
    rows = concept_rows(rendered)
    assert rows
    for row in rows:
        open_page(driver, page, f"#latent={row['latent']}")
        line = text(driver, "concept")
        expected = (
            f"{row['name']} — AP {float(row['average_precision']):.3f}, "
            f"F1 {float(row['best_f1']):.3f}, rank 1 of"
        )
        assert expected in line, line
    # Each class's best latent is rendered, whatever the random draw.
    open_page(driver, page)
    assert {int(row["latent"]) for row in rows} <= set(nav_latents(driver))


def test_unrendered_latent_shows_its_statistics(driver, rendered):
    page = rendered / "features" / "index.html"
    open_page(driver, page)
    shown = set(nav_latents(driver))
    result = topk_results.load(rendered / "topk.npz")
    latent = next(i for i in np.flatnonzero(result.freq > 0) if i not in shown)
    open_page(driver, page, f"#latent={latent}")
    assert heading(driver) == f"Latent {latent} (not rendered)"
    stats = text(driver, "stats")
    assert f"firing frequency {result.freq[latent]:.3g}" in stats
    assert f"p99 {result.percentile[latent]:.3g}" in stats
    assert canvas_is_drawn(driver, "latent-hist")
    assert driver.find_elements(By.CSS_SELECTOR, "#grid figure") == []
    assert console_errors(driver) == []


def test_single_file_browser_works_inside_a_data_url_iframe(driver, rendered, tmp_path):
    """As `snakemake --report` embeds it: no image files beside it, an opaque origin."""
    encoded = base64.b64encode((rendered / "browser.html").read_bytes()).decode()
    host = tmp_path / "host.html"
    host.write_text(
        f'<iframe id="f" width="1100" height="900" src="data:text/html;base64,{encoded}"></iframe>'
    )
    driver.get(host.as_uri())
    driver.switch_to.frame(driver.find_element(By.ID, "f"))
    try:
        WebDriverWait(driver, 10).until(images_loaded)
        first = heading(driver)
        driver.find_element(By.ID, "next").click()
        assert heading(driver) != first
        assert driver.execute_script("return location.hash").startswith("#latent=")
        assert console_errors(driver) == []
    finally:
        driver.switch_to.default_content()
