"""A small real-photo image folder from scikit-image's sample photographs.

Run as `python -m saev_core.photos OUT_DPATH [--n-views 2]`: writes `OUT_DPATH/<photo>/<photo>_<j>.png`
for 16 photographs shipped inside the scikit-image wheel (an astronaut, a cat, coffee, a rocket,
coins, gravel, a retina, ...; `pip install -e '.[real]'`), each as `n_views` random crops
(deterministic from `--seed`), so the folder's class is the photograph. The real-model example
and tests use it; nothing here downloads anything.
"""

import argparse
import importlib.util
import pathlib

import numpy as np
from PIL import Image

PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)
"""Files of `skimage/data/` that are photographs (or micrographs), not drawings."""


def skimage_data_dpath() -> pathlib.Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise ImportError("scikit-image is not installed: pip install -e '.[real]'")
    return pathlib.Path(spec.origin).parent / "data"


def random_view(img: Image.Image, rng: np.random.Generator, px: int = 256) -> Image.Image:
    """A random square crop of 60-100 % of the shorter side, maybe mirrored, at `px` pixels."""
    side = int(min(img.size) * rng.uniform(0.6, 1.0))
    left = int(rng.integers(0, img.width - side + 1))
    top = int(rng.integers(0, img.height - side + 1))
    view = img.crop((left, top, left + side, top + side)).resize((px, px), Image.BICUBIC)
    return view.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view


def write(out_dpath: pathlib.Path, n_views: int = 2, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    data_dpath = skimage_data_dpath()
    for fname in PHOTOS:
        name = fname.rsplit(".", 1)[0]
        img = Image.open(data_dpath / fname).convert("RGB")
        (out_dpath / name).mkdir(parents=True, exist_ok=True)
        for j in range(n_views):
            random_view(img, rng).save(out_dpath / name / f"{name}_{j}.png")
    return out_dpath


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dpath", type=pathlib.Path)
    parser.add_argument("--n-views", type=int, default=2, help="random crops per photograph")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write(args.out_dpath, args.n_views, args.seed)
    print(f"{args.out_dpath}: {len(PHOTOS)} photographs x {args.n_views} views")


if __name__ == "__main__":
    main()
