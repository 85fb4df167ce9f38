"""Patches by label (`sweeps.<name>.ignore_labels`, saev's label filtering): training and
evaluation leave out the patches of the listed `labels.bin` classes."""

import copy
import json
import pathlib

import numpy as np
import pytest
import torch
from conftest import group_spec
from PIL import Image

from saev_core import loaders, shards
from saev_core.planning import config_files, plan
from saev_core.steps import evaluate, train

CONFIG_FPATH = pathlib.Path(__file__).parent / "configs" / "tiny.yaml"
BACKGROUND = 0
"""The synthetic images' class 0: the patches no planted concept covers."""


def test_the_loader_delivers_every_other_patch_once_and_none_ignored(shards_dpath):
    reader = shards.ShardReader(shards_dpath)
    labels_NP = np.asarray(reader.labels())
    kept = labels_NP != BACKGROUND
    n_kept = int(kept.sum())
    assert 0.1 < n_kept / labels_NP.size < 0.9  # both kinds of patches are there
    batch_size = 64
    loader = loaders.ShuffledLoader(
        reader,
        -1,
        "patches",
        batch_size,
        n_kept // batch_size * batch_size,  # one epoch
        seed=0,
        buffer_vectors=700,
        labels_NT=labels_NP,
        ignore_labels=(BACKGROUND,),
    )
    xs, labels = zip(*loader, strict=True)
    labels_B = torch.cat(labels)
    assert not (labels_B == BACKGROUND).any()
    delivered = {row.tobytes() for row in torch.cat(xs).numpy()}
    patches_NPD = np.concatenate([x for _, x in loaders.OrderedLoader(reader, -1, "patches")])
    expected = {row.tobytes() for row in patches_NPD[kept]}
    assert len(delivered) == len(labels_B) >= n_kept - batch_size  # one epoch, each once
    assert delivered <= expected
    with pytest.raises(ValueError, match=r"exceeds the \d+ vectors .* left by ignore_labels"):
        loaders.ShuffledLoader(
            reader, -1, "patches", n_kept + 1, 10**6, 0, labels_NT=labels_NP, ignore_labels=(0,)
        )


def test_an_sae_trained_and_evaluated_without_the_background(shards_dpath, tmp_path):
    spec = group_spec(
        n_train=256 * 20, topk={"activation": "topk", "k": 8, "ignore_labels": [BACKGROUND]}
    )
    model = train.train_group(spec, shards_dpath, tmp_path / "group", device="cpu")["topk"]
    reader = shards.ShardReader(shards_dpath)
    names = [f"class {c}" for c in range(int(np.asarray(reader.labels()).max()) + 1)]
    whole = evaluate.evaluate(model, reader, -1, "patches", names)
    kept = evaluate.evaluate(model, reader, -1, "patches", names, ignore_labels=(BACKGROUND,))
    assert kept.metrics["n_vectors"] == int((np.asarray(reader.labels()) != BACKGROUND).sum())
    assert whole.metrics["n_vectors"] == np.asarray(reader.labels()).size
    # Concept recovery scores the planted classes on their own patches, all of them kept.
    assert BACKGROUND not in {c.cls for c in kept.concepts}
    assert {(c.cls, c.n_patches) for c in kept.concepts} == {
        (c.cls, c.n_patches) for c in whole.concepts
    }
    group = json.loads((tmp_path / "group" / "group.json").read_text())
    assert group["stream"]["ignore_labels"] == [BACKGROUND]


@pytest.fixture()
def config():
    return config_files.load(CONFIG_FPATH)


def test_the_filter_is_part_of_every_sae_id_and_stream(config):
    before = plan.make_plan(config)
    filtered = copy.deepcopy(config)
    filtered["sweeps"]["tiny-synthetic"]["ignore_labels"] = [BACKGROUND]
    after = plan.make_plan(filtered)
    old, new = before.sweeps["tiny-synthetic"], after.sweeps["tiny-synthetic"]
    assert len(new.saes) == len(old.saes) and not set(new.saes) & set(old.saes)
    assert not set(new.groups) & set(old.groups)
    assert all(flat["ignore_labels"] == [BACKGROUND] for flat in new.saes.values())
    assert all("ignore_labels" not in flat for flat in old.saes.values())  # ids kept without it
    evaluate_jobs = [
        j for p, j in after.specs.items() if "/evaluate/" in p and "tiny-synthetic" in p
    ]
    assert evaluate_jobs and all(j.ignore_labels == (BACKGROUND,) for j in evaluate_jobs)


def test_a_filter_without_labels_or_out_of_range_is_refused(config, tmp_path):
    config["sweeps"]["tiny-synthetic"]["ignore_labels"] = [BACKGROUND]
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(photos / "a" / f"{i}.png")
    config["datasets"]["synthetic-val"] = {"kind": "image-folder", "root": str(photos)}
    config["probes"], config["sweeps"]["tiny-synthetic"]["interventions"] = {}, []
    with pytest.raises(plan.PlanError, match=r"sweeps.tiny-synthetic.ignore_labels: .*labels.bin"):
        plan.make_plan(config)
    config["sweeps"]["tiny-synthetic"]["ignore_labels"] = [300]
    with pytest.raises(plan.PlanError, match=r"ignore_labels"):
        plan.validate_config(config)
