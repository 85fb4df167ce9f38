"""Fit one baseline dictionary (PCA, k-means or a random SAE) on a sweep's training activations.

Run as `python -m saev_core.steps.baseline --spec-fpath results/specs/sweeps/<sweep>/baselines/<id>.json
--out-dpath results/<sweep>/baselines/<id> --device auto`, the spec a `jobs.FitBaselineJob`.
Batches stream from the shards as in training (`loaders.ShuffledLoader`, the baseline's own
budget and seed). Writes `fit.json` (what the fit measured) and then `sae.pt`, the rule's output,
in the same layout as a trained SAE's, so every later step reads it as it reads an SAE.
"""

import argparse
import json
import logging
import pathlib

from .. import baselines, helpers, jobs, loaders, sae, shards

logger = logging.getLogger("baseline")


def fit(job: jobs.FitBaselineJob, device) -> baselines.Fit:
    baseline = job.baseline
    reader = shards.ShardReader(job.shards_dpath)
    d_vit = reader.metadata.d_vit
    batches = loaders.ShuffledLoader(
        reader,
        baseline.layer,
        baseline.tokens,
        baseline.batch_size,
        baseline.n_train,
        baseline.seed,
    )
    if baseline.kind == "pca":
        return baselines.fit_pca(baseline, d_vit, loaders.ToDevice(batches, device))
    if baseline.kind == "kmeans":
        return baselines.fit_kmeans(
            baseline, d_vit, loaders.ToDevice(batches, device), len(batches), device
        )
    return baselines.random_sae(baseline, d_vit, next(iter(batches)))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec-fpath", type=pathlib.Path, required=True, help="a FitBaselineJob")
    parser.add_argument("--out-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--device", required=True, help="auto, cpu, cuda, ...")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    job = jobs.FitBaselineJob.read(args.spec_fpath)
    result = fit(job, helpers.pick_device(args.device))
    args.out_dpath.mkdir(parents=True, exist_ok=True)
    summary = {"baseline": job.to_dict()["baseline"], **result.summary}
    shards.write_atomic(
        args.out_dpath / "fit.json", (json.dumps(summary, indent=1) + "\n").encode()
    )
    train = {
        "layer": job.baseline.layer,
        "tokens": job.baseline.tokens,
        "baseline": job.baseline.kind,
    }
    sae.save(args.out_dpath / "sae.pt", result.model, train=train)
    logger.info("fitted %s on %d vectors", job.baseline.label, result.summary["n_vectors"])


if __name__ == "__main__":
    main()
