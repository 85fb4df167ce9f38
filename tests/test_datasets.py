"""Dataset kinds on real files in their real layouts: counting, labels, masks, clear errors."""

import json
import sys

import numpy as np
import pytest
from conftest import tiny_metadata
from PIL import Image

from saev_core import datasets, shards
from saev_core.steps import dump

ADE_W, ADE_H = 80, 64  # wider than tall: the models' centre crop drops 8 columns each side


@pytest.fixture(scope="module")
def ade20k_root(tmp_path_factory):
    """An ADEChallengeData2016 tree: 6 validation images, masks with classes 0..150, scenes."""
    root = tmp_path_factory.mktemp("ADEChallengeData2016")
    rng = np.random.default_rng(0)
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    scenes = []
    for i in range(6):
        stem = f"ADE_val_{i + 1:08d}"
        img = rng.integers(0, 256, (ADE_H, ADE_W, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / "validation" / f"{stem}.jpg")
        mask = np.full((ADE_H, ADE_W), 150, dtype=np.uint8)
        mask[:, :8] = 7  # cropped away by the centre crop
        mask[:32, 8:40] = i  # the top-left quarter of the crop
        Image.fromarray(mask).save(root / "annotations" / "validation" / f"{stem}.png")
        scenes.append(f"{stem} {'bathroom' if i % 2 else 'airport_terminal'}")
    (root / "sceneCategories.txt").write_text("\n".join(scenes) + "\n")
    (root / "objectInfo150.csv").write_text(
        "Idx,Ratio,Train,Val,Name\n1,0.1,1,1,wall\n150,0.0,1,1,flag\n"
    )
    return root


def test_ade20k_items_and_count(ade20k_root):
    cfg = {"kind": "ade20k", "root": str(ade20k_root), "split": "validation"}
    dataset = datasets.load(cfg)
    assert datasets.count_images(cfg) == len(dataset) == 6
    assert dataset[1]["label"] == "bathroom" and dataset[1]["target"] == 1
    assert dataset[0]["image"].size == (ADE_W, ADE_H)
    assert dataset.classes[1] == "wall" and dataset.classes[150] == "flag"
    assert len(dataset.classes) == 151


def test_ade20k_dump_writes_majority_labels_of_the_cropped_patches(ade20k_root, tmp_path):
    cfg = {"kind": "ade20k", "root": str(ade20k_root), "split": "validation"}
    metadata = tiny_metadata(
        n_imgs=6,
        data={"__class__": "ade20k", "root": str(ade20k_root), "split": "validation"},
    )
    dpath = dump.dump(metadata, cfg, tmp_path, batch_size=4, device="cpu")
    labels_NP = shards.ShardReader(dpath).labels().reshape(6, 8, 8)
    for i in range(6):
        expected = np.full((8, 8), 150)
        expected[:4, :4] = i  # the crop is 64x64 from column 8: the quarter is 4x4 patches
        np.testing.assert_array_equal(labels_NP[i], expected)


def test_ade20k_missing_split_is_named(ade20k_root):
    with pytest.raises(
        datasets.DatasetError, match=r"ade20k: .*images/training is not a directory"
    ):
        datasets.count_images({"kind": "ade20k", "root": str(ade20k_root), "split": "training"})


def test_image_folder_counts_only_images(tmp_path):
    for cls, n in (("cat", 3), ("dog", 2)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / cls / f"{i}.JPEG")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    cfg = {"kind": "image-folder", "root": str(tmp_path)}
    dataset = datasets.load(cfg)
    assert datasets.count_images(cfg) == len(dataset) == 5
    assert [dataset[i]["label"] for i in range(5)] == ["cat"] * 3 + ["dog"] * 2


def test_image_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "empty-class").mkdir()
    with pytest.raises(datasets.DatasetError, match="has no images in class folders"):
        datasets.count_images({"kind": "image-folder", "root": str(tmp_path)})


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips 16-bit values at 255 (an almost white image)."""
    (tmp_path / "scan").mkdir()
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "scan" / "0.png")
    with Image.open(tmp_path / "scan" / "0.png") as img:
        assert img.mode in datasets.HIGH_DEPTH_MODES
    dataset = datasets.load({"kind": "image-folder", "root": str(tmp_path)})
    rgb = np.asarray(dataset[0]["image"])
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    expected = np.round(values / 257).astype(np.uint8)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    np.testing.assert_array_equal(rgb[..., 2], expected)
    assert abs(rgb.mean() - 127.5) < 1


def test_oversized_images_and_broken_links_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "cls").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "cls" / "0.png")
    cfg = {"kind": "image-folder", "root": str(tmp_path)}
    dataset = datasets.load(cfg)
    # A decompression bomb: above twice PIL's pixel limit (lowered here instead of a huge file).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(
        datasets.DatasetError, match=r"cls/0.png \(dataset index 0\): cannot decode"
    ):
        dataset[0]
    (tmp_path / "cls" / "1.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(datasets.DatasetError, match=r"cls/1.png: a broken link"):
        datasets.scan_folder_dataset(cfg)


def test_imagenet_without_the_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(datasets.DatasetError, match=r"pip install -e '\.\[imagenet\]'"):
        datasets.count_images({"kind": "imagenet", "split": "train"})


def test_patch_labels_majority_and_ties():
    mask_HW = np.zeros((4, 4), dtype=np.uint8)
    mask_HW[:2, :2] = [[3, 3], [3, 1]]  # patch 0: 3 wins
    mask_HW[:2, 2:] = [[2, 2], [1, 1]]  # patch 1: a tie goes to the lower class
    labels = datasets.patch_labels(mask_HW, n_patches_per_img=4, n_classes=4)
    assert labels.tolist() == [3, 1, 0, 0]
    with pytest.raises(datasets.DatasetError, match="mask value 3 is not below n_classes=3"):
        datasets.patch_labels(mask_HW, n_patches_per_img=4, n_classes=3)


def test_synthetic_index_targets_are_labels(synthetic_dpath):
    dataset = datasets.SyntheticDataset(synthetic_dpath)
    index = json.loads((synthetic_dpath / "index.json").read_text())
    assert [dataset[i]["target"] for i in range(3)] == index["targets"][:3]
    assert dataset[0]["label"] == index["concepts"][index["targets"][0]]
