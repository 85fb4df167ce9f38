rule topk_images:
    """Per latent: the top-k images by largest patch activation, frequency, mean value, a
    percentile and the value histogram."""
    input:
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
        code=CODE["topk"],
        sae_fpath=get_sae_fpath,
        layer=get_layer,
        tokens=get_tokens,
        shards_dpath=get_sweep_shards_dpath("train_shards"),
        top_k=lambda wc: PLAN.sweeps[wc.sweep].cfg.top_k,
        percentile=lambda wc: PLAN.sweeps[wc.sweep].cfg.percentile,
        device=DEVICE,
    shell:
        "python -m saev_core.topk --sae-fpath {params.sae_fpath:q} --layer {params.layer}"
        " --tokens {params.tokens} --shards-dpath {params.shards_dpath:q} --top-k {params.top_k}"
        " --percentile {params.percentile} --out-fpath {output:q} --device {params.device}"
        " > {log} 2>&1"


rule render_features:
    """Heatmap-overlaid top images per selected latent and the static feature browser, also as
    one self-contained file for the report."""
    input:
        sae=get_sae_input,
        topk="results/{sweep}/saes/{sae}/topk.npz",
        concepts="results/{sweep}/saes/{sae}/concept_candidates.csv",
        shards=lambda wc: shards_done(PLAN.sweeps[wc.sweep].train_shards),
        shards_spec=lambda wc: spec_input(
            saev_plan.shards_spec_fpath(PLAN.sweeps[wc.sweep].train_shards)
        ),
        spec=lambda wc: spec_input(saev_plan.render_spec_fpath(wc.sweep, wc.sae)),
        dataset=lambda wc: get_dataset_input(PLAN.sweeps[wc.sweep].dataset),
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
        spec=lambda wc: saev_plan.spec_hash(
            [
                PLAN.sweeps[wc.sweep].render_spec(wc.sae),
                PLAN.shard_jobs[PLAN.sweeps[wc.sweep].train_shards].spec,
            ]
        ),
        code=CODE["render"],
        sae_fpath=get_sae_fpath,
        layer=get_layer,
        shards_dpath=get_sweep_shards_dpath("train_shards"),
        device=DEVICE,
    shell:
        "python -m saev_core.render --sae-fpath {params.sae_fpath:q} --layer {params.layer}"
        " --topk-fpath {input.topk:q} --concepts-fpath {input.concepts:q}"
        " --shards-dpath {params.shards_dpath:q} --shards-spec-fpath {input.shards_spec:q}"
        " --spec-fpath {input.spec:q} --out-dpath {output.browser_dpath:q}"
        " --browser-fpath {output.browser:q} --grid-fpath {output.grid:q}"
        " --device {params.device} > {log} 2>&1"
