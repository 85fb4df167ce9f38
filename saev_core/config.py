"""Typed settings, torch-free so the planner can build and check them.

One frozen dataclass per concept (model, activation dump, SAE, training stream, render settings,
external SAE, sweep, the workflow's top level) and `KINDS`, what each activation kind takes. Every
default is written once, here: the schema repeats them for users, and a test checks each default
of the schema against this module. Datasets stay mappings checked by `datasets` (their keys differ
by kind). `__post_init__` rejects values that cannot work together, raising `ConfigError` with the
field at fault; the planner prefixes the config path (`sweeps.tiny-synthetic.saes[1].k: 100000
exceeds d_sae 512`), so `snakemake -n` fails before any job starts. The jobs (`saev_core.jobs`)
carry these objects to the steps.
"""

import dataclasses
import typing

TOKENS = ("patches", "cls", "all")
LR_SCHEDULES = ("constant", "cosine")
MATRYOSHKA_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1)
"""Matryoshka, `fixed` prefixes: reconstruct from these fractions of the latents too."""
MATRYOSHKA_RULES = ("sampled", "fixed")
MATRYOSHKA_N_PREFIXES = 10
"""Matryoshka, `sampled` prefixes (saev's rule): prefix lengths drawn each step, d_sae included."""
MATRYOSHKA_PARETO_POWER = 0.5
"""The Pareto distribution's power of saev's prefix lengths (lower: more uniform)."""


@dataclasses.dataclass(frozen=True)
class Kind:
    """An activation kind as a configuration sees it: the settings it takes and the saev class
    that can represent it. Its encoding and loss are `sae.ACTIVATIONS[name]`."""

    name: str
    penalty: str | None = None
    """What `sparsity_coeff` weighs: `l1` (the latents' sum) or `l0` (their count); None: the
    kind keeps `k` latents instead and takes no penalty."""
    saev_class: str | None = None
    """saev's class for it (schema 1 and 5); None: saev cannot represent it."""
    trainable: bool = True
    """False for the encodings of fitted baselines (`BaselineConfig`), which no sweep trains."""

    @property
    def takes_k(self) -> bool:
        """`k` (and AuxK's `aux_k`) apply."""
        return self.penalty is None


KINDS = {
    kind.name: kind
    for kind in (
        Kind("relu", penalty="l1", saev_class="Relu"),
        Kind("topk", saev_class="TopK"),
        Kind("batchtopk", saev_class="BatchTopK"),
        Kind("jumprelu", penalty="l0"),
        Kind("kmeans", trainable=False),
    )
}
"""Every activation an SAE can have: those it can train with, and `kmeans` (the nearest of
`d_sae` centroids, value 1), the encoding of the k-means baseline."""


