"""Shared fixtures: a small synthetic image set, its tiny-ViT shard directory, a trained group."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from saev_core import dump, shards, synthetic, train

N_IMGS = 40
IMG_SIZE = 64
LAYERS = (-2, -1)
# 65 tokens x 2 layers per image: 16 images per shard, so 3 shards with a short last one.
MAX_PATCHES_PER_SHARD = 130 * 16
REPO = pathlib.Path(__file__).parent.parent


def snakemake_argv(workdir: pathlib.Path, *args: str, repo: pathlib.Path = REPO) -> list[str]:
    """This interpreter's Snakemake on `repo`'s workflow, run in `workdir`."""
    snakefile = str(repo / "Snakefile")
    return [sys.executable, "-m", "snakemake", "-s", snakefile, "--directory", str(workdir), *args]


def snakemake_env(**extra: str) -> dict[str, str]:
    """The environment with this venv first on PATH, so jobs run `python -m saev_core` from it."""
    return {
        **os.environ,
        "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
        **extra,
    }


def run_snakemake(workdir: pathlib.Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        snakemake_argv(workdir, *args),
        capture_output=True,
        text=True,
        env=snakemake_env(),
        **kwargs,
    )


def tiny_metadata(n_imgs: int = N_IMGS, **overrides) -> shards.Metadata:
    fields = dict(
        vit_family="tiny",
        vit_ckpt="vit-tiny-p8-64",
        layers=LAYERS,
        n_patches_per_img=64,
        cls_token=True,
        d_vit=64,
        n_imgs=n_imgs,
        max_patches_per_shard=MAX_PATCHES_PER_SHARD,
        data={"__class__": "synthetic", "n_imgs": n_imgs, "img_size": IMG_SIZE, "seed": 0},
        protocol=shards.PROTOCOL_WITH_LABELS,
    )
    return shards.Metadata(**{**fields, **overrides})


@pytest.fixture(scope="session")
def synthetic_dpath(tmp_path_factory) -> pathlib.Path:
    dpath = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(dpath, N_IMGS, IMG_SIZE, seed=0)
    return dpath


@pytest.fixture(scope="session")
def dataset_cfg(synthetic_dpath) -> dict:
    return {"kind": "synthetic", "root": str(synthetic_dpath)}


@pytest.fixture(scope="session")
def shards_dpath(tmp_path_factory, dataset_cfg) -> pathlib.Path:
    root = tmp_path_factory.mktemp("shards")
    return dump.dump(tiny_metadata(), dataset_cfg, root, batch_size=16, device="cpu")


def group_spec(layer: int = -1, n_train: int = 256 * 40, **sae_cfgs) -> dict:
    stream = {"layer": layer, "tokens": "patches", "batch_size": 256, "n_train": n_train, "seed": 0}
    common = {**stream, "lr": 3e-3, "warmup_steps": 2, "exp_factor": 4}
    return {
        "stream": stream,
        "saes": {sae_id: {**common, **cfg} for sae_id, cfg in sae_cfgs.items()},
    }


@pytest.fixture(scope="session")
def trained_dpath(tmp_path_factory, shards_dpath) -> pathlib.Path:
    out_dpath = tmp_path_factory.mktemp("group")
    spec = group_spec(
        relu={"activation": "relu", "sparsity_coeff": 0.01},
        topk={"activation": "topk", "k": 8},
    )
    train.train_group(spec, shards_dpath, out_dpath, device="cpu")
    return out_dpath


def render_spec_args(dpath: pathlib.Path, dataset_cfg: dict, render_cfg: dict, label: str):
    """The spec-file arguments of `python -m saev_core.render`, written as the plan would."""
    shards_spec_fpath = dpath / "shards-spec.json"
    shards_spec = {"metadata": tiny_metadata().to_dict(), "dataset": dataset_cfg}
    shards_spec_fpath.write_text(json.dumps(shards_spec))
    render_spec_fpath = dpath / "render-spec.json"
    render_spec_fpath.write_text(json.dumps({"label": label, "render": render_cfg}))
    return ["--shards-spec-fpath", str(shards_spec_fpath), "--spec-fpath", str(render_spec_fpath)]
