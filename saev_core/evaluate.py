"""Evaluate one SAE on held-out activations and write `metrics.json`.

Run as `python -m saev_core.evaluate --sae-fpath .../sae.pt --shards-dpath results/shards/<HASH>
--out-fpath .../metrics.json`. Uses the same layer and token kind the SAE was trained on.

Shape key: B = batch, D = d_vit, F = d_sae.
"""

import argparse
import json
import logging
import pathlib

import torch

from . import helpers, loaders, sae, shards

logger = logging.getLogger("evaluate")
ALMOST_DEAD_FREQ = 1e-7
DENSE_FREQ = 1e-2


@torch.no_grad()
def evaluate(
    model: sae.SparseAutoencoder, reader: shards.ShardReader, layer: int, tokens: str
) -> dict:
    """Reconstruction and sparsity metrics over every vector of `layer` in the shards."""
    device = model.b_dec.device
    d_sae = model.cfg.d_sae
    n, sq_err, l0, l1 = 0, 0.0, 0.0, 0.0
    sum_x_D = torch.zeros(model.cfg.d_vit, dtype=torch.float64)
    sum_xx_D = torch.zeros(model.cfg.d_vit, dtype=torch.float64)
    fires_F = torch.zeros(d_sae, dtype=torch.float64)
    for _, x_NTD in loaders.OrderedLoader(reader, layer, tokens):
        x_BD = torch.from_numpy(x_NTD.reshape(-1, model.cfg.d_vit)).to(device)
        x_hat_BD, f_x_BF = model(x_BD)
        n += len(x_BD)
        sq_err += (x_hat_BD - x_BD).pow(2).sum().item()
        l0 += (f_x_BF > 0).sum().item()
        l1 += f_x_BF.sum().item()
        fires_F += (f_x_BF > 0).sum(dim=0).double().cpu()
        sum_x_D += x_BD.sum(dim=0).double().cpu()
        sum_xx_D += x_BD.double().pow(2).sum(dim=0).cpu()
    d_vit = model.cfg.d_vit
    total_var = (sum_xx_D - sum_x_D.pow(2) / n).sum().item()
    freq_F = fires_F / n
    return {
        "n_vectors": n,
        "d_sae": d_sae,
        "l0": l0 / n,
        "l1": l1 / n,
        "mse": sq_err / (n * d_vit),
        "normalized_mse": sq_err / total_var,
        "explained_variance": 1.0 - sq_err / total_var,
        "n_dead": int((fires_F == 0).sum()),
        "n_almost_dead": int((freq_F < ALMOST_DEAD_FREQ).sum()),
        "n_dense": int((freq_F > DENSE_FREQ).sum()),
    }


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sae-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--shards-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--out-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    model, train_cfg = sae.load_trained(args.sae_fpath, helpers.pick_device(args.device))
    reader = shards.ShardReader(args.shards_dpath)
    metrics = evaluate(model, reader, train_cfg["layer"], train_cfg["tokens"])
    logger.info("%s", metrics)
    args.out_fpath.write_text(json.dumps(metrics, indent=2) + "\n")


if __name__ == "__main__":
    main()
