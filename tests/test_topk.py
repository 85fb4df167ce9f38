"""The streaming top-k pass equals a brute-force search over every image."""

import numpy as np
import torch

from saev_core import loaders, sae, shards, topk


def brute_force(model, reader, layer):
    acts = np.concatenate([rows for _, rows in loaders.OrderedLoader(reader, layer, "patches")])
    with torch.no_grad():
        f_x_NPF = model.encode(torch.from_numpy(acts.reshape(-1, acts.shape[-1]))).reshape(
            acts.shape[0], acts.shape[1], -1
        )
    return f_x_NPF.numpy()


def test_topk_equals_brute_force(shards_dpath, trained_dpath):
    reader = shards.ShardReader(shards_dpath)
    model, _ = sae.load_trained(trained_dpath / "topk" / "sae.pt")
    result = topk.top_k(model, reader, -1, "patches", k=5, imgs_per_chunk=7)
    f_x_NPF = brute_force(model, reader, -1)
    img_max_NF = f_x_NPF.max(axis=1)
    fired = np.flatnonzero(result.freq > 0)
    assert len(fired) > 10
    for latent in fired[:: max(1, len(fired) // 20)]:
        # Stable sort on the negated values: ties go to the lower image index.
        order = np.argsort(-img_max_NF[:, latent], kind="stable")[:5]
        expected_imgs = np.where(img_max_NF[order, latent] > 0, order, -1)
        np.testing.assert_array_equal(result.top_imgs[latent], expected_imgs)
        np.testing.assert_allclose(
            result.top_values[latent], np.maximum(img_max_NF[order, latent], 0), rtol=1e-5
        )
        values = f_x_NPF[:, :, latent]
        assert result.freq[latent] == np.float32((values > 0).mean())
        np.testing.assert_allclose(result.mean_value[latent], values[values > 0].mean(), rtol=1e-4)


def test_latent_that_never_fires_is_reported(shards_dpath, trained_dpath):
    reader = shards.ShardReader(shards_dpath)
    model, _ = sae.load_trained(trained_dpath / "relu" / "sae.pt")
    with torch.no_grad():
        model.b_enc[3] = -1e6
    result = topk.top_k(model, reader, -1, "patches", k=4)
    assert result.freq[3] == 0 and result.mean_value[3] == 0
    assert (result.top_imgs[3] == -1).all() and (result.top_values[3] == 0).all()


def test_ties_go_to_the_lower_image_index(tmp_path):
    """Every image activates latent 0 identically: the top-k are images 0..k-1."""
    model = sae.SparseAutoencoder(sae.SaeConfig(d_vit=4, exp_factor=1, activation="relu"))
    reader = _constant_shards(tmp_path, n_imgs=9)
    result = topk.top_k(model, reader, 0, "patches", k=3, imgs_per_chunk=2)
    fired = np.flatnonzero(result.freq > 0)
    assert len(fired) > 0
    for latent in fired:
        np.testing.assert_array_equal(result.top_imgs[latent], [0, 1, 2])


def _constant_shards(tmp_path, n_imgs):
    md = shards.Metadata(
        vit_family="tiny",
        vit_ckpt="none",
        layers=(0,),
        n_patches_per_img=4,
        cls_token=False,
        d_vit=4,
        n_imgs=n_imgs,
        max_patches_per_shard=16,
        data={"__class__": "synthetic"},
    )
    writer = shards.ShardWriter(tmp_path / md.hash, md)
    for shard_i in range(md.n_shards):
        acts_SLTD = writer.open_shard(shard_i)
        acts_SLTD[:] = 1.0
        writer.finish_shard(shard_i, acts_SLTD)
    writer.publish()
    return shards.ShardReader(tmp_path / md.hash)
