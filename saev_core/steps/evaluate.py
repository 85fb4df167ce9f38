"""Evaluate one SAE on held-out activations (SPEC §7).

Run as `python -m saev_core.steps.evaluate --spec-fpath SPEC --out-dpath results/<sweep>/saes/<sae>
--device auto`, the spec a `jobs.EvaluateJob`: the SAE (any checkpoint layout, ours or saev's),
the held-out shard directory, the layer and token kind the SAE reads, and the dataset, whose
class names label concepts. Writes `metrics.json` (scalars, one sweep-table row), `latents.npz`
(per-latent
firing frequency and mean value when firing), `histograms.png`, `concepts.csv` (per label
class, the latent that predicts it best; empty where the shards have no `labels.bin`) and
`concept_candidates.csv` (every scored class-latent pair with its rank in the class, which the
feature browser uses to say what a latent means).

Shape key: N = vectors, T = tokens per image, D = d_vit, F = d_sae, U = candidate latents.
"""

import argparse
import csv
import io
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

from .. import concepts, datasets, helpers, jobs, loaders, sae, shards  # noqa: E402

logger = logging.getLogger("evaluate")
ALMOST_DEAD_FREQ = 1e-7
DENSE_FREQ = 1e-2
N_CANDIDATES = 8
CANDIDATE_BYTES = 2**29
"""Memory for candidate latents' values in the concept pass; more candidates take more passes."""


class Evaluation(typing.NamedTuple):
    metrics: dict
    """Scalars: one row of the sweep table."""
    freq_F: np.ndarray
    """Fraction of vectors on which each latent fires."""
    mean_value_F: np.ndarray
    """Mean activation where it fires (0 if never)."""
    concepts: list[concepts.Concept]
    """Every scored (class, candidate latent) pair, ranked within its class; empty without
    patch labels. The rank-1 pairs are the best latent per class."""


def encoded(model: sae.SparseAutoencoder, reader, layer: int, tokens: str):
    """(first image, number of images, x_ND, f_x_NF) per chunk of whole images, in disk order."""
    device = model.b_dec.device
    for start, x_NTD in loaders.OrderedLoader(reader, layer, tokens):
        x_ND = torch.from_numpy(x_NTD.reshape(-1, model.cfg.d_vit)).to(device)
        yield start, len(x_NTD), x_ND, model.encode(x_ND)


