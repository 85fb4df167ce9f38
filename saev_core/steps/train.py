"""Train one sweep group: every SAE of the group is updated on the same batches.

Run as `python -m saev_core.steps.train --spec-fpath
results/specs/sweeps/<sweep>/groups/<group>.json --out-dpath results/<sweep>/groups/<group> --device auto`, where the spec is a
`jobs.TrainGroupJob` (the SAEs' flat configurations, the shard directory, the work folder, the
checkpoint interval and the W&B project). `train_group` is the library form. Writes
`<sae id>/sae.pt` and `<sae id>/train_log.csv` for each SAE, each file renamed into place whole, and
`group.json` last (the rule's output: a failed rerun loses only that, never the previous SAEs).

While it runs, the job keeps its logs and a training checkpoint (weights, optimiser state, firing
counters, loader position) in the work folder, outside the output Snakemake removes after a failure.
A job killed at any moment and run again continues from its last checkpoint and ends with the
same weights as an uninterrupted run; the work folder is removed once the outputs are written.
"""

import argparse
import csv
import json
import logging
import math
import pathlib
import shutil
import time

import torch

from .. import config, helpers, jobs, loaders, sae, shards, tracking

logger = logging.getLogger("train")
LOCK_FNAME = "lock"
LOG_FIELDS = ("step", "loss", "mse", "l0", "l1", "aux", "lr", "sparsity_coeff", "dead_frac")
CHECKPOINT_FNAME = "checkpoint.pt"


class StackedAdam:
    """Adam over stacked parameters with one learning rate per SAE (leading axis), the same
    update as `torch.optim.Adam` applied to each SAE alone; `lr_scales` multiplies the learning
    rate of each parameter (default 1)."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        betas=(0.9, 0.999),
        eps=1e-8,
        lr_scales: list[float] | None = None,
    ):
        self.params, self.betas, self.eps = params, betas, eps
        self.lr_scales = lr_scales or [1.0] * len(params)
        self.t = 0
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr_M: torch.Tensor):
        self.t += 1
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1**self.t
        bias_correction2_sqrt = math.sqrt(1 - beta2**self.t)
        for p, exp_avg, exp_avg_sq, scale in zip(
            self.params, self.exp_avg, self.exp_avg_sq, self.lr_scales, strict=True
        ):
            if p.grad is None:
                continue
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            step_size = (scale * lr_M / bias_correction1).view(-1, *([1] * (p.dim() - 1)))
            p.sub_(step_size * exp_avg / denom)

    def state_dict(self) -> dict:
        return {"t": self.t, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict):
        self.t = state["t"]
        for mine, saved in zip(
            self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"], strict=True
        ):
            mine.copy_(saved)


class WaitTimer:
    """An iterator's items, adding up the seconds spent waiting for each (here: for the loader's
    next batch, its gather included), so a job can say what share of its time data took."""

    def __init__(self, iterable):
        self.iterator = iter(iterable)
        self.wait_s = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.wait_s += time.perf_counter() - t0


class NonFiniteLoss(FloatingPointError):
    """An SAE's loss became NaN or infinite."""


