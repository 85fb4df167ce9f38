"""Planning: the validated config becomes one typed job per rule and wildcard
(saev_core.planning.plan), written to results/specs/; helpers below hand each rule its spec,
inputs and params."""

import pathlib
import types

from saev_core import jobs
from saev_core.planning import reruns
from saev_core.planning import plan as saev_plan

CONFIG_SOURCE = ", ".join(CONFIG_FPATHS)
try:
    saev_plan.validate_config(config)
    # Jobs plan again inside themselves; they reuse the main process's dataset scans.
    # SAEs trained by earlier runs stay in their groups (a grown sweep trains only what is new).
    PLAN = saev_plan.make_plan(
        config, rescan=workflow.is_main_process, workdir=pathlib.Path(".")
    )
except saev_plan.PlanError as err:
    raise WorkflowError(f"{CONFIG_SOURCE}: {err}") from None
if workflow.is_main_process:
    # Only where Snakemake plans, never in a job's own parse of the Snakefile on a compute node.
    reruns.write_specs(PLAN.specs)
    reruns.heal_shard_directories(
        {h: (j.metadata, j.activations.n_parts) for h, j in PLAN.shard_jobs.items()},
        PLAN.workflow.shards_dpath,
        dry_run=workflow.output_settings.dryrun,
    )

SHARDS_DPATH = PLAN.workflow.shards_dpath.rstrip("/")
DEVICE = PLAN.workflow.device


def step_job(step, spec_fpath, code=True):
    """The spec of the job of `python -m saev_core.steps.<step> --spec-fpath SPEC`, for its rule.

    `input` is the spec file, by path only (`ancient`); `params` are the hash of the job's
    identity (a changed setting reruns it, an execution setting or a rewritten equal spec does
    not), the fingerprint of the step's code (`code=False` for steps whose outputs are named by
    their configuration and never rewritten: README, "Specs and reruns"), and the device, derived (it
    takes `input`), so it is not a rerun trigger."""
    params = {
        "spec": lambda wc: PLAN.specs[spec_fpath(wc)].identity_hash(),
        "device": lambda wc, input: DEVICE,
    }
    if code:
        params["code"] = reruns.code_fingerprint(step)
    return types.SimpleNamespace(
        input=lambda wc: ancient(spec_fpath(wc)), params=params
    )


SYNTHETIC = step_job(
    "synthetic", lambda wc: saev_plan.dataset_spec_fpath(wc.dataset), code=False
)
DUMP = step_job(
    "dump",
    lambda wc: saev_plan.dump_spec_fpath(wc.shards, int(wc.part), int(wc.n_parts)),
    code=False,
)
PUBLISH = step_job(
    "dump", lambda wc: saev_plan.publish_spec_fpath(wc.shards), code=False
)
TRAIN = step_job(
    "train", lambda wc: saev_plan.sweep_spec_fpath(wc.sweep, "groups", wc.group)
)
BASELINE = step_job(
    "baseline", lambda wc: saev_plan.sweep_spec_fpath(wc.sweep, "baselines", wc.sae)
)
TRAITS = step_job(
    "traits", lambda wc: saev_plan.sweep_spec_fpath(wc.sweep, "traits", wc.sae)
)
EVALUATE = step_job(
    "evaluate", lambda wc: saev_plan.sweep_spec_fpath(wc.sweep, "evaluate", wc.sae)
)
TOPK = step_job("topk", lambda wc: saev_plan.sweep_spec_fpath(wc.sweep, "topk", wc.sae))
RENDER = step_job(
    "render", lambda wc: saev_plan.sweep_spec_fpath(wc.sweep, "render", wc.sae)
)
EXPORT = step_job(
    "export", lambda wc: saev_plan.sweep_spec_fpath(wc.sweep, "export", wc.slug)
)
SUMMARIZE = step_job("summarize", lambda wc: saev_plan.summary_spec_fpath(wc.sweep))
PROBE = step_job("probe", lambda wc: saev_plan.probe_spec_fpath(wc.probe))
INTERVENE = step_job(
    "intervene",
    lambda wc: saev_plan.intervention_spec_fpath(wc.sweep, wc.intervention, wc.sae),
)


# Tiny steps run where Snakemake runs, never as cluster jobs.
localrules:
    all,
    synthetic_dataset,
    shards_published,
    summarize_sweep,


