"""Image datasets (SPEC §3): every index yields the image, an integer target, a label and the index.

Kept free of torch so the workflow can count images while it plans jobs. Dataset configs are the
mappings under `datasets:` in `config/experiments.yaml`, with `kind` naming the class. Datasets
with per-pixel masks (`synthetic`, `ade20k`) also give per-patch labels for `labels.bin`.
"""

import hashlib
import json
import os
import pathlib
import typing

import numpy as np
from PIL import Image

IMG_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# Each kind's configuration keys besides `kind`.
KEYS = {
    "synthetic": ("n_imgs", "img_size", "seed"),
    "image-folder": ("root",),
    "ade20k": ("root", "split"),
    "imagenet": ("split",),
}
KINDS = tuple(KEYS)
KINDS_WITH_MASKS = ("synthetic", "ade20k")
FOLDER_KINDS = ("image-folder", "ade20k")
"""Kinds read from files the user may change: their identity covers the files' stats."""
# ADE20K scene parsing: 150 object classes plus 0, "other".
ADE20K_N_CLASSES = 151
IMAGENET_HF_NAME = "ILSVRC/imagenet-1k"


class DatasetError(Exception):
    """A dataset's files are missing or malformed."""


DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""Greyscale modes wider than 8 bits (16-bit PNGs and TIFFs): PIL's `convert("RGB")` clips them
(a 16-bit image turns almost white), so `to_rgb` scales them instead."""


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB; 16-bit greyscale scaled by 255/65535, not clipped at 255."""
    if img.mode in HIGH_DEPTH_MODES:
        values = np.asarray(img).astype(np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"{img.mode} values outside 0..65535: not a 16-bit image")
        return Image.fromarray(np.round(values / 257).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        raise ValueError("floating-point images have no fixed range to read as 8-bit RGB")
    return img.convert("RGB")


def open_rgb(fpath: pathlib.Path, i: int) -> Image.Image:
    """The image at `fpath` (dataset index `i`), decoded; a broken, oversized (decompression
    bomb) or floating-point file names both."""
    try:
        with Image.open(fpath) as img:
            return to_rgb(img)
    except DECODE_ERRORS as err:
        raise DatasetError(f"{fpath} (dataset index {i}): cannot decode the image: {err}") from None


def open_mask(fpath: pathlib.Path, i: int) -> np.ndarray:
    """The per-pixel class mask at `fpath` (dataset index `i`)."""
    try:
        with Image.open(fpath) as img:
            return np.asarray(img)
    except DECODE_ERRORS as err:
        raise DatasetError(f"{fpath} (dataset index {i}): cannot decode the mask: {err}") from None


class Dataset:
    """What every kind provides; kinds with masks set `has_masks` and define `mask` and `classes`."""

    has_masks = False

    def __len__(self) -> int:
        raise NotImplementedError

    def image(self, i: int) -> Image.Image:
        raise NotImplementedError

    def target(self, i: int) -> int:
        raise NotImplementedError

    def label(self, i: int) -> str:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.image(i),
            "target": self.target(i),
            "label": self.label(i),
            "index": i,
        }


class SyntheticDataset(Dataset):
    """The generated set of planted concepts (see `saev_core.synthetic`), with per-pixel masks."""

    has_masks = True

    def __init__(self, root: str | pathlib.Path):
        self.root = pathlib.Path(root)
        index_fpath = self.root / "index.json"
        if not index_fpath.exists():
            raise DatasetError(f"{index_fpath} does not exist; generate the synthetic set first")
        index = json.loads(index_fpath.read_text())
        self.classes: list[str] = index["concepts"]
        self.targets: list[int] = index["targets"]

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int) -> Image.Image:
        return open_rgb(self.root / "images" / f"{i:06d}.png", i)

    def mask(self, i: int) -> np.ndarray:
        return open_mask(self.root / "masks" / f"{i:06d}.png", i)

    def target(self, i: int) -> int:
        return self.targets[i]

    def label(self, i: int) -> str:
        return self.classes[self.targets[i]]


class ImageFolderDataset(Dataset):
    """`root/<class>/<image>`; the label is the class folder's name, targets sorted by name."""

    def __init__(self, root: str | pathlib.Path):
        self.root = pathlib.Path(root)
        self.classes = class_folders(self.root)
        self.samples = [
            (self.root / name / fname, target)
            for target, name in enumerate(self.classes)
            for fname in sorted(image_fnames(self.root / name))
        ]
        if not self.samples:
            raise DatasetError(f"image-folder root {self.root} has no images in class folders")

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int) -> Image.Image:
        return open_rgb(self.samples[i][0], i)

    def target(self, i: int) -> int:
        return self.samples[i][1]

    def label(self, i: int) -> str:
        return self.classes[self.samples[i][1]]


