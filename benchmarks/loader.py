"""Is the shuffled training loader as fast as reading the files? MB/s side by side in one run.

Writes a shard directory of random activations (ViT-S-like: d_vit 384, 197 tokens, one layer),
reads every shard file sequentially with plain `readinto` (one untimed pass warms the page cache
for both contenders, then `--epochs` timed passes), then takes `--epochs` epochs of shuffled
batches from one `ShuffledLoader`, as one training job would. Both move the same bytes.

    python benchmarks/loader.py [--mb 1024] [--batch-size 4096]

The last line is `BENCH loader_vs_raw=<ratio> target>=0.8`.
"""

import argparse
import pathlib
import tempfile
import time

import torch
from random_shards import write_random_shards

from saev_core import loaders, shards

D_VIT, N_TOKENS = 384, 197


def raw_read_s(reader: shards.ShardReader) -> float:
    """Seconds to read every shard file front to back into one reused buffer."""
    buffer = bytearray(reader.metadata.shard_nbytes)
    t0 = time.perf_counter()
    for shard_i in range(reader.metadata.n_shards):
        with open(reader.dpath / shards.shard_fname(shard_i), "rb", buffering=0) as fd:
            fd.readinto(buffer)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=1024, help="size of the shard directory")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    n_imgs = args.mb * 2**20 // (N_TOKENS * D_VIT * 4)

    with tempfile.TemporaryDirectory() as tmp:
        reader = write_random_shards(pathlib.Path(tmp), n_imgs, D_VIT, N_TOKENS, 256)
        nbytes = reader.metadata.n_shards * reader.metadata.shard_nbytes
        raw_read_s(reader)  # warm the page cache
        raw_s = sum(raw_read_s(reader) for _ in range(args.epochs))
        nbytes *= args.epochs

        n_train = n_imgs * N_TOKENS * args.epochs
        loader = loaders.ShuffledLoader(reader, -1, "all", args.batch_size, n_train, seed=0)
        t0 = time.perf_counter()
        n_batches = 0
        for x_BD in loader:
            assert x_BD.shape == (args.batch_size, D_VIT) and x_BD.dtype == torch.float32
            n_batches += 1
        loader_s = time.perf_counter() - t0
        loader_bytes = n_batches * args.batch_size * D_VIT * 4

    raw_mbs, loader_mbs = nbytes / raw_s / 2**20, loader_bytes / loader_s / 2**20
    print(f"{nbytes / 2**20:.0f} MB read, batch {args.batch_size}, {n_batches} batches")
    print(f"raw sequential read:  {raw_mbs:8.0f} MB/s")
    print(f"shuffled loader:      {loader_mbs:8.0f} MB/s")
    print(f"BENCH loader_vs_raw={loader_mbs / raw_mbs:.3f} target>=0.8")


if __name__ == "__main__":
    main()
