"""Is the shuffled training loader as fast as reading the files? MB/s side by side in one run.

Writes a shard directory of random activations (ViT-S-like: d_vit 384, 197 tokens, one layer).
One untimed raw pass warms the page cache; then, `--repeats` times: `--epochs` raw sequential
reads of every shard file with plain `readinto`, against `--epochs` epochs of shuffled batches
from one `ShuffledLoader` (seed = repeat, its first buffer fill included), as one training job
would take them. Both move the same bytes. The median of the repeats' ratios is the result, so one
slow pass on a busy machine does not decide it.

With a warm page cache both sides are memory copies: the raw read copies each byte once, the loader
twice (into the shuffle buffer, then gathered into a batch). On the 2-core development machine the
memory traffic caps the ratio near 0.5 (measured ~0.45: raw ~6 GB/s, loader ~2.7 GB/s).

    python benchmarks/loader.py [--mb 2048] [--batch-size 4096] [--epochs 3] [--repeats 5]

A cold comparison measures what limits a real job, whose data is not in the page cache: before
each of `--repeats` single-epoch passes, both sides evict the shard files from the page cache
(`posix_fadvise(POSIX_FADV_DONTNEED)`, no root needed), so both read from the disk.

It also times the per-block NaN/inf check the ordered loader (evaluation, top-k) runs over the
same bytes, as a share of a shuffled-loader epoch: too dear for the training hot path, which
checks the loss instead (see `loaders.ShuffledLoader`).

It times the shard checksums too: CRC-32 of every image row (`shards.verify`, one thread) over
the same files, warm, as a share of a shuffled-loader epoch (what checking them on every read would
cost training), and cold with two threads against the cold raw read (what the verify step after
each dump costs).

It ends with `BENCH loader_vs_raw=<ratio> target>=0.4` (warm),
`BENCH loader_vs_raw_cold=<ratio> target>=0.8` (cold) and
`BENCH verify_vs_raw_cold=<ratio> target>=0.8` (the verify step reads nearly as fast as a plain
read of the same files from disk).
"""

import argparse
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np
import torch
from random_shards import write_random_shards

from saev_core import helpers, loaders, shards

D_VIT, N_TOKENS = 384, 197


def raw_read_s(reader: shards.ShardReader) -> float:
    """Seconds to read every shard file front to back into one reused buffer."""
    buffer = bytearray(reader.metadata.shard_nbytes)
    t0 = time.perf_counter()
    for shard_i in range(reader.metadata.n_shards):
        with open(reader.dpath / shards.shard_fname(shard_i), "rb", buffering=0) as fd:
            fd.readinto(buffer)
    return time.perf_counter() - t0


def loader_s(
    reader: shards.ShardReader, batch_size: int, epochs: int, seed: int
) -> tuple[float, int]:
    """Seconds for `epochs` epochs of shuffled batches from one loader, and the bytes they hold."""
    n_train = reader.n_imgs * N_TOKENS * epochs
    loader = loaders.ShuffledLoader(reader, -1, "all", batch_size, n_train, seed=seed)
    t0 = time.perf_counter()
    n_batches = 0
    for x_BD in loader:
        assert x_BD.shape == (batch_size, D_VIT) and x_BD.dtype == torch.float32
        n_batches += 1
    return time.perf_counter() - t0, n_batches * batch_size * D_VIT * 4


def check_s(reader: shards.ShardReader) -> float:
    """Seconds of `BlockReader.check_finite` over every block, each just read (as in a loader)."""
    blocks = loaders.BlockReader(reader, -1, "all", loaders.BLOCK_BYTES)
    elapsed_s = 0.0
    for block in blocks.blocks:
        out_ND = np.empty((blocks.n_block_vectors(block), D_VIT), np.float32)
        blocks.read_into(block, out_ND, check=False)
        t0 = time.perf_counter()
        blocks.check_finite(block, out_ND)
        elapsed_s += time.perf_counter() - t0
    return elapsed_s


def verify_s(reader: shards.ShardReader, n_threads: int = 1) -> float:
    t0 = time.perf_counter()
    assert shards.verify(reader.dpath, n_threads) == []
    return time.perf_counter() - t0


def evict(reader: shards.ShardReader):
    """Drop the shard files from the page cache (written back first, so the pages are clean)."""
    os.sync()
    for shard_i in range(reader.metadata.n_shards):
        fd = os.open(reader.dpath / shards.shard_fname(shard_i), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=2048, help="size of the shard directory")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    helpers.keep_freed_memory()  # as `python -m saev_core.steps.train` does
    n_imgs = args.mb * 2**20 // (N_TOKENS * D_VIT * 4)

    with tempfile.TemporaryDirectory() as tmp:
        reader = write_random_shards(pathlib.Path(tmp), n_imgs, D_VIT, N_TOKENS, 256)
        nbytes = reader.metadata.n_shards * reader.metadata.shard_nbytes
        raw_read_s(reader)  # warm the page cache
        raw_mbs, loader_mbs, check_shares, crc_shares = [], [], [], []
        for repeat in range(args.repeats):
            raw_s = sum(raw_read_s(reader) for _ in range(args.epochs))
            raw_mbs.append(nbytes * args.epochs / raw_s / 2**20)
            seconds, loader_bytes = loader_s(reader, args.batch_size, args.epochs, seed=repeat)
            loader_mbs.append(loader_bytes / seconds / 2**20)
            check_shares.append(check_s(reader) * args.epochs / seconds)
            crc_shares.append(verify_s(reader) * args.epochs / seconds)
        cold_raw_mbs, cold_loader_mbs, verify_ratios = [], [], []
        for repeat in range(args.repeats):
            evict(reader)
            cold_raw_mbs.append(nbytes / raw_read_s(reader) / 2**20)
            evict(reader)
            # Two threads, as publish uses at least: one reads while the other sums.
            verify_ratios.append(nbytes / verify_s(reader, 2) / 2**20 / cold_raw_mbs[-1])
            evict(reader)
            seconds, loader_bytes = loader_s(reader, args.batch_size, 1, seed=repeat)
            cold_loader_mbs.append(loader_bytes / seconds / 2**20)

    ratios = [loader / raw for raw, loader in zip(raw_mbs, loader_mbs, strict=True)]
    print(f"{nbytes / 2**20:.0f} MB x {args.epochs} epochs, batch {args.batch_size}")
    print(f"raw sequential read MB/s: {', '.join(f'{v:.0f}' for v in raw_mbs)}")
    print(f"shuffled loader MB/s:     {', '.join(f'{v:.0f}' for v in loader_mbs)}")
    share = 100 * statistics.median(check_shares)
    print(f"a per-block NaN/inf check would add {share:.1f} % to the shuffled loader's time")
    crc_share = 100 * statistics.median(crc_shares)
    print(f"checking CRC-32s on every read would add {crc_share:.1f} % (so: a verify step instead)")
    cold = [loader / raw for raw, loader in zip(cold_raw_mbs, cold_loader_mbs, strict=True)]
    print(f"cold raw read MB/s:       {', '.join(f'{v:.0f}' for v in cold_raw_mbs)}")
    print(f"cold shuffled loader MB/s:{', '.join(f'{v:.0f}' for v in cold_loader_mbs)}")
    print(f"BENCH loader_vs_raw={statistics.median(ratios):.3f} target>=0.4")
    print(f"BENCH loader_vs_raw_cold={statistics.median(cold):.3f} target>=0.8")
    print(f"BENCH verify_vs_raw_cold={statistics.median(verify_ratios):.3f} target>=0.8")


if __name__ == "__main__":
    main()
