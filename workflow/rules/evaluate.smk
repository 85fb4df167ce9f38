rule evaluate_sae:
    """Metrics, per-latent statistics and concept recovery of one SAE on held-out activations."""
    input:
        spec=EVALUATE.input,
        sae=get_sae_input,
        shards=lambda wc: shards_done(PLAN.sweeps[wc.sweep].eval_shards),
    output:
        metrics="results/{sweep}/saes/{sae}/metrics.json",
        latents="results/{sweep}/saes/{sae}/latents.npz",
        histograms=report(
            "results/{sweep}/saes/{sae}/histograms.png",
            caption="../report/histograms.rst",
            category="Evaluation",
            subcategory="{sweep}",
            labels=get_report_labels("latent histograms"),
        ),
        concepts=report(
            "results/{sweep}/saes/{sae}/concepts.csv",
            caption="../report/concepts.rst",
            category="Evaluation",
            subcategory="{sweep}",
            labels=get_report_labels("concept recovery"),
        ),
        concept_candidates="results/{sweep}/saes/{sae}/concept_candidates.csv",
    log:
        "results/logs/evaluate_sae/{sweep}/{sae}.log",
    benchmark:
        "results/benchmarks/evaluate_sae/{sweep}/{sae}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        **EVALUATE.params,
        out_dpath=lambda wc, output: os.path.dirname(output.metrics),
    shell:
        "python -m saev_core.steps.evaluate --spec-fpath {input.spec:q} --out-dpath {params.out_dpath:q}"
        " --device {params.device} > {log} 2>&1"


rule trait_metrics:
    """saev's trait-discovery metrics of one SAE or baseline: per (latent, class) 1-D logistic
    probes on the training patches, scored on the held-out ones."""
    input:
        spec=TRAITS.input,
        sae=get_sae_input,
        train=lambda wc: shards_done(PLAN.sweeps[wc.sweep].train_shards),
        eval=lambda wc: shards_done(PLAN.sweeps[wc.sweep].eval_shards),
    output:
        csv=report(
            "results/{sweep}/saes/{sae}/traits.csv",
            caption="../report/traits.rst",
            category="Evaluation",
            subcategory="{sweep}",
            labels=get_report_labels("trait metrics"),
        ),
        json="results/{sweep}/saes/{sae}/traits.json",
    log:
        "results/logs/trait_metrics/{sweep}/{sae}.log",
    benchmark:
        "results/benchmarks/trait_metrics/{sweep}/{sae}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        **TRAITS.params,
        out_dpath=lambda wc, output: os.path.dirname(output.json),
    shell:
        "python -m saev_core.steps.traits --spec-fpath {input.spec:q} --out-dpath {params.out_dpath:q}"
        " --device {params.device} > {log} 2>&1"


rule summarize_sweep:
    """One table row per SAE and the L0-vs-MSE Pareto plot."""
    input:
        spec=SUMMARIZE.input,
        metrics=lambda wc: expand(
            "results/{sweep}/saes/{sae}/metrics.json",
            sweep=wc.sweep,
            sae=PLAN.sweeps[wc.sweep].sae_ids,
        ),
        traits=lambda wc: [
            f"results/{wc.sweep}/saes/{sae}/traits.json"
            for sae in PLAN.sweeps[wc.sweep].sae_ids
            if PLAN.sweeps[wc.sweep].traits_run(sae)
        ],
    output:
        csv=report(
            "results/{sweep}/summary.csv",
            caption="../report/summary.rst",
            category="Sweep summary",
            subcategory="{sweep}",
        ),
        parquet="results/{sweep}/summary.parquet",
        verdict=report(
            "results/{sweep}/verdict.csv",
            caption="../report/verdict.rst",
            category="Sweep summary",
            subcategory="{sweep}",
        ),
        plot=report(
            "results/{sweep}/pareto.png",
            caption="../report/pareto.rst",
            category="Sweep summary",
            subcategory="{sweep}",
        ),
    log:
        "results/logs/summarize_sweep/{sweep}.log",
    benchmark:
        "results/benchmarks/summarize_sweep/{sweep}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        **SUMMARIZE.params,
    shell:
        "python -m saev_core.steps.summarize --spec-fpath {input.spec:q} --out-csv-fpath {output.csv:q}"
        " --out-parquet-fpath {output.parquet:q} --out-plot-fpath {output.plot:q}"
        " --out-verdict-fpath {output.verdict:q} > {log} 2>&1"
