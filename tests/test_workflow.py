"""End to end: the Snakemake workflow on a small synthetic config, in a temporary directory."""

import hashlib
import json
import pathlib
import re
import shutil
import subprocess
import zipfile

import polars as pl
import pytest
import yaml
from conftest import snakemake_argv, snakemake_env

from saev_core.steps import summarize

REPO = pathlib.Path(__file__).parent.parent

CONFIG = {
    "shards_dpath": "results/shards",
    "device": "cpu",
    "datasets": {
        "train": {"kind": "synthetic", "n_imgs": 32, "img_size": 64, "seed": 0},
        "val": {"kind": "synthetic", "n_imgs": 16, "img_size": 64, "seed": 1},
    },
    "models": {
        "tiny": {
            "family": "tiny",
            "ckpt": "vit-tiny-p8-64",
            "d_vit": 64,
            "n_patches_per_img": 64,
            "cls_token": True,
        }
    },
    "activations": {
        "train": {
            "model": "tiny",
            "dataset": "train",
            "layers": [-2, -1],
            "max_patches_per_shard": 130 * 12,
            "n_parts": 2,  # 3 shards of 12 images: parts of 1 and 2 shards
        },
        "val": {
            "model": "tiny",
            "dataset": "val",
            "layers": [-2, -1],
            "max_patches_per_shard": 130 * 12,
        },
    },
    "sweeps": {
        "s": {
            "train_activations": "train",
            "eval_activations": "val",
            "train": [
                {"layer": -2, "n_train": 2048, "batch_size": 256, "lr": 0.003, "exp_factor": 4},
                {"layer": -1, "n_train": 2048, "batch_size": 256, "lr": 0.003, "exp_factor": 4},
            ],
            "saes": [
                {"activation": "relu", "sparsity_coeff": 0.01},
                {"activation": "topk", "k": [4, 8]},
            ],
            # Bring your own SAE: here, a trained one exported for today's saev and read back.
            "external_saes": [
                {
                    "name": "exported L-1 topk k=8",
                    "fpath": "results/exports/s/L-1-topk-k=8-x4.saev5.pt",
                    "layer": -1,
                }
            ],
            "top_k": 4,
            # After a few steps most latents are dense (> 10%), outside the default frequency
            # range: the nearest fill up the page.
            "render": {"n_latents": 3},
        }
    },
}


