"""Train one sweep group: every SAE of the group is updated on the same batches.

Run as `python -m saev_core.train --group-json '{...}' --shards-dpath results/shards/<HASH>
--out-dpath results/<sweep>/groups/<group> --work-dpath results/<sweep>/work/<group>`. Writes
`<sae id>/sae.pt` and `<sae id>/train_log.csv` for each SAE, and `group.json`.

While it runs, the job keeps its logs and a training checkpoint (weights, optimiser and scheduler
states, loader position) in the work folder, outside the output Snakemake removes after a failure.
A job killed at any moment and run again continues from its last checkpoint and ends with the
same weights as an uninterrupted run; the work folder is removed once the outputs are written.
"""

import argparse
import csv
import json
import logging
import pathlib
import shutil
import time

import torch

from . import helpers, loaders, sae, shards

logger = logging.getLogger("train")
LOG_FIELDS = ("step", "loss", "mse", "l0", "l1", "lr")
CHECKPOINT_FNAME = "checkpoint.pt"


def sae_config(d_vit: int, cfg: dict) -> sae.SaeConfig:
    return sae.SaeConfig(
        d_vit=d_vit,
        exp_factor=cfg["exp_factor"],
        activation=cfg["activation"],
        sparsity_coeff=cfg.get("sparsity_coeff", 0.0),
        k=cfg.get("k", 0),
        seed=cfg["seed"],
    )


class Member:
    """One SAE of the group with its optimiser, LR schedule and log."""

    def __init__(self, cfg: dict, d_vit: int, device: torch.device):
        self.cfg = cfg
        self.model = sae.SparseAutoencoder(sae_config(d_vit, cfg)).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg["lr"])
        warmup = max(1, cfg["warmup_steps"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )

    def step(self, x_BD: torch.Tensor) -> sae.Loss:
        losses = self.model.loss(x_BD)
        self.optimizer.zero_grad(set_to_none=True)
        losses.loss.backward()
        self.model.remove_parallel_grads()
        self.optimizer.step()
        self.scheduler.step()
        self.model.normalize_decoder()
        return losses

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def train_group(
    group: dict,
    shards_dpath: pathlib.Path,
    out_dpath: pathlib.Path,
    *,
    work_dpath: pathlib.Path | None = None,
    checkpoint_every: int = 0,
    device: str = "auto",
    log_every: int = 10,
) -> dict[str, sae.SparseAutoencoder]:
    """Train the SAEs in `group` ({"stream": {...}, "saes": {id: cfg}}); return them by id.

    `checkpoint_every` > 0 writes a checkpoint to `work_dpath` every that many steps.
    """
    torch_device = helpers.pick_device(device)
    stream = group["stream"]
    out_dpath = pathlib.Path(out_dpath)
    work_dpath = pathlib.Path(work_dpath) if work_dpath else out_dpath / ".work"
    reader = shards.ShardReader(shards_dpath)
    batches = loaders.ShuffledLoader(
        reader,
        stream["layer"],
        stream["tokens"],
        stream["batch_size"],
        stream["n_train"],
        stream["seed"],
    )
    d_vit = reader.metadata.d_vit
    members = {sae_id: Member(cfg, d_vit, torch_device) for sae_id, cfg in group["saes"].items()}
    first_step = resume(work_dpath, group, members, batches)
    logs = open_logs(work_dpath, members, first_step)

    t0 = time.perf_counter()
    try:
        for step, x_BD in enumerate(batches, start=first_step):
            x_BD = x_BD.to(torch_device)
            if step == 0:
                with torch.no_grad():
                    for member in members.values():
                        member.model.b_dec.copy_(x_BD.mean(dim=0))
            is_log_step = step % log_every == 0 or step == len(batches) - 1
            for sae_id, member in members.items():
                losses = member.step(x_BD)
                if is_log_step:
                    row = {k: getattr(losses, k).item() for k in ("loss", "mse", "l0", "l1")}
                    row.update(step=step, lr=member.optimizer.param_groups[0]["lr"])
                    logs[sae_id][1].writerow(row)
            if is_log_step:
                rate = (step + 1 - first_step) / (time.perf_counter() - t0)
                eta_s = (len(batches) - step - 1) / rate
                logger.info(
                    "step %d/%d, %.1f steps/s, ETA %.0fs", step + 1, len(batches), rate, eta_s
                )
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < len(batches):
                save_checkpoint(work_dpath, group, step + 1, members, batches, logs)
    finally:
        for log_fd, _ in logs.values():
            log_fd.close()

    out_dpath.mkdir(parents=True, exist_ok=True)
    for sae_id, member in members.items():
        (out_dpath / sae_id).mkdir(exist_ok=True)
        shutil.copyfile(work_dpath / f"{sae_id}.csv", out_dpath / sae_id / "train_log.csv")
        sae.save(out_dpath / sae_id / "sae.pt", member.model, train=member.cfg)
    summary = {"stream": stream, "saes": sorted(group["saes"]), "steps": len(batches)}
    (out_dpath / "group.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(work_dpath)
    return {sae_id: member.model for sae_id, member in members.items()}


def resume(
    work_dpath: pathlib.Path,
    group: dict,
    members: dict[str, Member],
    batches: loaders.ShuffledLoader,
) -> int:
    """Load the work folder's checkpoint, if any; return the step to continue from."""
    fpath = work_dpath / CHECKPOINT_FNAME
    if not fpath.exists():
        return 0
    ckpt = torch.load(fpath, weights_only=False)
    if ckpt["group"] != group:
        logger.warning("%s belongs to another configuration; starting over", fpath)
        return 0
    for sae_id, member in members.items():
        member.load_state_dict(ckpt["members"][sae_id])
    batches.load_state_dict(ckpt["loader"])
    torch.set_rng_state(ckpt["torch_rng"])
    logger.info("resuming from %s at step %d", fpath, ckpt["step"])
    return ckpt["step"]


def save_checkpoint(
    work_dpath: pathlib.Path,
    group: dict,
    step: int,
    members: dict[str, Member],
    batches: loaders.ShuffledLoader,
    logs: dict,
):
    """Atomically replace the checkpoint; the logs are flushed first so they cover `step`."""
    for log_fd, _ in logs.values():
        log_fd.flush()
    ckpt = {
        "group": group,
        "step": step,
        "members": {sae_id: member.state_dict() for sae_id, member in members.items()},
        "loader": batches.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    tmp_fpath = work_dpath / f".{CHECKPOINT_FNAME}.tmp"
    torch.save(ckpt, tmp_fpath)
    tmp_fpath.replace(work_dpath / CHECKPOINT_FNAME)


def open_logs(work_dpath: pathlib.Path, members: dict[str, Member], first_step: int) -> dict:
    """Per-SAE CSV logs in the work folder, cut back to the rows before `first_step`."""
    work_dpath.mkdir(parents=True, exist_ok=True)
    logs = {}
    for sae_id in members:
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
    parser.add_argument("--group-json", required=True, help='{"stream": {...}, "saes": {id: cfg}}')
    parser.add_argument("--shards-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--out-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--work-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--checkpoint-every", type=int, default=0, help="steps; 0 = never")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    train_group(
        json.loads(args.group_json),
        args.shards_dpath,
        args.out_dpath,
        work_dpath=args.work_dpath,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
    )


if __name__ == "__main__":
    main()
