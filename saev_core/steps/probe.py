"""Train one linear probe's grid and keep the best on held-out activations.

Run as `python -m saev_core.steps.probe --spec-fpath SPEC --out-dpath results/probes/<probe>
--device auto`, the spec a `jobs.ProbeJob`. Every (learning rate, weight decay) point of the grid is
its own AdamW probe, all updated on the same shuffled batches from the shard loader (so a grid
costs one pass over the data, and an ImageNet-sized dump streams). Patch probes learn each
patch's class from `labels.bin` (classes in `ignore_labels` left out of loss and scores); image
probes learn the dataset's target from `[CLS]` or the mean patch vector (the synthetic set's
target is the concept covering most pixels).

Writes `metrics.csv` (one row per grid point, held-out: loss, accuracy, mean and per-class IoU,
and for datasets with masks pixel accuracy and pixel mean IoU, patch predictions upsampled to
pixels), `hparams.png` (the held-out score over the grid), `probe.pt` (the best) and, last,
`probe.json` (which point won, its scores): the rule's marker. A killed job starts over; every
file is renamed into place whole.

Shape key: G = grid points, B = batch, D = d_vit, C = classes, N = vectors, P = patches.
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

from .. import datasets, helpers, jobs, loaders, probes, shards  # noqa: E402

logger = logging.getLogger("probe")
LOG_EVERY = 50
DATASETS_WITH_MASKS = ("synthetic", "ade20k")


def train(job: jobs.ProbeJob, device: torch.device) -> tuple[probes.StackedProbes, list[float]]:
    """The grid's probes after `n_train` vectors, and each one's mean training loss over the
    last logging interval."""
    cfg, n_classes = job.probe, len(job.classes)
    reader = shards.ShardReader(job.train_shards_dpath)
    labels_NT = probes.vector_labels(cfg.kind, reader, job.train_dataset, job.classes)
    batches = loaders.ShuffledLoader(
        reader, cfg.layer, cfg.tokens, cfg.batch_size, cfg.n_train, cfg.seed, labels_NT=labels_NT
    )
    model = probes.StackedProbes(len(cfg.grid), reader.metadata.d_vit, n_classes, cfg.seed)
    model.to(device)
    groups = [
        {"params": [model.W_GDC[g], model.b_GC[g]], "lr": lr, "weight_decay": wd}
        for g, (lr, wd) in enumerate(cfg.grid)
    ]
    optimizer = torch.optim.AdamW(groups)
    recent_G = torch.zeros(len(cfg.grid), device=device)
    n_recent, train_loss = 0, [math.nan] * len(cfg.grid)
    for step, (x_BD, y_B) in enumerate(loaders.ToDevice(batches, device)):
        y_B = y_B.to(device)
        keep_B = probes.kept(y_B, list(cfg.ignore_labels))
        if not keep_B.any():
            continue
        logits_GBC = model(x_BD[keep_B])
        target_GB = y_B[keep_B].expand(len(cfg.grid), -1)
        loss_GB = torch.nn.functional.cross_entropy(
            logits_GBC.flatten(0, 1), target_GB.flatten(), reduction="none"
        ).view(len(cfg.grid), -1)
        loss_G = loss_GB.mean(dim=1)
        optimizer.zero_grad(set_to_none=True)
        loss_G.sum().backward()
        optimizer.step()
        recent_G += loss_G.detach()
        n_recent += 1
        if n_recent and ((step + 1) % LOG_EVERY == 0 or step + 1 == len(batches)):
            train_loss = (recent_G / n_recent).tolist()
            logger.info("step %d/%d train loss %s", step + 1, len(batches), np.round(train_loss, 4))
            recent_G.zero_()
            n_recent = 0
    if not math.isfinite(sum(train_loss)):
        raise FloatingPointError(f"a probe's training loss is not finite: {train_loss}")
    return model, train_loss


@torch.no_grad()
def score(job: jobs.ProbeJob, model: probes.StackedProbes, device: torch.device) -> list[dict]:
    """Held-out scores of every grid point, from per-point confusion matrices."""
    cfg, n_classes = job.probe, len(job.classes)
    reader = shards.ShardReader(job.eval_shards_dpath)
    labels_NT = probes.vector_labels(cfg.kind, reader, job.eval_dataset, job.classes)
    ignore = list(cfg.ignore_labels)
    with_pixels = cfg.kind == "patch" and job.eval_dataset["kind"] in DATASETS_WITH_MASKS
    dataset = datasets.load(job.eval_dataset) if with_pixels else None
    G = len(cfg.grid)
    conf_GCC = torch.zeros(G, n_classes, n_classes, dtype=torch.long)
    pixel_conf_GCC = torch.zeros_like(conf_GCC)
    loss_sum_G, n_scored = torch.zeros(G, dtype=torch.float64), 0
    for start, x_NTD in loaders.OrderedLoader(reader, cfg.layer, cfg.tokens):
        n_imgs, T = x_NTD.shape[:2]
        x_ND = torch.from_numpy(x_NTD.reshape(-1, x_NTD.shape[-1])).to(device)
        y_N = torch.from_numpy(np.asarray(labels_NT[start : start + n_imgs]).astype(np.int64))
        y_N = y_N.reshape(-1).to(device)
        keep_N = probes.kept(y_N, ignore)
        logits_GNC = model(x_ND)
        pred_GN = logits_GNC.argmax(dim=-1)
        for g in range(G):
            loss_sum_G[g] += torch.nn.functional.cross_entropy(
                logits_GNC[g][keep_N], y_N[keep_N], reduction="sum"
            ).item()
            conf_GCC[g] += probes.confusion(y_N[keep_N], pred_GN[g][keep_N], n_classes).cpu()
        n_scored += int(keep_N.sum())
        if dataset is not None:
            pred_GIP = pred_GN.view(G, n_imgs, T).cpu().numpy()
            for i in range(n_imgs):
                mask_HW = datasets.centre_square(dataset.mask(start + i))
                true_N = torch.from_numpy(mask_HW.astype(np.int64).ravel())
                keep_px = probes.kept(true_N, ignore)
                for g in range(G):
                    pred_HW = probes.upsample_nearest(pred_GIP[g, i], len(mask_HW))
                    pred_px = torch.from_numpy(pred_HW.astype(np.int64).ravel())
                    pixel_conf_GCC[g] += probes.confusion(
                        true_N[keep_px], pred_px[keep_px], n_classes
                    )
    rows = []
    for g, (lr, wd) in enumerate(cfg.grid):
        conf_CC = conf_GCC[g].numpy()
        row = {
            "lr": lr,
            "weight_decay": wd,
            "loss": loss_sum_G[g].item() / max(n_scored, 1),
            "accuracy": probes.accuracy(conf_CC),
        }
        if cfg.kind == "patch":
            row["mean_iou"] = probes.mean_iou(conf_CC, ignore)
            if dataset is not None:
                row["pixel_accuracy"] = probes.accuracy(pixel_conf_GCC[g].numpy())
                row["pixel_mean_iou"] = probes.mean_iou(pixel_conf_GCC[g].numpy(), ignore)
            per_class = probes.class_iou(conf_CC)
        else:
            per_class = probes.recall(conf_CC)
        prefix = "iou" if cfg.kind == "patch" else "recall"
        row |= {f"{prefix}/{name}": float(per_class[c]) for c, name in enumerate(job.classes)}
        rows.append(row)
    return rows


def selection_key(kind: str):
    """Best first: the highest held-out mean IoU (patch) or accuracy (image), then lowest loss."""
    metric = "mean_iou" if kind == "patch" else "accuracy"

    def key(row: dict) -> tuple[float, float]:
        value = row[metric]
        return (-(value if math.isfinite(value) else -1.0), row["loss"])

    return key


def plot_grid(rows: list[dict], kind: str, title: str, out_fpath: pathlib.Path):
    """Held-out score against learning rate, one line per weight decay, the chosen point ringed."""
    metric = "mean_iou" if kind == "patch" else "accuracy"
    fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
    for wd in sorted({r["weight_decay"] for r in rows}):
        points = sorted((r["lr"], r[metric]) for r in rows if r["weight_decay"] == wd)
        ax.plot(*zip(*points, strict=True), marker="o", label=f"weight decay {wd:g}")
    best = next(r for r in rows if r["best"])
    ax.scatter([best["lr"]], [best[metric]], s=160, facecolors="none", edgecolors="black")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("held-out mean IoU" if metric == "mean_iou" else "held-out accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(out_fpath, dpi=110, format="png")
    plt.close(fig)


def write(job: jobs.ProbeJob, model: probes.StackedProbes, train_loss, rows, out_dpath):
    """Every output atomically; `probe.json` last."""
    out_dpath.mkdir(parents=True, exist_ok=True)
    best_g = min(range(len(rows)), key=lambda g: selection_key(job.probe.kind)(rows[g]))
    rows = [{**row, "best": g == best_g, "train_loss": train_loss[g]} for g, row in enumerate(rows)]
    shards.write_atomic(out_dpath / "metrics.csv", probes.rows_csv(rows).encode())
    tmp_fpath = shards.tmp_sibling(out_dpath / "hparams.png")
    plot_grid(
        rows,
        job.probe.kind,
        f"probe {job.name}: {job.probe.kind}, layer {job.probe.layer}",
        tmp_fpath,
    )
    tmp_fpath.replace(out_dpath / "hparams.png")
    probe = probes.Probe(
        W_DC=model.W_GDC[best_g].detach().cpu().clone(),
        b_C=model.b_GC[best_g].detach().cpu().clone(),
        kind=job.probe.kind,
        layer=job.probe.layer,
        tokens=job.probe.tokens,
        classes=list(job.classes),
        ignore_labels=list(job.probe.ignore_labels),
    )
    probes.save(out_dpath / "probe.pt", probe, {"grid_point": rows[best_g]})
    summary = {"name": job.name, "best": rows[best_g], "n_grid_points": len(rows)}
    summary_json = json.dumps(summary, indent=2, allow_nan=True).replace("NaN", "null")
    shards.write_atomic(out_dpath / jobs.PROBE_FNAME, (summary_json + "\n").encode())


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec-fpath", type=pathlib.Path, required=True, help="a ProbeJob")
    parser.add_argument("--out-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--device", required=True, help="auto, cpu, cuda, ...")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    job = jobs.ProbeJob.read(args.spec_fpath)
    device = helpers.pick_device(args.device)
    model, train_loss = train(job, device)
    rows = score(job, model, device)
    for row in rows:
        logger.info("lr %g wd %g: %s", row["lr"], row["weight_decay"], row)
    write(job, model, train_loss, rows, args.out_dpath)


if __name__ == "__main__":
    main()
