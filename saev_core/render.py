"""Render an SAE's top images per latent as heatmap overlays and a static feature browser.

Run as `python -m saev_core.render --sae-fpath .../sae.pt --topk-fpath .../topk.npz
--shards-dpath results/shards/<HASH> --dataset-json '{...}' --out-dpath .../features
--grid-fpath .../grid.png --n-latents 24 --seed 0`.

Writes `latents/<latent>/<rank>.png` and `latents/<latent>/metadata.json` for each selected latent,
and `index.html`, a browser that works from the file system (its data is inlined).

Shape key: N = images, P = patches per image, D = d_vit, F = d_sae, K = top_k.
"""

import argparse
import json
import logging
import math
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from . import datasets, helpers, sae, shards, topk  # noqa: E402

logger = logging.getLogger("render")
THUMB_PX = 128
TEMPLATE_FPATH = pathlib.Path(__file__).with_name("browser.html")


def select_latents(result: topk.TopK, n_latents: int, seed: int) -> list[int]:
    """Up to `n_latents` latents that fired, drawn at random with `seed`, in index order."""
    fired = np.flatnonzero(result.freq > 0)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(fired, size=min(n_latents, len(fired)), replace=False)
    return sorted(int(i) for i in chosen)


@torch.no_grad()
def patch_heatmaps(
    model: sae.SparseAutoencoder, reader: shards.ShardReader, layer: int, img_indices: list[int]
) -> dict[int, np.ndarray]:
    """(P, F) latent activations on each image's patch tokens, recomputed from the shards."""
    layer_i = reader.metadata.layer_index(layer)
    patches = reader.token_slice("patches")
    device = model.b_dec.device
    maps = {}
    for i in img_indices:
        shard_i, row = reader.locate(i)
        x_PD = np.array(reader.shard(shard_i)[row, layer_i, patches])
        maps[i] = model.encode(torch.from_numpy(x_PD).to(device)).cpu().numpy()
    return maps


def square_crop(img: Image.Image, px: int) -> Image.Image:
    """Resize the shorter side to `px` and centre-crop, as the ViT transforms do."""
    scale = px / min(img.size)
    img = img.resize((max(px, round(img.width * scale)), max(px, round(img.height * scale))))
    left, top = (img.width - px) // 2, (img.height - px) // 2
    return img.crop((left, top, left + px, top + px))


def overlay(img: Image.Image, heat_P: np.ndarray, vmax: float) -> Image.Image:
    """The image with the patch heatmap (scaled to `vmax`) blended on top in a warm colour map."""
    grid = int(round(math.sqrt(len(heat_P))))
    heat = np.clip(heat_P.reshape(grid, grid) / max(vmax, 1e-12), 0, 1)
    heat_px = (
        np.asarray(
            Image.fromarray((heat * 255).astype(np.uint8)).resize(
                (THUMB_PX, THUMB_PX), Image.BILINEAR
            )
        )
        / 255.0
    )
    colour = plt.get_cmap("inferno")(heat_px)[..., :3] * 255
    alpha = (0.6 * heat_px)[..., None]
    # Dim what the latent ignores so the patches it fires on stand out.
    base = np.asarray(square_crop(img, THUMB_PX), dtype=np.float64) * (
        0.7 + 0.3 * heat_px[..., None]
    )
    return Image.fromarray((base * (1 - alpha) + colour * alpha).astype(np.uint8))


def render(
    model: sae.SparseAutoencoder,
    result: topk.TopK,
    reader: shards.ShardReader,
    dataset,
    layer: int,
    out_dpath: pathlib.Path,
    latents: list[int],
) -> list[dict]:
    """Write the per-latent folders; return one summary per latent for the browser."""
    out_dpath = pathlib.Path(out_dpath)
    needed = sorted({int(i) for latent in latents for i in result.top_imgs[latent] if i >= 0})
    maps = patch_heatmaps(model, reader, layer, needed)
    summaries = []
    for latent in latents:
        latent_dpath = out_dpath / "latents" / f"{latent:05d}"
        latent_dpath.mkdir(parents=True, exist_ok=True)
        img_indices = [int(i) for i in result.top_imgs[latent] if i >= 0]
        vmax = max(float(maps[i][:, latent].max()) for i in img_indices)
        images = []
        for rank, i in enumerate(img_indices):
            fname = f"{rank:03d}.png"
            overlay(dataset.image(i), maps[i][:, latent], vmax).save(latent_dpath / fname)
            images.append(
                {
                    "index": i,
                    "label": dataset.label(i),
                    "value": float(result.top_values[latent, rank]),
                    "src": f"latents/{latent:05d}/{fname}",
                }
            )
        summary = {
            "latent": latent,
            "log10_freq": float(np.log10(result.freq[latent])),
            "log10_value": float(np.log10(result.mean_value[latent])),
            "images": images,
        }
        (latent_dpath / "metadata.json").write_text(json.dumps(summary, indent=2) + "\n")
        summaries.append(summary)
    return summaries


def write_browser(out_dpath: pathlib.Path, summaries: list[dict], title: str, note: str):
    """A single self-contained `index.html`; its data is inlined so `file://` works."""
    data = {"title": title, "note": note, "latents": summaries}
    html = TEMPLATE_FPATH.read_text().replace(
        "/*DATA*/null", json.dumps(data).replace("</", "<\\/")
    )
    (pathlib.Path(out_dpath) / "index.html").write_text(html)


def write_grid(out_dpath: pathlib.Path, summaries: list[dict], grid_fpath: pathlib.Path):
    """A sample of latents, one row each, for the report."""
    rows = summaries[:6]
    n_cols = max(1, max((min(6, len(s["images"])) for s in rows), default=1))
    fig, axes = plt.subplots(
        max(1, len(rows)), n_cols, figsize=(1.6 * n_cols, 1.8 * max(1, len(rows))), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for r, summary in enumerate(rows):
        for c, image in enumerate(summary["images"][:n_cols]):
            axes[r, c].imshow(Image.open(pathlib.Path(out_dpath) / image["src"]))
            axes[r, c].set_title(f"{image['label']}\n{image['value']:.2f}", fontsize=7)
        axes[r, 0].text(
            -0.1,
            0.5,
            f"latent {summary['latent']}",
            transform=axes[r, 0].transAxes,
            rotation=90,
            va="center",
            ha="right",
            fontsize=8,
        )
    fig.tight_layout()
    fig.savefig(grid_fpath, dpi=72)
    plt.close(fig)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sae-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--topk-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--shards-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--dataset-json", required=True, help="dataset config (with root) as JSON")
    parser.add_argument("--out-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--grid-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--n-latents", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    model, train_cfg = sae.load_trained(args.sae_fpath, helpers.pick_device(args.device))
    result = topk.load(args.topk_fpath)
    reader = shards.ShardReader(args.shards_dpath)
    dataset = datasets.load(json.loads(args.dataset_json))
    latents = select_latents(result, args.n_latents, args.seed)
    logger.info("rendering %d latents: %s", len(latents), latents)
    summaries = render(model, result, reader, dataset, train_cfg["layer"], args.out_dpath, latents)
    md = reader.metadata
    title = f"SAE {args.sae_fpath.parent.name}: {md.vit_family} {md.vit_ckpt}, layer {train_cfg['layer']}"
    note = (
        "Activations come from a randomly initialised ViT: features reflect colours and "
        "textures, not learned semantics."
        if md.vit_family == "tiny"
        else ""
    )
    write_browser(args.out_dpath, summaries, title, note)
    write_grid(args.out_dpath, summaries, args.grid_fpath)


if __name__ == "__main__":
    main()
