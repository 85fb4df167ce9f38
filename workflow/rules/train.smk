rule train_group:
    """Train every SAE of one sweep group on the same batches, in one job.

    The declared output is group.json, which the step writes last: Snakemake deletes only it when
    a rerun fails, so the previous complete SAEs beside it stay. Checkpoints go to
    results/{sweep}/work/{group}/, so a killed or resubmitted job continues where it stopped.
    """
    input:
        spec=TRAIN.input,
        shards=lambda wc: shards_done(PLAN.sweeps[wc.sweep].train_shards),
    output:
        f"results/{{sweep}}/groups/{{group}}/{jobs.GROUP_FNAME}",
    log:
        "results/logs/train_group/{sweep}/{group}.log",
    benchmark:
        "results/benchmarks/train_group/{sweep}/{group}.tsv"
    conda:
        "../../envs/saev.yaml"
    threads: 4
    params:
        **TRAIN.params,
        out_dpath=lambda wc, output: os.path.dirname(output[0]),
    shell:
        "python -m saev_core.steps.train --spec-fpath {input.spec:q} --out-dpath {params.out_dpath:q}"
        " --device {params.device} > {log} 2>&1"


rule fit_baseline:
    """Fit one baseline dictionary (PCA, k-means or a random SAE) on the training activations;
    its sae.pt, written last, is read by every later step as an SAE's."""
    input:
        spec=BASELINE.input,
        shards=lambda wc: shards_done(PLAN.sweeps[wc.sweep].train_shards),
    output:
        sae="results/{sweep}/baselines/{sae}/sae.pt",
        fit="results/{sweep}/baselines/{sae}/fit.json",
    log:
        "results/logs/fit_baseline/{sweep}/{sae}.log",
    benchmark:
        "results/benchmarks/fit_baseline/{sweep}/{sae}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        **BASELINE.params,
        out_dpath=lambda wc, output: os.path.dirname(output.sae),
    shell:
        "python -m saev_core.steps.baseline --spec-fpath {input.spec:q} --out-dpath {params.out_dpath:q}"
        " --device {params.device} > {log} 2>&1"


rule export_saev:
    """A trained SAE in today's saev layout (schema 5), named by its label: for saev users, and
    readable here as an external SAE."""
    input:
        spec=EXPORT.input,
        sae=lambda wc: sae_input(wc.sweep, PLAN.sweeps[wc.sweep].slugs[wc.slug]),
    output:
        "results/exports/{sweep}/{slug}.saev5.pt",
    log:
        "results/logs/export_saev/{sweep}/{slug}.log",
    benchmark:
        "results/benchmarks/export_saev/{sweep}/{slug}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        **EXPORT.params,
    shell:
        "python -m saev_core.steps.export --spec-fpath {input.spec:q} --out-fpath {output:q}"
        " > {log} 2>&1"
