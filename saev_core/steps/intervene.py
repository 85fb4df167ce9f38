"""Edit one SAE's latents of each class in held-out activations and measure a probe's change.

Run as `python -m saev_core.steps.intervene --spec-fpath SPEC --out-dpath
results/<sweep>/saes/<sae>/interventions/<name> --device auto`, the spec a `jobs.InterveneJob`.

Each class's proposed latents are its `n_latents` best-ranked concept candidates (the
evaluation's `concept_candidates.csv`). The edit is made on the residual stream at the SAE's
layer, keeping the SAE's reconstruction error: x' = x + decode(f') - decode(f), where f' is f with
the class's latents set to 0 (`suppress`) or to a scale times each latent's percentile value
(`scale`, on every token the SAE reads). When the probe reads the SAE's layer, the edit is applied
to the shards' vectors; when it reads a later layer, the ViT runs the held-out images, the edit
replaces the SAE layer's output, and the blocks after it run on the edited stream. Every edit is
repeated on a control: as many latents drawn at random among those of similar firing frequency
(the top-k pass's) that are not proposed for any class.

Scores per (edited class, measured class): patch probes the measured class's IoU; image probes,
for `suppress`, the share of the measured class's images predicted as it (recall), for `scale`,
the share of the images of other classes than the edited one predicted as the measured class.
Writes `class_latents.csv`, `effects.csv` (before, after, control per pair and scale),
`effects.png` (the change as a heatmap), `interventions.html` (prediction maps before and after on
a few images per class) and, last, `intervention.json` (the averages): the rule's marker.

Shape key: N = images, T = tokens, D = d_vit, F = d_sae, C = classes, P = patches, U = edited
latents.
"""

import argparse
import csv
import io
import json
import logging
import pathlib
import typing

import numpy as np
import torch

from .. import (
    datasets,
    helpers,
    intervention_views,
    jobs,
    loaders,
    probes,
    sae,
    shards,
    topk_results,
    vits,
)

logger = logging.getLogger("intervene")
CONTROL_WINDOW = 10
"""The control draws each latent among this many neighbours on either side in firing frequency."""
VIT_BATCH = 32


class Condition(typing.NamedTuple):
    cls: int
    scale: float
    control: bool
    latents: list[int]
    values_U: torch.Tensor
    """What the latents are set to (zeros for suppression)."""


def proposed_latents(
    concepts_fpath: pathlib.Path, n_latents: int, classes: tuple[str, ...], wanted: tuple[str, ...]
) -> dict[int, list[dict]]:
    """Class -> its best-ranked concept candidates (rank 1 first), at most `n_latents`."""
    with open(concepts_fpath, newline="") as fd:
        rows = [r for r in csv.DictReader(fd) if int(r["rank"]) <= n_latents]
    out: dict[int, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (int(r["class"]), int(r["rank"]))):
        if not wanted or classes[int(row["class"])] in wanted:
            out.setdefault(int(row["class"]), []).append(row)
    return out


def control_latents(
    proposed: dict[int, list[int]], freq_F: np.ndarray, seed: int, window: int = CONTROL_WINDOW
) -> dict[int, list[int]]:
    """Per class, one random latent per proposed one, drawn among the `window` fired latents
    nearest to it in firing frequency on either side; none proposed for any class (a control
    that zeroes another class's latents would measure that class), none twice."""
    fired_U = np.flatnonzero(freq_F > 0)
    by_freq_U = fired_U[np.argsort(freq_F[fired_U], kind="stable")]
    sorted_freq_U = freq_F[by_freq_U]
    out = {}
    every_proposed = {latent for latents in proposed.values() for latent in latents}
    for c, latents in proposed.items():
        rng = np.random.default_rng([seed, c])
        taken, chosen = set(every_proposed), []
        for latent in latents:
            at = int(np.searchsorted(sorted_freq_U, freq_F[latent]))
            for width in (window, 4 * window, len(by_freq_U)):
                near = by_freq_U[max(0, at - width) : at + width + 1]
                near = [int(f) for f in near if int(f) not in taken]
                if near:
                    break
            if not near:
                raise ValueError(f"too few fired latents for a control of class {c}")
            pick = int(rng.choice(near))
            chosen.append(pick)
            taken.add(pick)
        out[c] = chosen
    return out


def conditions(
    intervention, proposed: dict[int, list[int]], control: dict[int, list[int]], topk
) -> list[Condition]:
    out = []
    for c in sorted(proposed):
        for scale in intervention.conditions:
            for is_control, latents in ((False, proposed[c]), (True, control[c])):
                values_U = torch.tensor(scale * topk.percentile[latents], dtype=torch.float32)
                out.append(Condition(c, scale, is_control, latents, values_U))
    return out


