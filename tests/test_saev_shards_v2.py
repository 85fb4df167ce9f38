"""saev 3d73f1f's protocol-2.1 shard directory (`../shared/interop/saev-shards-v2.1/`, written by
saev's own dump code) read exactly as saev's loaders return it, and fed to our steps."""

import base64
import dataclasses
import json
import pickle
import shutil

import numpy as np
import pytest
import test_workflow
import torch
import yaml
from conftest import group_spec, run_snakemake
from safetensors.torch import save_file
from test_checkpoints import INTEROP, needs_interop
from test_weights import CONFIG_FPATH, random_vit

from saev_core import config, jobs, loaders, sae, shards
from saev_core.planning import config_files, plan
from saev_core.steps import dump, evaluate, topk, train
from saev_core.steps import traits as traits_step

pytestmark = needs_interop
CLIP_MODEL = {
    "family": "clip",
    "ckpt": "ViT-B-32/openai",
    "d_vit": 768,
    "n_patches_per_img": 49,
    "cls_token": True,
}
CLASSES = tuple(f"class {c}" for c in range(6))
"""saev's fixture labels patches 0 (background) to 5."""


@pytest.fixture(scope="module")
def saev_dpath():
    return INTEROP / "saev-shards-v2.1" / "60ff8db4"


@pytest.fixture(scope="module")
def expected():
    return np.load(INTEROP / "saev-shards-v2.1" / "expected.npz")


def test_metadata_reads_with_saev_names_and_hashes_by_saev_rule(saev_dpath):
    md = shards.Metadata.load(saev_dpath)
    assert (md.vit_family, md.d_vit, md.n_imgs, md.n_patches_per_img) == ("fake-clip", 64, 100, 64)
    assert (md.n_imgs_per_shard, md.n_shards, md.layers) == (40, 3, (-2, -1))
    assert md.dataset == "/data/saev-fixture/segdata" and md.pixel_agg == "majority"
    assert md.data.startswith("gASV")  # saev's pickled dataset config, kept opaque
    assert md.hash == saev_dpath.name == "60ff8db4"
    assert md.to_json() == (saev_dpath / "metadata.json").read_text()
    assert md.listing() == json.loads((saev_dpath / "shards.json").read_text())


def test_vectors_labels_and_cls_match_saevs_loaders(saev_dpath, expected):
    reader = shards.ShardReader(saev_dpath)
    got = np.stack(
        [
            reader.image_tokens(int(i), int(layer), "patches")[t]
            for i, t, layer in expected["coords"]
        ]
    )
    np.testing.assert_array_equal(got, expected["indexed_act"])
    np.testing.assert_array_equal(got, expected["ordered_act"])
    np.testing.assert_array_equal(reader.labels(), expected["labels"])
    # The true [CLS] vectors, not what saev's indexed reader returns for them (its bug 1).
    cls = np.stack(
        [
            [reader.image_tokens(int(i), int(layer), "cls")[0] for layer in expected["cls_layers"]]
            for i in expected["cls_imgs"]
        ]
    )
    np.testing.assert_array_equal(cls, expected["cls_raw"])
    assert not np.array_equal(cls, expected["cls_indexed_act"])
    # Our ordered loader walks every patch vector in disk order, as saev's did.
    raw = np.concatenate(
        [
            np.memmap(
                saev_dpath / shards.shard_fname(s), "<f4", "r", shape=reader.metadata.shard_shape
            )[: reader.metadata.shard_n_imgs(s), 1, 1:]
            for s in range(3)
        ]
    )
    ordered = np.concatenate([x for _, x in loaders.OrderedLoader(reader, -1, "patches")])
    np.testing.assert_array_equal(ordered, raw)


def copy_of(saev_dpath, tmp_path):
    dpath = tmp_path / saev_dpath.name
    shutil.copytree(saev_dpath, dpath)
    for fpath in dpath.iterdir():
        fpath.chmod(0o644)
    return dpath


