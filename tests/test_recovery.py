"""Nothing complete is lost to a grown sweep, a lost file, a failed rerun or a kill: each test
starts from a copy of one finished run (two TopK SAEs on four photos) and asserts what the next
`snakemake` plans and leaves on disk."""

import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import kill_once_started, snakemake_argv, snakemake_env
from test_faults import folder_config, image_folder

from saev_core.planning import config_files, keep, plan, stale

SWEEP = "tiny-synthetic"


def sweep_config(photos_dpath: pathlib.Path, ks: list[int], **top) -> dict:
    config = folder_config(photos_dpath) | top
    sweep = config["sweeps"][SWEEP]
    sweep["saes"] = [{"activation": "topk", "k": ks}]
    sweep.pop("external_saes")
    sweep.update(top_k=4, render={"n_latents": 2})
    return config


def snakemake(workdir: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    argv = snakemake_argv(
        workdir, "--configfile", str(workdir / "experiments.yaml"), "--cores", "2", *args
    )
    return subprocess.run(argv, capture_output=True, text=True, env=snakemake_env())


def job_counts(workdir: pathlib.Path, *args: str) -> dict[str, int]:
    """What `snakemake -n all` would run, by rule."""
    result = snakemake(workdir, "-n", "all", *args)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    if "Nothing to be done" in result.stdout:
        return {}
    stats = result.stdout.split("Job stats:")[1].split("Reasons:")[0]
    counts = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}
    return {rule: n for rule, n in counts.items() if rule not in ("total", "all")}


def run_all(workdir: pathlib.Path, *args: str):
    result = snakemake(workdir, "all", *args)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def write_config(workdir: pathlib.Path, config: dict) -> dict:
    (workdir / "experiments.yaml").write_text(yaml.safe_dump(config))
    return config


def current_plan(workdir: pathlib.Path) -> plan.Plan:
    return plan.make_plan(config_files.load(workdir / "experiments.yaml"), workdir=workdir)