class Stack:
    """The group's SAEs of one activation and width: a `StackedSaes`, its optimiser and per-SAE
    schedules."""

    def __init__(self, specs: dict[str, config.SaeSpec], n_steps: int, device: torch.device):
        self.sae_ids = sorted(specs)
        self.trains = [specs[sae_id].train for sae_id in self.sae_ids]
        self.n_steps = n_steps
        self.model = sae.StackedSaes([specs[sae_id].sae for sae_id in self.sae_ids]).to(device)
        names, params = zip(*self.model.named_parameters(), strict=True)
        scales = [sae.JUMPRELU_THRESHOLD_LR_SCALE if n == "log_threshold" else 1.0 for n in names]
        self.optimizer = StackedAdam(list(params), lr_scales=scales)
        self.device = device

        # Per-SAE settings as device tensors, built once: a step combines them with the step
        # number (a kernel argument), so it needs no host-to-device copy, and no sync.
        def per_sae(values, dtype=torch.float64):
            return torch.tensor(values, dtype=dtype, device=device)

        self.grad_clip_M = per_sae([t.grad_clip for t in self.trains], torch.float32)
        self.clips = any(t.grad_clip > 0 for t in self.trains)
        self.base_lr_M = per_sae([t.lr for t in self.trains])
        self.warmup_M = per_sae([max(1, t.warmup_steps) for t in self.trains])
        self.cosine_M = per_sae([t.lr_schedule == "cosine" for t in self.trains], torch.bool)
        self.sparsity_warmup_M = per_sae([max(1, t.sparsity_warmup_steps) for t in self.trains])
        self.first_nonfinite_M = torch.full((len(self.sae_ids),), -1, device=device)
        """The first step whose loss was NaN or infinite, per SAE (-1: none yet), kept on the
        device and read only by `check_finite`."""

    def lr(self, step: int) -> torch.Tensor:
        """Linear warm-up, then constant or cosine decay to zero at the last step."""
        warm_M = ((step + 1) / self.warmup_M).clamp(max=1.0)
        progress_M = (step - self.warmup_M) / (self.n_steps - self.warmup_M).clamp(min=1)
        cosine_M = 0.5 * (1 + torch.cos(math.pi * progress_M))
        decaying_M = self.cosine_M & (step >= self.warmup_M)
        return (self.base_lr_M * torch.where(decaying_M, cosine_M, warm_M)).float()

    def sparsity_scale(self, step: int) -> torch.Tensor:
        """Linear warm-up of the sparsity coefficient over `sparsity_warmup_steps`."""
        return ((step + 1) / self.sparsity_warmup_M).clamp(max=1.0).float()

    def step(self, x_BD: torch.Tensor, step: int) -> tuple[sae.Loss, torch.Tensor, torch.Tensor]:
        """One update of every SAE; returns the losses, learning rates and sparsity coefficients.

        A non-finite loss is recorded on the device, not read here (reading it would make the
        host wait for the GPU every step); `check_finite` reads it at the logging and checkpoint
        interval, before any checkpoint or output is written."""
        if step == 0:
            self.model.init_from_batch(x_BD)
        lr_M, scale_M = self.lr(step), self.sparsity_scale(step)
        losses = self.model.loss(x_BD, scale_M, step)
        new_M = (self.first_nonfinite_M < 0) & ~torch.isfinite(losses.loss)
        self.first_nonfinite_M = torch.where(new_M, step, self.first_nonfinite_M)
        self.optimizer.zero_grad()
        losses.loss.sum().backward()  # independent SAEs: each gets its own loss's gradient
        self.model.remove_parallel_grads()
        self.clip_grads()
        self.optimizer.step(lr_M)
        self.model.normalize_decoder()
        return losses, lr_M, self.model.sparsity_coeff * scale_M

    def check_finite(self, step: int, weights: bool = False):
        """Raise NonFiniteLoss naming the SAEs whose loss became NaN or infinite, and the first
        step it did; the one place a step's outcome is read back. With `weights` (before a
        checkpoint), the weights after step `step`'s update are checked too."""
        if weights:
            with torch.no_grad():
                finite_M = torch.stack(
                    [
                        torch.isfinite(p).reshape(len(p), -1).all(dim=1)
                        for p in self.model.parameters()
                    ]
                ).all(dim=0)
            new_M = (self.first_nonfinite_M < 0) & ~finite_M
            self.first_nonfinite_M = torch.where(new_M, step, self.first_nonfinite_M)
        first_M = self.first_nonfinite_M.tolist()
        bad = [(sae_id, s) for sae_id, s in zip(self.sae_ids, first_M, strict=True) if s >= 0]
        if bad:
            first = min(s for _, s in bad)
            names = ", ".join(sae_id for sae_id, _ in bad)
            raise NonFiniteLoss(f"SAE {names}: non-finite loss or weights at step {first}")

    @torch.no_grad()
    def clip_grads(self):
        """Scale each SAE's gradient (all its parameters together) down to `grad_clip`."""
        if not self.clips:
            return
        clip_M = self.grad_clip_M
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm_M = torch.stack([g.flatten(1).pow(2).sum(dim=1) for g in grads]).sum(dim=0).sqrt()
        scale_M = torch.where(clip_M > 0, (clip_M / (norm_M + 1e-6)).clamp(max=1.0), 1.0)
        for g in grads:
            g.mul_(scale_M.view(-1, *([1] * (g.dim() - 1))))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def make_stacks(specs: dict[str, config.SaeSpec], n_steps: int, device) -> dict[str, Stack]:
    """One stack per (activation, width) in the group, keyed like `topk-x8`."""
    by_kind: dict[str, dict[str, config.SaeSpec]] = {}
    for sae_id, spec in specs.items():
        by_kind.setdefault(f"{spec.sae.activation}-x{spec.sae.exp_factor}", {})[sae_id] = spec
    return {name: Stack(group, n_steps, device) for name, group in sorted(by_kind.items())}


