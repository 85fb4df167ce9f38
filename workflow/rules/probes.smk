rule train_probe:
    """A linear probe's grid of learning rates and weight decays, trained on one stream of
    batches; the best on held-out activations is kept. probe.json is written last."""
    input:
        spec=PROBE.input,
        train_shards=lambda wc: shards_done(PLAN.probes[wc.probe].train_shards),
        eval_shards=lambda wc: shards_done(PLAN.probes[wc.probe].eval_shards),
        datasets=lambda wc: [
            get_dataset_input(PLAN.shard_jobs[h].dataset)
            for h in (
                PLAN.probes[wc.probe].train_shards,
                PLAN.probes[wc.probe].eval_shards,
            )
        ],
    output:
        probe="results/probes/{probe}/probe.pt",
        metrics=report(
            "results/probes/{probe}/metrics.csv",
            caption="../report/probe.rst",
            category="Probes",
            labels=lambda wc: {"probe": wc.probe, "view": "metrics per grid point"},
        ),
        hparams=report(
            "results/probes/{probe}/hparams.png",
            caption="../report/probe.rst",
            category="Probes",
            labels=lambda wc: {"probe": wc.probe, "view": "hyper-parameters"},
        ),
        marker=f"results/probes/{{probe}}/{jobs.PROBE_FNAME}",
    log:
        "results/logs/train_probe/{probe}.log",
    benchmark:
        "results/benchmarks/train_probe/{probe}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        **PROBE.params,
        out_dpath=lambda wc, output: os.path.dirname(output.marker),
    shell:
        "python -m saev_core.steps.probe --spec-fpath {input.spec:q} --out-dpath {params.out_dpath:q}"
        " --device {params.device} > {log} 2>&1"


rule intervene:
    """Each class's proposed latents of one SAE edited in held-out activations (and a control of
    random latents of similar frequency), measured by the probe; intervention.json last.
    """
    input:
        spec=INTERVENE.input,
        sae=get_sae_input,
        concepts="results/{sweep}/saes/{sae}/concept_candidates.csv",
        topk="results/{sweep}/saes/{sae}/topk.npz",
        probe=lambda wc: f"results/probes/{intervention_probe(wc)}/{jobs.PROBE_FNAME}",
        shards=lambda wc: shards_done(PLAN.probes[intervention_probe(wc)].eval_shards),
        dataset=lambda wc: get_dataset_input(
            PLAN.shard_jobs[PLAN.probes[intervention_probe(wc)].eval_shards].dataset
        ),
    output:
        latents="results/{sweep}/saes/{sae}/interventions/{intervention}/class_latents.csv",
        effects="results/{sweep}/saes/{sae}/interventions/{intervention}/effects.csv",
        heatmap=report(
            "results/{sweep}/saes/{sae}/interventions/{intervention}/effects.png",
            caption="../report/interventions.rst",
            category="Interventions",
            subcategory="{sweep}",
            labels=lambda wc: {
                "SAE": PLAN.sweeps[wc.sweep].labels[wc.sae],
                "intervention": wc.intervention,
                "view": "effects",
            },
        ),
        page=report(
            "results/{sweep}/saes/{sae}/interventions/{intervention}/interventions.html",
            caption="../report/interventions.rst",
            category="Interventions",
            subcategory="{sweep}",
            labels=lambda wc: {
                "SAE": PLAN.sweeps[wc.sweep].labels[wc.sae],
                "intervention": wc.intervention,
                "view": "prediction maps",
            },
        ),
        marker=f"results/{{sweep}}/saes/{{sae}}/interventions/{{intervention}}/{jobs.INTERVENTION_FNAME}",
    log:
        "results/logs/intervene/{sweep}/{sae}/{intervention}.log",
    benchmark:
        "results/benchmarks/intervene/{sweep}/{sae}/{intervention}.tsv"
    conda:
        "../../envs/saev.yaml"
    params:
        **INTERVENE.params,
        out_dpath=lambda wc, output: os.path.dirname(output.marker),
    shell:
        "python -m saev_core.steps.intervene --spec-fpath {input.spec:q} --out-dpath {params.out_dpath:q}"
        " --device {params.device} > {log} 2>&1"