def edit(model: sae.SparseAutoencoder, x_ND: torch.Tensor, f_NF: torch.Tensor, cond: Condition):
    """x + decode(f') - decode(f): the latents changed, the reconstruction error kept."""
    delta_NU = cond.values_U.to(f_NF.device) - f_NF[:, cond.latents]
    return x_ND + model.decode_change(cond.latents, delta_NU)


class Stream(typing.NamedTuple):
    """Held-out images in chunks: the stream at the SAE's layer, and the way on to the probe."""

    chunks: typing.Iterator[tuple[int, torch.Tensor]]
    """(first image, stream at the SAE layer (N, T, D) as stored or as the block outputs)."""
    positions: slice
    """The tokens the SAE reads, within T."""
    finish: typing.Callable[[torch.Tensor], torch.Tensor]
    """Stream at the SAE layer -> stream at the probe's layer, [CLS] first, no registers."""


def shard_stream(job: jobs.InterveneJob, reader: shards.ShardReader, device) -> Stream:
    """The probe reads the SAE's layer: the stored vectors are the stream."""
    chunks = (
        (start, torch.from_numpy(x_NTD).to(device))
        for start, x_NTD in loaders.OrderedLoader(reader, job.sae_layer, "all")
    )
    return Stream(chunks, reader.token_slice(job.sae_tokens), lambda x_NTD: x_NTD)


def vit_stream(job: jobs.InterveneJob, reader: shards.ShardReader, device) -> Stream:
    """The probe reads a later layer: the ViT runs the images and, from the SAE's layer on,
    the edited stream."""
    weights_fpath = job.model["weights"]
    recorder, transform = vits.load(
        job.model["family"],
        job.model["ckpt"],
        [job.sae_layer],
        weights_fpath=pathlib.Path(weights_fpath) if weights_fpath else None,
    )
    recorder.to(device)
    blocks, has_cls, n_prefix = vits.residual_blocks(recorder.vit)
    first, last = job.sae_layer % len(blocks), job.probe.layer % len(blocks)
    captured = {}
    blocks[first].register_forward_hook(lambda module, args, out: captured.update(x=out))
    dataset = datasets.load(job.dataset)
    if len(dataset) != reader.n_imgs:
        raise shards.ShardError(
            f"{reader.dpath} holds {reader.n_imgs} images, the dataset {len(dataset)}"
        )

    def chunks():
        for start in range(0, len(dataset), VIT_BATCH):
            imgs = [
                transform(dataset.image(i))
                for i in range(start, min(start + VIT_BATCH, len(dataset)))
            ]
            recorder(torch.stack(imgs).to(device))
            yield start, captured.pop("x").clone()

    def finish(x_NTD: torch.Tensor) -> torch.Tensor:
        out_NTD = vits.run_blocks(blocks, x_NTD, first, last)
        return torch.cat([out_NTD[:, : int(has_cls)], out_NTD[:, n_prefix:]], dim=1)

    n_cls = int(has_cls)
    kinds = {"patches": slice(n_prefix, None), "cls": slice(0, n_cls), "all": slice(None)}
    if job.sae_tokens == "all" and n_prefix > n_cls:
        raise ValueError("an SAE on all tokens of a ViT with registers cannot be edited in place")
    return Stream(chunks(), kinds[job.sae_tokens], finish)


def check_matches_shards(before_NTD: torch.Tensor, reader, layer: int, start: int):
    """The ViT run here must be the one that wrote the shards: its unedited stream at the
    probe's layer is compared with the stored vectors of the first images."""
    stored_TD = torch.from_numpy(reader.image_tokens(start, layer, "all"))
    ran_TD = before_NTD[0].cpu()
    rel = ((ran_TD - stored_TD).norm() / stored_TD.norm().clamp(min=1e-12)).item()
    logger.info("unedited stream vs the shards at layer %d: relative difference %.2e", layer, rel)
    if rel > 0.05:
        raise ValueError(
            f"the ViT's layer {layer} output differs from {reader.dpath} by {rel:.1%}: the model "
            "(or its weights file) is not the one that wrote these shards"
        )