def sae_files(workdir: pathlib.Path) -> dict[str, tuple[int, bytes]]:
    """Each trained `sae.pt` by group/SAE: inode and bytes (unchanged file, unchanged both)."""
    return {
        str(p.relative_to(workdir / "results" / SWEEP / "groups")): (
            p.stat().st_ino,
            p.read_bytes(),
        )
        for p in (workdir / "results" / SWEEP / "groups").glob("*/*/sae.pt")
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("finished")
    photos = image_folder(root / "photos")
    workdir = root / "work"
    workdir.mkdir()
    write_config(workdir, sweep_config(photos, [4, 16]))
    run_all(workdir)
    return workdir


@pytest.fixture()
def workdir(finished, tmp_path) -> pathlib.Path:
    """A copy of the finished run (time stamps and Snakemake's records kept)."""
    copy = tmp_path / "work"
    shutil.copytree(finished, copy, symlinks=True)
    return copy


def sae_ids_by_k(workdir: pathlib.Path) -> dict[int, str]:
    return {cfg["k"]: sae_id for sae_id, cfg in current_plan(workdir).sweeps[SWEEP].saes.items()}


def test_a_grown_sweep_trains_only_the_new_sae_and_a_shrunk_one_nothing(workdir):
    config = yaml.safe_load((workdir / "experiments.yaml").read_text())
    before = sae_files(workdir)
    config["sweeps"][SWEEP]["saes"][0]["k"] = [4, 16, 32]
    write_config(workdir, config)
    new = {
        "train_group": 1,
        "evaluate_sae": 1,
        "topk_images": 1,
        "render_features": 1,
        "summarize_sweep": 1,
    }
    assert job_counts(workdir) == new
    run_all(workdir)
    after = sae_files(workdir)
    assert {k: v for k, v in after.items() if k in before} == before  # not retrained
    assert len(after) == 3
    ids = sae_ids_by_k(workdir)
    sweep = current_plan(workdir).sweeps[SWEEP]
    assert sweep.groups[sweep.sae_group[ids[32]]].sae_ids == (ids[32],)  # a group of its own
    assert sweep.sae_group[ids[4]] == sweep.sae_group[ids[16]]  # the old group, as it was

    config["sweeps"][SWEEP]["saes"][0]["k"] = [16, 32]  # drop k=4: its group stays as trained
    write_config(workdir, config)
    assert job_counts(workdir) == {"summarize_sweep": 1}
    run_all(workdir)
    listed = stale.stale_paths(current_plan(workdir), workdir)
    listed_fpaths = {item.fpath.relative_to(workdir) for item in listed}
    group_id = sweep.sae_group[ids[4]]
    assert pathlib.Path(f"results/{SWEEP}/groups/{group_id}/{ids[4]}") in listed_fpaths
    assert pathlib.Path(f"results/{SWEEP}/saes/{ids[4]}") in listed_fpaths
    argv = [sys.executable, "-m", "saev_core.planning.stale", "experiments.yaml", "--remove"]
    removed = subprocess.run(argv, cwd=workdir, capture_output=True, text=True)
    assert removed.returncode == 0, removed.stderr
    assert f"results/{SWEEP}/saes/{ids[4]}" in removed.stdout
    assert not (workdir / "results" / SWEEP / "saes" / ids[4]).exists()
    assert job_counts(workdir) == {}
    assert stale.stale_paths(current_plan(workdir), workdir) == []


def test_a_lost_sae_is_trained_again_alone(workdir):
    before = sae_files(workdir)
    lost = sorted(before)[0]
    (workdir / "results" / SWEEP / "groups" / lost).unlink()
    counts = job_counts(workdir)
    assert counts == {
        "train_group": 1,
        "evaluate_sae": 1,
        "topk_images": 1,
        "render_features": 1,
        "summarize_sweep": 1,
    }
    run_all(workdir)
    after = sae_files(workdir)
    kept = sorted(before)[1]
    assert after[kept] == before[kept]
    (retrained,) = [k for k in after if k.endswith(lost.split("/")[1] + "/sae.pt")]
    assert retrained.split("/")[0] != lost.split("/")[0]  # a group of its own
    assert job_counts(workdir) == {}


@pytest.mark.parametrize("lost", ["topk.npz", "metrics.json"])
def test_a_lost_intermediate_file_is_made_again(workdir, lost):
    sae_dpath = next((workdir / "results" / SWEEP / "saes").iterdir())
    (sae_dpath / lost).unlink()
    counts = job_counts(workdir)
    assert "train_group" not in counts and counts, counts
    run_all(workdir)
    assert (sae_dpath / lost).stat().st_size > 0


def test_a_failed_rerun_keeps_the_previous_saes_and_keep_restores_them(workdir, monkeypatch):
    """`device: cuda` on a machine without one: the forced retrain fails; the SAEs, their
    evaluations and browsers are still there, and `keep` makes them the group's again."""
    config = yaml.safe_load((workdir / "experiments.yaml").read_text())
    before = sae_files(workdir)
    metrics = {p: p.read_bytes() for p in workdir.glob(f"results/{SWEEP}/saes/*/metrics.json")}
    write_config(workdir, config | {"device": "cuda"})
    failed = snakemake(workdir, "all", "--forcerun", "train_group")
    assert failed.returncode != 0
    assert sae_files(workdir) == before
    assert {p: p.read_bytes() for p in metrics} == metrics
    write_config(workdir, config)
    assert job_counts(workdir).get("train_group") == 1  # the group shows as not done
    (group_dpath,) = {p.parent.parent for p in workdir.glob(f"results/{SWEEP}/groups/*/*/sae.pt")}
    monkeypatch.chdir(workdir)  # keep runs in the workflow's directory, as the README says
    keep.keep(group_dpath.relative_to(workdir))
    assert job_counts(workdir) == {}
    assert sae_files(workdir) == before


def test_keep_refuses_a_group_missing_an_sae(workdir, monkeypatch):
    (group_dpath,) = {p.parent.parent for p in workdir.glob(f"results/{SWEEP}/groups/*/*/sae.pt")}
    lost = next(group_dpath.glob("*/sae.pt"))
    lost.unlink()
    monkeypatch.chdir(workdir)
    with pytest.raises(keep.KeepError, match=f"{lost.relative_to(workdir)} is missing"):
        keep.keep(group_dpath.relative_to(workdir))


def test_a_kill_during_publish_costs_only_the_publish(workdir):
    """Event-driven: the run is killed once the publish job has started (its log exists)."""
    (shards_hash,) = current_plan(workdir).shard_jobs
    (workdir / "results" / "shards" / shards_hash / "shards.json").unlink()
    log_fpath = workdir / "results" / "logs" / "publish_activations" / f"{shards_hash}.log"
    log_fpath.unlink()
    argv = snakemake_argv(
        workdir, "--configfile", str(workdir / "experiments.yaml"), "--cores", "2", "all"
    )
    kill_once_started(argv, log_fpath)
    assert snakemake(workdir, "--unlock").returncode == 0
    counts = job_counts(workdir, "--rerun-incomplete")
    assert set(counts) <= {"publish_activations", "shards_published"}, counts  # no training
    run_all(workdir, "--rerun-incomplete")
    assert (workdir / "results" / "shards" / shards_hash / "shards.json").exists()
    assert job_counts(workdir) == {}
