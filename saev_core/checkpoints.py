"""The `sae.pt` layouts: ours and every one saev has written, read here without torch.

A checkpoint is one line of JSON (the header), then a `torch.save` of the state dict with
`W_enc (D, F)`, `b_enc (F)`, `W_dec (F, D)`, `b_dec (D)`. What the header says, and what the
encoder does, changed over saev's history (`../shared/interop/README.md` has files of each):

| layout | header | encoder |
| --- | --- | --- |
| saev pre-schema (its published SAEs) | flat `d_vit, exp_factor, ...` | ReLU of `(x - b_dec) @ W_enc + b_enc` |
| saev schema 1, commit 2202d3f | `cls: Relu`, saev's config fields | the same |
| saev schema 1, f5d892c and later | `cls: Relu / TopK / BatchTopK` | `x @ W_enc + b_enc`, then: ReLU; TopK: the k largest as they are; BatchTopK: the k largest of the whole batch |
| saev schema 5 (upstream today) | `cfg.activation: {cls, params}` | `x @ W_enc + b_enc`, then ReLU; TopK as above; BatchTopK: `x if x > threshold` (`activation.threshold`) |
| ours, saev-compatible (`relu`, `topk`, `batchtopk`) | saev's schema-1 header for that class, plus our `saev_snakemake` section | saev's, with `b_enc - b_dec @ W_enc` stored so saev computes our latents |
| ours, other (`jumprelu`, normalised inputs; older files) | `cls: SparseAutoencoder` (saev refuses it) | ours: `(x - b_dec) @ W_enc + b_enc` |

An SAE loaded from a file whose encoder does not subtract `b_dec` keeps that encoder
(`subtracts_b_dec` off), and saev's TopK and f5d892c's BatchTopK keep saev's encodings
(`encoding`: `saev-topk`, `saev-batchtopk`, see `sae.SAEV_ENCODINGS`), so it computes exactly
what the code that wrote it computes.
"""

import dataclasses
import io
import json
import pathlib
import typing

from .config import KINDS, ConfigError, SaeConfig

OUR_KEY = "saev_snakemake"
"""Our own section of a saev-compatible header; saev ignores keys it does not know."""
SAEV_SCHEMA1_FIELDS = (
    "d_vit",
    "exp_factor",
    "n_reinit_samples",
    "remove_parallel_grads",
    "normalize_w_dec",
    "seed",
)
"""saev's schema-1 `Relu` config fields (f5d892c); `TopK` and `BatchTopK` add `top_k`."""
SUBTRACTING_COMMITS = ("2202d3f",)
"""saev commits whose schema-1 encoder subtracts b_dec (f5d892c and later do not)."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names the file."""


class Layout(typing.NamedTuple):
    """How to read one file's weights as our `SparseAutoencoder`."""

    name: str
    """e.g. `saev schema 5 (TopK)`: for logs and error messages."""
    cfg: SaeConfig
    subtracts_b_dec: bool
    """Whether the file's encoder subtracts b_dec before the encoder product."""
    renames: dict[str, str]
    """File tensor name -> ours."""
    header_tensors: dict[str, float]
    """Values of ours that the header carries instead of the state dict."""
    train: dict | None
    """The training configuration of an SAE this workflow trained."""
    encoding: str | None = None
    """saev's own encoding where it differs from the kind's (`saev-topk`, `saev-batchtopk`)."""


def parse_header(fpath: pathlib.Path, line: bytes) -> dict:
    try:
        header = json.loads(line.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{fpath}: the first line is not a JSON header ({err}): not an sae.pt file, or damaged"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{fpath}: the JSON header is a {type(header).__name__}, not an object"
        )
    return header


def read_header(fpath: pathlib.Path) -> dict:
    """The JSON header line of a checkpoint, without loading the weights."""
    with open(fpath, "rb") as fd:
        return parse_header(fpath, fd.readline())


def read(fpath: pathlib.Path) -> tuple[dict, dict]:
    """Header and state dict (tensors on the CPU, loaded with `weights_only=True`)."""
    import torch

    with open(fpath, "rb") as fd:
        header = parse_header(fpath, fd.readline())
        payload = fd.read()
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except Exception as err:
        raise CheckpointError(
            f"{fpath}: cannot read the weights after the header ({type(err).__name__}: {err}); "
            "the file is truncated or damaged"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{fpath}: the weights are a {type(state).__name__}, not a state dict"
        )
    return header, state


def layout(fpath: pathlib.Path, header: dict) -> Layout:
    """Which layout `header` is, and so how to load the file; unknown ones are refused."""
    try:
        if OUR_KEY in header:
            return ours(header)
        if "schema" not in header:
            return saev_pre_schema(header)
        if header["schema"] == 1 and header.get("cls") == "SparseAutoencoder":
            cfg = our_cfg(header["cfg"])  # before saev-compatible headers
            return Layout("saev-snakemake (schema 1)", cfg, True, {}, {}, header.get("train"))
        if header["schema"] == 1:
            return saev_schema1(header)
        if header["schema"] == 5:
            return saev_schema5(header)
    except ConfigError as err:
        raise CheckpointError(f"{fpath}: header field {err.field}: {err.message}") from None
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{fpath}: header lacks {err} for its layout") from None
    raise CheckpointError(
        f"{fpath}: unknown checkpoint layout (schema {header.get('schema')!r}, cls "
        f"{header.get('cls')!r}); known: saev pre-schema, schema 1 (Relu, TopK, BatchTopK, "
        "SparseAutoencoder) and schema 5"
    )


