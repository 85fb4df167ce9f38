"""Find, for every latent of an SAE, the images that activate it most (SPEC §8).

Run as `python -m saev_core.steps.topk --spec-fpath SPEC --out-fpath .../topk.npz --device
auto`, the spec a `jobs.TopkJob` (the SAE, the shard directory, layer, tokens, `top_k`,
percentile); the result's format is `saev_core.topk_results`. One ordered pass; memory is
O(d_sae * (top_k + n_bins)), never O(d_sae * top_k * n_patches): heatmaps are recomputed later for
the few images rendered.

Each latent's values when it fires are counted in a histogram of fixed log10 bins (`BIN_EDGES`,
0.05 decades wide from 1e-6 to 1e4; values outside go to the end bins). It gives the value
distribution of every latent and the percentile estimate: within one bin (12%) of the smallest
value that has the percentile's share of values at or below it.

Shape key: N = images in a chunk, T = tokens per image, D = d_vit, F = d_sae, K = top_k,
H = histogram bins.
"""

import argparse
import logging
import pathlib

import numpy as np
import torch

from .. import config, helpers, jobs, loaders, sae, shards
from ..topk_results import BIN_EDGES, LOG10_MAX, LOG10_MIN, N_BINS, TopK, save

logger = logging.getLogger("topk")


@torch.no_grad()
def top_k(
    model: sae.SparseAutoencoder,
    reader: shards.ShardReader,
    layer: int,
    tokens: str,
    k: int,
    percentile_q: float = config.SweepConfig.percentile,
    imgs_per_chunk: int = 64,
) -> TopK:
    """Ties are broken towards the lower image index."""
    device = model.b_dec.device
    F = model.cfg.d_sae
    values_KF = torch.zeros((0, F), device=device)
    imgs_KF = torch.zeros((0, F), dtype=torch.long, device=device)
    fires_F = torch.zeros(F, dtype=torch.float64, device=device)
    sums_F = torch.zeros(F, dtype=torch.float64, device=device)
    hist_FH = torch.zeros((F, N_BINS), dtype=torch.long, device=device)
    n_vectors = 0
    for start, rows in loaders.OrderedLoader(reader, layer, tokens):
        for lo in range(0, len(rows), imgs_per_chunk):
            x_NTD = torch.from_numpy(rows[lo : lo + imgs_per_chunk]).to(device)
            N, T, D = x_NTD.shape
            f_x_NTF = model.encode(x_NTD.reshape(N * T, D)).reshape(N, T, F)
            fires_F += (f_x_NTF > 0).sum(dim=(0, 1))
            sums_F += f_x_NTF.sum(dim=(0, 1))
            count_values(hist_FH, f_x_NTF.reshape(N * T, F))
            n_vectors += N * T
            img_max_NF = f_x_NTF.amax(dim=1)
            idx_N = torch.arange(start + lo, start + lo + N, device=device)
            # Earlier images come first, so a stable sort keeps the lower index among ties.
            cat_values = torch.cat([values_KF, img_max_NF])
            cat_imgs = torch.cat([imgs_KF, idx_N[:, None].expand(N, F)])
            order = cat_values.sort(dim=0, descending=True, stable=True).indices[:k]
            values_KF = cat_values.gather(0, order)
            imgs_KF = cat_imgs.gather(0, order)
    imgs_KF = torch.where(values_KF > 0, imgs_KF, -1)
    values_KF = values_KF.clamp(min=0)
    pad = k - len(values_KF)
    values_FK = torch.nn.functional.pad(values_KF.T, (0, pad), value=0.0)
    imgs_FK = torch.nn.functional.pad(imgs_KF.T, (0, pad), value=-1)
    mean_F = torch.where(fires_F > 0, sums_F / fires_F.clamp(min=1), 0.0)
    value_hist_FH = hist_FH.cpu().numpy()
    return TopK(
        top_values=values_FK.cpu().numpy(),
        top_imgs=imgs_FK.cpu().numpy(),
        freq=(fires_F / n_vectors).float().cpu().numpy(),
        mean_value=mean_F.float().cpu().numpy(),
        percentile=estimate_percentile(value_hist_FH, percentile_q),
        percentile_q=percentile_q,
        value_hist=value_hist_FH,
    )


def count_values(hist_FH: torch.Tensor, f_x_BF: torch.Tensor):
    """Add the positive values of `f_x_BF` to each latent's log10 histogram."""
    rows, latents = f_x_BF.nonzero(as_tuple=True)
    log_values = f_x_BF[rows, latents].log10()
    bins = ((log_values - LOG10_MIN) * (N_BINS / (LOG10_MAX - LOG10_MIN))).long()
    flat = latents * N_BINS + bins.clamp(0, N_BINS - 1)
    hist_FH.view(-1).index_add_(0, flat, torch.ones_like(flat))


def estimate_percentile(hist_FH: np.ndarray, q: float) -> np.ndarray:
    """The q-th percentile of each latent's histogrammed values, interpolating log-linearly
    inside the bin where the cumulative count crosses it; 0 for latents that never fire."""
    cum_FH = hist_FH.cumsum(axis=1)
    total_F = cum_FH[:, -1]
    rank_F = q / 100 * total_F
    bin_F = np.minimum((cum_FH < rank_F[:, None]).sum(axis=1), N_BINS - 1)
    rows = np.arange(len(hist_FH))
    below_F = np.where(bin_F > 0, cum_FH[rows, np.maximum(bin_F - 1, 0)], 0)
    inside_F = hist_FH[rows, bin_F]
    frac_F = np.clip((rank_F - below_F) / np.maximum(inside_F, 1), 0, 1)
    log10_F = BIN_EDGES[bin_F] + frac_F * (BIN_EDGES[1] - BIN_EDGES[0])
    return np.where(total_F > 0, 10**log10_F, 0.0).astype(np.float32)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec-fpath", type=pathlib.Path, required=True, help="a TopkJob")
    parser.add_argument("--out-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--device", required=True, help="auto, cpu, cuda, ...")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    job = jobs.TopkJob.read(args.spec_fpath)
    model = sae.load(job.sae_fpath, helpers.pick_device(args.device))
    reader = shards.ShardReader(job.shards_dpath)
    result = top_k(model, reader, job.layer, job.tokens, job.top_k, job.percentile)
    logger.info("%d of %d latents fired", int((result.freq > 0).sum()), len(result.freq))
    save(args.out_fpath, result)


if __name__ == "__main__":
    main()
