"""Train one sweep group: every SAE of the group is updated on the same batches.

Run as `python -m saev_core.train --group-json '{...}' --shards-dpath results/shards/<HASH>
--out-dpath results/<sweep>/groups/<group>`. Writes `<sae id>/sae.pt` and `<sae id>/train_log.csv`
for each SAE, and `group.json`.
"""

import argparse
import csv
import json
import logging
import pathlib
import time

import torch

from . import helpers, loaders, sae, shards

logger = logging.getLogger("train")
LOG_FIELDS = ("step", "loss", "mse", "l0", "l1", "lr")


def sae_config(d_vit: int, cfg: dict) -> sae.SaeConfig:
    return sae.SaeConfig(
        d_vit=d_vit,
        exp_factor=cfg["exp_factor"],
        activation=cfg["activation"],
        sparsity_coeff=cfg.get("sparsity_coeff", 0.0),
        k=cfg.get("k", 0),
        seed=cfg["seed"],
    )


def train_group(
    group: dict,
    shards_dpath: pathlib.Path,
    out_dpath: pathlib.Path,
    *,
    device: str = "auto",
    log_every: int = 10,
) -> dict[str, sae.SparseAutoencoder]:
    """Train the SAEs in `group` ({"stream": {...}, "saes": {id: cfg}}); return them by id."""
    torch_device = helpers.pick_device(device)
    stream = group["stream"]
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
    models, optimizers, schedulers, log_writers = {}, {}, {}, {}
    out_dpath = pathlib.Path(out_dpath)
    for sae_id, cfg in group["saes"].items():
        model = sae.SparseAutoencoder(sae_config(d_vit, cfg)).to(torch_device)
        models[sae_id] = model
        optimizers[sae_id] = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        warmup = max(1, cfg["warmup_steps"])
        schedulers[sae_id] = torch.optim.lr_scheduler.LambdaLR(
            optimizers[sae_id], lambda step, warmup=warmup: min(1.0, (step + 1) / warmup)
        )
        (out_dpath / sae_id).mkdir(parents=True, exist_ok=True)
        log_fd = open(out_dpath / sae_id / "train_log.csv", "w", newline="")
        log_writers[sae_id] = (log_fd, csv.DictWriter(log_fd, LOG_FIELDS))
        log_writers[sae_id][1].writeheader()

    t0 = time.perf_counter()
    for step, x_BD in enumerate(batches):
        x_BD = x_BD.to(torch_device)
        if step == 0:
            with torch.no_grad():
                for model in models.values():
                    model.b_dec.copy_(x_BD.mean(dim=0))
        for sae_id, model in models.items():
            losses = model.loss(x_BD)
            optimizers[sae_id].zero_grad(set_to_none=True)
            losses.loss.backward()
            model.remove_parallel_grads()
            optimizers[sae_id].step()
            schedulers[sae_id].step()
            model.normalize_decoder()
            if step % log_every == 0 or step == len(batches) - 1:
                row = {k: getattr(losses, k).item() for k in ("loss", "mse", "l0", "l1")}
                row.update(step=step, lr=optimizers[sae_id].param_groups[0]["lr"])
                log_writers[sae_id][1].writerow(row)
        if step % log_every == 0 or step == len(batches) - 1:
            rate = (step + 1) / (time.perf_counter() - t0)
            eta_s = (len(batches) - step - 1) / rate
            logger.info("step %d/%d, %.1f steps/s, ETA %.0fs", step + 1, len(batches), rate, eta_s)

    for sae_id, model in models.items():
        log_writers[sae_id][0].close()
        sae.save(out_dpath / sae_id / "sae.pt", model, train=group["saes"][sae_id])
    summary = {"stream": stream, "saes": sorted(group["saes"]), "steps": len(batches)}
    (out_dpath / "group.json").write_text(json.dumps(summary, indent=2) + "\n")
    return models


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--group-json", required=True, help='{"stream": {...}, "saes": {id: cfg}}')
    parser.add_argument("--shards-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--out-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    train_group(json.loads(args.group_json), args.shards_dpath, args.out_dpath, device=args.device)


if __name__ == "__main__":
    main()
