"""The shard directory on disk follows SPEC §5 exactly, read back with json and numpy alone."""

import dataclasses
import hashlib
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import LAYERS, N_IMGS, tiny_metadata

from saev_core import datasets, jobs, loaders, shards, vits
from saev_core.steps import dump

# One image per shard: 40 shards, so a kill lands between and inside many shard writes.
ONE_PER_SHARD = 130


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
    expected |= {shards.checksums_fname(i) for i in range(3)}  # ours, beside saev's files
    assert {p.name for p in shards_dpath.iterdir()} == expected
    assert [(shards_dpath / shards.checksums_fname(i)).stat().st_size for i in range(3)] == [
        4 * 16,
        4 * 16,
        4 * 8,
    ]  # one CRC-32 per image row written


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
        loaders.OrderedLoader(reader, -3, "patches")


def test_reader_rejects_truncated_shard(shards_dpath, tmp_path):
    import shutil

    copy = tmp_path / shards_dpath.name
    shutil.copytree(shards_dpath, copy)
    with open(copy / "acts000001.bin", "r+b") as fd:
        fd.truncate(100)
    with pytest.raises(shards.ShardError, match=r"acts000001.bin has 100 bytes, expected"):
        shards.ShardReader(copy)


def sha256_of_files(dpath: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dpath.iterdir())}


@pytest.fixture(scope="module")
def one_per_shard_dpath(tmp_path_factory, dataset_cfg) -> pathlib.Path:
    """An uninterrupted single-job dump with one image per shard, the reference bytes."""
    root = tmp_path_factory.mktemp("reference")
    metadata = tiny_metadata(max_patches_per_shard=ONE_PER_SHARD)
    return dump.dump(metadata, dataset_cfg, root, batch_size=3, device="cpu")


def run_dump_cli(command: str, metadata: shards.Metadata, dataset_cfg: dict, root) -> list[str]:
    """`python -m saev_core.steps.dump part|publish` on a spec file written as the plan writes it."""
    out_dpath = str(root / metadata.hash)
    if command == "part":
        job = jobs.DumpPartJob(
            metadata, dataset_cfg, None, 0, 1, out_dpath, batch_size=3, n_workers=0
        )
    else:
        job = jobs.PublishJob(metadata, dataset_cfg, out_dpath, n_workers=0)
    spec_fpath = root / f"{command}.json"
    spec_fpath.write_text(job.to_json())
    argv = [sys.executable, "-m", "saev_core.steps.dump", command, "--spec-fpath", str(spec_fpath)]
    return argv + (["--device", "cpu"] if command == "part" else [])


