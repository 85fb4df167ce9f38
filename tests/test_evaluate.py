"""Evaluation metrics and concept recovery equal brute-force computations."""

import json
import shutil

import numpy as np
import pytest
import torch

from saev_core import concepts, datasets, jobs, sae, shards
from saev_core.steps import evaluate


def brute_force_ap_f1(values, positive):
    """Precision/recall at every distinct threshold, by definition."""
    ap, best_f1, prev_recall = 0.0, 0.0, 0.0
    for t in sorted(set(values.tolist()), reverse=True):
        predicted = values >= t
        tp = (predicted & positive).sum()
        precision, recall = tp / predicted.sum(), tp / positive.sum()
        ap += (recall - prev_recall) * precision
        prev_recall = recall
        best_f1 = max(best_f1, 2 * tp / (predicted.sum() + positive.sum()))
    return ap, best_f1


@pytest.mark.parametrize("seed", range(4))
def test_ap_and_f1_equal_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    # Few distinct values and many zeros, so thresholds are shared by many patches.
    values = rng.integers(0, 5, size=300).astype(np.float32) * (rng.random(300) < 0.5)
    positive = rng.random(300) < 0.2 + 0.1 * (values > 2)
    ap, f1 = concepts.ap_and_best_f1(torch.from_numpy(values), torch.from_numpy(positive))
    expected_ap, expected_f1 = brute_force_ap_f1(values, positive)
    assert ap == pytest.approx(expected_ap, rel=1e-9)
    assert f1 == pytest.approx(expected_f1, rel=1e-9)


def test_latent_equal_to_a_class_indicator_is_found_with_ap_one():
    rng = np.random.default_rng(0)
    n, d_sae, n_classes = 2000, 64, 4
    labels_N = torch.from_numpy(rng.integers(0, n_classes, size=n))
    f_x_NF = torch.from_numpy(rng.exponential(size=(n, d_sae)).astype(np.float32))
    f_x_NF *= torch.from_numpy(rng.random((n, d_sae)) < 0.3)
    f_x_NF[:, 17] = (labels_N == 2).float() * 3.0
    stats = concepts.ClassStats(d_sae, n_classes)
    for lo in range(0, n, 256):
        stats.update(f_x_NF[lo : lo + 256], labels_N[lo : lo + 256])
    candidates = stats.candidates(n_candidates=4)
    assert sorted(candidates) == [1, 2, 3]  # background (0) is not scored
    assert candidates[2][0] == 17
    latents = sorted({f for fs in candidates.values() for f in fs})
    scores = concepts.score_candidates(candidates, f_x_NF[:, latents], latents, labels_N)
    ranked = concepts.ranked_candidates(candidates, scores, stats.n_pos_C, ["bg", "a", "b", "c"])
    assert sorted((c.cls, c.rank) for c in ranked) == [
        (c, r) for c in (1, 2, 3) for r in (1, 2, 3, 4)
    ]
    for c in (1, 2, 3):  # ranks follow AP
        aps = [r.ap for r in sorted(ranked, key=lambda r: r.rank) if r.cls == c]
        assert aps == sorted(aps, reverse=True)
    by_class = {c.cls: c for c in concepts.best_latents(ranked)}
    assert by_class[2].latent == 17 and by_class[2].name == "b"
    assert by_class[2].ap == 1.0 and by_class[2].f1 == 1.0
    assert by_class[1].ap < 0.5 and by_class[3].ap < 0.5


def brute_force_encode(model, reader, layer):
    acts_NPD = np.stack(
        [
            reader.shard(s)[r, reader.metadata.layer_index(layer), 1:]
            for s, r in map(reader.locate, range(reader.n_imgs))
        ]
    )
    x_ND = torch.from_numpy(acts_NPD.reshape(-1, acts_NPD.shape[-1]))
    with torch.no_grad():
        f_x_NF = model.encode(x_ND)
        return x_ND, f_x_NF, model.decode(f_x_NF)


