"""Turn `config/experiments.yaml` into the jobs the workflow runs; no torch, cheap to import.

Used by `workflow/rules/common.smk` while Snakemake plans: the config is checked against the
schema and then built into the typed configs of `saev_core.config` for every dump, SAE and job, so
a bad value fails `snakemake -n` naming its config path. Shard directories are named by their
metadata hash, sweeps expand into SAEs with ids hashed from their full configuration, and SAEs that
share a training data stream form one sweep group (one job, one pass over the data). The result is
one typed job (`saev_core.jobs`) per rule and wildcard, keyed by the path of its spec file.
"""

import dataclasses
import itertools
import json
import logging
import pathlib

from .. import architectures, checkpoints, config, datasets, jobs, shards, weights
from ..jobs import short_hash
from . import labels

logger = logging.getLogger("plan")
RESULTS_DPATH = "results"
SPECS_DPATH = f"{RESULTS_DPATH}/specs"
REPO_DPATH = pathlib.Path(__file__).parents[2]
SCHEMA_FPATH = REPO_DPATH / "workflow" / "schemas" / "experiments.schema.yaml"
# SAEs that agree on these share one job: what decides the stream of training batches, and
# `normalize`, which group ids have always included.
STREAM_KEYS = ("shards", *config.STREAM_FIELDS, "normalize")


class PlanError(ValueError):
    """The configuration does not make sense; the message starts with the config path."""


def expand_grid(value) -> list:
    """All configurations a sweep value stands for.

    A list is a choice (each element expanded, results concatenated); a mapping is the
    cartesian product of its values' expansions; anything else is itself.
    """
    if isinstance(value, list):
        return [choice for item in value for choice in expand_grid(item)]
    if isinstance(value, dict):
        keys = sorted(value)
        products = itertools.product(*(expand_grid(value[k]) for k in keys))
        return [dict(zip(keys, combo, strict=True)) for combo in products]
    return [value]


def typed(cls, values: dict, where: str, **extra):
    """`cls` built from a config entry; a bad value becomes a PlanError naming `where.field`."""
    try:
        return config.build(cls, {**values, **extra})
    except config.ConfigError as err:
        raise PlanError(f"{where}.{err.field}: {err.message}") from None


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """One shard directory to dump."""

    metadata: shards.Metadata
    dataset: str
    """Name of the dataset entry."""
    dataset_cfg: dict
    """The dataset's config with `root` resolved."""
    activations: config.ActivationsConfig
    """Execution settings (batch size, workers, parts) of the first entry naming this dump."""
    weights: str | None = None
    """The model's local weights file, if any."""


@dataclasses.dataclass(frozen=True)
class Group:
    """SAEs trained together on one data stream."""

    id: str
    saes: dict[str, dict]
    """SAE id -> flat configuration. A group kept from an earlier run (`sweep_groups`) keeps
    every member it was trained with, also those the config no longer lists."""

    @property
    def sae_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.saes))


