"""Probes and interventions: scores against hand-computed cases, labels that travel with their
vectors through the shuffled loader, the control's choice of latents, the edit itself, and the
probe step on the tiny shards."""

import json

import numpy as np
import pytest
import torch

from saev_core import config, jobs, loaders, probes, sae, shards
from saev_core.steps import intervene, probe, synthetic

CLASSES = synthetic.CONCEPTS


def test_scores_from_a_hand_computed_confusion():
    # true: 0 0 0 1 1 2 ; predicted: 0 0 1 1 2 2
    true_N, pred_N = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2])
    conf_CC = probes.confusion(true_N, pred_N, 3).numpy()
    assert conf_CC.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # IoU: class 0 2/(3+2-2)=2/3, class 1 1/(2+2-1)=1/3, class 2 1/(1+2-1)=1/2
    np.testing.assert_allclose(probes.class_iou(conf_CC), [2 / 3, 1 / 3, 1 / 2])
    assert probes.mean_iou(conf_CC, []) == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert probes.mean_iou(conf_CC, [0]) == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert probes.accuracy(conf_CC) == pytest.approx(4 / 6)
    np.testing.assert_allclose(probes.recall(conf_CC), [2 / 3, 1 / 2, 1])
    # Leaving out class 2's row: 5 vectors, predicted 0 twice, 1 twice, 2 once.
    np.testing.assert_allclose(probes.predicted_share(conf_CC, excluded=2), [2 / 5, 2 / 5, 1 / 5])


def test_an_absent_class_has_no_iou_and_does_not_count():
    conf_CC = probes.confusion(torch.tensor([0, 0]), torch.tensor([0, 0]), 3).numpy()
    iou_C = probes.class_iou(conf_CC)
    assert iou_C[0] == 1 and np.isnan(iou_C[1:]).all()
    assert probes.mean_iou(conf_CC, []) == 1.0


def test_upsampled_predictions_cover_each_patch_cell():
    pixels_HW = probes.upsample_nearest(np.array([1, 2, 3, 4]), 6)
    assert pixels_HW.tolist()[0] == [1, 1, 1, 2, 2, 2]
    assert pixels_HW.tolist()[5] == [3, 3, 3, 4, 4, 4]


def test_shuffled_labels_stay_with_their_vectors(shards_dpath):
    """Each batch's labels are the labels.bin entries of exactly those patches: checked by
    finding every delivered vector among the stored ones, across a buffer's carried remainder
    and a resumed loader."""
    reader = shards.ShardReader(shards_dpath)
    labels_NP = reader.labels()
    stored_ND = np.concatenate(
        [x.reshape(-1, 64) for _, x in loaders.OrderedLoader(reader, -1, "patches")]
    )
    row_of = {v.tobytes(): i for i, v in enumerate(stored_ND)}
    expected_N = np.asarray(labels_NP).reshape(-1)
    kwargs = dict(buffer_vectors=700, block_bytes=64 * 65 * 2 * 4 * 5, labels_NT=labels_NP)
    loader = loaders.ShuffledLoader(reader, -1, "patches", 96, 96 * 30, seed=3, **kwargs)
    seen = 0
    for step, (x_BD, y_B) in enumerate(loader):
        rows = [row_of[v.tobytes()] for v in x_BD.numpy()]
        assert y_B.tolist() == expected_N[rows].tolist()
        seen += len(rows)
        if step == 11:
            state = loader.state_dict()
            break
    resumed = loaders.ShuffledLoader(reader, -1, "patches", 96, 96 * 30, seed=3, **kwargs)
    resumed.load_state_dict(state)
    for x_BD, y_B in resumed:
        rows = [row_of[v.tobytes()] for v in x_BD.numpy()]
        assert y_B.tolist() == expected_N[rows].tolist()
        seen += len(rows)
    assert seen == 96 * 30


