"""Render an SAE's top images per latent as heatmap overlays and a static feature browser.

Run as `python -m saev_core.steps.render --spec-fpath SPEC --out-dpath .../features --browser-fpath
.../browser.html --grid-fpath .../grid.jpg --device auto`, the spec a `jobs.RenderJob`: the SAE,
its label, its `topk.npz` and the evaluation's `concept_candidates.csv`, the training shard
directory and dataset, the layer, and the sweep's `render` settings (`config.RenderConfig`).

Writes `images/<index>.jpg` (each top image once, cropped as the model saw it), for each selected
latent `latents/<latent>/<rank>.jpg` (the image with its patch heatmap, for people browsing the
files and for `grid.jpg`) and `latents/<latent>/metadata.json`; then `values.png` (value
distributions), `index.html` (the feature browser, images linked) and, at `--browser-fpath`, the
same browser as one self-contained file (images inlined) for `snakemake --report`.

Shape key: N = images, P = patches per image, D = d_vit, F = d_sae, K = top_k.
"""

import argparse
import json
import logging
import math
import pathlib
import typing

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from .. import browser, checkpoints, datasets, helpers, jobs, sae, shards, topk_results  # noqa: E402

logger = logging.getLogger("render")
THUMB_PX = 160
"""Largest side of the stored images: the page shows them at 144 CSS pixels."""
JPEG_QUALITY = 75
HEAT_LEVELS = 255
"""Per-patch heat is stored as an integer 0..HEAT_LEVELS of the latent's maximum."""
HEAT_CMAP = "inferno"
DIM = 0.45
"""Brightness of the patches where a latent does not fire, in the overlay images."""


class Selection(typing.NamedTuple):
    """Which latents get rendered, and why."""

    latents: list[int]
    """Sorted latents to render."""
    filled: list[int]
    """Those outside the filters, added (nearest first) because too few latents passed them."""
    removed: dict[str, int]
    """How many latents each filter left out: never fired, frequency range, value range."""