@dataclasses.dataclass(frozen=True)
class RecordedGroup:
    """A group an earlier run planned (its spec file) and trained SAEs of (files on disk)."""

    saes: dict[str, dict]
    """Its members as its spec recorded them."""
    trained: frozenset[str]
    """The members whose `sae.pt` is in the group's folder."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    cfg: config.SweepConfig
    train_shards: str
    eval_shards: str
    dataset: str
    """Name of the training dataset (what render draws)."""
    model: str
    """The ViT the SAEs read, as family:checkpoint."""
    saes: dict[str, dict]
    """SAE id -> full flat configuration (what the id hashes and `sae.pt` stores)."""
    specs: dict[str, config.SaeSpec]
    """SAE id -> its typed SAE and training configs."""
    groups: dict[str, Group]
    sae_group: dict[str, str]
    """SAE id -> group id."""
    labels: dict[str, str]
    """SAE id -> short readable label, unique within the sweep (e.g. `L-1 topk k=16 x8`);
    external SAEs are labelled by their name."""
    externals: dict[str, config.ExternalSaeConfig]
    """Id -> an existing SAE evaluated and browsed like the trained ones."""
    interventions: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    """Intervention name -> the SAEs that run it (those at or before its probe's layer)."""
    baselines: dict[str, config.BaselineConfig] = dataclasses.field(default_factory=dict)
    """Id -> a baseline dictionary fitted on the training activations, scored like the SAEs."""
    trait_classes: tuple[str, ...] = ()
    """Class names of the patch labels that saev's trait metrics score; empty: the training or
    held-out activations have no `labels.bin`, and no trait metrics run."""

    @property
    def sae_ids(self) -> list[str]:
        """Every SAE the sweep evaluates: trained, external and baselines."""
        return sorted([*self.saes, *self.externals, *self.baselines])

    def family(self, sae_id: str) -> str:
        """`baseline` for a baseline, else `sae` (trained and external alike)."""
        return "baseline" if sae_id in self.baselines else "sae"

    def layer_tokens(self, sae_id: str) -> tuple[int, str]:
        """The recorded layer and token kind an SAE reads."""
        if sae_id in self.externals:
            return self.externals[sae_id].layer, self.externals[sae_id].tokens
        if sae_id in self.baselines:
            return self.baselines[sae_id].layer, self.baselines[sae_id].tokens
        return self.specs[sae_id].train.layer, self.specs[sae_id].train.tokens

    def traits_run(self, sae_id: str) -> bool:
        """Trait metrics need patch labels on both sides and an SAE that reads patches."""
        return bool(self.trait_classes) and self.layer_tokens(sae_id)[1] == "patches"

    def sae_fpath(self, sae_id: str) -> str:
        if sae_id in self.externals:
            return self.externals[sae_id].fpath
        if sae_id in self.baselines:
            return f"{baseline_dpath(self.name, sae_id)}/sae.pt"
        return f"{group_dpath(self.name, self.sae_group[sae_id])}/{sae_id}/sae.pt"

    def sae_sha256(self, sae_id: str) -> str | None:
        """An external SAE file's SHA-256 (a replaced file reruns its jobs whatever its mtime);
        None for the SAEs this workflow writes, exports included."""
        fpath = self.sae_fpath(sae_id)
        if sae_id in self.externals and not fpath.startswith(f"{RESULTS_DPATH}/exports/"):
            return weights.file_sha256(fpath)
        return None

    @property
    def slugs(self) -> dict[str, str]:
        """File-name form of each trained SAE's label (`L-1-topk-k=16-x8`) -> its id."""
        return {labels.export_slug(self.labels[sae_id]): sae_id for sae_id in self.saes}


@dataclasses.dataclass(frozen=True)
class PlannedProbe:
    """One probe of the `probes` table, resolved."""

    cfg: config.ProbeConfig
    train_shards: str
    eval_shards: str
    classes: tuple[str, ...]
    """What the probe predicts: the mask classes (patch) or the image targets' names (image)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    workflow: config.WorkflowConfig
    datasets: dict[str, dict]
    """Dataset name -> config with `root` resolved (generated sets live under results/)."""
    activations: dict[str, str]
    """Activation spec name -> shard directory hash."""
    shard_jobs: dict[str, ShardJob]
    sweeps: dict[str, Sweep]
    specs: dict[str, jobs.Job]
    """Spec file path -> the job of one rule and wildcard (see `job_specs`)."""
    probes: dict[str, PlannedProbe] = dataclasses.field(default_factory=dict)


def dataset_spec_fpath(dataset: str) -> str:
    return f"{SPECS_DPATH}/datasets/{dataset}.json"


def dump_spec_fpath(shards_hash: str, part: int, n_parts: int) -> str:
    return f"{SPECS_DPATH}/shards/{shards_hash}/part{part}-of-{n_parts}.json"


def publish_spec_fpath(shards_hash: str) -> str:
    return f"{SPECS_DPATH}/shards/{shards_hash}/publish.json"


def sweep_spec_fpath(sweep: str, step: str, name: str) -> str:
    """Spec of one sweep job: `step` is groups, evaluate, topk, render or export."""
    return f"{SPECS_DPATH}/sweeps/{sweep}/{step}/{name}.json"


def summary_spec_fpath(sweep: str) -> str:
    return f"{SPECS_DPATH}/sweeps/{sweep}/summary.json"


def probe_spec_fpath(probe: str) -> str:
    return f"{SPECS_DPATH}/probes/{probe}.json"


def intervention_spec_fpath(sweep: str, intervention: str, sae_id: str) -> str:
    return sweep_spec_fpath(sweep, f"interventions/{intervention}", sae_id)


def baseline_dpath(sweep: str, baseline_id: str) -> str:
    return f"{RESULTS_DPATH}/{sweep}/baselines/{baseline_id}"


def probe_dpath(probe: str) -> str:
    return f"{RESULTS_DPATH}/probes/{probe}"


def intervention_dpath(sweep: str, sae_id: str, intervention: str) -> str:
    return f"{RESULTS_DPATH}/{sweep}/saes/{sae_id}/interventions/{intervention}"


def job_specs(
    workflow: config.WorkflowConfig,
    dataset_cfgs: dict[str, dict],
    shard_jobs: dict[str, ShardJob],
    sweeps: dict[str, Sweep],
    planned_probes: dict[str, PlannedProbe],
) -> dict[str, jobs.Job]:
    """Every rule's job, keyed by its spec file's path."""
    root = workflow.shards_dpath.rstrip("/")
    out: dict[str, jobs.Job] = {}
    for name, cfg in dataset_cfgs.items():
        if cfg["kind"] == "synthetic":
            out[dataset_spec_fpath(name)] = jobs.SyntheticJob(
                n_imgs=cfg["n_imgs"], img_size=cfg["img_size"], seed=cfg["seed"]
            )
    for shards_hash, job in shard_jobs.items():
        act = job.activations
        for part in range(act.n_parts):
            out[dump_spec_fpath(shards_hash, part, act.n_parts)] = jobs.DumpPartJob(
                metadata=job.metadata,
                dataset=job.dataset_cfg,
                weights=job.weights,
                part=part,
                n_parts=act.n_parts,
                shards_dpath=f"{root}/{shards_hash}",
                batch_size=act.batch_size,
                n_workers=act.n_workers,
            )
        out[publish_spec_fpath(shards_hash)] = jobs.PublishJob(
            metadata=job.metadata,
            dataset=job.dataset_cfg,
            shards_dpath=f"{root}/{shards_hash}",
            n_workers=act.n_workers,
        )
    for name, probe in planned_probes.items():
        out[probe_spec_fpath(name)] = jobs.ProbeJob(
            name=name,
            probe=probe.cfg,
            train_shards=probe.train_shards,
            eval_shards=probe.eval_shards,
            train_shards_dpath=f"{root}/{probe.train_shards}",
            eval_shards_dpath=f"{root}/{probe.eval_shards}",
            train_dataset=shard_jobs[probe.train_shards].dataset_cfg,
            eval_dataset=shard_jobs[probe.eval_shards].dataset_cfg,
            classes=probe.classes,
        )
    for sweep in sweeps.values():
        out |= sweep_jobs(sweep, shard_jobs, root)
        out |= intervention_jobs(sweep, shard_jobs, planned_probes, root)
    return out


def intervention_jobs(
    sweep: Sweep,
    shard_jobs: dict[str, ShardJob],
    planned_probes: dict[str, PlannedProbe],
    root: str,
) -> dict[str, jobs.Job]:
    """One job per intervention and SAE that runs it."""
    out: dict[str, jobs.Job] = {}
    by_name = {i.name: i for i in sweep.cfg.interventions}
    for name, sae_ids in sweep.interventions.items():
        intervention = by_name[name]
        probe = planned_probes[intervention.probe]
        shard_job = shard_jobs[probe.eval_shards]
        md = shard_job.metadata
        model = {"family": md.vit_family, "ckpt": md.vit_ckpt, "weights": shard_job.weights}
        for sae_id in sae_ids:
            layer, tokens = sweep.layer_tokens(sae_id)
            sae_dpath = f"{RESULTS_DPATH}/{sweep.name}/saes/{sae_id}"
            out[intervention_spec_fpath(sweep.name, name, sae_id)] = jobs.InterveneJob(
                sae_id=sae_id,
                label=sweep.labels[sae_id],
                sae_fpath=sweep.sae_fpath(sae_id),
                sae_sha256=sweep.sae_sha256(sae_id),
                sae_layer=layer,
                sae_tokens=tokens,
                concepts_fpath=f"{sae_dpath}/concept_candidates.csv",
                topk_fpath=f"{sae_dpath}/topk.npz",
                probe_fpath=f"{probe_dpath(intervention.probe)}/probe.pt",
                probe=probe.cfg,
                intervention=intervention,
                shards=probe.eval_shards,
                shards_dpath=f"{root}/{probe.eval_shards}",
                model=model,
                dataset=shard_job.dataset_cfg,
                classes=probe.classes,
            )
    return out


def sweep_jobs(sweep: Sweep, shard_jobs: dict[str, ShardJob], root: str) -> dict[str, jobs.Job]:
    """The training, evaluation, top-k, render, export and summary jobs of one sweep."""
    name, train_shards, eval_shards = sweep.name, sweep.train_shards, sweep.eval_shards
    out: dict[str, jobs.Job] = {}
    for group_id, group in sweep.groups.items():
        out[sweep_spec_fpath(name, "groups", group_id)] = jobs.TrainGroupJob(
            group=group_id,
            model=sweep.model,
            saes=group.saes,
            shards_dpath=f"{root}/{train_shards}",
            work_dpath=f"{RESULTS_DPATH}/{name}/work/{group_id}",
            checkpoint_every=sweep.cfg.checkpoint_every,
            wandb_project=sweep.cfg.wandb_project,
        )
    for baseline_id, baseline in sweep.baselines.items():
        out[sweep_spec_fpath(name, "baselines", baseline_id)] = jobs.FitBaselineJob(
            baseline=baseline, shards=train_shards, shards_dpath=f"{root}/{train_shards}"
        )
    for sae_id in sweep.sae_ids:
        layer, tokens = sweep.layer_tokens(sae_id)
        sae_fpath, sae_dpath = sweep.sae_fpath(sae_id), f"{RESULTS_DPATH}/{name}/saes/{sae_id}"
        sae_sha256 = sweep.sae_sha256(sae_id)
        if sweep.traits_run(sae_id):
            out[sweep_spec_fpath(name, "traits", sae_id)] = jobs.TraitsJob(
                sae_fpath=sae_fpath,
                sae_sha256=sae_sha256,
                train_shards=train_shards,
                eval_shards=eval_shards,
                train_shards_dpath=f"{root}/{train_shards}",
                eval_shards_dpath=f"{root}/{eval_shards}",
                layer=layer,
                classes=sweep.trait_classes,
            )
        out[sweep_spec_fpath(name, "evaluate", sae_id)] = jobs.EvaluateJob(
            sae_fpath=sae_fpath,
            sae_sha256=sae_sha256,
            shards=eval_shards,
            shards_dpath=f"{root}/{eval_shards}",
            layer=layer,
            tokens=tokens,
            dataset=shard_jobs[eval_shards].dataset_cfg,
            # Every member scored on the same patches: the SAEs trained on, baselines too.
            ignore_labels=sweep.cfg.ignore_labels if tokens == "patches" else (),
        )
        out[sweep_spec_fpath(name, "topk", sae_id)] = jobs.TopkJob(
            sae_fpath=sae_fpath,
            sae_sha256=sae_sha256,
            shards=train_shards,
            shards_dpath=f"{root}/{train_shards}",
            layer=layer,
            tokens=tokens,
            top_k=sweep.cfg.top_k,
            percentile=sweep.cfg.percentile,
        )
        out[sweep_spec_fpath(name, "render", sae_id)] = jobs.RenderJob(
            sae_id=sae_id,
            label=sweep.labels[sae_id],
            sae_fpath=sae_fpath,
            sae_sha256=sae_sha256,
            topk_fpath=f"{sae_dpath}/topk.npz",
            concepts_fpath=f"{sae_dpath}/concept_candidates.csv",
            shards=train_shards,
            shards_dpath=f"{root}/{train_shards}",
            layer=layer,
            dataset=shard_jobs[train_shards].dataset_cfg,
            render=sweep.cfg.render,
            interventions={
                intervention: intervention_dpath(name, sae_id, intervention)
                for intervention, sae_ids in sweep.interventions.items()
                if sae_id in sae_ids
            },
        )
    for slug, sae_id in sweep.slugs.items():
        out[sweep_spec_fpath(name, "export", slug)] = jobs.ExportJob(
            sae_id=sae_id, sae_fpath=sweep.sae_fpath(sae_id)
        )
    out[summary_spec_fpath(name)] = jobs.SummarizeJob(
        model=sweep.model,
        sae_fpaths={
            sae_id: sweep.sae_fpath(sae_id) for sae_id in sorted([*sweep.saes, *sweep.baselines])
        },
        externals=dict(sorted(sweep.externals.items())),
        baselines=dict(sorted(sweep.baselines.items())),
        groups={
            **dict(sorted(sweep.sae_group.items())),
            **dict.fromkeys(sorted(sweep.externals), "external"),
            **dict.fromkeys(sorted(sweep.baselines), "baseline"),
        },
        labels={sae_id: sweep.labels[sae_id] for sae_id in sweep.sae_ids},
        metrics_fpaths={
            sae_id: f"{RESULTS_DPATH}/{name}/saes/{sae_id}/metrics.json" for sae_id in sweep.sae_ids
        },
        traits_fpaths={
            sae_id: f"{RESULTS_DPATH}/{name}/saes/{sae_id}/traits.json"
            for sae_id in sweep.sae_ids
            if sweep.traits_run(sae_id)
        },
    )
    return out


def resolve_dataset(name: str, cfg: dict) -> dict:
    extra = sorted(set(cfg) - {"kind"} - set(datasets.KEYS[cfg["kind"]]))
    if extra:
        raise PlanError(
            f"datasets.{name}: {extra} do not apply to kind {cfg['kind']!r}, "
            f"which takes {list(datasets.KEYS[cfg['kind']])}"
        )
    if cfg["kind"] == "synthetic":
        return {**cfg, "root": f"{RESULTS_DPATH}/datasets/{name}"}
    return dict(cfg)


def scan_dataset(dataset_cfg: dict, rescan: bool) -> datasets.FolderScan:
    """A folder dataset's image count and file fingerprint. Snakemake's main process scans (a
    stat per file) and caches the result under results/.cache/; the jobs it starts plan again and
    read the cache instead (`rescan=False`), so they agree with it on every shard hash."""
    key = short_hash({k: v for k, v in dataset_cfg.items() if k in ("kind", "root", "split")})
    cache_fpath = pathlib.Path(RESULTS_DPATH) / ".cache" / "datasets" / f"{key}.json"
    if not rescan and cache_fpath.exists():
        return datasets.FolderScan(**json.loads(cache_fpath.read_text()))
    scan = datasets.scan_folder_dataset(dataset_cfg)
    cache_fpath.parent.mkdir(parents=True, exist_ok=True)
    shards.write_atomic(cache_fpath, json.dumps(scan._asdict()).encode(), sync=False)
    return scan


def shard_metadata(
    spec_name: str,
    spec: config.ActivationsConfig,
    models: dict,
    dataset_cfgs: dict,
    rescan: bool = True,
) -> shards.Metadata:
    where = f"activations.{spec_name}"
    model_cfg = lookup(models, spec.model, f"{where}.model")
    model = typed(config.ModelConfig, model_cfg, f"models.{spec.model}")
    check_architecture(spec_name, spec, model, f"models.{spec.model}")
    dataset_cfg = lookup(dataset_cfgs, spec.dataset, f"{where}.dataset")
    data = {k: v for k, v in dataset_cfg.items() if k not in ("kind", "root")}
    if dataset_cfg["kind"] != "synthetic":
        data["root"] = dataset_cfg["root"]
    has_masks = dataset_cfg["kind"] in datasets.KINDS_WITH_MASKS
    vit_ckpt = model.ckpt
    if model.weights is not None:
        try:
            weights.check_file(model.weights, f"models.{spec.model}.weights")
        except weights.WeightsFileError as err:
            raise PlanError(str(err)) from None
        vit_ckpt = f"{model.ckpt}@sha256:{weights.file_sha256(model.weights)[:16]}"
    if spec.autocast_bf16:
        vit_ckpt += shards.BF16_SUFFIX
    try:
        if dataset_cfg["kind"] in datasets.FOLDER_KINDS:
            scan = scan_dataset(dataset_cfg, rescan)
            n_imgs, data["fingerprint"] = scan.n_imgs, scan.fingerprint
        else:
            n_imgs = datasets.count_images(dataset_cfg)
        metadata = shards.Metadata(
            vit_family=model.family,
            vit_ckpt=vit_ckpt,
            layers=spec.layers,
            n_patches_per_img=model.n_patches_per_img,
            cls_token=model.cls_token,
            d_vit=model.d_vit,
            n_imgs=n_imgs,
            max_patches_per_shard=spec.max_patches_per_shard,
            data={**data, "__class__": dataset_cfg["kind"]},
            protocol=shards.PROTOCOL_WITH_LABELS if has_masks else shards.PROTOCOL,
        )
    except (ValueError, datasets.DatasetError) as err:
        raise PlanError(f"{where}: {err}") from err
    if spec.protocol == shards.PROTOCOL_SAEV2:
        try:
            return shards.as_saev2(metadata, dataset_root(dataset_cfg))
        except ValueError as err:
            raise PlanError(f"{where}.protocol: {err}") from None
    return metadata


def dataset_root(dataset_cfg: dict) -> str:
    """Protocol 2.1's `dataset`: the dataset's root as configured (ImageNet: its Hub name).
    saev records an absolute path; a relative one keeps the directory's name (its hash) the same
    wherever the workflow's directory is."""
    if dataset_cfg["kind"] == "imagenet":
        return datasets.IMAGENET_HF_NAME
    return dataset_cfg["root"]


def check_architecture(
    spec_name: str, spec: config.ActivationsConfig, model: config.ModelConfig, where: str
):
    """The checkpoint name is one the family can build, and every layer is one of its blocks."""
    try:
        n_blocks = architectures.depth(model.family, model.ckpt)
    except architectures.ArchitectureError as err:
        raise PlanError(f"{where}.ckpt: {err}") from None
    for layer in spec.layers:
        if n_blocks is not None and not -n_blocks <= layer < n_blocks:
            raise PlanError(
                f"activations.{spec_name}.layers: layer {layer} does not exist in "
                f"{model.family} {model.ckpt}, which has {n_blocks} blocks "
                f"(layers {-n_blocks}..{n_blocks - 1}, -1 the last)"
            )


def lookup(table: dict, name: str, where: str):
    if name not in table:
        raise PlanError(f"{where}: {name!r} is not defined; known: {sorted(table)}")
    return table[name]


def n_vectors(md: shards.Metadata, tokens: str) -> int:
    """Token vectors of one layer a token kind selects in a shard directory."""
    per_img = {"patches": md.n_patches_per_img, "cls": int(md.cls_token), "all": md.n_tokens}
    return md.n_imgs * per_img[tokens]


def sweep_points(name: str, cfg: dict):
    """(flat SAE configuration, where its train and sae keys came from) for every grid point."""
    for t, train_alt in enumerate(cfg["train"]):
        for s, sae_alt in enumerate(cfg["saes"]):
            for train_point in expand_grid(train_alt):
                for sae_point in expand_grid(sae_alt):
                    where = {k: f"sweeps.{name}.train[{t}]" for k in train_point}
                    where |= {k: f"sweeps.{name}.saes[{s}]" for k in sae_point}
                    yield {**train_point, **sae_point}, where


def export_fpath(sweep: str, label: str) -> str:
    """Where the export rule writes a trained SAE for today's saev (schema 5)."""
    return f"{RESULTS_DPATH}/exports/{sweep}/{labels.export_slug(label)}.saev5.pt"


def plan_sweep(
    name: str,
    cfg: dict,
    activations: dict,
    shard_jobs: dict,
    recorded: dict[str, RecordedGroup] | None = None,
    planned_probes: dict[str, PlannedProbe] | None = None,
) -> Sweep:
    """One sweep: its settings, its SAEs (id -> configuration), their groups and labels;
    `recorded` (`recorded_groups`) are the groups earlier runs trained."""
    sweep_cfg = sweep_settings(name, cfg)
    train_shards, eval_shards = train_eval_shards(
        f"sweeps.{name}",
        sweep_cfg.train_activations,
        sweep_cfg.eval_activations,
        activations,
        shard_jobs,
    )
    train_md, eval_md = shard_jobs[train_shards].metadata, shard_jobs[eval_shards].metadata
    if sweep_cfg.ignore_labels and not (train_md.records_labels and eval_md.records_labels):
        raise PlanError(
            f"sweeps.{name}.ignore_labels: filtering patches by label needs labels.bin in the "
            "training and held-out activations, and their dataset has no masks"
        )
    saes, specs = sweep_saes(name, cfg, train_shards, train_md, eval_md, sweep_cfg.ignore_labels)
    check_include_latents(name, sweep_cfg.render, {s: spec.sae.d_sae for s, spec in specs.items()})
    groups, sae_group = sweep_groups(saes, sweep_cfg.max_saes_per_group, recorded or {})
    for group in groups.values():
        check_group_memory(name, group, train_md.d_vit, sweep_cfg.max_group_memory_gib)
    sae_labels = labels.sae_labels(saes)
    externals = external_saes(name, sweep_cfg, train_shards, (train_md, eval_md), sae_labels)
    sae_labels |= {sae_id: external.name for sae_id, external in externals.items()}
    baselines = plan_baselines(name, sweep_cfg, train_shards, (train_md, eval_md), sae_labels)
    sae_labels |= {sae_id: baseline.label for sae_id, baseline in baselines.items()}
    reads = {s: (spec.train.layer, spec.train.tokens) for s, spec in specs.items()}
    reads |= {s: (external.layer, external.tokens) for s, external in externals.items()}
    reads |= {s: (baseline.layer, baseline.tokens) for s, baseline in baselines.items()}
    interventions = plan_interventions(
        name, sweep_cfg, train_md, reads, planned_probes or {}, shard_jobs
    )
    return Sweep(
        name=name,
        cfg=sweep_cfg,
        train_shards=train_shards,
        eval_shards=eval_shards,
        dataset=shard_jobs[train_shards].dataset,
        model=f"{train_md.vit_family}:{train_md.vit_ckpt}",
        saes=saes,
        specs=specs,
        groups=groups,
        sae_group=sae_group,
        labels=sae_labels,
        externals=externals,
        interventions=interventions,
        baselines=baselines,
        trait_classes=trait_classes(name, shard_jobs[train_shards], shard_jobs[eval_shards]),
    )


def block_index(layer: int, n_blocks: int | None) -> int:
    """A layer as a block index from the start (negative layers count from the end); without a
    known depth, layers compare as given."""
    return layer % n_blocks if n_blocks is not None else layer


def plan_interventions(
    name: str,
    sweep_cfg: config.SweepConfig,
    train_md: shards.Metadata,
    reads: dict[str, tuple[int, str]],
    planned_probes: dict[str, PlannedProbe],
    shard_jobs: dict[str, ShardJob],
) -> dict[str, tuple[str, ...]]:
    """Intervention name -> the SAEs that run it: those whose edit can reach the probe (`reads`:
    SAE id -> layer and token kind). The probe must exist, read the sweep's model, and know
    every class the intervention names."""
    out = {}
    for i, intervention in enumerate(sweep_cfg.interventions):
        where = f"sweeps.{name}.interventions[{i}]"
        if intervention.name in out:
            raise PlanError(f"{where}.name: {intervention.name!r} names two interventions")
        probe = lookup(planned_probes, intervention.probe, f"{where}.probe")
        probe_md = shard_jobs[probe.eval_shards].metadata
        if model_of(probe_md) != model_of(train_md):
            raise PlanError(
                f"{where}.probe: probe {intervention.probe!r} reads {':'.join(model_of(probe_md))}"
                f" activations, the sweep's SAEs {':'.join(model_of(train_md))}"
            )
        for c, class_name in enumerate(intervention.classes):
            if class_name not in probe.classes:
                raise PlanError(
                    f"{where}.classes[{c}]: {class_name!r} is not a class of probe "
                    f"{intervention.probe!r}; its classes are {list(probe.classes)}"
                )
        try:
            n_blocks = architectures.depth(train_md.vit_family, model_of(train_md)[1].split("@")[0])
        except architectures.ArchitectureError:
            n_blocks = None
        probe_block = block_index(probe.cfg.layer, n_blocks)
        sae_ids = tuple(
            s
            for s in sorted(reads)
            if reaches(block_index(reads[s][0], n_blocks), reads[s][1], probe_block, probe.cfg)
        )
        if not sae_ids:
            raise PlanError(
                f"{where}.probe: probe {intervention.probe!r} reads {probe.cfg.tokens} at layer "
                f"{probe.cfg.layer}, where no SAE of the sweep (layers "
                f"{sorted({layer for layer, _ in reads.values()})}) can reach it: an SAE must "
                "read an earlier layer, or the probe's layer and tokens"
            )
        out[intervention.name] = sae_ids
    return out


def reaches(block: int, tokens: str, probe_block: int, probe: config.ProbeConfig) -> bool:
    """An SAE's edit reaches a probe from an earlier block, or at the probe's block from tokens
    the probe reads (patch edits never change that block's [CLS])."""
    if block == probe_block and probe.tokens == "cls":
        return tokens != "patches"
    return block <= probe_block


def model_of(md: shards.Metadata) -> tuple[str, str]:
    """The ViT that wrote a dump, as family and checkpoint (bf16 autocast: the same model)."""
    return md.vit_family, md.vit_ckpt.removesuffix(shards.BF16_SUFFIX)


def probe_classes(kind: str, dataset_cfg: dict, where: str) -> tuple[str, ...]:
    """What a probe predicts, known at plan time: mask classes or image-target names."""
    from ..steps.synthetic import CONCEPTS

    ds_kind = dataset_cfg["kind"]
    if ds_kind == "synthetic":
        return CONCEPTS
    if kind == "patch" and ds_kind == "ade20k":
        return tuple(datasets.ade20k_class_names(pathlib.Path(dataset_cfg["root"])))
    if kind == "image" and ds_kind == "image-folder":
        try:
            return tuple(datasets.class_folders(pathlib.Path(dataset_cfg["root"])))
        except OSError as err:
            raise PlanError(f"{where}: cannot list the class folders: {err}") from None
    raise PlanError(
        f"{where}: {kind} probes on {ds_kind} datasets are not supported; patch probes need "
        "masks (synthetic, ade20k), image probes class folders (synthetic, image-folder)"
    )


def plan_probes(
    probes_cfg: dict, activations: dict[str, str], shard_jobs: dict[str, ShardJob]
) -> dict[str, PlannedProbe]:
    """Every probe, typed and checked against the activations it reads."""
    out = {}
    for name, values in probes_cfg.items():
        where = f"probes.{name}"
        cfg = typed(config.ProbeConfig, values, where)
        train_shards, eval_shards = train_eval_shards(
            where, cfg.train_activations, cfg.eval_activations, activations, shard_jobs
        )
        train_md, eval_md = shard_jobs[train_shards].metadata, shard_jobs[eval_shards].metadata
        check_layer(cfg.layer, where, train_md, eval_md)
        for md, which in ((train_md, "train_activations"), (eval_md, "eval_activations")):
            if cfg.kind == "patch" and not md.records_labels:
                dataset = shard_jobs[train_shards if which == "train_activations" else eval_shards]
                raise PlanError(
                    f"{where}.{which}: a patch probe needs per-patch labels (labels.bin), and "
                    f"dataset {dataset.dataset!r} ({dataset.dataset_cfg['kind']}) has no masks; "
                    "use kind: image"
                )
            if cfg.tokens == "cls" and not md.cls_token:
                raise PlanError(f"{where}.pooling: the model has no [CLS] token; use mean")
        classes = probe_classes(cfg.kind, shard_jobs[train_shards].dataset_cfg, where)
        if cfg.kind == "image":
            eval_classes = probe_classes(cfg.kind, shard_jobs[eval_shards].dataset_cfg, where)
            if eval_classes != classes:
                raise PlanError(
                    f"{where}.eval_activations: its classes {list(eval_classes)[:5]}... differ "
                    f"from the training images' {list(classes)[:5]}..."
                )
        for c in cfg.ignore_labels:
            if not 0 <= c < len(classes):
                raise PlanError(
                    f"{where}.ignore_labels: {c} is not a class id (0..{len(classes) - 1})"
                )
        n_available = n_vectors(train_md, "patches") if cfg.kind == "patch" else train_md.n_imgs
        if cfg.batch_size > n_available:
            raise PlanError(
                f"{where}.batch_size: {cfg.batch_size} exceeds the {n_available} training vectors"
            )
        out[name] = PlannedProbe(cfg, train_shards, eval_shards, classes)
    return out


def sweep_settings(name: str, cfg: dict) -> config.SweepConfig:
    """A sweep's settings besides its `train` and `saes` grids, typed."""
    settings = {k: v for k, v in cfg.items() if k not in ("train", "saes")}
    render = typed(config.RenderConfig, settings.get("render", {}), f"sweeps.{name}.render")
    externals = tuple(
        typed(config.ExternalSaeConfig, entry, f"sweeps.{name}.external_saes[{i}]")
        for i, entry in enumerate(settings.get("external_saes", []))
    )
    interventions = tuple(
        typed(config.InterventionConfig, entry, f"sweeps.{name}.interventions[{i}]")
        for i, entry in enumerate(settings.get("interventions", []))
    )
    baselines = tuple(
        typed(config.BaselineConfig, entry, f"sweeps.{name}.baselines[{i}]")
        for i, entry in enumerate(settings.get("baselines", []))
    )
    values = {**settings, "render": render, "external_saes": externals}
    values |= {"interventions": interventions, "baselines": baselines}
    return typed(config.SweepConfig, values, f"sweeps.{name}")


def train_eval_shards(
    where: str, train_name: str, eval_name: str | None, activations: dict, shard_jobs: dict
) -> tuple[str, str]:
    """The training and held-out shard hashes of a sweep or probe (`where`), checked to come
    from one model of one width; no held-out activations: the training ones."""
    train_shards = lookup(activations, train_name, f"{where}.train_activations")
    eval_name = eval_name or train_name
    eval_shards = lookup(activations, eval_name, f"{where}.eval_activations")
    train_md, eval_md = shard_jobs[train_shards].metadata, shard_jobs[eval_shards].metadata
    if model_of(train_md) != model_of(eval_md):
        raise PlanError(
            f"{where}.eval_activations: train and eval activations come from different models"
        )
    if train_md.d_vit != eval_md.d_vit:
        raise PlanError(
            f"{where}.eval_activations: {eval_name!r} has d_vit {eval_md.d_vit}, the "
            f"training activations {train_md.d_vit}"
        )
    return train_shards, eval_shards


def sweep_saes(
    name: str,
    cfg: dict,
    train_shards: str,
    train_md: shards.Metadata,
    eval_md: shards.Metadata,
    ignore_labels: tuple[int, ...] = (),
) -> tuple[dict[str, dict], dict[str, config.SaeSpec]]:
    """Every grid point as an SAE: id -> flat configuration (what the id hashes), id -> typed
    configs; each checked against the activations it reads. The sweep's `ignore_labels` joins
    each point only when set, so sweeps without it keep their ids."""
    saes, specs = {}, {}
    for point, where in sweep_points(name, cfg):
        if ignore_labels:
            point = {**point, "ignore_labels": list(ignore_labels)}
            where = {**where, "ignore_labels": f"sweeps.{name}"}
        try:
            spec = config.sae_spec(train_md.d_vit, point)
        except config.ConfigError as err:
            raise PlanError(
                f"{where.get(err.field, f'sweeps.{name}')}.{err.field}: {err.message}"
            ) from None
        check_layer(spec.train.layer, where["layer"], train_md, eval_md)
        available = n_vectors(train_md, spec.train.tokens)
        if spec.train.batch_size > available:
            raise PlanError(
                f"{where['batch_size']}.batch_size: {spec.train.batch_size} exceeds the "
                f"{available} {spec.train.tokens} vectors of the training activations"
            )
        sae_cfg = {**point, "shards": train_shards}
        sae_id = short_hash(sae_cfg)
        saes[sae_id], specs[sae_id] = sae_cfg, spec
    return saes, specs


def check_include_latents(name: str, render: config.RenderConfig, d_sae: dict[str, int]):
    """Every latent `render.include_latents` names exists in every SAE it is drawn for."""
    if not render.include_latents or not d_sae:
        return
    smallest = min(d_sae, key=d_sae.get)
    if (top := max(render.include_latents)) >= d_sae[smallest]:
        raise PlanError(
            f"sweeps.{name}.render.include_latents: latent {top} does not exist in SAE "
            f"{smallest}, whose d_sae is {d_sae[smallest]} (latents 0..{d_sae[smallest] - 1})"
        )


def check_layer(layer: int, where: str, train_md: shards.Metadata, eval_md: shards.Metadata):
    for md, which in ((train_md, "train"), (eval_md, "eval")):
        if layer not in md.layers:
            raise PlanError(
                f"{where}.layer: layer {layer} is not recorded by the {which} activations "
                f"(layers {list(md.layers)})"
            )


def sweep_groups(
    saes: dict[str, dict], cap: int, recorded: dict[str, RecordedGroup]
) -> tuple[dict[str, Group], dict[str, str]]:
    """The training jobs of a sweep's SAEs, and each SAE's group.

    An SAE an earlier run trained stays in that run's group, which is kept as it was recorded
    (same id, same members, so it never reruns for a grid that grew or shrank). The other SAEs
    (new grid points, or SAEs whose `sae.pt` was lost) form new groups of their own: those that
    share a data stream (`STREAM_KEYS`), in groups of at most `cap`, named by stream and members.
    """
    groups: dict[str, Group] = {}
    sae_group: dict[str, str] = {}
    for group_id in sorted(recorded):
        mine = [s for s in sorted(recorded[group_id].trained) if s in saes and s not in sae_group]
        if mine:
            groups[group_id] = Group(id=group_id, saes=recorded[group_id].saes)
            sae_group |= dict.fromkeys(mine, group_id)
    by_stream: dict[str, list[str]] = {}
    for sae_id in sorted(set(saes) - set(sae_group)):
        stream = {k: saes[sae_id][k] for k in STREAM_KEYS if k in saes[sae_id]}
        by_stream.setdefault(json.dumps(stream, sort_keys=True), []).append(sae_id)
    for stream_json, sae_ids in by_stream.items():
        stream = json.loads(stream_json)
        for lo in range(0, len(sae_ids), cap):
            members = tuple(sae_ids[lo : lo + cap])
            group_id = f"layer{stream['layer']}-{short_hash([stream, members])[:8]}"
            groups[group_id] = Group(id=group_id, saes={s: saes[s] for s in members})
            sae_group |= dict.fromkeys(members, group_id)
    return groups, sae_group


def check_group_memory(name: str, group: Group, d_vit: int, limit_gib: float):
    """A group whose training would not fit is refused now, with the estimate, not by the
    allocator hours into a queued job."""
    specs = {s: config.sae_spec(d_vit, flat) for s, flat in group.saes.items()}
    parts = [config.training_memory_bytes(spec) for spec in specs.values()]
    state_gib, batch_gib = (sum(p[i] for p in parts) / 2**30 for i in (0, 1))
    if state_gib + batch_gib > limit_gib:
        widest = max(specs, key=lambda s: specs[s].sae.d_sae)
        raise PlanError(
            f"sweeps.{name}.max_group_memory_gib: group {group.id} ({len(specs)} SAEs, the widest "
            f"{widest} with d_sae {specs[widest].sae.d_sae}) needs about "
            f"{state_gib + batch_gib:.1f} GiB to train ({state_gib:.1f} GiB of weights, gradients "
            f"and optimiser state, {batch_gib:.1f} GiB per batch), over the limit of {limit_gib:g}"
            " GiB: lower exp_factor, batch_size or max_saes_per_group, or raise "
            "max_group_memory_gib if the GPU has the memory"
        )


def group_dpath(sweep: str, group_id: str) -> str:
    return f"{RESULTS_DPATH}/{sweep}/groups/{group_id}"


def recorded_groups(workdir: pathlib.Path, sweep: str) -> dict[str, RecordedGroup]:
    """The groups of `sweep` that earlier runs in `workdir` planned and trained at least one SAE
    of: their spec files under results/specs/ say the members, a `sae.pt` in the group's folder
    that the member was trained (the file is renamed into place whole). One stat per member."""
    out = {}
    specs_dpath = workdir / pathlib.Path(sweep_spec_fpath(sweep, "groups", "-")).parent
    for spec_fpath in sorted(specs_dpath.glob("*.json")):
        try:
            job = jobs.TrainGroupJob.read(spec_fpath)
        except jobs.SpecError as err:  # written by another version: its SAEs train anew
            logger.warning("%s; its group is planned anew", err)
            continue
        dpath = workdir / group_dpath(sweep, job.group)
        trained = frozenset(s for s in job.saes if (dpath / s / "sae.pt").is_file())
        if trained:
            out[job.group] = RecordedGroup(saes=job.saes, trained=trained)
    return out


def external_saes(
    name: str,
    sweep_cfg: config.SweepConfig,
    train_shards: str,
    metadata: tuple[shards.Metadata, shards.Metadata],
    sae_labels: dict[str, str],
) -> dict[str, config.ExternalSaeConfig]:
    """Id -> each external SAE, checked for its layer and a name no other SAE has."""
    out: dict[str, config.ExternalSaeConfig] = {}
    for i, external in enumerate(sweep_cfg.external_saes):
        where = f"sweeps.{name}.external_saes[{i}]"
        check_layer(external.layer, where, *metadata)
        taken = {*sae_labels.values(), *(e.name for e in out.values())}
        if external.name in taken:
            raise PlanError(f"{where}.name: {external.name!r} is already the label of another SAE")
        out[short_hash({**dataclasses.asdict(external), "shards": train_shards})] = external
    return out


def plan_baselines(
    name: str,
    sweep_cfg: config.SweepConfig,
    train_shards: str,
    metadata: tuple[shards.Metadata, shards.Metadata],
    sae_labels: dict[str, str],
) -> dict[str, config.BaselineConfig]:
    """Id -> each baseline, checked against the activations it is fitted on and for a label no
    other SAE has."""
    out: dict[str, config.BaselineConfig] = {}
    train_md = metadata[0]
    for i, baseline in enumerate(sweep_cfg.baselines):
        where = f"sweeps.{name}.baselines[{i}]"
        check_layer(baseline.layer, where, *metadata)
        try:
            d_sae = baseline.sae_config(train_md.d_vit).d_sae
        except config.ConfigError as err:
            raise PlanError(f"{where}.{err.field}: {err.message}") from None
        check_include_latents(name, sweep_cfg.render, {baseline.label: d_sae})
        available = n_vectors(train_md, baseline.tokens)
        if baseline.batch_size > available:
            raise PlanError(
                f"{where}.batch_size: {baseline.batch_size} exceeds the {available} "
                f"{baseline.tokens} vectors of the training activations"
            )
        if baseline.kind == "kmeans" and d_sae > baseline.n_train:
            raise PlanError(
                f"{where}.n_train: {baseline.n_train} vectors cannot start {d_sae} centroids "
                f"(d_vit {train_md.d_vit} x exp_factor {baseline.exp_factor})"
            )
        taken = {*sae_labels.values(), *(b.label for b in out.values())}
        if baseline.label in taken:
            raise PlanError(
                f"{where}: its label {baseline.label!r} is already another SAE's; give it a name"
            )
        identity = {**dataclasses.asdict(baseline), "name": None, "shards": train_shards}
        out[short_hash({"baseline": identity})] = baseline
    return out


def trait_classes(name: str, train_job: ShardJob, eval_job: ShardJob) -> tuple[str, ...]:
    """The class names saev's trait metrics score, when both dumps have patch labels."""
    jobs_ = (train_job, eval_job)
    if not all(j.metadata.records_labels for j in jobs_):
        return ()
    train_classes = probe_classes("patch", train_job.dataset_cfg, f"sweeps.{name}")
    eval_classes = probe_classes("patch", eval_job.dataset_cfg, f"sweeps.{name}")
    if train_classes != eval_classes:
        raise PlanError(
            f"sweeps.{name}.eval_activations: its label classes differ from the training "
            "activations', so their patch labels cannot be compared"
        )
    return train_classes


def validate_config(config_dct: dict):
    """Check `config_dct` against the schema, filling its defaults in place; the first error
    names the config path (`sweeps.s.train[0].exp_factor: 0 is less than the minimum of 1`)."""
    import jsonschema
    import yaml
    from snakemake.utils import validate

    schema = yaml.safe_load(SCHEMA_FPATH.read_text())
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(config_dct)
    )
    if error is not None:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        raise PlanError(f"{path.lstrip('.') or 'config'}: {error.message}")
    validate(config_dct, str(SCHEMA_FPATH))


