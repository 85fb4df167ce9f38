"""Nothing silently wrong, nothing lost: one test per fault a user meets.

First battery (issue 17): non-finite activations, images changed in place, duplicate config keys
and syntax errors, damaged checkpoints, undecodable images, a full disk and two jobs for one
group: each is rejected with a message that names the culprit, and nothing complete is lost.

Second battery (issue 22), where each case is tested:
- a setting that only says how a job runs (device, shards_dpath, dump batch size and workers,
  checkpoint interval, W&B project) reruns nothing: test_workflow.py
  test_execution_settings_rerun_nothing;
- a grown sweep trains only its new SAEs, a shrunk one nothing; stale folders are listed and
  removed by `saev_core.planning.stale`: test_recovery.py;
- a failed rerun keeps the previous SAEs, their evaluations and browsers, and
  `saev_core.planning.keep` makes them the group's again: test_recovery.py;
- a lost sae.pt is trained again alone; a lost topk.npz or metrics.json is made again:
  test_recovery.py;
- a kill during publish costs only the publish: test_recovery.py;
- lost shards are re-dumped without retraining, and a dry run changes nothing on disk:
  test_workflow.py test_lost_shards_are_redumped_without_retraining;
- a damaged shard of the right size (zeros, one flipped bit) is named by publish and by `dump
  verify`, and a re-dump repairs it; the short last shard stays sparse: here;
- 16-bit and float images, decompression bombs and broken links: test_datasets.py;
- labels.bin class ids beyond the class list: test_evaluate.py;
- an external SAE replaced with `cp -p` reruns its jobs: test_plan.py;
- plan-time checks (layer beyond the model's depth, checkpoint names a family cannot build,
  include_latents beyond d_sae, a group too big for memory): test_plan.py BAD_CONFIGS;
- temporary files of killed writers are removed by the next write: here.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import torch
import yaml
from conftest import group_spec, run_snakemake, tiny_metadata, train_spec_fpath

from saev_core import datasets, sae, shards
from saev_core.planning import config_files, plan
from saev_core.steps import dump, evaluate, render, topk, train

REPO = pathlib.Path(__file__).parent.parent
TINY_CONFIG_FPATH = pathlib.Path(__file__).parent / "configs" / "tiny.yaml"


def poisoned_copy(shards_dpath: pathlib.Path, tmp_path: pathlib.Path, img: int) -> pathlib.Path:
    """A copy of the fixture shards with 10 NaN floats in image `img`'s last-layer patches (bit
    rot: the file sizes and metadata stay valid)."""
    copy = tmp_path / shards_dpath.name
    shutil.copytree(shards_dpath, copy)
    reader = shards.ShardReader(copy)
    shard_i, row = reader.locate(img)
    acts = np.memmap(
        copy / shards.shard_fname(shard_i), "<f4", "r+", shape=reader.metadata.shard_shape
    )
    acts[row, -1, 5, :10] = np.nan
    acts.flush()
    return copy


def test_nan_in_a_training_shard_stops_training_naming_file_and_image(shards_dpath, tmp_path):
    poisoned = poisoned_copy(shards_dpath, tmp_path, img=20)  # shard 1, row 4
    spec = group_spec(relu={"activation": "relu", "sparsity_coeff": 0.01})
    out_dpath = tmp_path / "group"
    with pytest.raises(shards.ShardError) as err:
        train.train_group(spec, poisoned, out_dpath, checkpoint_every=1, device="cpu")
    assert "acts000001.bin: NaN or infinite activations for image index 20 (row 4" in str(err.value)
    assert not out_dpath.exists()  # nothing that looks finished


def test_divergence_stops_at_the_first_non_finite_loss_keeping_the_checkpoint(
    shards_dpath, tmp_path
):
    spec = group_spec(relu={"activation": "relu", "sparsity_coeff": 0.01})
    spec["relu"]["lr"] = 1e12
    out_dpath, work_dpath = tmp_path / "group", tmp_path / "work"
    with pytest.raises(
        FloatingPointError, match=r"SAE relu: non-finite loss or weights at step \d+; the "
    ):
        train.train_group(
            spec, shards_dpath, out_dpath, work_dpath=work_dpath, checkpoint_every=1, device="cpu"
        )
    assert not out_dpath.exists()
    ckpt = torch.load(work_dpath / train.CHECKPOINT_FNAME, weights_only=True)
    weights = ckpt["stacks"]["relu-x4"]["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_a_late_divergence_stops_at_the_next_check_keeping_the_last_good_checkpoint(
    shards_dpath, tmp_path
):
    """The step does not read its loss back (that would make the host wait for a GPU every
    step): a NaN loss is recorded on the device and read at the next logging or checkpoint step,
    before anything is written. A learning rate warming up towards 1e13 diverges late (steps 13 to
    50 for seeds 0-3 here); the checkpoint kept is the last one before the divergence."""
    spec = group_spec(n_train=256 * 100, relu={"activation": "relu", "sparsity_coeff": 0.01})
    spec["relu"].update(lr=1e13, warmup_steps=10**6)
    out_dpath, work_dpath = tmp_path / "group", tmp_path / "work"
    with pytest.raises(
        FloatingPointError, match=r"SAE relu: non-finite loss or weights at step (\d+); the "
    ) as err:
        train.train_group(
            spec, shards_dpath, out_dpath, work_dpath=work_dpath, checkpoint_every=5, device="cpu"
        )
    diverged = int(re.search(r"at step (\d+)", str(err.value))[1])
    assert not out_dpath.exists()
    ckpt = torch.load(work_dpath / train.CHECKPOINT_FNAME, weights_only=True)
    assert diverged - 5 < ckpt["step"] <= diverged  # the last interval before the divergence
    weights = ckpt["stacks"]["relu-x4"]["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_nan_in_the_eval_shard_is_named_by_evaluate_topk_and_render(
    shards_dpath, trained_dpath, dataset_cfg, tmp_path
):
    poisoned = shards.ShardReader(poisoned_copy(shards_dpath, tmp_path, img=33))
    model, _ = sae.load_trained(trained_dpath / "topk" / "sae.pt")
    expected = r"acts000002.bin: NaN or infinite activations for image index 33 \(row 1"
    with pytest.raises(shards.ShardError, match=expected):
        evaluate.evaluate(model, poisoned, -1, "patches", datasets.load(dataset_cfg).classes)
    with pytest.raises(shards.ShardError, match=expected):
        topk.top_k(model, poisoned, -1, "patches", k=4)
    with pytest.raises(shards.ShardError, match=expected):
        render.patch_heatmaps(model, poisoned, -1, [32, 33])


def test_metrics_json_is_always_valid_json(shards_dpath, trained_dpath, tmp_path):
    model, _ = sae.load_trained(trained_dpath / "relu" / "sae.pt")
    result = evaluate.evaluate(model, shards.ShardReader(shards_dpath), -1, "patches")
    broken = result._replace(metrics={**result.metrics, "mse": float("nan"), "l1": float("inf")})
    evaluate.write(broken, "t", tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=None)
    assert metrics["mse"] is None and metrics["l1"] is None
    assert metrics["l0"] == result.metrics["l0"]


def image_folder(root: pathlib.Path, n: int = 4) -> pathlib.Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        datasets.Image.fromarray(pixels).save(root / f"class{i % 2}" / f"{i}.png")
    return root


def folder_config(root: pathlib.Path) -> dict:
    config = yaml.safe_load(TINY_CONFIG_FPATH.read_text())
    config["datasets"] = {"photos": {"kind": "image-folder", "root": str(root)}}
    config["activations"] = {
        "photos": {
            "model": "tiny",
            "dataset": "photos",
            "layers": [-1],
            "max_patches_per_shard": 130,
        }
    }
    config.pop("probes")  # photos have no masks; their probes and interventions: test_plan
    config["sweeps"]["tiny-synthetic"].pop("interventions")
    config["sweeps"]["tiny-synthetic"].pop("baselines")  # four photos; baselines: test_baselines
    config["sweeps"]["tiny-synthetic"].update(train_activations="photos")
    config["sweeps"]["tiny-synthetic"].pop("eval_activations")
    config["sweeps"]["tiny-synthetic"]["train"][0].update(layer=-1, batch_size=64, n_train=256)
    return config


def snakemake(workdir: pathlib.Path, config_fpath: pathlib.Path, *args: str):
    return run_snakemake(workdir, "--configfile", str(config_fpath), "--cores", "2", *args)


def test_an_image_changed_in_place_makes_the_dump_stale(tmp_path):
    root = image_folder(tmp_path / "photos")
    config_fpath = tmp_path / "experiments.yaml"
    config_fpath.write_text(yaml.safe_dump(folder_config(root)))

    def shards_done() -> str:
        shards_hash = plan.make_plan(config_files.load(config_fpath)).activations["photos"]
        return f"results/shards/{shards_hash}/shards.json"

    before = shards_done()
    assert snakemake(tmp_path, config_fpath, before).returncode == 0
    assert "Nothing to be done" in snakemake(tmp_path, config_fpath, "-n", before).stdout

    # Same name, same count: another picture.
    datasets.Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "class1" / "1.png")
    after = shards_done()
    assert after != before
    dry = snakemake(tmp_path, config_fpath, "-n", "all")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert f"output: {after.removesuffix('shards.json')}.dump-part0-of-1.done" in dry.stdout


def dry_run_text(tmp_path: pathlib.Path, text: str) -> str:
    config_fpath = tmp_path / f"my-{uuid.uuid4().hex[:6]}.yaml"
    config_fpath.write_text(text)
    result = snakemake(tmp_path, config_fpath, "-n")
    assert result.returncode != 0
    return result.stdout + result.stderr


def test_duplicate_sweep_names_fail_naming_the_key_and_both_lines(tmp_path):
    text = TINY_CONFIG_FPATH.read_text()
    sweep = text[text.index("  tiny-synthetic:\n") :]  # the last table: it runs to the end
    doubled = text + sweep.replace("checkpoint_every: 50", "checkpoint_every: 10")
    first_line = text[: text.index(sweep)].count("\n") + 1
    second_line = text.count("\n") + 1
    output = dry_run_text(tmp_path, doubled)
    expected = (
        f":{second_line}:3: duplicate key 'tiny-synthetic' (first given at line {first_line})"
    )
    assert expected in output, output[-2000:]


def test_yaml_syntax_errors_give_file_line_and_column(tmp_path):
    config_fpath = tmp_path / "broken.yaml"
    config_fpath.write_text("datasets:\n  a: [1, 2\nmodels: {}\n")
    # Snakemake reads --configfile files itself first; the default file and this command are ours.
    with pytest.raises(ValueError, match=r"broken.yaml:3:\d+: .*expected ',' or ']'"):
        config_files.load(config_fpath)
    check = subprocess.run(
        [sys.executable, "-m", "saev_core.planning.config_files", str(config_fpath)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 1 and "broken.yaml:3:" in check.stderr


def test_errors_name_the_config_file_they_come_from(tmp_path):
    config = yaml.safe_load(TINY_CONFIG_FPATH.read_text())
    config["sweeps"]["tiny-synthetic"]["saes"][1]["k"] = 100000
    output = dry_run_text(tmp_path, yaml.safe_dump(config))
    assert "my-" in output and ".yaml: sweeps.tiny-synthetic.saes[1].k: 100000 exceeds" in output
    assert "config/experiments.yaml" not in output


@pytest.fixture()
def ckpt_fpath(trained_dpath, tmp_path) -> pathlib.Path:
    fpath = tmp_path / "sae.pt"
    shutil.copy(trained_dpath / "topk" / "sae.pt", fpath)
    return fpath


def rewrite_tensors(fpath: pathlib.Path, **changes):
    header, state = sae.checkpoints.read(fpath)
    state.update(changes)
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    fpath.write_bytes((json.dumps(header) + "\n").encode() + buffer.getvalue())


@pytest.mark.parametrize(
    "damage, expected",
    [
        (
            lambda f: rewrite_tensors(f, W_enc=torch.zeros(64, 1)),
            r"sae.pt[^:]*: tensor 'W_enc' has shape \(64, 1\), expected \(64, 256\)",
        ),
        (
            lambda f: rewrite_tensors(f, b_dec=torch.zeros(32)),
            r"sae.pt[^:]*: tensor 'b_dec' has shape \(32,\), expected \(64,\)",
        ),
        (
            lambda f: rewrite_tensors(f, b_enc=torch.full((256,), float("nan"))),
            r"sae.pt[^:]*: tensor 'b_enc' holds NaN or infinite values",
        ),
        (
            lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
            r"sae.pt: cannot read the weights after the header .*truncated or damaged",
        ),
        (
            lambda f: f.write_bytes(b"\x89garbage\n" + f.read_bytes()),
            r"sae.pt: the first line is not a JSON header",
        ),
    ],
    ids=["broadcastable", "another SAE's tensor", "nan", "truncated", "garbage header"],
)
def test_damaged_checkpoints_fail_naming_the_file_and_tensor(ckpt_fpath, damage, expected):
    damage(ckpt_fpath)
    with pytest.raises(ValueError, match=expected):
        sae.load(ckpt_fpath)


def test_a_truncated_jpeg_names_its_path_and_index(tmp_path):
    root = image_folder(tmp_path / "photos")
    jpeg = root / "class1" / "3.jpg"
    datasets.Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:-200])
    dataset = datasets.load({"kind": "image-folder", "root": str(root)})
    i = next(i for i, (fpath, _) in enumerate(dataset.samples) if fpath == jpeg)
    with pytest.raises(
        datasets.DatasetError, match=rf"{jpeg} \(dataset index {i}\): cannot decode"
    ):
        dataset.image(i)


@pytest.fixture()
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root, as CI has); the test is skipped where it cannot be mounted."""
    dpath = tmp_path / "disk"
    dpath.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(dpath)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield dpath
    subprocess.run(["umount", "-l", str(dpath)])


