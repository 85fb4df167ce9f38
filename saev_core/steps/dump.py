"""Record ViT activations for a dataset into a shard directory (SPEC §5).

Two commands, one per workflow rule, each reading its job (`saev_core.jobs`) from a spec file the
plan writes under `results/specs/shards/<HASH>/`:

    python -m saev_core.steps.dump part --spec-fpath .../part0-of-4.json --device auto
    python -m saev_core.steps.dump publish --spec-fpath .../publish.json

`part` (a `DumpPartJob`) writes its disjoint range of whole shards into the job's shard
directory (`<shards_dpath>/<metadata hash>/`), each with the CRC-32 of every image row beside it
(`acts<i>.crc32`), resuming after a kill from the first incomplete shard and rewriting any
complete one whose bytes no longer match; `publish` runs once every part is done, writes
`labels.bin` for datasets with masks, checks every shard against its checksums and publishes
`shards.json`, which marks the directory complete. The bytes do not depend on the number of parts,
the batch size or the device. A third command checks a shard directory on demand:

    python -m saev_core.steps.dump verify results/shards/<HASH>
"""

import argparse
import logging
import pathlib
import queue
import threading
import time

import numpy as np
import torch

from .. import datasets, helpers, jobs, shards, vits

logger = logging.getLogger("dump")
LOG_EVERY_S = 10.0


class Transformed(torch.utils.data.Dataset):
    """A dataset view that returns (image tensor, index); decoding runs in DataLoader workers."""

    def __init__(self, dataset: datasets.Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.transform(self.dataset.image(i)), i


class PatchLabels(torch.utils.data.Dataset):
    """A dataset view that returns the per-patch majority labels of image i's mask, (P,) uint8."""

    def __init__(self, dataset: datasets.Dataset, n_patches_per_img: int):
        self.dataset, self.n_patches_per_img = dataset, n_patches_per_img

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> np.ndarray:
        mask_HW = self.dataset.mask(i)
        return datasets.patch_labels(mask_HW, self.n_patches_per_img, len(self.dataset.classes))


def open_dataset(metadata: shards.Metadata, dataset_cfg: dict) -> datasets.Dataset:
    dataset = datasets.load(dataset_cfg)
    if len(dataset) != metadata.n_imgs:
        raise datasets.DatasetError(
            f"dataset has {len(dataset)} images but the activation metadata says n_imgs="
            f"{metadata.n_imgs}; the dataset changed since the workflow planned this dump"
        )
    return dataset


def dump_part(
    metadata: shards.Metadata,
    dataset_cfg: dict,
    out_dpath: pathlib.Path,
    part: int = 0,
    n_parts: int = 1,
    *,
    batch_size: int = 64,
    n_workers: int = 0,
    device: str = "auto",
    weights_fpath: pathlib.Path | None = None,
) -> pathlib.Path:
    """Write the missing shards of part `part` of `n_parts` into the shard directory
    `out_dpath` (`<shards_dpath>/<metadata hash>`); return it. `weights_fpath` is the model's
    local weights file, if it has one."""
    out_dpath = pathlib.Path(out_dpath)
    writer = shards.ShardWriter(out_dpath, metadata)
    shard_ids = shards.part_shards(metadata.n_shards, n_parts, part)
    todo = writer.incomplete_shards(shard_ids, verify=True)  # a forced re-dump repairs damage
    if not todo:
        logger.info("part %d/%d: shards %s already complete", part, n_parts, shard_ids)
        return out_dpath
    if len(todo) < len(shard_ids):
        logger.info("part %d/%d: resuming at shard %d", part, n_parts, todo[0])
    dataset = open_dataset(metadata, dataset_cfg)
    torch_device = helpers.pick_device(device)
    recorder, transform = vits.load(
        metadata.vit_family, metadata.vit_ckpt, list(metadata.layers), weights_fpath=weights_fpath
    )
    recorder.to(torch_device)
    write_shards(
        metadata,
        Transformed(dataset, transform),
        writer,
        todo,
        recorder,
        batch_size=batch_size,
        n_workers=n_workers,
        device=torch_device,
    )
    return out_dpath


def write_shards(
    metadata: shards.Metadata,
    images: "Transformed",
    writer: shards.ShardWriter,
    shard_ids: list[int],
    recorder: vits.Recorder,
    *,
    batch_size: int,
    n_workers: int,
    device: torch.device,
) -> float:
    """Run the ViT over the images of `shard_ids` while a background sink writes the shards;
    return the seconds from the first batch requested to the last shard on disk."""
    S = metadata.n_imgs_per_shard
    img_indices = [i for s in shard_ids for i in range(s * S, s * S + metadata.shard_n_imgs(s))]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(images, img_indices),
        batch_size=batch_size,
        num_workers=n_workers,
        pin_memory=device.type == "cuda",
    )
    sink = ShardSink(writer)
    bf16 = metadata.vit_ckpt.endswith(shards.BF16_SUFFIX)
    t0 = last_log = time.perf_counter()
    n_done = 0
    try:
        for imgs_BCHW, idx_B in loader:
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                acts_BLTD = recorder(imgs_BCHW.to(device, non_blocking=True))
            check_shape(acts_BLTD, metadata)
            sink.put(acts_BLTD, idx_B)
            n_done += len(idx_B)
            if time.perf_counter() - last_log > LOG_EVERY_S or n_done == len(img_indices):
                last_log = time.perf_counter()
                rate = n_done / (last_log - t0)
                eta_s = (len(img_indices) - n_done) / rate
                logger.info(
                    "%d/%d images, %.1f img/s, eta %.0f s", n_done, len(img_indices), rate, eta_s
                )
    finally:
        sink.close()
    return time.perf_counter() - t0


