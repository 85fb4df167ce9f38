"""Turn `config/experiments.yaml` into the jobs the workflow runs; no torch, cheap to import.

Used by `workflow/rules/common.smk` while Snakemake plans: shard directories are named by their
metadata hash, sweeps expand into SAEs with ids hashed from their full configuration, and SAEs
that share a training data stream form one sweep group (one job, one pass over the data).
"""

import collections
import dataclasses
import hashlib
import itertools
import json
import pathlib

from . import datasets, shards

RESULTS_DPATH = "results"
SCHEMA_FPATH = (
    pathlib.Path(__file__).parent.parent / "workflow" / "schemas" / "experiments.schema.yaml"
)
# What decides the stream of training batches: SAEs that agree on these share one job.
STREAM_KEYS = ("shards", "layer", "tokens", "batch_size", "n_train", "seed", "normalize")


class PlanError(ValueError):
    """The configuration is valid JSON-Schema-wise but does not make sense as a whole."""


def short_hash(obj) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


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


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """One shard directory to dump."""

    metadata: shards.Metadata
    dataset: str
    batch_size: int
    n_workers: int
    n_parts: int
    """Jobs that each write a disjoint range of whole shards; not part of the hash."""


@dataclasses.dataclass(frozen=True)
class Group:
    """SAEs trained together on one data stream."""

    id: str
    stream: dict
    sae_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    train_shards: str
    eval_shards: str
    dataset: str
    saes: dict[str, dict]
    """SAE id -> full configuration."""
    groups: dict[str, Group]
    sae_group: dict[str, str]
    """SAE id -> group id."""
    top_k: int
    percentile: float
    render: dict
    checkpoint_every: int
    """Training steps between checkpoints (execution only: not in any id)."""
    wandb_project: str | None
    """Weights & Biases project for the training logs; None: off (execution only)."""
    labels: dict[str, str]
    """SAE id -> short readable label, unique within the sweep (e.g. `L-1 topk k=16 x8`)."""


@dataclasses.dataclass(frozen=True)
class Plan:
    datasets: dict[str, dict]
    """Dataset name -> config with `root` resolved (generated sets live under results/)."""
    activations: dict[str, str]
    """Activation spec name -> shard directory hash."""
    shard_jobs: dict[str, ShardJob]
    sweeps: dict[str, Sweep]

    @property
    def generated_datasets(self) -> list[str]:
        return [name for name, cfg in self.datasets.items() if cfg["kind"] == "synthetic"]


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


def shard_metadata(spec_name: str, spec: dict, config: dict, dataset_cfgs: dict) -> shards.Metadata:
    model = lookup(config["models"], spec["model"], f"activations.{spec_name}.model")
    dataset_cfg = lookup(dataset_cfgs, spec["dataset"], f"activations.{spec_name}.dataset")
    data = {k: v for k, v in dataset_cfg.items() if k not in ("kind", "root")}
    if dataset_cfg["kind"] != "synthetic":
        data["root"] = dataset_cfg["root"]
    has_masks = dataset_cfg["kind"] in datasets.KINDS_WITH_MASKS
    try:
        return shards.Metadata(
            vit_family=model["family"],
            vit_ckpt=model["ckpt"],
            layers=tuple(spec["layers"]),
            n_patches_per_img=model["n_patches_per_img"],
            cls_token=model["cls_token"],
            d_vit=model["d_vit"],
            n_imgs=datasets.count_images(dataset_cfg),
            max_patches_per_shard=spec["max_patches_per_shard"],
            data={**data, "__class__": dataset_cfg["kind"]},
            protocol=shards.PROTOCOL_WITH_LABELS if has_masks else shards.PROTOCOL,
        )
    except (ValueError, datasets.DatasetError) as err:
        raise PlanError(f"activations.{spec_name}: {err}") from err


def lookup(table: dict, name: str, where: str):
    if name not in table:
        raise PlanError(f"{where}: {name!r} is not defined; known: {sorted(table)}")
    return table[name]


