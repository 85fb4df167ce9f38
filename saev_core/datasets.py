"""Image datasets (SPEC §3): every index yields the image, an integer target, a label and the index.

Kept free of torch so the workflow can count images while it plans jobs. Dataset configs are the
mappings under `datasets:` in `config/experiments.yaml`, with `kind` naming the class.
"""

import json
import pathlib

import numpy as np
from PIL import Image

IMG_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class DatasetError(Exception):
    """A dataset's files are missing or malformed."""


class SyntheticDataset:
    """The generated set of planted concepts (see `saev_core.synthetic`), with per-pixel masks."""

    has_masks = True

    def __init__(self, root: str | pathlib.Path):
        self.root = pathlib.Path(root)
        index_fpath = self.root / "index.json"
        if not index_fpath.exists():
            raise DatasetError(f"{index_fpath} does not exist; generate the synthetic set first")
        index = json.loads(index_fpath.read_text())
        self.concepts: list[str] = index["concepts"]
        self.targets: list[int] = index["targets"]

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int) -> Image.Image:
        return Image.open(self.root / "images" / f"{i:06d}.png").convert("RGB")

    def mask(self, i: int) -> np.ndarray:
        return np.asarray(Image.open(self.root / "masks" / f"{i:06d}.png"))

    def label(self, i: int) -> str:
        return self.concepts[self.targets[i]]

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.image(i),
            "target": self.targets[i],
            "label": self.label(i),
            "index": i,
        }


class ImageFolderDataset:
    """`root/<class>/<image>`; the label is the class folder's name, targets sorted by name."""

    has_masks = False

    def __init__(self, root: str | pathlib.Path):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"image-folder root {self.root} is not a directory")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.samples = [
            (fpath, target)
            for target, name in enumerate(self.classes)
            for fpath in sorted((self.root / name).iterdir())
            if fpath.suffix.lower() in IMG_SUFFIXES
        ]
        if not self.samples:
            raise DatasetError(f"image-folder root {self.root} has no images in class folders")

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int) -> Image.Image:
        return Image.open(self.samples[i][0]).convert("RGB")

    def label(self, i: int) -> str:
        return self.classes[self.samples[i][1]]

    def __getitem__(self, i: int) -> dict:
        target = self.samples[i][1]
        return {"image": self.image(i), "target": target, "label": self.label(i), "index": i}


def load(cfg: dict) -> SyntheticDataset | ImageFolderDataset:
    """The dataset for a config mapping with `kind` and `root`."""
    kind = cfg["kind"]
    if kind == "synthetic":
        return SyntheticDataset(cfg["root"])
    if kind == "image-folder":
        return ImageFolderDataset(cfg["root"])
    raise ValueError(f"dataset kind must be 'synthetic' or 'image-folder', got {kind!r}")


def count_images(cfg: dict) -> int:
    """Number of images, cheaply enough to run while Snakemake plans jobs."""
    if cfg["kind"] == "synthetic":
        return cfg["n_imgs"]
    return len(load(cfg))


def patch_labels(mask_HW: np.ndarray, n_patches_per_img: int, n_classes: int) -> np.ndarray:
    """Majority class of the pixels under each patch of a square grid, row-major, uint8 (P,)."""
    grid = int(round(n_patches_per_img**0.5))
    assert grid * grid == n_patches_per_img, "patch labels need a square patch grid"
    cell = max(1, mask_HW.shape[0] // grid)
    side = grid * cell
    resized = np.asarray(Image.fromarray(mask_HW).resize((side, side), Image.NEAREST))
    blocks_PC = resized.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid**2, -1)
    counts_PK = np.stack([(blocks_PC == k).sum(axis=1) for k in range(n_classes)], axis=1)
    return counts_PK.argmax(axis=1).astype(np.uint8)