def train_group(
    saes: dict[str, dict],
    shards_dpath: pathlib.Path,
    out_dpath: pathlib.Path,
    *,
    work_dpath: pathlib.Path | None = None,
    checkpoint_every: int = 0,
    device: str = "auto",
    log_every: int = 10,
    wandb_project: str | None = None,
) -> dict[str, sae.SparseAutoencoder]:
    """Train the SAEs `saes` (id -> flat configuration, as `sae.pt` stores it) on the shard
    directory `shards_dpath`; return them by id. They must agree on the stream settings
    (`config.STREAM_FIELDS`): one stream of batches feeds them all.

    `checkpoint_every` > 0 writes a checkpoint to `work_dpath` every that many steps;
    `wandb_project` also sends the logs to Weights & Biases (one run, named after `out_dpath`).
    Only one job at a time trains a group: a second one (say, from a run started after
    `snakemake --unlock` while the first was still going) refuses to start, naming the first,
    and touches neither its checkpoint nor its output.
    """
    out_dpath = pathlib.Path(out_dpath)
    work_dpath = pathlib.Path(work_dpath or out_dpath.with_name(out_dpath.name + ".work"))
    work_dpath.mkdir(parents=True, exist_ok=True)
    with helpers.exclusive_lock(work_dpath / LOCK_FNAME, f"sweep group {out_dpath.name}"):
        return train_locked(
            saes,
            shards_dpath,
            out_dpath,
            work_dpath,
            checkpoint_every=checkpoint_every,
            device=device,
            log_every=log_every,
            wandb_project=wandb_project,
        )