@torch.no_grad()
def evaluate(
    model: sae.SparseAutoencoder,
    reader: shards.ShardReader,
    layer: int,
    tokens: str,
    class_names: list[str] | None = None,
    n_candidates: int = N_CANDIDATES,
    ignore_labels: tuple[int, ...] = (),
) -> Evaluation:
    """Reconstruction, sparsity and (with patch labels and class names) concept recovery over
    every vector of `layer` in the shards, but those of the classes `ignore_labels` (the
    patches the SAE was trained without)."""
    d_sae, d_vit = model.cfg.d_sae, model.cfg.d_vit
    if ignore_labels and (tokens != "patches" or reader.labels() is None):
        raise shards.ShardError(f"ignore_labels needs patches and labels.bin in {reader.dpath}")
    labels = reader.labels() if tokens == "patches" and (class_names or ignore_labels) else None
    class_stats = None
    if labels is not None and class_names:
        class_stats = concepts.ClassStats(d_sae, len(class_names), model.b_dec.device)
    ignore_I = torch.tensor(ignore_labels, dtype=torch.long, device=model.b_dec.device)
    n, sq_err, l0, l1 = 0, 0.0, 0.0, 0.0
    sum_x_D = torch.zeros(d_vit, dtype=torch.float64)
    sum_xx_D = torch.zeros(d_vit, dtype=torch.float64)
    fires_F = torch.zeros(d_sae, dtype=torch.float64)
    sums_F = torch.zeros(d_sae, dtype=torch.float64)
    for start, n_imgs, x_ND, f_x_NF in encoded(model, reader, layer, tokens):
        if labels is not None:
            labels_N = torch.from_numpy(np.array(labels[start : start + n_imgs]).reshape(-1))
            labels_N = labels_N.long().to(f_x_NF.device)
            if ignore_labels:
                keep_N = ~torch.isin(labels_N, ignore_I)
                x_ND, f_x_NF, labels_N = x_ND[keep_N], f_x_NF[keep_N], labels_N[keep_N]
        x_hat_ND = model.decode(f_x_NF)
        n += len(x_ND)
        sq_err += (x_hat_ND - x_ND).pow(2).sum().item()
        l0 += (f_x_NF > 0).sum().item()
        l1 += f_x_NF.sum().item()
        fires_F += (f_x_NF > 0).sum(dim=0).double().cpu()
        sums_F += f_x_NF.sum(dim=0).double().cpu()
        sum_x_D += x_ND.sum(dim=0).double().cpu()
        sum_xx_D += x_ND.double().pow(2).sum(dim=0).cpu()
        if class_stats is not None:
            class_stats.update(f_x_NF, labels_N)
    total_var = (sum_xx_D - sum_x_D.pow(2) / n).sum().item()
    freq_F = fires_F / n
    mean_value_F = torch.where(fires_F > 0, sums_F / fires_F.clamp(min=1), 0.0)
    nmse = sq_err / total_var if total_var > 0 else None  # constant inputs: undefined
    metrics = {
        "n_vectors": n,
        "d_sae": d_sae,
        "l0": l0 / n,
        "l1": l1 / n,
        "mse": sq_err / (n * d_vit),
        "normalized_mse": nmse,
        "explained_variance": None if nmse is None else 1.0 - nmse,
        "n_dead": int((fires_F == 0).sum()),
        "n_almost_dead": int((freq_F < ALMOST_DEAD_FREQ).sum()),
        "n_dense": int((freq_F > DENSE_FREQ).sum()),
    }
    ranked = []
    if class_stats is not None:
        ranked = recover_concepts(
            model, reader, layer, class_stats, class_names, n_candidates, ignore_I
        )
    found = concepts.best_latents(ranked)
    metrics["n_concept_classes"] = len(found)
    metrics["mean_best_ap"] = float(np.mean([c.ap for c in found])) if found else None
    metrics["mean_best_f1"] = float(np.mean([c.f1 for c in found])) if found else None
    return Evaluation(metrics, freq_F.numpy(), mean_value_F.numpy(), ranked)