def our_cfg(cfg: dict) -> SaeConfig:
    fields = {f.name for f in dataclasses.fields(SaeConfig)}
    return SaeConfig(**{k: v for k, v in cfg.items() if k in fields})


def ours(header: dict) -> Layout:
    section = header[OUR_KEY]
    cfg = our_cfg(section["cfg"])
    native = header.get("cls") == "SparseAutoencoder"
    name = "saev-snakemake" if native else f"saev-snakemake as saev {header['cls']}"
    extra = {"threshold": section["threshold"]} if "threshold" in section else {}
    return Layout(name, cfg, native, {}, extra, section.get("train"))


def saev_pre_schema(header: dict) -> Layout:
    cfg = SaeConfig(
        d_vit=header["d_vit"],
        exp_factor=header["exp_factor"],
        activation="relu",
        sparsity_coeff=header.get("sparsity_coeff", 0.0),
        seed=header.get("seed", 0),
    )
    return Layout("saev pre-schema (ReLU)", cfg, True, {}, {}, None)


def saev_schema1(header: dict) -> Layout:
    cls, cfg = header["cls"], header["cfg"]
    kinds = {"Relu": "relu", "TopK": "topk", "BatchTopK": "batchtopk"}
    encodings = {"TopK": "saev-topk", "BatchTopK": "saev-batchtopk"}
    if cls not in kinds:
        raise ConfigError("cls", f"{cls!r} is not one of saev's schema-1 classes {list(kinds)}")
    expected = set(SAEV_SCHEMA1_FIELDS) | ({"top_k"} if cls != "Relu" else set())
    if set(cfg) != expected:
        missing, extra = sorted(expected - set(cfg)), sorted(set(cfg) - expected)
        raise ConfigError(
            "cfg",
            f"saev {cls} needs exactly {sorted(expected)}; missing {missing}, unexpected {extra}",
        )
    commit = str(header.get("commit", ""))
    subtracts = any(commit.startswith(c) for c in SUBTRACTING_COMMITS)
    sae_cfg = SaeConfig(
        d_vit=cfg["d_vit"],
        exp_factor=cfg["exp_factor"],
        activation=kinds[cls],
        k=cfg.get("top_k", 0),
        seed=cfg["seed"],
    )
    name = f"saev schema 1 ({cls}, commit {commit or '?'})"
    return Layout(name, sae_cfg, subtracts, {}, {}, None, encodings.get(cls))


def saev_schema5(header: dict) -> Layout:
    cfg = header["cfg"]
    d_model, d_sae = cfg["d_model"], cfg["d_sae"]
    if d_sae % d_model:
        raise ConfigError("cfg.d_sae", f"{d_sae} is not a multiple of d_model {d_model}")
    activation = cfg["activation"]
    cls, params = activation["cls"], activation["params"]
    common = dict(d_vit=d_model, exp_factor=d_sae // d_model)
    renames, encoding = {}, None
    if cls == "Relu":
        coeff = params.get("sparsity", {}).get("params", {}).get("coeff", 0.0)
        sae_cfg = SaeConfig(**common, activation="relu", sparsity_coeff=coeff)
    elif cls == "TopK":
        sae_cfg = SaeConfig(**common, activation="topk", k=params["top_k"])
        encoding = "saev-topk"
    elif cls == "BatchTopK":
        sae_cfg = SaeConfig(**common, activation="batchtopk", k=params["top_k"])
        renames = {"activation.threshold": "threshold"}
    else:
        raise ConfigError("cfg.activation.cls", f"{cls!r} is not Relu, TopK or BatchTopK")
    return Layout(f"saev schema 5 ({cls})", sae_cfg, False, renames, {}, None, encoding)


def saev_header(cfg: SaeConfig, section: dict) -> dict:
    """The header of an SAE of ours: saev's schema-1 header where saev can represent the SAE
    (its loader at f5d892c reads it), else our own class name, which saev refuses."""
    saev_class = KINDS[cfg.activation].saev_class
    if saev_class is None or cfg.normalize:
        return {
            "schema": 1,
            "cls": "SparseAutoencoder",
            "cfg": dataclasses.asdict(cfg),
            OUR_KEY: section,
        }
    saev_cfg = {
        "d_vit": cfg.d_vit,
        "exp_factor": cfg.exp_factor,
        "n_reinit_samples": 1024 * 16 * 32,
        "remove_parallel_grads": True,
        "normalize_w_dec": True,
        "seed": cfg.seed,
    }
    if KINDS[cfg.activation].takes_k:
        saev_cfg["top_k"] = cfg.k
    return {"schema": 1, "cls": saev_class, "cfg": saev_cfg, OUR_KEY: section}
