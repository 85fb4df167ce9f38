"""Render an SAE's top images per latent as heatmap overlays and a static feature browser.

Run as `python -m saev_core.render --sae-fpath .../sae.pt --topk-fpath .../topk.npz
--shards-dpath results/shards/<HASH> --dataset-json '{...}' --render-json '{...}'
--out-dpath .../features --grid-fpath .../grid.png`, where the render JSON holds the sweep's
`render` settings (n_latents, seed, log10_freq_range, log10_value_range, include_latents).

Writes, for each selected latent, `latents/<latent>/<rank>.jpg` (JPEG keeps a report of many SAEs
small) and `latents/<latent>/metadata.json`; then `values.png` (value distributions) and
`index.html`, a browser that works from the file system (its data is inlined; images are relative
links into `latents/`).

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
JPEG_QUALITY = 90
TEMPLATE_FPATH = pathlib.Path(__file__).with_name("browser.html")


def log10_or_nan(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(values > 0, np.log10(values), np.nan)


def select_latents(
    result: topk.TopK,
    n_latents: int,
    seed: int,
    log10_freq_range: tuple[float, float] = (-np.inf, np.inf),
    log10_value_range: tuple[float, float] = (-np.inf, np.inf),
    include_latents: tuple[int, ...] = (),
) -> list[int]:
    """Up to `n_latents` latents drawn at random (with `seed`) from those that fired with log10
    frequency and log10 mean value in the ranges, plus the `include_latents` that fired; sorted."""
    d_sae = len(result.freq)
    if out_of_range := [i for i in include_latents if not 0 <= i < d_sae]:
        raise ValueError(f"render.include_latents: {out_of_range} not in 0..{d_sae - 1} (d_sae)")
    log_freq, log_value = log10_or_nan(result.freq), log10_or_nan(result.mean_value)
    with np.errstate(invalid="ignore"):
        in_ranges = (
            (log10_freq_range[0] <= log_freq)
            & (log_freq <= log10_freq_range[1])
            & (log10_value_range[0] <= log_value)
            & (log_value <= log10_value_range[1])
        )
    eligible = np.setdiff1d(np.flatnonzero(in_ranges), include_latents)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(eligible, size=min(n_latents, len(eligible)), replace=False)
    if never_fired := [i for i in include_latents if result.freq[i] == 0]:
        logger.warning("include_latents %s never fired: nothing to render", never_fired)
    included = [i for i in include_latents if result.freq[i] > 0]
    return sorted({int(i) for i in chosen} | set(included))


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
    out_dpath.mkdir(parents=True, exist_ok=True)
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
            fname = f"{rank:03d}.jpg"
            overlay(dataset.image(i), maps[i][:, latent], vmax).save(
                latent_dpath / fname, quality=JPEG_QUALITY
            )
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
            f"p{result.percentile_q:g}": float(result.percentile[latent]),
            "value_hist": value_hist(result, latent),
            "images": images,
        }
        (latent_dpath / "metadata.json").write_text(json.dumps(summary, indent=2) + "\n")
        summaries.append(summary)
    return summaries


def value_hist(result: topk.TopK, latent: int) -> dict:
    """The latent's histogram of log10 values, trimmed to its non-empty span."""
    counts = result.value_hist[latent]
    nonzero = np.flatnonzero(counts)
    lo, hi = (nonzero[0], nonzero[-1] + 1) if len(nonzero) else (0, 0)
    return {
        "log10_lo": float(topk.BIN_EDGES[lo]),
        "bin_width": float(topk.BIN_EDGES[1] - topk.BIN_EDGES[0]),
        "counts": counts[lo:hi].tolist(),
    }


def write_browser(
    out_dpath: pathlib.Path, result: topk.TopK, summaries: list[dict], title: str, note: str
):
    """A single `index.html` with its data inlined, so it works opened from the file system.

    Besides the rendered latents it carries (latent, log10 frequency, log10 mean value) of every
    latent that fired, for the histograms and the frequency/value scatter.
    """
    fired = np.flatnonzero(result.freq > 0)
    data = {
        "title": title,
        "note": note,
        "d_sae": len(result.freq),
        "percentile": f"p{result.percentile_q:g}",
        "all": {
            "latent": fired.tolist(),
            "log10_freq": np.round(np.log10(result.freq[fired]), 4).tolist(),
            "log10_value": np.round(np.log10(result.mean_value[fired]), 4).tolist(),
        },
        "latents": summaries,
    }
    html = TEMPLATE_FPATH.read_text().replace(
        "/*DATA*/null", json.dumps(data).replace("</", "<\\/")
    )
    shards.write_atomic(pathlib.Path(out_dpath) / "index.html", html.encode())


def plot_value_distributions(
    result: topk.TopK, latents: list[int], out_fpath: pathlib.Path, n_shown: int = 8
):
    """Value histograms (log10 bins) of up to `n_shown` of the rendered latents, one line each."""
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    centres = (topk.BIN_EDGES[:-1] + topk.BIN_EDGES[1:]) / 2
    for latent in latents[:: max(1, len(latents) // n_shown)][:n_shown]:
        ax.plot(centres, result.value_hist[latent], lw=1, label=f"latent {latent}")
    ax.set_yscale("log")
    ax.set_xlabel("log10 activation value (when firing)")
    ax.set_ylabel("tokens")
    ax.set_title("Value distributions of rendered latents")
    if latents:
        ax.legend(fontsize=7)
    fig.savefig(out_fpath, dpi=100, format="png")
    plt.close(fig)


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
    parser.add_argument("--render-json", required=True, help="the sweep's render settings as JSON")
    parser.add_argument("--out-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--grid-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    model, train_cfg = sae.load_trained(args.sae_fpath, helpers.pick_device(args.device))
    result = topk.load(args.topk_fpath)
    reader = shards.ShardReader(args.shards_dpath)
    dataset = datasets.load(json.loads(args.dataset_json))
    latents = select_latents(result, **json.loads(args.render_json))
    logger.info("rendering %d latents: %s", len(latents), latents)
    summaries = render(model, result, reader, dataset, train_cfg["layer"], args.out_dpath, latents)
    plot_value_distributions(result, latents, args.out_dpath / "values.png")
    md = reader.metadata
    title = f"SAE {args.sae_fpath.parent.name}: {md.vit_family} {md.vit_ckpt}, layer {train_cfg['layer']}"
    note = (
        "Activations come from a randomly initialised ViT: features reflect colours and "
        "textures, not learned semantics."
        if md.vit_family == "tiny"
        else ""
    )
    write_browser(args.out_dpath, result, summaries, title, note)
    write_grid(args.out_dpath, summaries, args.grid_fpath)


if __name__ == "__main__":
    main()
