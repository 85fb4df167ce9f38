rule dump_activations:
    """Record ViT activations for one part's disjoint range of whole shards (SPEC §5).

    Shard files are not declared outputs, so a failed or killed job leaves its finished shards in
    place and the rerun resumes after them; the marker only says this part is done.
    """
    input:
        get_dump_dataset,
    output:
        touch("results/dump-parts/{shards}/part{part}-of-{n_parts}.done"),
    log:
        "results/logs/dump_activations/{shards}-part{part}-of-{n_parts}.log",
    benchmark:
        "results/benchmarks/dump_activations/{shards}-part{part}-of-{n_parts}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        metadata=get_shard_metadata_json,
        dataset=get_shard_dataset_json,
        batch_size=lambda wc: PLAN.shard_jobs[wc.shards].batch_size,
        n_workers=lambda wc: PLAN.shard_jobs[wc.shards].n_workers,
        shards_dpath=SHARDS_DPATH,
        device=DEVICE,
    shell:
        "python -m saev_core.dump part --part {wildcards.part} --n-parts {wildcards.n_parts}"
        " --metadata-json {params.metadata:q} --dataset-json {params.dataset:q}"
        " --shards-dpath {params.shards_dpath:q} --batch-size {params.batch_size}"
        " --n-workers {params.n_workers} --device {params.device} > {log} 2>&1"


rule publish_activations:
    """Once every part is done: write labels.bin (datasets with masks), check every shard and
    publish shards.json, which alone marks the directory complete."""
    input:
        get_dump_dataset,
        get_dump_parts,
    output:
        f"{SHARDS_DPATH}/{{shards}}/shards.json",
    log:
        "results/logs/publish_activations/{shards}.log",
    benchmark:
        "results/benchmarks/publish_activations/{shards}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        metadata=get_shard_metadata_json,
        dataset=get_shard_dataset_json,
        n_workers=lambda wc: PLAN.shard_jobs[wc.shards].n_workers,
        shards_dpath=lambda wc, output: os.path.dirname(os.path.dirname(output[0])),
    shell:
        "python -m saev_core.dump publish --metadata-json {params.metadata:q}"
        " --dataset-json {params.dataset:q} --shards-dpath {params.shards_dpath:q}"
        " --n-workers {params.n_workers} > {log} 2>&1"
