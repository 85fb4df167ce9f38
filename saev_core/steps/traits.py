"""saev's trait-discovery metrics of one SAE or baseline (`saev_core.traits` defines them).

Run as `python -m saev_core.steps.traits --spec-fpath SPEC --out-dpath results/<sweep>/saes/<sae>
--device auto`, the spec a `jobs.TraitsJob`: the SAE, the training and held-out shard
directories (both with `labels.bin`), the layer and the class names. Fits the per (latent,
class) probes on the training patches, scores each class's best latent on the held-out ones,
and writes `traits.csv` (one row per class) and then `traits.json` (the sweep-table scalars).
"""

import argparse
import csv
import io
import json
import logging
import pathlib

import numpy as np
import torch

from .. import helpers, jobs, sae, shards, traits
from .evaluate import encoded, finite_or_null

logger = logging.getLogger("traits")
EVENT_BYTES_EACH = 8 + 8 + 8
"""Patch index, latent index (int64) and value (float64) of one kept event."""


def label_chunks(model: sae.SparseAutoencoder, reader: shards.ShardReader, layer: int):
    """(f_x_NF, labels_N) per chunk of whole images of the shards' patches, in disk order."""
    labels_NP = reader.labels()
    device = model.b_dec.device
    for start, n_imgs, _, f_x_NF in encoded(model, reader, layer, "patches"):
        labels_N = torch.from_numpy(np.array(labels_NP[start : start + n_imgs]).reshape(-1))
        yield f_x_NF, labels_N.to(device)


def training_events(model, reader, layer, probes: traits.Probes1d):
    """The counting pass, and what later passes read: the kept events, or (too many to keep)
    a function that encodes the shards again."""
    kept, n_events = [], 0
    for f_x_NF, labels_N in label_chunks(model, reader, layer):
        events = traits.events_of(f_x_NF, labels_N)
        probes.count(events)
        n_events += len(events.latent_E)
        if kept is not None:
            kept.append(events)
            if n_events * EVENT_BYTES_EACH > traits.EVENT_BYTES:
                kept = None  # re-encode each pass instead
    if kept is not None:
        return n_events, lambda: kept
    logger.info("%d events do not fit in memory: every pass encodes the shards again", n_events)
    return n_events, lambda: (
        traits.events_of(*chunk) for chunk in label_chunks(model, reader, layer)
    )


CSV_COLUMNS = (
    "class", "name", "latent", "w", "b", "train_ce", "eval_ce", "eval_base_ce",
    "average_precision", f"purity_{traits.PURITY_K}", "top_label",
)  # fmt: skip


def rows_csv(rows: list[traits.ClassTraits], classes: tuple[str, ...]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        numbers = (r.w, r.b, r.train_ce, r.eval_ce, r.eval_base_ce, r.ap, r.purity)
        writer.writerow(
            [r.cls, classes[r.cls], r.latent, *(f"{v:.6g}" for v in numbers), classes[r.top_label]]
        )
    return out.getvalue()


@torch.no_grad()
def measure(job: jobs.TraitsJob, model: sae.SparseAutoencoder):
    train_reader = shards.ShardReader(job.train_shards_dpath)
    eval_reader = shards.ShardReader(job.eval_shards_dpath)
    for reader in (train_reader, eval_reader):
        reader.check_labels(list(job.classes))
    device = model.b_dec.device
    probes = traits.Probes1d(model.cfg.d_sae, len(job.classes), device)
    n_events, chunks = training_events(model, train_reader, job.layer, probes)
    eval_labels_N = torch.from_numpy(np.array(eval_reader.labels()).reshape(-1)).long()
    eval_pos_C = torch.bincount(eval_labels_N, minlength=len(job.classes))
    classes = [c for c in range(len(job.classes)) if probes.n_pos_C[c] > 0 and eval_pos_C[c] > 0]
    fit = probes.fit(chunks)
    logger.info("fitted %d x %d probes on %d events: %s", probes.F, probes.C, n_events, fit)
    best_C = probes.best_latents(classes)
    eval_values_NC = torch.cat(
        [f[:, best_C].cpu() for f, _ in label_chunks(model, eval_reader, job.layer)]
    )
    rows = traits.score_classes(probes, classes, eval_values_NC, eval_labels_N)
    train_base_C = traits.base_ce(probes.n_pos_C[classes].cpu(), probes.n)
    scalars = {
        **traits.summary(rows, train_base_C),
        "n_train_patches": probes.n,
        "n_eval_patches": len(eval_labels_N),
        **fit,
    }
    return rows, scalars


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec-fpath", type=pathlib.Path, required=True, help="a TraitsJob")
    parser.add_argument("--out-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--device", required=True, help="auto, cpu, cuda, ...")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    job = jobs.TraitsJob.read(args.spec_fpath)
    model = sae.load(pathlib.Path(job.sae_fpath), helpers.pick_device(args.device))
    rows, scalars = measure(job, model)
    logger.info("%s", scalars)
    args.out_dpath.mkdir(parents=True, exist_ok=True)
    shards.write_atomic(args.out_dpath / "traits.csv", rows_csv(rows, job.classes).encode())
    text = json.dumps(finite_or_null(scalars), indent=2, allow_nan=False) + "\n"
    shards.write_atomic(args.out_dpath / "traits.json", text.encode())


if __name__ == "__main__":
    main()
