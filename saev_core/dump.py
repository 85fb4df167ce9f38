"""Record ViT activations for a dataset into a shard directory (SPEC §5).

Run as `python -m saev_core.dump --metadata-json '{...}' --dataset-json '{...}'
--shards-dpath results/shards`. The directory is `<shards-dpath>/<metadata hash>`; a rerun after a
kill resumes from the first incomplete shard, and `shards.json` appears only when all is written.
"""

import argparse
import json
import logging
import pathlib
import time

import numpy as np
import torch

from . import datasets, helpers, shards, vits

logger = logging.getLogger("dump")


class Transformed:
    """A dataset view that returns (image tensor, index) for a DataLoader."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.transform(self.dataset.image(i)), i


def dump(
    metadata: shards.Metadata,
    dataset_cfg: dict,
    shards_dpath: pathlib.Path,
    *,
    batch_size: int = 64,
    n_workers: int = 0,
    device: str = "auto",
) -> pathlib.Path:
    """Write (or finish writing) the shard directory for `metadata`; return its path."""
    dataset = datasets.load(dataset_cfg)
    if len(dataset) != metadata.n_imgs:
        raise ValueError(
            f"dataset has {len(dataset)} images but the activation metadata says n_imgs="
            f"{metadata.n_imgs}; the dataset changed since the workflow planned this dump"
        )
    out_dpath = pathlib.Path(shards_dpath) / metadata.hash
    writer = shards.ShardWriter(out_dpath, metadata)
    first_shard = writer.first_incomplete_shard()
    if first_shard > 0:
        logger.info("resuming %s at shard %d of %d", out_dpath, first_shard, metadata.n_shards)

    if first_shard < metadata.n_shards:
        write_shards(metadata, dataset, writer, first_shard, batch_size, n_workers, device)
    if dataset.has_masks:
        labels_NP = np.stack(
            [
                datasets.patch_labels(
                    dataset.mask(i), metadata.n_patches_per_img, len(dataset.concepts)
                )
                for i in range(metadata.n_imgs)
            ]
        )
        writer.write_labels(labels_NP)
    writer.publish()
    return out_dpath


def write_shards(
    metadata: shards.Metadata,
    dataset,
    writer: shards.ShardWriter,
    first_shard: int,
    batch_size: int,
    n_workers: int,
    device: str,
):
    """Run the ViT over the images from `first_shard` on and write each shard once it is full."""
    S = metadata.n_imgs_per_shard
    torch_device = helpers.pick_device(device)
    recorder, transform = vits.load(metadata.vit_family, metadata.vit_ckpt, list(metadata.layers))
    recorder.to(torch_device)
    start = first_shard * S
    subset = torch.utils.data.Subset(Transformed(dataset, transform), range(start, metadata.n_imgs))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=n_workers)

    buffer_SLTD = np.zeros(metadata.shard_shape, dtype=np.float32)
    shard_i, t0, n_done = first_shard, time.perf_counter(), 0
    for imgs_BCHW, idx_B in loader:
        acts_BLTD = recorder(imgs_BCHW.to(torch_device)).float().cpu()
        check_output(acts_BLTD, metadata, idx_B)
        for row, i in zip(acts_BLTD.numpy(), idx_B.tolist(), strict=True):
            buffer_SLTD[i - shard_i * S] = row
            if i + 1 == min((shard_i + 1) * S, metadata.n_imgs):
                writer.write_shard(shard_i, buffer_SLTD)
                buffer_SLTD[:] = 0
                shard_i += 1
        n_done += len(idx_B)
        rate = n_done / (time.perf_counter() - t0)
        logger.info("%d/%d images, %.1f img/s", start + n_done, metadata.n_imgs, rate)


def check_output(acts_BLTD: torch.Tensor, metadata: shards.Metadata, idx_B: torch.Tensor):
    """Stop on a model whose output disagrees with the metadata, or on NaN/inf activations."""
    expected = (len(metadata.layers), metadata.n_tokens, metadata.d_vit)
    if tuple(acts_BLTD.shape[1:]) != expected:
        raise ValueError(
            f"model {metadata.vit_family}/{metadata.vit_ckpt} gives (layers, tokens, d_vit) = "
            f"{tuple(acts_BLTD.shape[1:])}, but the config says {expected} "
            "(check d_vit, n_patches_per_img and cls_token of the model entry)"
        )
    finite_B = torch.isfinite(acts_BLTD).flatten(1).all(dim=1)
    if not finite_B.all():
        bad = idx_B[~finite_B].tolist()
        raise FloatingPointError(f"NaN or infinite activations for image index {bad[0]} ({bad})")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metadata-json", required=True, help="shard metadata as JSON")
    parser.add_argument("--dataset-json", required=True, help="dataset config (with root) as JSON")
    parser.add_argument("--shards-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-workers", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    metadata = shards.Metadata.from_dict(json.loads(args.metadata_json))
    out_dpath = dump(
        metadata,
        json.loads(args.dataset_json),
        args.shards_dpath,
        batch_size=args.batch_size,
        n_workers=args.n_workers,
        device=args.device,
    )
    logger.info("complete: %s", out_dpath)


if __name__ == "__main__":
    main()
