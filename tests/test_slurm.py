"""The embedded default through a real Slurm controller (../shared/slurm), as on a cluster.

Runs only when SAEV_SLURM_KIT names the kit's folder (`make test-slurm`, `.ci/run`): it needs root
and installs Debian's Slurm packages. Checks from Slurm's own job records that dump, training and
top-k ran on the `gpu` partition with a GPU allocated and everything else on `cpu`; that a
training job cancelled with `scancel` mid-run is resubmitted and resumes from its checkpoint, with
the same weights as an undisturbed run; and that a second run submits nothing.
"""

import os
import pathlib
import re
import subprocess
import threading
import time

import pytest
import torch
import yaml
from conftest import snakemake_argv, snakemake_env

from saev_core import sae
from saev_core.planning import plan
from saev_core.steps import train

REPO = pathlib.Path(__file__).parent.parent
KIT = os.environ.get("SAEV_SLURM_KIT")
GPU_RULES = {
    "dump_activations",
    "train_group",
    "topk_images",
    "train_probe",
    "intervene",
    "fit_baseline",
    "trait_metrics",
}
RUN_TIMEOUT_S = 1200

pytestmark = pytest.mark.skipif(not KIT, reason="set SAEV_SLURM_KIT to the Slurm test kit folder")


@pytest.fixture(scope="module")
def cluster():
    """Start the kit's daemons; afterwards stop only those this fixture started, by PID."""
    state_dpath = pathlib.Path(os.environ.get("SLURM_KIT_DPATH", "/tmp/saev-slurm"))
    pid_fpaths = [state_dpath / "slurmd.pid", state_dpath / "slurmctld.pid"]
    pid_fpaths.append(pathlib.Path("/run/munge/munged.pid"))
    running_before = {f: pid_alive(f) for f in pid_fpaths}
    subprocess.run(["bash", f"{KIT}/start.sh"], check=True, timeout=600, capture_output=True)
    yield
    for fpath, was_running in running_before.items():
        if not was_running and pid_alive(fpath):
            os.kill(int(fpath.read_text()), 15)


