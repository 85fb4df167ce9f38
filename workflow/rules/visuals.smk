rule topk_images:
    """Per latent: the top-k images by largest patch activation, frequency, mean value, a
    percentile and the value histogram."""
    input:
        spec=TOPK.input,
        sae=get_sae_input,
        shards=lambda wc: shards_done(PLAN.sweeps[wc.sweep].train_shards),
    output:
        "results/{sweep}/saes/{sae}/topk.npz",
    log:
        "results/logs/topk_images/{sweep}/{sae}.log",
    benchmark:
        "results/benchmarks/topk_images/{sweep}/{sae}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        **TOPK.params,
    shell:
        "python -m saev_core.steps.topk --spec-fpath {input.spec:q} --out-fpath {output:q}"
        " --device {params.device} > {log} 2>&1"


rule render_features:
    """Heatmap-overlaid top images per selected latent and the static feature browser, also as
    one self-contained file for the report."""
    input:
        spec=RENDER.input,
        sae=get_sae_input,
        topk="results/{sweep}/saes/{sae}/topk.npz",
        concepts="results/{sweep}/saes/{sae}/concept_candidates.csv",
        shards=lambda wc: shards_done(PLAN.sweeps[wc.sweep].train_shards),
        dataset=lambda wc: get_dataset_input(PLAN.sweeps[wc.sweep].dataset),
        # Latent pages say what editing them did.
        interventions=lambda wc: [
            f"{dpath}/{jobs.INTERVENTION_FNAME}"
            for dpath in PLAN.specs[
                saev_plan.sweep_spec_fpath(wc.sweep, "render", wc.sae)
            ].interventions.values()
        ],
    output:
        browser_dpath=directory("results/{sweep}/saes/{sae}/features"),
        # One file with the images inlined: a plain HTML report can hold it, a directory not.
        browser=report(
            "results/{sweep}/saes/{sae}/browser.html",
            caption="../report/browser.rst",
            category="Features",
            subcategory="{sweep}",
            labels=get_report_labels("feature browser"),
        ),
        grid=report(
            "results/{sweep}/saes/{sae}/grid.jpg",
            caption="../report/grid.rst",
            category="Features",
            subcategory="{sweep}",
            labels=get_report_labels("sample latents"),
        ),
    log:
        "results/logs/render_features/{sweep}/{sae}.log",
    benchmark:
        "results/benchmarks/render_features/{sweep}/{sae}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        **RENDER.params,
    shell:
        "python -m saev_core.steps.render --spec-fpath {input.spec:q}"
        " --out-dpath {output.browser_dpath:q} --browser-fpath {output.browser:q}"
        " --grid-fpath {output.grid:q} --device {params.device} > {log} 2>&1"
