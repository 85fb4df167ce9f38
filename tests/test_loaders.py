"""The shuffled loader delivers every vector once per epoch, deterministically; the ordered one in
disk order. Vectors carry their own id so every delivery can be traced back to its place."""

import numpy as np
import pytest

from saev_core import loaders, shards

N_IMGS, N_PATCHES, D = 50, 4, 4
T = N_PATCHES + 1  # [CLS] first
IMG_BYTES = N_PATCHES * D * 4


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> shards.ShardReader:
    """Layer 0 holds +id, layer 1 holds -id in every component; id = image * T + token.
    7 images per shard: 8 shards, the last holding one image."""
    md = shards.Metadata(
        vit_family="tiny",
        vit_ckpt="ids",
        layers=(0, 1),
        n_patches_per_img=N_PATCHES,
        cls_token=True,
        d_vit=D,
        n_imgs=N_IMGS,
        max_patches_per_shard=7 * T * 2,
        data={"__class__": "synthetic"},
    )
    dpath = tmp_path_factory.mktemp("ids") / md.hash
    writer = shards.ShardWriter(dpath, md)
    for shard_i in range(md.n_shards):
        acts_SLTD = writer.open_shard(shard_i)
        for row in range(md.shard_n_imgs(shard_i)):
            ids_T = (shard_i * 7 + row) * T + np.arange(T)
            acts_SLTD[row, 0] = ids_T[:, None]
            acts_SLTD[row, 1] = -ids_T[:, None]
        writer.finish_shard(shard_i, acts_SLTD)
    writer.publish()
    return shards.ShardReader(dpath)


def patch_ids() -> np.ndarray:
    return np.array([i * T + t for i in range(N_IMGS) for t in range(1, T)])


def delivered_ids(loader) -> list[np.ndarray]:
    batches = [b.numpy() for b in loader]
    for b in batches:
        assert (b == b[:, :1]).all()  # whole vectors, never mixed
    return [b[:, 0].astype(int) for b in batches]


def shuffled(reader, n_train, seed=0, layer=0, batch_size=8):
    return loaders.ShuffledLoader(
        reader,
        layer,
        "patches",
        batch_size,
        n_train,
        seed,
        block_bytes=3 * IMG_BYTES,  # blocks of 3 images, cut at shard ends
        buffer_vectors=40,  # several buffers per epoch
    )


def test_one_epoch_delivers_every_vector_exactly_once(reader):
    batches = delivered_ids(shuffled(reader, n_train=N_IMGS * N_PATCHES))
    assert len(batches) == N_IMGS * N_PATCHES // 8
    assert all(len(b) == 8 for b in batches)
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), patch_ids())
    # Shuffled: not in disk order, and batches mix images from far apart.
    assert not (np.diff(np.concatenate(batches)) > 0).all()
    assert max(np.ptp(b // T) for b in batches) > 10


def test_epochs_repeat_with_a_new_order(reader):
    epoch = N_IMGS * N_PATCHES
    ids = np.concatenate(delivered_ids(shuffled(reader, n_train=2 * epoch + 40)))
    np.testing.assert_array_equal(np.sort(ids[:epoch]), patch_ids())
    np.testing.assert_array_equal(np.sort(ids[epoch : 2 * epoch]), patch_ids())
    assert not np.array_equal(ids[:epoch], ids[epoch : 2 * epoch])
    assert len(ids) == 2 * epoch + 40


def test_same_seed_same_batches_other_seed_other_batches(reader):
    a = delivered_ids(shuffled(reader, n_train=120, seed=3))
    b = delivered_ids(shuffled(reader, n_train=120, seed=3))
    c = delivered_ids(shuffled(reader, n_train=120, seed=4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_layer_selects_the_recorded_layer(reader):
    batch = next(iter(shuffled(reader, n_train=8, layer=1))).numpy()
    assert (batch <= 0).all() and (batch < 0).any()


def test_stopping_early_does_not_hang(reader):
    loader = shuffled(reader, n_train=10_000)
    for step, _ in enumerate(loader):
        if step == 2:
            break
    assert len(delivered_ids(shuffled(reader, n_train=16))) == 2


def test_batch_larger_than_the_data_is_an_error(reader):
    with pytest.raises(ValueError, match="batch_size 1000 exceeds the 200 vectors of layer 0"):
        shuffled(reader, n_train=1000, batch_size=1000)


def test_ordered_loader_is_disk_order(reader):
    chunks = list(loaders.OrderedLoader(reader, 0, "all", block_bytes=3 * T * D * 4))
    starts = [start for start, _ in chunks]
    assert starts == sorted(starts) and starts[0] == 0
    ids = np.concatenate([rows[:, :, 0].ravel() for _, rows in chunks]).astype(int)
    np.testing.assert_array_equal(ids, np.arange(N_IMGS * T))
    for start, rows in chunks:
        assert rows[0, 0, 0] == start * T  # each chunk starts at image `start`, [CLS] first


@pytest.mark.parametrize("stop_after", [1, 5, 6, 7, 12, 30])
def test_resuming_from_a_state_continues_with_the_next_batch(reader, stop_after):
    """Stop points inside a buffer, at a buffer's last batch and in the second epoch."""
    n_train = 2 * N_IMGS * N_PATCHES
    expected = delivered_ids(shuffled(reader, n_train))
    first = shuffled(reader, n_train)
    got = []
    for step, x_BD in enumerate(first):
        got.append(x_BD[:, 0].numpy().astype(int))
        if step + 1 == stop_after:
            state = first.state_dict()
            break
    second = shuffled(reader, n_train)
    second.load_state_dict(state)
    got += delivered_ids(second)
    assert len(got) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_batches_for_the_cpu_pass_through_unchanged(reader):
    """`ToDevice` pins and copies only for CUDA (checked by benchmarks/gpu.py on a lent GPU);
    CPU training sees the loader's own batches, in order."""
    batches = list(shuffled(reader, n_train=8 * 5))
    moved = list(loaders.ToDevice(batches, "cpu"))
    assert len(moved) == 5 and all(m is b for m, b in zip(moved, batches, strict=True))
