"""A shard directory of random activations (one layer, [CLS] + patches) for the benchmarks."""

import pathlib

import numpy as np

from saev_core import shards


def write_random_shards(
    root: pathlib.Path, n_imgs: int, d_vit: int, n_tokens: int, imgs_per_shard: int
) -> shards.ShardReader:
    metadata = shards.Metadata(
        vit_family="tiny",
        vit_ckpt="random",
        layers=(-1,),
        n_patches_per_img=n_tokens - 1,
        cls_token=True,
        d_vit=d_vit,
        n_imgs=n_imgs,
        max_patches_per_shard=n_tokens * imgs_per_shard,
        data={"__class__": "random"},
    )
    writer = shards.ShardWriter(pathlib.Path(root) / metadata.hash, metadata)
    rng = np.random.default_rng(0)
    for shard_i in range(metadata.n_shards):
        acts_SLTD = writer.open_shard(shard_i)
        acts_SLTD[:] = rng.standard_normal(metadata.shard_shape, dtype=np.float32)
        writer.finish_shard(shard_i, acts_SLTD)
    writer.publish()
    return shards.ShardReader(writer.dpath)