def test_a_full_disk_says_no_space_left_and_the_dump_resumes(small_disk, dataset_cfg, tmp_path):
    # 16 images per shard of 16 x 2 x 65 x 64 floats = 532 KiB: the second shard does not fit.
    metadata = tiny_metadata()
    with pytest.raises(OSError, match=r"No space left on device: cannot reserve .*acts00000\d.bin"):
        dump.dump(metadata, dataset_cfg, small_disk, batch_size=16, device="cpu")
    done = {p.name for p in (small_disk / metadata.hash).glob("acts*.bin")}
    assert done == {"acts000000.bin"}  # finished shards stay; no half-written ones
    shutil.copytree(small_disk / metadata.hash, tmp_path / "big" / metadata.hash)
    resumed = dump.dump(metadata, dataset_cfg, tmp_path / "big", batch_size=16, device="cpu")
    reference = dump.dump(metadata, dataset_cfg, tmp_path / "ref", batch_size=16, device="cpu")
    for fpath in reference.iterdir():
        assert (resumed / fpath.name).read_bytes() == fpath.read_bytes(), fpath.name


def zeroed_copy(shards_dpath: pathlib.Path, tmp_path: pathlib.Path, shard_i: int) -> pathlib.Path:
    """A copy of the fixture shards whose shard `shard_i` is all zeros, at its size."""
    copy = tmp_path / "root" / shards_dpath.name
    shutil.copytree(shards_dpath, copy)
    fpath = copy / shards.shard_fname(shard_i)
    fpath.write_bytes(bytes(fpath.stat().st_size))
    return copy


