"""Baseline dictionaries (`saev_core.baselines`): what each one fits and encodes, that they
survive `sae.pt` like SAEs, that a sweep refuses bad ones at plan time, and the embedded
default's verdict: its SAEs against a random dictionary on planted concepts."""

import pathlib
import shutil

import polars as pl
import pytest
import torch
import yaml
from conftest import run_snakemake

from saev_core import baselines, config, sae
from saev_core.planning import plan
from saev_core.steps import summarize

CONFIG_FPATH = pathlib.Path(__file__).parent / "configs" / "tiny.yaml"


def correlated(n=4096, d=16, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) @ torch.randn(d, d, generator=gen) + 3


def test_pca_keeps_the_k_largest_coefficients_and_all_of_them_reconstruct_exactly():
    x_ND = correlated()
    full = baselines.fit_pca(config.BaselineConfig("pca", -1, k=16), 16, x_ND.split(500))
    x_hat_ND, f_NF = full.model(x_ND)
    assert torch.allclose(x_hat_ND, x_ND, atol=1e-4)
    assert full.summary["explained_variance_by_components"][-1] == pytest.approx(1.0)

    model = baselines.fit_pca(config.BaselineConfig("pca", -1, k=3), 16, x_ND.split(500)).model
    f_NF = model.encode(x_ND)
    assert (f_NF >= 0).all() and ((f_NF > 0).sum(dim=1) == 3).all()
    # By hand: coefficients z = (x - mean) V, the 3 of largest magnitude per vector.
    V_DD = full.model.W_enc[:, :16].detach()
    z_ND = (x_ND - x_ND.mean(dim=0)) @ V_DD
    kept_ND = torch.zeros_like(z_ND).scatter(1, z_ND.abs().topk(3).indices, 1.0) * z_ND
    assert torch.allclose(f_NF[:, :16] - f_NF[:, 16:], kept_ND, atol=1e-4)
    assert torch.allclose(model.decode(f_NF), kept_ND @ V_DD.T + x_ND.mean(dim=0), atol=1e-4)


def test_kmeans_finds_separated_clusters_with_one_hot_codes(tmp_path):
    gen = torch.Generator().manual_seed(0)
    centres_CD = 10 * torch.randn(8, 16, generator=gen)
    x_ND = centres_CD[torch.randint(8, (8192,), generator=gen)]
    x_ND = x_ND + 0.1 * torch.randn(8192, 16, generator=gen)
    cfg = config.BaselineConfig("kmeans", -1, exp_factor=1, batch_size=512, n_train=32768)
    batches = [x_ND[torch.randperm(8192, generator=gen)[:512]] for _ in range(64)]
    fit = baselines.fit_kmeans(cfg, 16, batches, len(batches))
    x_hat_ND, f_NF = fit.model(x_ND)
    assert (f_NF.sum(dim=1) == 1).all() and set(f_NF.unique().tolist()) == {0.0, 1.0}
    nmse = (x_hat_ND - x_ND).pow(2).sum() / (x_ND - x_ND.mean(dim=0)).pow(2).sum()
    assert nmse < 1e-3  # every cluster has a centroid (16 centroids for 8 clusters)
    # The file keeps the encoding: saev has no k-means class, so ours is named.
    sae.save(tmp_path / "sae.pt", fit.model, train={"layer": -1, "tokens": "patches"})
    loaded = sae.load(tmp_path / "sae.pt")
    assert loaded.cfg.activation == "kmeans"
    assert torch.equal(loaded.encode(x_ND), f_NF)