class Ade20kDataset(Dataset):
    """ADE20K scene parsing (ADEChallengeData2016): `images/<split>/X.jpg`,
    `annotations/<split>/X.png` (pixel value = class, 0 = other) and `sceneCategories.txt`
    (`X scene` per line, the image's label)."""

    has_masks = True

    def __init__(self, root: str | pathlib.Path, split: str):
        self.root = pathlib.Path(root)
        self.img_dpath = self.root / "images" / split
        self.mask_dpath = self.root / "annotations" / split
        for dpath in (self.img_dpath, self.mask_dpath):
            if not dpath.is_dir():
                raise DatasetError(f"ade20k: {dpath} is not a directory (split {split!r})")
        scenes_fpath = self.root / "sceneCategories.txt"
        if not scenes_fpath.exists():
            raise DatasetError(f"ade20k: {scenes_fpath} does not exist")
        scene_of = dict(line.split() for line in scenes_fpath.read_text().splitlines() if line)
        self.stems = sorted(pathlib.Path(fname).stem for fname in image_fnames(self.img_dpath))
        missing = [stem for stem in self.stems if stem not in scene_of]
        if missing:
            raise DatasetError(f"ade20k: {scenes_fpath} has no scene for {missing[0]}")
        self.scenes = sorted({scene_of[stem] for stem in self.stems})
        scene_target = {scene: target for target, scene in enumerate(self.scenes)}
        self.targets = [scene_target[scene_of[stem]] for stem in self.stems]
        self.classes = ade20k_class_names(self.root)

    def __len__(self) -> int:
        return len(self.stems)

    def image(self, i: int) -> Image.Image:
        return open_rgb(self.img_dpath / f"{self.stems[i]}.jpg", i)

    def mask(self, i: int) -> np.ndarray:
        fpath = self.mask_dpath / f"{self.stems[i]}.png"
        if not fpath.exists():
            raise DatasetError(f"ade20k: annotation {fpath} is missing")
        return open_mask(fpath, i)

    def target(self, i: int) -> int:
        return self.targets[i]

    def label(self, i: int) -> str:
        return self.scenes[self.targets[i]]


def ade20k_class_names(root: pathlib.Path) -> list[str]:
    """Names from `objectInfo150.csv` (Idx,Ratio,Train,Val,Name) when present, else numbers."""
    names = ["other"] + [f"class {k}" for k in range(1, ADE20K_N_CLASSES)]
    info_fpath = root / "objectInfo150.csv"
    if info_fpath.exists():
        for line in info_fpath.read_text().splitlines()[1:]:
            idx, *_, name = line.split(",")
            names[int(idx)] = name.split(";")[0].strip()
    return names


class ImagenetDataset(Dataset):
    """ImageNet-1K through Hugging Face `datasets` (the optional `imagenet` extra)."""

    def __init__(self, split: str):
        self.split = split
        hf_datasets = import_hf_datasets()
        try:
            self.hf = hf_datasets.load_dataset(IMAGENET_HF_NAME, split=split)
        except Exception as err:
            raise DatasetError(imagenet_hint(split, err)) from err
        self.classes = self.hf.features["label"].names
        # The label column alone: indexing a row would decode its image too.
        self.targets: list[int] = self.hf["label"]

    def __len__(self) -> int:
        return len(self.hf)

    def image(self, i: int) -> Image.Image:
        try:
            return to_rgb(self.hf[i]["image"])
        except DECODE_ERRORS as err:
            raise DatasetError(
                f"{IMAGENET_HF_NAME} {self.split} (dataset index {i}): cannot decode the image: {err}"
            ) from None

    def target(self, i: int) -> int:
        return self.targets[i]

    def label(self, i: int) -> str:
        return self.classes[self.targets[i]]


def import_hf_datasets():
    try:
        import datasets as hf_datasets
    except ImportError as err:
        raise DatasetError(
            "dataset kind 'imagenet' needs the Hugging Face `datasets` package: "
            "pip install -e '.[imagenet]'"
        ) from err
    return hf_datasets


def imagenet_hint(split: str, err: Exception) -> str:
    return (
        f"could not open {IMAGENET_HF_NAME} split {split!r} ({err}). It is gated: accept its "
        "terms on huggingface.co, run `huggingface-cli login`, and download it once on a machine "
        "with network access, with HF_HOME pointing at a cache this machine can read."
    )


def class_folders(root: pathlib.Path) -> list[str]:
    if not root.is_dir():
        raise DatasetError(f"image-folder root {root} is not a directory")
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def image_fnames(dpath: pathlib.Path) -> list[str]:
    """Image file names in a folder, by suffix; one `scandir`, no per-file stat."""
    return [
        entry.name
        for entry in os.scandir(dpath)
        if os.path.splitext(entry.name)[1].lower() in IMG_SUFFIXES
    ]


def load(cfg: dict) -> Dataset:
    """The dataset for a config mapping with `kind` (and `root`, `split` as the kind needs)."""
    kind = cfg["kind"]
    if kind == "synthetic":
        return SyntheticDataset(cfg["root"])
    if kind == "image-folder":
        return ImageFolderDataset(cfg["root"])
    if kind == "ade20k":
        return Ade20kDataset(cfg["root"], cfg["split"])
    if kind == "imagenet":
        return ImagenetDataset(cfg["split"])
    raise ValueError(f"dataset kind must be one of {list(KINDS)}, got {kind!r}")