wildcard_constraints:
    dataset="[A-Za-z0-9_.-]+",
    shards="[0-9a-f]{64}|[0-9a-f]{8}",  # protocol 1's SHA-256; 2.1's 8 digits (saev's rule)
    sweep="[A-Za-z0-9_.-]+",
    group=r"layer-?\d+-[0-9a-f]{8}",
    sae="[0-9a-f]{10}",
    slug=r"[A-Za-z0-9_.=+-]+",
    probe="[A-Za-z0-9_.-]+",
    intervention="[A-Za-z0-9_.-]+",
    part=r"\d+",
    n_parts=r"\d+",


def shards_done(shards_hash):
    """What steps that read a shard directory wait for: a token the publish step writes beside
    `shards.json`, outside the (purgeable, scratch) shard directory. `ancient`, and it survives a
    purge: a re-dump (same bytes, so the same name) reruns nothing downstream."""
    return ancient(f"results/shards-published/{shards_hash}.done")


def shards_dpath(shards_hash):
    return f"{SHARDS_DPATH}/{shards_hash}"


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
        f"{SHARDS_DPATH}/{wildcards.shards}/{reruns.part_marker_fname(part, n_parts)}"
        for part in range(n_parts)
    ]


def sae_input(sweep_name, sae_id):
    """What steps that read an SAE wait for: its group's training job, the file of an external
    SAE (which the export rule makes, where it is an export), or a baseline's fitted file.
    """
    sweep = PLAN.sweeps[sweep_name]
    if sae_id in sweep.externals or sae_id in sweep.baselines:
        return sweep.sae_fpath(sae_id)
    return f"{saev_plan.group_dpath(sweep_name, sweep.sae_group[sae_id])}/{jobs.GROUP_FNAME}"


def get_sae_input(wildcards):
    return sae_input(wildcards.sweep, wildcards.sae)


def intervention_probe(wildcards):
    """The probe an intervention of a sweep measures with."""
    sweep = PLAN.sweeps[wildcards.sweep]
    (intervention,) = [
        i for i in sweep.cfg.interventions if i.name == wildcards.intervention
    ]
    return intervention.probe


def get_report_labels(view):
    """Report labels of one SAE's item: its readable label, its id and what the item shows."""

    def labels(wildcards):
        label = PLAN.sweeps[wildcards.sweep].labels[wildcards.sae]
        return {"SAE": label, "id": wildcards.sae, "view": view}

    return labels


def get_all_outputs():
    # Every shard directory's own completion marker: a purged or damaged directory (see
    # reruns.heal_shard_directories) is dumped and published again.
    outputs = [f"{shards_dpath(h)}/shards.json" for h in PLAN.shard_jobs]
    for probe in PLAN.probes:
        outputs += [
            f"results/probes/{probe}/{fname}"
            for fname in ("probe.pt", "metrics.csv", "hparams.png", jobs.PROBE_FNAME)
        ]
    for name, sweep in PLAN.sweeps.items():
        for intervention, sae_ids in sweep.interventions.items():
            for sae_id in sae_ids:
                dpath = saev_plan.intervention_dpath(name, sae_id, intervention)
                outputs += [
                    f"{dpath}/{fname}"
                    for fname in (
                        "class_latents.csv",
                        "effects.csv",
                        "effects.png",
                        "interventions.html",
                        jobs.INTERVENTION_FNAME,
                    )
                ]
        outputs += [
            f"results/{name}/{fname}"
            for fname in ("summary.csv", "pareto.png", "verdict.csv")
        ]
        outputs += [
            f"{saev_plan.baseline_dpath(name, b)}/fit.json" for b in sweep.baselines
        ]
        # A group whose rerun failed shows as still to train (saev_core.planning.keep keeps
        # its previous SAEs instead), never as a hidden retrain the next downstream change needs.
        outputs += [
            f"{saev_plan.group_dpath(name, group_id)}/{jobs.GROUP_FNAME}"
            for group_id in sweep.groups
        ]
        # Every file of every SAE, intermediate ones too: one lost (an OOM-killed top-k job,
        # a hand-deleted metrics.json) is made again by the next run, not met later as missing.
        for sae_id in sweep.sae_ids:
            sae_dpath = f"results/{name}/saes/{sae_id}"
            if sweep.traits_run(sae_id):
                outputs += [f"{sae_dpath}/traits.csv", f"{sae_dpath}/traits.json"]
            outputs += [
                f"{sae_dpath}/{fname}"
                for fname in (
                    "metrics.json",
                    "latents.npz",
                    "concept_candidates.csv",
                    "topk.npz",
                    "histograms.png",
                    "concepts.csv",
                    "features",
                    "browser.html",
                    "grid.jpg",
                )
            ]
    return outputs
