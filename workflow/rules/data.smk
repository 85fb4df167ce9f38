rule synthetic_dataset:
    """Generate the planted-concept image set, deterministic from its seed."""
    input:
        spec=SYNTHETIC.input,
    output:
        directory("results/datasets/{dataset}"),
    log:
        "results/logs/synthetic_dataset/{dataset}.log",
    benchmark:
        "results/benchmarks/synthetic_dataset/{dataset}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        **SYNTHETIC.params,
    shell:
        "python -m saev_core.steps.synthetic --spec-fpath {input.spec:q} --out-dpath {output:q}"
        " > {log} 2>&1"
