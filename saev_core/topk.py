"""Find, for every latent of an SAE, the images that activate it most (SPEC §8).

Run as `python -m saev_core.topk --sae-fpath .../sae.pt --shards-dpath results/shards/<HASH>
--top-k 16 --out-fpath .../topk.npz`. One ordered pass; memory is O(d_sae * top_k), never
O(d_sae * top_k * n_patches): heatmaps are recomputed later for the few images rendered.

Shape key: N = images in a chunk, T = tokens per image, D = d_vit, F = d_sae, K = top_k.
"""

import argparse
import logging
import pathlib
import typing

import numpy as np
import torch

from . import helpers, loaders, sae, shards

logger = logging.getLogger("topk")


class TopK(typing.NamedTuple):
    """What the top-k pass learns about each latent."""

    top_values: np.ndarray
    """(F, K) largest per-image activation (max over the image's tokens), descending."""
    top_imgs: np.ndarray
    """(F, K) image index of each value; -1 where the latent never fired on that many images."""
    freq: np.ndarray
    """(F,) fraction of token vectors on which the latent fires."""
    mean_value: np.ndarray
    """(F,) mean activation over the vectors where it fires (0 if never)."""


@torch.no_grad()
def top_k(
    model: sae.SparseAutoencoder,
    reader: shards.ShardReader,
    layer: int,
    tokens: str,
    k: int,
    imgs_per_chunk: int = 64,
) -> TopK:
    """Ties are broken towards the lower image index."""
    device = model.b_dec.device
    F = model.cfg.d_sae
    values_KF = torch.zeros((0, F), device=device)
    imgs_KF = torch.zeros((0, F), dtype=torch.long, device=device)
    fires_F = torch.zeros(F, dtype=torch.float64, device=device)
    sums_F = torch.zeros(F, dtype=torch.float64, device=device)
    n_vectors = 0
    for start, rows in loaders.OrderedLoader(reader, layer, tokens):
        for lo in range(0, len(rows), imgs_per_chunk):
            x_NTD = torch.from_numpy(rows[lo : lo + imgs_per_chunk]).to(device)
            N, T, D = x_NTD.shape
            f_x_NTF = model.encode(x_NTD.reshape(N * T, D)).reshape(N, T, F)
            fires_F += (f_x_NTF > 0).sum(dim=(0, 1))
            sums_F += f_x_NTF.sum(dim=(0, 1))
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
    return TopK(
        top_values=values_FK.cpu().numpy(),
        top_imgs=imgs_FK.cpu().numpy(),
        freq=(fires_F / n_vectors).float().cpu().numpy(),
        mean_value=mean_F.float().cpu().numpy(),
    )


def save(fpath: pathlib.Path, result: TopK):
    tmp_fpath = pathlib.Path(fpath).with_name(f".{pathlib.Path(fpath).name}.tmp.npz")
    np.savez(tmp_fpath, **result._asdict())
    tmp_fpath.replace(fpath)


def load(fpath: pathlib.Path) -> TopK:
    with np.load(fpath) as data:
        return TopK(**{field: data[field] for field in TopK._fields})


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sae-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--shards-dpath", type=pathlib.Path, required=True)
    parser.add_argument("--top-k", type=int, required=True)
    parser.add_argument("--out-fpath", type=pathlib.Path, required=True)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    helpers.setup_logging()
    model, train_cfg = sae.load_trained(args.sae_fpath, helpers.pick_device(args.device))
    reader = shards.ShardReader(args.shards_dpath)
    result = top_k(model, reader, train_cfg["layer"], train_cfg["tokens"], args.top_k)
    logger.info("%d of %d latents fired", int((result.freq > 0).sum()), len(result.freq))
    save(args.out_fpath, result)


if __name__ == "__main__":
    main()