class ConfigError(ValueError):
    """A configuration value that cannot work; `field` names it (dotted below the entry)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def build(cls, values: dict, *, ignore: tuple[str, ...] = ()):
    """`cls(**values)`, with unknown keys rejected by name."""
    fields = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(values) - fields - set(ignore)):
        raise ConfigError(
            unknown[0], f"is not a setting of {cls.__name__}; known: {sorted(fields)}"
        )
    return cls(**{k: v for k, v in values.items() if k in fields})


def defaults(cls) -> dict:
    """Field -> default of a config class (fields without one are left out)."""
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


@dataclasses.dataclass(frozen=True)
class SaeConfig:
    """Shape, activation and objective of one SAE."""

    d_vit: int
    """Input width."""
    exp_factor: int = 8
    """d_sae = d_vit * exp_factor."""
    activation: str = "relu"
    """`relu` (L1 penalty), `topk` (k largest per example), `batchtopk` (k x batch largest over
    the batch; a learned threshold at inference) or `jumprelu` (per-latent threshold, L0 penalty);
    `kmeans` only for the k-means baseline (nearest centroid, value 1; k is 1)."""
    sparsity_coeff: float = 0.0
    """Weight of the L1 (relu) or L0 (jumprelu) penalty."""
    k: int = 0
    """Latents kept per example (topk, batchtopk)."""
    matryoshka: bool = False
    """Also reconstruct from nested prefixes of the latents (nested dictionaries)."""
    matryoshka_prefixes: str = "fixed"
    """Which prefixes (default `fixed`: saev's rule measured 3 % worse NMSE on the quality
    benchmark): `sampled` (saev's rule: each step 10 lengths drawn from a Pareto
    distribution of power 0.5, d_sae among them) or `fixed` (1/8, 1/4, 1/2 and all of d_sae);
    the loss is the mean of their reconstruction errors either way."""
    aux_k: int = 0
    """AuxK (topk, batchtopk): dead latents used to model the residual; 0 turns it off."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many training tokens counts as dead."""
    normalize: bool = False
    """Subtract the data mean and scale to mean squared norm d_vit; constants are stored."""
    seed: int = 0
    """Seed of the weight initialisation."""
    b_dec_init: str = "mean"
    """`mean`: b_dec starts at the first batch's mean; `zero`: at 0 (saev's trainer)."""
    decoder_norm: str = "unit"
    """`unit`: decoder rows renormalised to norm 1 after every step, their gradient along the row
    removed (saev's trainer); `penalised`: rows free, each latent's L1 term weighted by its row's
    norm (Anthropic's April 2024 update; relu only)."""
    init_from_data: bool = False
    """Decoder rows start from first-batch vectors (minus b_dec, unit norm) blended 0.8 with
    random directions, the encoder as the decoder's transpose (saev's `reinit_blend`); else
    random unit rows. Pair it with `grad_clip`: without it the quality benchmark diverged."""

    def __post_init__(self):
        if self.activation not in KINDS:
            raise ConfigError(
                "activation", f"must be one of {list(KINDS)}, got {self.activation!r}"
            )
        kind = KINDS[self.activation]
        with_k = [k.name for k in KINDS.values() if k.takes_k and k.trainable]
        with_penalty = [k.name for k in KINDS.values() if k.penalty]
        if self.d_vit < 1:
            raise ConfigError("d_vit", f"must be at least 1, got {self.d_vit}")
        if self.exp_factor < 1:
            raise ConfigError("exp_factor", f"must be at least 1, got {self.exp_factor}")
        if kind.takes_k and self.k < 1:
            raise ConfigError("k", f"{kind.name} needs k >= 1, got {self.k}")
        if kind.name == "kmeans" and self.k != 1:
            raise ConfigError("k", f"kmeans keeps the nearest centroid only (k = 1), got {self.k}")
        if kind.takes_k and self.k > self.d_sae:
            raise ConfigError("k", f"{self.k} exceeds d_sae {self.d_sae}")
        if not kind.takes_k and self.k:
            raise ConfigError("k", f"applies to {' and '.join(with_k)}, not {kind.name}")
        if self.aux_k and not kind.takes_k:
            raise ConfigError("aux_k", f"applies to {' and '.join(with_k)}, not {kind.name}")
        if not 0 <= self.aux_k <= self.d_sae:
            raise ConfigError("aux_k", f"{self.aux_k} is not in 0..d_sae {self.d_sae}")
        if self.sparsity_coeff < 0:
            raise ConfigError("sparsity_coeff", f"must be >= 0, got {self.sparsity_coeff}")
        if self.sparsity_coeff and not kind.penalty:
            raise ConfigError(
                "sparsity_coeff", f"applies to {' and '.join(with_penalty)}, not {kind.name}"
            )
        if self.aux_coeff < 0:
            raise ConfigError("aux_coeff", f"must be >= 0, got {self.aux_coeff}")
        if self.dead_tokens < 1:
            raise ConfigError("dead_tokens", f"must be at least 1, got {self.dead_tokens}")
        if self.decoder_norm not in ("unit", "penalised"):
            raise ConfigError(
                "decoder_norm", f"must be 'unit' or 'penalised', got {self.decoder_norm!r}"
            )
        if self.decoder_norm == "penalised" and kind.name != "relu":
            raise ConfigError("decoder_norm", f"penalised applies to relu, not {kind.name}")
        if self.matryoshka_prefixes not in MATRYOSHKA_RULES:
            raise ConfigError(
                "matryoshka_prefixes",
                f"must be one of {list(MATRYOSHKA_RULES)}, got {self.matryoshka_prefixes!r}",
            )
        if self.b_dec_init not in ("mean", "zero"):
            raise ConfigError("b_dec_init", f"must be 'mean' or 'zero', got {self.b_dec_init!r}")

    @property
    def d_sae(self) -> int:
        return self.d_vit * self.exp_factor

    @property
    def prefixes(self) -> list[int]:
        """Latent counts whose reconstructions are trained every step (only d_sae without
        matryoshka or with sampled prefixes, whose others change each step)."""
        if not self.matryoshka or self.matryoshka_prefixes == "sampled":
            return [self.d_sae]
        return sorted({max(1, int(self.d_sae * frac)) for frac in MATRYOSHKA_FRACTIONS})


