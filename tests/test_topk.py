"""The streaming top-k pass equals a brute-force search over every image."""

import numpy as np
import pytest
import torch

from saev_core import loaders, sae, shards, topk_results
from saev_core.steps import topk


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
        fired_values = values[values > 0]
        log_values = np.clip(
            np.log10(fired_values), topk_results.LOG10_MIN, topk_results.LOG10_MAX - 1e-9
        )
        expected_hist, _ = np.histogram(log_values, bins=topk_results.BIN_EDGES)
        np.testing.assert_array_equal(result.value_hist[latent], expected_hist)
        # The estimate lies in the bin of the exact percentile (the smallest value with at least
        # 99% of the values at or below it).
        exact = np.percentile(fired_values, 99, method="inverted_cdf")
        bin_width = topk_results.BIN_EDGES[1] - topk_results.BIN_EDGES[0]
        assert abs(np.log10(result.percentile[latent]) - np.log10(exact)) <= bin_width


def test_percentile_estimate_interpolates_within_a_bin():
    hist_FH = np.zeros((3, topk_results.N_BINS), dtype=np.int64)
    hist_FH[0, 120] = 100  # every value in one bin: p50 is its middle
    hist_FH[1, 100], hist_FH[1, 140] = 99, 1  # p99 is the top of the lower bin
    result = topk.estimate_percentile(hist_FH, 50.0)
    assert np.log10(result[0]) == pytest.approx(topk_results.BIN_EDGES[120] + 0.025, abs=1e-6)
    assert result[2] == 0  # never fired
    assert np.log10(topk.estimate_percentile(hist_FH, 99.0)[1]) == pytest.approx(
        topk_results.BIN_EDGES[101], abs=1e-6
    )


def test_save_and_load_round_trip(shards_dpath, trained_dpath, tmp_path):
    model, _ = sae.load_trained(trained_dpath / "relu" / "sae.pt")
    result = topk.top_k(
        model, shards.ShardReader(shards_dpath), -1, "patches", k=3, percentile_q=90
    )
    topk_results.save(tmp_path / "topk.npz", result)
    loaded = topk_results.load(tmp_path / "topk.npz")
    assert loaded.percentile_q == 90.0
    for field in ("top_values", "top_imgs", "freq", "mean_value", "percentile", "value_hist"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(result, field))
    assert list(tmp_path.iterdir()) == [tmp_path / "topk.npz"]


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