class ShardSink:
    """Copies batches into their shard files on a background thread, so the model never waits
    for the disk: the device-to-host copy, the finiteness check, the page-cache write and each
    shard's fsync-and-rename all happen here while the next batch runs."""

    def __init__(self, writer: shards.ShardWriter, max_batches: int = 4):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-sink", daemon=True)
        self.thread.start()

    def put(self, acts_BLTD: torch.Tensor, idx_B: torch.Tensor):
        self._put((acts_BLTD, idx_B.numpy()))

    def close(self):
        """Wait for every queued batch to be written; re-raise the sink's error, if any."""
        if self.thread.is_alive():
            self._put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error

    def _put(self, item):
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self):
        S = self.writer.metadata.n_imgs_per_shard
        open_shards: dict[int, tuple[np.memmap, int]] = {}
        try:
            while (item := self.queue.get()) is not None:
                acts_BLTD, idx_B = item
                acts_BLTD = acts_BLTD.float().cpu().numpy()
                check_finite(acts_BLTD, idx_B)
                shard_B = idx_B // S
                for shard_i in np.unique(shard_B).tolist():
                    if shard_i not in open_shards:
                        n_rows = self.writer.metadata.shard_n_imgs(shard_i)
                        open_shards[shard_i] = (self.writer.open_shard(shard_i), n_rows)
                    acts_SLTD, n_left = open_shards[shard_i]
                    in_shard_B = shard_B == shard_i
                    acts_SLTD[idx_B[in_shard_B] % S] = acts_BLTD[in_shard_B]
                    n_left -= int(in_shard_B.sum())
                    open_shards[shard_i] = (acts_SLTD, n_left)
                    if n_left == 0:
                        self.writer.finish_shard(shard_i, acts_SLTD)
                        del open_shards[shard_i]
            if open_shards:
                raise shards.ShardError(f"shards {sorted(open_shards)} did not receive every row")
        except BaseException as err:
            self.error = err


def check_shape(acts_BLTD: torch.Tensor, metadata: shards.Metadata):
    """Stop on a model whose output disagrees with the configured shape fields."""
    expected = (len(metadata.layers), metadata.n_tokens, metadata.d_vit)
    if tuple(acts_BLTD.shape[1:]) != expected:
        n_layers, n_tokens, d_vit = acts_BLTD.shape[1:]
        raise ValueError(
            f"model {metadata.vit_family}/{metadata.vit_ckpt} gives {n_tokens} tokens of width "
            f"{d_vit} per image, but the config says {metadata.n_tokens} tokens "
            f"(n_patches_per_img={metadata.n_patches_per_img}, cls_token={metadata.cls_token}) "
            f"of width d_vit={metadata.d_vit}; fix the model entry in config/experiments.yaml"
        )