def log10_or_nan(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(values > 0, np.log10(values), np.nan)


def distance_outside(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """How far each value lies outside [lo, hi] (0 inside)."""
    return np.maximum(lo - values, 0) + np.maximum(values - hi, 0)


def select_latents(
    result: topk_results.TopK,
    n_latents: int,
    seed: int,
    log10_freq_range: tuple[float, float] = (-np.inf, np.inf),
    log10_value_range: tuple[float, float] = (-np.inf, np.inf),
    include_latents: tuple[int, ...] = (),
    concept_latents: tuple[int, ...] = (),
) -> Selection:
    """Up to `n_latents` latents drawn at random (with `seed`) from those that fired with log10
    frequency and log10 mean value in the ranges, plus the `include_latents` and
    `concept_latents` (each labelled class's best latent) that fired. When
    fewer than `n_latents` pass the ranges, the fired latents nearest to them fill up the rest,
    so a sweep whose latents are all dense still shows some."""
    d_sae = len(result.freq)
    if out_of_range := [i for i in include_latents if not 0 <= i < d_sae]:
        raise ValueError(f"render.include_latents: {out_of_range} not in 0..{d_sae - 1} (d_sae)")
    fired = result.freq > 0
    log_freq, log_value = log10_or_nan(result.freq), log10_or_nan(result.mean_value)
    with np.errstate(invalid="ignore"):
        freq_off = np.where(fired, distance_outside(log_freq, *log10_freq_range), np.inf)
        value_off = np.where(fired, distance_outside(log_value, *log10_value_range), np.inf)
    in_freq, in_value = freq_off == 0, value_off == 0
    removed = {
        "never fired": int((~fired).sum()),
        "render.log10_freq_range": int((fired & ~in_freq).sum()),
        "render.log10_value_range": int((fired & in_freq & ~in_value).sum()),
    }
    include_latents = tuple(include_latents) + tuple(concept_latents)
    eligible = np.setdiff1d(np.flatnonzero(in_freq & in_value), include_latents)
    rng = np.random.default_rng(seed)
    chosen = {
        int(i) for i in rng.choice(eligible, size=min(n_latents, len(eligible)), replace=False)
    }
    distance = np.hypot(freq_off, value_off)
    outside = np.setdiff1d(np.flatnonzero(fired & ~(in_freq & in_value)), include_latents)
    nearest = outside[np.argsort(distance[outside], kind="stable")]
    filled = [int(i) for i in nearest[: n_latents - len(chosen)]]
    if never_fired := [i for i in include_latents if not fired[i]]:
        logger.warning("include_latents %s never fired: nothing to render", never_fired)
    included = {int(i) for i in include_latents if fired[i]}
    return Selection(sorted(chosen | included | set(filled)), filled, removed)


@torch.no_grad()
def patch_heatmaps(
    model: sae.SparseAutoencoder, reader: shards.ShardReader, layer: int, img_indices: list[int]
) -> dict[int, np.ndarray]:
    """(P, F) latent activations on each image's patch tokens, recomputed from the shards."""
    device = model.b_dec.device
    maps = {}
    for i in img_indices:
        x_PD = reader.image_tokens(i, layer, "patches")
        maps[i] = model.encode(torch.from_numpy(x_PD).to(device)).cpu().numpy()
    return maps


def square_crop(img: Image.Image, px: int) -> Image.Image:
    """Resize the shorter side to `px` and centre-crop, as the ViT transforms do."""
    scale = px / min(img.size)
    img = img.resize((max(px, round(img.width * scale)), max(px, round(img.height * scale))))
    left, top = (img.width - px) // 2, (img.height - px) // 2
    return img.crop((left, top, left + px, top + px))


def thumbnail(img: Image.Image) -> Image.Image:
    """The square the model saw, no larger than `THUMB_PX` (small images are not enlarged)."""
    return square_crop(img, min(THUMB_PX, *img.size))


def overlay(thumb: Image.Image, heat_P: np.ndarray) -> Image.Image:
    """The image with its patch heatmap: patches where the latent is zero dimmed, firing
    patches tinted by value (0..1 of the latent's maximum), the image's top patch outlined."""
    grid = int(round(math.sqrt(len(heat_P))))
    px = thumb.width
    heat_HW = np.asarray(
        Image.fromarray(heat_P.reshape(grid, grid).astype(np.float32)).resize(
            (px, px), Image.NEAREST
        )
    )[..., None]
    colour = plt.get_cmap(HEAT_CMAP)(heat_HW[..., 0])[..., :3] * 255
    base = np.asarray(thumb, dtype=np.float64)
    alpha = np.where(heat_HW > 0, 0.25 + 0.5 * heat_HW, 0.0)
    shade = np.where(heat_HW > 0, 1.0, DIM)
    out = Image.fromarray((base * shade * (1 - alpha) + colour * alpha).astype(np.uint8))
    top = int(np.argmax(heat_P))
    cell = px / grid
    y0, x0 = divmod(top, grid)
    box = [
        round(x0 * cell),
        round(y0 * cell),
        round((x0 + 1) * cell) - 1,
        round((y0 + 1) * cell) - 1,
    ]
    ImageDraw.Draw(out).rectangle(box, outline=(0, 229, 255), width=max(1, px // 80))
    return out


def render(
    model: sae.SparseAutoencoder,
    result: topk_results.TopK,
    reader: shards.ShardReader,
    dataset: datasets.Dataset,
    layer: int,
    out_dpath: pathlib.Path,
    latents: list[int],
    n_images: int | None = None,
) -> list[dict]:
    """Write the shared images and the per-latent folders; return one summary per latent.

    Each image entry names the label of its top patch where the shards have `labels.bin`, and
    holds the latent's per-patch heat (0..HEAT_LEVELS of the latent's maximum `vmax`)."""
    out_dpath = pathlib.Path(out_dpath)
    (out_dpath / "images").mkdir(parents=True, exist_ok=True)
    top_imgs = {
        latent: [int(i) for i in result.top_imgs[latent][:n_images] if i >= 0] for latent in latents
    }
    needed = sorted({i for imgs in top_imgs.values() for i in imgs})
    maps = patch_heatmaps(model, reader, layer, needed)
    labels_NP = reader.labels()
    thumbs = {}
    for i in needed:
        thumbs[i] = thumbnail(dataset.image(i))
        thumbs[i].save(out_dpath / "images" / f"{i:06d}.jpg", quality=JPEG_QUALITY)
    summaries = []
    for latent in latents:
        latent_dpath = out_dpath / "latents" / f"{latent:05d}"
        latent_dpath.mkdir(parents=True, exist_ok=True)
        vmax = max(float(maps[i][:, latent].max()) for i in top_imgs[latent])
        images = []
        for rank, i in enumerate(top_imgs[latent]):
            heat_P = maps[i][:, latent] / max(vmax, 1e-12)
            top_patch = int(np.argmax(heat_P))
            overlay(thumbs[i], heat_P).save(latent_dpath / f"{rank:03d}.jpg", quality=JPEG_QUALITY)
            label = dataset.label(i)
            if labels_NP is not None:
                label = dataset.classes[int(labels_NP[i, top_patch])]
            images.append(
                {
                    "index": i,
                    "label": label,
                    "image_label": dataset.label(i),
                    "value": float(result.top_values[latent, rank]),
                    "top_patch": top_patch,
                    "heat": np.rint(heat_P * HEAT_LEVELS).astype(int).tolist(),
                    "overlay": f"latents/{latent:05d}/{rank:03d}.jpg",
                }
            )
        summary = {
            "latent": latent,
            "log10_freq": float(np.log10(result.freq[latent])),
            "log10_value": float(np.log10(result.mean_value[latent])),
            f"p{result.percentile_q:g}": float(result.percentile[latent]),
            "vmax": vmax,
            "value_hist": browser.value_hist(result, latent),
            "images": images,
        }
        (latent_dpath / "metadata.json").write_text(json.dumps(summary, indent=2) + "\n")
        summaries.append(summary)
    return summaries


def plot_value_distributions(
    result: topk_results.TopK, latents: list[int], out_fpath: pathlib.Path, n_shown: int = 8
):
    """Value histograms (log10 bins) of up to `n_shown` of the rendered latents, one line each."""
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    centres = (topk_results.BIN_EDGES[:-1] + topk_results.BIN_EDGES[1:]) / 2
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


def write_grid(
    out_dpath: pathlib.Path, summaries: list[dict], grid_fpath: pathlib.Path, title: str = ""
):
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
            axes[r, c].imshow(Image.open(pathlib.Path(out_dpath) / image["overlay"]))
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
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(grid_fpath, dpi=72, pil_kwargs={"quality": JPEG_QUALITY})
    plt.close(fig)


def baseline_kind(sae_fpath: str) -> str | None:
    """`pca`, `kmeans` or `random` for a fitted baseline (its header says), else None."""
    layout = checkpoints.layout(pathlib.Path(sae_fpath), checkpoints.read_header(sae_fpath))
    return (layout.train or {}).get("baseline")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec-fpath", type=pathlib.Path, required=True, help="a RenderJob")
    parser.add_argument("--out-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--browser-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--grid-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--device", required=True, help="auto, cpu, cuda, ...")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    job = jobs.RenderJob.read(args.spec_fpath)
    model = sae.load(job.sae_fpath, helpers.pick_device(args.device))
    result = topk_results.load(pathlib.Path(job.topk_fpath))
    reader = shards.ShardReader(job.shards_dpath)
    dataset = datasets.load(job.dataset)
    reader.check_labels(dataset.classes)
    cfg = job.render
    concepts = browser.read_concepts(pathlib.Path(job.concepts_fpath))
    best_for_a_class = [f for f, found in concepts.items() if any(c["rank"] == 1 for c in found)]
    selection = select_latents(
        result,
        cfg.n_latents,
        cfg.seed,
        cfg.log10_freq_range,
        cfg.log10_value_range,
        cfg.include_latents,
        concept_latents=best_for_a_class,
    )
    logger.info(
        "rendering %d latents: %s; %d outside the filters fill up n_latents=%d (%s); "
        "left out by filter: %s",
        len(selection.latents),
        selection.latents,
        len(selection.filled),
        cfg.n_latents,
        selection.filled,
        selection.removed,
    )
    layer = job.layer
    summaries = render(
        model, result, reader, dataset, layer, args.out_dpath, selection.latents, cfg.n_images
    )
    plot_value_distributions(result, selection.latents, args.out_dpath / "values.png")
    md = reader.metadata
    sae_name = job.label
    title = f"{sae_name} ({job.sae_id}): {md.vit_family} {md.vit_ckpt}, layer {layer}"
    data = browser.page_data(
        result,
        summaries,
        selection,
        title=title,
        note=" ".join(
            n
            for n in (
                browser.baseline_note(baseline_kind(job.sae_fpath), model.cfg),
                browser.random_weights_note(md.vit_family),
            )
            if n
        ),
        patches_per_side=int(round(math.sqrt(md.n_patches_per_img))),
        concepts=concepts,
        edits=browser.read_edits(job.interventions),
    )
    browser.write(args.out_dpath / "index.html", data, images_dpath=None)
    browser.write(args.browser_fpath, data, images_dpath=args.out_dpath)
    # The report's sample leads with the latents that best predict a labelled class.
    by_meaning = sorted(summaries, key=lambda s: s["latent"] not in best_for_a_class)
    write_grid(args.out_dpath, by_meaning, args.grid_fpath, title=sae_name)


if __name__ == "__main__":
    main()