def train_locked(
    group: dict[str, dict],
    shards_dpath: pathlib.Path,
    out_dpath: pathlib.Path,
    work_dpath: pathlib.Path,
    *,
    checkpoint_every: int,
    device: str,
    log_every: int,
    wandb_project: str | None,
) -> dict[str, sae.SparseAutoencoder]:
    """`train_group` once it holds the group's lock."""
    torch_device = helpers.pick_device(device)
    reader = shards.ShardReader(shards_dpath)
    saes = {sae_id: config.sae_spec(reader.metadata.d_vit, flat) for sae_id, flat in group.items()}
    stream = one_stream(saes)
    labels_NT = None
    if stream.ignore_labels:
        labels_NT = reader.labels()
        if labels_NT is None:
            raise shards.ShardError(f"ignore_labels needs labels.bin, and {reader.dpath} has none")
    batches = loaders.ShuffledLoader(
        reader,
        stream.layer,
        stream.tokens,
        stream.batch_size,
        stream.n_train,
        stream.seed,
        labels_NT=labels_NT,
        ignore_labels=stream.ignore_labels,
    )
    stacks = make_stacks(saes, len(batches), torch_device)
    first_step = resume(work_dpath, group, stacks, batches)
    logs = open_logs(work_dpath, sorted(saes), first_step)
    wandb_run = tracking.WandbRun(wandb_project, out_dpath.name, group) if wandb_project else None

    t0 = time.perf_counter()
    # The loader's time only, not the copies to the device; labels only filtered, not used.
    timed_batches = WaitTimer(batches if labels_NT is None else (x for x, _ in batches))
    try:
        for step, x_BD in enumerate(
            loaders.ToDevice(timed_batches, torch_device), start=first_step
        ):
            is_last = step == len(batches) - 1
            is_log_step = step % log_every == 0 or is_last
            is_checkpoint = checkpoint_every and (step + 1) % checkpoint_every == 0 and not is_last
            rows = {}
            for stack in stacks.values():
                losses, lr_M, coeff_M = stack.step(x_BD, step)
                if is_log_step or is_checkpoint:  # the step's outcome is read only here
                    check_finite(stack, step, is_checkpoint or is_last, batches, work_dpath)
                if is_log_step:
                    rows |= log_rows(stack, step, losses, lr_M, coeff_M)
            if is_log_step:
                for sae_id, row in rows.items():
                    logs[sae_id][1].writerow(row)
                if wandb_run:
                    wandb_run.log(step, rows)
                rate = (step + 1 - first_step) / (time.perf_counter() - t0)
                eta_s = (len(batches) - step - 1) / rate
                logger.info(
                    "step %d/%d, %.1f steps/s, ETA %.0fs", step + 1, len(batches), rate, eta_s
                )
            if is_checkpoint:
                save_checkpoint(work_dpath, group, step + 1, stacks, batches, logs)
    finally:
        for log_fd, _ in logs.values():
            log_fd.close()
        if wandb_run:
            wandb_run.finish()
    total_s = time.perf_counter() - t0
    wait_s = timed_batches.wait_s
    logger.info(
        "data wait %.1f %% of %.0f s (%.1f s waiting for batches)",
        100 * wait_s / max(total_s, 1e-9),
        total_s,
        wait_s,
    )

    models = {
        sae_id: stack.model.member(m)
        for stack in stacks.values()
        for m, sae_id in enumerate(stack.sae_ids)
    }
    # Each file is renamed into place whole, and `group.json` (the rule's declared output) comes
    # last: a failed or killed job leaves the previous complete SAEs where they were.
    for sae_id, model in models.items():
        member_dpath = out_dpath / sae_id
        member_dpath.mkdir(parents=True, exist_ok=True)
        log_bytes = (work_dpath / f"{sae_id}.csv").read_bytes()
        shards.write_atomic(member_dpath / "train_log.csv", log_bytes, sync=False)
        # Keys sorted, as in the spec file: the same header bytes however the job was started.
        sae.save(member_dpath / "sae.pt", model, train=dict(sorted(group[sae_id].items())))
    stream_dct = {k: getattr(stream, k) for k in config.STREAM_FIELDS}
    summary = {"stream": stream_dct, "saes": sorted(saes), "steps": len(batches)}
    shards.write_atomic(
        out_dpath / jobs.GROUP_FNAME, (json.dumps(summary, indent=2) + "\n").encode()
    )
    shutil.rmtree(work_dpath)
    return models


def check_finite(
    stack: Stack,
    step: int,
    weights: bool,
    batches: loaders.ShuffledLoader,
    work_dpath: pathlib.Path,
):
    """Stop on a non-finite loss (or, before a checkpoint, non-finite weights), naming the shard
    file and image if the data is at fault, before anything is written: the last checkpoint (from
    before the divergence) stays."""
    try:
        stack.check_finite(step, weights)
    except NonFiniteLoss as err:
        batches.find_nonfinite()  # raises ShardError if a non-finite vector is in the data
        raise NonFiniteLoss(
            f"{err}; the training activations are finite, so training diverged "
            "(lower `lr` or the sparsity coefficient). Nothing was written; the last "
            f"checkpoint stays in {work_dpath}"
        ) from None


def one_stream(saes: dict[str, config.SaeSpec]) -> config.TrainConfig:
    """The training config whose stream settings every SAE of the group shares."""
    first_id, *other_ids = sorted(saes)
    first = saes[first_id].train
    for sae_id in other_ids:
        train = saes[sae_id].train
        if differing := [k for k in config.STREAM_FIELDS if getattr(train, k) != getattr(first, k)]:
            raise ValueError(
                f"the SAEs of a group must share one data stream; {first_id} and {sae_id} "
                f"differ in {differing}"
            )
    return first