def snakemake(workdir: pathlib.Path, *args: str, repo: pathlib.Path = REPO) -> str:
    """Run Snakemake on `workdir` with the workflow and `saev_core` of `repo` (first on the
    path, for the snakemake process and its jobs alike)."""
    result = subprocess.run(
        snakemake_argv(
            workdir,
            "--configfile",
            str(workdir / "experiments.yaml"),
            "--cores",
            "2",
            *args,
            repo=repo,
        ),
        capture_output=True,
        text=True,
        env=snakemake_env(PYTHONPATH=str(repo)),
        cwd=workdir,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def job_counts(dry_run_output: str) -> dict[str, int]:
    stats = dry_run_output.split("Job stats:")[1].split("Reasons:")[0]
    return {
        m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M) if m[1] != "total"
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("workflow")
    (workdir / "experiments.yaml").write_text(yaml.safe_dump(CONFIG))
    snakemake(workdir, "all")
    return workdir


def test_run_leaves_what_users_open(workdir):
    results = workdir / "results"
    shard_dpaths = sorted((results / "shards").iterdir())
    assert len(shard_dpaths) == 2
    for dpath in shard_dpaths:
        md = json.loads((dpath / "metadata.json").read_text())
        canonical = json.dumps(md, sort_keys=True, separators=(",", ":")).encode()
        assert hashlib.sha256(canonical).hexdigest() == dpath.name
        listing = json.loads((dpath / "shards.json").read_text())
        n_parts = CONFIG["activations"]["train" if len(listing) == 3 else "val"].get("n_parts", 1)
        markers = {f".dump-part{p}-of-{n_parts}.done" for p in range(n_parts)}
        expected = {"metadata.json", "shards.json", "labels.bin"} | {e["name"] for e in listing}
        expected |= {e["name"].replace(".bin", ".crc32") for e in listing}  # our checksums
        assert {p.name for p in dpath.iterdir()} == expected | markers  # no temporary leftovers

    checkpoints = sorted(results.glob("s/groups/*/*/sae.pt"))
    assert len(checkpoints) == 6
    assert len(list(results.glob("s/groups/*"))) == 2
    summary = summarize.read_csv(results / "s" / "summary.csv")
    trained = summary.filter(pl.col("group") != "external")
    assert sorted(trained["sae"]) == sorted(p.parent.name for p in checkpoints)
    # The external SAE (saev schema 5, read back) measures as the SAE it was exported from.
    external = summary.filter(pl.col("group") == "external").row(0, named=True)
    source = summary.filter(pl.col("label") == "L-1 topk k=8 x4").row(0, named=True)
    assert "saev schema 5 (TopK)" in external["source"]
    for metric in ("l0", "normalized_mse", "mean_best_ap", "n_dead"):
        assert external[metric] == pytest.approx(source[metric], rel=1e-4), metric
    assert set(summary["layer"]) == {-2, -1}
    assert set(summary["model"]) == {"tiny:vit-tiny-p8-64"}
    assert (summary["explained_variance"] > 0).all()
    assert summary["mean_best_ap"].is_not_null().all()
    for sae_id in summary["sae"]:
        sae_dpath = results / "s" / "saes" / sae_id
        metrics = json.loads((sae_dpath / "metrics.json").read_text())
        assert metrics["n_vectors"] == 16 * 64
        assert 0 < metrics["mean_best_ap"] <= 1  # the synthetic val set has patch labels
        concepts = pl.read_csv(sae_dpath / "concepts.csv")
        assert len(concepts) == metrics["n_concept_classes"] > 0
        assert (sae_dpath / "histograms.png").stat().st_size > 0
        assert (sae_dpath / "latents.npz").stat().st_size > 0
        assert (sae_dpath / "features" / "values.png").stat().st_size > 0
        page = (sae_dpath / "features" / "index.html").read_text()
        data = json.loads(re.search(r"const DATA = (.*);\n", page).group(1))
        assert len(data["latents"]) >= 3  # never an empty browser
        assert list((sae_dpath / "features" / "latents").glob("*/000.jpg"))
        assert (sae_dpath / "grid.jpg").stat().st_size > 0
    assert (results / "s" / "pareto.png").stat().st_size > 0


def test_second_run_has_nothing_to_do(workdir):
    assert "Nothing to be done" in snakemake(workdir, "-n", "all")


def test_editing_one_value_reruns_only_its_group(workdir):
    edited = json.loads(json.dumps(CONFIG))
    edited["sweeps"]["s"]["train"][1]["lr"] = 0.001
    (workdir / "experiments.yaml").write_text(yaml.safe_dump(edited))
    try:
        counts = job_counts(snakemake(workdir, "-n", "all"))
    finally:
        (workdir / "experiments.yaml").write_text(yaml.safe_dump(CONFIG))
    assert counts == {  # the group's 3 SAEs, and the external export of one of them
        "train_group": 1,
        "export_saev": 1,
        "evaluate_sae": 4,
        "topk_images": 4,
        "render_features": 4,
        "trait_metrics": 4,
        "summarize_sweep": 1,
        "all": 1,
    }


def test_execution_settings_rerun_nothing(workdir):
    """How a job runs is not what it computes: device, the dump's batch size and workers, the
    checkpoint interval and W&B logging are execution only (`EXECUTION` in saev_core/jobs.py)."""
    edited = json.loads(json.dumps(CONFIG))
    edited["device"] = "auto"
    for activations in edited["activations"].values():
        activations |= {"batch_size": 5, "n_workers": 1}
    edited["sweeps"]["s"] |= {"checkpoint_every": 3, "wandb_project": "my-saes"}
    (workdir / "experiments.yaml").write_text(yaml.safe_dump(edited))
    try:
        output = snakemake(workdir, "-n", "all")
    finally:
        (workdir / "experiments.yaml").write_text(yaml.safe_dump(CONFIG))
    assert "Nothing to be done" in output, output[-3000:]
    group_spec = next((workdir / "results/specs/sweeps/s/groups").iterdir())
    assert json.loads(group_spec.read_text())["wandb_project"] == "my-saes"  # the next run's


def copy_of(workdir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of a finished run (results and Snakemake's records) to change things in."""
    work = tmp_path / "work"
    shutil.copytree(workdir, work, symlinks=True)
    return work


def file_digests(dpath: pathlib.Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(dpath.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def test_code_edits_rerun_exactly_the_steps_that_import_them(workdir, tmp_path):
    repo = tmp_path / "repo"  # a copy of the project whose code we edit
    repo.mkdir()
    for name in ("Snakefile", "workflow", "saev_core", "envs", "README.md"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, repo / name)
    work = copy_of(workdir, tmp_path)
    assert "Nothing to be done" in snakemake(work, "-n", "all", repo=repo)

    def dry_run_after(fname: str, edit) -> dict[str, int] | str:
        fpath = repo / fname
        original = fpath.read_text()
        fpath.write_text(edit(original))
        try:
            output = snakemake(work, "-n", "all", repo=repo)
        finally:
            fpath.write_text(original)
        return "nothing" if "Nothing to be done" in output else job_counts(output)

    def add_code(text: str) -> str:
        return text + "\n\ndef _unused():\n    return 1\n"

    assert dry_run_after("saev_core/steps/render.py", add_code) == {"render_features": 7, "all": 1}
    assert dry_run_after("saev_core/browser.html", lambda t: t.replace("<h2", "<h2 class='x'")) == {
        "render_features": 7,
        "all": 1,
    }
    assert dry_run_after("saev_core/sae.py", add_code) == {
        "train_group": 2,
        "export_saev": 1,
        "evaluate_sae": 7,
        "topk_images": 7,
        "render_features": 7,
        "trait_metrics": 7,
        "summarize_sweep": 1,
        "all": 1,
    }
    # Comments, docstrings and prose change no behaviour: nothing reruns.
    assert dry_run_after("saev_core/sae.py", lambda t: t + "\n# a comment\n") == "nothing"
    assert (
        dry_run_after(
            "saev_core/steps/render.py",
            lambda t: t.replace('"""Render an', '"""Render, sayeth, an'),
        )
        == "nothing"
    )
    assert dry_run_after("README.md", lambda t: t + "\nmore words\n") == "nothing"


@pytest.mark.parametrize("lost", ["directory", "one shard file"])
def test_lost_shards_are_redumped_without_retraining(workdir, tmp_path, lost):
    work = copy_of(workdir, tmp_path)
    train_dpath = next(
        d
        for d in (work / "results" / "shards").iterdir()
        if len(json.loads((d / "shards.json").read_text())) == 3
    )
    before = file_digests(train_dpath)
    if lost == "directory":  # a scratch purge
        shutil.rmtree(train_dpath)
        expected = {"dump_activations": 2, "publish_activations": 1, "shards_published": 1}
        counts = job_counts(snakemake(work, "-n", "all"))
        assert {k: v for k, v in counts.items() if k != "all"} == expected
    else:  # part 1 of 2 wrote shards 1 and 2
        (train_dpath / "acts000001.bin").unlink()
        expected = {"dump_activations": 1, "publish_activations": 1, "shards_published": 1}
        # A dry run says what a real run redoes, and changes nothing on disk.
        listing = sorted(p.name for p in train_dpath.iterdir())
        dry = snakemake(work, "-n", "all")
        assert "acts000001.bin missing or incomplete; a real run (not a dry run) redoes" in dry
        assert sorted(p.name for p in train_dpath.iterdir()) == listing
    counts = job_counts(snakemake(work, "all"))  # planning heals, then the jobs run
    assert {k: v for k, v in counts.items() if k != "all"} == expected
    assert file_digests(train_dpath) == before  # same bytes, so the same name
    assert "Nothing to be done" in snakemake(work, "-n", "all")


def sae_labels(workdir) -> list[str]:
    return summarize.read_csv(workdir / "results" / "s" / "summary.csv")["label"].to_list()


def test_summary_names_each_sae_by_a_unique_label(workdir):
    summary = summarize.read_csv(workdir / "results" / "s" / "summary.csv")
    assert summary.columns[:2] == ["sae", "label"]
    assert sorted(summary["label"]) == [
        "L-1 relu l1=0.01 x4",
        "L-1 topk k=4 x4",
        "L-1 topk k=8 x4",
        "L-2 relu l1=0.01 x4",
        "L-2 topk k=4 x4",
        "L-2 topk k=8 x4",
        "exported L-1 topk k=8",
    ]


@pytest.mark.parametrize("target", [None, "results/report.html"])
def test_plain_html_report_builds_offline_with_every_sae(workdir, target):
    """`snakemake --report` as users type it (report.html), and with a path."""
    snakemake(workdir, "--report", *([target] if target else []))
    html = (workdir / (target or "report.html")).read_text()
    for category in ("Sweep summary", "Evaluation", "Features"):
        assert category in html
    for label in sae_labels(workdir):
        assert label in html
    # Each SAE's browser is in it as one self-contained file (base64 of browser.html).
    n_saes = len(sae_labels(workdir))
    assert html.count("browser.html") >= n_saes


def test_zip_report_holds_each_browser_once(workdir):
    snakemake(workdir, "--report", "report.zip")
    with zipfile.ZipFile(workdir / "report.zip") as archive:
        names = archive.namelist()
        html = archive.read("report/report.html").decode()
        browsers = [archive.read(name) for name in names if name.endswith("/browser.html")]
    for category in ("Sweep summary", "Evaluation", "Features"):
        assert category in html
    for label in sae_labels(workdir):
        assert label in html
    n_saes = len(sae_labels(workdir))
    for fname in ("pareto.png", "summary.csv"):
        assert sum(name.endswith("/" + fname) for name in names) == 1
    for fname in ("histograms.png", "concepts.csv", "grid.jpg"):
        assert sum(name.endswith("/" + fname) for name in names) == n_saes
    assert len(browsers) == n_saes
    for page in browsers:  # self-contained: images inlined, nothing linked beside it
        assert b"data:image/jpeg;base64," in page and b'"images/0' not in page
    assert not any(name.endswith(".jpg") and "/latents/" in name for name in names)
    # Thumbnails once per SAE, sized for the page: 7 small SAEs stay well under 2 MB.
    assert (workdir / "report.zip").stat().st_size < 2_000_000
