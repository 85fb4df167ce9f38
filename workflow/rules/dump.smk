rule dump_activations:
    """Record ViT activations into <shards_dpath>/<hash>/ (SPEC §5).

    Only shards.json is declared: it is published last, so a failed or killed job leaves its
    finished shard files in place and the rerun resumes after them.
    """
    input:
        get_dump_dataset,
    output:
        f"{SHARDS_DPATH}/{{shards}}/shards.json",
    log:
        "results/logs/dump_activations/{shards}.log",
    benchmark:
        "results/benchmarks/dump_activations/{shards}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        metadata=lambda wc: json.dumps(PLAN.shard_jobs[wc.shards].metadata.to_dict()),
        dataset=lambda wc: json.dumps(PLAN.datasets[PLAN.shard_jobs[wc.shards].dataset]),
        batch_size=lambda wc: PLAN.shard_jobs[wc.shards].batch_size,
        n_workers=lambda wc: PLAN.shard_jobs[wc.shards].n_workers,
        shards_dpath=lambda wc, output: os.path.dirname(os.path.dirname(output[0])),
        device=DEVICE,
    shell:
        "python -m saev_core.dump --metadata-json {params.metadata:q}"
        " --dataset-json {params.dataset:q} --shards-dpath {params.shards_dpath:q}"
        " --batch-size {params.batch_size} --n-workers {params.n_workers}"
        " --device {params.device} > {log} 2>&1"
