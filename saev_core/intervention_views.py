"""What a person sees of an intervention: the effects heatmap and the prediction-map page.

`plot_effects` draws `effects.csv` at one scale as two heatmaps (proposed latents, control);
`write_page` writes `interventions.html`, one self-contained file (images inlined), which for
patch probes shows each chosen held-out image with its true classes and the probe's prediction
map before the edit, after it and after the control's.

Shape key: N = images, V = probe vectors per image, P = patches.
"""

import base64
import io
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from . import datasets, shards  # noqa: E402

THUMB_PX = 128
SCORE_LABELS = {"iou": "IoU", "recall": "recall", "share_predicted": "share predicted as it"}


def page_images(labels_NV: np.ndarray, classes: list[int], kind: str, n_images: int):
    """Per edited class, the held-out images drawn on the page: for patch probes those with the
    most patches of the class, for image probes the first images of other classes."""
    out = {}
    for c in classes:
        if kind == "patch":
            count_N = (labels_NV == c).sum(axis=1)
            order = np.argsort(-count_N, kind="stable")
            out[c] = [int(i) for i in order[:n_images] if count_N[i] > 0]
        else:
            out[c] = [int(i) for i in np.flatnonzero(labels_NV[:, 0] != c)[:n_images]]
    return out


def plot_effects(rows, job, score: str, scale: str, title: str, out_fpath: pathlib.Path):
    """after - before and control - before, edited class x measured class, at one scale."""
    rows = [r for r in rows if f"{r['scale']:g}" == scale]
    edited = sorted({r["edited_class"] for r in rows})
    measured = sorted({r["measured_class"] for r in rows})
    grids = []
    for column in ("after", "control"):
        grid = np.full((len(edited), len(measured)), np.nan)
        for r in rows:
            grid[edited.index(r["edited_class"]), measured.index(r["measured_class"])] = (
                r[column] - r["before"]
            )
        grids.append(grid)
    limit = max(0.05, float(np.nanmax(np.abs(grids))))
    width = 1.6 + 0.75 * len(measured)
    fig, axes = plt.subplots(
        1, 2, figsize=(2 * width + 1, 1.6 + 0.45 * len(edited)), layout="constrained"
    )
    score = SCORE_LABELS[score]
    for ax, grid, what in zip(
        axes,
        grids,
        ("proposed latents", "control: random latents of similar frequency"),
        strict=True,
    ):
        image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(
            range(len(measured)),
            [job.classes[m] for m in measured],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.set_yticks(range(len(edited)), [job.classes[c] for c in edited], fontsize=8)
        ax.set_xlabel(f"measured class ({score} change)")
        ax.set_ylabel("class whose latents were edited")
        ax.set_title(what, fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label=f"{score} after - before")
    fig.suptitle(title, fontsize=10)
    fig.savefig(out_fpath, dpi=90, format="png")  # 30 of them go into the default's report
    plt.close(fig)


NAMED_COLOURS = {
    "red circle": (220, 30, 30),
    "green square": (30, 200, 60),
    "blue triangle": (40, 70, 230),
    "yellow stripes": (240, 220, 30),
    "cyan checkerboard": (30, 220, 230),
    "orange diamond": (250, 140, 20),
}
"""The synthetic concepts drawn in their own colours; other classes take tab20's."""


def palette(classes: tuple[str, ...]) -> np.ndarray:
    """A colour per class: a concept's own colour where it has one, else tab20's; class 0
    (background, "other") black."""
    tab20 = (np.array(plt.get_cmap("tab20").colors) * 255).astype(np.uint8)
    out = np.array(
        [NAMED_COLOURS.get(name, tab20[(c - 1) % len(tab20)]) for c, name in enumerate(classes)]
    )
    out[0] = (0, 0, 0)
    return out


def data_uri(img: Image.Image) -> str:
    """An image inlined: photos as JPEG, class maps (a few flat colours) as PNG."""
    buffer = io.BytesIO()
    kind = "png" if img.width < THUMB_PX else "jpeg"
    img.save(buffer, format=kind.upper(), **({"quality": 80} if kind == "jpeg" else {}))
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode()


def map_image(pred_P: np.ndarray, colours: np.ndarray) -> Image.Image:
    """One pixel per patch; the page scales it up without smoothing."""
    grid = int(round(len(pred_P) ** 0.5))
    return Image.fromarray(colours[np.asarray(pred_P).reshape(grid, grid)].astype(np.uint8))


def write_page(job, maps, shown, labels_NV, summary, scale: str, percentile: str, out_fpath):
    """The static dashboard: per edited class, a few held-out images with the probe's
    prediction before, after the edit and after the control's."""
    dataset = datasets.load(job.dataset)
    colours = palette(job.classes)
    scale_value = float(scale)
    legend = "".join(
        f'<span class="swatch" style="background:rgb{tuple(int(v) for v in colours[c])}"></span>'
        f"{name} "
        for c, name in enumerate(job.classes)
        if c not in job.probe.ignore_labels
    )
    verb = (
        "suppressed" if job.intervention.action == "suppress" else f"set to {scale} x {percentile}"
    )
    sections = []
    for c, images in sorted(shown.items()):
        rows = []
        for i in images:
            thumb = dataset.image(i).convert("RGB")
            side = min(thumb.size)
            left, top = (thumb.width - side) // 2, (thumb.height - side) // 2
            thumb = thumb.crop((left, top, left + side, top + side)).resize((THUMB_PX, THUMB_PX))
            cells = [("image", thumb)]
            keys = [
                ("before", ("before", i)),
                (f"{job.classes[c]} {verb}", (c, scale_value, False, i)),
                ("control", (c, scale_value, True, i)),
            ]
            if job.probe.kind == "patch":
                cells.append(("true classes", map_image(labels_NV[i], colours)))
                cells += [(what, map_image(maps[key], colours)) for what, key in keys]
                html = "".join(
                    f'<figure><img src="{data_uri(img)}" alt="{what}"><figcaption>{what}</figcaption></figure>'
                    for what, img in cells
                )
            else:
                preds = " · ".join(
                    f"{what}: <b>{job.classes[int(maps[key][0])]}</b>" for what, key in keys
                )
                html = (
                    f'<figure><img src="{data_uri(thumb)}" alt="image {i}"><figcaption>'
                    f"true: {job.classes[int(labels_NV[i, 0])]}</figcaption></figure><p>{preds}</p>"
                )
            rows.append(f'<div class="row"><span class="idx">image {i}</span>{html}</div>')
        sections.append(f"<h2>{job.classes[c]}</h2>" + "".join(rows))
    text = summary[scale]
    html = PAGE.format(
        title=f"{job.label}: intervention {job.intervention.name}",
        probe=f"probe {job.intervention.probe} ({job.probe.kind}, layer {job.probe.layer})",
        what=(
            f"Each class's {job.intervention.n_latents} proposed latents {verb} at layer "
            f"{job.sae_layer}; the control edits as many random latents of similar firing "
            f"frequency. Averaged over the edited classes: own-class change "
            f"{text['own_change']:+.3f}, control {text['control_own_change']:+.3f}, other "
            f"classes {text['other_abs_change'] or 0:.3f} (mean absolute)."
        ),
        legend=legend if job.probe.kind == "patch" else "",
        sections="".join(sections),
    )
    shards.write_atomic(out_fpath, html.encode())


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}}
h1{{font-size:1.3em}} h2{{font-size:1.1em;margin-top:1.4em;border-bottom:1px solid #ddd}}
.row{{display:flex;gap:10px;align-items:center;margin:6px 0}} .idx{{width:80px;color:#666}}
figure{{margin:0;text-align:center;width:{px}px}} figcaption{{font-size:12px;color:#444}}
img{{image-rendering:pixelated;width:{px}px;height:{px}px;border:1px solid #ccc}}
.swatch{{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;vertical-align:-1px}}
</style></head><body><h1>{title}</h1><p>{probe}. {what}</p><p>{legend}</p>{sections}</body></html>
""".replace("{px}", str(THUMB_PX))
