rule topk_images:
    """Per latent: the top-k images by largest patch activation, frequency, mean value, a
    percentile and the value histogram."""
    input:
        group=get_group_dpath,
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
        shards_dpath=lambda wc, input: os.path.dirname(input.shards),
        top_k=lambda wc: PLAN.sweeps[wc.sweep].top_k,
        percentile=lambda wc: PLAN.sweeps[wc.sweep].percentile,
        device=DEVICE,
    shell:
        "python -m saev_core.topk --sae-fpath {input.group:q}/{wildcards.sae}/sae.pt"
        " --shards-dpath {params.shards_dpath:q} --top-k {params.top_k}"
        " --percentile {params.percentile} --out-fpath {output:q} --device {params.device}"
        " > {log} 2>&1"


rule render_features:
    """Heatmap-overlaid top images per selected latent and the static feature browser."""
    input:
        group=get_group_dpath,
        topk="results/{sweep}/saes/{sae}/topk.npz",
        shards=lambda wc: shards_done(PLAN.sweeps[wc.sweep].train_shards),
        dataset=lambda wc: get_dataset_input(PLAN.sweeps[wc.sweep].dataset),
    output:
        # A directory with an HTML entry point: only a .zip report can hold it.
        browser=report(
            directory("results/{sweep}/saes/{sae}/features"),
            htmlindex="index.html",
            caption="../report/browser.rst",
            category="Features",
            subcategory="{sweep}",
            labels={"SAE": "{sae}", "view": "feature browser"},
        ),
        grid=report(
            "results/{sweep}/saes/{sae}/grid.png",
            caption="../report/grid.rst",
            category="Features",
            subcategory="{sweep}",
            labels={"SAE": "{sae}", "view": "sample latents"},
        ),
    log:
        "results/logs/render_features/{sweep}/{sae}.log",
    benchmark:
        "results/benchmarks/render_features/{sweep}/{sae}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        shards_dpath=lambda wc, input: os.path.dirname(input.shards),
        dataset=lambda wc: json.dumps(PLAN.datasets[PLAN.sweeps[wc.sweep].dataset]),
        render=lambda wc: json.dumps(PLAN.sweeps[wc.sweep].render),
    shell:
        "python -m saev_core.render --sae-fpath {input.group:q}/{wildcards.sae}/sae.pt"
        " --topk-fpath {input.topk:q} --shards-dpath {params.shards_dpath:q}"
        " --dataset-json {params.dataset:q} --out-dpath {output.browser:q}"
        " --grid-fpath {output.grid:q} --render-json {params.render:q}"
        " > {log} 2>&1"
