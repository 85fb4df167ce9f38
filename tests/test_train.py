"""Group training lowers reconstruction error, feeds every member the same batches, resumes."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import group_spec, train_spec_fpath

from saev_core import config, helpers, sae, shards, tracking
from saev_core.steps import evaluate, train


def test_group_training_lowers_error_from_initialisation(shards_dpath, trained_dpath):
    reader = shards.ShardReader(shards_dpath)
    for sae_id in ("relu", "topk"):
        trained, train_cfg = sae.load_trained(trained_dpath / sae_id / "sae.pt")
        initial = sae.SparseAutoencoder(config.sae_spec(64, train_cfg).sae)
        before = evaluate.evaluate(initial, reader, -1, "patches").metrics
        after = evaluate.evaluate(trained, reader, -1, "patches").metrics
        assert after["normalized_mse"] < 0.7 * before["normalized_mse"], sae_id
    log = (trained_dpath / "relu" / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,loss,mse,l0,l1,aux,lr,sparsity_coeff,dead_frac"
    assert len(log) > 3


def test_group_members_see_the_same_batches(shards_dpath, tmp_path):
    """Training an SAE alone or inside a group gives the same weights."""
    alone = train.train_group(
        group_spec(n_train=256 * 5, a={"activation": "topk", "k": 4}),
        shards_dpath,
        tmp_path / "alone",
    )["a"]
    grouped = train.train_group(
        group_spec(
            n_train=256 * 5,
            a={"activation": "topk", "k": 4},
            b={"activation": "relu", "sparsity_coeff": 0.1},
        ),
        shards_dpath,
        tmp_path / "grouped",
    )["a"]
    for name, param in alone.state_dict().items():
        torch.testing.assert_close(param, grouped.state_dict()[name])


def test_decoder_rows_stay_unit_norm(trained_dpath):
    model = sae.load(trained_dpath / "relu" / "sae.pt")
    torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(model.cfg.d_sae))


def test_unknown_checkpoint_schema_is_rejected(tmp_path):
    fpath = tmp_path / "sae.pt"
    fpath.write_bytes(b'{"schema": 7, "cls": "SparseAutoencoder", "cfg": {}}\n')
    with pytest.raises(ValueError, match=r"sae.pt: unknown checkpoint layout \(schema 7"):
        sae.load(fpath)


def test_sigkill_then_rerun_ends_with_the_same_weights(shards_dpath, tmp_path):
    """A group job killed after a checkpoint resumes there and matches an undisturbed run."""
    spec = group_spec(
        n_train=64 * 400,
        relu={"activation": "relu", "sparsity_coeff": 0.01},
        topk={"activation": "topk", "k": 8},
    )
    for cfg in spec.values():
        cfg["batch_size"] = 64
    undisturbed = train.train_group(spec, shards_dpath, tmp_path / "undisturbed", device="cpu")

    out_dpath, work_dpath = tmp_path / "killed", tmp_path / "work"
    spec_fpath = train_spec_fpath(spec, shards_dpath, work_dpath, tmp_path / "group.json", 25)
    argv = [sys.executable, "-m", "saev_core.steps.train", "--spec-fpath", str(spec_fpath)]
    argv += ["--out-dpath", str(out_dpath), "--device", "cpu"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if (work_dpath / "checkpoint.pt").exists():
            time.sleep(0.05)  # a little past the checkpoint
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training finished before it could be killed"
    assert not (out_dpath / "relu" / "sae.pt").exists()

    resumed = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert "resuming from" in resumed.stderr
    assert not work_dpath.exists()  # removed once the outputs are written
    for sae_id in undisturbed:
        resumed_bytes = (out_dpath / sae_id / "sae.pt").read_bytes()
        assert resumed_bytes == (tmp_path / "undisturbed" / sae_id / "sae.pt").read_bytes()
        log = (out_dpath / sae_id / "train_log.csv").read_text()
        assert log == (tmp_path / "undisturbed" / sae_id / "train_log.csv").read_text()


def test_wandb_logging_writes_a_run_with_every_sae(shards_dpath, tmp_path, monkeypatch):
    """Offline mode: a real W&B run on disk, holding each SAE's fields."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = group_spec(n_train=256 * 3, a={"activation": "topk", "k": 4})
    train.train_group(spec, shards_dpath, tmp_path / "layer-1-abc", wandb_project="saev-test")
    (run_fpath,) = tmp_path.glob("wandb/offline-run-*/run-layer-1-abc.wandb")
    data = run_fpath.read_bytes()
    for field in ("a/loss", "a/l0", "a/dead_frac"):
        assert field.encode() in data
    assert b"saev-test" in data


def test_wandb_without_the_package_is_a_clear_error(shards_dpath, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    spec = group_spec(n_train=256, a={"activation": "topk", "k": 4})
    with pytest.raises(tracking.TrackingError, match=r"pip install -e '\.\[wandb\]'"):
        train.train_group(spec, shards_dpath, tmp_path / "g", wandb_project="p")


def test_cuda_jobs_use_tf32_unless_turned_off(monkeypatch):
    """Picking a CUDA device turns TF32 on for matrix products and convolutions (saev does too);
    SAEV_TF32=0 keeps them exact; CPU jobs leave the flags alone. No GPU needed: the flags are
    torch's global switches, read when a CUDA kernel runs."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        helpers.use_tf32(False)
        assert helpers.pick_device("cpu").type == "cpu"
        assert not torch.backends.cuda.matmul.allow_tf32
        monkeypatch.delenv(helpers.TF32_ENV, raising=False)
        assert helpers.pick_device("cuda").type == "cuda"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        monkeypatch.setenv(helpers.TF32_ENV, "0")
        helpers.pick_device("cuda")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