def check_budget(n_train: int, batch_size: int):
    """A stream of `n_train` vectors in batches of `batch_size` holds at least one batch."""
    if batch_size < 1:
        raise ConfigError("batch_size", f"must be at least 1, got {batch_size}")
    if n_train < batch_size:
        raise ConfigError("n_train", f"{n_train} is less than one batch ({batch_size} vectors)")


STREAM = {"stream": True}
"""Field metadata: this setting decides the stream of training batches."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The data stream and optimisation of one SAE. SAEs that agree on the stream fields (and
    the training activations) share one job and the same batches."""

    layer: int = dataclasses.field(metadata=STREAM)
    """Recorded layer to train on."""
    n_train: int = dataclasses.field(metadata=STREAM)
    """Training budget in token vectors."""
    batch_size: int = dataclasses.field(metadata=STREAM)
    """Token vectors per step."""
    lr: float
    """Adam learning rate."""
    tokens: str = dataclasses.field(default="patches", metadata=STREAM)
    """Which token vectors: `patches`, `cls` or `all`."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    seed: int = dataclasses.field(default=0, metadata=STREAM)
    """Seed of the data order and the initialisation."""
    lr_schedule: str = "constant"
    """After warm-up, `constant` or `cosine` decay to zero at the last step."""
    sparsity_warmup_steps: int = 0
    """Linear warm-up steps of the sparsity coefficient."""
    normalize: bool = False
    """Subtract the data mean and scale to mean squared norm d_vit (constants stored in sae.pt)."""
    grad_clip: float = 0.0
    """Clip each SAE's gradient to this global norm before the update; 0 is off."""
    ignore_labels: tuple[int, ...] = dataclasses.field(default=(), metadata=STREAM)
    """Patch classes (`labels.bin` ids) left out of training and evaluation, as saev's label
    filtering (set on the sweep: `SweepConfig.ignore_labels`)."""

    def __post_init__(self):
        object.__setattr__(self, "ignore_labels", tuple(self.ignore_labels))
        check_ignore_labels(self.ignore_labels, self.tokens)
        if self.grad_clip < 0:
            raise ConfigError("grad_clip", f"must be >= 0, got {self.grad_clip}")
        if self.tokens not in TOKENS:
            raise ConfigError("tokens", f"must be one of {list(TOKENS)}, got {self.tokens!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError("lr_schedule", f"must be one of {list(LR_SCHEDULES)}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        check_budget(self.n_train, self.batch_size)
        for name in ("warmup_steps", "sparsity_warmup_steps", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")

    @property
    def n_steps(self) -> int:
        return self.n_train // self.batch_size


def check_ignore_labels(ignore_labels: tuple, tokens: str):
    if not all(isinstance(c, int) and 0 <= c <= 255 for c in ignore_labels):
        raise ConfigError(
            "ignore_labels", f"must list labels.bin class ids 0..255, got {list(ignore_labels)}"
        )
    if len(set(ignore_labels)) != len(ignore_labels):
        raise ConfigError("ignore_labels", f"lists a class twice: {list(ignore_labels)}")
    if ignore_labels and tokens != "patches":
        raise ConfigError("ignore_labels", f"filters patches by label; tokens is {tokens!r}")


SAE_KEYS = tuple(f.name for f in dataclasses.fields(SaeConfig) if f.name != "d_vit")
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
STREAM_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("stream"))


class SaeSpec(typing.NamedTuple):
    """One SAE of a sweep as its training job sees it."""

    sae: SaeConfig
    train: TrainConfig


def training_memory_bytes(spec: SaeSpec) -> tuple[int, int]:
    """An SAE's training memory, estimated: its weights with their gradients and AdamW's two
    moments (4 copies of 2 * d_vit * d_sae + d_sae + d_vit floats), and per batch its
    pre-activations and latents with their gradients (4 copies of batch_size * d_sae floats)."""
    d_vit, d_sae = spec.sae.d_vit, spec.sae.d_sae
    state = 4 * 4 * (2 * d_vit * d_sae + d_sae + d_vit)
    batch = 4 * 4 * spec.train.batch_size * d_sae
    return state, batch


def sae_spec(d_vit: int, flat: dict) -> SaeSpec:
    """The typed SAE and training configs from one flat sweep point (as `sae.pt` headers and
    group specs store it; `shards` names the training activations and is not checked here)."""
    if unknown := sorted(set(flat) - set(SAE_KEYS) - set(TRAIN_KEYS) - {"shards"}):
        raise ConfigError(unknown[0], "is not an SAE or training setting")
    sae_values = {k: flat[k] for k in SAE_KEYS if k in flat}
    sae = SaeConfig(d_vit=d_vit, **sae_values)
    if not KINDS[sae.activation].trainable:
        raise ConfigError(
            "activation", f"{sae.activation} is a baseline's encoding: list it under `baselines`"
        )
    return SaeSpec(sae=sae, train=TrainConfig(**{k: flat[k] for k in TRAIN_KEYS if k in flat}))


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """Which latents the feature browser draws (see render.select_latents)."""

    n_latents: int = 24
    """Latents rendered per SAE, besides include_latents; the nearest fill up when too few pass."""
    n_images: int = 16
    """Top images shown per rendered latent (at most top_k)."""
    seed: int = 0
    """Seed of the random choice of latents."""
    log10_freq_range: tuple[float, float] = (-6.0, -1.0)
    """Render latents firing on between 10^min and 10^max of the tokens."""
    log10_value_range: tuple[float, float] = (-3.0, 3.0)
    """Render latents whose mean value when firing lies in 10^min to 10^max."""
    include_latents: tuple[int, ...] = ()
    """Latents always rendered (if they fired), whatever the filters."""

    def __post_init__(self):
        for name in ("log10_freq_range", "log10_value_range", "include_latents"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # YAML gives lists
        for name in ("log10_freq_range", "log10_value_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ConfigError(name, f"min {lo} is above max {hi}")
        for name in ("n_latents", "n_images"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "log10_freq_range": list(self.log10_freq_range),
            "log10_value_range": list(self.log10_value_range),
            "include_latents": list(self.include_latents),
        }


@dataclasses.dataclass(frozen=True)
class ExternalSaeConfig:
    """An existing `sae.pt` (ours or any saev layout) that a sweep evaluates and browses like
    the SAEs it trains."""

    name: str
    """Its label in the sweep table, the report and the browser."""
    fpath: str
    """The checkpoint; `results/exports/<sweep>/<label>.saev5.pt` is made by the export rule."""
    layer: int
    """Recorded layer it reads."""
    tokens: str = "patches"
    """Token kind it reads: `patches`, `cls` or `all`."""

    def __post_init__(self):
        if self.tokens not in TOKENS:
            raise ConfigError("tokens", f"must be one of {list(TOKENS)}, got {self.tokens!r}")


BASELINE_KINDS = ("pca", "kmeans", "random")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """A dictionary that learned nothing or learned without sparsity, fitted on a sweep's training
    activations and then evaluated, top-k'd, rendered and probed by the very steps its SAEs go
    through (`saev_core.baselines` says how each is fitted and encodes)."""

    kind: str
    """`pca` (the k largest-magnitude principal-component coefficients per token), `kmeans`
    (the nearest of d_vit x exp_factor centroids, L0 = 1) or `random` (an untrained TopK SAE:
    random unit decoder, the encoder its transpose, b_dec the data mean)."""
    layer: int
    """Recorded layer it reads."""
    tokens: str = "patches"
    """Token kind it reads: `patches`, `cls` or `all`."""
    k: int = 0
    """pca: coefficients kept per token; random: TopK's k; kmeans: unused (1)."""
    exp_factor: int = 8
    """kmeans: centroids = d_vit x exp_factor; random: d_sae = d_vit x exp_factor; pca: unused
    (its 2 x d_vit latents are each component's positive and negative half)."""
    n_train: int = 131072
    """Vectors it is fitted on, streamed in shuffled batches (pca, kmeans; random reads one)."""
    batch_size: int = 1024
    """Vectors per batch (k-means: per mini-batch update)."""
    seed: int = 0
    """Seed of the data order, k-means' initial centroids and the random decoder."""
    name: str | None = None
    """Its label in the table, report and browser; None: `L<layer> <kind> ...`."""

    def __post_init__(self):
        if self.kind not in BASELINE_KINDS:
            raise ConfigError("kind", f"must be one of {list(BASELINE_KINDS)}, got {self.kind!r}")
        if self.tokens not in TOKENS:
            raise ConfigError("tokens", f"must be one of {list(TOKENS)}, got {self.tokens!r}")
        if self.kind in ("pca", "random") and self.k < 1:
            raise ConfigError("k", f"a {self.kind} baseline needs k >= 1, got {self.k}")
        if self.kind == "kmeans" and self.k not in (0, 1):
            raise ConfigError("k", f"k-means keeps one centroid per token (k = 1), got {self.k}")
        if self.exp_factor < 1:
            raise ConfigError("exp_factor", f"must be at least 1, got {self.exp_factor}")
        check_budget(self.n_train, self.batch_size)

    def sae_config(self, d_vit: int) -> SaeConfig:
        """The SAE this baseline is, as `sae.pt` stores it."""
        if self.kind == "pca":
            if self.k > d_vit:
                raise ConfigError("k", f"{self.k} exceeds the {d_vit} principal components")
            return SaeConfig(d_vit=d_vit, exp_factor=2, activation="topk", k=self.k)
        if self.kind == "kmeans":
            return SaeConfig(d_vit=d_vit, exp_factor=self.exp_factor, activation="kmeans", k=1)
        return SaeConfig(
            d_vit=d_vit, exp_factor=self.exp_factor, activation="topk", k=self.k, seed=self.seed
        )

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        parts = [f"L{self.layer}", *([self.tokens] if self.tokens != "patches" else [])]
        if self.kind == "pca":
            return " ".join([*parts, f"pca k={self.k}"])
        if self.kind == "kmeans":
            return " ".join([*parts, f"kmeans x{self.exp_factor}"])
        return " ".join([*parts, f"random topk k={self.k} x{self.exp_factor}"])


PROBE_KINDS = ("patch", "image")
POOLINGS = ("cls", "mean")
ACTIONS = ("suppress", "scale")


def as_tuple(value) -> tuple:
    """A YAML scalar or list as a tuple (a one-value grid may be written bare)."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """A linear probe on one layer of one activation dump: per patch (the dump's `labels.bin`)
    or per image (the dataset's target). Every learning rate and weight decay of the grid trains
    in one job on the same batches; the best on the held-out activations is kept."""

    kind: str
    """`patch` (one class per patch) or `image` (one class per image)."""
    train_activations: str
    """Activation dump to train on (a key of `activations`)."""
    layer: int
    """Recorded layer the probe reads."""
    eval_activations: str | None = None
    """Held-out dump that picks the best grid point and that interventions measure on; None:
    the training one."""
    pooling: str = "mean"
    """Image probes: read `[CLS]` (`cls`) or the mean of the patch vectors (`mean`)."""
    ignore_labels: tuple[int, ...] = ()
    """Patch probes: classes whose patches are left out of training and of every metric (saev
    leaves out ADE20K's 0, "other")."""
    n_train: int = 262_144
    """Training budget in vectors (patches or images)."""
    batch_size: int = 1024
    """Vectors per step."""
    lr: tuple[float, ...] = (1e-4,)
    """AdamW learning rates (a grid axis)."""
    weight_decay: tuple[float, ...] = (1e-3,)
    """AdamW weight decays (a grid axis)."""
    seed: int = 0
    """Seed of the data order and the initialisation."""

    def __post_init__(self):
        for name in ("ignore_labels", "lr", "weight_decay"):
            object.__setattr__(self, name, as_tuple(getattr(self, name)))
        if self.kind not in PROBE_KINDS:
            raise ConfigError("kind", f"must be one of {list(PROBE_KINDS)}, got {self.kind!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError("pooling", f"must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.ignore_labels and self.kind != "patch":
            raise ConfigError("ignore_labels", "applies to patch probes")
        check_budget(self.n_train, self.batch_size)
        for name in ("lr", "weight_decay"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ConfigError(name, f"must list distinct values, got {list(values)}")
        if any(not lr > 0 for lr in self.lr):
            raise ConfigError("lr", f"must be > 0, got {list(self.lr)}")
        if any(wd < 0 for wd in self.weight_decay):
            raise ConfigError("weight_decay", f"must be >= 0, got {list(self.weight_decay)}")

    @property
    def tokens(self) -> str:
        """What the probe reads per vector, as the loaders name it (`mean`: pooled patches)."""
        if self.kind == "patch":
            return "patches"
        return "cls" if self.pooling == "cls" else "mean"

    @property
    def grid(self) -> list[tuple[float, float]]:
        """(lr, weight decay) of each probe the job trains, in a fixed order."""
        return [(lr, wd) for lr in self.lr for wd in self.weight_decay]

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            **{k: list(getattr(self, k)) for k in ("ignore_labels", "lr", "weight_decay")},
        }


@dataclasses.dataclass(frozen=True)
class InterventionConfig:
    """An edit of a class's SAE latents, measured by a probe: each SAE of the sweep at or before
    the probe's layer runs it."""

    name: str
    """Names the outputs: results/<sweep>/saes/<sae>/interventions/<name>/."""
    probe: str
    """A key of `probes`."""
    action: str = "suppress"
    """`suppress`: the class's latents set to 0 where they fire; `scale`: set to each scale
    times the latent's percentile value (the top-k pass's, p99 by default) on every token."""
    n_latents: int = 4
    """Latents proposed per class: its best-ranked concept candidates."""
    scales: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
    """`scale`: multiples of the latents' percentile value tried."""
    classes: tuple[str, ...] = ()
    """Class names whose latents are edited; empty: every class with proposed latents."""
    seed: int = 0
    """Seed of the control's random latents."""
    n_images: int = 2
    """Held-out images per class drawn on the interventions page."""

    def __post_init__(self):
        for name in ("scales", "classes"):
            object.__setattr__(self, name, as_tuple(getattr(self, name)))
        if self.action not in ACTIONS:
            raise ConfigError("action", f"must be one of {list(ACTIONS)}, got {self.action!r}")
        if self.n_latents < 1:
            raise ConfigError("n_latents", f"must be at least 1, got {self.n_latents}")
        if not self.scales or any(not s > 0 for s in self.scales):
            raise ConfigError("scales", f"must list positive numbers, got {list(self.scales)}")
        if self.n_images < 0:
            raise ConfigError("n_images", f"must be >= 0, got {self.n_images}")

    @property
    def conditions(self) -> tuple[float, ...]:
        """The edit's scales: (0,) for suppression."""
        return (0.0,) if self.action == "suppress" else self.scales

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "scales": list(self.scales),
            "classes": list(self.classes),
        }


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A sweep's settings besides its `train` and `saes` grids."""

    train_activations: str
    """Activation dump to train on (a key of `activations`)."""
    eval_activations: str | None = None
    """Held-out activation dump to evaluate on; None: the training one."""
    max_saes_per_group: int = 16
    """Largest number of SAEs trained in one job; bigger groups are split."""
    max_group_memory_gib: float = 64.0
    """Planning refuses a group whose estimated training memory exceeds this; not part of any id."""
    checkpoint_every: int = 1000
    """Training steps between checkpoints of a group job (0: none); not part of any id."""
    wandb_project: str | None = None
    """Also log training to this Weights & Biases project; None: off. Not part of any id."""
    top_k: int = 16
    """Images kept per latent by the top-k pass."""
    percentile: float = 99.0
    """Percentile of each latent's values when it fires, estimated in the top-k pass."""
    render: RenderConfig = RenderConfig()
    """What the feature browser shows."""
    external_saes: tuple[ExternalSaeConfig, ...] = ()
    """Existing SAEs evaluated, top-k'd and rendered beside the trained ones."""
    interventions: tuple[InterventionConfig, ...] = ()
    """Edits of each class's latents, measured by a probe (`InterventionConfig`)."""
    baselines: tuple[BaselineConfig, ...] = ()
    """Dictionaries fitted without SAE training, scored beside the SAEs (`BaselineConfig`)."""
    ignore_labels: tuple[int, ...] = ()
    """Patch classes every SAE of the sweep trains and is evaluated without (e.g. `[0]`, the
    background); part of each SAE's id and data stream."""

    def __post_init__(self):
        object.__setattr__(self, "ignore_labels", tuple(self.ignore_labels))
        check_ignore_labels(self.ignore_labels, "patches")
        if not 1 <= self.max_saes_per_group <= 1024:
            raise ConfigError(
                "max_saes_per_group", f"must be in 1..1024, got {self.max_saes_per_group}"
            )
        if self.max_group_memory_gib <= 0:
            raise ConfigError(
                "max_group_memory_gib", f"must be positive, got {self.max_group_memory_gib}"
            )
        if self.checkpoint_every < 0:
            raise ConfigError("checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        if self.top_k < 1:
            raise ConfigError("top_k", f"must be at least 1, got {self.top_k}")
        if not 0 < self.percentile <= 100:
            raise ConfigError("percentile", f"must be in (0, 100], got {self.percentile}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A vision transformer and the shape of its residual stream (checked at dump time)."""

    family: str
    """`tiny`, `clip`, `siglip` or `dinov2`."""
    ckpt: str
    """Checkpoint within the family, e.g. `ViT-B-16/openai`."""
    d_vit: int
    """Residual-stream width."""
    n_patches_per_img: int
    """Patch tokens per image, without [CLS]."""
    cls_token: bool
    """Whether the model has a [CLS] token (stored first)."""
    weights: str | None = None
    """A local weights file (`.safetensors`, or a `.pt`/`.pth` state dict) for the architecture
    `ckpt` names, read instead of a hub cache; None: the family's usual source."""


SHARD_PROTOCOLS = ("1", "2.1")


@dataclasses.dataclass(frozen=True)
class ActivationsConfig:
    """One activation dump: a model run over a dataset."""

    model: str
    """A key of `models`."""
    dataset: str
    """A key of `datasets`."""
    layers: tuple[int, ...]
    """Residual blocks to record; negative indices count from the end."""
    max_patches_per_shard: int = 2_400_000
    """Token vectors per shard file (across layers); decides images per shard."""
    batch_size: int = 64
    """Images per forward pass (speed only)."""
    n_workers: int = 0
    """DataLoader worker processes for decoding (speed only)."""
    n_parts: int = 1
    """Jobs the dump is split into (speed only: the bytes and the hash do not depend on it)."""
    autocast_bf16: bool = False
    """Run the ViT in bfloat16 autocast: faster on GPUs, but other activations (so another shard
    directory: its metadata records the checkpoint as `<ckpt>@bf16`)."""
    protocol: str = "1"
    """The shard protocol to write: `1` (saev's seed version: 1.0.0, or 1.1.0 with labels) or
    `2.1` (saev 3d73f1f's, which today's saev reads; its own directory names)."""

    def __post_init__(self):
        if self.protocol not in SHARD_PROTOCOLS:
            raise ConfigError(
                "protocol", f"must be one of {list(SHARD_PROTOCOLS)}, got {self.protocol!r}"
            )
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError("layers", f"lists a layer twice: {list(self.layers)}")
        for name in ("batch_size", "n_parts"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class WorkflowConfig:
    """The top-level settings of `experiments.yaml` besides its four tables."""

    shards_dpath: str = "results/shards"
    """Where shard directories go (<shards_dpath>/<metadata hash>/)."""
    device: str = "auto"
    """Torch device for the GPU-able steps; `auto` picks CUDA when present."""