def test_malformed_2_1_directories_are_refused_by_name(saev_dpath, tmp_path):
    dpath = copy_of(saev_dpath, tmp_path)
    md = json.loads((dpath / "metadata.json").read_text())
    edits = [
        ({k if k != "n_examples" else "n_imgs": v for k, v in md.items()}, "missing"),
        ({**md, "family": "tiny"}, "'family' must be one of saev's"),
        ({**md, "pixel_agg": "mean"}, "'pixel_agg' must be one of"),
    ]
    for edited, message in edits:
        (dpath / "metadata.json").write_text(json.dumps(edited, indent=2))
        with pytest.raises(ValueError, match=message):
            shards.ShardReader(dpath)
    (dpath / "metadata.json").write_text(json.dumps(md, indent=2))
    listing = json.loads((dpath / "shards.json").read_text())
    (dpath / "shards.json").write_text(
        json.dumps([{"name": e["name"], "n_imgs": e["n_examples"]} for e in listing])
    )
    with pytest.raises(shards.ShardError, match="only entries with n_examples 0"):
        shards.ShardReader(dpath)
    (dpath / "shards.json").write_text(json.dumps(listing))
    # labels.bin is optional in protocol 2.1, but whole when it is there.
    (dpath / "labels.bin").write_bytes(b"\0" * 100)
    with pytest.raises(shards.ShardError, match="labels.bin must exist with 6400 bytes"):
        shards.ShardReader(dpath)
    (dpath / "labels.bin").unlink()
    assert shards.ShardReader(dpath).labels() is None


def test_our_steps_train_evaluate_and_score_on_saevs_directory(saev_dpath, tmp_path):
    spec = group_spec(layer=-1, n_train=256 * 50, topk={"activation": "topk", "k": 8})
    model = train.train_group(spec, saev_dpath, tmp_path / "group", device="cpu")["topk"]
    assert (tmp_path / "group" / "topk" / "sae.pt").exists()
    reader = shards.ShardReader(saev_dpath)
    result = evaluate.evaluate(model, reader, -1, "patches", class_names=list(CLASSES))
    assert result.metrics["normalized_mse"] < 0.9 and result.metrics["l0"] == pytest.approx(8)
    assert result.concepts  # concept recovery ran on saev's labels
    best = topk.top_k(model, reader, -1, "patches", k=4)
    assert best.top_imgs.shape == (model.cfg.d_sae, 4) and best.top_imgs.max() < 100
    job = jobs.TraitsJob(
        sae_fpath=str(tmp_path / "group" / "topk" / "sae.pt"),
        sae_sha256=None,
        train_shards=saev_dpath.name,
        eval_shards=saev_dpath.name,
        train_shards_dpath=str(saev_dpath),
        eval_shards_dpath=str(saev_dpath),
        layer=-1,
        classes=CLASSES,
    )
    rows, scalars = traits_step.measure(job, sae.load(job.sae_fpath))
    assert len(rows) == 6 and scalars["n_train_patches"] == 6400
    assert 0 < scalars["map"] <= 1 and torch.isfinite(torch.tensor(scalars["probe_r"]))


def test_our_writer_writes_saevs_bytes_for_saevs_activations(saev_dpath, tmp_path):
    md = shards.Metadata.load(saev_dpath)
    saev_reader = shards.ShardReader(saev_dpath)
    writer = shards.ShardWriter(tmp_path / md.hash, md)
    for shard_i in range(md.n_shards):
        acts_SLTD = writer.open_shard(shard_i)
        acts_SLTD[:] = saev_reader.shard(shard_i)
        writer.finish_shard(shard_i, acts_SLTD)
    writer.write_labels(np.array(saev_reader.labels()))
    writer.publish()
    ours = {f.name for f in (tmp_path / md.hash).iterdir()}
    saevs = {f.name for f in saev_dpath.iterdir()}
    assert ours - saevs == {shards.checksums_fname(i) for i in range(3)}  # our checksums, beside
    for name in sorted(saevs):
        assert (tmp_path / md.hash / name).read_bytes() == (saev_dpath / name).read_bytes(), name


@pytest.fixture(scope="module")
def clip_weights_fpath(tmp_path_factory):
    """A random-weight CLIP ViT-B/32 as a local weights file (nothing to download)."""
    torch.manual_seed(0)
    fpath = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    state = random_vit("clip", "ViT-B-32/openai").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(fpath))
    return fpath


