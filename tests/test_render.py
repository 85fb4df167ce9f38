"""Rendering writes one folder per selected latent, the grid and a browser page."""

import json
import re

from saev_core import datasets, render, sae, shards, topk


def test_render_writes_what_a_user_opens(shards_dpath, trained_dpath, dataset_cfg, tmp_path):
    model, train_cfg = sae.load_trained(trained_dpath / "topk" / "sae.pt")
    reader = shards.ShardReader(shards_dpath)
    result = topk.top_k(model, reader, -1, "patches", k=4)
    latents = render.select_latents(result, n_latents=5, seed=0)
    assert len(latents) == 5 and all(result.freq[i] > 0 for i in latents)
    assert latents == render.select_latents(result, n_latents=5, seed=0)

    out_dpath = tmp_path / "features"
    dataset = datasets.load(dataset_cfg)
    summaries = render.render(model, result, reader, dataset, -1, out_dpath, latents)
    render.write_browser(out_dpath, summaries, "title", "note")
    render.write_grid(out_dpath, summaries, tmp_path / "grid.png")

    assert sorted(p.name for p in (out_dpath / "latents").iterdir()) == [
        f"{i:05d}" for i in latents
    ]
    for latent in latents:
        latent_dpath = out_dpath / "latents" / f"{latent:05d}"
        meta = json.loads((latent_dpath / "metadata.json").read_text())
        n_imgs = int((result.top_imgs[latent] >= 0).sum())
        assert len(meta["images"]) == n_imgs
        assert len(list(latent_dpath.glob("*.png"))) == n_imgs
        assert meta["images"][0]["label"] == dataset.label(int(result.top_imgs[latent, 0]))
    assert (tmp_path / "grid.png").stat().st_size > 1000

    html = (out_dpath / "index.html").read_text()
    data = json.loads(re.search(r"const DATA = (.*);\n", html).group(1))
    assert [entry["latent"] for entry in data["latents"]] == latents
    for entry in data["latents"]:
        for image in entry["images"]:
            assert (out_dpath / image["src"]).exists()
