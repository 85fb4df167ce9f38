"""Does the dump keep the ViT busy? Full-dump images/s against the bare forward pass.

Both are measured in one run, on the same images and the same model (CLIP ViT-B/16's
architecture with random weights, `tiny`/`vit-b16-224`): first the forward pass alone over
images already decoded, transformed and on the device; then the real dump code (DataLoader
decoding JPEGs, forward, device-to-host copy, finiteness check, shard writes with fsync) into a
fresh shard directory. A ratio near 1 means decoding and writing hide behind the model.

    python benchmarks/dump.py                      # CPU, 128 images
    python benchmarks/dump.py --device cuda --n-imgs 4096 --n-workers 8 --batch-size 256

The last line is `BENCH dump_vs_forward=<ratio> target>=0.9`.
"""

import argparse
import pathlib
import tempfile
import time

import torch
from PIL import Image

from saev_core import datasets, helpers, shards, vits
from saev_core.steps import dump, synthetic

CKPT = "vit-b16-224"
LAYERS = (-2, -1)


def write_jpegs(root: pathlib.Path, n_imgs: int, size: int = 320) -> dict:
    """An image-folder dataset of `n_imgs` JPEGs with planted shapes, the size of web photos."""
    (root / "synthetic").mkdir(parents=True)
    for i in range(n_imgs):
        img, _ = synthetic.make_image(i, size, seed=0)
        Image.fromarray(img).save(root / "synthetic" / f"{i:06d}.jpg", quality=90)
    return {"kind": "image-folder", "root": str(root)}


def time_forward(recorder, images, batch_size: int, device: torch.device) -> float:
    """Seconds for the forward passes alone over preloaded, device-resident batches."""
    x_NCHW = torch.stack([images[i][0] for i in range(len(images))]).to(device)
    batches = list(x_NCHW.split(batch_size))
    recorder(batches[0])  # warm-up: kernels, allocator
    synchronize(device)
    t0 = time.perf_counter()
    for x_BCHW in batches:
        recorder(x_BCHW)
    synchronize(device)
    return time.perf_counter() - t0


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    n_imgs: int, batch_size: int, n_workers: int, device: torch.device
) -> tuple[float, float]:
    """Images/s of the bare forward pass and of the full dump, on the same images and model."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dpath = pathlib.Path(tmp)
        dataset_cfg = write_jpegs(tmp_dpath / "images", n_imgs)
        recorder, transform = vits.load("tiny", CKPT, list(LAYERS))
        recorder.to(device)
        images = dump.Transformed(datasets.load(dataset_cfg), transform)
        forward_s = time_forward(recorder, images, batch_size, device)

        metadata = shards.Metadata(
            vit_family="tiny",
            vit_ckpt=CKPT,
            layers=LAYERS,
            n_patches_per_img=196,
            cls_token=True,
            d_vit=768,
            n_imgs=n_imgs,
            max_patches_per_shard=197 * len(LAYERS) * 32,
            data={"__class__": "image-folder", "root": dataset_cfg["root"]},
        )
        writer = shards.ShardWriter(tmp_dpath / "shards" / metadata.hash, metadata)
        dump_s = dump.write_shards(
            metadata,
            images,
            writer,
            list(range(metadata.n_shards)),
            recorder,
            batch_size=batch_size,
            n_workers=n_workers,
            device=device,
        )
        writer.publish()
        shards.ShardReader(writer.dpath)  # the result is a complete, valid directory
    return n_imgs / forward_s, n_imgs / dump_s


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-imgs", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    helpers.setup_logging()
    device = helpers.pick_device(args.device)
    forward_rate, dump_rate = measure(args.n_imgs, args.batch_size, args.n_workers, device)
    print(f"device {device}, {args.n_imgs} images, batch {args.batch_size}")
    print(f"forward alone (preloaded tensors): {forward_rate:8.1f} img/s")
    print(f"full dump (decode+forward+write):  {dump_rate:8.1f} img/s")
    print(f"BENCH dump_vs_forward={dump_rate / forward_rate:.3f} target>=0.9")


if __name__ == "__main__":
    main()
