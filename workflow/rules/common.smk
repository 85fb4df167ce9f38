"""Planning helpers: what to run, derived once from the validated config by saev_core.plan."""

import json
import shlex

from saev_core import plan as saev_plan

try:
    PLAN = saev_plan.make_plan(config)
except saev_plan.PlanError as err:
    raise WorkflowError(f"config/experiments.yaml: {err}") from None

SHARDS_DPATH = config["shards_dpath"].rstrip("/")
DEVICE = config["device"]


wildcard_constraints:
    dataset="[A-Za-z0-9_.-]+",
    shards="[0-9a-f]{64}",
    sweep="[A-Za-z0-9_.-]+",
    group=r"layer-?\d+-[0-9a-f]{8}",
    sae="[0-9a-f]{10}",
    part=r"\d+",
    n_parts=r"\d+",


def shards_done(shards_hash):
    """The completion marker of a shard directory: published last, atomically."""
    return f"{SHARDS_DPATH}/{shards_hash}/shards.json"


def get_dataset_input(dataset):
    """Generated datasets are produced by a rule; external ones are just read."""
    if PLAN.datasets[dataset]["kind"] == "synthetic":
        return f"results/datasets/{dataset}"
    return []


def get_dump_dataset(wildcards):
    return get_dataset_input(PLAN.shard_jobs[wildcards.shards].dataset)


def get_dump_parts(wildcards):
    n_parts = PLAN.shard_jobs[wildcards.shards].n_parts
    return [
        f"results/dump-parts/{wildcards.shards}/part{part}-of-{n_parts}.done"
        for part in range(n_parts)
    ]


def get_shard_metadata_json(wildcards):
    return json.dumps(PLAN.shard_jobs[wildcards.shards].metadata.to_dict())


def get_shard_dataset_json(wildcards):
    return json.dumps(PLAN.datasets[PLAN.shard_jobs[wildcards.shards].dataset])


def get_group_dpath(wildcards):
    sweep = PLAN.sweeps[wildcards.sweep]
    return f"results/{wildcards.sweep}/groups/{sweep.sae_group[wildcards.sae]}"


def get_wandb_args(wildcards):
    project = PLAN.sweeps[wildcards.sweep].wandb_project
    return f"--wandb-project {shlex.quote(project)}" if project else ""


def get_sweep_model(wildcards):
    """The ViT a sweep's SAEs read, as family:checkpoint."""
    md = PLAN.shard_jobs[PLAN.sweeps[wildcards.sweep].train_shards].metadata
    return f"{md.vit_family}:{md.vit_ckpt}"


def get_eval_dataset(wildcards):
    return PLAN.shard_jobs[PLAN.sweeps[wildcards.sweep].eval_shards].dataset


def get_group_json(wildcards):
    sweep = PLAN.sweeps[wildcards.sweep]
    group = sweep.groups[wildcards.group]
    saes = {sae_id: sweep.saes[sae_id] for sae_id in group.sae_ids}
    return json.dumps({"stream": group.stream, "saes": saes}, sort_keys=True)


def get_report_labels(view):
    """Report labels of one SAE's item: its readable label, its id and what the item shows."""

    def labels(wildcards):
        label = PLAN.sweeps[wildcards.sweep].labels[wildcards.sae]
        return {"SAE": label, "id": wildcards.sae, "view": view}

    return labels


def get_all_outputs():
    outputs = []
    for name, sweep in PLAN.sweeps.items():
        outputs += [f"results/{name}/summary.csv", f"results/{name}/pareto.png"]
        for sae_id in sweep.saes:
            sae_dpath = f"results/{name}/saes/{sae_id}"
            outputs += [
                f"{sae_dpath}/{fname}"
                for fname in (
                    "histograms.png",
                    "concepts.csv",
                    "features",
                    "browser.html",
                    "grid.jpg",
                )
            ]
    return outputs