def make_plan(config_dct: dict, rescan: bool = True, workdir: pathlib.Path | None = None) -> Plan:
    """Everything the workflow needs to know about jobs, from a config `validate_config` checked.

    `rescan=False` (in jobs Snakemake starts) reuses the folder datasets' cached scans.
    `workdir` is the workflow directory whose earlier runs' groups are kept (`sweep_groups`);
    None plans as if nothing was trained yet."""
    top = {k: config_dct[k] for k in ("shards_dpath", "device") if k in config_dct}
    workflow = typed(config.WorkflowConfig, top, "config")
    dataset_cfgs = {
        name: resolve_dataset(name, cfg) for name, cfg in config_dct["datasets"].items()
    }
    activations, shard_jobs = {}, {}
    for spec_name, spec_cfg in config_dct["activations"].items():
        where = f"activations.{spec_name}"
        spec = typed(
            config.ActivationsConfig, {**spec_cfg, "layers": tuple(spec_cfg["layers"])}, where
        )
        metadata = shard_metadata(spec_name, spec, config_dct["models"], dataset_cfgs, rescan)
        if spec.n_parts > metadata.n_shards:
            raise PlanError(
                f"{where}.n_parts: {spec.n_parts} parts cannot split "
                f"{metadata.n_shards} shard(s); use at most {metadata.n_shards}"
            )
        activations[spec_name] = metadata.hash
        shard_jobs.setdefault(
            metadata.hash,
            ShardJob(
                metadata=metadata,
                dataset=spec.dataset,
                dataset_cfg=dataset_cfgs[spec.dataset],
                activations=spec,
                weights=config_dct["models"][spec.model].get("weights"),
            ),
        )
    planned_probes = plan_probes(config_dct.get("probes", {}), activations, shard_jobs)
    sweeps = {
        name: plan_sweep(
            name,
            cfg,
            activations,
            shard_jobs,
            recorded_groups(workdir, name) if workdir else {},
            planned_probes,
        )
        for name, cfg in config_dct["sweeps"].items()
    }
    check_external_saes(sweeps, shard_jobs)
    return Plan(
        workflow=workflow,
        datasets=dataset_cfgs,
        activations=activations,
        shard_jobs=shard_jobs,
        sweeps=sweeps,
        specs=job_specs(workflow, dataset_cfgs, shard_jobs, sweeps, planned_probes),
        probes=planned_probes,
    )