def count_images(cfg: dict) -> int:
    """Number of images, cheaply enough to run every time Snakemake plans jobs.

    Folder kinds scan their folders without opening images (`scan_folder_dataset`); ImageNet
    reads the split size from the cached dataset info instead of loading the data.
    """
    kind = cfg["kind"]
    if kind == "synthetic":
        return cfg["n_imgs"]
    if kind in FOLDER_KINDS:
        return scan_folder_dataset(cfg).n_imgs
    if kind == "imagenet":
        hf_datasets = import_hf_datasets()
        try:
            info = hf_datasets.load_dataset_builder(IMAGENET_HF_NAME).info
            return info.splits[cfg["split"]].num_examples
        except Exception as err:
            raise DatasetError(imagenet_hint(cfg["split"], err)) from err
    raise ValueError(f"dataset kind must be one of {list(KINDS)}, got {kind!r}")


class FolderScan(typing.NamedTuple):
    """What planning learns about a folder dataset's files."""

    n_imgs: int
    fingerprint: str
    """SHA-256 over every file's path (relative to the root), size and modification time."""


def entry_stat(dpath: pathlib.Path, entry: os.DirEntry) -> os.stat_result:
    """A dataset file's stat; a broken link or unreadable file names itself."""
    try:
        return entry.stat()
    except OSError as err:
        what = "a broken link" if entry.is_symlink() else "unreadable"
        raise DatasetError(f"{dpath / entry.name}: {what} ({err.strerror})") from None


def scan_folder_dataset(cfg: dict) -> FolderScan:
    """Count an `image-folder` or `ade20k` dataset's images and fingerprint its files.

    One `scandir` and one `stat` per file (~6 s for ImageNet's 1.28M files on a local disk), so a
    replaced image, even under the same name, changes the dataset's identity and the shard
    directory's hash. Masks and the ADE20K index files count too; images are still never opened.
    """
    root = pathlib.Path(cfg["root"])
    if cfg["kind"] == "image-folder":
        folders = [root / name for name in class_folders(root)]
        counted = set(folders)
        extra_fpaths = []
    else:
        img_dpath = root / "images" / cfg["split"]
        for dpath in (img_dpath, root / "annotations" / cfg["split"]):
            if not dpath.is_dir():
                raise DatasetError(f"ade20k: {dpath} is not a directory (split {cfg['split']!r})")
        folders = [img_dpath, root / "annotations" / cfg["split"]]
        counted = {img_dpath}
        extra_fpaths = [root / "sceneCategories.txt", root / "objectInfo150.csv"]
    digest = hashlib.sha256()
    n_imgs = 0
    for dpath in folders:
        with os.scandir(dpath) as entries:
            rows = sorted(
                (entry.name, *file_stamp(entry_stat(dpath, entry)))
                for entry in entries
                if os.path.splitext(entry.name)[1].lower() in IMG_SUFFIXES
            )
        n_imgs += len(rows) if dpath in counted else 0
        digest.update(f"{dpath.relative_to(root)}\n{rows!r}\n".encode())
    for fpath in extra_fpaths:
        if fpath.exists():
            digest.update(f"{fpath.relative_to(root)} {file_stamp(fpath.stat())}\n".encode())
    if n_imgs == 0:
        where = "in class folders" if cfg["kind"] == "image-folder" else f"in {folders[0]}"
        raise DatasetError(f"{cfg['kind']} root {root} has no images {where}")
    return FolderScan(n_imgs, digest.hexdigest())


def file_stamp(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


def centre_square(mask_HW: np.ndarray) -> np.ndarray:
    """The centre square of a mask: the pixels the models' resize-and-crop transforms keep."""
    h, w = mask_HW.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return mask_HW[top : top + side, left : left + side]


def patch_labels(mask_HW: np.ndarray, n_patches_per_img: int, n_classes: int) -> np.ndarray:
    """Majority class of the pixels under each patch, row-major, uint8 (P,); ties go to the
    lower class.

    The mask is centre-cropped to a square first, as the models' resize-then-centre-crop
    transforms do with the image, so each patch's label covers the pixels the patch saw.
    """
    grid = int(round(n_patches_per_img**0.5))
    if grid * grid != n_patches_per_img:
        raise ValueError(f"patch labels need a square patch grid, got {n_patches_per_img} patches")
    square_HW = centre_square(mask_HW)
    side = len(square_HW)
    cell = max(1, side // grid)
    resized = np.asarray(Image.fromarray(square_HW).resize((grid * cell,) * 2, Image.NEAREST))
    blocks_PC = resized.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid**2, -1)
    if blocks_PC.max() >= n_classes:
        raise DatasetError(f"mask value {blocks_PC.max()} is not below n_classes={n_classes}")
    offsets_P1 = np.arange(grid**2)[:, None] * n_classes
    counts_PK = np.bincount((blocks_PC + offsets_P1).ravel(), minlength=grid**2 * n_classes)
    return counts_PK.reshape(grid**2, n_classes).argmax(axis=1).astype(np.uint8)
