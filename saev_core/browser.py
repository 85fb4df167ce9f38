"""The feature browser's page: the data it shows and the two ways it is written.

`page_data` gathers what the page needs: every fired latent's statistics (frequency, mean value,
percentile, value histogram), the rendered latents with their top images and per-patch heat, and
what each latent means where the evaluation scored concepts. `write` puts it into the template
(`browser.html`) either linking the images (`features/index.html`, next to `images/`) or with
every image inlined, one self-contained file that `snakemake --report` can carry. Both work
opened from the file system, without a server.
"""

import base64
import csv
import json
import pathlib

import numpy as np

from . import shards, topk_results

TEMPLATE_FPATH = pathlib.Path(__file__).with_name("browser.html")


def value_hist(result: topk_results.TopK, latent: int) -> dict:
    """The latent's histogram of log10 values, trimmed to its non-empty span."""
    counts = result.value_hist[latent]
    nonzero = np.flatnonzero(counts)
    lo, hi = (nonzero[0], nonzero[-1] + 1) if len(nonzero) else (0, 0)
    return {
        "log10_lo": float(topk_results.BIN_EDGES[lo]),
        "bin_width": float(topk_results.BIN_EDGES[1] - topk_results.BIN_EDGES[0]),
        "counts": counts[lo:hi].tolist(),
    }


def random_weights_note(vit_family: str) -> str:
    if vit_family != "tiny":
        return ""
    return (
        "Activations come from a randomly initialised ViT: features reflect colours and "
        "textures, not learned semantics."
    )


def baseline_note(kind: str | None, cfg) -> str:
    """What a baseline's latents are (`saev_core.baselines`); empty for an SAE."""
    if kind == "pca":
        return (
            f"Baseline, not an SAE: PCA. Latent j < {cfg.d_vit} is principal component j's "
            f"positive coefficient and latent {cfg.d_vit} + j its negative one (components by "
            f"explained variance); each token keeps the {cfg.k} of largest magnitude."
        )
    if kind == "kmeans":
        return (
            f"Baseline, not an SAE: k-means. Each latent is one of {cfg.d_sae} centroids, 1 on "
            "the tokens nearest to it and 0 elsewhere."
        )
    if kind == "random":
        return (
            "Baseline, not an SAE: an untrained TopK SAE (random unit decoder rows, the encoder "
            "their transpose): a trained SAE's latents should mean more than these."
        )
    return ""


def read_concepts(fpath: pathlib.Path) -> dict[int, list[dict]]:
    """`concept_candidates.csv` as latent -> its scored classes, best AP first, each with its
    rank among the candidates of that class and how many candidates the class had."""
    with open(fpath, newline="") as fd:
        rows = list(csv.DictReader(fd))
    n_candidates: dict[str, int] = {}
    for row in rows:
        n_candidates[row["class"]] = max(n_candidates.get(row["class"], 0), int(row["rank"]))
    by_latent: dict[int, list[dict]] = {}
    for row in rows:
        by_latent.setdefault(int(row["latent"]), []).append(
            {
                "name": row["name"],
                "ap": float(row["average_precision"]),
                "f1": float(row["best_f1"]),
                "rank": int(row["rank"]),
                "n_candidates": n_candidates[row["class"]],
            }
        )
    return {
        latent: sorted(found, key=lambda c: (-c["ap"], c["rank"]))
        for latent, found in by_latent.items()
    }


