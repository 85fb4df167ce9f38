"""Batches of activation vectors read from a shard directory.

Shape key: N = vectors, B = batch, D = d_vit.
"""

import numpy as np
import torch

from .shards import ShardReader


def read_vectors(reader: ShardReader, layer: int, tokens: str) -> torch.Tensor:
    """Every token vector of `layer` in disk order, (N, D), N = n_imgs * tokens per image."""
    chunks = [
        rows.reshape(-1, reader.metadata.d_vit) for _, rows in reader.iter_images(layer, tokens)
    ]
    return torch.from_numpy(np.concatenate(chunks))


class ShuffledBatches:
    """`n_train // batch_size` batches drawn without replacement, reshuffled each epoch.

    Deterministic for a seed; every SAE of a group iterates the same instance, so they all see
    the same batches.
    """

    def __init__(
        self, reader: ShardReader, layer: int, tokens: str, batch_size: int, n_train: int, seed: int
    ):
        self.vectors_ND = read_vectors(reader, layer, tokens)
        if batch_size > len(self.vectors_ND):
            raise ValueError(
                f"batch_size {batch_size} exceeds the {len(self.vectors_ND)} vectors in {reader.dpath}"
            )
        self.batch_size = batch_size
        self.n_steps = n_train // batch_size
        self.seed = seed

    def __len__(self) -> int:
        return self.n_steps

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        n_per_epoch = len(self.vectors_ND) // self.batch_size
        step = 0
        while step < self.n_steps:
            perm = torch.randperm(len(self.vectors_ND), generator=gen)
            for b in range(min(n_per_epoch, self.n_steps - step)):
                yield self.vectors_ND[perm[b * self.batch_size : (b + 1) * self.batch_size]]
                step += 1
