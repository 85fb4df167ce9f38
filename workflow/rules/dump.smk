rule dump_activations:
    """Record ViT activations for one part's disjoint range of whole shards (SPEC §5).

    Shard files are not declared outputs, so a failed or killed job leaves its finished shards in
    place and the rerun resumes after them; the marker (inside the shard directory, so a purge of
    the directory removes it too) only says this part is done.
    """
    input:
        spec=DUMP.input,
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
        **DUMP.params,
    shell:
        "python -m saev_core.steps.dump part --spec-fpath {input.spec:q} --device {params.device}"
        " > {log} 2>&1"


rule publish_activations:
    """Once every part is done: write labels.bin (datasets with masks), check every shard and
    publish shards.json, which alone marks the directory complete."""
    input:
        spec=PUBLISH.input,
        dataset=get_dump_dataset,
        parts=get_dump_parts,
    output:
        f"{SHARDS_DPATH}/{{shards}}/shards.json",
    log:
        "results/logs/publish_activations/{shards}.log",
    benchmark:
        "results/benchmarks/publish_activations/{shards}.tsv"
    conda:
        "../../envs/saev.yaml"
    threads: lambda wc: PLAN.shard_jobs[wc.shards].activations.n_workers + 1
    params:
        **PUBLISH.params,
    shell:
        "python -m saev_core.steps.dump publish --spec-fpath {input.spec:q} > {log} 2>&1"


rule shards_published:
    """The token steps that read a shard directory wait for (`shards_done`): its own job, so a
    publish killed and redone (or a re-dump) never makes it look new, and nothing downstream
    reruns for the same bytes."""
    input:
        ancient(f"{SHARDS_DPATH}/{{shards}}/shards.json"),
    output:
        touch("results/shards-published/{shards}.done"),
    conda:
        "../../envs/saev.yaml"
