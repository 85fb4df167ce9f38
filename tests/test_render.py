"""Rendering writes one folder per selected latent, the grid, the value plot and a browser page."""

import base64
import json
import re

import numpy as np
import pytest
from conftest import render_spec_fpath

from saev_core import browser, datasets, sae, shards, topk_results
from saev_core.steps import render, topk


def page_data(html_fpath) -> dict:
    return json.loads(re.search(r"const DATA = (.*);\n", html_fpath.read_text()).group(1))


@pytest.fixture(scope="module")
def topk_result(shards_dpath, trained_dpath):
    model, _ = sae.load_trained(trained_dpath / "topk" / "sae.pt")
    return topk.top_k(model, shards.ShardReader(shards_dpath), -1, "patches", k=4)


def test_selection_obeys_ranges_includes_and_seed(topk_result):
    log_freq = np.log10(np.maximum(topk_result.freq, 1e-30))
    log_value = np.log10(np.maximum(topk_result.mean_value, 1e-30))
    fired = np.flatnonzero(topk_result.freq > 0)
    freq_range = (float(np.median(log_freq[fired])), 0.0)
    value_range = (-10.0, float(np.median(log_value[fired])))
    in_ranges = [
        i
        for i in fired
        if freq_range[0] <= log_freq[i] <= freq_range[1]
        and value_range[0] <= log_value[i] <= value_range[1]
    ]
    outside = next(i for i in fired if i not in in_ranges)
    never = int(np.flatnonzero(topk_result.freq == 0)[0]) if (topk_result.freq == 0).any() else None
    include = [outside] + ([never] if never is not None else [])
    kwargs = dict(log10_freq_range=freq_range, log10_value_range=value_range)
    chosen = render.select_latents(topk_result, 3, 0, include_latents=include, **kwargs)
    assert len(chosen.latents) == 4 and chosen.latents == sorted(chosen.latents)
    assert outside in chosen.latents and never not in chosen.latents and chosen.filled == []
    assert set(chosen.latents) - {outside} <= set(in_ranges)
    assert chosen == render.select_latents(topk_result, 3, 0, include_latents=include, **kwargs)
    # Asking for more than pass the filters: every fired latent, the rest nearest first.
    everything = render.select_latents(topk_result, 10**6, 0, **kwargs)
    assert everything.latents == fired.tolist()
    assert sorted(everything.filled) == sorted(set(fired) - set(in_ranges))
    distance = [
        np.hypot(
            render.distance_outside(log_freq[i], *freq_range),
            render.distance_outside(log_value[i], *value_range),
        )
        for i in everything.filled
    ]
    assert distance == sorted(distance) and distance[0] > 0
    n_dead = int((topk_result.freq == 0).sum())
    assert everything.removed["never fired"] == n_dead
    assert sum(everything.removed.values()) == len(topk_result.freq) - len(in_ranges)
    with pytest.raises(ValueError, match=r"render.include_latents: \[100000\]"):
        render.select_latents(topk_result, 3, 0, include_latents=[100000])


