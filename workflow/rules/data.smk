rule synthetic_dataset:
    """Generate the planted-concept image set, deterministic from its seed."""
    output:
        directory("results/datasets/{dataset}"),
    log:
        "results/logs/synthetic_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/synthetic_dataset/{dataset}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        n_imgs=lambda wc: PLAN.datasets[wc.dataset]["n_imgs"],
        img_size=lambda wc: PLAN.datasets[wc.dataset]["img_size"],
        seed=lambda wc: PLAN.datasets[wc.dataset]["seed"],
    shell:
        "python -m saev_core.synthetic --out-dpath {output} --n-imgs {params.n_imgs}"
        " --img-size {params.img_size} --seed {params.seed} > {log} 2>&1"