@pytest.mark.parametrize("sae_id", ["relu", "topk"])
def test_evaluation_equals_brute_force(shards_dpath, trained_dpath, dataset_cfg, sae_id):
    reader = shards.ShardReader(shards_dpath)
    model, _ = sae.load_trained(trained_dpath / sae_id / "sae.pt")
    class_names = datasets.load(dataset_cfg).classes
    result = evaluate.evaluate(
        model, reader, -1, "patches", class_names, n_candidates=model.cfg.d_sae
    )
    x_ND, f_x_NF, x_hat_ND = (t.double().numpy() for t in brute_force_encode(model, reader, -1))
    err = ((x_hat_ND - x_ND) ** 2).sum()
    variance = ((x_ND - x_ND.mean(axis=0)) ** 2).sum()
    fires_NF = f_x_NF > 0
    freq_F = fires_NF.mean(axis=0)
    m = result.metrics
    assert m["n_vectors"] == len(x_ND) == reader.n_imgs * 64
    assert m["l0"] == pytest.approx(fires_NF.sum(axis=1).mean())
    assert m["l1"] == pytest.approx(f_x_NF.sum(axis=1).mean(), rel=1e-5)
    assert m["mse"] == pytest.approx(err / x_ND.size, rel=1e-5)
    assert m["normalized_mse"] == pytest.approx(err / variance, rel=1e-5)
    assert m["explained_variance"] == pytest.approx(1 - err / variance, rel=1e-5)
    assert m["n_dead"] == (freq_F == 0).sum()
    assert m["n_dense"] == (freq_F > 1e-2).sum()
    np.testing.assert_allclose(result.freq_F, freq_F)
    mean_value_F = np.where(freq_F > 0, f_x_NF.sum(axis=0) / np.maximum(fires_NF.sum(axis=0), 1), 0)
    np.testing.assert_allclose(result.mean_value_F, mean_value_F, rtol=1e-5)
    # With every latent a candidate, the best AP per class is the best over all latents.
    labels_N = np.array(reader.labels()).reshape(-1)
    classes = [c for c in range(1, len(class_names)) if (labels_N == c).any()]
    best = concepts.best_latents(result.concepts)
    assert [c.cls for c in best] == classes
    assert len(result.concepts) == len(classes) * model.cfg.d_sae  # every latent ranked
    for concept in best:
        positive_N = labels_N == concept.cls
        aps = [
            concepts.ap_and_best_f1(torch.from_numpy(values), torch.from_numpy(positive_N))[0]
            for values in f_x_NF.T
        ]
        assert concept.ap == pytest.approx(max(aps), rel=1e-9)
        expected_ap, expected_f1 = brute_force_ap_f1(f_x_NF[:, concept.latent], positive_N)
        assert (concept.ap, concept.f1) == pytest.approx((expected_ap, expected_f1), rel=1e-6)
        assert concept.n_patches == positive_N.sum()
    assert m["mean_best_ap"] == pytest.approx(np.mean([c.ap for c in best]))


def test_sae_that_never_fires_is_reported_not_a_crash(
    shards_dpath, trained_dpath, dataset_cfg, tmp_path
):
    reader = shards.ShardReader(shards_dpath)
    model, _ = sae.load_trained(trained_dpath / "relu" / "sae.pt")
    with torch.no_grad():
        model.b_enc.fill_(-1e6)
    class_names = datasets.load(dataset_cfg).classes
    result = evaluate.evaluate(model, reader, -1, "patches", class_names)
    assert result.metrics["n_dead"] == result.metrics["n_almost_dead"] == model.cfg.d_sae
    assert result.metrics["l0"] == 0 and not result.freq_F.any()
    # Every latent is constant, so AP is the class's share of patches: no better than guessing.
    labels_N = np.array(reader.labels()).reshape(-1)
    for concept in result.concepts:
        assert concept.ap == pytest.approx((labels_N == concept.cls).mean())
    evaluate.write(result, "dead SAE", tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["n_dead"] == model.cfg.d_sae
    assert (tmp_path / "histograms.png").stat().st_size > 0
    assert not list(tmp_path.glob(".*tmp"))


def test_shards_without_labels_give_no_concepts(shards_dpath, trained_dpath, tmp_path):
    reader = shards.ShardReader(shards_dpath)
    model, _ = sae.load_trained(trained_dpath / "topk" / "sae.pt")
    result = evaluate.evaluate(model, reader, -1, "cls", ["bg", "a"])
    assert result.concepts == [] and result.metrics["mean_best_ap"] is None
    evaluate.write(result, "topk", tmp_path)
    with np.load(tmp_path / "latents.npz") as latents:
        np.testing.assert_array_equal(latents["freq"], result.freq_F)
    header = "class,name,n_patches,latent,average_precision,best_f1"
    assert (tmp_path / "concepts.csv").read_text().splitlines() == [header]
    assert (tmp_path / "concept_candidates.csv").read_text().splitlines() == [header + ",rank"]


def test_a_class_id_beyond_the_class_list_is_refused_naming_labels_bin(
    shards_dpath, trained_dpath, dataset_cfg, tmp_path
):
    """labels.bin from another dataset, or damaged: the evaluation step names the file, the id
    and where it first appears, instead of failing inside the metric code."""
    damaged_dpath = tmp_path / shards_dpath.name
    shutil.copytree(shards_dpath, damaged_dpath)
    labels_NP = np.memmap(damaged_dpath / shards.LABELS_FNAME, dtype=np.uint8, mode="r+")
    labels_NP[70] = 200  # image 1, patch 6
    labels_NP.flush()
    del labels_NP
    job = jobs.EvaluateJob(
        sae_fpath=str(trained_dpath / "topk" / "sae.pt"),
        sae_sha256=None,
        shards=damaged_dpath.name,
        shards_dpath=str(damaged_dpath),
        layer=-1,
        tokens="patches",
        dataset=dataset_cfg,
    )
    spec_fpath = tmp_path / "evaluate.json"
    spec_fpath.write_text(job.to_json())
    n_classes = len(datasets.load(dataset_cfg).classes)
    argv = ["--spec-fpath", str(spec_fpath), "--out-dpath", str(tmp_path / "out")]
    with pytest.raises(shards.ShardError) as err:
        evaluate.main([*argv, "--device", "cpu"])
    assert str(err.value).startswith(
        f"{damaged_dpath / 'labels.bin'}: class id 200 (first at image 1, patch 6) is beyond "
        f"the dataset's {n_classes} classes"
    )
    assert not (tmp_path / "out").exists()
