"""Generate the synthetic image set: planted coloured shapes and textures with per-pixel masks.

The `synthetic_dataset` rule runs `python -m saev_core.steps.synthetic --spec-fpath SPEC --out-dpath
DIR` (a `jobs.SyntheticJob`: image count, size, seed); `generate` is the library form.
Deterministic from the seed: the same settings always give the same bytes. Each image gets a
mask whose pixel values index `CONCEPTS` (0 is background), so SAE latents can be checked
against ground truth.
"""

import argparse
import json
import pathlib

import numpy as np
from PIL import Image

from .. import jobs

CONCEPTS = (
    "background",
    "red circle",
    "green square",
    "blue triangle",
    "yellow stripes",
    "cyan checkerboard",
    "orange diamond",
)
COLOURS = {
    "red circle": (220, 30, 30),
    "green square": (30, 200, 60),
    "blue triangle": (40, 70, 230),
    "orange diamond": (250, 140, 20),
}


def shape_mask(concept: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (size, size) mask of one planted concept at a random place and scale."""
    y_HW, x_HW = np.mgrid[0:size, 0:size]
    r = rng.uniform(0.12, 0.25) * size
    cy, cx = rng.uniform(r, size - r, 2)
    if concept in ("red circle",):
        return (y_HW - cy) ** 2 + (x_HW - cx) ** 2 <= r**2
    if concept in ("green square", "yellow stripes", "cyan checkerboard"):
        return (np.abs(y_HW - cy) <= r) & (np.abs(x_HW - cx) <= r)
    if concept == "orange diamond":
        return np.abs(y_HW - cy) + np.abs(x_HW - cx) <= r * 1.2
    if concept == "blue triangle":
        top = cy - r
        inside = (y_HW >= top) & (y_HW <= cy + r)
        half_width = (y_HW - top) / 2 * 1.15
        return inside & (np.abs(x_HW - cx) <= half_width)
    raise ValueError(f"unknown concept {concept!r}")


def texture(concept: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) colour field the concept paints where its mask is set."""
    y_HW, x_HW = np.mgrid[0:size, 0:size]
    period = max(4, size // 12)
    if concept == "yellow stripes":
        on = ((x_HW + y_HW) // (period // 2)) % 2 == 0
        return np.where(on[..., None], (240, 220, 30), (30, 30, 20)).astype(np.float64)
    if concept == "cyan checkerboard":
        on = ((x_HW // period) + (y_HW // period)) % 2 == 0
        return np.where(on[..., None], (30, 220, 230), (235, 235, 235)).astype(np.float64)
    jitter = rng.integers(-25, 26, 3)
    return np.broadcast_to(np.clip(np.add(COLOURS[concept], jitter), 0, 255), (size, size, 3))


def make_image(index: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One RGB image (size, size, 3) uint8 and its concept mask (size, size) uint8."""
    rng = np.random.default_rng([seed, index])
    base = rng.integers(20, 110, 3)
    img_HW3 = base + rng.normal(0, 12, (size, size, 3))
    mask_HW = np.zeros((size, size), dtype=np.uint8)
    n_planted = rng.integers(1, 4)
    for concept_i in rng.choice(np.arange(1, len(CONCEPTS)), n_planted, replace=False):
        concept = CONCEPTS[concept_i]
        where_HW = shape_mask(concept, size, rng)
        img_HW3[where_HW] = texture(concept, size, rng)[where_HW]
        mask_HW[where_HW] = concept_i
    img_HW3 += rng.normal(0, 6, (size, size, 3))
    return np.clip(img_HW3, 0, 255).astype(np.uint8), mask_HW


def generate(out_dpath: pathlib.Path, n_imgs: int, img_size: int, seed: int):
    """Write images/NNNNNN.png, masks/NNNNNN.png, index.json (target and label per image)."""
    out_dpath = pathlib.Path(out_dpath)
    (out_dpath / "images").mkdir(parents=True, exist_ok=True)
    (out_dpath / "masks").mkdir(parents=True, exist_ok=True)
    targets = []
    for i in range(n_imgs):
        img, mask = make_image(i, img_size, seed)
        Image.fromarray(img).save(out_dpath / "images" / f"{i:06d}.png")
        Image.fromarray(mask).save(out_dpath / "masks" / f"{i:06d}.png")
        counts = np.bincount(mask.ravel(), minlength=len(CONCEPTS))
        targets.append(int(counts[1:].argmax()) + 1)
    index = {
        "concepts": list(CONCEPTS),
        "n_imgs": n_imgs,
        "img_size": img_size,
        "seed": seed,
        "targets": targets,
    }
    (out_dpath / "index.json").write_text(json.dumps(index) + "\n")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec-fpath", type=pathlib.Path, required=True, help="a SyntheticJob")
    parser.add_argument("--out-dpath", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    job = jobs.SyntheticJob.read(args.spec_fpath)
    generate(args.out_dpath, job.n_imgs, job.img_size, job.seed)
    print(f"wrote {job.n_imgs} synthetic images to {args.out_dpath}")


if __name__ == "__main__":
    main()