def check_external_saes(sweeps: dict[str, Sweep], shard_jobs: dict[str, ShardJob]):
    """Each external SAE is an export this workflow writes, or an existing file whose header
    reads as a known layout with the activations' width."""
    exports = {
        export_fpath(name, sweep.labels[sae_id])
        for name, sweep in sweeps.items()
        for sae_id in sweep.saes
    }
    for name, sweep in sweeps.items():
        d_vit = shard_jobs[sweep.train_shards].metadata.d_vit
        for i, external in enumerate(sweep.cfg.external_saes):
            where = f"sweeps.{name}.external_saes[{i}].fpath"
            fpath = pathlib.Path(external.fpath)
            if external.fpath in exports:
                continue
            if external.fpath.startswith(f"{RESULTS_DPATH}/exports/"):
                raise PlanError(
                    f"{where}: {fpath} is not an export of a trained SAE; exports are "
                    f"{RESULTS_DPATH}/exports/<sweep>/<label, spaces as ->.saev5.pt"
                )
            if fpath.is_dir():
                raise PlanError(f"{where}: {fpath} is a directory; give the SAE's file (sae.pt)")
            if not fpath.is_file():
                raise PlanError(f"{where}: {fpath} does not exist")
            try:
                layout = checkpoints.layout(fpath, checkpoints.read_header(fpath))
            except checkpoints.CheckpointError as err:
                raise PlanError(f"{where}: {err}") from None
            if layout.cfg.d_vit != d_vit:
                raise PlanError(
                    f"{where}: {fpath} reads d_vit {layout.cfg.d_vit} activations, the "
                    f"sweep's are {d_vit} wide"
                )
            check_include_latents(name, sweep.cfg.render, {external.name: layout.cfg.d_sae})
