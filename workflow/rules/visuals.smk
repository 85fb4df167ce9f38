rule topk_images:
    """Per latent: the top-k images by largest patch activation, frequency and mean value."""
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
        device=DEVICE,
    shell:
        "python -m saev_core.topk --sae-fpath {input.group:q}/{wildcards.sae}/sae.pt"
        " --shards-dpath {params.shards_dpath:q} --top-k {params.top_k}"
        " --out-fpath {output:q} --device {params.device} > {log} 2>&1"


rule render_features:
    """Heatmap-overlaid top images per selected latent and the static feature browser."""
    input:
        group=get_group_dpath,
        topk="results/{sweep}/saes/{sae}/topk.npz",
        shards=lambda wc: shards_done(PLAN.sweeps[wc.sweep].train_shards),
        dataset=lambda wc: get_dataset_input(PLAN.sweeps[wc.sweep].dataset),
    output:
        # Not in the HTML report: a pure-HTML report cannot hold a directory (a .zip one can).
        browser=directory("results/{sweep}/saes/{sae}/features"),
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
        n_latents=lambda wc: PLAN.sweeps[wc.sweep].render["n_latents"],
        seed=lambda wc: PLAN.sweeps[wc.sweep].render["seed"],
    shell:
        "python -m saev_core.render --sae-fpath {input.group:q}/{wildcards.sae}/sae.pt"
        " --topk-fpath {input.topk:q} --shards-dpath {params.shards_dpath:q}"
        " --dataset-json {params.dataset:q} --out-dpath {output.browser:q}"
        " --grid-fpath {output.grid:q} --n-latents {params.n_latents} --seed {params.seed}"
        " > {log} 2>&1"