@torch.no_grad()
def measure(job: jobs.InterveneJob, model, probe: probes.Probe, conds: list[Condition], device):
    """Confusion matrices before and under each condition, and the page's predictions."""
    reader = shards.ShardReader(job.shards_dpath)
    labels_NV = np.asarray(probes.vector_labels(job.probe.kind, reader, job.dataset, job.classes))
    n_classes, ignore = len(job.classes), probe.ignore_labels
    same_layer = job.sae_layer == job.probe.layer
    stream = (shard_stream if same_layer else vit_stream)(job, reader, device)
    has_cls = reader.metadata.cls_token
    shown = intervention_views.page_images(
        labels_NV, sorted({c.cls for c in conds}), probe.kind, job.intervention.n_images
    )
    wanted = {i for images in shown.values() for i in images}
    before_CC = np.zeros((n_classes, n_classes), dtype=np.int64)
    conf = {i: np.zeros_like(before_CC) for i in range(len(conds))}
    maps: dict[tuple, np.ndarray] = {}
    for chunk_i, (start, x_NTD) in enumerate(stream.chunks):
        n_imgs = len(x_NTD)
        y_N = torch.from_numpy(np.asarray(labels_NV[start : start + n_imgs], dtype=np.int64))
        y_N = y_N.reshape(-1).to(device)
        keep_N = probes.kept(y_N, ignore)
        here = [i for i in range(start, start + n_imgs) if i in wanted]
        x_MD = x_NTD[:, stream.positions].reshape(-1, x_NTD.shape[-1])
        f_MF = model.encode(x_MD)

        at_probe_NTD, pred_N = predict(stream, probe, x_NTD, x_MD, has_cls)
        if chunk_i == 0 and not same_layer:
            check_matches_shards(at_probe_NTD, reader, job.probe.layer, start)
        before_CC += probes.confusion(y_N[keep_N], pred_N[keep_N], n_classes).cpu().numpy()
        record(maps, ("before",), pred_N, here, start, n_imgs)
        for i, cond in enumerate(conds):
            edited_MD = edit(model, x_MD, f_MF, cond)
            _, pred_N = predict(stream, probe, x_NTD, edited_MD, has_cls)
            conf[i] += probes.confusion(y_N[keep_N], pred_N[keep_N], n_classes).cpu().numpy()
            record(maps, (cond.cls, cond.scale, cond.control), pred_N, here, start, n_imgs)
    return before_CC, conf, maps, shown, labels_NV


def predict(stream: Stream, probe: probes.Probe, x_NTD, x_MD, has_cls: bool):
    """The stream at the probe's layer and the probe's predictions, with the SAE's tokens of
    `x_NTD` replaced by `x_MD`."""
    out_NTD = x_NTD.clone()
    out_NTD[:, stream.positions] = x_MD.view(len(x_NTD), -1, x_NTD.shape[-1])
    at_probe_NTD = stream.finish(out_NTD)
    return at_probe_NTD, probe.predict(probe.pool(at_probe_NTD, has_cls))


def record(
    maps: dict, key: tuple, pred_N: torch.Tensor, images: list[int], start: int, n_imgs: int
):
    pred_IV = pred_N.view(n_imgs, -1).cpu().numpy()
    for i in images:
        maps[(*key, i)] = pred_IV[i - start]


def per_class_score(kind: str, action: str, conf_CC: np.ndarray, edited: int) -> np.ndarray:
    if kind == "patch":
        return probes.class_iou(conf_CC)
    if action == "suppress":
        return probes.recall(conf_CC)
    return probes.predicted_share(conf_CC, excluded=edited)


SCORE_NAMES = {("patch", "suppress"): "iou", ("patch", "scale"): "iou"}
SCORE_NAMES |= {("image", "suppress"): "recall", ("image", "scale"): "share_predicted"}


def effects(job, conds, before_CC, conf) -> list[dict]:
    """One row per (edited class, scale, measured class): the score before, after, control."""
    kind, action = job.probe.kind, job.intervention.action
    by_key = {(c.cls, c.scale, c.control): conf[i] for i, c in enumerate(conds)}
    rows = []
    for c, scale in sorted({(c.cls, c.scale) for c in conds}):
        before_C = per_class_score(kind, action, before_CC, c)
        after_C = per_class_score(kind, action, by_key[c, scale, False], c)
        control_C = per_class_score(kind, action, by_key[c, scale, True], c)
        for m, name in enumerate(job.classes):
            if m in job.probe.ignore_labels or not np.isfinite(before_C[m]):
                continue
            rows.append(
                {
                    "edited_class": c,
                    "edited_name": job.classes[c],
                    "scale": scale,
                    "measured_class": m,
                    "measured_name": name,
                    "before": float(before_C[m]),
                    "after": float(after_C[m]),
                    "control": float(control_C[m]),
                }
            )
    return rows


