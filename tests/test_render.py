"""Rendering writes one folder per selected latent, the grid, the value plot and a browser page."""

import json
import re

import numpy as np
import pytest

from saev_core import datasets, render, sae, shards, topk


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
    assert len(chosen) == 4 and chosen == sorted(chosen)
    assert outside in chosen and never not in chosen
    assert set(chosen) - {outside} <= set(in_ranges)
    assert chosen == render.select_latents(topk_result, 3, 0, include_latents=include, **kwargs)
    everything = render.select_latents(topk_result, 10**6, 0, **kwargs)
    assert everything == sorted(in_ranges)
    with pytest.raises(ValueError, match=r"render.include_latents: \[100000\]"):
        render.select_latents(topk_result, 3, 0, include_latents=[100000])


def test_render_writes_what_a_user_opens(
    shards_dpath, trained_dpath, dataset_cfg, tmp_path, topk_result
):
    model, _ = sae.load_trained(trained_dpath / "topk" / "sae.pt")
    reader = shards.ShardReader(shards_dpath)
    result = topk_result
    latents = render.select_latents(result, n_latents=5, seed=0)
    assert len(latents) == 5 and all(result.freq[i] > 0 for i in latents)

    out_dpath = tmp_path / "features"
    dataset = datasets.load(dataset_cfg)
    summaries = render.render(model, result, reader, dataset, -1, out_dpath, latents)
    render.write_browser(out_dpath, result, summaries, "title", "note")
    render.write_grid(out_dpath, summaries, tmp_path / "grid.png")
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
        assert meta["images"][0]["label"] == dataset.label(int(result.top_imgs[latent, 0]))
        assert meta["log10_freq"] == pytest.approx(np.log10(result.freq[latent]))
        assert sum(meta["value_hist"]["counts"]) == round(result.freq[latent] * reader.n_imgs * 64)
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert (out_dpath / "values.png").stat().st_size > 1000

    html = (out_dpath / "index.html").read_text()
    data = json.loads(re.search(r"const DATA = (.*);\n", html).group(1))
    assert [entry["latent"] for entry in data["latents"]] == latents
    assert data["all"]["latent"] == np.flatnonzero(result.freq > 0).tolist()
    for entry in data["latents"]:
        for image in entry["images"]:
            assert (out_dpath / image["src"]).exists()


def test_nothing_selected_still_gives_a_working_page(
    shards_dpath, trained_dpath, dataset_cfg, tmp_path, topk_result
):
    topk.save(tmp_path / "topk.npz", topk_result)
    out_dpath = tmp_path / "features"
    render_cfg = {"n_latents": 5, "seed": 0, "log10_freq_range": [-9, -8]}
    render.main(
        [
            *("--sae-fpath", str(trained_dpath / "topk" / "sae.pt")),
            *("--topk-fpath", str(tmp_path / "topk.npz")),
            *("--shards-dpath", str(shards_dpath)),
            *("--dataset-json", json.dumps(dataset_cfg)),
            *("--render-json", json.dumps(render_cfg)),
            *("--out-dpath", str(out_dpath)),
            *("--grid-fpath", str(tmp_path / "grid.png")),
            *("--device", "cpu"),
        ]
    )
    html = (out_dpath / "index.html").read_text()
    data = json.loads(re.search(r"const DATA = (.*);\n", html).group(1))
    assert data["latents"] == [] and len(data["all"]["latent"]) > 0
    assert not (out_dpath / "latents").exists()
    assert (tmp_path / "grid.png").exists() and (out_dpath / "values.png").exists()