def log_rows(stack: Stack, step: int, losses: sae.Loss, lr_M, coeff_M) -> dict[str, dict]:
    """One log row (`LOG_FIELDS`) per SAE of the stack."""
    dead_M = stack.model.dead_fraction()
    rows = {}
    for m, sae_id in enumerate(stack.sae_ids):
        row = {k: getattr(losses, k)[m].item() for k in ("loss", "mse", "l0", "l1", "aux")}
        row.update(
            step=step,
            lr=lr_M[m].item(),
            sparsity_coeff=coeff_M[m].item(),
            dead_frac=dead_M[m].item(),
        )
        rows[sae_id] = row
    return rows


def resume(
    work_dpath: pathlib.Path,
    group: dict,
    stacks: dict[str, Stack],
    batches: loaders.ShuffledLoader,
) -> int:
    """Load the work folder's checkpoint, if any; return the step to continue from."""
    fpath = work_dpath / CHECKPOINT_FNAME
    if not fpath.exists():
        return 0
    try:
        ckpt = torch.load(fpath, weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"{fpath}: cannot read the training checkpoint ({type(err).__name__}: {err}); delete "
            "it to start the group over"
        ) from None
    if ckpt["group"] != group:
        logger.warning("%s belongs to another configuration; starting over", fpath)
        return 0
    if not checkpoint_fits(ckpt, stacks):
        logger.warning("%s was written by other training code; starting over", fpath)
        return 0
    for name, stack in stacks.items():
        stack.load_state_dict(ckpt["stacks"][name])
    batches.load_state_dict(ckpt["loader"])
    logger.info("resuming from %s at step %d", fpath, ckpt["step"])
    return ckpt["step"]


def checkpoint_fits(ckpt: dict, stacks: dict[str, Stack]) -> bool:
    """Whether a checkpoint holds exactly the tensors (names, shapes) these stacks have; one from
    an older version of the code (a rerun after a code change) may not."""
    if set(ckpt["stacks"]) != set(stacks):
        return False
    for name, stack in stacks.items():
        saved, current = ckpt["stacks"][name]["model"], stack.model.state_dict()
        if {k: tuple(v.shape) for k, v in saved.items()} != {
            k: tuple(v.shape) for k, v in current.items()
        }:
            return False
    return True


def save_checkpoint(
    work_dpath: pathlib.Path,
    group: dict,
    step: int,
    stacks: dict[str, Stack],
    batches: loaders.ShuffledLoader,
    logs: dict,
):
    """Atomically replace the checkpoint; the logs are flushed first so they cover `step`."""
    for log_fd, _ in logs.values():
        log_fd.flush()
    ckpt = {
        "group": group,
        "step": step,
        "stacks": {name: stack.state_dict() for name, stack in stacks.items()},
        "loader": batches.state_dict(),
    }
    tmp_fpath = work_dpath / f".{CHECKPOINT_FNAME}.tmp"
    torch.save(ckpt, tmp_fpath)
    tmp_fpath.replace(work_dpath / CHECKPOINT_FNAME)


def open_logs(work_dpath: pathlib.Path, sae_ids: list[str], first_step: int) -> dict:
    """Per-SAE CSV logs in the work folder, cut back to the rows before `first_step`."""
    work_dpath.mkdir(parents=True, exist_ok=True)
    logs = {}
    for sae_id in sae_ids:
        fpath = work_dpath / f"{sae_id}.csv"
        kept = []
        if first_step > 0 and fpath.exists():
            with open(fpath, newline="") as fd:
                kept = [row for row in csv.DictReader(fd) if int(row["step"]) < first_step]
        log_fd = open(fpath, "w", newline="")
        writer = csv.DictWriter(log_fd, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(kept)
        logs[sae_id] = (log_fd, writer)
    return logs


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--spec-fpath", type=pathlib.Path, required=True, help="a TrainGroupJob (JSON)"
    )
    parser.add_argument("--out-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--device", required=True, help="auto, cpu, cuda, ...")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    helpers.keep_freed_memory()
    job = jobs.TrainGroupJob.read(args.spec_fpath)
    train_group(
        job.saes,
        job.shards_dpath,
        args.out_dpath,
        work_dpath=job.work_dpath,
        checkpoint_every=job.checkpoint_every,
        device=args.device,
        wandb_project=job.wandb_project,
    )


if __name__ == "__main__":
    main()