def recover_concepts(
    model: sae.SparseAutoencoder,
    reader: shards.ShardReader,
    layer: int,
    class_stats: concepts.ClassStats,
    class_names: list[str],
    n_candidates: int,
    ignore_I: torch.Tensor,
) -> list[concepts.Concept]:
    """Score each class's candidate latents exactly, in as many passes as memory needs; return
    every scored pair, ranked within its class. Patches of the classes `ignore_I` are left out."""
    candidates = class_stats.candidates(n_candidates)
    latents = sorted({f for fs in candidates.values() for f in fs})
    device = model.b_dec.device
    labels_N = torch.from_numpy(np.array(reader.labels()).reshape(-1)).long().to(device)
    keep_N = ~torch.isin(labels_N, ignore_I)
    labels_N = labels_N[keep_N]
    per_pass = max(1, CANDIDATE_BYTES // (4 * class_stats.n))
    scores = {}
    for lo in range(0, len(latents), per_pass):
        latents_U = latents[lo : lo + per_pass]
        columns = torch.tensor(latents_U, device=device)
        values_NU = torch.cat(
            [f_x_NF[:, columns] for *_, f_x_NF in encoded(model, reader, layer, "patches")]
        )[keep_N]
        scores |= concepts.score_candidates(candidates, values_NU, latents_U, labels_N)
    logger.info("scored %d candidate latents for %d classes", len(latents), len(candidates))
    return concepts.ranked_candidates(candidates, scores, class_stats.n_pos_C.cpu(), class_names)


CONCEPT_COLUMNS = ("class", "name", "n_patches", "latent", "average_precision", "best_f1", "rank")


def concepts_csv(rows: list[concepts.Concept], with_rank: bool) -> str:
    """`concepts.csv` (best latent per class) or, `with_rank`, `concept_candidates.csv`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CONCEPT_COLUMNS if with_rank else CONCEPT_COLUMNS[:-1])
    for c in rows:
        row = [c.cls, c.name, c.n_patches, c.latent, f"{c.ap:.6f}", f"{c.f1:.6f}", c.rank]
        writer.writerow(row if with_rank else row[:-1])
    return out.getvalue()


def plot_histograms(result: Evaluation, title: str, out_fpath: pathlib.Path):
    """log10 firing frequency and log10 mean value of the latents that fire; dead ones counted."""
    fired = result.freq_F > 0
    fig, axes = plt.subplots(1, 2, figsize=(8, 3), layout="constrained")
    n_dead = int((~fired).sum())
    for ax, values, xlabel in [
        (axes[0], result.freq_F[fired], "log10 firing frequency"),
        (axes[1], result.mean_value_F[fired], "log10 mean value when firing"),
    ]:
        if len(values):
            ax.hist(np.log10(values), bins=min(50, max(5, int(math.sqrt(len(values))))))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("latents")
    axes[0].axvline(math.log10(DENSE_FREQ), color="grey", ls="--", lw=1)
    fig.suptitle(f"{title} ({n_dead} of {len(fired)} latents never fired)", fontsize=9)
    fig.savefig(out_fpath, dpi=100, format="png")
    plt.close(fig)


def finite_or_null(metrics: dict) -> dict:
    """NaN and infinity are not JSON: a metric that is not a finite number is written as null."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()
    }


def write(result: Evaluation, title: str, out_dpath: pathlib.Path):
    """Every output atomically; `metrics.json` last."""
    out_dpath.mkdir(parents=True, exist_ok=True)
    tmp_fpath = shards.tmp_sibling(out_dpath / "latents.npz")
    with open(tmp_fpath, "wb") as fd:
        np.savez(fd, freq=result.freq_F, mean_value=result.mean_value_F)
    tmp_fpath.replace(out_dpath / "latents.npz")
    tmp_fpath = shards.tmp_sibling(out_dpath / "histograms.png")
    plot_histograms(result, title, tmp_fpath)
    tmp_fpath.replace(out_dpath / "histograms.png")
    best = concepts.best_latents(result.concepts)
    shards.write_atomic(out_dpath / "concepts.csv", concepts_csv(best, with_rank=False).encode())
    candidates_csv = concepts_csv(result.concepts, with_rank=True)
    shards.write_atomic(out_dpath / "concept_candidates.csv", candidates_csv.encode())
    metrics_json = json.dumps(finite_or_null(result.metrics), indent=2, allow_nan=False) + "\n"
    shards.write_atomic(out_dpath / "metrics.json", metrics_json.encode())


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec-fpath", type=pathlib.Path, required=True, help="an EvaluateJob")
    parser.add_argument("--out-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--device", required=True, help="auto, cpu, cuda, ...")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    job = jobs.EvaluateJob.read(args.spec_fpath)
    sae_fpath = pathlib.Path(job.sae_fpath)
    model = sae.load(sae_fpath, helpers.pick_device(args.device))
    reader = shards.ShardReader(job.shards_dpath)
    class_names = None
    if reader.labels() is not None:
        class_names = datasets.load(job.dataset).classes
        reader.check_labels(class_names)
    result = evaluate(
        model, reader, job.layer, job.tokens, class_names, ignore_labels=job.ignore_labels
    )
    logger.info("%s", result.metrics)
    write(result, f"SAE {sae_fpath.parent.name}", args.out_dpath)


if __name__ == "__main__":
    main()
