"""Planning: the validated config becomes typed job specs (saev_core.plan), written to
results/specs/; helpers below hand each rule its inputs and params."""

import shlex

from saev_core import plan as saev_plan

CONFIG_SOURCE = ", ".join(CONFIG_FPATHS)
try:
    saev_plan.validate_config(config)
    # Jobs plan again inside themselves; they reuse the main process's dataset scans.
    PLAN = saev_plan.make_plan(config, rescan=workflow.is_main_process)
except saev_plan.PlanError as err:
    raise WorkflowError(f"{CONFIG_SOURCE}: {err}") from None
saev_plan.write_specs(PLAN)
saev_plan.heal_shard_directories(PLAN)

SHARDS_DPATH = PLAN.workflow.shards_dpath.rstrip("/")
DEVICE = PLAN.workflow.device
# Each step's code: a rule reruns when the saev_core modules its step imports change. Not the
# dump's: shard directories (and generated datasets) are named by their configuration and never
# rewritten; after changing code that alters their bytes, delete them (README, "Reruns").
CODE = {
    step: saev_plan.code_fingerprint(step)
    for step in ("train", "evaluate", "summarize", "topk", "render", "export")
}


# Tiny steps run where Snakemake runs, never as cluster jobs.
localrules:
    all,
    synthetic_dataset,
    summarize_sweep,


wildcard_constraints:
    dataset="[A-Za-z0-9_.-]+",
    shards="[0-9a-f]{64}",
    sweep="[A-Za-z0-9_.-]+",
    group=r"layer-?\d+-[0-9a-f]{8}",
    sae="[0-9a-f]{10}",
    slug=r"[A-Za-z0-9_.=+-]+",
    part=r"\d+",
    n_parts=r"\d+",


def shards_done(shards_hash):
    """What steps that read a shard directory wait for: a token the publish step writes beside
    `shards.json`, outside the (purgeable, scratch) shard directory. `ancient`, and it survives a
    purge: a re-dump (same bytes, so the same name) reruns nothing downstream."""
    return ancient(f"results/shards-published/{shards_hash}.done")


def shards_dpath(shards_hash):
    return f"{SHARDS_DPATH}/{shards_hash}"


def get_sweep_shards_dpath(which):
    """The `train_shards` or `eval_shards` directory of the job's sweep. The param function takes
    `input`, which makes Snakemake count it as derived, not a rerun trigger: moving
    `shards_dpath` to another disk retrains nothing."""

    def dpath(wildcards, input):
        return shards_dpath(getattr(PLAN.sweeps[wildcards.sweep], which))

    return dpath


def spec_input(fpath):
    """Spec files are inputs by path only: their content reaches the rule as a `spec` param."""
    return ancient(fpath)


def get_shards_spec(wildcards):
    return spec_input(saev_plan.shards_spec_fpath(wildcards.shards))


def get_shards_spec_hash(wildcards):
    return saev_plan.spec_hash(PLAN.shard_jobs[wildcards.shards].spec)


def get_dataset_input(dataset):
    """Generated datasets are produced by a rule (deterministic from their seed); external ones
    are just read."""
    if PLAN.datasets[dataset]["kind"] == "synthetic":
        return ancient(f"results/datasets/{dataset}")
    return []


def get_dump_dataset(wildcards):
    return get_dataset_input(PLAN.shard_jobs[wildcards.shards].dataset)


def get_dump_parts(wildcards):
    n_parts = PLAN.shard_jobs[wildcards.shards].activations.n_parts
    return [
        f"{SHARDS_DPATH}/{wildcards.shards}/{saev_plan.part_marker_fname(part, n_parts)}"
        for part in range(n_parts)
    ]


def sae_input(sweep_name, sae_id):
    """What steps that read an SAE wait for: its group's training job, or the file of an
    external SAE (which the export rule makes, where it is an export)."""
    sweep = PLAN.sweeps[sweep_name]
    if sae_id in sweep.externals:
        return sweep.externals[sae_id].fpath
    return f"results/{sweep_name}/groups/{sweep.sae_group[sae_id]}"


def get_sae_input(wildcards):
    return sae_input(wildcards.sweep, wildcards.sae)


def get_sae_fpath(wildcards, input):
    """The SAE's checkpoint (derived: it takes `input`, so it is not a rerun trigger)."""
    return PLAN.sweeps[wildcards.sweep].sae_fpath(wildcards.sae)


def get_layer(wildcards):
    return PLAN.sweeps[wildcards.sweep].layer_tokens(wildcards.sae)[0]


def get_tokens(wildcards):
    return PLAN.sweeps[wildcards.sweep].layer_tokens(wildcards.sae)[1]


def get_wandb_args(wildcards):
    project = PLAN.sweeps[wildcards.sweep].cfg.wandb_project
    return f"--wandb-project {shlex.quote(project)}" if project else ""


def get_report_labels(view):
    """Report labels of one SAE's item: its readable label, its id and what the item shows."""

    def labels(wildcards):
        label = PLAN.sweeps[wildcards.sweep].labels[wildcards.sae]
        return {"SAE": label, "id": wildcards.sae, "view": view}

    return labels


def get_all_outputs():
    # Every shard directory's own completion marker: a purged or damaged directory (see
    # saev_plan.heal_shard_directories) is dumped and published again.
    outputs = [f"{shards_dpath(h)}/shards.json" for h in PLAN.shard_jobs]
    for name, sweep in PLAN.sweeps.items():
        outputs += [f"results/{name}/summary.csv", f"results/{name}/pareto.png"]
        for sae_id in sweep.sae_ids:
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