def check_finite(acts_BLTD: np.ndarray, idx_B: np.ndarray):
    """Stop on NaN or infinite activations, naming the first image that has them."""
    finite_B = np.isfinite(acts_BLTD.reshape(len(acts_BLTD), -1)).all(axis=1)
    if not finite_B.all():
        bad = idx_B[~finite_B].tolist()
        raise FloatingPointError(
            f"NaN or infinite activations for image index {bad[0]} "
            f"({len(bad)} image(s) in this batch: {bad[:10]})"
        )


def publish(
    metadata: shards.Metadata, dataset_cfg: dict, out_dpath: pathlib.Path, *, n_workers: int = 0
) -> pathlib.Path:
    """Once every part is done: write `labels.bin` into the shard directory `out_dpath` when the
    dataset has masks, then publish."""
    out_dpath = pathlib.Path(out_dpath)
    writer = shards.ShardWriter(out_dpath, metadata)
    if metadata.records_labels and not writer.has_labels():
        dataset = open_dataset(metadata, dataset_cfg)
        if not dataset.has_masks:
            raise shards.ShardError(
                f"protocol {metadata.protocol} needs labels but {dataset_cfg['kind']} has no masks"
            )
        loader = torch.utils.data.DataLoader(
            PatchLabels(dataset, metadata.n_patches_per_img), batch_size=256, num_workers=n_workers
        )
        writer.write_labels(torch.cat(list(loader)).numpy())
    writer.publish(n_threads=max(2, n_workers + 1))  # one thread reads while one sums
    return out_dpath


def dump(
    metadata: shards.Metadata,
    dataset_cfg: dict,
    root_dpath: pathlib.Path,
    *,
    batch_size: int = 64,
    n_workers: int = 0,
    device: str = "auto",
    weights_fpath: pathlib.Path | None = None,
) -> pathlib.Path:
    """The whole dump in one process into `root_dpath/<metadata hash>`: one part, then publish;
    returns the shard directory."""
    out_dpath = pathlib.Path(root_dpath) / metadata.hash
    dump_part(
        metadata,
        dataset_cfg,
        out_dpath,
        batch_size=batch_size,
        n_workers=n_workers,
        device=device,
        weights_fpath=weights_fpath,
    )
    return publish(metadata, dataset_cfg, out_dpath, n_workers=n_workers)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    part_parser = commands.add_parser("part", help="write one part's shards")
    publish_parser = commands.add_parser("publish", help="write labels.bin and shards.json")
    part_parser.add_argument("--spec-fpath", type=pathlib.Path, required=True, help="a DumpPartJob")
    part_parser.add_argument("--device", required=True, help="auto, cpu, cuda, ...")
    publish_parser.add_argument(
        "--spec-fpath", type=pathlib.Path, required=True, help="a PublishJob"
    )
    verify_parser = commands.add_parser("verify", help="check shards against their checksums")
    verify_parser.add_argument("shards_dpath", type=pathlib.Path, help="a shard directory")
    verify_parser.add_argument("--n-threads", type=int, default=4)
    args = parser.parse_args(argv)
    helpers.setup_logging()
    if args.command == "verify":
        damaged = shards.verify(args.shards_dpath, args.n_threads)
        for err in damaged:
            logger.error("%s", err)
        if damaged:
            raise SystemExit(1)
        logger.info("%s: every shard matches its checksums", args.shards_dpath)
        return
    if args.command == "part":
        job = jobs.DumpPartJob.read(args.spec_fpath)
        out_dpath = dump_part(
            job.metadata,
            job.dataset,
            job.shards_dpath,
            job.part,
            job.n_parts,
            batch_size=job.batch_size,
            n_workers=job.n_workers,
            device=args.device,
            weights_fpath=job.weights,
        )
        logger.info("part %d/%d done: %s", job.part, job.n_parts, out_dpath)
    else:
        job = jobs.PublishJob.read(args.spec_fpath)
        out_dpath = publish(job.metadata, job.dataset, job.shards_dpath, n_workers=job.n_workers)
        logger.info("complete: %s", out_dpath)


if __name__ == "__main__":
    main()
