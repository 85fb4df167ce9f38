"""Shared fixtures: a small synthetic image set, its tiny-ViT shard directory, a trained group."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from saev_core import config, jobs, shards
from saev_core.steps import dump, synthetic, train

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


def kill_once_started(argv: list[str], log_fpath: pathlib.Path):
    """Run `argv` and SIGKILL its whole process group as soon as `log_fpath` exists (a job's
    log appears when the job starts): event-driven, so it holds on a loaded machine."""
    run = subprocess.Popen(
        argv,
        env=snakemake_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600  # catches a hang only
    while not log_fpath.exists():
        assert run.poll() is None, f"the run ended before {log_fpath.name} appeared"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()


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


def group_spec(layer: int = -1, n_train: int = 256 * 40, **sae_cfgs) -> dict[str, dict]:
    """A sweep group's SAEs (id -> flat configuration) on one stream of the tiny shards."""
    stream = {"layer": layer, "tokens": "patches", "batch_size": 256, "n_train": n_train, "seed": 0}
    common = {**stream, "lr": 3e-3, "warmup_steps": 2, "exp_factor": 4}
    return {sae_id: {**common, **cfg} for sae_id, cfg in sae_cfgs.items()}


def train_spec_fpath(
    saes: dict[str, dict], shards_dpath, work_dpath, spec_fpath, checkpoint_every: int = 0
) -> pathlib.Path:
    """The spec file of a training job for `saes`, written as the plan writes it."""
    job = jobs.TrainGroupJob(
        group="group",
        model="tiny:vit-tiny-p8-64",
        saes=saes,
        shards_dpath=str(shards_dpath),
        work_dpath=str(work_dpath),
        checkpoint_every=checkpoint_every,
        wandb_project=None,
    )
    spec_fpath.write_text(job.to_json())
    return spec_fpath


@pytest.fixture(scope="session")
def trained_dpath(tmp_path_factory, shards_dpath) -> pathlib.Path:
    out_dpath = tmp_path_factory.mktemp("group")
    spec = group_spec(
        relu={"activation": "relu", "sparsity_coeff": 0.01},
        topk={"activation": "topk", "k": 8},
    )
    train.train_group(spec, shards_dpath, out_dpath, device="cpu")
    return out_dpath


def render_spec_fpath(
    dpath: pathlib.Path, sae_fpath, shards_dpath, dataset_cfg: dict, render_cfg: dict, label: str
) -> pathlib.Path:
    """The spec file of `python -m saev_core.steps.render` for layer -1, written as the plan writes
    it, with `topk.npz` and `concept_candidates.csv` in `dpath`."""
    job = jobs.RenderJob(
        sae_id=pathlib.Path(sae_fpath).parent.name,
        label=label,
        sae_fpath=str(sae_fpath),
        sae_sha256=None,
        topk_fpath=str(dpath / "topk.npz"),
        concepts_fpath=str(dpath / "concept_candidates.csv"),
        shards=pathlib.Path(shards_dpath).name,
        shards_dpath=str(shards_dpath),
        layer=-1,
        dataset=dataset_cfg,
        render=config.build(config.RenderConfig, render_cfg),
        interventions={},
    )
    fpath = dpath / "render-spec.json"
    fpath.write_text(job.to_json())
    return fpath