def test_a_damaged_shard_of_the_right_size_is_named_and_a_redump_repairs_it(
    shards_dpath, dataset_cfg, tmp_path
):
    damaged = zeroed_copy(shards_dpath, tmp_path, shard_i=1)
    (err,) = shards.verify(damaged)
    assert "acts000001.bin: image index 16 (row 0) does not match the checksum" in str(err)
    assert "Delete it and run `snakemake` again" in str(err)
    argv = [sys.executable, "-m", "saev_core.steps.dump", "verify", str(damaged)]
    checked = subprocess.run(argv, capture_output=True, text=True)
    assert checked.returncode == 1 and "acts000001.bin: image index 16" in checked.stderr
    with pytest.raises(shards.ShardError, match="acts000001.bin: image index 16"):
        shards.ShardWriter(damaged, tiny_metadata()).publish()
    # What `--forcerun dump_activations` runs: the damaged shard is written again, the others kept.
    untouched = (damaged / shards.shard_fname(0)).stat().st_ino
    dump.dump_part(tiny_metadata(), dataset_cfg, damaged, batch_size=16, device="cpu")
    assert (damaged / shards.shard_fname(0)).stat().st_ino == untouched
    for shard_i in range(3):
        fname = shards.shard_fname(shard_i)
        assert (damaged / fname).read_bytes() == (shards_dpath / fname).read_bytes(), fname
    assert shards.verify(damaged) == []
    checked = subprocess.run(argv, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_one_flipped_bit_is_found(shards_dpath, tmp_path):
    copy = tmp_path / shards_dpath.name
    shutil.copytree(shards_dpath, copy)
    fpath = copy / shards.shard_fname(2)
    data = bytearray(fpath.read_bytes())
    row_nbytes = len(data) // 16
    data[5 * row_nbytes + 1234] ^= 0x10  # row 5 of the last shard: image 37
    fpath.write_bytes(bytes(data))
    (err,) = shards.verify(copy)
    assert "acts000002.bin: image index 37 (row 5)" in str(err)


def test_the_short_last_shard_reserves_only_the_rows_it_fills(shards_dpath):
    """40 images at 16 per shard: the last shard holds 8 rows; its other 8 stay sparse (as in
    saev's memory-mapped writer), while its size is the protocol's full shard size."""
    md = shards.Metadata.load(shards_dpath)
    last, full = (shards_dpath / shards.shard_fname(i) for i in (2, 0))
    assert last.stat().st_size == full.stat().st_size == md.shard_nbytes
    used_nbytes = md.shard_nbytes // 2
    assert full.stat().st_blocks * 512 >= md.shard_nbytes
    assert last.stat().st_blocks * 512 < used_nbytes + 64 * 1024  # one extent of slack


def test_a_second_job_for_a_group_refuses_and_the_first_finishes(shards_dpath, tmp_path):
    """Event-driven, so it holds on a loaded machine: the first job is frozen (SIGSTOP) once it
    holds the group's lock, the second runs against it, then the first is let go."""
    # ~10 s of training on an idle machine: the lock is seen long before the job could finish.
    spec = group_spec(n_train=256 * 1500, relu={"activation": "relu", "sparsity_coeff": 0.01})
    out_dpath, work_dpath = tmp_path / "group", tmp_path / "work"
    spec_fpath = train_spec_fpath(spec, shards_dpath, work_dpath, tmp_path / "group.json", 50)
    argv = [sys.executable, "-m", "saev_core.steps.train", "--spec-fpath", str(spec_fpath)]
    argv += ["--out-dpath", str(out_dpath), "--device", "cpu"]
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock_fpath = work_dpath / train.LOCK_FNAME
    # The holder writes its pid into the lock file once the lock is taken; the limit only
    # catches a hang (the job starts in a few seconds on an idle machine).
    deadline = time.monotonic() + 600
    while f"pid {first.pid} " not in (lock_fpath.read_text() if lock_fpath.exists() else ""):
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the first job never took the group's lock"
        time.sleep(0.01)
    os.kill(first.pid, signal.SIGSTOP)  # holds the lock until let go, however slow the machine
    try:
        second = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode != 0
    assert (
        f"sweep group {out_dpath.name} is already being trained by another job (pid {first.pid}"
        in second.stderr
    )
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    sae.load(out_dpath / "relu" / "sae.pt")  # complete and readable
    train.train_group(spec, shards_dpath, tmp_path / "alone", device="cpu")
    alone = (tmp_path / "alone" / "relu" / "sae.pt").read_bytes()
    assert (out_dpath / "relu" / "sae.pt").read_bytes() == alone  # as if undisturbed


def test_the_suite_ignores_the_users_config(tmp_path):
    """A schema-valid edit of config/experiments.yaml (here: train only layer -1) leaves the
    tests that once read it green."""
    repo = tmp_path / "repo"
    for name in ("saev_core", "workflow", "tests", "config", "Snakefile", "pyproject.toml"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, repo / name)
    user_fpath = repo / "config" / "experiments.yaml"
    user_fpath.write_text(user_fpath.read_text().replace("layer: [-2, -1]", "layer: -1"))
    config_files.load(user_fpath)  # still valid
    env = {**os.environ, "PYTHONPATH": str(repo)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_plan.py"]
        + ["-k", "embedded_default or ids_do_not_depend or cap_splits or one_value"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "4 passed" in result.stdout


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """`.metrics.json.<pid>.tmp` of a writer that was killed (its pid runs no more) goes when the
    file is next written; one of a writer still running stays."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale_fpath = tmp_path / f".metrics.json.{gone.pid}.tmp"
    stale_fpath.write_text("{half")
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    live_fpath = tmp_path / f".metrics.json.{running.pid}.tmp"
    live_fpath.write_text("{writing")
    other_fpath = tmp_path / f".other.json.{gone.pid}.tmp"  # another file's: not ours to judge
    other_fpath.write_text("{")
    try:
        shards.write_atomic(tmp_path / "metrics.json", b"{}")
    finally:
        running.kill()
        running.wait()
    assert not stale_fpath.exists() and live_fpath.exists()
    live_fpath.unlink()
    assert other_fpath.exists()
    assert (tmp_path / "metrics.json").read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".other.json.{gone.pid}.tmp",
        "metrics.json",
    ]