def test_pooled_tokens_are_each_images_mean_patch(shards_dpath):
    reader = shards.ShardReader(shards_dpath)
    ((start, mean_N1D), *_) = loaders.OrderedLoader(reader, -2, loaders.POOLED)
    patches_TD = reader.image_tokens(start + 1, -2, "patches")
    np.testing.assert_allclose(mean_N1D[1, 0], patches_TD.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_control_latents_are_of_similar_frequency_and_never_proposed():
    freq_F = np.linspace(0.001, 0.5, 200)
    freq_F[:10] = 0  # never fired
    proposed = {1: [50, 51, 52], 2: [150]}
    control = intervene.control_latents(proposed, freq_F, seed=0, window=5)
    for c, latents in proposed.items():
        assert len(control[c]) == len(latents) and len(set(control[c])) == len(latents)
        assert not set(control[c]) & {50, 51, 52, 150}  # no class's proposed latents
        for mine, ctl in zip(latents, control[c], strict=True):
            assert abs(ctl - mine) <= 5 + len(latents) and freq_F[ctl] > 0
    assert control == intervene.control_latents(proposed, freq_F, seed=0, window=5)
    assert control != intervene.control_latents(proposed, freq_F, seed=1, window=5)


def test_the_edit_keeps_the_reconstruction_error():
    """x' - x is exactly the decoded change of the edited latents; an edit that changes nothing
    returns x itself (the SAE's error is not lost). Checked against full decodes, on an SAE that
    normalises its inputs (decoding divides by its scale and adds its mean)."""
    torch.manual_seed(0)
    cfg = config.SaeConfig(d_vit=16, exp_factor=4, activation="topk", k=8, normalize=True)
    model = sae.SparseAutoencoder(cfg)
    with torch.no_grad():
        model.stack.x_scale.fill_(0.5)
        model.stack.x_mean.normal_()
    x_ND = torch.randn(4, 16)  # 4 x k=8 firings: some of the 64 latents stay silent
    f_NF = model.encode(x_ND)
    latents = [int(f_NF.sum(0).argmax())]
    cond = intervene.Condition(1, 0.0, False, latents, torch.zeros(1))
    f2_NF = f_NF.clone()
    f2_NF[:, latents] = 0
    expected_ND = x_ND + model.decode(f2_NF) - model.decode(f_NF)
    torch.testing.assert_close(intervene.edit(model, x_ND, f_NF, cond), expected_ND)
    (silent, *_) = (f_NF.sum(0) == 0).nonzero().flatten().tolist()
    unchanged_ND = intervene.edit(model, x_ND, f_NF, cond._replace(latents=[silent]))
    torch.testing.assert_close(unchanged_ND, x_ND)


def probe_job(shards_dpath, dataset_cfg, **cfg) -> jobs.ProbeJob:
    probe_cfg = config.ProbeConfig(
        **{"train_activations": "t", "layer": -1, "batch_size": 256, "n_train": 256 * 60} | cfg
    )
    return jobs.ProbeJob(
        name="p",
        probe=probe_cfg,
        train_shards=shards_dpath.name,
        eval_shards=shards_dpath.name,
        train_shards_dpath=str(shards_dpath),
        eval_shards_dpath=str(shards_dpath),
        train_dataset=dataset_cfg,
        eval_dataset=dataset_cfg,
        classes=CLASSES,
    )


def test_probe_step_trains_its_grid_and_keeps_the_best(shards_dpath, dataset_cfg, tmp_path):
    """A patch probe's grid on the tiny shards: every point scored, the best (by held-out mean
    IoU) saved and read back with the same predictions, probe.json written last."""
    job = probe_job(shards_dpath, dataset_cfg, kind="patch", lr=[1e-4, 1e-2], weight_decay=[1e-3])
    spec_fpath = tmp_path / "spec.json"
    spec_fpath.write_text(job.to_json())
    out_dpath = tmp_path / "probe"
    probe.main(["--spec-fpath", str(spec_fpath), "--out-dpath", str(out_dpath), "--device", "cpu"])
    marker = json.loads((out_dpath / jobs.PROBE_FNAME).read_text())
    rows = (out_dpath / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "pixel_mean_iou" in rows[0] and "iou/red circle" in rows[0]
    assert marker["best"]["lr"] == 0.01  # 60 steps at 1e-4 barely move: measured 0.1 vs 0.6
    assert marker["best"]["mean_iou"] > 0.4 and marker["best"]["pixel_mean_iou"] > 0.3
    loaded = probes.load(out_dpath / "probe.pt")
    reader = shards.ShardReader(shards_dpath)
    x_TD = torch.from_numpy(reader.image_tokens(0, -1, "all"))
    assert loaded.pool(x_TD[None], has_cls=True).shape == (64, 64)
    assert (out_dpath / "hparams.png").stat().st_size > 5000


def test_image_probe_reads_targets(shards_dpath, dataset_cfg, tmp_path):
    job = probe_job(
        shards_dpath, dataset_cfg, kind="image", batch_size=16, n_train=16 * 100, lr=[0.03]
    )
    model, _ = probe.train(job, torch.device("cpu"))
    (row,) = probe.score(job, model, torch.device("cpu"))
    assert "recall/red circle" in row and "mean_iou" not in row
    # 48 images, 6 target classes: chance is about 1/6.
    assert row["accuracy"] > 0.4


def test_an_edit_must_be_able_to_reach_the_probe():
    """Earlier blocks reach any probe (the ViT runs on); at the probe's own block, patch edits
    reach patch and mean-pooled probes but never its [CLS]; later blocks reach nothing."""
    from saev_core.planning import plan

    cls_probe = config.ProbeConfig(kind="image", train_activations="t", layer=-1, pooling="cls")
    patch_probe = config.ProbeConfig(kind="patch", train_activations="t", layer=-1)
    assert plan.reaches(2, "patches", 3, cls_probe)
    assert not plan.reaches(3, "patches", 3, cls_probe)
    assert plan.reaches(3, "cls", 3, cls_probe)
    assert plan.reaches(3, "patches", 3, patch_probe)
    assert not plan.reaches(3, "patches", 2, patch_probe)