def test_an_activations_entry_asking_for_2_1_dumps_saevs_layout(
    saev_dpath, clip_weights_fpath, tmp_path, dataset_cfg
):
    models = {
        "clip": {**CLIP_MODEL, "weights": str(clip_weights_fpath)},
        "tiny": test_workflow.CONFIG["models"]["tiny"],
    }
    datasets_ = {"synthetic": {**dataset_cfg, "n_imgs": 40, "img_size": 64, "seed": 0}}
    spec = config.ActivationsConfig(
        model="clip",
        dataset="synthetic",
        layers=(-2, -1),
        max_patches_per_shard=50 * 2 * 16,
        protocol="2.1",
    )
    md = plan.shard_metadata("clip-2.1", spec, models, datasets_)
    assert md.protocol == "2.1" and len(md.hash) == 8 and md.pixel_agg == "majority"
    assert pickle.loads(base64.b64decode(md.data))["__class__"] == "synthetic"  # no saev needed
    dpath = dump.dump(
        md,
        dataset_cfg,
        tmp_path / "shards",
        batch_size=16,
        device="cpu",
        weights_fpath=clip_weights_fpath,
    )
    assert dpath.name == md.hash
    saev_md = json.loads((saev_dpath / "metadata.json").read_text())
    ours = json.loads((dpath / "metadata.json").read_text())
    assert list(ours) == list(saev_md) and ours["family"] == "clip"
    listing = json.loads((dpath / "shards.json").read_text())
    assert [set(e) for e in listing] == [{"name", "n_examples"}] * 3
    reader = shards.ShardReader(dpath)
    assert reader.labels().shape == (40, 49) and reader.has_labels

    tiny = dataclasses.replace(spec, model="tiny")
    with pytest.raises(plan.PlanError, match=r"activations.tiny-2.1.protocol: .*'tiny' is not one"):
        plan.shard_metadata("tiny-2.1", tiny, models, datasets_)


def test_the_workflow_runs_on_protocol_2_1_under_saevs_directory_name(
    clip_weights_fpath, tmp_path, monkeypatch
):
    """Every rule runs on a directory with an 8-digit name (saev's hash rule) and 2.1 fields."""
    cfg = yaml.safe_load(CONFIG_FPATH.read_text())
    cfg["datasets"] = {"synthetic-train": {**cfg["datasets"]["synthetic-train"], "n_imgs": 24}}
    cfg["models"] = {"clip": {**CLIP_MODEL, "weights": str(clip_weights_fpath)}}
    cfg["activations"] = {
        "clip-train": {
            "model": "clip",
            "dataset": "synthetic-train",
            "layers": [-1],
            "max_patches_per_shard": 50 * 16,
            "batch_size": 8,
            "n_parts": 2,
            "protocol": "2.1",
        }
    }
    sweep = cfg["sweeps"]["tiny-synthetic"]
    cfg["probes"] = {}
    cfg["sweeps"] = {
        "clip": {
            "train_activations": "clip-train",
            "train": [{**sweep["train"][0], "layer": -1, "n_train": 1024, "exp_factor": 1}],
            "saes": [{"activation": "topk", "k": 4}],
        }
    }
    config_fpath = tmp_path / "experiments.yaml"
    config_fpath.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)  # the plan's dataset root and caches, as the run sees them
    shards_hash = plan.make_plan(config_files.load(config_fpath)).activations["clip-train"]
    assert len(shards_hash) == 8
    run = run_snakemake(tmp_path, "--configfile", str(config_fpath), "--cores", "2", "all")
    assert run.returncode == 0, run.stderr[-3000:]
    reader = shards.ShardReader(tmp_path / "results" / "shards" / shards_hash)
    assert reader.metadata.protocol == "2.1" and reader.n_imgs == 24 and reader.has_labels
    assert json.loads((reader.dpath / "shards.json").read_text())[-1] == {
        "name": "acts000001.bin",
        "n_examples": 8,
    }
    sae_dpaths = list((tmp_path / "results" / "clip" / "saes").iterdir())
    assert len(sae_dpaths) == 1
    assert json.loads((sae_dpaths[0] / "metrics.json").read_text())["l0"] == pytest.approx(4)
    assert (sae_dpaths[0] / "traits.json").exists()  # saev's trait metrics, on 2.1's labels
    assert (sae_dpaths[0] / "browser.html").exists()
