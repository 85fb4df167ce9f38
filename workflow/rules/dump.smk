rule dump_activations:
    """Record ViT activations for one part's disjoint range of whole shards (SPEC §5).

    Shard files are not declared outputs, so a failed or killed job leaves its finished shards in
    place and the rerun resumes after them; the marker (inside the shard directory, so a purge of
    the directory removes it too) only says this part is done.
    """
    input:
        spec=get_shards_spec,
        dataset=get_dump_dataset,
    output:
        touch(f"{SHARDS_DPATH}/{{shards}}/.dump-part{{part}}-of-{{n_parts}}.done"),
    log:
        "results/logs/dump_activations/{shards}-part{part}-of-{n_parts}.log",
    benchmark:
        "results/benchmarks/dump_activations/{shards}-part{part}-of-{n_parts}.tsv"
    conda:
        "../../envs/saev.yaml"
    threads: lambda wc: PLAN.shard_jobs[wc.shards].activations.n_workers + 1
    params:
        spec=get_shards_spec_hash,
        batch_size=lambda wc: PLAN.shard_jobs[wc.shards].activations.batch_size,
        n_workers=lambda wc: PLAN.shard_jobs[wc.shards].activations.n_workers,
        shards_dpath=lambda wc, output: os.path.dirname(os.path.dirname(output[0])),
        device=DEVICE,
    shell:
        "python -m saev_core.dump part --spec-fpath {input.spec:q} --part {wildcards.part}"
        " --n-parts {wildcards.n_parts} --shards-dpath {params.shards_dpath:q}"
        " --batch-size {params.batch_size} --n-workers {params.n_workers}"
        " --device {params.device} > {log} 2>&1"


rule publish_activations:
    """Once every part is done: write labels.bin (datasets with masks), check every shard and
    publish shards.json, which alone marks the directory complete."""
    input:
        spec=get_shards_spec,
        dataset=get_dump_dataset,
        parts=get_dump_parts,
    output:
        listing=f"{SHARDS_DPATH}/{{shards}}/shards.json",
        published=touch("results/shards-published/{shards}.done"),
    log:
        "results/logs/publish_activations/{shards}.log",
    benchmark:
        "results/benchmarks/publish_activations/{shards}.tsv"
    conda:
        "../../envs/saev.yaml"
    threads: lambda wc: PLAN.shard_jobs[wc.shards].activations.n_workers + 1
    params:
        spec=get_shards_spec_hash,
        n_workers=lambda wc: PLAN.shard_jobs[wc.shards].activations.n_workers,
        shards_dpath=lambda wc, output: os.path.dirname(os.path.dirname(output[0])),
    shell:
        "python -m saev_core.dump publish --spec-fpath {input.spec:q}"
        " --shards-dpath {params.shards_dpath:q} --n-workers {params.n_workers} > {log} 2>&1"
