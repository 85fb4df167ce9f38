"""The shard directory on disk follows SPEC §5 exactly, read back with json and numpy alone."""

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import LAYERS, N_IMGS, tiny_metadata

from saev_core import datasets, dump, shards, vits


def read_image_acts(dpath, i: int) -> np.ndarray:
    """Image i's (L, T, D) activations using only the protocol text of SPEC §5."""
    md = json.loads((dpath / "metadata.json").read_text())
    L, T, D = len(md["layers"]), md["n_patches_per_img"] + md["cls_token"], md["d_vit"]
    S = md["max_patches_per_shard"] // (T * L)
    shard = np.fromfile(dpath / f"acts{i // S:06d}.bin", dtype="<f4").reshape(S, L, T, D)
    return shard[i % S]


def test_names_sizes_and_hash(shards_dpath):
    md = json.loads((shards_dpath / "metadata.json").read_text())
    canonical = json.dumps(md, sort_keys=True, separators=(",", ":")).encode("utf-8")
    assert hashlib.sha256(canonical).hexdigest() == shards_dpath.name
    assert md["protocol"] == "1.1.0" and md["dtype"] == "float32"

    S = md["max_patches_per_shard"] // (65 * len(LAYERS))
    assert S == 16
    listing = json.loads((shards_dpath / "shards.json").read_text())
    assert listing == [
        {"name": "acts000000.bin", "n_imgs": 16},
        {"name": "acts000001.bin", "n_imgs": 16},
        {"name": "acts000002.bin", "n_imgs": 8},
    ]
    for entry in listing:
        assert (shards_dpath / entry["name"]).stat().st_size == S * len(LAYERS) * 65 * 64 * 4
    assert (shards_dpath / "labels.bin").stat().st_size == N_IMGS * 64
    expected = {"metadata.json", "shards.json", "labels.bin"} | {e["name"] for e in listing}
    assert {p.name for p in shards_dpath.iterdir()} == expected


def test_values_equal_direct_forward_pass(shards_dpath, synthetic_dpath):
    vit, transform = vits.build_tiny("vit-tiny-p8-64")
    dataset = datasets.SyntheticDataset(synthetic_dpath)
    for i in (0, 17, N_IMGS - 1):
        x = transform(dataset.image(i))[None]
        with torch.no_grad():
            x = vit._embeds(x)
            outputs = []
            for block in vit.transformer.resblocks:
                x = block(x)
                outputs.append(x[0])
        expected = np.stack([outputs[layer].numpy() for layer in LAYERS])
        np.testing.assert_allclose(read_image_acts(shards_dpath, i), expected, rtol=1e-5, atol=1e-5)


def test_labels_are_majority_concept_per_patch(shards_dpath, synthetic_dpath):
    labels = np.fromfile(shards_dpath / "labels.bin", dtype=np.uint8).reshape(N_IMGS, 64)
    mask = datasets.SyntheticDataset(synthetic_dpath).mask(3)
    # Patch (row 0, col 0) covers pixels [0:8, 0:8].
    for patch, (r, c) in ((0, (0, 0)), (9, (1, 1)), (63, (7, 7))):
        block = mask[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8]
        assert labels[3, patch] == np.bincount(block.ravel()).argmax()


def test_reader_rejects_unrecorded_layer(shards_dpath):
    reader = shards.ShardReader(shards_dpath)
    with pytest.raises(
        shards.ShardError, match=r"layer -3 was not recorded; recorded layers: \[-2, -1\]"
    ):
        next(reader.iter_images(-3, "patches"))


def test_reader_rejects_truncated_shard(shards_dpath, tmp_path):
    import shutil

    copy = tmp_path / shards_dpath.name
    shutil.copytree(shards_dpath, copy)
    with open(copy / "acts000001.bin", "r+b") as fd:
        fd.truncate(100)
    with pytest.raises(shards.ShardError, match=r"acts000001.bin has 100 bytes, expected"):
        shards.ShardReader(copy)


def test_rerun_after_partial_dump_is_identical(shards_dpath, dataset_cfg, tmp_path):
    """A dump that stopped after one shard resumes and ends byte-identical."""
    import shutil

    partial = tmp_path / shards_dpath.name
    partial.mkdir()
    for name in ("metadata.json", "acts000000.bin"):
        shutil.copy(shards_dpath / name, partial / name)
    (partial / "acts000001.bin").write_bytes(b"half a shard")
    dump.dump(tiny_metadata(), dataset_cfg, tmp_path, batch_size=16, device="cpu")
    for fpath in shards_dpath.iterdir():
        assert (partial / fpath.name).read_bytes() == fpath.read_bytes(), fpath.name


def test_shard_too_small_for_one_image():
    with pytest.raises(ValueError, match="max_patches_per_shard=100 is smaller than one image"):
        tiny_metadata(max_patches_per_shard=100)
