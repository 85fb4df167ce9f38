"""One frozen dataclass per rule: everything its step reads, resolved by the planner.

The planner (`saev_core.planning.plan`) builds a job per rule and wildcard, writes it to
`results/specs/` as JSON (`to_json`), and the rule runs `python -m saev_core.steps.<step>
--spec-fpath SPEC` plus its output paths (and `--device`); the step reads the job back with
`read` and nothing else from the command line. Reading is strict, the way
`shards.Metadata.from_dict` is: a missing or unknown field, or a value of the wrong type, fails
naming the spec file and the field.

A job's `identity` is what its outputs depend on: the rule takes its hash as a param, so a changed
identity reruns the job. Fields listed in `EXECUTION` only say where or how the job runs (the
shard root, worker counts, checkpoint interval, W&B project): changing them rewrites the spec,
which the next run of the job reads, and reruns nothing. Torch-free, so the planner imports it.
"""

import dataclasses
import hashlib
import json
import pathlib
import types
import typing

from . import config, shards


class SpecError(ValueError):
    """A spec file that is not the job its step expects; the message names file and field."""


def short_hash(obj) -> str:
    """Hash of a JSON value's canonical form (sorted keys, no spaces): ids, params."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


class Job:
    """Base of every job: JSON in and out, and the identity that decides reruns."""

    EXECUTION: typing.ClassVar[tuple[str, ...]] = ()
    """Fields that say where or how the job runs, not what it computes."""

    def to_dict(self) -> dict:
        return {f.name: encode(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    def identity(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in self.EXECUTION}

    def identity_hash(self) -> str:
        """The rule's `spec` param: equal identities never rerun a job."""
        return short_hash(self.identity())

    @classmethod
    def read(cls, fpath: str | pathlib.Path):
        fpath = pathlib.Path(fpath)
        try:
            value = json.loads(fpath.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SpecError(f"{fpath}: cannot read the {cls.__name__} spec: {err}") from None
        return decode(cls, value, f"{fpath}: {cls.__name__}")


def encode(value):
    """A job field as JSON: dataclasses by their fields (`to_dict` where they have one),
    tuples as lists."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


def decode(tp, value, where: str):
    """`value` (parsed JSON) as type `tp`, or a SpecError naming `where`. Every field of a
    dataclass must be present, and no other."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return decode(inner, value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected an object, got {type(value).__name__}")
        if tp is shards.Metadata:
            try:
                return shards.Metadata.from_dict(value)
            except (TypeError, ValueError) as err:
                raise SpecError(f"{where}: {err}") from None
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        if missing := sorted(set(names) - set(value)):
            raise SpecError(f"{where}: missing field {missing[0]!r}")
        if extra := sorted(set(value) - set(names)):
            raise SpecError(f"{where}: unknown field {extra[0]!r}; fields are {sorted(names)}")
        fields = {n: decode(hints[n], value[n], f"{where}.{n}") for n in names}
        try:
            return tp(**fields)
        except config.ConfigError as err:
            raise SpecError(f"{where}.{err.field}: {err.message}") from None
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected an object, got {type(value).__name__}")
        return {k: decode(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list):
            raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
        item_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise SpecError(f"{where}: expected {len(item_types)} items, got {len(value)}")
        pairs = enumerate(zip(item_types, value, strict=True))
        return tuple(decode(t, v, f"{where}[{i}]") for i, (t, v) in pairs)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise SpecError(f"{where}: expected int, got bool")
    if tp in (int, str, bool, dict) and isinstance(value, tp):
        return value
    raise SpecError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SyntheticJob(Job):
    """Generate the planted-concept image set (`synthetic_dataset`)."""

    n_imgs: int
    img_size: int
    seed: int


@dataclasses.dataclass(frozen=True)
class DumpPartJob(Job):
    """Record one part's disjoint range of whole shards (`dump_activations`)."""

    metadata: shards.Metadata
    dataset: dict
    """The dataset's config with `root` resolved."""
    weights: str | None
    """The model's local weights file, if any."""
    part: int
    n_parts: int
    shards_dpath: str
    """The shard directory itself: `<shards_dpath>/<metadata hash>`."""
    batch_size: int
    n_workers: int
    EXECUTION = ("shards_dpath", "batch_size", "n_workers")


@dataclasses.dataclass(frozen=True)
class PublishJob(Job):
    """Write `labels.bin` where the dataset has masks, check every shard, publish `shards.json`
    (`publish_activations`)."""

    metadata: shards.Metadata
    dataset: dict
    shards_dpath: str
    n_workers: int
    EXECUTION = ("shards_dpath", "n_workers")


GROUP_FNAME = "group.json"
"""What a group's training job writes last, beside its SAEs' folders: the rule's declared output,
so a failed rerun (Snakemake deletes declared outputs) leaves the previous `sae.pt` files."""


@dataclasses.dataclass(frozen=True)
class TrainGroupJob(Job):
    """Train the SAEs of one sweep group on one stream of batches (`train_group`)."""

    group: str
    model: str
    """The ViT the SAEs read, as family:checkpoint."""
    saes: dict[str, dict]
    """SAE id -> its flat configuration: what the id hashes and `sae.pt` stores."""
    shards_dpath: str
    work_dpath: str
    """Checkpoints and logs while training, outside the declared output (kept after a kill)."""
    checkpoint_every: int
    wandb_project: str | None
    EXECUTION = ("shards_dpath", "work_dpath", "checkpoint_every", "wandb_project")


@dataclasses.dataclass(frozen=True)
class FitBaselineJob(Job):
    """Fit one baseline dictionary on a sweep's training activations (`fit_baseline`)."""

    baseline: config.BaselineConfig
    shards: str
    """Hash of the training shard directory."""
    shards_dpath: str
    EXECUTION = ("shards_dpath",)


@dataclasses.dataclass(frozen=True)
class TraitsJob(Job):
    """saev's trait-discovery metrics of one SAE or baseline (`trait_metrics`): per (latent,
    class) 1-D logistic probes fitted on the training patches, scored on the held-out ones."""

    sae_fpath: str
    sae_sha256: str | None
    train_shards: str
    eval_shards: str
    train_shards_dpath: str
    eval_shards_dpath: str
    layer: int
    classes: tuple[str, ...]
    EXECUTION = ("sae_fpath", "train_shards_dpath", "eval_shards_dpath")


@dataclasses.dataclass(frozen=True)
class EvaluateJob(Job):
    """Metrics, latent statistics and concept recovery on held-out activations (`evaluate_sae`)."""

    sae_fpath: str
    sae_sha256: str | None
    """An external SAE file's SHA-256, so a replaced file reruns whatever its mtime; None for
    the SAEs this workflow writes (their jobs' outputs carry their changes)."""
    shards: str
    """Hash of the held-out shard directory."""
    shards_dpath: str
    layer: int
    tokens: str
    dataset: dict
    """The held-out dataset's config (its class names)."""
    ignore_labels: tuple[int, ...] = ()
    """Patch classes left out, as in the SAE's training (its sweep's `ignore_labels`)."""
    EXECUTION = ("shards_dpath", "sae_fpath")


@dataclasses.dataclass(frozen=True)
class TopkJob(Job):
    """Per latent, the top images and value statistics over the training activations
    (`topk_images`)."""

    sae_fpath: str
    sae_sha256: str | None
    shards: str
    shards_dpath: str
    layer: int
    tokens: str
    top_k: int
    percentile: float
    EXECUTION = ("shards_dpath", "sae_fpath")


@dataclasses.dataclass(frozen=True)
class RenderJob(Job):
    """Heatmaps and the feature browser of one SAE (`render_features`)."""

    sae_id: str
    label: str
    sae_fpath: str
    sae_sha256: str | None
    topk_fpath: str
    concepts_fpath: str
    shards: str
    shards_dpath: str
    layer: int
    dataset: dict
    render: config.RenderConfig
    interventions: dict[str, str]
    """Intervention name -> this SAE's outputs of it: latent pages say what editing them did."""
    EXECUTION = ("shards_dpath", "sae_fpath", "topk_fpath", "concepts_fpath")


@dataclasses.dataclass(frozen=True)
class SummarizeJob(Job):
    """The sweep table and Pareto plot (`summarize_sweep`)."""

    model: str
    sae_fpaths: dict[str, str]
    """Trained SAE id -> its `sae.pt`."""
    externals: dict[str, config.ExternalSaeConfig]
    baselines: dict[str, config.BaselineConfig]
    """Baseline id -> its settings (its `sae.pt` is in `sae_fpaths` too)."""
    groups: dict[str, str]
    """SAE id -> its group id (`external` for external SAEs, `baseline` for baselines)."""
    labels: dict[str, str]
    metrics_fpaths: dict[str, str]
    """SAE id -> its `metrics.json`."""
    traits_fpaths: dict[str, str]
    """SAE id -> its `traits.json` (saev's trait metrics); empty without patch labels."""
    EXECUTION = ("sae_fpaths", "metrics_fpaths", "traits_fpaths")


@dataclasses.dataclass(frozen=True)
class ExportJob(Job):
    """A trained SAE in today's saev layout (`export_saev`)."""

    sae_id: str
    sae_fpath: str
    EXECUTION = ("sae_fpath",)


PROBE_FNAME = "probe.json"
"""What a probe job writes last: the chosen grid point and its held-out scores."""


@dataclasses.dataclass(frozen=True)
class ProbeJob(Job):
    """Train a probe's grid of learning rates and weight decays on one stream of batches and
    keep the best on held-out activations (`train_probe`)."""

    name: str
    probe: config.ProbeConfig
    train_shards: str
    """Hash of the training shard directory."""
    eval_shards: str
    train_shards_dpath: str
    eval_shards_dpath: str
    train_dataset: dict
    """The training dataset's config (image targets)."""
    eval_dataset: dict
    """The held-out dataset's config (targets, masks for pixel scores)."""
    classes: tuple[str, ...]
    EXECUTION = ("train_shards_dpath", "eval_shards_dpath")


INTERVENTION_FNAME = "intervention.json"
"""What an intervention job writes last: its averages per scale."""


@dataclasses.dataclass(frozen=True)
class InterveneJob(Job):
    """Edit each class's latents of one SAE in held-out activations and measure the probe's
    predictions before, after, and after the same edit of random latents (`intervene`)."""

    sae_id: str
    label: str
    sae_fpath: str
    sae_sha256: str | None
    sae_layer: int
    sae_tokens: str
    concepts_fpath: str
    """The evaluation's `concept_candidates.csv`: each class's ranked latents."""
    topk_fpath: str
    """The top-k pass's `topk.npz`: firing frequencies (control) and percentile values (scale)."""
    probe_fpath: str
    probe: config.ProbeConfig
    intervention: config.InterventionConfig
    shards: str
    """Hash of the held-out shard directory the probe is scored on."""
    shards_dpath: str
    model: dict
    """family, ckpt and weights of the ViT that wrote the shards: run from the SAE's layer on
    when the probe reads a later one."""
    dataset: dict
    """The held-out dataset (images for the ViT and the page)."""
    classes: tuple[str, ...]
    EXECUTION = ("sae_fpath", "concepts_fpath", "topk_fpath", "probe_fpath", "shards_dpath")