def test_sigkill_at_several_points_then_rerun_is_byte_identical(
    one_per_shard_dpath, dataset_cfg, tmp_path
):
    metadata = tiny_metadata(max_patches_per_shard=ONE_PER_SHARD)
    dpath = tmp_path / metadata.hash
    part_argv = run_dump_cli("part", metadata, dataset_cfg, tmp_path)

    def n_complete() -> int:
        return sum(1 for p in dpath.glob("acts*.bin"))

    # Kill points: after a few shards, mid-shard (a temporary file is open), later on.
    kill_points = [
        lambda: n_complete() >= 3,
        lambda: n_complete() >= 12 and any(dpath.glob(".acts*.tmp")),
        lambda: n_complete() >= 25,
    ]
    done_before = 0
    for should_kill in kill_points:
        proc = subprocess.Popen(part_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not should_kill() and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the dump finished before it could be killed"
        assert not (dpath / "shards.json").exists()
        assert n_complete() > done_before  # each run resumed and made progress
        done_before = n_complete()

    resumed = subprocess.run(part_argv, capture_output=True, text=True, check=True)
    assert f"resuming at shard {done_before}" in resumed.stderr
    subprocess.run(run_dump_cli("publish", metadata, dataset_cfg, tmp_path), check=True)
    assert sha256_of_files(dpath) == sha256_of_files(one_per_shard_dpath)


def test_parts_are_byte_identical_to_one_job(one_per_shard_dpath, dataset_cfg, tmp_path):
    metadata = tiny_metadata(max_patches_per_shard=ONE_PER_SHARD)
    for part in (2, 0, 1):  # any order, as the Slurm jobs may run
        dump.dump_part(metadata, dataset_cfg, tmp_path / metadata.hash, part, 3, batch_size=5)
    assert not (tmp_path / metadata.hash / "shards.json").exists()
    dump.publish(metadata, dataset_cfg, tmp_path / metadata.hash)
    assert sha256_of_files(tmp_path / metadata.hash) == sha256_of_files(one_per_shard_dpath)


def test_part_ranges_cover_every_shard_once():
    for n_shards in (1, 7, 40):
        for n_parts in range(1, n_shards + 1):
            ranges = [shards.part_shards(n_shards, n_parts, p) for p in range(n_parts)]
            assert [s for r in ranges for s in r] == list(range(n_shards))
            assert all(len(r) > 0 for r in ranges)


def test_publish_refuses_a_missing_shard(shards_dpath, dataset_cfg, tmp_path):
    copy = tmp_path / shards_dpath.name
    shutil.copytree(shards_dpath, copy)
    (copy / "shards.json").unlink()
    (copy / "acts000001.bin").unlink()
    (copy / "acts000002.bin").write_bytes(b"short")
    with pytest.raises(
        shards.ShardError,
        match=r"cannot publish .*: acts000001.bin, acts000002.bin missing or incomplete "
        r"\(2 of 3 shards\). Run `snakemake` again",
    ):
        shards.ShardWriter(copy, tiny_metadata()).publish()


def test_reader_rejects_missing_shard_file(shards_dpath, tmp_path):
    copy = tmp_path / shards_dpath.name
    shutil.copytree(shards_dpath, copy)
    (copy / "acts000002.bin").unlink()
    with pytest.raises(shards.ShardError, match=r"shard file .*acts000002.bin is missing"):
        shards.ShardReader(copy)


def test_reader_rejects_metadata_that_does_not_hash_to_the_name(shards_dpath, tmp_path):
    copy = tmp_path / shards_dpath.name
    shutil.copytree(shards_dpath, copy)
    md = json.loads((copy / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps({**md, "n_imgs": 39}))
    with pytest.raises(
        shards.ShardError,
        match=rf"metadata.json hashes to [0-9a-f]{{64}}, not to its directory name {copy.name}",
    ):
        shards.ShardReader(copy)


def test_reader_rejects_an_incomplete_directory(shards_dpath, tmp_path):
    copy = tmp_path / shards_dpath.name
    shutil.copytree(shards_dpath, copy)
    (copy / "shards.json").unlink()
    with pytest.raises(
        shards.ShardError, match=r"shards.json does not exist: the dump is incomplete"
    ):
        shards.ShardReader(copy)


def test_reader_locates_images(shards_dpath):
    reader = shards.ShardReader(shards_dpath)
    assert reader.locate(0) == (0, 0)
    assert reader.locate(17) == (1, 1)
    assert reader.locate(N_IMGS - 1) == (2, 7)
    with pytest.raises(IndexError, match="image index 40 is out of range for 40 images"):
        reader.locate(N_IMGS)


def test_nan_activations_name_the_image():
    acts_BLTD = np.zeros((4, 2, 65, 64), dtype=np.float32)
    acts_BLTD[2, 1, 5, 7] = np.nan
    with pytest.raises(FloatingPointError, match="NaN or infinite activations for image index 12"):
        dump.check_finite(acts_BLTD, np.arange(10, 14))


def test_model_shape_mismatch_is_an_error(dataset_cfg, tmp_path):
    metadata = tiny_metadata(d_vit=32)
    with pytest.raises(
        ValueError,
        match=r"gives 65 tokens of width 64 per image, but the config says 65 tokens .* of width d_vit=32",
    ):
        dump.dump(metadata, dataset_cfg, tmp_path, batch_size=16, device="cpu")
    assert not (tmp_path / metadata.hash / "shards.json").exists()


def test_dataset_size_change_is_an_error(dataset_cfg, tmp_path):
    metadata = tiny_metadata(n_imgs=41)
    with pytest.raises(
        datasets.DatasetError,
        match="dataset has 40 images but the activation metadata says n_imgs=41",
    ):
        dump.dump(metadata, dataset_cfg, tmp_path, batch_size=16, device="cpu")


def test_shard_too_small_for_one_image():
    with pytest.raises(ValueError, match="max_patches_per_shard=100 is smaller than one image"):
        tiny_metadata(max_patches_per_shard=100)


def test_a_bf16_dump_is_another_directory_within_a_percent(shards_dpath, dataset_cfg, tmp_path):
    """`autocast_bf16` runs the ViT in bfloat16: the metadata records `<ckpt>@bf16` (so another
    hash), and the activations move by about 0.6 % of their norm on the tiny ViT (measured
    0.58 % per shard here; bfloat16 keeps 8 bits of mantissa)."""
    md = shards.Metadata.load(shards_dpath)
    md16 = dataclasses.replace(md, vit_ckpt=md.vit_ckpt + shards.BF16_SUFFIX)
    assert md16.hash != md.hash
    dpath = dump.dump(md16, dataset_cfg, tmp_path, batch_size=16, device="cpu")
    for shard_i in range(md.n_shards):
        n_floats = md.shard_n_imgs(shard_i) * md.shard_nbytes // md.n_imgs_per_shard // 4
        fp32, bf16 = (
            np.fromfile(d / shards.shard_fname(shard_i), "<f4")[:n_floats]
            for d in (shards_dpath, dpath)
        )
        rel = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
        assert 1e-3 < rel < 3e-2, rel