def test_render_writes_what_a_user_opens(
    shards_dpath, trained_dpath, dataset_cfg, tmp_path, topk_result
):
    model, _ = sae.load_trained(trained_dpath / "topk" / "sae.pt")
    reader = shards.ShardReader(shards_dpath)
    result = topk_result
    selection = render.select_latents(result, n_latents=5, seed=0)
    latents = selection.latents
    assert len(latents) == 5 and all(result.freq[i] > 0 for i in latents)

    out_dpath = tmp_path / "features"
    dataset = datasets.load(dataset_cfg)
    summaries = render.render(model, result, reader, dataset, -1, out_dpath, latents)
    data = browser.page_data(
        result, summaries, selection, title="t", note="", patches_per_side=8, concepts={}
    )
    browser.write(out_dpath / "index.html", data, images_dpath=None)
    browser.write(tmp_path / "browser.html", data, images_dpath=out_dpath)
    render.write_grid(out_dpath, summaries, tmp_path / "grid.jpg")
    render.plot_value_distributions(result, latents, out_dpath / "values.png")

    assert sorted(p.name for p in (out_dpath / "latents").iterdir()) == [
        f"{i:05d}" for i in latents
    ]
    for latent in latents:
        latent_dpath = out_dpath / "latents" / f"{latent:05d}"
        meta = json.loads((latent_dpath / "metadata.json").read_text())
        n_imgs = int((result.top_imgs[latent] >= 0).sum())
        assert len(meta["images"]) == n_imgs
        assert len(list(latent_dpath.glob("*.jpg"))) == n_imgs
        top_img = int(result.top_imgs[latent, 0])
        first = meta["images"][0]
        assert first["image_label"] == dataset.label(top_img)
        # The caption names the class under the image's strongest patch (labels.bin).
        heat_P = np.array(first["heat"])
        assert first["top_patch"] == int(np.argmax(heat_P)) and heat_P.max() == 255
        assert first["label"] == dataset.classes[reader.labels()[top_img, first["top_patch"]]]
        assert meta["log10_freq"] == pytest.approx(np.log10(result.freq[latent]))
        assert sum(meta["value_hist"]["counts"]) == round(result.freq[latent] * reader.n_imgs * 64)
    assert (tmp_path / "grid.jpg").stat().st_size > 1000
    assert (out_dpath / "values.png").stat().st_size > 1000

    data = page_data(out_dpath / "index.html")
    assert [entry["latent"] for entry in data["latents"]] == latents
    assert data["all"]["latent"] == np.flatnonzero(result.freq > 0).tolist()
    shown = {image["index"] for entry in data["latents"] for image in entry["images"]}
    assert sorted(int(i) for i in data["images"]) == sorted(shown)  # each image stored once
    assert sorted(p.name for p in (out_dpath / "images").iterdir()) == [
        f"{i:06d}.jpg" for i in sorted(shown)
    ]
    for src in data["images"].values():
        assert (out_dpath / src).exists()
    # The single-file browser carries the same page with every image inlined.
    inlined = page_data(tmp_path / "browser.html")
    assert inlined["latents"] == data["latents"]
    for index, uri in inlined["images"].items():
        raw = base64.b64decode(uri.removeprefix("data:image/jpeg;base64,"))
        assert raw == (out_dpath / data["images"][index]).read_bytes()


def run_render(tmp_path, trained_dpath, shards_dpath, dataset_cfg, result, render_cfg) -> dict:
    """`python -m saev_core.steps.render` on a saved top-k result; returns the page's data."""
    topk_results.save(tmp_path / "topk.npz", result)
    (tmp_path / "concept_candidates.csv").write_text("")  # no class scored
    out_dpath = tmp_path / "features"
    spec_fpath = render_spec_fpath(
        tmp_path,
        trained_dpath / "topk" / "sae.pt",
        shards_dpath,
        dataset_cfg,
        render_cfg,
        label="test SAE",
    )
    render.main(
        [
            *("--spec-fpath", str(spec_fpath)),
            *("--out-dpath", str(out_dpath)),
            *("--browser-fpath", str(tmp_path / "browser.html")),
            *("--grid-fpath", str(tmp_path / "grid.jpg")),
            *("--device", "cpu"),
        ]
    )
    assert (tmp_path / "grid.jpg").exists() and (out_dpath / "values.png").exists()
    return page_data(out_dpath / "index.html")


def test_filters_that_pass_nothing_still_fill_the_page(
    shards_dpath, trained_dpath, dataset_cfg, tmp_path, topk_result, capfd
):
    render_cfg = {"n_latents": 5, "seed": 0, "log10_freq_range": [-9, -8]}
    data = run_render(tmp_path, trained_dpath, shards_dpath, dataset_cfg, topk_result, render_cfg)
    assert len(data["latents"]) == 5
    assert sorted(data["filled"]) == [entry["latent"] for entry in data["latents"]]
    n_fired = int((topk_result.freq > 0).sum())
    assert data["removed"]["render.log10_freq_range"] == n_fired
    assert "5 outside the filters fill up n_latents=5" in capfd.readouterr().err


def test_nothing_fired_gives_a_page_that_says_so(
    shards_dpath, trained_dpath, dataset_cfg, tmp_path, topk_result
):
    dead = topk_result._replace(freq=np.zeros_like(topk_result.freq))
    render_cfg = {"n_latents": 5, "seed": 0}
    data = run_render(tmp_path, trained_dpath, shards_dpath, dataset_cfg, dead, render_cfg)
    assert data["latents"] == [] and data["all"]["latent"] == []
    assert data["removed"]["never fired"] == len(dead.freq)
    assert not (tmp_path / "features" / "latents").exists()
