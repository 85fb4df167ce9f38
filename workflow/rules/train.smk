rule train_group:
    """Train every SAE of one sweep group on the same batches, in one job.

    Checkpoints go to results/{sweep}/work/{group}/, outside the declared output (which Snakemake
    removes after a failure), so a killed or resubmitted job continues where it stopped.
    """
    input:
        spec=lambda wc: spec_input(saev_plan.group_spec_fpath(wc.sweep, wc.group)),
        shards=lambda wc: shards_done(PLAN.sweeps[wc.sweep].train_shards),
    output:
        directory("results/{sweep}/groups/{group}"),
    log:
        "results/logs/train_group/{sweep}/{group}.log",
    benchmark:
        "results/benchmarks/train_group/{sweep}/{group}.tsv"
    conda:
        "../../envs/saev.yaml"
    threads: 4
    params:
        spec=lambda wc: saev_plan.spec_hash(PLAN.sweeps[wc.sweep].group_spec(wc.group)),
        code=CODE["train"],
        shards_dpath=get_sweep_shards_dpath("train_shards"),
        work_dpath=lambda wc: f"results/{wc.sweep}/work/{wc.group}",
        checkpoint_every=lambda wc: PLAN.sweeps[wc.sweep].cfg.checkpoint_every,
        wandb=get_wandb_args,
        device=DEVICE,
    shell:
        "python -m saev_core.train --spec-fpath {input.spec:q}"
        " --shards-dpath {params.shards_dpath:q} --out-dpath {output:q}"
        " --work-dpath {params.work_dpath:q} --checkpoint-every {params.checkpoint_every}"
        " --device {params.device} {params.wandb} > {log} 2>&1"


rule export_saev:
    """A trained SAE in today's saev layout (schema 5), named by its label: for saev users, and
    readable here as an external SAE."""
    input:
        lambda wc: sae_input(wc.sweep, PLAN.sweeps[wc.sweep].slugs[wc.slug]),
    output:
        "results/exports/{sweep}/{slug}.saev5.pt",
    log:
        "results/logs/export_saev/{sweep}/{slug}.log",
    benchmark:
        "results/benchmarks/export_saev/{sweep}/{slug}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        code=CODE["export"],
        sae_fpath=lambda wc, input: PLAN.sweeps[wc.sweep].sae_fpath(
            PLAN.sweeps[wc.sweep].slugs[wc.slug]
        ),
    shell:
        "python -m saev_core.export --to saev-schema5 {params.sae_fpath:q} {output:q} > {log} 2>&1"