def read_edits(interventions: dict[str, str]) -> dict[int, list[dict]]:
    """Latent -> what editing it did: for each intervention that edited it (as one of a class's
    proposed latents), the class, the change of that class's score, the control's change of it
    and the mean absolute change of the other edited classes, at the intervention's best scale."""
    by_latent: dict[int, list[dict]] = {}
    for name, dpath in sorted(interventions.items()):
        dpath = pathlib.Path(dpath)
        summary = json.loads((dpath / "intervention.json").read_text())
        with open(dpath / "effects.csv", newline="") as fd:
            rows = [
                r for r in csv.DictReader(fd) if f"{float(r['scale']):g}" == summary["best_scale"]
            ]
        edited = {r["edited_name"] for r in rows}
        for class_name, latents in summary["latents"].items():
            mine = [r for r in rows if r["edited_name"] == class_name]
            own = [r for r in mine if r["measured_name"] == class_name]
            if not own:
                continue
            before, after, control = (float(own[0][k]) for k in ("before", "after", "control"))
            others = [
                abs(float(r["after"]) - float(r["before"]))
                for r in mine
                if r["measured_name"] != class_name and r["measured_name"] in edited
            ]
            entry = {
                "intervention": name,
                "action": summary["action"],
                "scale": summary["best_scale"],
                "score": summary["score"],
                "class": class_name,
                "n_latents": len(latents),
                "before": before,
                "change": after - before,
                "control_change": control - before,
                "others_change": sum(others) / len(others) if others else None,
                "page": f"interventions/{name}/interventions.html",
            }
            for latent in latents:
                by_latent.setdefault(int(latent), []).append(entry)
    return by_latent


def page_data(
    result: topk_results.TopK,
    summaries: list[dict],
    selection,
    *,
    title: str,
    note: str,
    patches_per_side: int,
    concepts: dict[int, list[dict]],
    edits: dict[int, list[dict]] | None = None,
) -> dict:
    """Everything the page shows, as one JSON-able dict (`selection` is a `render.Selection`)."""
    fired = np.flatnonzero(result.freq > 0)
    percentile = f"p{result.percentile_q:g}"
    hists = [value_hist(result, int(i)) for i in fired]
    image_indices = sorted({image["index"] for s in summaries for image in s["images"]})
    return {
        "title": title,
        "note": note,
        "d_sae": len(result.freq),
        "percentile": percentile,
        "patches_per_side": patches_per_side,
        "heat_levels": 255,
        "images": {str(i): f"images/{i:06d}.jpg" for i in image_indices},
        "all": {
            "latent": fired.tolist(),
            "log10_freq": np.round(np.log10(result.freq[fired]), 4).tolist(),
            "log10_value": np.round(np.log10(result.mean_value[fired]), 4).tolist(),
            percentile: [float(f"{v:.4g}") for v in result.percentile[fired]],
            "hist_lo": [h["log10_lo"] for h in hists],
            "hist": [h["counts"] for h in hists],
        },
        "bin_width": float(topk_results.BIN_EDGES[1] - topk_results.BIN_EDGES[0]),
        "latents": [{**s, "images": [page_image(im) for im in s["images"]]} for s in summaries],
        "filled": selection.filled,
        "removed": selection.removed,
        "concepts": {str(latent): found for latent, found in concepts.items()},
        "edits": {str(latent): found for latent, found in (edits or {}).items()},
    }


def page_image(image: dict) -> dict:
    """A rendered image's entry as the page holds it: the heat as base64 bytes (a quarter of
    the size of a JSON list), no overlay file."""
    heat = base64.b64encode(np.asarray(image["heat"], dtype=np.uint8).tobytes()).decode()
    return {**{k: v for k, v in image.items() if k != "overlay"}, "heat": heat}


def inline_images(data: dict, images_dpath: pathlib.Path) -> dict:
    """`data` with each image link replaced by a `data:` URI of the file's bytes."""
    images = {}
    for index, src in data["images"].items():
        encoded = base64.b64encode((pathlib.Path(images_dpath) / src).read_bytes()).decode()
        images[index] = f"data:image/jpeg;base64,{encoded}"
    return {**data, "images": images}


def write(fpath: pathlib.Path, data: dict, images_dpath: pathlib.Path | None):
    """Write the page atomically; with `images_dpath`, the images are inlined from there."""
    if images_dpath is not None:
        data = inline_images(data, images_dpath)
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    html = TEMPLATE_FPATH.read_text().replace("/*DATA*/null", payload)
    shards.write_atomic(pathlib.Path(fpath), html.encode())