def plan_sweep(name: str, cfg: dict, activations: dict, shard_jobs: dict) -> Sweep:
    train_shards = lookup(activations, cfg["train_activations"], f"sweeps.{name}.train_activations")
    eval_name = cfg.get("eval_activations", cfg["train_activations"])  # optional, no default
    eval_shards = lookup(activations, eval_name, f"sweeps.{name}.eval_activations")
    train_md, eval_md = shard_jobs[train_shards].metadata, shard_jobs[eval_shards].metadata
    if (train_md.vit_family, train_md.vit_ckpt) != (eval_md.vit_family, eval_md.vit_ckpt):
        raise PlanError(f"sweeps.{name}: train and eval activations come from different models")

    for key in ("log10_freq_range", "log10_value_range"):
        lo, hi = cfg["render"][key]
        if lo > hi:
            raise PlanError(f"sweeps.{name}.render.{key}: min {lo} is above max {hi}")

    saes = {}
    for point in expand_grid({"train": cfg["train"], "sae": cfg["saes"]}):
        sae_cfg = {**point["train"], **point["sae"], "shards": train_shards}
        for md, which in ((train_md, "train"), (eval_md, "eval")):
            if sae_cfg["layer"] not in md.layers:
                raise PlanError(
                    f"sweeps.{name}.train.layer: layer {sae_cfg['layer']} is not recorded by the "
                    f"{which} activations (layers {list(md.layers)})"
                )
        saes[short_hash(sae_cfg)] = sae_cfg

    by_stream: dict[str, list[str]] = {}
    for sae_id in sorted(saes):
        stream = {k: saes[sae_id][k] for k in STREAM_KEYS}
        by_stream.setdefault(json.dumps(stream, sort_keys=True), []).append(sae_id)
    groups, sae_group = {}, {}
    cap = cfg["max_saes_per_group"]
    for stream_json, sae_ids in by_stream.items():
        stream = json.loads(stream_json)
        for lo in range(0, len(sae_ids), cap):
            members = tuple(sae_ids[lo : lo + cap])
            group_id = f"layer{stream['layer']}-{short_hash([stream, members])[:8]}"
            groups[group_id] = Group(id=group_id, stream=stream, sae_ids=members)
            sae_group.update(dict.fromkeys(members, group_id))
    return Sweep(
        name=name,
        train_shards=train_shards,
        eval_shards=eval_shards,
        dataset=shard_jobs[train_shards].dataset,
        saes=saes,
        groups=groups,
        sae_group=sae_group,
        top_k=cfg["top_k"],
        percentile=cfg["percentile"],
        render=cfg["render"],
        checkpoint_every=cfg["checkpoint_every"],
        wandb_project=cfg.get("wandb_project"),  # optional, no default
        labels=sae_labels(saes),
    )


def format_number(value) -> str:
    """Short text for a config value: 0.0004 -> 4e-4, 0.01 -> 0.01, 16 -> 16."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value).lower() if isinstance(value, bool) else str(value)
    if value != 0 and abs(value) < 1e-2:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.3g}"


def base_label(cfg: dict) -> str:
    """What a person tells SAEs of a sweep apart by: layer, tokens, activation and its sparsity
    knob, width, and the options that change the architecture."""
    parts = [f"L{cfg['layer']}"]
    if cfg.get("tokens", "patches") != "patches":
        parts.append(cfg["tokens"])
    activation = cfg["activation"]
    if activation == "relu":
        parts.append(f"relu l1={format_number(cfg['sparsity_coeff'])}")
    elif activation == "jumprelu":
        parts.append(f"jumprelu l0={format_number(cfg['sparsity_coeff'])}")
    else:
        parts.append(f"{activation} k={cfg['k']}")
    parts.append(f"x{cfg['exp_factor']}")
    if cfg.get("matryoshka"):
        parts.append("matryoshka")
    if cfg.get("aux_k"):
        parts.append(f"auxk={cfg['aux_k']}")
    return " ".join(parts)


def sae_labels(saes: dict[str, dict]) -> dict[str, str]:
    """A label per SAE id, unique within the sweep: SAEs that would share a base label get the
    keys in which they differ appended (`lr=3e-4`)."""
    by_base: dict[str, list[str]] = {}
    for sae_id in sorted(saes):
        by_base.setdefault(base_label(saes[sae_id]), []).append(sae_id)
    labels = {}
    for base, sae_ids in by_base.items():
        keys = sorted({k for s in sae_ids for k in saes[s]} - {"shards"})
        differing = [k for k in keys if len({json.dumps(saes[s].get(k)) for s in sae_ids}) > 1]
        for sae_id in sae_ids:
            extra = [f"{k}={format_number(saes[sae_id].get(k))}" for k in differing]
            labels[sae_id] = " ".join([base, *extra])
    counts = collections.Counter(labels.values())
    # Values that differ only beyond the printed digits: the id settles it.
    return {s: label if counts[label] == 1 else f"{label} {s}" for s, label in labels.items()}


def load_config(fpath: pathlib.Path) -> dict:
    """Read an experiments YAML and validate it, filling the schema's defaults, as Snakemake does."""
    import yaml

    config = yaml.safe_load(pathlib.Path(fpath).read_text())
    validate_config(config)
    return config


def validate_config(config: dict):
    """Check `config` against the schema, filling its defaults in place."""
    from snakemake.utils import validate

    validate(config, str(SCHEMA_FPATH))


def make_plan(config: dict) -> Plan:
    """Everything the workflow needs to know about jobs, from a config `load_config` validated."""
    dataset_cfgs = {name: resolve_dataset(name, cfg) for name, cfg in config["datasets"].items()}
    activations, shard_jobs = {}, {}
    for spec_name, spec in config["activations"].items():
        metadata = shard_metadata(spec_name, spec, config, dataset_cfgs)
        if spec["n_parts"] > metadata.n_shards:
            raise PlanError(
                f"activations.{spec_name}.n_parts: {spec['n_parts']} parts cannot split "
                f"{metadata.n_shards} shard(s); use at most {metadata.n_shards}"
            )
        activations[spec_name] = metadata.hash
        shard_jobs.setdefault(
            metadata.hash,
            ShardJob(
                metadata=metadata,
                dataset=spec["dataset"],
                batch_size=spec["batch_size"],
                n_workers=spec["n_workers"],
                n_parts=spec["n_parts"],
            ),
        )
    sweeps = {
        name: plan_sweep(name, cfg, activations, shard_jobs)
        for name, cfg in config["sweeps"].items()
    }
    return Plan(
        datasets=dataset_cfgs, activations=activations, shard_jobs=shard_jobs, sweeps=sweeps
    )