def test_random_sae_is_unit_decoder_rows_their_transpose_and_the_data_mean():
    x_ND = correlated()
    cfg = config.BaselineConfig("random", -1, k=4, exp_factor=2, seed=3)
    model = baselines.random_sae(cfg, 16, x_ND[:1024]).model
    assert torch.allclose(model.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(model.W_enc, model.W_dec.T)
    assert torch.allclose(model.b_dec, x_ND[:1024].mean(dim=0), atol=1e-5)
    again = baselines.random_sae(cfg, 16, x_ND[:1024]).model
    assert torch.equal(again.W_dec, model.W_dec)
    assert ((model.encode(x_ND) > 0).sum(dim=1) <= 4).all()


@pytest.mark.parametrize(
    "values, field",
    [
        ({"kind": "pca", "layer": -1}, "k"),
        ({"kind": "kmeans", "layer": -1, "k": 2}, "k"),
        ({"kind": "nmf", "layer": -1}, "kind"),
        ({"kind": "random", "layer": -1, "k": 4, "n_train": 10, "batch_size": 64}, "n_train"),
    ],
)
def test_bad_baselines_name_their_field(values, field):
    with pytest.raises(config.ConfigError) as err:
        config.build(config.BaselineConfig, values)
    assert err.value.field == field


def test_a_sweep_cannot_train_a_baseline_encoding():
    with pytest.raises(config.ConfigError, match="baseline's encoding: list it under `baselines`"):
        config.sae_spec(64, {"activation": "kmeans", "k": 1, "layer": -1, "n_train": 1024,
                             "batch_size": 64, "lr": 1e-3})  # fmt: skip


def tiny_config() -> dict:
    cfg = yaml.safe_load(CONFIG_FPATH.read_text())
    plan.validate_config(cfg)
    return cfg


def test_the_plan_scores_baselines_like_saes():
    """Each baseline has a fit job, then the evaluation, trait, top-k and render jobs of an SAE,
    a label, the family `baseline` and runs the interventions its layer reaches."""
    p = plan.make_plan(tiny_config())
    sweep = p.sweeps["tiny-synthetic"]
    assert sorted(sweep.labels[b] for b in sweep.baselines) == [
        "L-1 kmeans x8",
        "L-1 pca k=16",
        "L-1 random topk k=16 x8",
    ]
    for baseline_id in sweep.baselines:
        assert sweep.family(baseline_id) == "baseline"
        assert baseline_id in sweep.sae_ids
        for step in ("baselines", "evaluate", "traits", "topk", "render"):
            assert plan.sweep_spec_fpath("tiny-synthetic", step, baseline_id) in p.specs
        assert all(baseline_id in ids for ids in sweep.interventions.values())
    # A label is not part of the identity: renaming a baseline refits nothing.
    cfg = tiny_config()
    cfg["sweeps"]["tiny-synthetic"]["baselines"][0]["name"] = "principal components"
    renamed = plan.make_plan(cfg).sweeps["tiny-synthetic"]
    assert sorted(renamed.baselines) == sorted(sweep.baselines)


@pytest.mark.parametrize(
    "edit, expected",
    [
        ({"k": 65}, "sweeps.tiny-synthetic.baselines[0].k: 65 exceeds the 64 principal components"),
        ({"layer": -3}, "sweeps.tiny-synthetic.baselines[0].layer: layer -3 is not recorded"),
        ({"name": "L-1 topk k=16 x8"}, "its label 'L-1 topk k=16 x8' is already another SAE's"),
    ],
)
def test_bad_baselines_fail_planning_naming_the_config_path(edit, expected):
    cfg = tiny_config()
    cfg["sweeps"]["tiny-synthetic"]["baselines"][0].update(edit)
    with pytest.raises(plan.PlanError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        plan.make_plan(cfg)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> pathlib.Path:
    """The embedded default's sweep table and verdict, and the PCA baseline's browser."""
    workdir = tmp_path_factory.mktemp("baselines")
    shutil.copy(CONFIG_FPATH, workdir / "experiments.yaml")
    sweep = plan.make_plan(tiny_config()).sweeps["tiny-synthetic"]
    (pca,) = [b for b, cfg in sweep.baselines.items() if cfg.kind == "pca"]
    targets = [
        "results/tiny-synthetic/verdict.csv",
        f"results/tiny-synthetic/saes/{pca}/browser.html",
    ]
    result = run_snakemake(
        workdir, "--configfile", str(workdir / "experiments.yaml"), "--cores", "2", *targets
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return workdir / "results/tiny-synthetic", pca


@pytest.fixture(scope="module")
def verdict(default_run) -> tuple[pl.DataFrame, pl.DataFrame]:
    sweep_dpath, _ = default_run
    return (
        summarize.read_csv(sweep_dpath / "summary.csv"),
        summarize.read_csv(sweep_dpath / "verdict.csv"),
    )


def test_a_baseline_has_its_own_browser_that_says_what_its_latents_are(default_run):
    sweep_dpath, pca = default_run
    page = (sweep_dpath / "saes" / pca / "browser.html").read_text()
    assert "L-1 pca k=16" in page
    assert "Baseline, not an SAE: PCA. Latent j < 64 is principal component j's positive" in page


def test_the_sweep_lists_its_baselines_with_their_metrics(verdict):
    summary, table = verdict
    rows = {r["label"]: r for r in table.iter_rows(named=True)}
    assert {r["family"] for r in summary.iter_rows(named=True)} == {"sae", "baseline"}
    assert rows["L-1 kmeans x8"]["l0"] == 1.0 and rows["L-1 pca k=16"]["l0"] == 16.0
    for row in rows.values():
        for column in ("normalized_mse", "mean_best_ap", "probe_r", "map", "purity_16"):
            assert row[column] is not None, (row["label"], column)
    # PCA with 16 of 64 components reconstructs far better than the random dictionary.
    assert (
        rows["L-1 pca k=16"]["normalized_mse"] < rows["L-1 random topk k=16 x8"]["normalized_mse"]
    )
    assert rows["L-1 random topk k=16 x8"]["margin_map"] == 0.0


def test_trained_saes_beat_the_random_dictionary_on_planted_concepts(verdict):
    """Margins over the random TopK SAE of the same width (README, "Baselines and trait
    metrics"), measured with seeds 0 and 1 of the SAEs and the random dictionary: L-1 topk k=16
    +0.08 / +0.11 mean best AP, +0.09 / +0.11 mAP, normalised MSE 1.04-1.18 lower. The bounds
    are half the smaller margin."""
    _, table = verdict
    row = table.filter(pl.col("label") == "L-1 topk k=16 x8").row(0, named=True)
    assert row["margin_normalized_mse"] > 0.5
    assert row["margin_mean_best_ap"] > 0.04
    assert row["margin_map"] > 0.04