def pid_alive(fpath: pathlib.Path) -> bool:
    try:
        os.kill(int(fpath.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


class JobRecorder(threading.Thread):
    """Polls Slurm for this workflow's jobs (by working directory) and keeps `scontrol -d` facts:
    finished jobs leave `squeue` after MinJobAge, so they are read while the run goes on."""

    def __init__(self, workdir: pathlib.Path):
        super().__init__(daemon=True)
        self.workdir, self.jobs, self.stop = str(workdir), {}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.poll()
            time.sleep(1)
        self.poll()

    def poll(self):
        ids = subprocess.run(
            ["squeue", "-t", "all", "-h", "-o", "%i"], capture_output=True, text=True
        ).stdout.split()
        for job_id in ids:
            if self.jobs.get(job_id, {}).get("JobState") in ("COMPLETED", "CANCELLED", "FAILED"):
                continue
            text = subprocess.run(
                ["scontrol", "show", "job", "-d", job_id], capture_output=True, text=True
            ).stdout
            facts = dict(re.findall(r"(\w+)=(\S*)", text))
            if facts.get("WorkDir") == self.workdir and facts.get("JobState") != "PENDING":
                self.jobs[job_id] = facts

    def rules(self) -> dict[str, list[dict]]:
        by_rule: dict[str, list[dict]] = {}
        for facts in self.jobs.values():
            rule = re.match(r"rule_(\w+?)_wildcards", facts["Comment"])[1]
            by_rule.setdefault(rule, []).append(facts)
        return by_rule


def cancel_a_training_job_after_its_checkpoint(workdir: pathlib.Path, proc) -> str:
    """Wait for a group's first checkpoint, `scancel` its job; return the group id."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        ckpts = list(workdir.glob("results/*/work/*/checkpoint.pt"))
        if ckpts:
            group = ckpts[0].parent.name
            out = subprocess.run(
                ["squeue", "-h", "-t", "running", "-o", "%i %k"], capture_output=True, text=True
            ).stdout
            job_ids = [line.split()[0] for line in out.splitlines() if group in line]
            assert job_ids, f"no running Slurm job for group {group}:\n{out}"
            subprocess.run(["scancel", *job_ids], check=True)
            return group
        time.sleep(0.2)
    raise AssertionError("no training checkpoint appeared")


def test_embedded_default_on_slurm(cluster, tmp_path):
    env = snakemake_env()
    argv = snakemake_argv(tmp_path, "--profile", str(REPO / "profiles" / "ci-slurm"), "all")
    (tmp_path / "config").mkdir()
    config_fpath = tmp_path / "config" / "experiments.yaml"
    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    config["sweeps"]["tiny-synthetic"]["checkpoint_every"] = 10  # execution only: ids unchanged
    # One intervention (15 jobs) shows where they run; the second would only add queue time.
    del config["sweeps"]["tiny-synthetic"]["interventions"][1:]
    # One baseline (the random SAE) shows where fitting runs; the others would add queue time.
    config["sweeps"]["tiny-synthetic"]["baselines"] = [
        b for b in config["sweeps"]["tiny-synthetic"]["baselines"] if b["kind"] == "random"
    ]
    # Two SAE kinds per layer (every rule still runs); the other kinds are placed like these
    # and would add 50 jobs of queue time (5 per SAE: evaluate, top-k, traits, intervene, render).
    config["sweeps"]["tiny-synthetic"]["saes"] = [
        {"activation": "relu", "sparsity_coeff": 0.01},
        {"activation": "topk", "k": 16},  # the external SAE is its export
    ]
    config_fpath.write_text(yaml.safe_dump(config))

    recorder = JobRecorder(tmp_path)
    recorder.start()
    log_fpath = tmp_path / "snakemake.log"
    with open(log_fpath, "w") as log_fd:
        proc = subprocess.Popen(argv, stdout=log_fd, stderr=log_fd, env=env)
        try:
            group = cancel_a_training_job_after_its_checkpoint(tmp_path, proc)
            assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, log_fpath.read_text()[-5000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    recorder.stop.set()
    recorder.join()

    # Where every job ran, from Slurm's records.
    by_rule = recorder.rules()
    assert GPU_RULES <= set(by_rule) and {"train_group", "evaluate_sae"} <= set(by_rule)
    for rule, jobs in by_rule.items():
        for facts in jobs:
            if rule in GPU_RULES:
                assert facts["Partition"] == "gpu", (rule, facts)
                assert facts["JOB_GRES"] == "gpu:fake:1", (rule, facts)
            else:
                assert facts["Partition"] == "cpu", (rule, facts)
                assert facts["JOB_GRES"] == "(null)", (rule, facts)

    # Tiny steps never queue as cluster jobs (localrules).
    assert not {"synthetic_dataset", "shards_published", "summarize_sweep", "all"} & set(by_rule)

    # The cancelled job was resubmitted, with more time (runtime "30 * attempt"), and resumed
    # from its checkpoint.
    group_jobs = [f for f in by_rule["train_group"] if group in f["Comment"]]
    assert sorted(f["JobState"] for f in group_jobs) == ["CANCELLED", "COMPLETED"]
    limits = {f["JobState"]: f["TimeLimit"] for f in group_jobs}
    assert limits == {"CANCELLED": "00:30:00", "COMPLETED": "01:00:00"}
    train_log = (tmp_path / "results/logs/train_group/tiny-synthetic" / f"{group}.log").read_text()
    assert "resuming from" in train_log
    assert_same_as_undisturbed(tmp_path, config, group)

    # A second run has nothing to submit.
    n_jobs = len(recorder.jobs)
    second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    output = second.stdout + second.stderr
    assert second.returncode == 0 and "Nothing to be done" in output, output[-6000:]
    recorder.poll()
    assert len(recorder.jobs) == n_jobs


def assert_same_as_undisturbed(workdir: pathlib.Path, config: dict, group_id: str):
    """Train the cancelled group again here, undisturbed, from the same shards."""
    plan.validate_config(config)
    sweep = plan.make_plan(config).sweeps["tiny-synthetic"]
    saes = {sae_id: sweep.saes[sae_id] for sae_id in sweep.groups[group_id].sae_ids}
    shards_dpath = workdir / config["shards_dpath"] / sweep.train_shards
    models = train.train_group(saes, shards_dpath, workdir / "undisturbed", device="cpu")
    for sae_id in models:
        resumed = sae.load(workdir / "results/tiny-synthetic/groups" / group_id / sae_id / "sae.pt")
        undisturbed = sae.load(workdir / "undisturbed" / sae_id / "sae.pt")
        for name, value in undisturbed.state_dict().items():
            torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6)