def summarize(rows: list[dict], edited: list[int]) -> dict:
    """Per scale, averaged over the edited classes: the change of the edited class's own score,
    the control's change of it, and the mean absolute change of the other edited classes'."""
    out = {}
    for scale in sorted({r["scale"] for r in rows}):
        own, control, other = [], [], []
        for c in edited:
            mine = [r for r in rows if r["scale"] == scale and r["edited_class"] == c]
            for r in mine:
                if r["measured_class"] == c:
                    own.append(r["after"] - r["before"])
                    control.append(r["control"] - r["before"])
                elif r["measured_class"] in edited:
                    other.append(abs(r["after"] - r["before"]))
        out[f"{scale:g}"] = {
            "own_change": float(np.mean(own)) if own else None,
            "control_own_change": float(np.mean(control)) if control else None,
            "other_abs_change": float(np.mean(other)) if other else None,
        }
    return out


def latents_csv(job, proposed_rows, control, topk) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "class",
            "name",
            "rank",
            "latent",
            "average_precision",
            "freq",
            "control_latent",
            "control_freq",
        ]
    )
    for c, rows in sorted(proposed_rows.items()):
        for row, ctl in zip(rows, control[c], strict=True):
            latent = int(row["latent"])
            writer.writerow(
                [
                    c,
                    job.classes[c],
                    row["rank"],
                    latent,
                    row["average_precision"],
                    f"{topk.freq[latent]:.6g}",
                    ctl,
                    f"{topk.freq[ctl]:.6g}",
                ]
            )
    return out.getvalue()


def best_scale(summary: dict) -> str:
    """The scale whose own-class change is largest in size."""
    return max(summary, key=lambda s: abs(summary[s]["own_change"] or 0.0))


def run(job: jobs.InterveneJob, out_dpath: pathlib.Path, device: torch.device):
    model = sae.load(pathlib.Path(job.sae_fpath), device)
    probe = probes.load(pathlib.Path(job.probe_fpath))
    topk = topk_results.load(pathlib.Path(job.topk_fpath))
    cfg = job.intervention
    proposed_rows = proposed_latents(
        pathlib.Path(job.concepts_fpath), cfg.n_latents, job.classes, cfg.classes
    )
    proposed = {c: [int(r["latent"]) for r in rows] for c, rows in proposed_rows.items()}
    if not proposed:
        raise ValueError(f"{job.concepts_fpath} proposes no latents for any class to edit")
    control = control_latents(proposed, topk.freq, cfg.seed)
    conds = conditions(cfg, proposed, control, topk)
    before_CC, conf, maps, shown, labels_NV = measure(job, model, probe, conds, device)
    rows = effects(job, conds, before_CC, conf)
    summary = summarize(rows, sorted(proposed))
    scale = best_scale(summary)
    logger.info("%s", summary)
    out_dpath.mkdir(parents=True, exist_ok=True)
    shards.write_atomic(
        out_dpath / "class_latents.csv", latents_csv(job, proposed_rows, control, topk).encode()
    )
    shards.write_atomic(out_dpath / "effects.csv", probes.rows_csv(rows).encode())
    tmp_fpath = shards.tmp_sibling(out_dpath / "effects.png")
    percentile = f"p{topk.percentile_q:g}"
    how = f"set to {scale} x {percentile}" if cfg.action == "scale" else "suppressed"
    title = f"{job.label}: intervention {cfg.name}, each class's {cfg.n_latents} latents {how}"
    score = SCORE_NAMES[job.probe.kind, cfg.action]
    intervention_views.plot_effects(rows, job, score, scale, title, tmp_fpath)
    tmp_fpath.replace(out_dpath / "effects.png")
    intervention_views.write_page(
        job, maps, shown, labels_NV, summary, scale, percentile, out_dpath / "interventions.html"
    )
    marker = {
        "sae": job.sae_id,
        "label": job.label,
        "intervention": cfg.name,
        "action": cfg.action,
        "score": SCORE_NAMES[job.probe.kind, cfg.action],
        "n_latents": cfg.n_latents,
        "best_scale": scale,
        "by_scale": summary,
        "latents": {job.classes[c]: latents for c, latents in proposed.items()},
    }
    shards.write_atomic(
        out_dpath / jobs.INTERVENTION_FNAME, (json.dumps(marker, indent=2) + "\n").encode()
    )


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec-fpath", type=pathlib.Path, required=True, help="an InterveneJob")
    parser.add_argument("--out-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--device", required=True, help="auto, cpu, cuda, ...")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    job = jobs.InterveneJob.read(args.spec_fpath)
    run(job, args.out_dpath, helpers.pick_device(args.device))


if __name__ == "__main__":
    main()
